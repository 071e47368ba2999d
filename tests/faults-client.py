#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""faults-client.py - fault injection sweeps, run by tests/test-faults.sh.

  faults-client.py serve OP [OP...]     faults in the plugin (nbdkit)
  faults-client.py compact OP [OP...]   faults in qcow-tool compact
  faults-client.py enospc DIR FILLER     a real full file system

OP is "op[:flag...]" as in QCOW_DEBUG_FAULT without the count and errno,
e.g. write, sync, read, punch, truncate, write:short, sync:persistent.
For each OP the sweep sets QCOW_DEBUG_FAULT=op:N:EIO[:flags] for N = 1,
2, ... $QCOW_FAULT_DENSE (default 30) and then every ~25% more (with
flags: every ~33% more from the start), until a run in which the fault
no longer fires (it is seen firing by the "(injected)" error message;
punch faults are silent, so they are swept over a fixed range).

serve: a fresh image (512-byte clusters, 64-bit refcounts, 16 MiB: L2
tables and the refcount table grow) is served by the plugin with the
fault armed, and one client runs a fixed scenario
of writes, FUA writes, trims, zeroes and flushes, recording for every
512-byte sector what it may hold now (cur) and what it may hold after a
restart (dur: what was there at the last successful flush, plus anything
written since).  A failed request makes its sectors unknown.  Asserted
after every fault:
  - the request during which the fault fired failed (or, for a write
    whose effect is only deferred, a later request or the shutdown
    reported it; for a fault in the server's background thread, which
    punches the holes of a flush's frees, a later request failed or the
    server logged it: an error is never swallowed);
  - the server still serves: a read of known data after the failure
    returns it (skipped for persistent read faults);
  - after shutdown: qemu-img check finds no errors (leaks are fine);
  - reopened by the plugin without faults (read-only), every sector
    holds one of its allowed durable contents;
  - every 7th N also: reopened read-write, it takes a write and a flush
    and still passes qemu-img check.

compact: an image with holes (all data flushed) is compacted by qcow-tool
with the fault armed; whether or not compaction fails, qemu-img check
finds no errors and the guest data is unchanged (qemu-img compare).

enospc (tests/test-enospc.sh): DIR is a small file system holding the
file FILLER.  The plugin creates an image there bigger than the file
system, and writes 1 MiB at a time (flushing every 4 MiB) until a write
fails, which must be with ENOSPC.  Then: known data still reads back,
qemu-img check finds no errors after shutdown, and flushed data is
intact; with FILLER deleted, the image takes writes again and is clean.

Environment: QCOW_SO, QCOW_TOOL, TMPD (from tests/functions.sh);
QCOW_FAULT_LAZY=1 makes images with lazy refcounts (a dirty image left
by a failed shutdown is then repaired by qemu-img check -r all on a copy,
which must succeed).  Prints one line per op and exits 1 if anything
failed; the first failure ends an op's sweep unless
QCOW_FAULT_KEEP_GOING=1.
"""

import bisect
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import nbd

SO = os.environ["QCOW_SO"]
TOOL = os.environ["QCOW_TOOL"]
TMPD = os.environ["TMPD"]
LAZY = os.environ.get("QCOW_FAULT_LAZY") == "1"
KEEP_GOING = os.environ.get("QCOW_FAULT_KEEP_GOING") == "1"
DENSE = int(os.environ.get("QCOW_FAULT_DENSE", "30"))
SECTOR = 512
DISK = 16 << 20
MiB = 1 << 20
ZERO = frozenset([0])
ANY = None          # a sector whose contents are unknown

IMG = os.path.join(TMPD, "fault.qcow2")
LOG = os.path.join(TMPD, "nbdkit.log")
PIDFILE = os.path.join(TMPD, "nbdkit.pid")


class Failure(Exception):
    pass


def sector_bytes(wid, s):
    """The contents write WID gives sector S (0: zeros)."""
    if wid == 0:
        return bytes(SECTOR)
    return struct.pack("<QQ", wid, s) * (SECTOR // 16)


def union(a, b):
    return ANY if a is ANY or b is ANY else a | b


class Model:
    """Per sector: the set of write ids it may hold now and after a
    restart (ANY: unknown).  Untouched sectors are zero."""

    def __init__(self):
        self.cur = {}
        self.dur = {}

    def sectors(self, off, n):
        return range(off // SECTOR, (off + n) // SECTOR)

    def written(self, off, n, wid, ok, fua):
        for s in self.sectors(off, n):
            if not ok:
                self.cur[s] = self.dur[s] = ANY
                continue
            self.cur[s] = frozenset([wid])
            self.dur[s] = (frozenset([wid]) if fua
                           else union(self.dur.get(s, ZERO), self.cur[s]))

    def zeroed(self, off, n, ok, fua):
        self.written(off, n, 0, ok, fua)

    def trimmed(self, off, n, ok):
        for s in self.sectors(off, n):
            if not ok:
                self.cur[s] = self.dur[s] = ANY
                continue
            self.cur[s] = union(self.cur.get(s, ZERO), ZERO)
            self.dur[s] = union(self.dur.get(s, ZERO), self.cur[s])

    def flushed(self):
        self.dur = dict(self.cur)

    def check(self, data, off, which):
        """DATA read at OFF must fit WHICH (cur or dur): returns None, or
        the first bad sector, what it may hold and what it starts with."""
        table = self.cur if which == "cur" else self.dur
        first, count = off // SECTOR, len(data) // SECTOR
        keys = sorted(table)
        buf = bytearray(data)
        for s in keys[bisect.bisect_left(keys, first):bisect.bisect_left(keys, first + count)]:
            allowed = table[s]
            i = (s - first) * SECTOR
            got = bytes(buf[i:i + SECTOR])
            buf[i:i + SECTOR] = bytes(SECTOR)
            if allowed is ANY:
                continue
            if not any(got == sector_bytes(w, s) for w in allowed):
                return s, allowed, got[:16]
        if buf.count(0) != len(buf):              # untouched: zero
            i = next(j for j, b in enumerate(buf) if b)
            s = first + i // SECTOR
            return s, ZERO, bytes(buf[i - i % SECTOR:][:16])
        return None

    def known_sector(self):
        """Some sector with a known, single current value (for the
        'still serving' read)."""
        for s, v in sorted(self.cur.items()):
            if v is not ANY and len(v) == 1:
                return s
        return 0


def payload(off, n, wid):
    return b"".join(sector_bytes(wid, s)
                    for s in range(off // SECTOR, (off + n) // SECTOR))


def scenario():
    """The fixed request list: (kind, offset, length, flags)."""
    r = []
    # 3 MiB of sequential data: with 64-bit refcounts the file outgrows
    # what one refcount table cluster covers (64 blocks x 64 clusters x
    # 512 bytes = 2 MiB), so the refcount table grows.
    for i in range(3):
        r.append(("write", i * MiB, MiB, 0))
    r.append(("flush", 0, 0, 0))
    # Writes spread over the disk: a new L2 table each.
    for i in range(16):
        off = 4 * MiB + i * (11 * MiB // 16 // SECTOR * SECTOR) + (i % 7) * SECTOR
        r.append(("write", off, 4096 + (i % 3) * SECTOR,
                  nbd.CMD_FLAG_FUA if i % 8 == 5 else 0))
    r.append(("flush", 0, 0, 0))
    r.append(("trim", 256 * 1024, 512 * 1024, 0))
    r.append(("zero", MiB, 128 * 1024, 0))                         # may trim
    r.append(("zero", MiB + 256 * 1024 + 512, 32 * 1024, nbd.CMD_FLAG_NO_HOLE))
    r.append(("write", 2 * MiB, 64 * 1024, nbd.CMD_FLAG_FUA))      # in place
    r.append(("flush", 0, 0, 0))
    # Freed space is reused now that the unlinks are durable.
    for i in range(4):
        r.append(("write", 10 * MiB + i * 300 * 1024, 32 * 1024, 0))
    r.append(("trim", 4 * MiB, 8192, 0))
    r.append(("write", 256 * 1024 + 4096, 8192, 0))               # trimmed area
    r.append(("flush", 0, 0, 0))
    # Acknowledged but never flushed by the client (the shutdown does).
    r.append(("write", 2 * MiB + 128 * 1024, 4096, 0))
    r.append(("zero", 2 * MiB + 192 * 1024, 4096, 0))
    return r


def log_text():
    try:
        with open(LOG, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def exited(pid):
    """PID has exited (a zombie not yet reaped by libnbd counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid, what):
    for _ in range(600):
        if exited(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    raise Failure(f"{what}: nbdkit (pid {pid}) did not exit")


class Server:
    """nbdkit -s on a private socketpair, stderr to LOG, pid known."""

    def __init__(self, params, fault=None, readonly=False):
        env_fault = f"QCOW_DEBUG_FAULT={fault} " if fault else "QCOW_DEBUG_FAULT= "
        ro = "-r " if readonly else ""
        if os.path.exists(PIDFILE):
            os.unlink(PIDFILE)
        cmd = (f'{env_fault}exec nbdkit -s --exit-with-parent {ro}-P "$0" '
               f'"$1" {params} 2>>"$2"')
        self.h = nbd.NBD()
        self.h.connect_command(["sh", "-c", cmd, PIDFILE, SO, LOG])
        self.pid = None
        for _ in range(200):
            try:
                with open(PIDFILE) as f:
                    self.pid = int(f.read().strip())
                break
            except (FileNotFoundError, ValueError):
                time.sleep(0.01)

    def close(self, what):
        try:
            self.h.shutdown()
        except nbd.Error:
            pass
        del self.h
        if self.pid:
            wait_gone(self.pid, what)


def head(text, lines=25):
    t = text.splitlines()
    return "\n".join(t[:lines] + ([f"... ({len(t) - lines} more lines)"]
                                   if len(t) > lines else []))


def qemu_check(path):
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", path],
                       capture_output=True, text=True)
    return p.returncode, head(p.stdout + p.stderr)


def is_dirty(path):
    with open(path, "rb") as f:
        f.seek(72)
        return int.from_bytes(f.read(8), "big") & 1


def verify_image(model, what, rw_again, img=IMG, disk=DISK):
    """qemu-img check, then the plugin's view against the model."""
    status, out = qemu_check(img)
    if status not in (0, 3):
        if not (LAZY and is_dirty(img)):
            raise Failure(f"{what}: qemu-img check exited {status}:\n{out}")
        # Lazy refcounts: a dirty image may have stale refcounts, which
        # qemu-img check -r all must be able to repair.
        rep = img + ".repaired"
        shutil.copyfile(img, rep)
        p = subprocess.run(["qemu-img", "check", "-r", "all", "-f", "qcow2", rep],
                           capture_output=True, text=True)
        status2, out2 = qemu_check(rep)
        os.unlink(rep)
        if status2 not in (0, 3):
            raise Failure(f"{what}: dirty image, qemu-img check exited {status}, "
                          f"and after -r all {status2}:\n{out}\n{p.stdout}\n{out2}")
    srv = Server(f"file={img}", readonly=True)
    try:
        chunk = 4 * MiB
        for off in range(0, disk, chunk):
            data = srv.h.pread(chunk, off)
            bad = model.check(data, off, "dur")
            if bad:
                s, allowed, got = bad
                raise Failure(f"{what}: after restart sector {s} (offset {s * SECTOR}) "
                              f"holds {got.hex()}..., expected one of write ids "
                              f"{sorted(allowed)}")
    finally:
        srv.close(what)
    if rw_again:
        srv = Server(f"file={img}")
        try:
            srv.h.pwrite(payload(0, 4096, 999999), 0)
            srv.h.flush()
            if srv.h.pread(4096, 0) != payload(0, 4096, 999999):
                raise Failure(f"{what}: reopened read-write, a write did not read back")
        except nbd.Error as e:
            raise Failure(f"{what}: reopened read-write without faults: {e.string}")
        finally:
            srv.close(what)
        status, out = qemu_check(img)
        if status not in (0, 3):
            raise Failure(f"{what}: after reopening read-write, qemu-img check "
                          f"exited {status}:\n{out}")


def create(path, size, refcount_bits):
    """A new image with 512-byte clusters (qcow-tool: the plugin's
    create=true has no refcount width parameter)."""
    subprocess.run([TOOL, "create", path, str(size), "--cluster-size=512",
                    f"--refcount-bits={refcount_bits}",
                    f"--lazy-refcounts={'on' if LAZY else 'off'}", "--force"],
                   check=True, stdout=subprocess.DEVNULL)


def run_serve(op, flags, n, rw_again):
    """One scenario with the fault op:n armed.  Returns True if it fired."""
    fault = ":".join([op, str(n), "EIO"] + flags)
    what = f"QCOW_DEBUG_FAULT={fault}"
    persistent = "persistent" in flags
    for p in (IMG, LOG):
        if os.path.exists(p):
            os.unlink(p)
    create(IMG, DISK, 64)
    model = Model()
    try:
        srv = Server(f"file={IMG}", fault=fault)
    except nbd.Error as e:
        # A fault while opening the image: nbdkit must refuse to start,
        # leaving the image as it was.
        if "(injected)" not in log_text():
            raise Failure(f"{what}: nbdkit failed to start: {e.string}\n{log_text()}")
        verify_image(model, what, rw_again)
        return True, ["open!"]
    h = srv.h
    wid = 0
    fired_at = None          # index of the request during which it fired
    bg_fired_at = None       # ... or by then, in the background thread
    failed = []              # indexes of failed requests
    events = []
    try:
        for i, (kind, off, n_, fl) in enumerate(scenario()):
            before = len(log_text())
            ok = True
            err = None
            try:
                if kind == "write":
                    wid += 1
                    h.pwrite(payload(off, n_, wid), off, fl)
                elif kind == "flush":
                    h.flush()
                elif kind == "trim":
                    h.trim(n_, off, fl)
                elif kind == "zero":
                    h.zero(n_, off, fl)
            except nbd.Error as e:
                ok = False
                err = e.errno
                failed.append(i)
            fua = bool(fl & nbd.CMD_FLAG_FUA)
            if kind == "write":
                model.written(off, n_, wid, ok, fua)
            elif kind == "zero":
                model.zeroed(off, n_, ok, fua)
            elif kind == "trim":
                model.trimmed(off, n_, ok)
            elif kind == "flush" and ok:
                model.flushed()
            # Faults hitting the server's background thread (punching the
            # holes of a flush's frees: they can show up during any later
            # request) are reported by the next flush instead.
            injected = [l for l in log_text()[before:].splitlines() if "(injected)" in l]
            fired = any("in the background thread" not in l for l in injected)
            if len(injected) > 0 and not fired and bg_fired_at is None:
                bg_fired_at = i
            events.append(f"{i}:{kind}{'' if ok else '!' + str(err)}"
                          f"{'*' if fired else '+' if injected else ''}")
            if fired and fired_at is None:
                fired_at = i
            if fired and ok and op in ("read", "sync"):
                raise Failure(f"{what}: the fault fired during request {i} ({kind} "
                              f"{off}+{n_}) but it succeeded")
            if not ok and not (persistent and op == "read"):
                # Still serving: known data reads back.
                s = model.known_sector()
                try:
                    data = h.pread(SECTOR, s * SECTOR)
                except nbd.Error as e:
                    raise Failure(f"{what}: after request {i} ({kind}) failed, a read "
                                  f"of sector {s} failed too: {e.string}")
                if model.check(data, s * SECTOR, "cur"):
                    raise Failure(f"{what}: after request {i} ({kind}) failed, sector "
                                  f"{s} reads back wrong")
        # The whole disk as the live server sees it (no persistent read
        # fault: that would fail it).
        if not (persistent and op == "read"):
            for off in range(0, DISK, 8 * MiB):
                try:
                    data = h.pread(8 * MiB, off)
                except nbd.Error as e:
                    if fired_at is None and "(injected)" not in log_text():
                        raise Failure(f"{what}: read at {off} failed without a fault: "
                                      f"{e.string}")
                    continue
                bad = model.check(data, off, "cur")
                if bad:
                    raise Failure(f"{what}: live sector {bad[0]} holds {bad[2].hex()}..., "
                                  f"expected one of {sorted(bad[1])}")
    finally:
        srv.close(what)
    fired_total = log_text().count("(injected)") > 0
    if fired_at is not None and not failed:
        raise Failure(f"{what}: the fault fired during request {fired_at} but no "
                      f"request failed (error swallowed); requests: {' '.join(events)}")
    if bg_fired_at is not None and fired_at is None and \
            not [i for i in failed if i >= bg_fired_at] and "background:" not in log_text():
        raise Failure(f"{what}: the fault fired in the background thread by request "
                      f"{bg_fired_at} but neither a later request failed nor the server "
                      f"reported it; requests: {' '.join(events)}")
    if not fired_total and failed:
        raise Failure(f"{what}: requests failed without a fault: {' '.join(events)}\n"
                      f"{log_text()}")
    try:
        verify_image(model, what, rw_again)
    except Failure as e:
        raise Failure(f"{e}\nrequests (! failed, * fault fired, + in the background thread): {' '.join(events)}")
    return fired_total or op == "punch", events


def sweep_values(sparse):
    """1, 2, ... DENSE, then ~25% steps; SPARSE: ~33% steps throughout."""
    n = 1
    while True:
        yield n
        if sparse:
            n += max(1, n // 3)
        else:
            n = n + 1 if n < DENSE else n + max(1, n // 4)


def sweep(mode, spec, failures):
    """Sweep N for one op; returns when the fault stops firing.  Failures
    are appended to FAILURES; unless QCOW_FAULT_KEEP_GOING=1 the first
    one ends the sweep."""
    parts = spec.split(":")
    op, flags = parts[0], parts[1:]
    limit = 12 if op == "punch" else 100000
    runs = 0
    last_fired = 0
    bad = 0
    bg = 0                  # runs where it fired in the background thread
    t0 = time.time()
    for n in sweep_values(sparse=bool(flags) or LAZY):
        if n > limit:
            break
        runs += 1
        try:
            if mode == "serve":
                fired, events = run_serve(op, flags, n, rw_again=(n % 7 == 0))
                bg += any(e.endswith("+") for e in events)
            else:
                fired = run_compact(op, flags, n)
        except Failure as e:
            failures.append(str(e))
            print(f"FAIL: {e}\n---- nbdkit log (last lines) ----\n"
                  f"{head(log_text(), 15)}\n----", file=sys.stderr, flush=True)
            bad += 1
            if not KEEP_GOING:
                break
            fired = True
        if not fired:
            break
        last_fired = n
    in_bg = f" ({bg} of them in the background thread)" if bg else ""
    print(f"{mode} {spec}: {runs} runs, fault fired for N up to {last_fired}{in_bg}, "
          f"{bad} failed, {time.time() - t0:.1f}s", flush=True)


# ---- compaction ----------------------------------------------------------

TEMPLATE = os.path.join(TMPD, "compact-template.qcow2")
TEMPLATE_RAW = os.path.join(TMPD, "compact-template.raw")


def make_template():
    """An image with holes to compact: data, trims, all flushed."""
    for p in (TEMPLATE, LOG):
        if os.path.exists(p):
            os.unlink(p)
    create(TEMPLATE, 16 * MiB, 16)
    srv = Server(f"file={TEMPLATE}")
    h = srv.h
    wid = 0
    for i in range(48):
        wid += 1
        off = i * (16 * MiB // 48)
        h.pwrite(payload(off - off % SECTOR, 64 * 1024, wid), off - off % SECTOR)
    h.flush()
    for i in range(0, 48, 2):
        off = i * (16 * MiB // 48)
        h.trim(48 * 1024, off - off % SECTOR)
    h.flush()
    srv.close("template")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    TEMPLATE, TEMPLATE_RAW], check=True)


def run_compact(op, flags, n):
    fault = ":".join([op, str(n), "EIO"] + flags)
    what = f"qcow-tool compact with QCOW_DEBUG_FAULT={fault}"
    img = os.path.join(TMPD, "compact.qcow2")
    shutil.copyfile(TEMPLATE, img)
    env = dict(os.environ, QCOW_DEBUG_FAULT=fault)
    p = subprocess.run([TOOL, "compact", img], env=env, capture_output=True, text=True)
    out = p.stdout + p.stderr
    # (A failed truncate is reported without "(injected)".)
    fired = "(injected)" in out or (op == "truncate" and "truncate to " in out)
    if p.returncode != 0 and not fired and op != "punch":
        raise Failure(f"{what}: failed without a fault:\n{out}")
    if fired and p.returncode == 0 and op in ("read", "write", "sync"):
        raise Failure(f"{what}: the fault fired but compact reported success:\n{out}")
    status, cout = qemu_check(img)
    if status not in (0, 3):
        if not (LAZY and is_dirty(img)):
            raise Failure(f"{what}: qemu-img check exited {status}:\n{cout}\n{out}")
    p2 = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img,
                         TEMPLATE_RAW], capture_output=True, text=True)
    if p2.returncode != 0:
        raise Failure(f"{what}: guest data changed:\n{p2.stdout}{p2.stderr}\n{out}")
    # The image must still be usable: compact again without a fault.
    p3 = subprocess.run([TOOL, "compact", img], capture_output=True, text=True)
    if p3.returncode != 0:
        raise Failure(f"{what}: compacting again without a fault failed:\n"
                      f"{p3.stdout}{p3.stderr}")
    status, cout = qemu_check(img)
    if status not in (0, 3):
        raise Failure(f"{what}: after a second compaction qemu-img check exited "
                      f"{status}:\n{cout}")
    p2 = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img,
                         TEMPLATE_RAW], capture_output=True, text=True)
    if p2.returncode != 0:
        raise Failure(f"{what}: guest data changed by the second compaction:\n"
                      f"{p2.stdout}{p2.stderr}")
    return fired or op == "punch"


# ---- a real full file system ---------------------------------------------

def run_enospc(mnt, filler):
    """Fill the file system under the image until a write fails with
    ENOSPC; then free FILLER and carry on."""
    img = os.path.join(mnt, "enospc.qcow2")
    disk = 64 * MiB
    what = "ENOSPC"
    srv = Server(f"file={img} create=true size=64M lazy-refcounts=false")
    h = srv.h
    model = Model()
    wid = 0
    full_at = None
    try:
        for i in range(disk // MiB):
            off = i * MiB
            wid += 1
            try:
                h.pwrite(payload(off, MiB, wid), off)
                model.written(off, MiB, wid, True, False)
                if i % 4 == 3:
                    h.flush()
                    model.flushed()
            except nbd.Error as e:
                model.written(off, MiB, wid, False, False)
                if e.errno != "ENOSPC":
                    raise Failure(f"{what}: request at {off} failed with {e.errno}, "
                                  f"not ENOSPC: {e.string}")
                full_at = off
                break
        if full_at is None:
            raise Failure(f"{what}: {disk} bytes written to a file system smaller "
                          f"than that, and no ENOSPC")
        print(f"enospc: writes failed with ENOSPC at {full_at // MiB} MiB", flush=True)
        # Still serving: the data is there.
        for off in range(0, full_at, 4 * MiB):
            n = min(4 * MiB, full_at - off)
            bad = model.check(h.pread(n, off), off, "cur")
            if bad:
                raise Failure(f"{what}: live sector {bad[0]} reads back wrong")
        try:
            h.flush()
            model.flushed()
        except nbd.Error as e:
            if e.errno not in ("ENOSPC", "EIO"):
                raise Failure(f"{what}: flush failed with {e.errno}: {e.string}")
    finally:
        srv.close(what)
    verify_image(model, what, False, img=img, disk=disk)

    # Space again: the image takes writes where they failed before.
    os.unlink(filler)
    srv = Server(f"file={img}")
    h = srv.h
    try:
        for off in range(full_at, full_at + 4 * MiB, MiB):
            wid += 1
            h.pwrite(payload(off, MiB, wid), off)
            model.written(off, MiB, wid, True, False)
        h.flush()
        model.flushed()
    except nbd.Error as e:
        raise Failure(f"{what}: after freeing space, a write failed: {e.string}")
    finally:
        srv.close(what)
    status, out = qemu_check(img)
    if status != 0:
        raise Failure(f"{what}: after freeing space and writing, qemu-img check "
                      f"exited {status}:\n{out}")
    verify_image(model, what, True, img=img, disk=disk)
    print("enospc: after freeing space, writes work again", flush=True)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("serve", "compact", "enospc"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    mode = sys.argv[1]
    if mode == "enospc":
        try:
            run_enospc(sys.argv[2], sys.argv[3])
        except Failure as e:
            print(f"FAIL: {e}\n---- nbdkit log (last lines) ----\n"
                  f"{head(log_text(), 15)}", file=sys.stderr)
            return 1
        return 0
    failures = []
    if mode == "compact":
        make_template()
    for spec in sys.argv[2:]:
        sweep(mode, spec, failures)
    if failures:
        print(f"{len(failures)} failure(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

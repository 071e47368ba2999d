#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# space-client.py - the client side of tests/test-trim-zero.sh and
# tests/test-compact.sh (not a test by itself).  Every subcommand talks
# to an NBD server on a Unix socket (except "used" and "checkmap", which
# read an image file) and checks what it sees against an in-memory model
# of the disk; most write the model to --out for the caller to compare
# with the image (qemu-img compare).
#
#   trim SOCK IMG --seed N --cluster C --out MODEL [--no-discard]
#       Write 32 MiB, flush, trim 16 MiB (aligned) and an unaligned range,
#       flush: the file's st_blocks must drop by the trimmed 16 MiB (or not
#       at all with --no-discard), trimmed whole clusters read zeros,
#       partial clusters and everything else keep their data.
#   zero SOCK --seed N --cluster C --version 2|3 --out MODEL --expect EXP
#       Write-zeroes with every combination of NO_HOLE, FAST_ZERO and FUA,
#       aligned and not, over data and over unallocated space, each in its
#       own slot of the disk.  Checks the outcome (a failed FAST_ZERO must
#       fail with ENOTSUP and change nothing), the data and block status;
#       saves in EXP the ranges QEMU must see as zero clusters (checkmap).
#   checkmap IMG EXP
#       qemu-img map of IMG: the ranges in EXP are zero, and every range
#       QEMU calls zero reads as zeros in the model named in EXP.
#   status SOCK --seed N --cluster C --ops N --out MODEL [--v2]
#       A seeded random workload of writes, trims and write-zeroes; block
#       status (base:allocation) is walked over the whole disk from time
#       to time and must be sound: no model byte that is not zero inside a
#       ZERO extent, HOLE only with ZERO; and clusters the workload made
#       zero by metadata (whole-cluster trim or zero) reported ZERO.
#       nbdinfo --map must agree with the walk.
#   reuse SOCK IMG --mib N --out MODEL
#       Write N MiB, trim it, flush, write N MiB elsewhere, flush: the
#       file must not grow past N MiB plus metadata.
#   used IMG
#       Print the cluster size, the number of clusters in use (refcount
#       not zero, read from the file's refcount table: an oracle
#       independent of the plugin) and the file size in clusters.
#   online SOCK IMG --seed N --cluster C --out MODEL [--wait S]
#       Write fragmented data, trim most of it, flush, and wait (up to S
#       seconds) for the server's background compaction to shrink the
#       file, reading everything back against the model meanwhile.
#   crash SOCK PID STATE --image IMG --seed N --cluster C --kill-after S
#         [--quiet]
#       Write fragmented data, trim half, flush (compaction starts), then
#       go on writing, trimming, reading (checked) and sometimes flushing
#       until S seconds after that flush and kill -9 the server (PID).
#       --quiet: no I/O; wait until compaction is seen copying, then kill
#       the server within S seconds.  Saves in STATE the model as of the
#       last completed flush and the commands issued after it.
#   verify STATE RAW
#       RAW (the disk after the crash) must hold, sector by sector, the
#       model as of the last completed flush or what a command issued
#       after it left there.
#
# Exit status 0 on success, 1 on a failure (the seed is printed).

import argparse
import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import nbd

PROG = "space-client"
MiB = 1 << 20


class Failure(Exception):
    pass


# ---------------------------------------------------------------------------
# Helpers

def connect(sock, meta=False):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    if meta and not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        raise Failure("the server does not offer base:allocation")
    return h


def pwrite(h, data, off, flags=0):
    for o in range(0, len(data), 4 * MiB):
        h.pwrite(data[o:o + 4 * MiB], off + o, flags)


def pread(h, n, off):
    out = bytearray()
    for o in range(0, n, 4 * MiB):
        out += h.pread(min(4 * MiB, n - o), off + o)
    return out


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def expect_same(got, want, off, what):
    """GOT (read at disk offset OFF) must equal WANT."""
    if got != want:
        i = first_difference(got, want)
        raise Failure("%s: differs at disk offset %d: read %s, expected %s" %
                      (what, off + i, got[i:i + 16].hex(" "),
                       want[i:i + 16].hex(" ")))


def check_disk(h, model, what):
    expect_same(pread(h, len(model), 0), model, 0, what)


def blocks(img):
    """Bytes the file occupies (st_blocks)."""
    return os.stat(img).st_blocks * 512


def blocks_after_punching(img, enough, timeout=20.0):
    """st_blocks once the server's background thread has punched the
    holes of a flush: when ENOUGH(bytes) holds, or when the count has not
    moved for a second, or after TIMEOUT seconds."""
    t0 = last_change = time.monotonic()
    b = blocks(img)
    while not enough(b) and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
        nb = blocks(img)
        if nb != b:
            b, last_change = nb, time.monotonic()
        elif time.monotonic() - last_change > 1.0:
            break
    return b


def save(model, path):
    with open(path, "wb") as f:
        f.write(model)


def is_zero(b):
    return not any(b) if len(b) < 4096 else b == bytes(len(b))


def extents(h, size):
    """Walk block status (base:allocation) over the whole disk: a list of
    (offset, length, flags) covering [0, size) exactly."""
    out = []
    off = 0
    while off < size:
        got = []

        def cb(ctx, o, entries, err):
            if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                got.append((o, list(entries)))
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        if len(got) != 1 or got[0][0] != off or not got[0][1]:
            raise Failure("block status at %d: bad reply %r" % (off, got))
        ents = got[0][1]
        for i in range(0, len(ents), 2):
            n, flags = ents[i], ents[i + 1]
            if n == 0:
                raise Failure("block status at %d: zero-length extent" % off)
            n = min(n, size - off)
            out.append((off, n, flags))
            off += n
            if off >= size:
                break
    return out


def merge(runs):
    """Merge adjacent (offset, length, flags) runs with equal flags."""
    out = []
    for off, n, f in runs:
        if out and out[-1][2] == f and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, f)
        else:
            out.append((off, n, f))
    return out


def check_extents(exts, model, what):
    """Block status must be sound: ZERO extents read as zeros in the
    model, HOLE never without ZERO (there is no backing file)."""
    for off, n, f in exts:
        if f & nbd.STATE_HOLE and not f & nbd.STATE_ZERO:
            raise Failure("%s: extent %d+%d is HOLE without ZERO" % (what, off, n))
        if f & nbd.STATE_ZERO and not is_zero(model[off:off + n]):
            i = next(j for j in range(n) if model[off + j])
            raise Failure("%s: extent %d+%d is reported ZERO (flags %d) but "
                          "the byte at %d is %#04x" %
                          (what, off, n, f, off + i, model[off + i]))


def flags_at(exts, off):
    for o, n, f in exts:
        if o <= off < o + n:
            return f
    raise Failure("no extent covers %d" % off)


def zero_clusters(exts, c, nclusters):
    """Which clusters lie wholly in extents reported ZERO."""
    out = bytearray(nclusters)
    runs = merge([(o, n, f & nbd.STATE_ZERO) for o, n, f in exts])
    for o, n, f in runs:
        if f:
            for gc in whole_clusters(o, n, c):
                out[gc] = 1
    return out


def flag_names(flags):
    names = [n for bit, n in ((nbd.CMD_FLAG_NO_HOLE, "NO_HOLE"),
                              (nbd.CMD_FLAG_FAST_ZERO, "FAST_ZERO"),
                              (nbd.CMD_FLAG_FUA, "FUA")) if flags & bit]
    return "|".join(names) or "0"


def zero_req(h, n, off, flags):
    """Write-zeroes; returns None on success, the errno on failure."""
    try:
        h.zero(n, off, flags)
        return None
    except nbd.Error as e:
        return e.errnum


def whole_clusters(off, n, c):
    """The whole clusters inside [off, off+n), as a cluster index range."""
    return range(-(-off // c), (off + n) // c)


# ---------------------------------------------------------------------------
# trim

def cmd_trim(args):
    rng = random.Random(args.seed)
    c = args.cluster
    h = connect(args.sock)
    size = h.get_size()
    model = bytearray(size)
    n = 32 * MiB
    data = rng.randbytes(n)
    pwrite(h, data, 0)
    model[0:n] = data
    h.flush()
    before = blocks(args.image)
    if before < n:
        raise Failure("after writing %d bytes the file holds only %d" % (n, before))

    # 16 MiB of whole clusters, then an unaligned range: only its whole
    # clusters go; the partial clusters at its edges keep their data.
    h.trim(16 * MiB, 8 * MiB)
    uoff, un = 24 * MiB + c // 2 + 3, 2 * c + c // 3
    h.trim(un, uoff)
    h.flush()
    # The flush returns once the trims are durable; the holes are punched
    # by the server's background thread right after.
    if args.discard:
        c_low = 16 * MiB - c if c >= 4096 else 12 * MiB
        after = blocks_after_punching(args.image, lambda b: before - b >= c_low)
    else:
        time.sleep(1)
        after = blocks(args.image)
    freed = before - after
    if args.discard:
        model[8 * MiB:24 * MiB] = bytes(16 * MiB)
        cl = whole_clusters(uoff, un, c)
        model[cl.start * c:cl.stop * c] = bytes(len(cl) * c)
        want = 16 * MiB + len(cl) * c
        # Clusters smaller than a file system block free whole blocks
        # only where free clusters fill them: most of the range.
        low = want - c if c >= 4096 else want * 3 // 4
        if not low <= freed <= want + MiB // 2:
            raise Failure("trimming %d bytes freed %d bytes of the file "
                          "(st_blocks %d -> %d)" % (want, freed, before, after))
    elif freed != 0:
        raise Failure("with discard=false trim changed st_blocks: %d -> %d" %
                      (before, after))
    check_disk(h, model, "after trim")
    h.shutdown()
    save(model, args.out)
    print("%s trim: st_blocks %d -> %d MiB (%d KiB freed)" %
          (PROG, before // MiB, after // MiB, freed // 1024))


# ---------------------------------------------------------------------------
# zero

NO_HOLE, FAST, FUA = nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_FUA


def cmd_zero(args):
    rng = random.Random(args.seed)
    c, v3 = args.cluster, args.version >= 3
    h = connect(args.sock, meta=True)
    if not (h.can_zero() and h.can_fast_zero() and h.can_fua()):
        raise Failure("the server does not offer zero, fast zero and FUA")
    size = h.get_size()
    slot = max(8 * c, 256 * 1024)
    nslots = size // slot
    # Data in the first half of the slots, the rest unallocated.
    data_slots = nslots // 2
    model = bytearray(size)
    data = rng.randbytes(data_slots * slot)
    pwrite(h, data, 0)
    model[:len(data)] = data
    h.flush()

    cases = []
    for over_data in (True, False):
        for aligned in (True, False):
            for flags in range(8):
                f = ((NO_HOLE if flags & 1 else 0) | (FAST if flags & 2 else 0) |
                     (FUA if flags & 4 else 0))
                cases.append((over_data, aligned, f))
    data_cases = [x for x in cases if x[0]]
    hole_cases = [x for x in cases if not x[0]]
    if len(data_cases) > data_slots or len(hole_cases) > nslots - data_slots:
        raise Failure("disk too small for %d cases" % len(cases))

    expect_zero = []        # [start, end) QEMU must call zero
    plan = []
    for i, case in enumerate(data_cases):
        plan.append((i, case))
    for i, case in enumerate(hole_cases):
        plan.append((data_slots + i, case))
    rng.shuffle(plan)
    results = []
    for s, (over_data, aligned, f) in plan:
        base = s * slot
        k = rng.randint(1, 4)
        if aligned:
            off, n = base + c * rng.randint(1, 2), k * c
        else:
            off = base + c + rng.randint(1, c - 1)
            n = k * c + rng.randint(1, c - 1)
        what = "zero %d+%d %s (v%d, %s, %s)" % (
            off, n, flag_names(f), args.version,
            "over data" if over_data else "unallocated",
            "aligned" if aligned else "unaligned")
        before = bytes(model[base:base + slot])
        err = zero_req(h, n, off, f)
        # What must happen: a FAST_ZERO may fail (with ENOTSUP and no
        # change), where zeroing would mean writing.
        must_fail = (f & FAST and f & NO_HOLE and not v3 and over_data)
        may_fail = must_fail or (f & FAST and over_data and not aligned)
        if err is not None:
            if not may_fail:
                raise Failure("%s failed with errno %d" % (what, err))
            if err != errno.ENOTSUP:
                raise Failure("%s failed with errno %d, not ENOTSUP" % (what, err))
            expect_same(pread(h, slot, base), before, base,
                        "%s failed but changed the data" % what)
            results.append("%s: ENOTSUP" % what)
            continue
        if must_fail:
            raise Failure("%s succeeded: it must fail with ENOTSUP (v2 has no "
                          "zero flag, so it would have to write)" % what)
        model[off:off + n] = bytes(n)
        expect_same(pread(h, slot, base), model[base:base + slot], base, what)
        cl = whole_clusters(off, n, c)
        metadata_only = v3 or not f & NO_HOLE or not over_data
        exts = extents(h, size)
        for gc in cl:
            fl = flags_at(exts, gc * c)
            if metadata_only and not fl & nbd.STATE_ZERO:
                raise Failure("%s: block status of cluster %d is %d, not ZERO" %
                              (what, gc, fl))
            # Zeroed with NO_HOLE on v3: the zero flag, cluster kept.
            if v3 and over_data and f & NO_HOLE and fl & nbd.STATE_HOLE:
                raise Failure("%s: block status of cluster %d is HOLE: the "
                              "host cluster should have been kept" % (what, gc))
        if metadata_only and len(cl):
            expect_zero.append([cl.start * c, cl.stop * c, what])
        results.append("%s: ok" % what)
    exts = extents(h, size)
    check_extents(exts, model, "after the zero requests")
    check_disk(h, model, "after the zero requests")
    h.flush()
    h.shutdown()
    save(model, args.out)
    with open(args.expect, "w") as f:
        json.dump({"model": os.path.abspath(args.out), "zero": expect_zero}, f)
    fails = sum(1 for r in results if r.endswith("ENOTSUP"))
    print("%s zero: %d requests, %d failed with ENOTSUP as allowed" %
          (PROG, len(results), fails))


def cmd_checkmap(args):
    with open(args.expect) as f:
        exp = json.load(f)
    with open(exp["model"], "rb") as f:
        model = f.read()
    out = subprocess.run(["qemu-img", "map", "-f", "qcow2", "--output=json",
                          args.image], check=True, capture_output=True).stdout
    runs = json.loads(out)
    pos = 0
    for r in runs:
        if r["start"] != pos:
            raise Failure("qemu-img map: gap or overlap at %d" % pos)
        pos += r["length"]
        if r["zero"] and not is_zero(model[r["start"]:pos]):
            raise Failure("qemu-img map calls %d+%d zero but it holds data" %
                          (r["start"], r["length"]))
    if pos != len(model):
        raise Failure("qemu-img map covers %d bytes of %d" % (pos, len(model)))
    for a, b, what in exp["zero"]:
        for r in runs:
            s, e = r["start"], r["start"] + r["length"]
            if s < b and a < e and not r["zero"]:
                raise Failure("qemu-img map: %d+%d (inside %s) is not a zero "
                              "cluster: %r" % (max(a, s), min(b, e) - max(a, s),
                                               what, r))
    print("%s checkmap: %d ranges zero as expected, %d map entries sound" %
          (PROG, len(exp["zero"]), len(runs)))


# ---------------------------------------------------------------------------
# status

def nbdinfo_map(sock):
    out = subprocess.run(["nbdinfo", "--map", "--json",
                          "nbd+unix:///?socket=" + sock],
                         check=True, capture_output=True).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def cmd_status(args):
    rng = random.Random(args.seed)
    c = args.cluster
    h = connect(args.sock, meta=True)
    size = h.get_size()
    model = bytearray(size)
    nclusters = size // c
    # Clusters made zero by metadata (whole-cluster trim, or zero that
    # may use the zero flag or unlink): block status must say ZERO.
    meta_zero = bytearray(nclusters)
    walks = 0
    counts = {}

    def pick():
        r = rng.random()
        if r < 0.3:
            n = c * rng.randint(1, 16)
            off = c * rng.randrange(nclusters - n // c + 1)
        else:
            n = rng.randint(1, 8 * c)
            off = rng.randrange(size - n + 1)
        return off, n

    for i in range(args.ops):
        kind = rng.choices(["write", "zwrite", "trim", "zero", "read"],
                           [40, 5, 20, 25, 10])[0]
        counts[kind] = counts.get(kind, 0) + 1
        off, n = pick()
        what = "op %d: %s %d+%d" % (i, kind, off, n)
        if kind in ("write", "zwrite"):
            data = rng.randbytes(n) if kind == "write" else bytes(n)
            h.pwrite(data, off)
            model[off:off + n] = data
            for gc in range(off // c, (off + n - 1) // c + 1):
                meta_zero[gc] = 0
        elif kind == "trim":
            h.trim(n, off)
            for gc in whole_clusters(off, n, c):
                model[gc * c:(gc + 1) * c] = bytes(c)
                meta_zero[gc] = 1
        elif kind == "zero":
            f = rng.choice([0, NO_HOLE, FAST, NO_HOLE | FAST, FUA])
            err = zero_req(h, n, off, f)
            if err is not None:
                if not f & FAST or err != errno.ENOTSUP:
                    raise Failure("%s %s failed with errno %d" %
                                  (what, flag_names(f), err))
                expect_same(h.pread(n, off), model[off:off + n], off,
                            "%s %s failed but changed the data" %
                            (what, flag_names(f)))
            else:
                model[off:off + n] = bytes(n)
                if not args.v2 or not f & NO_HOLE:
                    for gc in whole_clusters(off, n, c):
                        meta_zero[gc] = 1
                # (v2 with NO_HOLE writes zeros: data, or still a hole.)
        else:
            expect_same(h.pread(n, off), model[off:off + n], off, what)
        if rng.random() < 0.05:
            h.flush()
        if i % 50 == 49 or i == args.ops - 1:
            exts = extents(h, size)
            walks += 1
            check_extents(exts, model, "block status after " + what)
            zc = zero_clusters(exts, c, nclusters)
            for gc in range(nclusters):
                if meta_zero[gc] and not zc[gc]:
                    raise Failure("after %s: cluster %d was made zero by "
                                  "metadata but block status says %d" %
                                  (what, gc, flags_at(exts, gc * c)))
    h.flush()
    check_disk(h, model, "after the workload")
    exts = extents(h, size)
    mine = merge(exts)
    theirs = merge(nbdinfo_map(args.sock))
    if mine != theirs:
        raise Failure("nbdinfo --map disagrees with block status:\n  mine   %r\n"
                      "  nbdinfo %r" % (mine[:8], theirs[:8]))
    zero_bytes = sum(n for _, n, f in exts if f & nbd.STATE_ZERO)
    h.shutdown()
    save(model, args.out)
    print("%s status: %d ops (%s), %d block status walks; at the end %d "
          "extents, %d KiB reported zero" %
          (PROG, args.ops, ", ".join("%s %d" % kv for kv in sorted(counts.items())),
           walks, len(mine), zero_bytes // 1024))


# ---------------------------------------------------------------------------
# reuse

def cmd_reuse(args):
    rng = random.Random(args.seed)
    n = args.mib * MiB
    h = connect(args.sock)
    size = h.get_size()
    if size < 3 * n:
        raise Failure("the disk must hold 3 * %d MiB" % args.mib)
    model = bytearray(size)
    pwrite(h, rng.randbytes(n), 0)
    h.flush()
    first = os.path.getsize(args.image)
    h.trim(n, 0)
    h.flush()
    data = rng.randbytes(n)
    pwrite(h, data, 2 * n)
    model[2 * n:3 * n] = data
    h.flush()
    final = os.path.getsize(args.image)
    limit = 1.1 * n + MiB
    if final >= limit:
        raise Failure("writing %d MiB again after trimming the first %d MiB "
                      "grew the file to %d bytes (after the first: %d; limit %d)"
                      % (args.mib, args.mib, final, first, limit))
    check_disk(h, model, "after reuse")
    h.shutdown()
    save(model, args.out)
    print("%s reuse: file %d bytes after %d MiB, %d bytes after trimming and "
          "writing %d MiB elsewhere" % (PROG, first, args.mib, final, args.mib))


# ---------------------------------------------------------------------------
# used: count clusters in use from the refcount table, independently.

def used_clusters(path):
    with open(path, "rb") as f:
        hdr = f.read(104)
        magic, version = struct.unpack(">4sI", hdr[:8])
        if magic != b"QFI\xfb":
            raise Failure("%s: not a qcow2 image" % path)
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        rt_off, rt_clusters = struct.unpack(">QI", hdr[48:60])
        order = struct.unpack(">I", hdr[96:100])[0] if version >= 3 else 4
        cs = 1 << cluster_bits
        bits = 1 << order
        f.seek(rt_off)
        rt = f.read(rt_clusters * cs)
        used = 0
        for i in range(0, len(rt), 8):
            blk = struct.unpack(">Q", rt[i:i + 8])[0] & 0xfffffffffffffe00
            if not blk:
                continue
            f.seek(blk)
            b = f.read(cs)
            if bits >= 8:
                w = bits // 8
                z = bytes(w)
                used += sum(1 for j in range(0, cs, w) if b[j:j + w] != z)
            else:
                mask = (1 << bits) - 1
                for byte in b:
                    if byte:
                        used += sum(1 for s in range(0, 8, bits) if (byte >> s) & mask)
    return cs, used, -(-os.path.getsize(path) // cs)


def cmd_used(args):
    cs, used, file_clusters = used_clusters(args.image)
    print(cs, used, file_clusters)


# ---------------------------------------------------------------------------
# online compaction

def fragment(h, rng, c, nbytes, chunk):
    """Write NBYTES from offset 0 in CHUNK-sized pieces in random order,
    so that the host clusters are shuffled.  Returns the data."""
    data = bytearray(rng.randbytes(nbytes))
    order = list(range(nbytes // chunk))
    rng.shuffle(order)
    for k in order:
        h.pwrite(data[k * chunk:(k + 1) * chunk], k * chunk)
    return data


def cmd_online(args):
    rng = random.Random(args.seed)
    c = args.cluster
    h = connect(args.sock)
    size = h.get_size()
    model = bytearray(size)
    n = size // 2
    chunk = max(c, 64 * 1024)
    model[:n] = fragment(h, rng, c, n, chunk)
    h.flush()
    full = os.path.getsize(args.image)
    # Trim three chunks in four (whole clusters).
    trimmed = 0
    for k in range(n // chunk):
        if rng.random() < 0.75:
            h.trim(chunk, k * chunk)
            model[k * chunk:(k + 1) * chunk] = bytes(chunk)
            trimmed += chunk
    h.flush()
    goal = full - trimmed // 2
    deadline = time.monotonic() + args.wait
    sizes = [os.path.getsize(args.image)]
    while time.monotonic() < deadline and sizes[-1] > goal:
        # Keep reading (and checking) while the server compacts.
        off = rng.randrange(0, n, 4096)
        cnt = min(rng.randint(1, 4 * chunk), size - off)
        expect_same(h.pread(cnt, off), model[off:off + cnt], off,
                    "read during compaction")
        time.sleep(0.02)
        s = os.path.getsize(args.image)
        if s != sizes[-1]:
            sizes.append(s)
    if sizes[-1] > goal:
        raise Failure("the file is still %d bytes %.0f s after trimming %d of "
                      "%d bytes (sizes seen: %s)" %
                      (sizes[-1], args.wait, trimmed, full, sizes))
    check_disk(h, model, "after background compaction")
    h.flush()
    h.shutdown()
    save(model, args.out)
    print("%s online: %d bytes written, %d trimmed: file %d -> %s bytes" %
          (PROG, n, trimmed, full, " -> ".join(map(str, sizes[1:]))))


# ---------------------------------------------------------------------------
# crash during compaction

def cmd_crash(args):
    rng = random.Random(args.seed)
    c = args.cluster
    h = connect(args.sock)
    size = h.get_size()
    model = bytearray(size)
    n = size * 3 // 4
    chunk = max(c, 64 * 1024)
    nchunks = n // chunk
    model[:n] = fragment(h, rng, c, n, chunk)
    h.flush()
    for k in range(nchunks):
        if rng.random() < 0.5:
            h.trim(chunk, k * chunk)
            model[k * chunk:(k + 1) * chunk] = bytes(chunk)
    h.flush()
    # Compaction starts now (within a second); the flush made the trims
    # durable and punched their holes.
    st0 = os.stat(args.image)
    durable = bytes(model)
    since = []              # commands issued after the last flush
    t0 = time.monotonic()
    ops = flushes = 0
    try:
        if args.quiet:
            # No I/O: wait until compaction shows (it copies clusters into
            # the punched holes, or has truncated the file already), then
            # kill it at a random moment of its run.
            seen = "not seen"
            while time.monotonic() - t0 < 3:
                st = os.stat(args.image)
                if st.st_size < st0.st_size:
                    seen = "already finished"
                    break
                if st.st_blocks > st0.st_blocks:
                    seen = "copying"
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0, args.kill_after))
        else:
            # Meanwhile whole-chunk writes and trims (so every sector is
            # wholly old or new), checked reads, and now and then a flush.
            seen = "busy"
            while time.monotonic() - t0 < args.kill_after:
                off = rng.randrange(size // chunk) * chunk
                r = rng.random()
                if r < 0.35:
                    data = rng.randbytes(chunk)
                    h.pwrite(data, off)
                    model[off:off + chunk] = data
                    since.append(("write", off, chunk, data.hex()))
                elif r < 0.45:
                    h.trim(chunk, off)
                    since.append(("trim", off, chunk, None))
                    model[off:off + chunk] = bytes(chunk)
                elif r < 0.97:
                    expect_same(h.pread(chunk, off), model[off:off + chunk], off,
                                "read during compaction")
                else:
                    h.flush()
                    durable = bytes(model)
                    since = []
                    flushes += 1
                ops += 1
        st1 = os.stat(args.image)
        os.kill(args.pid, signal.SIGKILL)
    except BaseException:
        os.kill(args.pid, signal.SIGKILL)
        raise
    with open(args.state + ".durable", "wb") as f:
        f.write(durable)
    with open(args.state, "w") as f:
        json.dump({"seed": args.seed, "size": size, "since": since}, f)
    print("%s crash: seed %s: killed %.2f s after the flush (compaction: %s; "
          "file %d -> %d bytes, %d -> %d blocks); %d commands since "
          "(%d flushes), %d not covered by a flush" %
          (PROG, args.seed, time.monotonic() - t0, seen, st0.st_size,
           st1.st_size, st0.st_blocks, st1.st_blocks, ops, flushes, len(since)))


def cmd_verify(args):
    with open(args.state) as f:
        st = json.load(f)
    with open(args.state + ".durable", "rb") as f:
        durable = f.read()
    with open(args.raw, "rb") as f:
        disk = f.read()
    if len(disk) != st["size"]:
        raise Failure("%s: %d bytes, expected %d" % (args.raw, len(disk), st["size"]))
    # Each byte: its durable value, or what a later command left there.
    cands = {}              # sector -> list of alternative sector contents
    for kind, off, n, data in st["since"]:
        buf = bytes.fromhex(data) if kind == "write" else bytes(n)
        for s in range(off // 512, (off + n) // 512):
            cands.setdefault(s, []).append(buf[s * 512 - off:(s + 1) * 512 - off])
    if disk == durable:
        print("%s verify: %s equals the model at the last flush" % (PROG, args.raw))
        return
    changed = 0
    for s in range(len(disk) // 512):
        a, b = s * 512, (s + 1) * 512
        if disk[a:b] == durable[a:b]:
            continue
        if disk[a:b] in cands.get(s, []):
            changed += 1
            continue
        i = first_difference(disk[a:b], durable[a:b])
        raise Failure("%s: sector at %d differs from the model at the last "
                      "completed flush (byte %d: %#04x, expected %#04x) and "
                      "from everything written after it" %
                      (args.raw, a, a + i, disk[a + i], durable[a + i]))
    print("%s verify: %s holds the model at the last flush, %d sectors "
          "changed by later commands" % (PROG, args.raw, changed))


# ---------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(prog=PROG)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name, *pos, seed=True, cluster=True, out=True):
        p = sub.add_parser(name)
        for a in pos:
            p.add_argument(a)
        if seed:
            p.add_argument("--seed", default="0")
        if cluster:
            p.add_argument("--cluster", type=int, default=65536)
        if out:
            p.add_argument("--out", required=True)
        return p

    p = add("trim", "sock", "image")
    p.add_argument("--no-discard", dest="discard", action="store_false")
    p = add("zero", "sock")
    p.add_argument("--version", type=int, default=3)
    p.add_argument("--expect", required=True)
    add("checkmap", "image", "expect", seed=False, cluster=False, out=False)
    p = add("status", "sock")
    p.add_argument("--ops", type=int, default=400)
    p.add_argument("--v2", action="store_true")
    p = add("reuse", "sock", "image", cluster=False)
    p.add_argument("--mib", type=int, default=64)
    add("used", "image", seed=False, cluster=False, out=False)
    p = add("online", "sock", "image")
    p.add_argument("--wait", type=float, default=5)
    p = add("crash", "sock", "pid", "state", out=False)
    p.add_argument("--kill-after", type=float, required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--quiet", action="store_true")
    add("verify", "state", "raw", seed=False, cluster=False, out=False)
    args = ap.parse_args()
    if hasattr(args, "pid"):
        args.pid = int(args.pid)
    try:
        globals()["cmd_" + args.cmd](args)
    except (Failure, nbd.Error) as e:
        print("%s %s: FAIL%s: %s" % (PROG, args.cmd,
                                     " (seed %s)" % args.seed if hasattr(args, "seed") else "",
                                     e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

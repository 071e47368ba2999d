#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# compact-load.py - background compaction while clients keep the image
# busy: the client side of tests/test-compact-load.sh and of the
# "compact-load" part of bench/run-space (not a test by itself).
#
#   compact-load.py SOCK IMG --seed N [--fill 512M] [--trim 400M]
#                   [--seconds 15] [--conns 2] [--flush-every 100]
#                   [--out MODEL] [--json RESULT] [--log SERVER_LOG]
#
# The scenario of issue 15, on a new image served with
# compact-after-unmaps= (and compact-rate=):
#  1. write --fill bytes from offset 0, 4 MiB at a time, and flush;
#  2. trim the first --trim bytes and flush (compaction starts);
#  3. --conns connections, each in its own process, for --seconds: 4 KiB
#     reads and writes (half each) at random 4 KiB blocks of the live
#     range [trim, fill), one at a time, and a flush after every
#     --flush-every of them.  Connection i writes and reads only the
#     blocks b with b % conns == i, so its reads are checked against an
#     exact model (the connections still share every cluster and table);
#  4. the size of the file when the load stops, then the whole disk is
#     read back and checked (trimmed: zeros; live: the model).
# --out writes the model (a sparse raw file) for qemu-img compare.
# --json writes what happened: the file size at the end and every half
# second, and the latency of reads, writes and flushes (count, p50, p99,
# max in ms), overall and, given the server's debug log (--log, nbdkit -v
# -D qcow.verbose=1), split into requests that overlapped a background
# compaction ("during") and the rest ("outside"); the compaction runs
# (start, end on the monotonic clock the server prints) and its own
# report (the longest exclusive holds); with --raw-latency every request's
# latency too (bench/loadtable.py pools them over runs).
#
#
# Crash mode: --kill PID --kill-after S --state STATE kills the server
# (kill -9) S seconds into the load and saves in STATE what each block
# must hold: its contents as of the last flush its connection completed,
# or what a write issued after that flush left there.  Then
#
#   compact-load.py verify STATE RAW
#
# checks RAW (the disk read back after the crash), sector by sector.
# --hot SIZE sends half of the writes into the first SIZE bytes of the
# live range (moves called off again and again: held moves).
#
# Exit status 0, or 1 on a mismatch or error (the seed is printed).

import argparse
import json
import os
import random
import re
import signal
import struct
import sys
import time

import nbd

PROG = "compact-load"
MiB = 1 << 20
BLOCK = 4096


class Failure(Exception):
    pass


def size_arg(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def block_data(seed, conn, n, block):
    """Contents of write number N of connection CONN to BLOCK: cheap to
    make, different everywhere."""
    head = struct.pack("<QQQ", block, conn, n)
    rnd = random.Random("%s:%d:%d" % (seed, conn, n)).randbytes(64)
    return (head + rnd) * (BLOCK // (len(head) + len(rnd))) + \
        bytes(BLOCK % (len(head) + len(rnd)))


def worker(a, conn, stop_at, live_lo, nblocks, init, wfd):
    """Child process: the load of connection CONN; writes its latencies
    (and any failure) as JSON to WFD."""
    out = {"read": [], "write": [], "flush": [], "error": None}
    model = {}                  # block -> bytes, where written by the load
    durable = {}                # the same as of the last completed flush
    since = []                  # (block, bytes) written after that flush
    try:
        rng = random.Random("%s:load:%d" % (a.seed, conn))
        h = nbd.NBD()
        h.set_handle_name("load%d" % conn)
        h.connect_unix(a.sock)
        mine = list(range(conn, nblocks, a.conns))
        hot = [b for b in mine if b * BLOCK < a.hot]
        n = 0
        while time.monotonic() < stop_at:
            b = rng.choice(hot if hot and rng.random() < 0.5 else mine)
            off = live_lo + b * BLOCK
            if rng.random() < 0.5:
                t0 = time.monotonic()
                got = h.pread(BLOCK, off)
                t1 = time.monotonic()
                want = model.get(b)
                if want is None:
                    want = init[b * BLOCK:(b + 1) * BLOCK]
                if got != want:
                    raise Failure("connection %d: read at %d differs from the "
                                  "model" % (conn, off))
                out["read"].append((t0, t1 - t0))
            else:
                data = block_data(a.seed, conn, n, b)
                since.append((b, data))
                t0 = time.monotonic()
                h.pwrite(data, off)
                t1 = time.monotonic()
                model[b] = data
                out["write"].append((t0, t1 - t0))
            n += 1
            if n % a.flush_every == 0:
                t0 = time.monotonic()
                h.flush()
                out["flush"].append((t0, time.monotonic() - t0))
                for b, data in since:
                    durable[b] = data
                since = []
        h.flush()
        h.shutdown()
    except (Failure, nbd.Error) as e:
        out["error"] = str(e)
    out["model"] = {b: d.hex() for b, d in model.items()}
    if a.kill:
        out["durable"] = {b: d.hex() for b, d in durable.items()}
        out["since"] = [(b, d.hex()) for b, d in since]
    with os.fdopen(wfd, "w") as f:
        json.dump(out, f)


def windows(log):
    """The background compactions in a server log: [(start, end), ...]
    on the monotonic clock, and their reports."""
    runs, reports, start = [], [], None
    for line in log.splitlines():
        m = re.search(r"background compaction: started.*\(monotonic ([\d.]+)\)", line)
        if m:
            start = float(m.group(1))
            continue
        m = re.search(r"background compaction: (done|failed).*\(monotonic ([\d.]+)\)", line)
        if m and start is not None:
            runs.append((start, float(m.group(2))))
            start = None
            continue
        m = re.search(r"background compaction: ([\d.]+) s, (.*)", line)
        if m:
            reports.append(m.group(0)[len("background compaction: "):])
    if start is not None:
        runs.append((start, float("inf")))      # still running
    return runs, reports


def summary(lat):
    ms = sorted(d * 1000 for d in lat)
    if not ms:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {"count": len(ms), "p50": round(ms[len(ms) // 2], 3),
            "p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
            "max": round(ms[-1], 3)}


def initial(seed, fill, trim):
    """The data the fill wrote: the trimmed part's buffer, the live part."""
    rng = random.Random("%s:fill" % seed)
    junk = rng.randbytes(4 * MiB)
    return junk, rng.randbytes(fill - trim)


def verify(state_path, raw_path):
    with open(state_path) as f:
        st = json.load(f)
    _, init = initial(st["seed"], st["fill"], st["trim"])
    with open(raw_path, "rb") as f:
        disk = f.read()
    if len(disk) != st["size"]:
        raise Failure("%s: %d bytes, expected %d" % (raw_path, len(disk), st["size"]))
    lo, hi = st["trim"], st["fill"]
    if disk[:lo] != bytes(lo) or disk[hi:] != bytes(len(disk) - hi):
        raise Failure("%s: the trimmed part or the part never written is not "
                      "all zeros" % raw_path)
    cands = {}                  # block -> contents it may hold
    for conn in st["conns"]:
        for b, d in conn["durable"].items():
            cands[int(b)] = [bytes.fromhex(d)]
    for conn in st["conns"]:
        for b, d in conn["since"]:
            cands.setdefault(b, [init[b * BLOCK:(b + 1) * BLOCK]]).append(bytes.fromhex(d))
    changed = 0
    for b in range((hi - lo) // BLOCK):
        got = disk[lo + b * BLOCK:lo + (b + 1) * BLOCK]
        ok = cands.get(b, [init[b * BLOCK:(b + 1) * BLOCK]])
        if got == ok[0]:
            continue
        for s in range(0, BLOCK, 512):
            if not any(got[s:s + 512] == c[s:s + 512] for c in ok):
                raise Failure("%s: the sector at %d holds neither what was there at "
                              "the last flush of its connection nor what a later "
                              "write left there" % (raw_path, lo + b * BLOCK + s))
        changed += 1
    print("%s verify: %s holds every flushed write; %d blocks changed by "
          "writes after the last flush" % (PROG, raw_path, changed))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "verify":
        try:
            verify(sys.argv[2], sys.argv[3])
        except Failure as e:
            print("%s verify: FAIL: %s" % (PROG, e), file=sys.stderr)
            sys.exit(1)
        return
    ap = argparse.ArgumentParser(prog=PROG)
    ap.add_argument("sock")
    ap.add_argument("image")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--fill", type=size_arg, default=512 * MiB)
    ap.add_argument("--trim", type=size_arg, default=400 * MiB)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--conns", type=int, default=2)
    ap.add_argument("--flush-every", type=int, default=100)
    ap.add_argument("--out")
    ap.add_argument("--json")
    ap.add_argument("--log")
    ap.add_argument("--hot", type=size_arg, default=0)
    ap.add_argument("--raw-latency", action="store_true")
    ap.add_argument("--kill", type=int)
    ap.add_argument("--kill-after", type=float, default=1)
    ap.add_argument("--state")
    a = ap.parse_args()
    if a.kill and not a.state:
        ap.error("--kill needs --state")
    try:
        run(a)
    except (Failure, nbd.Error) as e:
        print("%s: FAIL (seed %s): %s" % (PROG, a.seed, e), file=sys.stderr)
        sys.exit(1)


def run(a):
    if a.trim % MiB or a.fill % (4 * MiB) or not 0 < a.trim < a.fill:
        raise Failure("--fill must be a multiple of 4M and --trim of 1M below it")
    h = nbd.NBD()
    h.connect_unix(a.sock)
    size = h.get_size()
    if size < a.fill:
        raise Failure("the disk (%d bytes) is smaller than --fill" % size)
    live_lo, nblocks = a.trim, (a.fill - a.trim) // BLOCK
    # The trimmed part gets one buffer over and over; the live part its
    # own data (the model).
    junk, init = initial(a.seed, a.fill, a.trim)
    t0 = time.monotonic()
    for off in range(0, a.fill, 4 * MiB):
        if off + 4 * MiB <= live_lo:
            h.pwrite(junk, off)
        else:
            buf = bytearray(4 * MiB)
            lo = max(off, live_lo)
            if lo > off:
                buf[:lo - off] = junk[:lo - off]
            buf[lo - off:] = init[lo - live_lo:off + 4 * MiB - live_lo]
            h.pwrite(bytes(buf), off)
    h.flush()
    t1 = time.monotonic()
    full = os.path.getsize(a.image)
    h.trim(a.trim, 0)
    h.flush()
    t2 = time.monotonic()

    stop_at = time.monotonic() + a.seconds
    kids = []
    for i in range(a.conns):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                worker(a, i, stop_at, live_lo, nblocks, init, w)
            finally:
                os._exit(0)
        os.close(w)
        kids.append((pid, r))
    sizes = []
    kill_at = time.monotonic() + a.kill_after if a.kill else None
    while time.monotonic() < stop_at:
        sizes.append((round(time.monotonic() - t2, 2), os.path.getsize(a.image)))
        if kill_at is not None:
            time.sleep(max(0, min(0.5, kill_at - time.monotonic())))
            if time.monotonic() >= kill_at:
                os.kill(a.kill, signal.SIGKILL)
                break
        else:
            time.sleep(0.5)
    results = []
    for pid, r in kids:
        with os.fdopen(r) as f:
            text = f.read()
        os.waitpid(pid, 0)
        if not text:
            raise Failure("a load process died")
        results.append(json.loads(text))
    end_size = os.path.getsize(a.image)
    if a.kill:
        with open(a.state, "w") as f:
            json.dump({"seed": a.seed, "size": size, "fill": a.fill, "trim": a.trim,
                       "conns": [{"durable": r["durable"], "since": r["since"]}
                                 for r in results]}, f)
        print("%s: killed the server %.2f s into the load (file %d MiB); "
              "%d requests, %d flushes" %
              (PROG, a.kill_after, end_size // MiB,
               sum(len(r["read"]) + len(r["write"]) for r in results),
               sum(len(r["flush"]) for r in results)))
        return
    for i, res in enumerate(results):
        if res["error"]:
            raise Failure(res["error"])

    # The model, and the whole disk read back.
    model = bytearray(init)
    for i, res in enumerate(results):
        for b, d in res["model"].items():
            b = int(b)
            model[b * BLOCK:(b + 1) * BLOCK] = bytes.fromhex(d)
    for off in range(0, size, 4 * MiB):
        n = min(4 * MiB, size - off)
        got = h.pread(n, off)
        if off + n <= live_lo or off >= a.fill:
            want = bytes(n)
        else:
            want = bytearray(n)
            lo, hi = max(off, live_lo), min(off + n, a.fill)
            want[lo - off:hi - off] = model[lo - live_lo:hi - live_lo]
            want = bytes(want)
        if got != want:
            i = next(j for j in range(n) if got[j] != want[j])
            raise Failure("after the load, the byte at %d is %#04x, expected %#04x"
                          % (off + i, got[i], want[i]))
    h.shutdown()
    if a.out:
        with open(a.out, "wb") as f:
            f.truncate(size)
            f.seek(live_lo)
            f.write(model)

    runs, reports = [], []
    if a.log:
        with open(a.log, errors="replace") as f:
            runs, reports = windows(f.read())

    def during(t, d):
        return any(t < e and t + d > s for s, e in runs)

    lat, raw = {}, {}
    for kind in ("read", "write", "flush"):
        allops = [x for res in results for x in res[kind]]
        lat[kind] = {"all": summary([d for _, d in allops]),
                     "during": summary([d for t, d in allops if during(t, d)]),
                     "outside": summary([d for t, d in allops if not during(t, d)])}
        raw[kind] = {"all": [round(d * 1000, 4) for _, d in allops],
                     "during": [round(d * 1000, 4) for t, d in allops if during(t, d)]}
    out = {"seed": a.seed, "fill_seconds": round(t1 - t0, 3),
           "trim_seconds": round(t2 - t1, 3), "size_full": full,
           "size_end": end_size, "sizes": sizes,
           "compactions": [(round(s - t2, 3), round(e - t2, 3)) for s, e in runs],
           "reports": reports, "latency": lat}
    if a.raw_latency:
        out["raw"] = raw
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)
    print("%s: file %d MiB after writing, %d MiB when the load stopped; "
          "%d compactions %s; writes %s" %
          (PROG, full // MiB, end_size // MiB, len(runs), out["compactions"],
           lat["write"]["all"]))


if __name__ == "__main__":
    main()

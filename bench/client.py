#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""NBD clients for bench/run-space (libnbd).

  client.py zero URI [--no-hole] [--request SIZE]
      Write-zeroes over the whole disk, one request of SIZE (default 64M)
      at a time, then flush.  Prints the seconds that took (connecting not
      included).  --no-hole sets NBD_CMD_FLAG_NO_HOLE.

  client.py open [--offset N] -- SERVER-COMMAND...
      Start the server command with systemd socket activation (libnbd
      runs it on a socket of its own), connect, read 4 KiB at N (default
      0), disconnect.  Prints the seconds from starting the server to the
      read's reply: the server's start-up, opening the image and a first
      read.

  client.py latency URI --pid PID --image IMG --trims FILE [options]
      Measures what background compaction does to a client's writes.
      Writes 4 KiB blocks at random offsets, one at a time (each waits for
      its reply), every --interval-ms, timing each one.  After --baseline
      seconds a second connection trims the "OFFSET LENGTH" ranges of
      FILE and flushes, which starts the server's compaction; the writes go
      on until compaction has been idle for --settle seconds (at most
      --timeout seconds).  While writing it samples /proc for the server's
      compaction thread (the only thread besides the main one before any
      client connects): the thread is busy when its state is R or D or its
      CPU time grew.  Then it reads back what it wrote (and some trimmed
      blocks) and checks it.  Prints JSON: write latency in ms (count, p50,
      p99, max) with no compaction ("idle": the baseline), while trimming
      ("trim"), and during compaction ("compaction": writes that overlap
      the busy span of the thread), the span's length, and the file size
      before and after.  Fails if no compaction was seen or the file did
      not shrink.  --trace FILE saves every write (start, end, offset) and
      every sample of the thread (time, state, CPU ticks), with the trim
      and flush times, as JSON (times in seconds from the first write).
"""

import argparse
import json
import os
import random
import select
import sys
import time

import nbd

BLOCK = 4096


def size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def zero(a):
    h = connect(a.uri)
    disk = h.get_size()
    flags = nbd.CMD_FLAG_NO_HOLE if a.no_hole else 0
    start = time.monotonic()
    for off in range(0, disk, a.request):
        h.zero(min(a.request, disk - off), off, flags)
    h.flush()
    print(f"{time.monotonic() - start:.3f}")
    h.shutdown()


# ---- latency ----------------------------------------------------------------

def open_read(a):
    h = nbd.NBD()
    t0 = time.monotonic()
    h.connect_systemd_socket_activation(a.command)
    h.pread(BLOCK, a.offset)
    elapsed = time.monotonic() - t0
    h.shutdown()
    print(f"{elapsed:.4f}")


def compaction_thread(pid):
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    if len(tids) != 1:
        sys.exit(f"client.py: expected one thread besides the main one in "
                 f"server {pid} (the compaction thread), found {tids}")
    return f"/proc/{pid}/task/{tids[0]}/stat"


def sample(stat_path):
    """(state, CPU ticks) of a thread."""
    with open(stat_path) as f:
        s = f.read()
    rest = s[s.rindex(")") + 2:].split()
    return rest[0], int(rest[11]) + int(rest[12])


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p / 100))]


def summary(lat):
    ms = [x * 1000 for x in lat]
    def r(x):
        return None if x is None else round(x, 3)
    return {"count": len(ms), "p50": r(percentile(ms, 50)),
            "p99": r(percentile(ms, 99)), "max": r(max(ms) if ms else None)}


def trimmer(uri, trims, ready_fd, report_fd):
    """Child: wait for the go, trim, flush, report the times, exit."""
    os.read(ready_fd, 1)
    h = connect(uri)
    t0 = time.monotonic()
    for off, length in trims:
        h.trim(length, off)
    t1 = time.monotonic()
    h.flush()
    t2 = time.monotonic()
    h.shutdown()
    os.write(report_fd, json.dumps([t0, t1, t2]).encode())
    os._exit(0)


def busy_span(samples, after, gap=0.5, min_samples=3):
    """The span from the first to the last busy stretch of the compaction
    thread at or after AFTER.  A stretch is busy samples less than GAP
    seconds apart; stretches of fewer than MIN_SAMPLES samples (the
    thread's once-a-second wake-up caught running) are ignored unless
    there is nothing else."""
    stretches = []
    prev_t, prev_ticks = None, None
    for t, state, ticks in samples:
        busy = state in "RD" or (prev_ticks is not None and ticks > prev_ticks)
        if busy and t >= after:
            # It became busy after the previous sample: start there, unless
            # that is long ago (the writer was stalled, by something else).
            start = prev_t if prev_t is not None and t - prev_t < 0.01 else t
            if stretches and start - stretches[-1][1] < gap:
                stretches[-1][1] = t
                stretches[-1][2] += 1
            else:
                stretches.append([start, t, 1])
        prev_t, prev_ticks = t, ticks
    real = [s for s in stretches if s[2] >= min_samples] or stretches
    if not real:
        return None
    return real[0][0], real[-1][1]


def latency(a):
    trims = []
    with open(a.trims) as f:
        for line in f:
            off, length = map(int, line.split())
            trims.append((off, length))
    stat_path = compaction_thread(a.pid)
    size_before = os.stat(a.image).st_size

    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(go_w)
        os.close(rep_r)
        try:
            trimmer(a.uri, trims, go_r, rep_w)
        finally:
            os._exit(1)
    os.close(go_r)
    os.close(rep_w)

    rng = random.Random(a.seed)
    h = connect(a.uri)
    blocks = h.get_size() // BLOCK
    writes = []          # (t0, t1, offset, n)
    samples = []         # (t, state, ticks)
    interval = a.interval_ms / 1000
    start = time.monotonic()
    trim_times = None
    started_trims = False
    last_busy = None
    n = 0
    next_t = start
    while True:
        now = time.monotonic()
        if not started_trims and now - start >= a.baseline:
            os.write(go_w, b"g")
            started_trims = True
        if started_trims and trim_times is None and select.select([rep_r], [], [], 0)[0]:
            trim_times = json.loads(os.read(rep_r, 4096))
        state, ticks = sample(stat_path)
        if samples and (state in "RD" or ticks > samples[-1][2]):
            last_busy = now
        samples.append((now, state, ticks))
        if trim_times is not None:
            quiet_since = max(trim_times[2], last_busy or 0)
            if last_busy is not None and now - quiet_since >= a.settle:
                break
        if now - start >= a.timeout:
            break
        off = rng.randrange(blocks) * BLOCK
        n += 1
        buf = n.to_bytes(8, "little") * (BLOCK // 8)
        t0 = time.monotonic()
        h.pwrite(buf, off)
        t1 = time.monotonic()
        writes.append((t0, t1, off, n))
        next_t += interval
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.monotonic()
    _, status = os.waitpid(child, 0)
    if status != 0:
        sys.exit("client.py: the trimming connection failed")
    if trim_times is None:
        trim_times = json.loads(os.read(rep_r, 4096))
    h.flush()
    size_after = os.stat(a.image).st_size

    t_trim, t_trimmed, t_flushed = trim_times
    span = busy_span(samples, t_trim)
    failures = verify(h, writes, trims, t_trim, t_flushed, rng)
    h.shutdown()

    def overlapping(lo, hi):
        return [w[1] - w[0] for w in writes if w[1] > lo and w[0] < hi]

    result = {
        "idle": summary([w[1] - w[0] for w in writes if w[1] < t_trim]),
        "trim": summary(overlapping(t_trim, t_flushed)),
        "compaction": summary(overlapping(*span)) if span else None,
        "trim_seconds": round(t_flushed - t_trim, 3),
        "compaction_seconds": round(span[1] - span[0], 3) if span else None,
        "compaction_after_flush": round(span[1] - t_flushed, 3) if span else None,
        "size_before": size_before,
        "size_after": size_after,
        "timed_out": time.monotonic() - start >= a.timeout,
    }
    print(json.dumps(result))
    if a.trace:
        t = writes[0][0] if writes else start
        with open(a.trace, "w") as f:
            json.dump({"trim": [x - t for x in trim_times],
                       "span": [x - t for x in span] if span else None,
                       "writes": [(w[0] - t, w[1] - t, w[2]) for w in writes],
                       "samples": [(x[0] - t, x[1], x[2]) for x in samples]}, f)
    if failures:
        sys.exit(f"client.py: {failures} blocks read back wrong")
    if span is None:
        sys.exit("client.py: the compaction thread never ran")
    if size_after >= size_before:
        sys.exit(f"client.py: the file did not shrink ({size_before} -> {size_after})")


def verify(h, writes, trims, t_trim, t_flushed, rng):
    """Read back: each block last written after the trims holds that
    write; trimmed blocks not written since before the trim read zeros."""
    last = {}
    for t0, t1, off, n in writes:
        last[off] = (t0, t1, n)
    bad = 0
    for off, (t0, t1, n) in last.items():
        if t0 > t_flushed and h.pread(BLOCK, off) != n.to_bytes(8, "little") * (BLOCK // 8):
            bad += 1
    zero = bytes(BLOCK)
    for off, length in rng.sample(trims, min(200, len(trims))):
        for b in range(off, off + length, BLOCK):
            w = last.get(b)
            if w is None or w[1] < t_trim:     # not written since the trim
                if h.pread(BLOCK, b) != zero:
                    bad += 1
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("zero")
    s.add_argument("uri")
    s.add_argument("--no-hole", action="store_true")
    s.add_argument("--request", type=size, default=64 << 20)
    s = sub.add_parser("open")
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("command", nargs="+")
    s = sub.add_parser("latency")
    s.add_argument("uri")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--trims", required=True)
    s.add_argument("--baseline", type=float, default=3)
    s.add_argument("--interval-ms", type=float, default=1)
    s.add_argument("--settle", type=float, default=2)
    s.add_argument("--timeout", type=float, default=120)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--trace")
    a = p.parse_args()
    {"zero": zero, "open": open_read, "latency": latency}[a.cmd](a)


if __name__ == "__main__":
    main()

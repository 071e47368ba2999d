#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# crash-client.py - the client side of tests/test-crash.sh (not a test by
# itself).
#
#   crash-client.py run SOCK PID STATE --seed N --kill-after SECONDS
#                   [--cluster BYTES] [--image FILE] [--until-dead]
#       Write seeded random data over 4 connections (several writes in
#       flight on each, some with FUA, some write-zeroes, flushes from time
#       to time), then kill -9 the server (PID) while commands are in
#       flight (with --until-dead: unless the server has died by itself
#       before, which the first failed command shows; tests/
#       powerloss-filter.c), wait until every connection has died, and
#       save in STATE
#       every write issued, in order, with whether it was acknowledged as
#       durable: completed with FUA, or completed before a flush was
#       issued that then completed.
#
#   crash-client.py verify STATE RAW...
#       Check that each RAW file (the disk contents after the crash) holds
#       what the writes in STATE allow: for every byte, the value of the
#       last durable write to it (or zero), or the value of one of the
#       writes to it issued after that one (which may or may not have
#       reached the disk, whole or in part).
#
# Writes touching the same bytes are never in flight together (see
# aiopool.py), so the writes to any byte happened in the order issued.

import argparse
import bisect
import functools
import json
import os
import random
import signal
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aiopool import Pool, Op, ExtentPicker, WRITE, ZERO, FLUSH, write_data  # noqa: E402

PROG = "crash-client"


class Failure(Exception):
    pass


# ---------------------------------------------------------------------------
# run

class Recorder:
    def __init__(self, multi_conn):
        self.multi_conn = multi_conn
        self.writes = []          # every write/zero Op, in issue order
        self.undurable = []       # completed, not yet known to be durable
        self.killed = False
        self.unexpected = None

    def done(self, op):
        if op.error is not None:
            if not self.killed and self.unexpected is None:
                self.unexpected = "%r failed before the kill: %s" % (op, op.error)
            return
        if op.kind in (WRITE, ZERO):
            op.durable = bool(op.flags & nbd.CMD_FLAG_FUA)
            if not op.durable:
                self.undurable.append(op)
        elif op.kind == FLUSH:
            keep = []
            for w in self.undurable:
                if w.done < op.issued and (self.multi_conn or w.conn == op.conn):
                    w.durable = True
                else:
                    keep.append(w)
            self.undurable = keep


def cmd_run(args):
    rng = random.Random(args.seed)
    rec = Recorder(multi_conn=True)
    pool = Pool(args.sock, args.conns, args.depth, rec.done)
    rec.multi_conn = pool.can_multi_conn
    picker = ExtentPicker(rng, pool.size, args.cluster)
    nconn = len(pool.handles)

    def write(off, n, flags, conn, kind=WRITE):
        op = Op(kind, off, n, flags)
        op.durable = False
        if kind == WRITE:
            op.data = write_data(args.seed, len(rec.writes), n)
        rec.writes.append(op)
        try:
            pool.submit(op, conn)
        except (RuntimeError, nbd.Error):
            rec.writes.pop()            # never issued
            raise

    start = time.monotonic()
    gone = False                        # a command could not be issued
    while time.monotonic() - start < args.kill_after:
        if rec.unexpected:
            break
        conn = rng.randrange(nconn)
        r = rng.random()
        fua = nbd.CMD_FLAG_FUA if rng.random() < 0.15 and pool.can_fua else 0
        try:
            if r < 0.05:
                for j, (off, n) in enumerate(picker.pieces()):
                    write(off, n, fua, (conn + j) % nconn)
            elif r < 0.88:
                write(*picker.extent(), fua, conn)
            elif r < 0.93:
                if pool.can_zero:
                    write(*picker.extent(), fua, conn, kind=ZERO)
            else:
                pool.submit(Op(FLUSH), conn)
        except (RuntimeError, nbd.Error):
            if not args.until_dead:
                raise
            gone = True
            break
    died = args.until_dead and (gone or rec.unexpected is not None)
    if rec.unexpected and not died:
        raise Failure(rec.unexpected)

    in_flight = pool.in_flight()
    size = os.path.getsize(args.image) if args.image else -1
    rec.killed = True
    try:
        os.kill(args.pid, signal.SIGKILL)
    except ProcessLookupError:
        if not died:
            raise
    # Every connection must now die (the kernel closes the sockets when
    # the process is gone); replies already sent may still complete.
    deadline = time.monotonic() + 60
    while pool.in_flight():
        if time.monotonic() > deadline:
            raise Failure("commands still in flight 60 s after kill -9")
        pool.pump(1)

    durable = sum(1 for w in rec.writes if w.durable)
    print("%s: seed %s: %s after %.2fs with %d commands in flight; "
          "%d writes issued (%d durable), %d flushes; image file %d bytes" %
          (PROG, args.seed, "died by itself" if died else "killed",
           time.monotonic() - start, in_flight, len(rec.writes),
           durable, pool.count.get(FLUSH, 0), size))
    state = {
        "seed": args.seed,
        "size": pool.size,
        "writes": [[w.kind, w.off, w.count, w.durable] for w in rec.writes],
    }
    with open(args.state, "w") as f:
        json.dump(state, f)


# ---------------------------------------------------------------------------
# verify

def cmd_verify(args):
    with open(args.state) as f:
        state = json.load(f)
    seed, size, writes = state["seed"], state["size"], state["writes"]

    # Cut the disk at every write boundary; for each piece, the list of
    # writes that may show there: the last durable one (None: the zeros
    # of the new image) followed by every later one.
    points = sorted({0, size} | {w[1] for w in writes} | {w[1] + w[2] for w in writes})
    cands = [[None] for _ in points[:-1]]
    for idx, (kind, off, n, durable) in enumerate(writes):
        a = bisect.bisect_left(points, off)
        b = bisect.bisect_left(points, off + n)
        for k in range(a, b):
            if durable:
                cands[k] = [idx]
            else:
                cands[k].append(idx)

    @functools.lru_cache(maxsize=64)
    def data(idx):
        return write_data(seed, idx, writes[idx][2])

    def value(idx, a, b):
        """Bytes [a, b) of the disk as write IDX (None: nothing) left them."""
        if idx is None or writes[idx][0] == ZERO:
            return bytes(b - a)
        off = writes[idx][1]
        return data(idx)[a - off:b - off]

    for raw in args.raw:
        with open(raw, "rb") as f:
            disk = f.read()
        if len(disk) != size:
            raise Failure("%s: %d bytes, expected %d" % (raw, len(disk), size))
        # Undurable tails may show partly; fall back to byte by byte.
        mixed = 0
        for k, cl in enumerate(cands):
            a, b = points[k], points[k + 1]
            got = disk[a:b]
            if any(got == value(i, a, b) for i in cl):
                continue
            mixed += 1
            vals = [value(i, a, b) for i in cl]
            for j in range(b - a):
                if all(got[j] != v[j] for v in vals):
                    durable = cl[0]
                    raise Failure(
                        "%s: byte at disk offset %d is %#04x; the last durable "
                        "write there (%s) left %#04x; later writes %s would "
                        "leave %s" %
                        (raw, a + j, got[j],
                         "none" if durable is None else
                         "#%d %s" % (durable, writes[durable]),
                         vals[0][j],
                         ["#%d %s" % (i, writes[i]) for i in cl[1:]],
                         ["%#04x" % v[j] for v in vals[1:]]))
        print("%s: %s matches the %d durable writes (%d of %d pieces mixed)" %
              (PROG, raw, sum(1 for w in writes if w[3]), mixed, len(cands)))


def main():
    ap = argparse.ArgumentParser(prog=PROG)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("sock")
    r.add_argument("pid", type=int)
    r.add_argument("state")
    r.add_argument("--seed", required=True)
    r.add_argument("--kill-after", type=float, required=True)
    r.add_argument("--cluster", type=int, default=65536)
    r.add_argument("--image")
    r.add_argument("--until-dead", action="store_true")
    r.add_argument("--conns", type=int, default=4)
    r.add_argument("--depth", type=int, default=4)
    v = sub.add_parser("verify")
    v.add_argument("state")
    v.add_argument("raw", nargs="+")
    args = ap.parse_args()
    try:
        if args.cmd == "run":
            cmd_run(args)
        else:
            cmd_verify(args)
    except (Failure, nbd.Error) as e:
        print("%s %s: FAIL: %s" % (PROG, args.cmd, e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# random-model.py - a seeded random workload against an in-memory model.
# Run by tests/test-random-model.sh and tests/test-crash.sh (inside
# nbdkit --run); not a test by itself.
#
#   random-model.py SOCK --seed N --out MODEL.raw [--base BASE.raw]
#                   [--cluster BYTES] [--seconds S] [--max-ops N]
#                   [--conns N] [--depth N] [--mix KIND=WEIGHT,...]
#
# Opens --conns connections to the NBD server on the Unix socket SOCK and
# keeps up to --depth asynchronous commands in flight on each: reads,
# writes (some with FUA), flushes, write-zeroes and trims when the server
# offers them, and bursts of small writes racing into one region.  The
# disk starts as BASE.raw (default: all zeros).  Every read must equal the
# model (commands touching the same bytes are never in flight together,
# so the model is exact).  A trimmed range may read back as its old
# contents or as zeros, byte by byte; it is read back at once and the
# model takes what was read.  At the end the whole disk is read back and
# compared, and the model is written to MODEL.raw for the caller to
# compare with the image (qemu-img compare).
#
# Exit status 0 on success, 1 on any mismatch or error (the seed is
# printed again on failure).

import argparse
import os
import random
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aiopool import (Pool, Op, ExtentPicker, READ, WRITE, ZERO, TRIM,  # noqa: E402
                     FLUSH, SETTLE)

PROG = "random-model"

# How often each kind of request comes (relative weights); "burst" is a
# group of disjoint writes racing into one region on every connection.
MIX = {"read": 34, "write": 35, "fua": 8, "flush": 4, "zero": 7, "trim": 6,
       "burst": 6}


def parse_mix(text):
    """--mix write=3,trim=1: only these kinds, with these weights."""
    mix = {}
    for item in text.split(","):
        k, _, w = item.partition("=")
        if k not in MIX:
            raise argparse.ArgumentTypeError("unknown kind %r (kinds: %s)" %
                                             (k, " ".join(MIX)))
        mix[k] = float(w or 1)
    return mix


class Failure(Exception):
    pass


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def hexdump(b, at, n=16):
    return b[at:at + n].hex(" ")


class Workload:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.pool = Pool(args.sock, args.conns, args.depth, self.done)
        size = self.pool.size
        if args.base:
            with open(args.base, "rb") as f:
                self.model = bytearray(f.read())
            if len(self.model) != size:
                raise Failure("%s has %d bytes, the disk %d" %
                              (args.base, len(self.model), size))
        else:
            self.model = bytearray(size)
        self.size = size
        self.picker = ExtentPicker(self.rng, size, args.cluster)
        self.kinds = list(args.mix)
        self.weights = [args.mix[k] for k in self.kinds]
        self.bytes_read = self.bytes_written = 0
        self.trim_zeroed = 0

    # ---- expectations -------------------------------------------------

    def done(self, op):
        if op.error is not None:
            raise Failure("%r failed: %s" % (op, op.error))
        if op.kind == READ:
            self.check_read(op)
        elif op.kind == TRIM:
            # Read the trimmed range back before anything else may touch
            # it (a SETTLE read is exclusive, so nothing overlapping can be
            # issued while it is in flight).
            self.pool.issue(Op(SETTLE, op.off, op.count, tag=op), op.conn)
        elif op.kind == SETTLE:
            self.settle(op)

    def check_read(self, op):
        want = self.model[op.off:op.off + op.count]
        got = op.result
        if got != want:
            i = first_difference(got, want)
            raise Failure(
                "%r: mismatch at disk offset %d (%d bytes into the read)\n"
                "  read:     %s\n  expected: %s" %
                (op, op.off + i, i, hexdump(got, i), hexdump(want, i)))
        self.bytes_read += op.count

    def settle(self, op):
        old = self.model[op.off:op.off + op.count]
        got = op.result
        if got != old:
            if not any(got):
                self.trim_zeroed += op.count
            else:
                for i, (g, o) in enumerate(zip(got, old)):
                    if g != o and g != 0:
                        raise Failure(
                            "%r: trimmed byte at disk offset %d reads %#04x, "
                            "neither its old value %#04x nor zero" %
                            (op.tag, op.off + i, g, o))
            self.model[op.off:op.off + op.count] = got

    # ---- the workload -------------------------------------------------

    def one_op(self):
        rng, pool, p = self.rng, self.pool, self.picker
        conn = rng.randrange(len(pool.handles))
        kind = rng.choices(self.kinds, self.weights)[0]
        if kind == "burst":
            # Disjoint writes racing into one region, on every connection.
            for j, (off, n) in enumerate(p.pieces()):
                self.write(off, n, 0, (conn + j) % len(pool.handles))
        elif kind == "flush":
            pool.submit(Op(FLUSH), conn)
        else:
            off, n = p.extent()
            if kind == "read":
                pool.submit(Op(READ, off, n), conn)
            elif kind == "write":
                self.write(off, n, 0, conn)
            elif kind == "fua":
                self.write(off, n, nbd.CMD_FLAG_FUA, conn)
            elif kind == "zero" and pool.can_zero:
                flags = rng.choice([0, 0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA])
                # The model changes when the command is issued: nothing
                # overlapping is in flight or will be until it completes.
                pool.submit(Op(ZERO, off, n, flags), conn)
                self.model[off:off + n] = bytes(n)
            elif kind == "trim" and pool.can_trim:
                flags = rng.choice([0, 0, nbd.CMD_FLAG_FUA])
                pool.submit(Op(TRIM, off, n, flags), conn)

    def write(self, off, n, flags, conn):
        data = self.rng.randbytes(n)
        self.pool.submit(Op(WRITE, off, n, flags, data=data), conn)
        self.model[off:off + n] = data
        self.bytes_written += n

    def verify_all(self):
        """Read the whole disk back, spread over every connection."""
        chunk = 4 << 20
        nconn = len(self.pool.handles)
        for k, off in enumerate(range(0, self.size, chunk)):
            n = min(chunk, self.size - off)
            self.pool.submit(Op(READ, off, n), k % nconn)
        self.pool.drain()

    def run(self):
        args, pool = self.args, self.pool
        for need in ("can_flush", "can_fua", "can_multi_conn"):
            if not getattr(pool, need):
                raise Failure("the server does not advertise %s" % need)
        start = time.monotonic()
        ops = 0
        while ops < args.max_ops and time.monotonic() - start < args.seconds:
            self.one_op()
            ops += 1
        pool.drain()
        elapsed = time.monotonic() - start
        self.verify_all()
        pool.submit(Op(FLUSH), 0)
        pool.drain()
        pool.close()
        with open(args.out, "wb") as f:
            f.write(self.model)
        counts = ", ".join("%s %d" % kv for kv in sorted(pool.count.items()))
        print("%s: seed %s: %d ops in %.1fs (%s); %d MiB written, %d MiB "
              "read; %d trimmed bytes read as zeros; model in %s" %
              (PROG, args.seed, ops, elapsed, counts,
               self.bytes_written >> 20, self.bytes_read >> 20,
               self.trim_zeroed, args.out))


def main():
    ap = argparse.ArgumentParser(prog=PROG)
    ap.add_argument("sock")
    ap.add_argument("--seed", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base")
    ap.add_argument("--cluster", type=int, default=65536)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-ops", type=int, default=1000000)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--mix", type=parse_mix, default=MIX,
                    help="kinds of request and weights, e.g. write=3,trim=1")
    args = ap.parse_args()
    print("%s: seed %s" % (PROG, args.seed), flush=True)
    try:
        Workload(args).run()
    except (Failure, nbd.Error) as e:
        print("%s: FAIL (seed %s): %s" % (PROG, args.seed, e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

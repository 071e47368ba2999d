#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# powerloss-apply.py IMAGE LOG --seed N - turn IMAGE, left by an nbdkit
# killed with SIGKILL while tests/powerloss-filter.so logged its writes in
# LOG, into what a disk could hold after a power cut at that moment: the
# state of the last completed flush (every logged write undone, newest
# first), then, in the order they were made, each 4 KiB piece of each
# logged write kept or not at random (a write acknowledged with FUA is
# kept whole).  A record cut short at the end of LOG was never written
# (a record is logged before its write) and is ignored.  Prints what it
# kept.  (Not a test by itself: QCOW_VIA=powerloss in tests/functions.sh.)

import argparse
import os
import random
import struct

REC_WRITE, REC_ZERO, REC_ACK = 1, 2, 3
HEADER = struct.Struct("<IIQQQ")
PIECE = 4096


def read_log(path):
    recs, acked = [], set()
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + HEADER.size <= len(data):
        typ, _, seq, off, n = HEADER.unpack_from(data, pos)
        pos += HEADER.size
        if typ == REC_ACK:
            acked.add(seq)
            continue
        if typ not in (REC_WRITE, REC_ZERO):
            raise SystemExit("%s: bad record type %d at %d" % (path, typ, pos))
        need = n * (2 if typ == REC_WRITE else 1)
        if pos + need > len(data):
            break                       # cut short: never written
        old = data[pos:pos + n]
        new = data[pos + n:pos + 2 * n] if typ == REC_WRITE else bytes(n)
        pos += need
        recs.append((seq, off, old, new))
    return recs, acked


def main():
    p = argparse.ArgumentParser()
    p.add_argument("image")
    p.add_argument("log")
    p.add_argument("--seed", type=int, required=True)
    a = p.parse_args()
    rng = random.Random(a.seed)
    recs, acked = read_log(a.log)
    keep_p = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])
    fd = os.open(a.image, os.O_RDWR)
    try:
        for seq, off, old, new in reversed(recs):
            os.pwrite(fd, old, off)
        kept = pieces = 0
        for seq, off, old, new in recs:
            if seq in acked:
                os.pwrite(fd, new, off)
                continue
            for i in range(0, len(new), PIECE):
                pieces += 1
                if rng.random() < keep_p:
                    os.pwrite(fd, new[i:i + PIECE], off + i)
                    kept += 1
    finally:
        os.close(fd)
    print("power loss: %d writes since the last flush (%d acknowledged with FUA); "
          "kept %d of %d other 4 KiB pieces (p=%.2f)"
          % (len(recs), len(acked), kept, pieces, keep_p))


if __name__ == "__main__":
    main()

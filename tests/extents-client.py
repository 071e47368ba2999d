#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# extents-client.py - the client side of tests/test-extents.sh (not a
# test by itself).
#
#   layout SIZE --seed N
#       Print qemu-io commands that lay out a disk of SIZE bytes (64 KiB
#       clusters): data, compressed data, zero clusters with and without a
#       host cluster, and discards, in runs that often cross the 32 MiB
#       spans of 4 KiB L2 slices and the 512 MiB spans of L2 tables.
#   query SOCK OUT --seed N --queries Q
#       Block status (base:allocation) of the server on SOCK: the whole
#       disk walked as nbdinfo --map walks it (each request from where the
#       last reply ended to the end of the disk), then Q requests at random
#       offsets and lengths (up to 4 GiB), in random order.  Saves every
#       reply in OUT (JSON).
#   mutate SOCK --seed N --ops K
#       K random writes, write-zeroes and trims, then flush.
#   compare OUT IMG
#       Every extent in OUT against `qemu-img map` of IMG, cluster by
#       cluster: data where QEMU says data, zero (not hole) where QEMU has
#       a zero cluster with a host cluster, hole and zero where QEMU says
#       neither.  Each reply must start at the request's offset and cover
#       its extents contiguously.
#
# Exit status 0 on success, 1 on a failure.

import argparse
import json
import random
import subprocess
import sys

import nbd

CLUSTER = 65536
SLICE_SPAN = 512 * CLUSTER          # 4 KiB of L2 entries
TABLE_SPAN = 8192 * CLUSTER         # one 64 KiB L2 table


class Failure(Exception):
    pass


def boundary_offset(rng, size):
    """A cluster near a slice or table boundary, or anywhere."""
    k = rng.random()
    if k < 0.35:
        b = rng.randrange(1, size // SLICE_SPAN) * SLICE_SPAN
    elif k < 0.6:
        b = rng.randrange(1, size // TABLE_SPAN) * TABLE_SPAN
    else:
        return rng.randrange(size // CLUSTER) * CLUSTER
    off = b + rng.randint(-8, 8) * CLUSTER
    return min(max(off, 0), size - CLUSTER)


def cmd_layout(a):
    rng = random.Random(a.seed)
    size = a.size
    # compressed clusters first: QEMU writes them only where nothing is
    compressed = set()
    for _ in range(40):
        compressed.add(boundary_offset(rng, size))
    for off in sorted(compressed):
        print("write -c -P %d %d %d" % (rng.randint(1, 255), off, CLUSTER))
    for _ in range(400):
        off = boundary_offset(rng, size)
        n = min(rng.choice([1, 1, 2, 3, 8, 17, 40]) * CLUSTER, size - off)
        k = rng.random()
        if k < 0.55:
            print("write -P %d %d %d" % (rng.randint(1, 255), off, n))
        elif k < 0.75:
            # over data, without -u: zero clusters that keep a host cluster
            print("write -P 9 %d %d" % (off, n))
            print("write -z %d %d" % (off, n))
        elif k < 0.85:
            print("write -z -u %d %d" % (off, n))
        else:
            print("discard %d %d" % (off, n))


def block_status(h, off, count):
    got = []

    def cb(ctx, o, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            got.append((o, list(entries)))
        return 0
    h.block_status(count, off, cb)
    if len(got) != 1 or got[0][0] != off or not got[0][1]:
        raise Failure("block status at %d+%d: bad reply %r" % (off, count, got))
    return got[0][1]


def cmd_query(a):
    rng = random.Random(a.seed)
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(a.sock)
    size = h.get_size()
    replies = []
    off = 0
    while off < size:                       # as nbdinfo --map does
        count = min(size - off, 0xfffffe00)
        ents = block_status(h, off, count)
        replies.append([off, count, ents])
        off += sum(ents[0::2])
    for _ in range(a.queries):
        off = boundary_offset(rng, size) + rng.choice([0, 0, 512, 4096, 65024])
        off = min(off, size - 512)
        count = min(size - off, rng.choice([512, CLUSTER, SLICE_SPAN, TABLE_SPAN,
                                            rng.randrange(1, 1 << 32)]))
        count = min(count, 0xfffffe00)
        replies.append([off, count, block_status(h, off, count)])
    h.shutdown()
    with open(a.out, "w") as f:
        json.dump(replies, f)
    print("%d replies, %d extents" % (len(replies),
                                      sum(len(r[2]) // 2 for r in replies)))


def cmd_mutate(a):
    rng = random.Random(a.seed)
    h = nbd.NBD()
    h.connect_unix(a.sock)
    size = h.get_size()
    for _ in range(a.ops):
        off = boundary_offset(rng, size)
        n = min(rng.choice([1, 2, 5, 16]) * CLUSTER, size - off)
        k = rng.random()
        if k < 0.5:
            h.pwrite(bytes([rng.randint(1, 255)]) * n, off)
        elif k < 0.75:
            h.zero(n, off)
        else:
            h.trim(n, off)
    h.flush()
    h.shutdown()


def qemu_map(img):
    """Per cluster: 0 data, 2 zero with a host cluster, 3 hole and zero."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", img],
                         check=True, capture_output=True, text=True).stdout
    runs = []
    for e in json.loads(out):
        if e["data"]:
            k = 0
        elif e["zero"] and "offset" in e:
            k = 2
        elif e["zero"]:
            k = 3
        else:
            raise Failure("qemu-img map: unexpected extent %r" % e)
        if e["start"] % CLUSTER or e["length"] % CLUSTER:
            raise Failure("qemu-img map: extent not cluster aligned: %r" % e)
        runs.append((e["start"] // CLUSTER, e["length"] // CLUSTER, k))
    return runs


def cmd_compare(a):
    runs = qemu_map(a.img)
    size = sum(n for _, n, _ in runs) * CLUSTER
    kind = bytearray(size // CLUSTER)
    for first, n, k in runs:
        kind[first:first + n] = bytes([k]) * n
    with open(a.out) as f:
        replies = json.load(f)
    checked = 0
    for off, count, ents in replies:
        pos = off
        for i in range(0, len(ents), 2):
            n, flags = ents[i], ents[i + 1]
            if n == 0 or pos + n > size:
                raise Failure("request %d+%d: extent %d+%d out of range"
                              % (off, count, pos, n))
            for c in range(pos // CLUSTER, (pos + n - 1) // CLUSTER + 1):
                if flags != kind[c]:
                    raise Failure("request %d+%d: extent %d+%d says flags %d, "
                                  "but QEMU maps cluster %d (offset %d) as %d"
                                  % (off, count, pos, n, flags, c, c * CLUSTER,
                                     kind[c]))
                checked += 1
            pos += n
        if pos < off + min(count, 512):
            raise Failure("request %d+%d: reply covers only up to %d"
                          % (off, count, pos))
    print("%d replies agree with qemu-img map (%d cluster checks)"
          % (len(replies), checked))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("layout")
    s.add_argument("size", type=int)
    s.add_argument("--seed", type=int, required=True)
    s = sub.add_parser("query")
    s.add_argument("sock")
    s.add_argument("out")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--queries", type=int, default=300)
    s = sub.add_parser("mutate")
    s.add_argument("sock")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--ops", type=int, default=200)
    s = sub.add_parser("compare")
    s.add_argument("out")
    s.add_argument("img")
    a = p.parse_args()
    try:
        {"layout": cmd_layout, "query": cmd_query, "mutate": cmd_mutate,
         "compare": cmd_compare}[a.cmd](a)
    except Failure as e:
        print("FAIL: %s" % e, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

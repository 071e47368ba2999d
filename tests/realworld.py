#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# realworld.py - helpers for tests/test-realworld.sh.
#
#   realworld.py data FILE SIZE SEED
#       Write SIZE bytes of seeded guest-like contents to FILE: runs of
#       random bytes (incompressible), text (compressible), single-byte
#       patterns and zeros, of lengths from a few bytes to 256 KiB, so
#       that `qemu-img convert -c` leaves some clusters compressed, some
#       uncompressed and some unallocated, and runs start off any
#       cluster boundary.
#
#   realworld.py drop-backing-format FILE
#       Remove the backing-file-format header extension (0xe2792aca) of
#       the qcow2 image FILE, leaving the backing file name in place, so
#       the image names a backing file whose format is not recorded.
#       Fails if FILE has no such extension.

import random
import struct
import sys

EXT_BACKING_FORMAT = 0xE2792ACA

WORDS = (b"the quick brown fox jumps over the lazy dog qcow2 cluster "
         b"refcount snapshot backing l2 table 0123456789\n").split(b" ")


def data(path, size, seed):
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        n = rng.choice([rng.randint(1, 600), 512 * rng.randint(1, 64),
                        rng.randint(4096, 256 << 10)])
        kind = rng.choices(["random", "text", "pattern", "zero"],
                           [4, 3, 2, 3])[0]
        if kind == "random":
            chunk = rng.randbytes(n)
        elif kind == "text":
            chunk = bytearray()
            while len(chunk) < n:
                chunk += rng.choice(WORDS) + b" "
            chunk = bytes(chunk[:n])
        elif kind == "pattern":
            chunk = bytes([rng.randrange(1, 256)]) * n
        else:
            chunk = bytes(n)
        out += chunk
    with open(path, "wb") as f:
        f.write(out[:size])


def drop_backing_format(path):
    with open(path, "r+b") as f:
        hdr = f.read(1 << 16)
        version, = struct.unpack_from(">I", hdr, 4)
        start = struct.unpack_from(">I", hdr, 100)[0] if version >= 3 else 72
        pos, kept, found = start, [], False
        while True:
            etype, elen = struct.unpack_from(">II", hdr, pos)
            if etype == 0:
                break
            body = hdr[pos + 8:pos + 8 + elen]
            if etype == EXT_BACKING_FORMAT:
                found = True
            else:
                kept.append(struct.pack(">II", etype, elen) + body +
                            bytes(-elen % 8))
            pos += 8 + (elen + 7) // 8 * 8
        if not found:
            sys.exit("%s: no backing format extension" % path)
        area = b"".join(kept) + bytes(8)          # ... and the end marker
        end = pos + 8
        f.seek(start)
        f.write(area + bytes(end - start - len(area)))


def main(argv):
    if len(argv) == 5 and argv[1] == "data":
        data(argv[2], int(argv[3]), int(argv[4]))
    elif len(argv) == 3 and argv[1] == "drop-backing-format":
        drop_backing_format(argv[2])
    else:
        sys.exit("usage: realworld.py data FILE SIZE SEED | "
                 "drop-backing-format FILE")


if __name__ == "__main__":
    main(sys.argv)

#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Make the contents of bench/run's images.  Most subcommands print
qemu-io commands (feed them to `qemu-io -t writeback -f qcow2 IMG` on
stdin); the patterns are seeded, so the same SEED gives the same image.

  images.py fill SIZE [--chunk C]
      Write every byte, C bytes at a time (default 64M), each chunk with
      its own nonzero pattern byte.
  images.py scatter SIZE --total T --piece P --seed S
      Write T bytes in pieces of P bytes at distinct random P-aligned
      offsets.
  images.py alternate SIZE --cluster C
      Write every other cluster: C bytes at 0, 2C, 4C, ...
  images.py runs SIZE --cluster C --fraction F --seed S [--verb V]
      Pick about F of the clusters in runs of 1 to 8 clusters scattered
      over the disk; print "V OFFSET LENGTH" per run (V: write (with a
      pattern), discard, or "-" for bare "OFFSET LENGTH" lines).
  images.py iolog SIZE --total T --piece P --seed S --rw read|write
            --count N [--block B] [--io-seed S2]
      A fio iolog (replayed by `fio --read_iolog`, the file named "nbd" as
      fio's nbd engine names it) of N B-byte (default 4k) reads or writes
      at random B-aligned places inside the pieces that `scatter` with the
      same SIZE, T, P and S writes.
  images.py settle FILE...
      Give each file the same page cache state whatever wrote it: write
      back and drop its cached pages, then read its data back (SEEK_DATA:
      holes are skipped) 1 MiB at a time with readahead off, so that it is
      cached in small pages, as random 4k I/O leaves it, rather than in the
      large ones a big sequential write or a readahead makes (writing 4k
      into a large cached page costs the kernel much more).
  images.py text OUT SIZE --seed S [--corpus-dir D]
      Write a raw file OUT of SIZE bytes that compresses, but not
      trivially: each 64 KiB holds a random slice of the text files found
      under D (default /usr/share) for 40 to 100% of its length and random
      bytes for the rest.
"""

import argparse
import os
import random
import sys

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(text):
    text = text.strip().lower().rstrip("ib")
    unit = text[-1] if text and text[-1] in UNITS else ""
    return int(float(text[:len(text) - len(unit)]) * UNITS[unit])


def pattern(n):
    """A nonzero pattern byte for the Nth piece."""
    return n % 255 + 1


def fill(a, out):
    for i, off in enumerate(range(0, a.size, a.chunk)):
        out.write(f"write -P {pattern(i)} {off} {min(a.chunk, a.size - off)}\n")


def scatter(a, out):
    for i, slot in enumerate(scatter_slots(a)):
        out.write(f"write -P {pattern(i)} {slot * a.piece} {a.piece}\n")


def scatter_slots(a):
    slots = a.size // a.piece
    count = min(slots, a.total // a.piece)
    return sorted(random.Random(a.seed).sample(range(slots), count))


def iolog(a, out):
    slots = scatter_slots(a)
    rng = random.Random(a.io_seed)
    blocks = a.piece // a.block
    out.write("fio version 2 iolog\nnbd add\nnbd open\n")
    for _ in range(a.count):
        off = rng.choice(slots) * a.piece + rng.randrange(blocks) * a.block
        out.write(f"nbd {a.rw} {off} {a.block}\n")
    out.write("nbd close\n")


def settle(a, _out):
    for path in a.files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            end, off = os.fstat(fd).st_size, 0
            while off < end:
                try:
                    off = os.lseek(fd, off, os.SEEK_DATA)
                except OSError:
                    break                   # only a hole is left
                hole = os.lseek(fd, off, os.SEEK_HOLE)
                while off < hole:
                    n = len(os.pread(fd, min(1 << 20, hole - off), off))
                    if n == 0:
                        break
                    off += n
        finally:
            os.close(fd)


def alternate(a, out):
    for i, off in enumerate(range(0, a.size, 2 * a.cluster)):
        out.write(f"write -P {pattern(i)} {off} {a.cluster}\n")


def runs(a, out):
    """Alternate runs of picked and skipped clusters; each run is 1 to 8
    clusters, the picked ones chosen with probability F."""
    rng = random.Random(a.seed)
    clusters = a.size // a.cluster
    c = n = 0
    while c < clusters:
        length = min(rng.randint(1, 8), clusters - c)
        if rng.random() < a.fraction:
            off, count = c * a.cluster, length * a.cluster
            if a.verb == "-":
                out.write(f"{off} {count}\n")
            elif a.verb == "write":
                out.write(f"write -P {pattern(n)} {off} {count}\n")
            else:
                out.write(f"{a.verb} {off} {count}\n")
            n += 1
        c += length


def corpus(top, limit=64 << 20):
    """Up to LIMIT bytes of text from the files under TOP (in a stable
    order): files that decode as UTF-8 and have no NUL bytes."""
    chunks, total = [], 0
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                if os.path.islink(path) or not 256 <= os.path.getsize(path) <= 4 << 20:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                if b"\0" in data:
                    continue
                data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            chunks.append(data)
            total += len(data)
            if total >= limit:
                return b"".join(chunks)
    text = b"".join(chunks)
    if len(text) < 1 << 20:
        sys.exit(f"images.py: only {len(text)} bytes of text under {top}")
    return text


def text(a, _out):
    rng = random.Random(a.seed)
    source = corpus(a.corpus_dir)
    block = 64 << 10
    with open(a.out, "wb") as f:
        for off in range(0, a.size, block):
            n = min(block, a.size - off)
            t = min(n, rng.randint(block * 2 // 5, block))
            start = rng.randrange(len(source) - t)
            f.write(source[start:start + t] + rng.randbytes(n - t))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("fill")
    s.add_argument("size", type=size)
    s.add_argument("--chunk", type=size, default=64 << 20)
    s = sub.add_parser("scatter")
    s.add_argument("size", type=size)
    s.add_argument("--total", type=size, required=True)
    s.add_argument("--piece", type=size, required=True)
    s.add_argument("--seed", type=int, required=True)
    s = sub.add_parser("alternate")
    s.add_argument("size", type=size)
    s.add_argument("--cluster", type=size, default=64 << 10)
    s = sub.add_parser("runs")
    s.add_argument("size", type=size)
    s.add_argument("--cluster", type=size, default=64 << 10)
    s.add_argument("--fraction", type=float, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--verb", default="-", choices=["-", "write", "discard"])
    s = sub.add_parser("iolog")
    s.add_argument("size", type=size)
    s.add_argument("--total", type=size, required=True)
    s.add_argument("--piece", type=size, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--rw", choices=["read", "write"], required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--block", type=size, default=4096)
    s.add_argument("--io-seed", type=int, default=2)
    s = sub.add_parser("settle")
    s.add_argument("files", nargs="+")
    s = sub.add_parser("text")
    s.add_argument("out")
    s.add_argument("size", type=size)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--corpus-dir", default="/usr/share")
    a = p.parse_args()
    out = sys.stdout
    {"fill": fill, "scatter": scatter, "alternate": alternate, "runs": runs,
     "iolog": iolog, "settle": settle, "text": text}[a.cmd](a, out)


if __name__ == "__main__":
    main()

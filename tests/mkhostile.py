#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# mkhostile.py - damage a qcow2 image in place, for tests/test-hostile.sh.
#
# Usage: mkhostile.py FILE COMMAND ARGS... [COMMAND ARGS...]...
#
# Commands (applied in order; EXPR is a Python integer expression that
# may use every header field by name, plus `filesize`, `cluster` (the
# cluster size) and, for l1/l2/rt, `entry` (the entry's current value)):
#
#   get FIELD            print the field's value (decimal)
#   set FIELD EXPR       store EXPR in a header field (masked to its width)
#   truncate EXPR        cut (or extend) the file to EXPR bytes
#   l1 INDEX EXPR        set L1 entry INDEX
#   l2 L1INDEX INDEX EXPR  set entry INDEX of the L2 table that L1INDEX points to
#   rt INDEX EXPR        set refcount table entry INDEX
#   poke EXPR FMT EXPR   store a big-endian integer (FMT: B, H, I or Q, for
#                        8, 16, 32 or 64 bits) at the offset EXPR
#   ext TYPE LENGTH      write a header extension (type, length, no payload)
#                        where the extension area starts, then an end marker
#
# Fields: the qcow2 header as in QEMU's docs/interop/qcow2.txt.

import os
import struct
import sys

FIELDS = {
    # name: (offset, struct format)
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}

# Bits 9..55 of an L1/L2 entry hold the host offset.
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def spec(name):
    if name not in FIELDS:
        sys.exit(f"mkhostile: unknown field {name}")
    return FIELDS[name]


class Image:
    def __init__(self, path):
        self.f = open(path, "r+b")

    def read(self, off, fmt):
        self.f.seek(off)
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))[0]

    def write(self, off, fmt, value):
        width = struct.calcsize(fmt) * 8
        self.f.seek(off)
        self.f.write(struct.pack(fmt, value & ((1 << width) - 1)))

    def field(self, name):
        return self.read(*spec(name))

    def set_field(self, name, value):
        self.write(*spec(name), value)

    def names(self, **extra):
        env = {name: self.field(name) for name in FIELDS}
        self.f.seek(0, os.SEEK_END)
        env["filesize"] = self.f.tell()
        env["cluster"] = 1 << env["cluster_bits"]
        env.update(extra)
        return env

    def eval(self, expr, **extra):
        value = eval(expr, {"__builtins__": {}}, self.names(**extra))
        if not isinstance(value, int):
            sys.exit(f"mkhostile: {expr!r} is not an integer")
        return value

    def l2_table(self, l1_index):
        l1 = self.field("l1_table_offset") + 8 * l1_index
        l2 = self.read(l1, ">Q") & OFFSET_MASK
        if l2 == 0:
            sys.exit(f"mkhostile: L1 entry {l1_index} is unallocated")
        return l2

    def set_entry(self, table, index, expr):
        off = table + 8 * index
        self.write(off, ">Q", self.eval(expr, entry=self.read(off, ">Q")))

    def extension_area(self):
        if self.field("version") == 2:
            return 72
        return self.field("header_length")


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    img = Image(argv[1])
    args = argv[2:]
    arity = {"get": 1, "set": 2, "truncate": 1, "l1": 2, "l2": 3, "rt": 2,
             "poke": 3, "ext": 2}
    while args:
        cmd = args[0]
        if cmd not in arity or len(args) < 1 + arity[cmd]:
            sys.exit(f"mkhostile: bad command: {' '.join(args)}")
        a = args[1:1 + arity[cmd]]
        args = args[1 + arity[cmd]:]
        if cmd == "get":
            print(img.field(a[0]))
        elif cmd == "set":
            img.set_field(a[0], img.eval(a[1]))
        elif cmd == "truncate":
            img.f.truncate(img.eval(a[0]))
        elif cmd == "l1":
            img.set_entry(img.field("l1_table_offset"), int(a[0]), a[1])
        elif cmd == "l2":
            img.set_entry(img.l2_table(int(a[0])), int(a[1]), a[2])
        elif cmd == "rt":
            img.set_entry(img.field("refcount_table_offset"), int(a[0]), a[1])
        elif cmd == "poke":
            if a[1] not in ("B", "H", "I", "Q"):
                sys.exit(f"mkhostile: bad format {a[1]}")
            img.write(img.eval(a[0]), ">" + a[1], img.eval(a[2]))
        elif cmd == "ext":
            off = img.extension_area()
            img.write(off, ">I", img.eval(a[0]))
            img.write(off + 4, ">I", img.eval(a[1]))
            img.write(off + 8, ">Q", 0)
    img.f.close()


if __name__ == "__main__":
    main(sys.argv)

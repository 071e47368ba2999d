#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# mkdamaged.py - damage a qcow2 image in one precise way, for the check
# and repair tests (tests/test-check.sh).
#
#   mkdamaged.py damage KIND FILE
#       Damage FILE in place.  Prints the guest offsets (decimal, one per
#       line) of the clusters whose content a repair may change: those
#       whose mapping the damage broke.  Every other guest cluster must
#       read the same after a repair as before the damage.
#   mkdamaged.py compare A.raw B.raw CLUSTER_SIZE [GUEST_OFFSET...]
#       Exit 1 (and say where) if A and B differ outside the listed
#       clusters.
#   mkdamaged.py kinds
#       List the damage kinds.
#
# The image must have data in its first guest clusters (the kinds say
# what they need), as made by the test.
import struct
import sys

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00fffffffffffe00


class Image:
    def __init__(self, path):
        self.f = open(path, "r+b")
        h = self.read(0, 104)
        (magic, self.version, _, _, self.cluster_bits, self.size, _,
         self.l1_size, self.l1_offset, self.rct_offset, self.rct_clusters,
         self.nb_snapshots, self.snapshots_offset) = struct.unpack(
             ">IIQIIQIIQQIIQ", h[:72])
        assert magic == 0x514649fb, "not a qcow2 image"
        self.refcount_order = 4
        incompat = 0
        if self.version >= 3:
            incompat = struct.unpack(">Q", h[72:80])[0]
            self.refcount_order = struct.unpack(">I", h[96:100])[0]
        self.cs = 1 << self.cluster_bits
        self.esize = 16 if incompat & 16 else 8    # extended L2 entries

    def read(self, off, n):
        self.f.seek(off)
        return self.f.read(n).ljust(n, b"\0")

    def write(self, off, data):
        self.f.seek(off)
        self.f.write(data)

    def u64(self, off):
        return struct.unpack(">Q", self.read(off, 8))[0]

    def set_u64(self, off, v):
        self.write(off, struct.pack(">Q", v))

    def file_size(self):
        self.f.seek(0, 2)
        return self.f.tell()

    # Tables: entry addresses.
    def l1e(self, i):
        return self.l1_offset + 8 * i

    def l2e(self, guest_cluster):
        per = self.cs // self.esize
        l2 = self.u64(self.l1e(guest_cluster // per)) & OFFSET_MASK
        assert l2, "guest cluster %d has no L2 table" % guest_cluster
        return l2 + self.esize * (guest_cluster % per)

    def data_offset(self, guest_cluster):
        e = self.u64(self.l2e(guest_cluster))
        assert e & OFFSET_MASK and not e & COMPRESSED, \
            "guest cluster %d is not a plain data cluster" % guest_cluster
        return e & OFFSET_MASK

    # Refcounts (16-bit only, which is what the test images use).
    def refcount_addr(self, host_cluster):
        assert self.refcount_order == 4, "16-bit refcounts only"
        per = self.cs // 2
        block = self.u64(self.rct_offset + 8 * (host_cluster // per))
        assert block, "no refcount block for cluster %d" % host_cluster
        return block + 2 * (host_cluster % per)

    def refcount(self, host_cluster):
        return struct.unpack(">H", self.read(self.refcount_addr(host_cluster), 2))[0]

    def set_refcount(self, host_cluster, v):
        self.write(self.refcount_addr(host_cluster), struct.pack(">H", v))

    def snapshot_entries(self):
        off = self.snapshots_offset
        out = []
        for _ in range(self.nb_snapshots):
            e = self.read(off, 40)
            id_len, name_len = struct.unpack(">HH", e[12:16])
            extra = struct.unpack(">I", e[36:40])[0]
            out.append(off)
            off += (40 + extra + id_len + name_len + 7) & ~7
        return out


def first_compressed(img):
    per = img.cs // img.esize
    for g in range(img.l1_size * per):
        if not img.u64(img.l1e(g // per)) & OFFSET_MASK:
            continue
        if img.u64(img.l2e(g)) & COMPRESSED:
            return g
    raise AssertionError("no compressed cluster")


# Each kind: damage IMG, return the guest clusters a repair may change.
def leak_header(img):
    img.set_refcount(0, img.refcount(0) + 1)
    return []


def leak_free(img):
    end = (img.file_size() + img.cs - 1) // img.cs
    img.write(end * img.cs, b"\0" * img.cs)
    img.set_refcount(end, 1)
    return []


def refcount_zero(img):
    img.set_refcount(img.data_offset(0) >> img.cluster_bits, 0)
    return []


def l2_outside(img):
    far = ((img.file_size() // img.cs) + 100) * img.cs
    img.set_u64(img.l2e(0), COPIED | far)
    return [0]


def l2_duplicate(img):
    img.set_u64(img.l2e(1), img.u64(img.l2e(0)))
    return [1]


def l2_into_l1(img):
    img.set_u64(img.l2e(2), COPIED | img.l1_offset)
    return [2]


def l2_misaligned(img):
    e = img.u64(img.l2e(3))
    img.set_u64(img.l2e(3), e + img.cs // 2)
    return []


def l1_misaligned(img):
    img.set_u64(img.l1e(0), img.u64(img.l1e(0)) + img.cs // 2)
    return []


def l1_outside(img):
    far = ((img.file_size() // img.cs) + 100) * img.cs
    img.set_u64(img.l1e(0), COPIED | far)
    per = img.cs // img.esize
    return list(range(min(per, (img.size + img.cs - 1) // img.cs)))


def copied_l2(img):
    img.set_u64(img.l2e(0), img.u64(img.l2e(0)) & ~COPIED)
    return []


def copied_l1(img):
    img.set_u64(img.l1e(0), img.u64(img.l1e(0)) & ~COPIED)
    return []


def reserved_l2(img):
    img.set_u64(img.l2e(4), img.u64(img.l2e(4)) | (1 << 56))
    return []


def corrupt_bit(img):
    incompat = img.u64(72)
    img.set_u64(72, incompat | 2)
    return []


def bad_header(img):
    img.write(20, struct.pack(">I", 30))
    return []


def compressed_outside(img):
    g = first_compressed(img)
    e = img.u64(img.l2e(g))
    x = 62 - (img.cluster_bits - 8)
    far = ((img.file_size() // img.cs) + 100) * img.cs + 123
    img.set_u64(img.l2e(g), (e & ~((1 << x) - 1)) | far)
    return [g]


def snap_l1_overlap(img):
    s = img.snapshot_entries()
    assert len(s) >= 2, "needs two snapshots"
    img.write(s[1], img.read(s[0], 12))     # L1 offset and size
    return []


KINDS = {
    "leak-header": leak_header,
    "leak-free": leak_free,
    "refcount-zero": refcount_zero,
    "l2-outside": l2_outside,
    "l2-duplicate": l2_duplicate,
    "l2-into-l1": l2_into_l1,
    "l2-misaligned": l2_misaligned,
    "l1-misaligned": l1_misaligned,
    "l1-outside": l1_outside,
    "copied-l2": copied_l2,
    "copied-l1": copied_l1,
    "reserved-l2": reserved_l2,
    "corrupt-bit": corrupt_bit,
    "bad-header": bad_header,
    "compressed-outside": compressed_outside,
    "snap-l1-overlap": snap_l1_overlap,
}


def compare(a, b, cs, tainted):
    tainted = set(int(t) // cs for t in tainted)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        c = 0
        bad = 0
        while True:
            x, y = fa.read(cs), fb.read(cs)
            if not x and not y:
                break
            if x != y and c not in tainted:
                print("guest cluster %d (offset %d) differs" % (c, c * cs),
                      file=sys.stderr)
                bad += 1
            c += 1
    return 1 if bad else 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "kinds":
        print("\n".join(KINDS))
        return 0
    if len(argv) == 4 and argv[1] == "damage" and argv[2] in KINDS:
        img = Image(argv[3])
        cs = img.cs
        for g in KINDS[argv[2]](img):
            print(g * cs)
        img.f.close()
        return 0
    if len(argv) >= 5 and argv[1] == "compare":
        return compare(argv[2], argv[3], int(argv[4]), argv[5:])
    print(__doc__ if __doc__ else "usage: see the comment at the top",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

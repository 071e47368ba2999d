#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# fuzz/mkcorpus.sh - (re)create the seed images in fuzz/corpus/.
#
# The seeds are committed; this script documents how they were made and
# remakes them (needs qemu-img, qemu-io, python3).  Each is a small qcow2
# file written by QEMU (512-byte clusters, tiny virtual sizes), some
# damaged on purpose.  A copy of most seeds with a 64-byte script appended
# (see fuzz/fuzz-image.c: the last 64 bytes choose how the image is opened
# and the requests made on it) starts the fuzzer off with read-write
# sessions; the extra bytes at the end do not make the image invalid.

set -e
export PATH=/usr/bin:/bin:$PATH
cd "$(dirname "$0")"
out=$PWD/corpus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$out"
mkdir -p "$out"
cd "$tmp"

mk ()                           # mk NAME SIZE [-o OPTIONS]
{
    local name=$1 size=$2
    shift 2
    qemu-img create -q -f qcow2 "$@" "$name" "$size"
}

io ()                           # io NAME CMD...: qemu-io commands
{
    local name=$1 a=()
    shift
    for c in "$@"; do a+=(-c "$c"); done
    local o
    o=$(qemu-io -f qcow2 "${a[@]}" "$name" 2>&1) || { echo "$o" >&2; return 1; }
    case "$o" in *rror*|*"Invalid"*) echo "$name: $o" >&2; return 1 ;; esac
}

# Header surgery on a copy: python EXPR with f (the file, r+b), be (int ->
# big-endian bytes), rd (offset, len -> int).
patch ()                        # patch SRC DST PYTHON
{
    cp "$1" "$2"
    /usr/bin/python3 - "$2" "$3" <<'EOF'
import sys
f = open(sys.argv[1], "r+b")
def be(v, n): return v.to_bytes(n, "big")
def rd(o, n):
    f.seek(o); return int.from_bytes(f.read(n), "big")
def wr(o, v, n):
    f.seek(o); f.write(be(v, n))
exec(sys.argv[2])
EOF
}

data='write -P 0x11 0 1k' ; more='write -P 0x22 20k 3k'
mk v3.qcow2 64K -o cluster_size=512
io v3.qcow2 "$data" "$more" 'write -P 0x33 63k 1k'

mk v2.qcow2 64K -o cluster_size=512,compat=0.10
io v2.qcow2 "$data" "$more" 'write -z 40k 2k'

mk zero-discard.qcow2 64K -o cluster_size=512
io zero-discard.qcow2 'write -P 0x44 0 16k' 'write -z 1k 2k' 'write -z -u 4k 2k' \
   'discard 8k 1k' 'write -P 0x55 9k 100'

mk compressed-zlib.qcow2 64K -o cluster_size=512
io compressed-zlib.qcow2 'write -c -P 0x61 0 512' 'write -c -P 0x62 4k 2k' "$more"

mk compressed-zstd.qcow2 64K -o cluster_size=512,compression_type=zstd
io compressed-zstd.qcow2 'write -c -P 0x63 1k 1k' 'write -c -P 0x64 32k 512'

mk snapshot.qcow2 64K -o cluster_size=512
io snapshot.qcow2 "$data" "$more"
qemu-img snapshot -c first snapshot.qcow2
io snapshot.qcow2 'write -P 0x71 0 2k' 'discard 20k 1k'
qemu-img snapshot -c second snapshot.qcow2

mk base.qcow2 64K -o cluster_size=512
io base.qcow2 'write -P 0x81 0 8k'
mk backing-qcow2.qcow2 64K -o cluster_size=512 -b base.qcow2 -F qcow2
io backing-qcow2.qcow2 'write -P 0x82 1k 1k' 'write -z 8k 1k'
truncate -s 32k base.raw
mk backing-raw.qcow2 64K -o cluster_size=512 -b base.raw -F raw
io backing-raw.qcow2 'write -P 0x83 2k 700'
mk backing-unrecorded.qcow2 64K -o cluster_size=512,compat=0.10 -b base.raw -F raw
patch backing-unrecorded.qcow2 backing-noformat.qcow2 '
# drop the backing format extension: the header extension area starts at 72
wr(72, 0, 4)'
rm backing-unrecorded.qcow2

mk refcount1.qcow2 64K -o cluster_size=512,refcount_bits=1
io refcount1.qcow2 "$data" "$more"
mk refcount64.qcow2 64K -o cluster_size=512,refcount_bits=64
io refcount64.qcow2 "$data" "$more"

mk lazy-dirty.qcow2 64K -o cluster_size=512,lazy_refcounts=on
(qemu-io -f qcow2 -c "$data" -c "$more" -c abort lazy-dirty.qcow2 >/dev/null 2>&1 || true) 2>/dev/null

truncate -s 64k external.raw
mk data-file.qcow2 64K -o cluster_size=512,data_file=external.raw
io data-file.qcow2 "$data"
mk data-file-raw.qcow2 64K -o cluster_size=512,data_file=external.raw,data_file_raw=on

mk extended-l2.qcow2 64K -o cluster_size=16k,extended_l2=on
io extended-l2.qcow2 'write -P 0x91 0 1k' 'write -P 0x92 20k 3k'

mk big-virtual.qcow2 64G -o cluster_size=16k
io big-virtual.qcow2 'write -P 0xa1 0 512' 'write -P 0xa2 60G 1k'

mk l2-growth.qcow2 8M -o cluster_size=512
io l2-growth.qcow2 'write -P 0xb1 0 512' 'write -P 0xb2 1M 512' 'write -P 0xb3 4M 1k' \
   'write -P 0xb4 8388096 512'

# Damaged images.  Header fields: 20 cluster_bits, 24 size, 36 l1_size,
# 40 l1_table_offset, 48 refcount_table_offset, 56 refcount_table_clusters,
# 60 nb_snapshots, 64 snapshots_offset, 72 incompatible, 100 header_length.
patch v3.qcow2 bad-l1-beyond-eof.qcow2 'wr(40, 1 << 40, 8)'
patch v3.qcow2 bad-l1-size.qcow2 'wr(36, 0x7fffffff, 4)'
patch v3.qcow2 bad-cluster-bits.qcow2 'wr(20, 31, 4)'
patch v3.qcow2 bad-refcount-table.qcow2 'wr(48, 0, 8)'
patch v3.qcow2 bad-rct-clusters.qcow2 'wr(56, 0xffffffff, 4)'
patch v3.qcow2 bad-incompat.qcow2 'wr(72, rd(72, 8) | 1 << 40, 8)'
patch v3.qcow2 corrupt-bit.qcow2 'wr(72, rd(72, 8) | 2, 8)'
patch v3.qcow2 bad-header-length.qcow2 'wr(100, 7, 4)'
patch v3.qcow2 crypt-aes.qcow2 'wr(32, 1, 4)'
patch snapshot.qcow2 bad-snapshot-table.qcow2 'wr(60, 1000, 4)'
patch v3.qcow2 bad-l2-entry.qcow2 '
l1 = rd(40, 8); l2 = rd(l1, 8) & 0x00fffffffffffe00
wr(l2, (1 << 63) | (1 << 50), 8)           # data cluster far beyond the file'
patch v3.qcow2 bad-l2-unaligned.qcow2 '
l1 = rd(40, 8); l2 = rd(l1, 8) & 0x00fffffffffffe00
wr(l2 + 8, (1 << 63) | (rd(l2 + 8, 8) & 0x00fffffffffffe00) + 100, 8)'
patch v3.qcow2 l2-points-at-header.qcow2 '
l1 = rd(40, 8); l2 = rd(l1, 8) & 0x00fffffffffffe00
wr(l2, 1 << 63, 8)                         # guest cluster 0 is the header'
patch v3.qcow2 l1-points-at-l1.qcow2 '
l1 = rd(40, 8); wr(l1, (1 << 63) | l1, 8)'
patch v3.qcow2 refcount-zero.qcow2 '
rt = rd(48, 8); rb = rd(rt, 8); wr(rb, 0, 2); wr(rb + 2 * 5, 0, 2)'
patch v3.qcow2 refcount-leak.qcow2 '
rt = rd(48, 8); rb = rd(rt, 8); wr(rb + 2 * 100, 1, 2)'
patch compressed-zlib.qcow2 bad-compressed.qcow2 '
l1 = rd(40, 8); l2 = rd(l1, 8) & 0x00fffffffffffe00
e = rd(l2, 8); f.seek(e & ((1 << 61) - 1)); f.write(b"\xff" * 64)'
patch compressed-zlib.qcow2 bad-compressed-size.qcow2 '
l1 = rd(40, 8); l2 = rd(l1, 8) & 0x00fffffffffffe00
wr(l2, rd(l2, 8) | (0xff << 54), 8)         # sector count far too large'
head -c 300 v3.qcow2 > truncated-header.qcow2
head -c 2048 v3.qcow2 > truncated-tables.qcow2

# Scripted copies: appended control bytes (see fuzz-image.c).
script ()                       # script SRC DST HEX
{
    cp "$1" "$2"
    /usr/bin/python3 -c 'import sys
b = bytes.fromhex(sys.argv[2]); b += bytes(64 - len(b))
open(sys.argv[1], "ab").write(b)' "$2" "$3"
}
# ctl 00 = read-write, no backing; ops: write 01, trim 02, zero 03 (c3 =
# fua|may_trim), map 04, flush 06, resize 08, compact 09, rebuild 0a.
rw='00000000 01 10000000 0fff 02 00000000 3fff 03 40000000 07ff c3 80000000 1fff 04 00000000 ffff 06 00000000 0000 09 00000000 0000 01 f0000000 01ff'
rwc='10000000 01 20000000 2000 01 a0000000 0400 02 20000000 1000 06 00000000 0000 0a 00000000 0000 08 c0000000 0000 01 e0000000 0200 04 00000000 ffff'
for s in v3 v2 zero-discard compressed-zlib compressed-zstd snapshot refcount1 \
         refcount64 lazy-dirty data-file extended-l2 big-virtual l2-growth \
         refcount-leak bad-compressed; do
    script $s.qcow2 $s-rw.qcow2 "${rw// /}"
done
for s in v3 l2-growth compressed-zstd snapshot refcount1; do
    script $s.qcow2 $s-rw-compact.qcow2 "${rwc// /}"
done
script backing-qcow2.qcow2 backing-qcow2-rw.qcow2 "04${rw:2}"    # backing: qcow2 file
script backing-raw.qcow2 backing-raw-rw.qcow2 "02${rw:2}"        # backing: raw file
script v3.qcow2 loop-rw.qcow2 "06${rw:2}"                        # backing: itself
script l2-growth.qcow2 fault-write-rw.qcow2 "200107${rw:6}"      # 7th write fails
script l2-growth.qcow2 fault-sync-rw.qcow2 "201a02${rw:6}"       # torn, persistent sync
script v3.qcow2 readonly.qcow2 "01${rw:2}"

rm -f base.raw external.raw
mv ./*.qcow2 "$out"/
ls -l "$out" | awk 'NR > 1 { n++; s += $5 } END { print n " seeds, " s " bytes" }'

#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool convert, judged by qemu-img.
#
#   - raw -> qcow2: qemu-img compare equal, qemu-img check clean, and the
#     ranges that read as zeros are not allocated (qemu-img map);
#   - qcow2 sources of every kind (v2, v3, small and large clusters, zero
#     clusters, compressed clusters, extended L2, a qcow2 and a raw backing
#     file: the chain is flattened, the output names no backing file) ->
#     qcow2, -c (zlib and zstd) and raw: equal to what qemu-img reads;
#     the raw output is sparse;
#   - -c: every data cluster is compressed (qemu-img check's statistics),
#     the file is no larger than qemu-img convert -c's;
#   - -o options reach the new image (qemu-img info);
#   - bad input: one-line errors, exit status 1, no output file left.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
cd "$TMPD"

# A source with structure: text-like data, random data, zeros, holes.
mkraw ()
{
    truncate -s 0 "$1"
    truncate -s 40M "$1"
    /usr/bin/python3 - "$1" <<'EOF'
import os, random, sys
r = random.Random(7)
words = [bytes(r.choice(b"abcdefghij klmnop\n") for _ in range(r.randint(2, 9))) for _ in range(300)]
with open(sys.argv[1], "r+b") as f:
    for i in range(120):
        off = r.randrange(0, 40 << 20) & ~511
        n = r.choice([512, 4096, 65536, 300000])
        kind = r.random()
        if kind < 0.6:
            data = b" ".join(r.choice(words) for _ in range(n // 4))[:n]
        elif kind < 0.8:
            data = os.urandom(n)
        else:
            data = bytes(n)          # explicit zeros: must stay unallocated
        f.seek(off)
        f.write(data)
EOF
}

info_is ()   # info_is IMG KEY VALUE: a field of qemu-img info
{
    local got
    got=$(qemu_info_field "$1" "$2")
    [ "$got" = "$3" ] || die "$1: qemu-img info $2 is '$got', expected '$3'"
}

expect_same ()   # expect_same A B WHAT
{
    qemu-img compare -q "$1" "$2" || die "$3: $1 and $2 differ"
}

# Data clusters in a qcow2 image and how many are compressed (qemu-img check).
check_stats ()
{
    qemu-img check --output=json "$1" | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d.get("allocated-clusters", 0), d.get("compressed-clusters", 0))'
}

# Bytes mapped as data that read as all zeros: must be none (QEMU's view).
allocated_zero_bytes ()
{
    local img=$1 raw=$2
    qemu-img map --output=json "$img" | /usr/bin/python3 -c '
import json, sys
raw = open(sys.argv[1], "rb")
n = 0
for e in json.load(sys.stdin):
    if e["data"] and e.get("depth", 0) == 0:
        raw.seek(e["start"])
        buf = raw.read(e["length"])
        for i in range(0, len(buf), 65536):
            if not any(buf[i:i + 65536]):
                n += min(65536, len(buf) - i)
print(n)' "$raw"
}

mkraw src.raw

echo "== raw -> qcow2"
"$QCOW_TOOL" convert src.raw out.qcow2
expect_same src.raw out.qcow2 "raw -> qcow2"
assert_qemu_check out.qcow2
[ "$(allocated_zero_bytes out.qcow2 src.raw)" = 0 ] ||
    die "raw -> qcow2: zero clusters were allocated"
qemu-img info out.qcow2 | grep -q "^backing file" && die "unexpected backing file"

echo "== raw -> qcow2 -c, size against qemu-img"
for ct in zlib zstd; do
    "$QCOW_TOOL" convert -c --compression $ct src.raw c-$ct.qcow2
    expect_same src.raw c-$ct.qcow2 "-c $ct"
    assert_qemu_check c-$ct.qcow2
    [ "$(qemu_info_field c-$ct.qcow2 format-specific.data.compression-type)" = $ct ] ||
        die "-c $ct: wrong compression type"
    read alloc comp < <(check_stats c-$ct.qcow2)
    qemu-img convert -c -O qcow2 -o compression_type=$ct src.raw q-$ct.qcow2
    read qalloc qcomp < <(check_stats q-$ct.qcow2)
    echo "$ct: qcow-tool $alloc clusters ($comp compressed), $(stat -c %s c-$ct.qcow2) bytes;" \
         "qemu-img $qalloc ($qcomp), $(stat -c %s q-$ct.qcow2) bytes"
    [ "$alloc" = "$qalloc" ] && [ "$comp" = "$qcomp" ] ||
        die "-c $ct: qcow-tool compressed $comp of $alloc clusters, qemu-img $qcomp of $qalloc"
    [ "$(stat -c %s c-$ct.qcow2)" -le "$(stat -c %s q-$ct.qcow2)" ] ||
        die "-c $ct: output larger than qemu-img's"
done

echo "== qcow2 sources -> qcow2, qcow2 -c, raw"
mk_source ()   # mk_source NAME QEMU-IMG-CREATE-OPTIONS
{
    qemu-img convert -q -O qcow2 -o "$2" src.raw "$1.qcow2"
    qemu-io -f qcow2 -c "write -z 1M 3M" -c "write -z -u 12M 64k" \
        -c "write -P 0x5a 20M 100k" "$1.qcow2" >/dev/null
}
mk_source v2 compat=0.10,cluster_size=4096
mk_source v3 compat=1.1,cluster_size=65536,refcount_bits=64
mk_source small compat=1.1,cluster_size=512
mk_source big compat=1.1,cluster_size=2M,refcount_bits=1
mk_source extl2 compat=1.1,cluster_size=65536,extended_l2=on
qemu-img convert -q -c -O qcow2 src.raw compressed.qcow2
# Chains: a qcow2 base with an overlay, a raw base with an overlay.
qemu-img create -q -f qcow2 -b v3.qcow2 -F qcow2 over-q.qcow2 48M
qemu-io -f qcow2 -c "write -P 1 30M 2M" -c "write -z 8M 64k" -c "write -P 7 44M 64k" over-q.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b src.raw -F raw over-r.qcow2
qemu-io -f qcow2 -c "write -P 2 0 100k" -c "write -z 5M 1M" over-r.qcow2 >/dev/null
for s in v2 v3 small big extl2 compressed over-q over-r; do
    raw_of "$s.qcow2" ref.raw
    "$QCOW_TOOL" convert "$s.qcow2" o.qcow2
    expect_same ref.raw o.qcow2 "$s -> qcow2"
    assert_qemu_check o.qcow2
    qemu-img info o.qcow2 | grep -q "^backing file" && die "$s -> qcow2: backing file kept"
    [ "$(allocated_zero_bytes o.qcow2 ref.raw)" = 0 ] || die "$s -> qcow2: zeros allocated"
    "$QCOW_TOOL" convert -c "$s.qcow2" oc.qcow2
    expect_same ref.raw oc.qcow2 "$s -> qcow2 -c"
    assert_qemu_check oc.qcow2
    "$QCOW_TOOL" convert -O raw "$s.qcow2" o.raw
    cmp ref.raw o.raw || die "$s -> raw differs"
    [ "$(stat -c %s o.raw)" = "$(stat -c %s ref.raw)" ] || die "$s -> raw: wrong size"
    [ "$(du -k o.raw | cut -f1)" -lt $(( $(stat -c %s o.raw) / 1024 )) ] ||
        die "$s -> raw: the output is not sparse"
    echo "$s: ok"
done

echo "== -o options"
"$QCOW_TOOL" convert -o cluster_size=4k,refcount_bits=1,lazy_refcounts=off src.raw o1.qcow2
info_is o1.qcow2 cluster-size 4096
info_is o1.qcow2 format-specific.data.refcount-bits 1
info_is o1.qcow2 format-specific.data.lazy-refcounts false
expect_same src.raw o1.qcow2 "-o cluster_size=4k"
"$QCOW_TOOL" convert -c -o compat=0.10,cluster_size=1M src.raw o2.qcow2
info_is o2.qcow2 format-specific.data.compat 0.10
info_is o2.qcow2 cluster-size 1048576
expect_same src.raw o2.qcow2 "-o compat=0.10"
assert_qemu_check o2.qcow2

echo "== bad input"
refuse ()   # refuse WHAT ARGS...: a refusal, and no new.qcow2
{
    local what=$1; shift
    rm -f new.qcow2
    tool_refuses "$what" "$QCOW_TOOL" convert "$@"
    [ ! -e new.qcow2 ] || die "$what: new.qcow2 was left behind"
}
refuse "missing source" nosuch.raw new.qcow2
refuse "compressed raw output" -c -O raw src.raw new.qcow2
refuse "unknown -o option" -o frobnicate=1 src.raw new.qcow2
refuse "bad cluster size" -o cluster_size=3000 src.raw new.qcow2
refuse "zstd with compat 0.10" -c -o compat=0.10,compression_type=zstd src.raw new.qcow2
refuse "bad output format" -O vmdk src.raw new.qcow2
refuse "no such snapshot" -l nosuch v3.qcow2 new.qcow2
refuse "a damaged source" <(printf 'QFI\xfb\0\0\0\3') new.qcow2
cp src.raw same.raw
tool_refuses "onto itself" "$QCOW_TOOL" convert -O raw same.raw same.raw
cmp -s src.raw same.raw || die "converting a file onto itself changed it"
echo "PASS"

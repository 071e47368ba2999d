#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool create / info / resize, judged by qemu-img.
#
#   - create with every option: qemu-img info agrees on version, virtual
#     size, cluster size, refcount bits and lazy refcounts; check is clean;
#   - info --json (and info) on images made by qemu-img and by the tool
#     agrees with qemu-img info --output=json;
#   - resize: growing keeps the data and the new space reads as zeros;
#     shrinking needs --ignore-data-loss (without it the file is not
#     touched), keeps the data before the new end, frees the rest (check
#     clean, no leaks), and a later grow does not bring old data back.

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"

MiB=$((1024 * 1024))

# compare_info IMG: qcow-tool info --json agrees with qemu-img info.
compare_info ()
{
    local img=$1
    "$QCOW_TOOL" info "$img" > "$TMPD/info.txt" || die "qcow-tool info $img failed"
    grep -q "virtual size" "$TMPD/info.txt" || die "qcow-tool info $img: no virtual size"
    "$QCOW_TOOL" info --json "$img" > "$TMPD/tool.json" || die "qcow-tool info --json $img failed"
    qemu-img info -f qcow2 --output=json "$img" > "$TMPD/qemu.json"
    /usr/bin/python3 - "$TMPD/tool.json" "$TMPD/qemu.json" <<'EOF' || die "qcow-tool info $img disagrees with qemu-img info"
import json, sys
tool = json.load(open(sys.argv[1]))
qemu = json.load(open(sys.argv[2]))
spec = qemu["format-specific"]["data"]
pairs = [
    ("virtual-size", tool["virtual-size"], qemu["virtual-size"]),
    ("cluster-size", tool["cluster-size"], qemu["cluster-size"]),
    ("compat", tool["compat"], spec["compat"]),
    ("version", tool["version"], 3 if spec["compat"] == "1.1" else 2),
    ("refcount-bits", tool["refcount-bits"], spec.get("refcount-bits", 16)),
    ("lazy refcounts", "lazy refcounts" in tool["compatible-features"],
     spec.get("lazy-refcounts", False)),
    ("corrupt", tool["corrupt"], spec.get("corrupt", False)),
    ("format", tool["format"], "qcow2"),
]
if "compression-type" in spec:
    # Version 2 images have no compression type field: always zlib.
    pairs.append(("compression-type", tool.get("compression-type", "zlib"),
                  spec["compression-type"]))
bad = ["%s: qcow-tool says %r, qemu-img %r" % p for p in pairs if p[1] != p[2]]
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
}

# expect_info IMG KEY VALUE: one field of qemu-img info --output=json.
expect_info ()
{
    local got
    got=$(qemu_info_field "$1" "$2")
    [ "$got" = "$3" ] || die "$1: qemu-img info $2 is '$got', expected '$3'"
}

# --- create, with each option, judged by qemu-img info and check --------

# tool_create NAME SIZE COMPAT CLUSTER REFBITS LAZY [TOOL-OPTIONS...]
tool_create ()
{
    local name=$1 size=$2 compat=$3 cs=$4 rb=$5 lazy=$6
    shift 6
    local img="$TMPD/$name.qcow2" bytes
    echo "== create $name: $*"
    "$QCOW_TOOL" create "$@" "$img" "$size" || die "qcow-tool create $* $img $size failed"
    assert_qemu_check "$img"
    # Like qemu-img, the size is rounded up to a multiple of 512.
    bytes=$(( ($(numfmt --from=iec "$size") + 511) / 512 * 512 ))
    expect_info "$img" virtual-size $bytes
    expect_info "$img" format-specific.data.compat "$compat"
    expect_info "$img" cluster-size "$cs"
    expect_info "$img" format-specific.data.refcount-bits "$rb"
    [ "$compat" = 0.10 ] || expect_info "$img" format-specific.data.lazy-refcounts "$lazy"
    rm -f "$TMPD/zero.raw"
    truncate -s $bytes "$TMPD/zero.raw"
    qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/zero.raw" ||
        die "$name: a new image does not read as zeros"
    compare_info "$img"
    rm -f "$img"
}

tool_create defaults   100M 1.1  65536   16 true
tool_create v2         64M  0.10 65536   16 false --compat=0.10
tool_create v2-c512    10M  0.10 512     16 false --compat=0.10 --cluster-size=512
tool_create c4k-r64    3G   1.1  4096    64 false --cluster-size=4k --refcount-bits=64 --lazy-refcounts=off
tool_create c2M-r1     1G   1.1  2097152 1  true  --cluster-size=2M --refcount-bits=1
tool_create c512-r8    17M  1.1  512     8  true  --cluster-size=512 --refcount-bits=8 --lazy-refcounts=on
tool_create v3-r2      5M   1.1  65536   2  false --compat=1.1 --refcount-bits=2 --lazy-refcounts=off
tool_create odd-size   1000000 1.1 65536 16 true

# Invalid combinations and existing files are refused.
refuse ()
{
    local status=0
    "$QCOW_TOOL" "$@" 2>"$TMPD/err" || status=$?
    cat "$TMPD/err"
    [ $status -eq 1 ] || die "qcow-tool $*: exit status $status, expected 1"
    [ -s "$TMPD/err" ] || die "qcow-tool $*: failed without a message"
}
refuse create --compat=0.10 --lazy-refcounts=on "$TMPD/x.qcow2" 1M
refuse create --cluster-size=1000 "$TMPD/x.qcow2" 1M
refuse create --refcount-bits=3 "$TMPD/x.qcow2" 1M
[ ! -e "$TMPD/x.qcow2" ] || die "a refused create left a file behind"

img="$TMPD/exists.qcow2"
"$QCOW_TOOL" create "$img" 1M
before=$(sha256_of "$img")
refuse create "$img" 2M
[ "$(sha256_of "$img")" = "$before" ] || die "create without --force changed an existing file"
"$QCOW_TOOL" create --force "$img" 2M
expect_info "$img" virtual-size $((2 * MiB))
assert_qemu_check "$img"

# info on something that is not an image fails, naming the file.
echo "not a qcow2 image" > "$TMPD/text"
refuse info "$TMPD/text"
grep -q "$TMPD/text" "$TMPD/err" || die "qcow-tool info: the error does not name the file"

# --- info on images QEMU made ------------------------------------------

for opts in compat=0.10 compat=0.10,cluster_size=512 \
            compat=1.1,lazy_refcounts=on compat=1.1,refcount_bits=1,cluster_size=2M \
            compat=1.1,refcount_bits=64,cluster_size=4k \
            compat=1.1,compression_type=zstd; do
    echo "== info on qemu-img create -o $opts"
    img="$TMPD/qemu.qcow2"
    rm -f "$img"
    qemu-img create -q -f qcow2 -o "$opts" "$img" 50M
    qemu-io -f qcow2 -c 'write -P 0x11 1M 3M' "$img" >/dev/null
    compare_info "$img"
    expect_info "$img" virtual-size $((50 * MiB))
done

# --- resize --------------------------------------------------------------

# resize_case NAME CREATE-OPTS: grow, refuse to shrink, shrink, grow back.
resize_case ()
{
    local name=$1 opts=$2
    local img="$TMPD/$name.qcow2" raw="$TMPD/$name.raw" before size
    echo "== resize $name: $opts"
    rm -f "$img"
    qemu-img create -q -f qcow2 -o "$opts" "$img" $((8 * MiB))
    qemu-io -f qcow2 -c 'write -P 0x21 0 64k' -c 'write -P 0x22 3000000 1000000' \
        -c "write -P 0x23 $((8 * MiB - 1000)) 1000" "$img" >/dev/null
    raw_of "$img" "$raw"

    # Grow, absolute and relative: data kept, new space reads as zeros.
    "$QCOW_TOOL" resize "$img" 40M || die "$name: resize to 40M failed"
    expect_info "$img" virtual-size $((40 * MiB))
    "$QCOW_TOOL" resize "$img" +1536 || die "$name: resize +1536 failed"
    size=$((40 * MiB + 1536))
    expect_info "$img" virtual-size $size
    assert_qemu_check "$img"
    truncate -s $size "$raw"
    qemu-img compare -q -f qcow2 -F raw "$img" "$raw" || die "$name: growing lost data"
    compare_info "$img"
    # The new space is usable.
    qemu-io -f qcow2 -c "write -P 0x24 $((size - 700)) 700" "$img" >/dev/null
    printf '\x24%.0s' $(seq 700) | dd of="$raw" bs=1 seek=$((size - 700)) conv=notrunc status=none

    # Shrinking without --ignore-data-loss fails and changes nothing.
    before=$(sha256_of "$img")
    refuse resize "$img" 4M
    refuse resize "$img" -1M
    [ "$(sha256_of "$img")" = "$before" ] || die "$name: refused shrink modified the image"

    # Shrink to an unaligned size past part of the 0x22 run.
    size=$((3 * MiB + 512))
    "$QCOW_TOOL" resize --ignore-data-loss "$img" $size || die "$name: shrink failed"
    expect_info "$img" virtual-size $size
    assert_qemu_check "$img"
    truncate -s $size "$raw"
    qemu-img compare -q -f qcow2 -F raw "$img" "$raw" || die "$name: shrinking lost data before the new end"
    compare_info "$img"

    # Grow back: the old data past the shrink point is gone for good.
    "$QCOW_TOOL" resize "$img" 8M || die "$name: grow after shrink failed"
    truncate -s $((8 * MiB)) "$raw"
    qemu-img compare -q -f qcow2 -F raw "$img" "$raw" ||
        die "$name: data past the shrink point came back"
    assert_qemu_check "$img"
    rm -f "$img" "$raw"
}

resize_case v3-c64k compat=1.1
resize_case v3-c512-lazy compat=1.1,cluster_size=512,lazy_refcounts=on
resize_case v2-c4k compat=0.10,cluster_size=4k
resize_case v3-c2M-r1 compat=1.1,cluster_size=2M,refcount_bits=1
# A grow that needs a bigger L1 table (512 byte clusters: 32 KiB per L2).
img="$TMPD/l1.qcow2"
"$QCOW_TOOL" create --cluster-size=512 "$img" 1M
qemu-io -f qcow2 -c 'write -P 0x31 1000 100000' "$img" >/dev/null
raw_of "$img" "$TMPD/l1.raw"
"$QCOW_TOOL" resize "$img" 512M
assert_qemu_check "$img"
qemu-io -f qcow2 -c "write -P 0x32 $((512 * MiB - 70000)) 70000" "$img" >/dev/null
assert_qemu_check "$img"
truncate -s $((512 * MiB)) "$TMPD/l1.raw"
qemu-io -f raw -c "write -P 0x32 $((512 * MiB - 70000)) 70000" "$TMPD/l1.raw" >/dev/null
qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/l1.raw" || die "growing the L1 table lost data"

echo OK

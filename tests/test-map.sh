#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool map against qemu-img map: the same output, byte for byte, in
# both formats (human and json), and the same exit status, on images of
# every kind: data, zero clusters with and without space, unallocated
# ranges, compressed clusters (the human format fails on them, as
# qemu-img's does), subclusters, 512-byte and 2 MiB clusters, version 2,
# metadata preallocation, an image written sparsely by the plugin,
# external data files, and backing chains (qcow2 and raw, 3 deep, names
# relative to other directories, backing files shorter than the overlay);
# and --start-offset / --max-length.  Also: the image locks apply, and bad
# input gets a one-line error.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io nbdkit
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
cd "$TMPD"

io () { qemu-io -f "$1" "${@:3}" "$2" >/dev/null || die "qemu-io $*"; }

qemu-img create -q -f qcow2 plain.qcow2 8M
io qcow2 plain.qcow2 -c "write -P 1 0 1M" -c "write -z 2M 1M" -c "write -P 2 3M 64k" \
   -c "write -P 3 4M 1M" -c "write -z 4M 128k" -c "write -P 4 7M 4k"
qemu-img convert -q -c -O qcow2 plain.qcow2 compressed.qcow2
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 5000000
io qcow2 v2.qcow2 -c "write -P 1 1M 100k" -c "write -z 2M 64k" -c "write -P 9 4999000 1000"
qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 1M
io qcow2 small.qcow2 -c "write -P 7 1000 5000" -c "write -z 10k 2k" -c "write -P 8 600k 512"
qemu-img create -q -f qcow2 -o cluster_size=2M big.qcow2 16M
io qcow2 big.qcow2 -c "write -P 7 1M 5M" -c "write -z 8M 2M"
qemu-img create -q -f qcow2 -o extended_l2=on extl2.qcow2 8M
io qcow2 extl2.qcow2 -c "write -P 1 0 8k" -c "write -z 64k 32k" -c "write -P 2 130k 3k" \
   -c "write -z -u 1M 1M" -c "write -P 3 3M 64k" -c "discard 3M 8k"
qemu-img create -q -f qcow2 -o preallocation=metadata prealloc.qcow2 8M
io qcow2 prealloc.qcow2 -c "write -P 3 1M 64k" -c "write -P 4 2M 4k"
# Written by the plugin: new clusters keep their unwritten part a hole.
"$QCOW_TOOL" create sparse.qcow2 64M
nbdkit -U - "$QCOW_SO" file="$TMPD/sparse.qcow2" --run '
    qemu-io -f raw -c "write -P 1 4k 4k" -c "write -P 2 1M 8k" -c "write -P 3 5M 64k" \
        -c "write -P 4 9M 512" -c "write -z 20M 1M" "$uri" >/dev/null' || die "plugin write"
# External data files (QEMU opens them relative to the current directory).
qemu-img create -q -f qcow2 -o data_file=df.raw,data_file_raw=on df.qcow2 8M
io qcow2 df.qcow2 -c "write -P 3 1M 64k" -c "write -z 3M 64k"
qemu-img create -q -f qcow2 -o data_file=df2.raw df2.qcow2 8M
io qcow2 df2.qcow2 -c "write -P 3 1M 64k" -c "write -z 3M 64k"
# Chains: a 3-deep one across directories, a raw base with holes, an
# overlay larger than its base, subclusters over a base.
mkdir -p sub/deeper
qemu-img create -q -f qcow2 sub/deeper/base.qcow2 4M
io qcow2 sub/deeper/base.qcow2 -c "write -P 4 0 1M" -c "write -z 2M 64k"
qemu-img create -q -f qcow2 -b deeper/base.qcow2 -F qcow2 sub/mid.qcow2 6M
io qcow2 sub/mid.qcow2 -c "write -P 5 512k 1M" -c "write -z 3M 128k"
qemu-img create -q -f qcow2 -b sub/mid.qcow2 -F qcow2 top.qcow2 8M
io qcow2 top.qcow2 -c "write -P 6 3M 64k" -c "write -z 100k 200k" -c "write -P 7 7M 64k"
truncate -s 3M base.raw
io raw base.raw -c "write -P 1 1M 64k" -c "write -P 2 2M 8k"
qemu-img create -q -f qcow2 -b base.raw -F raw over-raw.qcow2 4M
io qcow2 over-raw.qcow2 -c "write -P 5 0 64k" -c "write -z 2M 64k"
qemu-img create -q -f qcow2 -o extended_l2=on -b plain.qcow2 -F qcow2 over-extl2.qcow2 10M
io qcow2 over-extl2.qcow2 -c "write -P 1 0 8k" -c "write -z 64k 32k" -c "write -P 2 130k 3k" \
   -c "discard 2M 1M" -c "write -P 5 9M 8k"
qemu-img create -q -f qcow2 empty.qcow2 0

# with_status CMD...: its stdout, then "exit N".
with_status () { "$@" 2>/dev/null && echo "exit 0" || echo "exit $?"; }

# compare IMAGE [ARGS...]: stdout and exit status, both formats.
agreed=0
compare ()
{
    local img=$1 fmt a b; shift
    for fmt in human json; do
        a=$(with_status qemu-img map -f qcow2 --output=$fmt "$@" "$img")
        b=$(with_status "$QCOW_TOOL" map --output=$fmt "$@" "$img")
        if [ "$a" != "$b" ]; then
            diff <(echo "$a") <(echo "$b") >&2 || :
            die "map $* $img --output=$fmt differs from qemu-img (< qemu-img, > qcow-tool)"
        fi
        agreed=$((agreed + 1))
    done
    echo "$img $*: same"
}

for img in plain compressed v2 small big extl2 prealloc sparse empty top sub/mid \
           sub/deeper/base over-raw over-extl2; do
    compare $img.qcow2
done
compare df.qcow2
compare df2.qcow2
compare top.qcow2 --start-offset=100000 --max-length=3500000
compare over-raw.qcow2 --start-offset=1M
(cd sub && compare ../top.qcow2)
"$QCOW_TOOL" map --json plain.qcow2 | cmp -s - <(qemu-img map --output=json plain.qcow2) ||
    die "--json is not --output=json"

# The locks: a reader is refused while QEMU writes the image; -U forces.
qemu-io -f qcow2 -c "sleep 100000" top.qcow2 &
writer=$!
on_exit "kill $writer 2>/dev/null"
wait_locked top.qcow2 write
status=0
"$QCOW_TOOL" map top.qcow2 >/dev/null 2>err.txt || status=$?
[ $status = 1 ] && grep -q lock err.txt || die "map of an image in use: exit $status: $(cat err.txt)"
"$QCOW_TOOL" map -U --output=json top.qcow2 >/dev/null || die "map -U failed"
kill $writer; wait $writer 2>/dev/null || :

# Bad input.
for args in "nosuch.qcow2" "--output=xml plain.qcow2" "--start-offset=x plain.qcow2" "" "-l nosuch plain.qcow2"; do
    tool_refuses "map $args" "$QCOW_TOOL" map $args
done
echo "agreement: $agreed comparisons with qemu-img map, all identical"

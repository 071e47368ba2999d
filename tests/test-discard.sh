#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool discard: the clusters that read as zeros are unallocated, and
# nothing else changes.  For each image (data clusters holding zeros,
# compressed clusters of zeros, zero clusters that kept their space, a
# subcluster image, a version 3 overlay over a backing file full of data,
# a version 2 overlay, where nothing can be done): qemu-img compare finds
# it unchanged, qemu-img check clean (no leaks), qemu-img check's
# allocated-cluster count drops by exactly the zero clusters, and the
# file's disk usage drops; --compact shrinks the file; errors are one line.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
cd "$TMPD"

io () { qemu-io -f qcow2 "${@:2}" "$1" >/dev/null || die "qemu-io $*"; }
allocated () {
    qemu-img check --output=json "$1" | /usr/bin/python3 -c '
import json, sys; print(json.load(sys.stdin).get("allocated-clusters", 0))'
}

# run_discard IMG EXPECTED-DISCARDED [ARGS...]
run_discard ()
{
    local img=$1 want=$2 before after n; shift 2
    qemu-img convert -O raw "$img" before.raw
    before=$(allocated "$img")
    out=$("$QCOW_TOOL" discard --json "$@" "$img") || die "discard $img failed"
    n=$(echo "$out" | /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["clusters-discarded"])')
    [ "$n" = "$want" ] || die "$img: $n clusters discarded, expected $want ($out)"
    qemu-img compare -q before.raw "$img" || die "$img: contents changed"
    assert_qemu_check "$img"
    after=$(allocated "$img")
    [ $((before - after)) = "$want" ] || die "$img: allocated clusters $before -> $after, expected -$want"
    echo "$img: $out"
}

# 64 KiB clusters: 8 of data, 16 of written zeros, 2 of compressed zeros,
# 3 zero clusters that kept their space.
qemu-img create -q -f qcow2 a.qcow2 16M
io a.qcow2 -c "write -P 1 0 512k" -c "write -P 0 1M 1M" -c "write -P 2 2M 64k" \
   -c "write -c -P 0 3M 64k" -c "write -c -P 0 3200k 64k" \
   -c "write -P 3 4M 192k" -c "write -z 4M 192k"
du_before=$(du -k a.qcow2 | cut -f1)
run_discard a.qcow2 21
du_after=$(du -k a.qcow2 | cut -f1)
(( du_after < du_before - 1000 )) || die "a.qcow2: disk usage $du_before -> $du_after KiB"
run_discard a.qcow2 0                    # again: nothing left to do

# Subclusters: a cluster is discarded only when all of it reads as zeros.
qemu-img create -q -f qcow2 -o extended_l2=on e.qcow2 4M
io e.qcow2 -c "write -P 0 0 64k" -c "write -P 0 64k 8k" -c "write -P 5 72k 2k" -c "write -P 0 1M 4k"
run_discard e.qcow2 2

# Over a backing file full of data: the zero flag keeps it hidden.
qemu-img create -q -f qcow2 base.qcow2 4M
io base.qcow2 -c "write -P 9 0 4M"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 over.qcow2
io over.qcow2 -c "write -P 0 0 256k" -c "write -P 4 1M 64k"
run_discard over.qcow2 4
qemu-io -f qcow2 -r -c "read -P 0 0 256k" -c "read -P 9 512k 64k" over.qcow2 | grep -q Pattern &&
    die "over.qcow2 reads wrong after discard"
# Version 2 over a backing file: no zero flag, nothing discarded.
qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 v2.qcow2
io v2.qcow2 -c "write -P 0 0 256k"
run_discard v2.qcow2 0

# --compact: the file shrinks.
qemu-img create -q -f qcow2 c.qcow2 64M
io c.qcow2 -c "write -P 1 0 1M" -c "write -P 0 1M 40M" -c "write -P 2 41M 1M"
size_before=$(stat -c %s c.qcow2)
run_discard c.qcow2 640 --compact
size_after=$(stat -c %s c.qcow2)
(( size_after < size_before / 4 )) || die "c.qcow2: --compact left $size_after bytes (was $size_before)"

for args in "nosuch.qcow2" "" "--frobnicate a.qcow2"; do
    cp a.qcow2 a.copy
    tool_refuses "discard $args" "$QCOW_TOOL" discard $args
    cmp -s a.qcow2 a.copy || die "discard $args changed a.qcow2"
done

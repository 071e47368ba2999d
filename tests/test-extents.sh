#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-extents.sh - block status against qemu-img map when the metadata
# cache holds L2 slices (cache-size= far below what maps the image, as
# for any image past 256 GiB with the default cache), the path where a
# map reads tables itself (core/map.c); the client side is
# tests/extents-client.py.
#
# A 16 GiB image with 64 KiB clusters is laid out by qemu-io (data,
# compressed data, zero clusters with and without a host cluster,
# discards, in runs across slice and table boundaries).  Each server
# below answers the whole disk walked as nbdinfo --map walks it and
# random requests; every extent must match qemu-img map cluster by
# cluster:
#   - the plugin read-only (a map keeps what it read between requests),
#     with 4 KiB slices and with the default cache (whole tables);
#   - the plugin read-write (each request reads afresh), before and after
#     random writes, zeroes and trims through it, compared with the image
#     as QEMU then finds it (and qemu-img check clean);
#   - the filter over nbdkit's file plugin, read-only, with slices.
#
#   SEED=N    reproduce a run (always printed)

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires /usr/bin/python3 -c 'import nbd'

use_seed

client ()
{
    /usr/bin/python3 "$TESTS_DIR/extents-client.py" "$@" || fail "extents-client.py $1 failed"
}

sock="$TMPD/sock"
img="$TMPD/disk.qcow2"
size=$((16 << 30))
qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" $size
client layout $size --seed "$SEED" > "$TMPD/layout"
qemu-io -f qcow2 "$img" < "$TMPD/layout" > /dev/null || fail "qemu-io failed"
assert_qemu_check "$img"

# serve_and_query NAME NBDKIT-ARGS...: the read-only checks
serve_and_query ()
{
    local name=$1
    shift
    echo "== $name"
    start_server "$sock" "$@"
    client query "$sock" "$TMPD/$name.json" --seed "$SEED"
    stop_server "$sock"
    client compare "$TMPD/$name.json" "$img"
}

serve_and_query ro-slices -r "$QCOW_SO" file="$img" cache-size=64K
serve_and_query ro-tables -r "$QCOW_SO" file="$img"
serve_and_query filter-ro-slices -r --filter="$QCOW_FILTER" file "$img" qcow-cache-size=64K

echo "== read-write, slices, before and after changes"
cp "$img" "$TMPD/rw.qcow2"
start_server "$sock" "$QCOW_SO" file="$TMPD/rw.qcow2" cache-size=64K
client query "$sock" "$TMPD/rw-before.json" --seed "$SEED"
client mutate "$sock" --seed "$SEED"
client query "$sock" "$TMPD/rw-after.json" --seed $((SEED + 1))
stop_server "$sock"
client compare "$TMPD/rw-before.json" "$img"
client compare "$TMPD/rw-after.json" "$TMPD/rw.qcow2"
assert_qemu_check "$TMPD/rw.qcow2"
echo "ok"

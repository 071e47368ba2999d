#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-trim-zero.sh - trim, write-zeroes, block status and free space
# reuse (the client side is tests/space-client.py):
#
#  a) trim gives the space back: after write 32 MiB, trim 16 MiB, flush,
#     st_blocks drops by 16 MiB (64 KiB clusters; by most of it with 512 B
#     clusters, smaller than a file system block), trimmed clusters read
#     zeros and the rest (partial clusters included) keeps its data;
#     discard=false changes neither st_blocks nor the data;
#  b) write-zeroes with every combination of NO_HOLE, FAST_ZERO and FUA,
#     aligned and not, over data and over unallocated clusters, on v3 and
#     v2 images with 512 B and 64 KiB clusters: zeros where asked, the
#     neighbours intact, FAST_ZERO failing (ENOTSUP, nothing changed) only
#     where zeroing means writing, and QEMU sees zero clusters where the
#     zeroing was done by metadata (qemu-img map);
#  c) block status is sound after a seeded random workload of writes,
#     trims and zeroes: nothing reported ZERO holds data, clusters zeroed
#     by metadata are reported ZERO, and nbdinfo --map agrees;
#  d) freed space is reused: write N MiB, trim it, write N MiB elsewhere,
#     and the file stays near N MiB.
# After each part the server is stopped and QEMU checks the image:
# qemu-img check clean, qemu-img compare equal to the client's model.
#
#   SEED=N    reproduce a run (always printed)

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdkit --version
requires nbdinfo --version

use_seed

client ()
{
    /usr/bin/python3 "$TESTS_DIR/space-client.py" "$@" || fail "space-client.py $1 failed"
}

sock="$TMPD/sock"

# verdict IMG MODEL: after the server stopped, QEMU finds IMG clean and
# equal to MODEL.
verdict ()
{
    assert_qemu_check "$1"
    qemu-img compare -q -f qcow2 -F raw "$1" "$2" ||
        fail "qemu-img compare: $1 differs from the model $2"
}

# ---- a) trim --------------------------------------------------------------
for variant in true:65536 true:512 false:65536; do
    discard=${variant%:*} cluster=${variant#*:}
    echo "== trim, discard=$discard, cluster $cluster"
    img="$TMPD/trim-$discard.qcow2"
    start_server "$sock" "$QCOW_SO" file="$img" create=true size=64M \
        cluster-size=$cluster discard=$discard
    extra=()
    [ $discard = false ] && extra=(--no-discard)
    client trim "$sock" "$img" --seed "$SEED" --cluster $cluster \
        --out "$TMPD/model" "${extra[@]}"
    stop_server "$sock"
    verdict "$img" "$TMPD/model"
    rm -f "$img" "$TMPD/model"
done

# ---- b) write-zeroes ------------------------------------------------------
for v in 3 2; do
    for cluster in 65536 512; do
        echo "== write-zeroes, v$v, cluster $cluster"
        img="$TMPD/zero.qcow2"
        [ $v = 3 ] && compat=1.1 || compat=0.10
        qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=$cluster "$img" 16M
        start_server "$sock" "$QCOW_SO" file="$img"
        client zero "$sock" --seed "$SEED" --cluster $cluster --version $v \
            --out "$TMPD/model" --expect "$TMPD/expect.json"
        stop_server "$sock"
        verdict "$img" "$TMPD/model"
        client checkmap "$img" "$TMPD/expect.json"
        rm -f "$img" "$TMPD/model" "$TMPD/expect.json"
    done
done

# ---- c) block status ------------------------------------------------------
# name, cluster, size, how the image is made
status_variant ()
{
    local name=$1 cluster=$2 size=$3 how=$4 img="$TMPD/status.qcow2" extra=()
    echo "== block status: $name"
    case $how in
    plugin) params=(create=true size="$size" cluster-size="$cluster") ;;
    v2) qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=$cluster "$img" $size
        params=(); extra=(--v2) ;;
    v3) qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=$cluster "$img" $size
        params=() ;;
    esac
    start_server "$sock" "$QCOW_SO" file="$img" "${params[@]}"
    client status "$sock" --seed "$SEED" --cluster $cluster --ops 400 \
        --out "$TMPD/model" "${extra[@]}"
    stop_server "$sock"
    verdict "$img" "$TMPD/model"
    rm -f "$img" "$TMPD/model"
}
status_variant plugin-v3-64k 65536 16M plugin
status_variant qemu-v3-4k 4096 8M v3
status_variant qemu-v2-512 512 4M v2

# ---- d) free space reuse --------------------------------------------------
echo "== free space reuse"
img="$TMPD/reuse.qcow2"
start_server "$sock" "$QCOW_SO" file="$img" create=true size=192M
client reuse "$sock" "$img" --seed "$SEED" --mib 64 --out "$TMPD/model"
stop_server "$sock"
verdict "$img" "$TMPD/model"

echo "all parts passed (seed $SEED)"

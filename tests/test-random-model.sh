#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-random-model.sh - a seeded random workload (tests/random-model.py:
# 4 connections, asynchronous reads, writes, FUA writes, flushes, zeroes
# and trims with several in flight, 1 byte to 1 MiB, aligned and not) on
# images made by the plugin (create=true) and by qemu-img (v2 and v3,
# 512 B to 2 MiB clusters, refcount_bits 1 to 64, some with data written
# by qemu-io first).  Every read must match the in-memory model; after a
# clean shutdown `qemu-img check` must be clean, the image must equal the
# model for QEMU (qemu-img compare) and for the plugin reopened.  Two
# variants run with metadata caches much smaller than the image.
#
#   SEED=N                 reproduce a run (the seed is always printed)
#   QCOW_MODEL_SECONDS=S   workload time per variant (default 8)

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdkit --version

use_seed
seconds=${QCOW_MODEL_SECONDS:-8}

# prefill IMG: write a few seeded patterns (and zeroes, on v3) with qemu-io,
# so that the workload starts over clusters QEMU allocated.
prefill ()
{
    local img=$1 size=$2 v3=$3 i off len cmds=()
    for (( i = 0; i < 12; i++ )); do
        len=$(( (RANDOM * 32768 + RANDOM) % (size / 16) + 1 ))
        off=$(( (RANDOM * 32768 + RANDOM) % (size - len) ))
        if [ "$v3" = 1 ] && (( i % 4 == 3 )); then
            # Whole-cluster zeroes become zero clusters in a v3 image.
            cmds+=(-c "write -z $(( off / 512 * 512 )) $(( (len + 511) / 512 * 512 ))")
        else
            cmds+=(-c "write -P $(( RANDOM % 255 + 1 )) $off $len")
        fi
    done
    qemu-io -f qcow2 "${cmds[@]}" "$img" >/dev/null || fail "qemu-io prefill of $img"
}

# variant NAME CLUSTER MIB SOURCE EXTRA: run the workload on a new image of
# MIB MiB.
# SOURCE "plugin": the plugin creates it (EXTRA: more plugin parameters);
# "qemu": qemu-img create -o EXTRA, then prefill.
n=0 passed=0
variant ()
{
    local name=$1 cluster=$2 size=$(( $3 << 20 )) source=$4 extra=$5
    local img="$TMPD/$name.qcow2" model="$TMPD/$name.model" base=() v3=1
    local -a create=()
    n=$((n + 1))
    RANDOM=$((SEED + n))
    echo "== $name (seed $((SEED + n)))"
    case $source in
    plugin)
        read -r -a create <<< "create=true size=$size $extra"
        ;;
    qemu)
        qemu-img create -q -f qcow2 -o "cluster_size=$cluster,$extra" "$img" "$size" ||
            fail "qemu-img create -o $extra"
        [[ $extra == *compat=0.10* ]] && v3=0
        prefill "$img" "$size" "$v3"
        raw_of "$img" "$TMPD/$name.base"
        base=(--base "$TMPD/$name.base")
        ;;
    esac
    local run
    run=$(printf ' %q' /usr/bin/python3 "$TESTS_DIR/random-model.py" \
          --seed $((SEED + n)) --cluster "$cluster" --seconds "$seconds" \
          --out "$model" "${base[@]}")
    nbdkit -U - "$QCOW_SO" file="$img" "${create[@]}" \
        --run "$run \"\$unixsocket\"" || fail "$name: workload failed"

    # The server has shut down cleanly: QEMU's verdict on the image.
    assert_qemu_check "$img"
    qemu-img compare -q -f qcow2 -F raw "$img" "$model" ||
        fail "$name: qemu-img compare: the image differs from the model"
    plugin_raw "$img" "$TMPD/$name.reread" -r
    assert_same "$TMPD/$name.reread" "$model" "$name: image reopened by the plugin and the model"
    rm -f "$img" "$model" "$TMPD/$name".*
    passed=$((passed + 1))
}

variant plugin-64k       65536 48 plugin ""
variant plugin-512-eager   512 16 plugin "cluster-size=512 lazy-refcounts=false"
variant qemu-v2-64k      65536 48 qemu   "compat=0.10"
variant qemu-v3-512-rc1    512 16 qemu   "compat=1.1,refcount_bits=1"
variant qemu-v3-2M-rc64 2097152 64 qemu  "compat=1.1,refcount_bits=64,lazy_refcounts=on"
variant qemu-v3-4k-rc8    4096 32 qemu   "compat=1.1,refcount_bits=8"
# Metadata caches much smaller than the image (cache-size=): L2 entries
# evicted and reused under the lock-free read and overwrite path, as 4 KiB
# slices of 8 KiB tables, and as whole 4 KiB tables; with online
# compaction moving tables and data meanwhile.
variant plugin-8k-slices  8192 128 plugin "cluster-size=8192 cache-size=40K compact-after-unmaps=256K"
variant plugin-4k-tables  4096 64 plugin "cluster-size=4096 cache-size=20K"

# A shell error inside a variant must not go unnoticed.
[ "$passed" = "$n" ] || fail "only $passed of $n variants completed"
echo "all $n variants passed (seed $SEED)"

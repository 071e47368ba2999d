#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-filter-memory.sh - the filter over nbdkit's memory plugin: the
# qcow2 image lives in the plugin's RAM disk, formatted at start-up by
# qcow-create=true, and the seeded multi-connection random workload
# (tests/random-model.py: 4 connections, reads, writes, FUA writes,
# flushes, zeroes and trims in flight at once) must read back exactly
# what the in-memory model holds, up to the final whole-disk comparison.
# Variants: 64 KiB clusters; 512 B clusters with eager refcounts and
# qcow-runtime-asserts=true (the core checks the whole image after every
# flush and fails the flush if anything is inconsistent); and the
# noparallel filter below, so that nbdkit's thread model is not PARALLEL
# and the filter serializes its calls to the plugin (the core's
# background thread calls it too).  The image in the RAM disk is also
# checked by QEMU in tests/test-filter-nbd.sh, where the memory plugin
# sits behind a second nbdkit.
#
#   SEED=N                 reproduce a run (the seed is always printed)
#   QCOW_MODEL_SECONDS=S   workload time per variant (default 6)

. "$(dirname "$0")/functions.sh"
require nbdkit

use_seed
seconds=${QCOW_MODEL_SECONDS:-6}

# variant NAME CLUSTER MEMORY-MIB VIRTUAL-MIB [ARGS...]: serve a new image
# of VIRTUAL-MIB made in a RAM disk of MEMORY-MIB, run the workload.  ARGS
# starting with "-" are nbdkit options (filters below this one), the
# others filter parameters.
n=0 passed=0
variant ()
{
    local name=$1 cluster=$2 mem=$3 size=$4
    shift 4
    local -a opts=() params=()
    _qcow_split_args "$@"
    n=$((n + 1))
    echo "== $name (seed $((SEED + n)))"
    local run
    run=$(printf ' %q' /usr/bin/python3 "$TESTS_DIR/random-model.py" \
          --seed $((SEED + n)) --cluster "$cluster" --seconds "$seconds" \
          --out "$TMPD/$name.model")
    nbdkit -U - --filter="$QCOW_FILTER" "${opts[@]}" memory "${mem}M" \
        qcow-create=true qcow-size="${size}M" qcow-cluster-size="$cluster" "${params[@]}" \
        --run "$run \"\$unixsocket\"" || fail "$name: workload failed"
    # The model is the whole disk the workload saw: all zeros apart from
    # what it wrote (so at least one write landed).
    [ -s "$TMPD/$name.model" ] || fail "$name: no model written"
    cmp -s "$TMPD/$name.model" <(head -c $((size << 20)) /dev/zero) &&
        fail "$name: the workload wrote nothing"
    rm -f "$TMPD/$name.model"
    passed=$((passed + 1))
}

variant memory-64k 65536 96 48
variant memory-512-asserts 512 40 16 qcow-lazy-refcounts=false qcow-runtime-asserts=true
variant memory-noparallel 65536 96 48 --filter=noparallel

[ "$passed" = "$n" ] || fail "only $passed of $n variants completed"
echo "all $n variants passed (seed $SEED)"

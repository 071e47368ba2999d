#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-powerloss.sh - crash safety against a power cut, not only kill -9.
#
# kill -9 keeps everything the server wrote in the host's page cache, so
# it cannot show a missing flush.  Here the image is served through the
# filter over tests/powerloss-filter.so, which logs every write since the
# last flush with what it replaced; after kill -9, tests/powerloss-apply.py
# makes the image what a disk could hold after a power cut at that moment:
# the state of the last completed flush plus a random subset of the later
# writes, torn at 4 KiB (QCOW_VIA=powerloss, power_cut in functions.sh).
# Then the same checks as after kill -9:
#
#  a) tests/test-crash.sh (QCOW_CRASH_ROUNDS, default 6 here): random
#     writes over 4 connections with FUA and flushes; qemu-img check
#     without errors, every write acknowledged as durable present, the
#     image opens read-write again and ends clean and equal to the model;
#  b) tests/test-compact.sh part d (QCOW_COMPACT_ROUNDS, default 4 here):
#     the cut during background compaction under I/O, lazy refcounts off.
#
# Half the rounds of a) cut the power when the N-th flush reaches the
# disk, the moment of greatest risk.  It finds what kill -9 cannot: with
# flushes that never reach the disk, a) and b) fail in their first round;
# without only the fdatasync that orders data and refcounts before the L2
# entries pointing to them, 1 of 68 rounds failed (qemu-img check: L2
# entries pointing at clusters with refcount 0).
#
#   SEED=N    reproduce a run (always printed)

. "$(dirname "$0")/functions.sh"
[ -f "$QCOW_BUILD/tests/powerloss-filter.so" ] ||
    skip "tests/powerloss-filter.so is not built (make unit)"
use_seed

echo "== a) random writes, flushes and FUA"
QCOW_VIA=powerloss QCOW_CRASH_ROUNDS=${QCOW_CRASH_ROUNDS:-6} SEED=$SEED \
    "$TESTS_DIR/test-crash.sh" || fail "test-crash.sh with power cuts failed"

echo "== b) background compaction"
QCOW_VIA=powerloss QCOW_COMPACT_PARTS=d QCOW_COMPACT_ROUNDS=${QCOW_COMPACT_ROUNDS:-4} SEED=$SEED \
    "$TESTS_DIR/test-compact.sh" || fail "test-compact.sh part d with power cuts failed"
echo "ok"

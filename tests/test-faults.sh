#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-faults.sh - fault injection at every I/O step (QCOW_DEBUG_FAULT).
#
# For each kind of I/O (write, sync, read, punch; truncate only happens
# in compaction) and for N = 1, 2, ... until it no longer fires, the Nth
# call fails: the plugin serves a fresh image (512-byte clusters, so that
# L2 tables and the refcount table grow) to a client running a fixed
# scenario of writes, FUA writes, trims, zeroes and flushes; qcow-tool
# compacts an image with holes.  After every fault: the request that hit
# it failed, the server still serves, qemu-img check finds no errors, and
# every write acknowledged before the last successful flush reads back
# after a restart.  Torn (short) writes and persistent faults (a dead
# disk) run over a sparser set of N, and write and sync faults also with
# lazy refcounts.  See tests/faults-client.py for the details.
#
#   QCOW_FAULT_KEEP_GOING=1   report every failure, not just the first
#   QCOW_FAULT_DENSE=N        every N up to this (default 30), then steps

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdkit --version

# Images on a tmpfs when there is one: the sweep runs hundreds of
# scenarios, and fdatasync costs nothing there.
scratch=$(mktemp -d /dev/shm/qcow-faults.XXXXXX 2>/dev/null) || scratch=$TMPD
[ "$scratch" = "$TMPD" ] || on_exit "rm -rf '$scratch'"

# Under valgrind every nbdkit start takes seconds: sweep less densely.
[ "$QCOW_VALGRIND" = 1 ] && : "${QCOW_FAULT_DENSE:=6}"
export QCOW_FAULT_DENSE

client="$TESTS_DIR/faults-client.py"

# Two sweeps at a time, each in its own directory.
sweep ()
{
    local dir=$scratch/$1 s=0
    shift
    mkdir -p "$dir"
    TMPD=$dir /usr/bin/python3 "$client" "$@" || s=$?
    return $s
}

status=0
sweep serve serve write sync read punch write:short write:persistent \
      sync:persistent read:persistent > "$TMPD/serve.out" 2>&1 &
serve_pid=$!
on_exit "kill $serve_pid 2>/dev/null"
sweep compact compact write sync read truncate punch write:short \
      > "$TMPD/other.out" 2>&1 || status=1
QCOW_FAULT_LAZY=1 sweep lazy serve write sync >> "$TMPD/other.out" 2>&1 || status=1
wait "$serve_pid" || status=1
cat "$TMPD/serve.out" "$TMPD/other.out"
[ $status -eq 0 ] || die "fault injection found problems (above)"

#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-filter-nbd.sh - the image on network storage: the filter over
# nbdkit's nbd plugin, forwarding to a second NBD server that stores a
# raw device.  The clients' server formats the device (qcow-create=true)
# and runs the random workload (tests/random-model.py, 4 connections);
# afterwards the device, read directly, is a valid qcow2 image:
#
#  1. the device is a sparse raw file served by `qemu-nbd -f raw` on a
#     Unix socket: qemu-img check on the file is clean and qemu-img
#     compare finds the model; a second qcow-create=true is refused (the
#     device already holds an image) and leaves it unchanged; the filter
#     over nbd reads the model again read-only (qemu-nbd -r below);
#  2. the device is a RAM disk (nbdkit memory plugin, a second nbdkit;
#     the nbd plugin with shared=true this time), copied out with nbdcopy when the workload is over: qemu-img check
#     clean and equal to the model, so what the filter keeps in a RAM disk
#     (tests/test-filter-memory.sh) is a valid image for QEMU too.
#
#   SEED=N                 reproduce a run (the seed is always printed)
#   QCOW_MODEL_SECONDS=S   workload time per variant (default 6)

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-nbd nbdkit nbdcopy

use_seed
seconds=${QCOW_MODEL_SECONDS:-6}
dsock=$TMPD/device.sock

# workload NAME [NBD-PARAMS...]: run the workload through the filter over
# the nbd plugin (device on $dsock), creating a 48 MiB image with 64 KiB
# clusters; the model is $TMPD/NAME.model.
workload ()
{
    local name=$1 run
    shift
    run=$(printf ' %q' /usr/bin/python3 "$TESTS_DIR/random-model.py" \
          --seed "$SEED" --seconds "$seconds" --out "$TMPD/$name.model")
    nbdkit -U - --filter="$QCOW_FILTER" nbd socket="$dsock" "$@" \
        qcow-create=true qcow-size=48M --run "$run \"\$unixsocket\"" ||
        fail "$name: workload failed"
}

# start_qemu_nbd ARGS...: qemu-nbd in the background on $dsock.
start_qemu_nbd ()
{
    local i
    rm -f "$dsock"
    qemu-nbd -f raw --socket="$dsock" --persistent --shared=8 "$@" &
    QEMU_NBD_PID=$!
    on_exit "kill_pid $QEMU_NBD_PID"
    for (( i = 0; i < 300; i++ )); do
        [ -S "$dsock" ] && return 0
        kill -0 "$QEMU_NBD_PID" 2>/dev/null || break
        sleep 0.1
    done
    fail "qemu-nbd did not start: $*"
}

# ---- 1. qemu-nbd, a raw file ---------------------------------------------
echo "== qemu-nbd -f raw"
dev=$TMPD/device.raw
truncate -s 64M "$dev"
start_qemu_nbd --discard=unmap "$dev"
workload qemu-nbd
kill_pid "$QEMU_NBD_PID" || fail "qemu-nbd did not exit"

[ "$(stat -c %s "$dev")" = $((64 << 20)) ] || fail "the device changed size"
assert_qemu_check "$dev"
qemu-img compare -q -f qcow2 -F raw "$dev" "$TMPD/qemu-nbd.model" ||
    fail "qemu-nbd: the image on the device differs from the model"
echo "the device holds a clean qcow2 image equal to the model"

sum=$(sha256_of "$dev")
start_qemu_nbd "$dev"
status=0
nbdkit -s --filter="$QCOW_FILTER" nbd socket="$dsock" qcow-create=true \
    qcow-size=48M </dev/null >/dev/null 2>"$TMPD/err" || status=$?
cat "$TMPD/err"
[ "$status" = 1 ] || fail "qcow-create=true on a device holding an image: exit status $status, want 1"
grep -qi 'already holds a qcow2 image' "$TMPD/err" ||
    fail "qcow-create=true on a device holding an image: no message saying so"
kill_pid "$QEMU_NBD_PID" || fail "qemu-nbd did not exit"
[ "$(sha256_of "$dev")" = "$sum" ] || fail "a refused qcow-create=true modified the device"

start_qemu_nbd -r "$dev"
nbdkit -U - -r --filter="$QCOW_FILTER" nbd socket="$dsock" \
    --run 'nbdcopy "$uri" "$TMPD/reread.raw"' || fail "reading through the filter over nbd failed"
kill_pid "$QEMU_NBD_PID" || fail "qemu-nbd did not exit"
assert_same "$TMPD/reread.raw" "$TMPD/qemu-nbd.model" "the image read back over nbd and the model"
[ "$(sha256_of "$dev")" = "$sum" ] || fail "serving read-only modified the device"
rm -f "$dev" "$TMPD"/*.raw "$TMPD"/*.model

# ---- 2. a second nbdkit, a RAM disk --------------------------------------
echo "== nbdkit memory"
start_server "$dsock" memory 64M
# (shared=true: the nbd plugin opens its one connection in .after_fork.)
workload memory shared=true
nbdcopy "nbd+unix:///?socket=$dsock" "$TMPD/ram.raw" || fail "copying the RAM disk out failed"
stop_server "$dsock"
assert_qemu_check "$TMPD/ram.raw"
qemu-img compare -q -f qcow2 -F raw "$TMPD/ram.raw" "$TMPD/memory.model" ||
    fail "memory: the image in the RAM disk differs from the model"
echo "the RAM disk holds a clean qcow2 image equal to the model"
echo "all passed (seed $SEED)"

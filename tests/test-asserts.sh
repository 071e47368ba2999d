#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-asserts.sh - the plugin's integrity options: check-on-connect=true
# refuses a corrupt image at start-up and serves a leaky one;
# runtime-asserts=true checks the whole image after every flush while a
# random multi-connection workload runs (and the workload still matches
# its model and qemu-img check afterwards).
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdkit --version

make_image () {
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$1" 16M
    qemu-io -f qcow2 -c 'write -q -P 0x11 0 256k' "$1"
}

# check-on-connect: a corruption is refused (exit 1, message, unchanged).
make_image "$TMPD/bad.qcow2"
/usr/bin/python3 "$TESTS_DIR/mkdamaged.py" damage refcount-zero "$TMPD/bad.qcow2" >/dev/null
sum=$(sha256_of "$TMPD/bad.qcow2")
status=0
nbdkit -U - "$QCOW_SO" file="$TMPD/bad.qcow2" check-on-connect=true \
    --run 'exit 0' 2>"$TMPD/err" || status=$?
[ "$status" = 1 ] || die "corrupt image: nbdkit exit $status, expected 1"
grep -q "check-on-connect.*corrupt" "$TMPD/err" || die "no check-on-connect message: $(cat "$TMPD/err")"
[ "$(sha256_of "$TMPD/bad.qcow2")" = "$sum" ] || die "refused image was modified"
# ... while without the option the same image is served.
nbdkit -U - "$QCOW_SO" file="$TMPD/bad.qcow2" -r --run 'exit 0' ||
    die "without check-on-connect the image should be served"

# A leak only: served.
make_image "$TMPD/leak.qcow2"
/usr/bin/python3 "$TESTS_DIR/mkdamaged.py" damage leak-free "$TMPD/leak.qcow2" >/dev/null
nbdkit -U - "$QCOW_SO" file="$TMPD/leak.qcow2" check-on-connect=true -r \
    --run 'exit 0' || die "a leaky image must be served"

# runtime-asserts under a random workload (flushes every few requests).
seed=${QCOW_SEED:-$RANDOM}
echo "seed $seed"
nbdkit -U - "$QCOW_SO" file="$TMPD/ra.qcow2" create=true size=32M \
    cluster-size=512 runtime-asserts=true check-on-connect=true \
    --run "/usr/bin/python3 '$TESTS_DIR/random-model.py' --seed $seed \
           --cluster 512 --seconds 4 --conns 2 --out '$TMPD/ra.model' \$unixsocket" \
    2>"$TMPD/ra.err" || die "workload with runtime-asserts failed (seed $seed): $(tail -5 "$TMPD/ra.err")"
! grep -q "runtime assertion" "$TMPD/ra.err" || die "a runtime assertion fired: $(grep 'runtime assertion' "$TMPD/ra.err")"
assert_qemu_check "$TMPD/ra.qcow2"
qemu-img compare -q -f qcow2 -F raw "$TMPD/ra.qcow2" "$TMPD/ra.model" ||
    die "image differs from the model (seed $seed)"

# And a runtime assertion does fire on a damaged image: damage the file
# behind the server's back, then flush.
make_image "$TMPD/rt.qcow2"
nbdkit -U - "$QCOW_SO" file="$TMPD/rt.qcow2" runtime-asserts=true locking=false \
    --run "/usr/bin/python3 '$TESTS_DIR/mkdamaged.py' damage refcount-zero '$TMPD/rt.qcow2' >/dev/null
           nbdsh -u \"\$uri\" -c 'h.pwrite(b\"x\" * 512, 1 << 20)' -c '
try:
    h.flush()
    raise SystemExit(\"flush succeeded on a damaged image\")
except nbd.Error as e:
    print(\"flush failed as it should:\", e)
'" 2>"$TMPD/rt.err" || die "runtime-asserts did not catch the damage: $(tail -5 "$TMPD/rt.err")"
grep -q "runtime assertion failed" "$TMPD/rt.err" || die "no runtime assertion message"
echo OK

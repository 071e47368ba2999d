#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Crash safety of qcow-tool snapshot -c, -a and -d: kill -9 at every
# moment.  tests/crashpoint.c (preloaded) counts the calls that change
# the file (pwrite, pwritev, fdatasync, fallocate, ftruncate) and kills
# the process with SIGKILL at the Nth, before it takes effect, or (torn)
# after writing only up to the first page boundary inside a larger write.
# For each operation, on two image formats, and for every N:
#   - qemu-img check finds no errors (and no leaks);
#   - qemu-img snapshot -l lists either the snapshots before the operation
#     or those after it;
#   - the active disk reads as before or as after (apply changes it), and
#     every listed snapshot reads as it should (qemu-img convert -l);
#   - qcow-tool can still work on the image (another snapshot -c), after
#     which qemu-img check is clean.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io cc
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
cd "$TMPD"

cc -shared -fPIC -O1 -o crashpoint.so "$TESTS_DIR/crashpoint.c" -ldl ||
    die "cannot build crashpoint.so"
preload=$TMPD/crashpoint.so
# A sanitized qcow-tool has libasan linked in; it must come first.
if [ "$SANITIZE" = 1 ]; then
    preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so) $preload"
    export ASAN_OPTIONS="detect_leaks=0:${ASAN_OPTIONS:-}"
fi

# ids IMG: the snapshots as "ID:NAME" words, in table order.
ids () { qemu-img snapshot -l "$1" | awk 'NR > 2 { printf "%s:%s ", $1, $2 }'; }

total=0
for fmt in "lazy_refcounts=on,cluster_size=65536" "cluster_size=16384,extended_l2=on,refcount_bits=8"; do
    echo "== $fmt"
    rm -f base.raw img.qcow2
    truncate -s 6M base.raw
    qemu-io -f raw -c "write -P 0x77 0 6M" base.raw >/dev/null
    qemu-img create -q -f qcow2 -o "$fmt" -b base.raw -F raw img.qcow2 6M
    qemu-io -f qcow2 -c "write -P 1 0 2M" -c "write -c -P 2 4M 64k" -c "write -z 5M 64k" img.qcow2 >/dev/null
    "$QCOW_TOOL" snapshot -c s1 img.qcow2
    qemu-io -f qcow2 -c "write -P 3 1M 64k" -c "discard 3M 1M" img.qcow2 >/dev/null
    "$QCOW_TOOL" snapshot -c s2 img.qcow2
    qemu-io -f qcow2 -c "write -P 4 0 16k" img.qcow2 >/dev/null
    qemu-img convert -O raw img.qcow2 active.raw
    for s in s1 s2; do qemu-img convert -l snapshot.name=$s -O raw img.qcow2 $s.raw; done
    cp active.raw new.raw               # what the snapshot -c makes

    for op in "-c new" "-a s1" "-d s2"; do
        cp img.qcow2 after.qcow2
        CRASHPOINT=0 CRASHPOINT_COUNT=$TMPD/count LD_PRELOAD="$preload" \
            "$QCOW_TOOL" snapshot $op after.qcow2 || die "snapshot $op failed"
        n=$(cat count)
        before_ids=$(ids img.qcow2) after_ids=$(ids after.qcow2)
        qemu-img convert -O raw after.qcow2 after.raw
        echo "snapshot $op: $n calls; before: $before_ids; after: $after_ids"
        for (( k = 1; k <= n; k++ )); do
            for torn in "" 1; do
                [ -n "$torn" ] && (( k % 2 )) && continue     # torn: every other call
                what="snapshot $op, killed at call $k${torn:+ (torn write)}"
                cp img.qcow2 crash.qcow2
                status=0
                { CRASHPOINT=$k CRASHPOINT_TORN=$torn LD_PRELOAD="$preload" \
                    "$QCOW_TOOL" snapshot $op crash.qcow2; } 2>/dev/null || status=$?
                [ $status = 137 ] || die "$what: exit status $status, not killed"
                out=$(qemu-img check crash.qcow2 2>&1) ||
                    { echo "$out" >&2; die "$what: qemu-img check is not clean"; }
                now=$(ids crash.qcow2)
                [ "$now" = "$before_ids" ] || [ "$now" = "$after_ids" ] ||
                    die "$what: snapshots '$now' are neither the old nor the new list"
                qemu-img compare -q active.raw crash.qcow2 ||
                    qemu-img compare -q after.raw crash.qcow2 ||
                    die "$what: the active disk is neither as before nor as after"
                for w in $now; do
                    name=${w#*:}
                    qemu-img convert -l snapshot.name=$name -O raw crash.qcow2 view.raw
                    cmp -s view.raw $name.raw || die "$what: snapshot $name reads wrong"
                done
                "$QCOW_TOOL" snapshot -c later crash.qcow2 ||
                    die "$what: qcow-tool cannot go on with the image"
                qemu-img check -q crash.qcow2 || die "$what: not clean after going on"
                total=$((total + 1))
            done
        done
    done
done
echo "$total crashes, every one clean and either before or after"

#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# examples/qcow-example.c, built by make check against the in-tree
# libqcow.so (-lqcow, as any program would): it runs create, connect,
# write, read, discard, compact and check and verifies each step itself;
# here it must be linked against lib/libqcow.so.0 and succeed, and
# qemu-img must find the image it leaves behind clean.

. "$(dirname "$0")/functions.sh"
example=$QCOW_BUILD/examples/qcow-example
[ -x "$example" ] || die "$example not found: run make examples"
export LD_LIBRARY_PATH=$QCOW_BUILD/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# (ldd's output in a file: grep -q leaving early would fail the pipe.)
ldd "$example" > "$TMPD/ldd"
grep -q "libqcow\.so\.0 => $QCOW_BUILD/lib/libqcow\.so\.0 " "$TMPD/ldd" ||
    { cat "$TMPD/ldd"; die "the example does not use the in-tree libqcow.so.0"; }

img=$TMPD/example.qcow2
"$example" "$img" || die "qcow-example failed"

if command -v qemu-img >/dev/null 2>&1; then
    qemu-img check -f qcow2 "$img" || die "qemu-img check: the example's image is not clean"
    qemu-img info -f qcow2 "$img" | grep -q "virtual size: 64 MiB" ||
        die "qemu-img info: not a 64 MiB image"
else
    echo "qemu-img is not installed: the image is checked by the example only"
fi

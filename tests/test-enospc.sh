#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-enospc.sh - a real full file system under the image.
#
# A 24 MiB tmpfs holds a 4 MiB filler file and an image with a 64 MiB
# virtual size.  Writes go on until one fails, which must be with ENOSPC;
# the server keeps serving; after shutdown qemu-img check finds no errors
# and everything flushed is intact; with the filler deleted the image
# takes writes again.  Needs root (mount); skipped otherwise.  See
# tests/faults-client.py (enospc).

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdkit --version

mnt=$TMPD/mnt
mkdir "$mnt"
mount -t tmpfs -o size=24m tmpfs "$mnt" 2>/dev/null || skip "cannot mount a tmpfs (not root?)"
on_exit "umount '$mnt'"

dd if=/dev/zero of="$mnt/filler" bs=1M count=4 status=none
/usr/bin/python3 "$TESTS_DIR/faults-client.py" enospc "$mnt" "$mnt/filler" ||
    die "the full file system was not handled correctly (above)"

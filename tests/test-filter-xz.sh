#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-filter-xz.sh - an image shipped compressed as a whole:
# `nbdkit --filter=qcow --filter=xz file disk.qcow2.xz` (and the gzip
# filter likewise).  The xz filter below makes the storage read-only, so
# the filter serves it read-only without -r, and the data must read back
# identical to what QEMU reads from the uncompressed image:
#
#  1. a qemu-made image with plain, compressed (qemu-io write -c) and zero
#     clusters, xz'd with 1 MiB blocks (random access): nbdcopy through
#     the filter equals qemu-img convert -O raw; the export is read-only
#     and a write fails; the .xz file is unchanged;
#  2. an overlay.qcow2.xz whose backing file is named relatively
#     ("base.qcow2", beside it), nbdkit started from another directory:
#     the name resolves against the directory of the file plugin's file=,
#     as QEMU resolves it, and the disk reads as QEMU reads the overlay;
#  3. the same image gzip'd, through --filter=gzip.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io nbdkit nbdcopy nbdsh xz gzip

cd "$TMPD"
mkdir images

# ---- 1. disk.qcow2.xz ------------------------------------------------------
qemu-img create -q -f qcow2 images/disk.qcow2 32M
qemu-io -f qcow2 -c 'write -P 0x11 0 3M' -c 'write -c -P 0x22 4M 64k' \
    -c 'write -c -P 0x23 8M 128k' -c 'write -z 1M 512k' \
    -c 'write -P 0x44 31M 1M' images/disk.qcow2 >/dev/null || die "qemu-io failed"
[ "$(qemu-img check --output=json images/disk.qcow2 |
     /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["compressed-clusters"])')" -gt 0 ] ||
    die "no compressed clusters in disk.qcow2"
raw_of images/disk.qcow2 want.raw
xz -q -T1 --block-size=1MiB -k images/disk.qcow2 || die "xz failed"
sum=$(sha256_of images/disk.qcow2.xz)

nbdkit -U - --filter="$QCOW_FILTER" --filter=xz file images/disk.qcow2.xz \
    --run 'nbdcopy "$uri" got.raw' || die "reading disk.qcow2.xz through the filter failed"
assert_same got.raw want.raw "disk.qcow2.xz through the filter and qemu-img convert"
echo "disk.qcow2.xz reads back identical"

nbdsh -c "
import os
h.connect_command(['nbdkit', '-s', '--exit-with-parent', '--filter=' + os.environ['QCOW_FILTER'],
                   '--filter=xz', 'file', 'images/disk.qcow2.xz'])
assert h.is_read_only(), 'served read-write'
try:
    h.pwrite(b'x' * 512, 0)
except nbd.Error as e:
    print('a write fails:', e)
else:
    raise AssertionError('a write to the image inside an .xz succeeded')
assert h.pread(512, 0) == b'\x11' * 512
" || die "disk.qcow2.xz is not served read-only"
[ "$(sha256_of images/disk.qcow2.xz)" = "$sum" ] || die "disk.qcow2.xz changed"
rm -f got.raw

# ---- 2. an overlay with a relative backing file name -------------------------
# (qemu-img -u does not open the backing file, so the relative name is
# stored as given.)
(cd images && qemu-img create -q -f qcow2 -u -b disk.qcow2 -F qcow2 overlay.qcow2 32M &&
    qemu-io -f qcow2 -c 'write -P 0x55 2M 2M' -c 'write -z 31M 256k' overlay.qcow2 >/dev/null) ||
    die "making overlay.qcow2 failed"
raw_of images/overlay.qcow2 want-overlay.raw
xz -q -T1 --block-size=1MiB images/overlay.qcow2 || die "xz failed"
mkdir elsewhere
(cd elsewhere && nbdkit -U - --filter="$QCOW_FILTER" --filter=xz file ../images/overlay.qcow2.xz \
    --run 'nbdcopy "$uri" ../got-overlay.raw') ||
    die "reading overlay.qcow2.xz (backing file disk.qcow2 beside it) from another directory failed"
assert_same got-overlay.raw want-overlay.raw "overlay.qcow2.xz through the filter and qemu-img convert"
echo "overlay.qcow2.xz, backing file named relatively, reads back identical from another directory"

# ---- 3. gzip --------------------------------------------------------------
gzip -c images/disk.qcow2 > images/disk.qcow2.gz
nbdkit -U - --filter="$QCOW_FILTER" --filter=gzip file images/disk.qcow2.gz \
    --run 'nbdcopy "$uri" got.raw' || die "reading disk.qcow2.gz through the filter failed"
assert_same got.raw want.raw "disk.qcow2.gz through the filter and qemu-img convert"
echo "disk.qcow2.gz reads back identical"

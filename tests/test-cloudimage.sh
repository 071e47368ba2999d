#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-cloudimage.sh - a cloud image as they are shipped: a GPT disk with
# an ext4 partition, converted by `qemu-img convert -c` to a compressed
# qcow2, served by the plugin and used by a Linux guest (libguestfs).
#
#  1. The disk is built without an appliance (mkfs.ext4 -d fills the file
#     system from a directory; sfdisk writes the GPT): /etc/services, a
#     compressible text file and 6 MiB of random data.
#  2. The plugin serves cloud.qcow2 read-write; in the guest the three
#     files have the sha256 they had on the host; a new file is written
#     (into compressed clusters: decompress, merge, reallocate) and read
#     back.  Then qemu-img check is clean, fewer clusters are compressed
#     (the guest's metadata writes landed in compressed clusters) and QEMU
#     reads the same disk as the plugin (qemu-img compare over NBD).
#  3. overlay.qcow2 (backing file cloud.qcow2) is served read-write and
#     cloud.qcow2 read-only, by two plugin instances at once; the guest
#     finds the new file on cloud.qcow2, and everything on the overlay,
#     where it writes one more file.
#  4. QEMU itself (guestfish on overlay.qcow2, format qcow2) finds every
#     file intact; cloud.qcow2 is byte-for-byte unchanged since step 2;
#     qemu-img check is clean on both.
#
# Three appliance launches under TCG (LIBGUESTFS_BACKEND_SETTINGS
# =force_tcg), 10-20 s each.

. "$(dirname "$0")/functions.sh"
export PATH=$PATH:/usr/sbin:/sbin
requires guestfish --version
requires qemu-img --version
requires nbdkit --version
requires mkfs.ext4 -V
requires sfdisk --version

export LIBGUESTFS_BACKEND_SETTINGS=force_tcg

cd "$TMPD"
M=$((1024 * 1024))
sock_cloud="$TMPD/cloud.sock"
sock_overlay="$TMPD/overlay.sock"

# ---- 1. the disk -----------------------------------------------------------
mkdir -p tree/etc tree/data
cp /etc/services tree/etc/services
seq 1 300000 > tree/data/numbers.txt
head -c $((6 * M)) /dev/urandom > tree/data/random.bin
head -c $((3 * M)) /dev/urandom > new.bin
head -c $((2 * M + 12345)) /dev/urandom > overlay.bin
files=(/etc/services /data/numbers.txt /data/random.bin)

mkfs.ext4 -q -F -L cloudimg -d tree fs.img 200M >/dev/null || die "mkfs.ext4 failed"
truncate -s 256M disk.raw
printf 'label: gpt\nstart=2048, size=%d, type=L\n' $((200 * M / 512)) |
    sfdisk -q disk.raw || die "sfdisk failed"
dd if=fs.img of=disk.raw bs=1M seek=1 conv=notrunc status=none
rm fs.img
qemu-img convert -c -f raw -O qcow2 disk.raw cloud.qcow2 || die "qemu-img convert -c failed"
rm disk.raw
# compressed_clusters IMG: how many clusters of IMG are compressed.
compressed_clusters ()
{
    qemu-img check --output=json "$1" |
        /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["compressed-clusters"])'
}
compressed=$(compressed_clusters cloud.qcow2)
echo "cloud.qcow2: $(stat -c %s cloud.qcow2) bytes, $compressed compressed clusters"
[ "$compressed" -gt 0 ] || die "qemu-img convert -c compressed nothing"

# guest SCRIPT DRIVE...: run guestfish with these drives (each an "add"
# line) and SCRIPT; its output is the result.
guest ()
{
    local script=$1 d
    shift
    {
        for d in "$@"; do
            echo "add $d"
        done
        echo run
        echo "$script"
    } | guestfish --no-progress-bars
}

# sums FILE...: guestfish commands printing each file's sha256.
sums ()
{
    local f
    for f in "$@"; do
        echo "checksum sha256 $f"
    done
}

# expect_sums OUTPUT HOST-FILE...: OUTPUT (lines of sha256) must match
# the hashes of the host files, in order.
expect_sums ()
{
    local out=$1 i=0 f want got
    shift
    for f in "$@"; do
        i=$((i + 1))
        want=$(sha256_of "$f")
        got=$(sed -n "${i}p" <<< "$out")
        [ "$got" = "$want" ] || die "the guest reads ${f#tree} with sha256 '$got', expected $want"
    done
}

# qemu_agrees IMG: QEMU reads IMG exactly as the plugin serves it.
qemu_agrees ()
{
    QCOW_IMG=$1 nbdkit -U - -r "$QCOW_SO" file="$1" \
        --run 'qemu-img compare -q -f raw -F qcow2 "$uri" "$QCOW_IMG"' ||
        die "QEMU and the plugin read $1 differently"
}

host_files=("${files[@]/#/tree}")

# ---- 2. the compressed image, read-write -----------------------------------
start_server "$sock_cloud" "$QCOW_SO" file="$TMPD/cloud.qcow2"
out=$(guest "mount /dev/sda1 /
$(sums "${files[@]}")
upload $TMPD/new.bin /new.bin
sync
drop-caches 3
$(sums /new.bin)
umount /" "\"\" protocol:nbd server:unix:$sock_cloud format:raw") ||
    die "guestfish on cloud.qcow2 failed"
stop_server "$sock_cloud"
expect_sums "$out" "${host_files[@]}" new.bin
echo "the guest read ${#files[@]} files from the compressed image, wrote and read back /new.bin"
assert_qemu_check cloud.qcow2
qemu_agrees cloud.qcow2
left=$(compressed_clusters cloud.qcow2)
echo "$((compressed - left)) compressed clusters were rewritten"
[ "$left" -lt "$compressed" ] || die "the guest's writes rewrote no compressed cluster"
cloud_sum=$(sha256_of cloud.qcow2)

# ---- 3. an overlay, and the base read-only at the same time ----------------
qemu-img create -q -f qcow2 -b cloud.qcow2 -F qcow2 overlay.qcow2 ||
    die "qemu-img create overlay.qcow2 failed"
start_server "$sock_cloud" -r "$QCOW_SO" file="$TMPD/cloud.qcow2"
start_server "$sock_overlay" "$QCOW_SO" file="$TMPD/overlay.qcow2"
out=$(guest "mount-ro /dev/sda1 /
$(sums /new.bin)
umount /
mount /dev/sdb1 /
$(sums "${files[@]}" /new.bin)
upload $TMPD/overlay.bin /overlay.bin
rm /data/numbers.txt
sync
drop-caches 3
$(sums /overlay.bin)
umount /" "\"\" protocol:nbd server:unix:$sock_cloud format:raw readonly:true" \
          "\"\" protocol:nbd server:unix:$sock_overlay format:raw") ||
    die "guestfish on cloud.qcow2 and overlay.qcow2 failed"
stop_server "$sock_overlay"
stop_server "$sock_cloud"
expect_sums "$out" new.bin "${host_files[@]}" new.bin overlay.bin
echo "the guest found /new.bin on cloud.qcow2 served again, and every file on the overlay, where it wrote /overlay.bin"
[ "$(sha256_of cloud.qcow2)" = "$cloud_sum" ] || die "cloud.qcow2 changed under the overlay"
assert_qemu_check overlay.qcow2
assert_qemu_check cloud.qcow2
qemu_agrees overlay.qcow2

# ---- 4. QEMU reads the overlay ---------------------------------------------
out=$(guest "mount-ro /dev/sda1 /
$(sums /etc/services /data/random.bin /new.bin /overlay.bin)
exists /data/numbers.txt" "$TMPD/overlay.qcow2 format:qcow2 readonly:true") ||
    die "guestfish (QEMU) on overlay.qcow2 failed"
expect_sums "$out" tree/etc/services tree/data/random.bin new.bin overlay.bin
[ "$(sed -n 5p <<< "$out")" = false ] || die "/data/numbers.txt, deleted in the overlay, is back"
echo "QEMU finds every file intact in overlay.qcow2"
[ "$(sha256_of cloud.qcow2)" = "$cloud_sum" ] || die "cloud.qcow2 changed"

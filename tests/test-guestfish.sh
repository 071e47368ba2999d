#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-guestfish.sh - a real guest file system on the plugin, through
# libguestfs (QEMU's NBD client, the Linux kernel, ext4):
#
#  1. the plugin creates a 512 MiB image; guestfish makes an ext4 file
#     system on it, uploads files of random data and checks them
#     (sha256 inside the guest); after sync the image holds the data;
#     the files but one are deleted, fstrim, sync: the image file's
#     st_blocks must shrink by most of the deleted data;
#  2. offline, `qcow-tool compact` must shrink the file; qemu-img check
#     clean, and the guest contents unchanged (qemu-img compare);
#  3. served again (read-only), guestfish finds the kept file intact and
#     the deleted ones gone.
#
# Two appliance launches; they run under TCG (LIBGUESTFS_BACKEND_SETTINGS
# =force_tcg), so each takes 10-30 s.

. "$(dirname "$0")/functions.sh"
requires guestfish --version
requires qemu-img --version
requires nbdkit --version

export LIBGUESTFS_BACKEND_SETTINGS=force_tcg

img="$TMPD/fs.qcow2"
sock="$TMPD/sock"
mib=1048576

# The files: four to delete (64 MiB in all) and one to keep.
names=(del1 del2 del3 del4 keep)
sizes=(16 16 24 8 12)
deleted=0
for i in "${!names[@]}"; do
    head -c $(( sizes[i] * mib )) /dev/urandom > "$TMPD/${names[i]}"
    [ "${names[i]}" = keep ] || deleted=$(( deleted + sizes[i] * mib ))
done

# gfish SCRIPT [ADD-OPTIONS]: run guestfish on the NBD server at $sock;
# the drive is added with ADD-OPTIONS (default: discards passed through).
gfish ()
{
    guestfish --no-progress-bars <<EOF
add "" protocol:nbd server:unix:$sock format:raw ${2:-discard:enable}
run
$1
EOF
}

blocks ()
{
    stat -c %b "$img"
}

# ---- 1. write, delete, fstrim ---------------------------------------------
start_server "$sock" "$QCOW_SO" file="$img" create=true size=512M
script="mkfs ext4 /dev/sda
mount /dev/sda /"
for n in "${names[@]}"; do
    script+="
upload $TMPD/$n /$n"
done
script+="
sync
! stat -c %b $img > $TMPD/blocks.full"
for n in "${names[@]}"; do
    script+="
checksum sha256 /$n"
done
for n in "${names[@]}"; do
    [ "$n" = keep ] || script+="
rm /$n"
done
script+="
fstrim /
sync
umount /
sync"
gfish "$script" > "$TMPD/sums.guest" || die "guestfish (write, delete, fstrim) failed"
stop_server "$sock"

for i in "${!names[@]}"; do
    want=$(sha256_of "$TMPD/${names[i]}")
    got=$(sed -n "$((i + 1))p" "$TMPD/sums.guest")
    [ "$got" = "$want" ] || die "guest sha256 of /${names[i]} is '$got', expected $want"
done
echo "the guest read back all ${#names[@]} files intact"

full=$(cat "$TMPD/blocks.full")
trimmed=$(blocks)
echo "image st_blocks: $(( full * 512 / mib )) MiB with all files, $(( trimmed * 512 / mib )) MiB after deleting $(( deleted / mib )) MiB and fstrim"
(( full * 512 >= (deleted + 12 * mib) )) || die "the image holds only $((full * 512)) bytes after uploading"
(( (full - trimmed) * 512 >= deleted * 3 / 4 )) ||
    die "fstrim gave back only $(( (full - trimmed) * 512 )) of the $deleted bytes deleted"
assert_qemu_check "$img"

# ---- 2. compact -----------------------------------------------------------
raw_of "$img" "$TMPD/before.raw"
before=$(stat -c %s "$img")
"$QCOW_TOOL" compact "$img" || die "qcow-tool compact failed"
after=$(stat -c %s "$img")
echo "qcow-tool compact: file $before -> $after bytes"
(( after < before )) || die "qcow-tool compact did not shrink the file ($before -> $after)"
(( after <= full * 512 - deleted / 2 )) ||
    die "after compaction the file is $after bytes, more than the data left in it"
assert_qemu_check "$img"
qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/before.raw" ||
    die "qcow-tool compact changed the guest contents"
rm -f "$TMPD/before.raw"

# ---- 3. the file system again ---------------------------------------------
sum=$(sha256_of "$img")
start_server "$sock" "$QCOW_SO" file="$img" -r
gfish "mount-ro /dev/sda /
checksum sha256 /keep
ls /" readonly:true > "$TMPD/after.guest" || die "guestfish (verify) failed"
stop_server "$sock"
[ "$(sha256_of "$img")" = "$sum" ] || die "serving with -r modified the image"
[ "$(head -n1 "$TMPD/after.guest")" = "$(sha256_of "$TMPD/keep")" ] ||
    die "after compaction /keep reads differently in the guest"
listing=$(tail -n +2 "$TMPD/after.guest" | tr '\n' ' ')
[ "$listing" = "keep lost+found " ] || die "unexpected files in the guest: $listing"
echo "after compaction the guest finds /keep intact and nothing else"

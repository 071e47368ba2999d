#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# nbdkit -r never modifies the image, whatever state it is in, and
# refuses every write-type request.
#
#   - a clean image: reads match qemu-img, writes/zeroes/trims fail with
#     EPERM (or EROFS), the file's SHA-256 is unchanged;
#   - a dirty lazy-refcounts image (qemu-io killed after writing): read
#     as QEMU reads it, and not repaired by a read-only open; a
#     read-write open then repairs it before writing;
#   - an unknown autoclear feature bit: kept by -r, cleared by the first
#     write of a read-write open (qcow2.txt: a program may only write to
#     an image with unknown autoclear bits after clearing them);
#   - a file without write permission, served with -r.

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdcopy --version
requires nbdsh --version

MiB=$((1024 * 1024))

# assert_readonly_serves IMG: with -r the plugin reads IMG as QEMU does,
# refuses writes, and leaves the file exactly as it was.
assert_readonly_serves ()
{
    local img=$1 before
    before=$(sha256_of "$img")
    # qemu-img reads a copy, so only the plugin touches IMG.
    cp "$img" "$TMPD/copy.qcow2"
    raw_of "$TMPD/copy.qcow2" "$TMPD/qemu.raw"
    plugin_raw "$img" "$TMPD/plugin.raw" -r
    assert_same "$TMPD/qemu.raw" "$TMPD/plugin.raw" "$img: plugin -r and qemu-img"

    nbdsh_plugin "$img" -r -- -c '
import errno
assert h.is_read_only(), "the export is not read-only"
# Send the requests even though the server said it is read-only, so the
# server (not libnbd) has to refuse them.
h.set_strict_mode(0)
size = h.get_size()
for name, call in [("pwrite", lambda: h.pwrite(b"x" * 4096, 0)),
                   ("pwrite unaligned", lambda: h.pwrite(b"y", size - 1)),
                   ("pwrite FUA", lambda: h.pwrite(b"z" * 512, 512, nbd.CMD_FLAG_FUA)),
                   ("zero", lambda: h.zero(65536, 0)),
                   ("trim", lambda: h.trim(65536, 0))]:
    try:
        call()
    except nbd.Error as e:
        # libnbd gives the errno as a name ("EPERM"), older ones a number.
        assert e.errno in ("EPERM", "EROFS", errno.EPERM, errno.EROFS), \
            "%s failed with errno %s, expected EPERM or EROFS" % (name, e.errno)
    else:
        raise SystemExit("%s succeeded on a read-only export" % name)
h.flush()
' || die "$img: write requests on a read-only export"

    [ "$(sha256_of "$img")" = "$before" ] || die "$img: modified by nbdkit -r"
}

# A clean v3 image with data, zeroes and a discard.
img="$TMPD/clean.qcow2"
qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=64k "$img" $((16 * MiB))
qemu-io -f qcow2 -c 'write -P 0xa1 0 1M' -c 'write -P 0xa2 1234567 76543' \
    -c 'write -z 512k 128k' -c 'discard 768k 128k' -c "write -P 0xa3 $((16 * MiB - 3)) 3" \
    "$img" >/dev/null
assert_readonly_serves "$img"
assert_qemu_check "$img"

# A dirty lazy-refcounts image: qemu-io is killed with writes done but
# the refcounts never written.
img="$TMPD/dirty.qcow2"
qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" $((16 * MiB))
status=$(sh -c 'qemu-io "$@" >/dev/null 2>&1; echo $?' sh -f qcow2 \
    -c 'write -P 0xb1 0 1M' -c flush -c 'write -P 0xb2 4M 300k' -c 'sigraise 9' "$img")
[ "$status" -eq 137 ] || die "qemu-io was not killed (status $status)"
[ $(( $(header_get "$img" 72 8) & 1 )) -eq 1 ] || die "could not make a dirty image"
assert_readonly_serves "$img"
[ $(( $(header_get "$img" 72 8) & 1 )) -eq 1 ] || die "-r cleared the dirty bit"

# Read-write, the plugin repairs the refcounts before it writes.
raw_of "$TMPD/copy.qcow2" "$TMPD/expect.raw"
printf 'after repair' | dd of="$TMPD/expect.raw" bs=1 seek=$((8 * MiB)) conv=notrunc status=none
nbdsh_plugin "$img" -- -c 'h.pwrite(b"after repair", 8 << 20)' ||
    die "writing to a dirty image failed"
assert_qemu_check "$img"
[ $(( $(header_get "$img" 72 8) & 1 )) -eq 0 ] || die "the dirty bit is still set after a clean close"
qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/expect.raw" ||
    die "a dirty image written read-write lost data"

# An unknown autoclear bit (bit 40): -r keeps it, a write clears it.
img="$TMPD/autoclear.qcow2"
qemu-img create -q -f qcow2 "$img" $((16 * MiB))
qemu-io -f qcow2 -c 'write -P 0xc1 64k 64k' "$img" >/dev/null
header_set "$img" 88 8 $(( $(header_get "$img" 88 8) | (1 << 40) ))
assert_readonly_serves "$img"
[ $(( $(header_get "$img" 88 8) >> 40 & 1 )) -eq 1 ] || die "-r cleared an autoclear bit"
nbdsh_plugin "$img" -- -c 'h.pwrite(b"\xc2" * 512, 0)' || die "writing to $img failed"
[ $(( $(header_get "$img" 88 8) >> 40 & 1 )) -eq 0 ] ||
    die "a write left the unknown autoclear bit set"
assert_qemu_check "$img"
qemu_expect "$img" 0xc2 0 512
qemu_expect "$img" 0 512 65024
qemu_expect "$img" 0xc1 64k 64k

# A file without write permission.  With -r it is served (opened
# read-only).  Without -r, a user who cannot write must get either a
# start-up failure or a read-only export; root can write anyway, so that
# half only runs as another user.
img="$TMPD/clean.qcow2"
chmod 444 "$img"
assert_readonly_serves "$img"
if [ "$(id -u)" -ne 0 ]; then
    before=$(sha256_of "$img")
    nbdsh_plugin "$img" -- -c '
try:
    h.pwrite(b"x", 0)
except nbd.Error:
    pass
else:
    raise SystemExit("a write to a file without write permission succeeded")
' 2>&1 || true
    [ "$(sha256_of "$img")" = "$before" ] || die "a file without write permission was modified"
else
    echo "running as root: not testing a read-write open of a read-only file"
fi
chmod 644 "$img"

echo OK

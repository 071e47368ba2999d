#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool snapshot on bad input: a one-line error naming the file,
# exit status 1, and the file unchanged (byte for byte).
#   - user errors: no such snapshot, a name taken (as a name or an ID), a
#     name too long or empty, two operations at once, no operation;
#   - images that cannot have (more) snapshots: 1-bit refcounts, an
#     external data file, a read-only file, an image in use (QEMU's locks);
#   - hostile snapshot tables: the table beyond the end of the file, an
#     entry cut short by the end of the file, an ID or name longer than
#     what is left of the entry, too much extra data, too many snapshots,
#     a snapshot L1 table outside the file, a snapshot L1 entry pointing
#     outside the file (found when a snapshot is applied or created; the
#     damaged snapshot can be deleted, leaving a clean image); the plugin
#     refuses such images and such snapshots too.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io nbdkit
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
cd "$TMPD"

# refuse WHAT IMG ARGS...: qcow-tool snapshot ARGS fails cleanly.
refuse ()
{
    local what=$1 img=$2; shift 2
    cp "$img" before.copy
    tool_refuses "$what" "$QCOW_TOOL" snapshot "$@"
    cmp -s "$img" before.copy || die "$what: $img was changed"
}

qemu-img create -q -f qcow2 good.qcow2 16M
qemu-io -f qcow2 -c "write -P 1 0 1M" good.qcow2 >/dev/null
"$QCOW_TOOL" snapshot -c first good.qcow2
qemu-img snapshot -c second good.qcow2

refuse "no such snapshot (-a)" good.qcow2 -a nosuch good.qcow2
refuse "no such snapshot (-d)" good.qcow2 -d nosuch good.qcow2
refuse "a name that is taken" good.qcow2 -c first good.qcow2
refuse "a name that is an ID" good.qcow2 -c 2 good.qcow2
refuse "a name of 256 bytes" good.qcow2 -c "$(printf 'x%.0s' {1..256})" good.qcow2
refuse "an empty name" good.qcow2 -c "" good.qcow2
refuse "two operations" good.qcow2 -c a -d first good.qcow2
refuse "no operation" good.qcow2 good.qcow2
refuse "--json without -l" good.qcow2 -c x --json good.qcow2
"$QCOW_TOOL" snapshot -c "$(printf 'y%.0s' {1..255})" good.qcow2 ||
    die "a name of 255 bytes was refused"
qemu-img snapshot -d "$(printf 'y%.0s' {1..255})" good.qcow2

qemu-img create -q -f qcow2 -o refcount_bits=1 rc1.qcow2 16M
qemu-io -f qcow2 -c "write -P 1 0 1M" rc1.qcow2 >/dev/null
refuse "1-bit refcounts" rc1.qcow2 -c s rc1.qcow2
qemu-img create -q -f qcow2 -o data_file=data.raw df.qcow2 16M
refuse "an external data file" df.qcow2 -c s df.qcow2
cp good.qcow2 ro.qcow2
chmod 444 ro.qcow2
if ! [ -w ro.qcow2 ]; then                 # (root can write anyway)
    refuse "a read-only file" ro.qcow2 -c s ro.qcow2
fi
qemu-io -f qcow2 -c "sleep 100000" good.qcow2 &
holder=$!
on_exit "kill $holder 2>/dev/null"
wait_locked good.qcow2 write
refuse "the image in use (-c)" good.qcow2 -c s good.qcow2
refuse "the image in use (-l)" good.qcow2 -l good.qcow2
"$QCOW_TOOL" snapshot -l -U good.qcow2 | grep -q first || die "snapshot -l -U failed"
kill $holder; wait $holder 2>/dev/null || :

# Hostile tables, made from good.qcow2 (tests/mkhostile.py's way: patch
# the header or the table, or put a table at the end of the file).
hostile ()   # hostile NAME PYTHON-BODY: f (the file, r+b), cs, tab, n, size
{
    cp good.qcow2 "$1.qcow2"
    /usr/bin/python3 - "$1.qcow2" "$2" <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
hdr = f.read(104)
cs = 1 << struct.unpack(">I", hdr[20:24])[0]
n, tab = struct.unpack(">IQ", hdr[60:72])
f.seek(0, 2)
size = f.tell()
f.seek(tab)
table = f.read(4096)
def at_end(data, keep):
    """Put DATA (a table) in a new cluster at the end, keep KEEP bytes."""
    off = (size + cs - 1) // cs * cs
    f.seek(off); f.write(data[:keep]); f.truncate(off + keep)
    f.seek(64); f.write(struct.pack(">Q", off))
exec(sys.argv[2])
EOF
}
hostile beyond 'f.seek(64); f.write(struct.pack(">Q", (size // cs + 4) * cs))'
hostile cut 'at_end(table, 30)'
hostile longname 'd = bytearray(table); d[14:16] = b"\xff\xff"; at_end(bytes(d), len(table))'
hostile longid 'd = bytearray(table); d[12:14] = b"\x10\x00"; at_end(bytes(d), 100)'
hostile extra 'f.seek(tab + 36); f.write(struct.pack(">I", 5000))'
hostile many 'f.seek(60); f.write(struct.pack(">I", 70000))'
hostile l1out 'f.seek(tab); f.write(struct.pack(">Q", (size // cs + 8) * cs))'
hostile l1entry 'l1 = struct.unpack(">Q", table[0:8])[0]; f.seek(l1); f.write(struct.pack(">Q", 0x80000000 | (size // cs + 8) * cs))'
for h in beyond cut longname longid extra many l1out; do
    refuse "hostile: $h (-l)" $h.qcow2 -l $h.qcow2
    refuse "hostile: $h (-c)" $h.qcow2 -c new $h.qcow2
    status=0
    nbdkit -U - "$QCOW_SO" file="$TMPD/$h.qcow2" --run true 2>err.txt || status=$?
    [ $status = 1 ] && grep -q "$h.qcow2" err.txt || die "hostile $h: the plugin did not refuse it"
done
refuse "hostile: l1entry (-a)" l1entry.qcow2 -a first l1entry.qcow2
refuse "hostile: l1entry (-c)" l1entry.qcow2 -c new l1entry.qcow2
status=0
nbdkit -U - "$QCOW_SO" file="$TMPD/l1entry.qcow2" snapshot=first --run true 2>err.txt || status=$?
[ $status = 1 ] && grep -q "snapshot" err.txt || die "l1entry: the plugin served the snapshot"
nbdkit -U - "$QCOW_SO" file="$TMPD/good.qcow2" snapshot=nosuch --run true 2>err.txt && die "snapshot=nosuch was served"
grep -q "no snapshot 'nosuch'" err.txt || die "snapshot=nosuch: $(cat err.txt)"
# Deleting the damaged snapshot needs nothing of its tables: it works, and
# leaves a clean image (QEMU finds the damage before, not after).
qemu-img check -q l1entry.qcow2 2>/dev/null && die "l1entry.qcow2 is not damaged"
"$QCOW_TOOL" snapshot -d first l1entry.qcow2 || die "deleting the damaged snapshot failed"
assert_qemu_check l1entry.qcow2
echo PASS

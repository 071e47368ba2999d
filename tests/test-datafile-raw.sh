#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-datafile-raw.sh - an image with a raw external data file
# (data_file_raw=on, autoclear bit 1) keeps the data file a valid raw
# image of the guest's view through write-zeroes and trim.
#
# QEMU creates the image (every cluster mapped, as it does for a raw data
# file) and fills it; then, on a fresh copy each, a scenario of zeroes
# (with and without may-trim, i.e. NBD_CMD_FLAG_NO_HOLE), trims and
# writes over partial and whole clusters, guest cluster 0 (host offset 0
# in the data file) included, with 64 KiB and 4 KiB clusters.  After
# every request, before any flush (QEMU too zeroes or discards the data
# file within the request), the data file read directly equals what the
# plugin reads, and both equal the model (zeroed bytes zero, trimmed
# bytes zero or as before, the rest as before).  After the server stopped,
# the data file equals qemu-img convert of the image, and qemu-img check
# is clean.  A zero whose write of the data file fails (fault injection,
# QCOW_DEBUG_FAULT=write:N for the first few N) must leave the image
# reading what the data file holds: QEMU zeroes the raw data file before
# it changes the L2 entries, so a failure or a crash in between cannot
# leave the image reading zeros over data the data file still holds.

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdsh --version

SIZE=$((1024 * 1024))

# The client: runs the requests of $QCOW_OPS (one a line: "zero OFF LEN",
# "zero-nohole OFF LEN", "trim OFF LEN", "write OFF LEN BYTE", offsets in
# bytes) and checks the data file $QCOW_DATA after each.  A request may
# fail only when $QCOW_FAILED names a file: then the count of failed
# requests is written there, and the bytes of a failed one may read as
# before or as the request would have left them (the same in the plugin
# and in the data file all the same).
CLIENT='
import os
data_path, size = os.environ["QCOW_DATA"], h.get_size()
failed_path, failed = os.environ.get("QCOW_FAILED"), 0

def data_file():
    with open(data_path, "rb") as f:
        d = f.read(size)
    return d + bytes(size - len(d))

model = bytearray(data_file())
assert model == h.pread(size, 0), "the plugin and the data file differ at the start"
for line in os.environ["QCOW_OPS"].split("\n"):
    op, off, n, *rest = line.split()
    off, n = int(off), int(n)
    old = bytes(model[off:off + n])
    try:
        if op == "zero":
            h.zero(n, off)
        elif op == "zero-nohole":
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
        elif op == "trim":
            h.trim(n, off)
        elif op == "write":
            h.pwrite(bytes([int(rest[0], 0)]) * n, off)
        else:
            raise SystemExit("bad op " + line)
        ok = True
    except nbd.Error:
        if not failed_path:
            raise
        ok, failed = False, failed + 1
    got, raw = h.pread(size, 0), data_file()
    if got != raw:
        i = next(i for i in range(size) if got[i] != raw[i])
        raise SystemExit("after %s%s: at offset %d the plugin reads %#04x, the "
                         "raw data file holds %#04x" %
                         (line, "" if ok else " (failed)", i, got[i], raw[i]))
    if not ok:
        new = bytes([int(rest[0], 0)]) * n if op == "write" else bytes(n)
        for i in range(n):
            if got[off + i] not in (old[i], new[i]):
                raise SystemExit("after %s (failed): byte at %d reads %#04x" %
                                 (line, off + i, got[off + i]))
        model[off:off + n] = got[off:off + n]
    elif op == "write":
        model[off:off + n] = bytes([int(rest[0], 0)]) * n
    elif op == "trim":
        for i in range(n):
            if got[off + i] not in (0, old[i]):
                raise SystemExit("after %s: trimmed byte at %d reads %#04x" %
                                 (line, off + i, got[off + i]))
        model[off:off + n] = got[off:off + n]
    else:
        model[off:off + n] = bytes(n)
    if got != model:
        i = next(i for i in range(size) if got[i] != model[i])
        raise SystemExit("after %s: at offset %d the plugin reads %#04x, "
                         "expected %#04x" % (line, i, got[i], model[i]))
h.flush()
if failed_path:
    with open(failed_path, "w") as f:
        f.write("%d\n" % failed)
'

# scenario CLUSTER NAME OP...: run the ops (offset and length are shell
# arithmetic in "c", the cluster size: "zero 2*c+100 1000") on a copy of
# the base image.
scenario ()
{
    local c=$1 name=$2 dir="$TMPD/$1-$2" op x
    shift 2
    local -a ops=() w out
    for op in "$@"; do
        read -ra w <<< "$op"
        out=("${w[0]}")
        for x in "${w[@]:1:2}"; do
            out+=($(( x )))
        done
        ops+=("${out[*]} ${w[*]:3}")
    done
    echo "== $c: $name${QCOW_DEBUG_FAULT:+ (QCOW_DEBUG_FAULT=$QCOW_DEBUG_FAULT)}"
    mkdir "$dir"
    cp "$TMPD/base-$c/top.qcow2" "$TMPD/base-$c/top.data" "$dir/"
    cd "$dir"
    QCOW_DATA="$dir/top.data" QCOW_OPS=$(printf '%s\n' "${ops[@]}") \
        nbdsh_plugin "$dir/top.qcow2" -- -c "$CLIENT" ||
        fail "$c $name: the raw data file does not follow the image"
    assert_qemu_check top.qcow2
    [ "$(qemu_info_field top.qcow2 format-specific.data.data-file-raw)" = true ] ||
        fail "$c $name: data-file-raw was cleared"
    raw_of top.qcow2 qemu.raw
    cp top.data data.raw
    truncate -s $SIZE data.raw
    assert_same qemu.raw data.raw "$c $name: qemu-img convert and the raw data file"
    cd "$TMPD"
    rm -rf "$dir"
}

for cs in 65536 4096; do
    base="$TMPD/base-$cs"
    mkdir "$base"
    # (QEMU takes the data file's name relative to the working directory.)
    cd "$base"
    qemu-img create -q -f qcow2 -o data_file=top.data,data_file_raw=on,cluster_size=$cs \
        top.qcow2 $SIZE || die "qemu-img create failed"
    qemu-io -f qcow2 -c "write -P 0xa5 0 $SIZE" -c "write -P 0xc1 100 1000" \
        -c "write -P 0x3c $((3 * cs - 7)) 14" top.qcow2 >/dev/null ||
        die "qemu-io failed"
    [ "$(qemu_info_field top.qcow2 format-specific.data.data-file-raw)" = true ] ||
        die "could not make an image with a raw data file"

    scenario $cs zero-partial "zero-nohole 100 1000" "zero 2*c+100 1000" "zero c-10 20"
    scenario $cs zero-whole-nohole "zero-nohole 0 c" "zero-nohole 2*c 2*c"
    scenario $cs zero-whole-may-trim "zero 0 c" "zero 2*c 2*c"
    scenario $cs zero-span "zero-nohole 100 3*c" "zero 4*c+5 3*c-5" "zero 8*c-1 2*c+2"
    scenario $cs trim-partial "trim 100 1000" "trim 2*c+100 1000"
    scenario $cs trim-whole "trim 0 c" "trim 2*c 2*c"
    scenario $cs trim-span "trim 100 3*c" "trim 4*c+5 3*c-5"
    # A zero whose write of the data file fails: the first few writes
    # fail in turn; at least one of them must be the zeros'.
    nfailed=0
    for n in 1 2 3 4; do
        QCOW_FAILED="$TMPD/failed" QCOW_DEBUG_FAULT=write:$n:EIO \
            scenario $cs zero-fails "zero-nohole 2*c c" "zero 4*c 2*c" "trim 7*c c" "write 2*c 10 0x5a"
        nfailed=$((nfailed + $(cat "$TMPD/failed")))
    done
    [ $nfailed -gt 0 ] || fail "$cs: no injected write fault made a zero fail"
    scenario $cs trim-write-zero "trim 0 4*c" "write 100 1000 0xee" "write c+7 9 0x11" \
        "zero-nohole 0 c" "zero 2*c+1 c" "write 2*c 4 0x22" "trim 0 2*c" "zero 0 3*c"
done
echo "test-datafile-raw.sh: PASS"

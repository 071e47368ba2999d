#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-filter-file.sh - the filter over nbdkit's file plugin, on a raw
# file that holds a qcow2 image made by qemu-img with free room after it
# (the file is `truncate`d larger: storage that cannot grow, as a block
# device or an LV holding a qcow2 image).
#
#  1. Random workload (tests/random-model.py, 4 connections) on images
#     prefilled by qemu-io, v3 with 64 KiB clusters and v2 with 4 KiB
#     clusters.  Afterwards the file has its size still, qemu-img check
#     on it is clean, qemu-img compare finds it equal to the model, and
#     the filter (reopened read-only) reads the model too.
#  2. A full device: a 64 MiB image in an 8 MiB file.  1 MiB writes (each
#     flushed) go on until one fails: with ENOSPC, and nbdkit logs a line
#     saying so.  Everything written before reads back; overwriting
#     allocated data still works; a trim of 2 MiB and a flush free space,
#     and new writes work again until the device is full once more.  After
#     shutdown: qemu-img check clean, file size unchanged, qemu-img
#     compare equal to what the client expects.
#
#   SEED=N                 reproduce a run (the seed is always printed)
#   QCOW_MODEL_SECONDS=S   workload time per variant (default 6)

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io nbdkit nbdsh

use_seed
seconds=${QCOW_MODEL_SECONDS:-6}
export QCOW_VIA=filter
sock=$TMPD/sock

# ---- 1. random workload --------------------------------------------------

# variant NAME CLUSTER VIRTUAL-MIB FILE-MIB CREATE-OPTS
n=0 passed=0
variant ()
{
    local name=$1 cluster=$2 size=$(( $3 << 20 )) room=$(( $4 << 20 )) opts=$5
    local img="$TMPD/$name.qcow2" model="$TMPD/$name.model" i off len cmds=()
    n=$((n + 1))
    RANDOM=$((SEED + n))
    echo "== $name (seed $((SEED + n)))"
    qemu-img create -q -f qcow2 -o "cluster_size=$cluster,$opts" "$img" "$size" ||
        fail "qemu-img create -o $opts"
    for (( i = 0; i < 12; i++ )); do
        len=$(( (RANDOM * 32768 + RANDOM) % (size / 16) + 1 ))
        off=$(( (RANDOM * 32768 + RANDOM) % (size - len) ))
        cmds+=(-c "write -P $(( RANDOM % 255 + 1 )) $off $len")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$img" >/dev/null || fail "qemu-io prefill of $img"
    raw_of "$img" "$TMPD/$name.base"
    echo "qemu-img made $(stat -c %s "$img") bytes; the file is now $room bytes"
    truncate -s "$room" "$img"

    local run
    run=$(printf ' %q' /usr/bin/python3 "$TESTS_DIR/random-model.py" \
          --seed $((SEED + n)) --cluster "$cluster" --seconds "$seconds" \
          --base "$TMPD/$name.base" --out "$model")
    serve_args "$img"
    nbdkit -U - "${SERVE[@]}" --run "$run \"\$unixsocket\"" ||
        fail "$name: workload failed"

    [ "$(stat -c %s "$img")" = "$room" ] ||
        fail "$name: the file is $(stat -c %s "$img") bytes, not $room: the filter changed its size"
    assert_qemu_check "$img"
    qemu-img compare -q -f qcow2 -F raw "$img" "$model" ||
        fail "$name: qemu-img compare: the image differs from the model"
    plugin_raw "$img" "$TMPD/$name.reread" -r
    assert_same "$TMPD/$name.reread" "$model" "$name: image reopened by the filter and the model"
    rm -f "$img" "$model" "$TMPD/$name".*
    passed=$((passed + 1))
}

variant v3-64k 65536 32 48 compat=1.1
variant v2-4k 4096 16 24 compat=0.10,refcount_bits=16

[ "$passed" = "$n" ] || fail "only $passed of $n variants completed"

# ---- 2. a full device ----------------------------------------------------

echo "== full device"
img=$TMPD/full.qcow2
qemu-img create -q -f qcow2 "$img" 64M
truncate -s 8M "$img"
start_child "$sock" "$TMPD/server.log" --filter="$QCOW_FILTER" file "$img"

EXPECT=$TMPD/expect.raw nbdsh -u "nbd+unix:///?socket=$sock" -c '
import errno, os
M = 1 << 20
size = h.get_size()
disk = bytearray(size)

def write(off, data):
    h.pwrite(data, off)
    h.flush()
    disk[off:off + len(data)] = data

def fill(start, fill_byte):
    """1 MiB writes from START until one fails; return the next offset."""
    off = start
    while off < size:
        data = bytes([fill_byte + off // M]) * M
        try:
            write(off, data)
        except nbd.Error as e:
            assert e.errno == "ENOSPC", "write at %d failed with %s, not ENOSPC" % (off, e)
            # A failed write leaves its range unspecified: take what is there.
            disk[off:off + M] = h.pread(M, off)
            return off
        off += M
    raise AssertionError("the 8 MiB file took 64 MiB of data")

def check(what):
    for off in range(0, size, 4 * M):
        assert h.pread(4 * M, off) == disk[off:off + 4 * M], \
            "%s: bytes %d+4M read wrong" % (what, off)

full = fill(0, 0x10)
print("ENOSPC after %d MiB in an 8 MiB file" % (full // M))
assert full >= 5 * M, "ENOSPC already after %d bytes" % full
check("after ENOSPC")

# Allocated clusters can still be overwritten.
write(M, b"\xee" * M)
check("after an overwrite on the full device")

# Trim 2 MiB, flush: the space is free again.
h.trim(2 * M, 2 * M)
h.flush()
disk[2 * M:4 * M] = h.pread(2 * M, 2 * M)
assert disk[2 * M:4 * M] == bytes(2 * M), "trimmed range does not read as zeros"
again = fill(full + M, 0x60)
print("after trim + flush: %d MiB more written" % ((again - full - M) // M))
assert again - (full + M) >= 2 * M, \
    "only %d bytes written after freeing 2 MiB" % (again - full - M)
check("after writing again")
with open(os.environ["EXPECT"], "wb") as f:
    f.write(disk)
' || fail "full device: the client failed (above)"
stop_server "$sock"

grep -qi 'no space left' "$TMPD/server.log" || {
    cat "$TMPD/server.log" >&2
    fail "full device: nbdkit logged no line about the lack of space"
}
sed -n '/[Nn]o space left/{p;q}' "$TMPD/server.log"
[ "$(stat -c %s "$img")" = $((8 << 20)) ] || fail "full device: the file changed size"
assert_qemu_check "$img"
qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/expect.raw" ||
    fail "full device: qemu-img compare: the image differs from what the client wrote"
echo "all passed (seed $SEED)"

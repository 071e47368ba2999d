#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true|force: images the plugin creates are what QEMU expects.
#
#   - defaults: qcow2 v3 (compat 1.1), 64 KiB clusters, 16 bit refcounts,
#     lazy refcounts on; cluster-size and lazy-refcounts override them;
#   - a new image passes qemu-img check, and still does after a seeded
#     workload written through nbdsh, whose result qemu-img compare finds
#     identical to an in-memory model;
#   - create=true refuses an existing file (nbdkit exits 1, file
#     unchanged); create=force replaces it.
#
# QCOW_SEED=N reproduces a run.

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version

seed=${QCOW_SEED:-$(( $(date +%s) % 1000000 ))}
echo "seed=$seed (set QCOW_SEED=$seed to reproduce)"
on_exit '[ $status -eq 0 ] || echo "seed was $seed" >&2'

# The workload, run inside nbdsh (handle "h"): seeded writes, zeroes and
# trims at unaligned offsets, checked against a model as it goes, which
# is saved to $QCOW_MODEL for qemu-img compare.
cat > "$TMPD/workload.py" <<'EOF'
import os, random
rng = random.Random(int(os.environ["QCOW_SEED"]))
size = h.get_size()
model = bytearray(size)

def read_all():
    step = 4 << 20
    return b"".join(h.pread(min(step, size - o), o) for o in range(0, size, step))

assert read_all() == bytes(size), "a new image does not read as zeros"
for i in range(150):
    op = rng.random()
    off = rng.randrange(size)
    n = min(rng.choice([1, 7, 512, 4096, 65536, 200000, 1 << 20]) +
            rng.randrange(3), size - off)
    if op < 0.6:
        data = bytes([rng.randrange(1, 256)]) * n if rng.random() < 0.5 \
            else rng.randbytes(n)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
        model[off:off + n] = data
    elif op < 0.8:
        flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
        h.zero(n, off, flags)
        model[off:off + n] = bytes(n)
    elif op < 0.9 and h.can_trim():
        # Trimmed bytes may read as before or as zeros, nothing else.
        old = bytes(model[off:off + n])
        h.trim(n, off)
        got = h.pread(n, off)
        if got != old and got != bytes(n):
            bad = [j for j in range(n) if got[j] not in (0, old[j])]
            assert not bad, "trim(%d, %d): byte %d is %d" % (n, off, off + bad[0], got[bad[0]])
        model[off:off + n] = got
    else:
        h.flush()
    if i % 25 == 0:
        assert read_all() == model, "contents differ from the model after op %d" % i
assert read_all() == model, "contents differ from the model at the end"
h.flush()
with open(os.environ["QCOW_MODEL"], "wb") as f:
    f.write(model)
EOF

# run_workload IMG [NBDKIT-ARGS...]: the workload through the plugin, then
# the image must be clean and equal to the model.
run_workload ()
{
    local img=$1
    shift
    QCOW_SEED=$seed QCOW_MODEL="$TMPD/model.raw" \
        nbdsh_plugin "$img" "$@" -- -c 'exec(open(os.environ["TMPD"] + "/workload.py").read())' ||
        die "$img: workload failed"
    assert_qemu_check "$img"
    qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/model.raw" ||
        die "$img: qemu-img compare with the model failed"
    [ "$(header_get "$img" 72 8)" -eq 0 ] ||
        die "$img: incompatible features $(header_get "$img" 72 8) after a clean close (dirty bit left set?)"
}

# expect_info IMG KEY VALUE: one field of qemu-img info --output=json.
expect_info ()
{
    local got
    got=$(qemu_info_field "$1" "$2")
    [ "$got" = "$3" ] || die "$1: qemu-img info $2 is '$got', expected '$3'"
}

# create IMG NBDKIT-ARGS...: create an image with the plugin and nothing
# else (the client does nothing).
create ()
{
    local img=$1
    shift
    nbdkit -U - "$QCOW_SO" file="$img" "$@" --run 'true' ||
        die "creating $img with $* failed"
    [ -f "$img" ] || die "$img was not created"
}

# Defaults, created and written in one session.
img="$TMPD/default.qcow2"
run_workload "$img" create=true size=48M
expect_info "$img" format qcow2
expect_info "$img" virtual-size $((48 * 1024 * 1024))
expect_info "$img" cluster-size 65536
expect_info "$img" format-specific.data.compat 1.1
expect_info "$img" format-specific.data.lazy-refcounts true
expect_info "$img" format-specific.data.refcount-bits 16
expect_info "$img" format-specific.data.corrupt false

# Overrides; created, checked, then written in a second session.
for spec in "512 false" "4K true" "65536 false" "2M true"; do
    set -- $spec
    img="$TMPD/c$1-$2.qcow2"
    echo "== cluster-size=$1 lazy-refcounts=$2"
    # An odd size: not a multiple of the cluster size.
    create "$img" create=true size=$((20 * 1024 * 1024 + 512)) cluster-size=$1 lazy-refcounts=$2
    assert_qemu_check "$img"
    expect_info "$img" cluster-size $(( $(numfmt --from=iec "$1") ))
    expect_info "$img" format-specific.data.lazy-refcounts "$2"
    expect_info "$img" format-specific.data.compat 1.1
    expect_info "$img" virtual-size $((20 * 1024 * 1024 + 512))
    run_workload "$img"
    rm -f "$img"
done

# create=true never touches an existing file (qcow2 or not).
img="$TMPD/default.qcow2"
before=$(sha256_of "$img")
status=0
nbdkit -U - "$QCOW_SO" file="$img" create=true size=1M --run 'true' || status=$?
[ $status -eq 1 ] || die "create=true on an existing image: nbdkit exited $status, expected 1"
[ "$(sha256_of "$img")" = "$before" ] || die "create=true modified an existing image"

echo "not an image" > "$TMPD/text"
status=0
nbdkit -U - "$QCOW_SO" file="$TMPD/text" create=true size=1M --run 'true' || status=$?
[ $status -eq 1 ] || die "create=true on an existing file: nbdkit exited $status, expected 1"
[ "$(cat "$TMPD/text")" = "not an image" ] || die "create=true modified an existing file"

# create=force replaces it: a new, empty image of the new size.
create "$img" create=force size=3M cluster-size=4096
assert_qemu_check "$img"
expect_info "$img" virtual-size $((3 * 1024 * 1024))
expect_info "$img" cluster-size 4096
head -c $((3 * 1024 * 1024)) /dev/zero > "$TMPD/zero.raw"
qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/zero.raw" ||
    die "create=force did not give an empty image"
[ "$(stat -c %s "$img")" -lt $((1024 * 1024)) ] ||
    die "create=force left the old image's clusters in the file ($(stat -c %s "$img") bytes)"

create "$TMPD/text" create=force size=1M
assert_qemu_check "$TMPD/text"

# cache-size=: a bad value is refused at start-up with a message.
for bad in 0 x12; do
    status=0
    nbdkit -U - "$QCOW_SO" file="$TMPD/text" cache-size=$bad --run 'true' \
        2>"$TMPD/err" || status=$?
    [ $status -eq 1 ] || die "cache-size=$bad: nbdkit exited $status, expected 1"
    grep -q "cache-size\|could not parse\|$bad" "$TMPD/err" ||
        die "cache-size=$bad: no message: $(cat "$TMPD/err")"
done

echo OK

#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Images written by QEMU, in every variant the plugin supports, read back
# through the plugin exactly as qemu-img reads them.
#
# For each variant: qemu-img create, a seeded qemu-io workload (patterned
# writes at aligned and unaligned offsets, zero writes with and without
# unmap, discards, writes at the very end of the disk), then
#   - qemu-img convert -O raw  ==  nbdcopy through the plugin;
#   - unaligned byte ranges read with nbdsh match the raw file;
#   - opening and reading through the plugin did not change the file.
# Images with features the plugin does not support must be refused at
# start-up, with a message naming the file, and left untouched.
#
# QCOW_SEED=N reproduces a run.

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdcopy --version
requires nbdsh --version

seed=${QCOW_SEED:-$(( $(date +%s) % 1000000 ))}
echo "seed=$seed (set QCOW_SEED=$seed to reproduce)"
on_exit '[ $status -eq 0 ] || echo "seed was $seed" >&2'

MiB=$((1024 * 1024))
# Not a multiple of any cluster size above 512: the last cluster is partial.
vsize=$((64 * MiB + 3584))

# rand N: a pseudo-random number in [0, N) from bash's seeded $RANDOM.
rand ()
{
    echo $(( ((RANDOM << 15) | RANDOM) % $1 ))
}

# workload CLUSTER_SIZE COMPRESS: fill the array "ops" with qemu-io
# arguments (-c CMD ...).
workload ()
{
    local cs=$1 compress=$2 i off len pat cmd
    ops=()
    if [ "$compress" = yes ]; then
        # Compressed clusters first (QEMU only compresses into unallocated
        # clusters): whole clusters; one run compresses well, the other is
        # random (QEMU then stores it uncompressed).  Later writes may
        # overwrite parts of them.
        ops+=(-c "write -c -P 0x77 $((8 * cs)) $((2 * cs))")
        ops+=(-c "write -c -s $TMPD/random.bin $((12 * cs)) $cs")
        ops+=(-c "write -P 0x78 $((8 * cs + 17)) 100")
    fi
    # Fixed edge cases: first byte, a cluster boundary crossed unaligned,
    # the last bytes of the disk, a write spanning several clusters.
    ops+=(-c "write -P 0x11 0 1")
    ops+=(-c "write -P 0x22 $((cs - 3)) 7")
    ops+=(-c "write -P 0x33 $((vsize - 5000)) 5000")
    ops+=(-c "write -P 0x44 $((3 * cs + 100)) $((2 * cs + 1000))")
    ops+=(-c "write -P 0x45 $((32 * MiB - 1)) 2")
    for (( i = 0; i < 40; i++ )); do
        pat=$(printf '0x%02x' $(( 0x50 + i )))
        case $(rand 10) in
        0|1|2)                  # cluster-aligned write
            off=$(( $(rand $((vsize / cs))) * cs ))
            len=$(( ($(rand 4) + 1) * cs ))
            cmd="write -P $pat" ;;
        3|4|5)                  # unaligned write
            off=$(rand $((vsize - 1)))
            len=$(( $(rand $((256 * 1024))) + 1 ))
            cmd="write -P $pat" ;;
        6)                      # zero write, may unmap
            off=$(rand $((vsize - 1)))
            len=$(( $(rand $((4 * cs + 4096))) + 1 ))
            cmd="write -z -u" ;;
        7)                      # zero write without unmap
            off=$(rand $((vsize - 1)))
            len=$(( $(rand $((4 * cs + 4096))) + 1 ))
            cmd="write -z" ;;
        8)                      # discard
            off=$(( $(rand $((vsize / cs))) * cs ))
            len=$(( ($(rand 8) + 1) * cs ))
            cmd="discard" ;;
        9)                      # sector-aligned write
            off=$(( $(rand $((vsize / 512))) * 512 ))
            len=$(( ($(rand 64) + 1) * 512 ))
            cmd="write -P $pat" ;;
        esac
        [ $((off + len)) -le $vsize ] || len=$((vsize - off))
        ops+=(-c "$cmd $off $len")
    done
}

# check_ranges IMG RAW CLUSTER_SIZE: unaligned reads through the plugin
# match the raw file.
check_ranges ()
{
    local img=$1 raw=$2 cs=$3
    QCOW_RAW=$raw QCOW_CS=$cs QCOW_SEED=$seed \
    nbdsh_plugin "$img" -r -- -c '
import os, random
raw = open(os.environ["QCOW_RAW"], "rb").read()
cs = int(os.environ["QCOW_CS"])
size = h.get_size()
assert size == len(raw), "size %d, qemu says %d" % (size, len(raw))
rng = random.Random(int(os.environ["QCOW_SEED"]))
ranges = [(0, 1), (1, 1), (511, 2), (cs - 1, 2), (cs - 3, 2 * cs + 5),
          (size - 1, 1), (size - 4097, 4097), (32 * 1024 * 1024 - 7, 14)]
for _ in range(40):
    off = rng.randrange(size)
    ranges.append((off, rng.randint(1, min(3 * cs, size - off, 1 << 20))))
for off, n in ranges:
    got = h.pread(n, off)
    if got != raw[off:off + n]:
        raise SystemExit("pread(%d, %d) differs from qemu-img convert" % (n, off))
'
}

# check_variant NAME OPTIONS [COMPRESS]: one image format variant.
check_variant ()
{
    local name=$1 opts=$2 compress=${3:-no}
    local img="$TMPD/$name.qcow2" raw="$TMPD/$name.raw" out="$TMPD/$name.out"
    local cs before after
    echo "== $name: $opts"
    qemu-img create -q -f qcow2 -o "$opts" "$img" $vsize
    cs=$(qemu_info_field "$img" cluster-size)
    workload "$cs" "$compress"
    qemu-io -f qcow2 "${ops[@]}" "$img" >/dev/null ||
        die "$name: qemu-io failed"
    assert_qemu_check "$img"
    raw_of "$img" "$raw"
    before=$(sha256_of "$img")

    plugin_raw "$img" "$out"
    assert_same "$raw" "$out" "$name: plugin and qemu-img convert"
    check_ranges "$img" "$raw" "$cs" || die "$name: unaligned reads"

    after=$(sha256_of "$img")
    [ "$before" = "$after" ] || die "$name: reading through the plugin modified the image"
    rm -f "$img" "$raw" "$out"
}

# A refused image: nbdkit exits 1 at start-up naming the file, which is
# left unchanged.
check_refused ()
{
    local name=$1 opts=$2
    local img="$TMPD/$name.qcow2" before status=0
    echo "== $name (must be refused): $opts"
    qemu-img create -q -f qcow2 -o "$opts" "$img" $vsize
    qemu-io -f qcow2 -c "write -P 0x5a 1000 100000" "$img" >/dev/null
    before=$(sha256_of "$img")
    nbdkit -U - "$QCOW_SO" file="$img" --run 'exit 0' 2>"$TMPD/err" || status=$?
    cat "$TMPD/err"
    [ $status -eq 1 ] || die "$name: nbdkit exited with $status, expected 1"
    grep -q "$img" "$TMPD/err" || die "$name: the error does not name the file"
    [ "$(sha256_of "$img")" = "$before" ] || die "$name: refused image was modified"
    rm -f "$img"
}

head -c $((2 * MiB)) /dev/urandom > "$TMPD/random.bin"

# Every variant runs (in a subshell, so one failure does not hide the
# others); the failures are listed at the end.
failures=()
variant ()
{
    ( check_variant "$@" ) || failures+=("$1")
}
refused ()
{
    ( check_refused "$@" ) || failures+=("$1")
}

# Version 2 (compat=0.10): every cluster size, 16 bit refcounts.
variant v2-c512   compat=0.10,cluster_size=512
variant v2-c4k    compat=0.10,cluster_size=4k
variant v2-c64k   compat=0.10,cluster_size=64k
variant v2-c2M    compat=0.10,cluster_size=2M
variant v2-c64k-prealloc compat=0.10,cluster_size=64k,preallocation=metadata
variant v2-c4k-zlib compat=0.10,cluster_size=4k yes

# Version 3 (compat=1.1): every cluster size and refcount width, lazy
# refcounts on and off, metadata preallocation.
variant v3-c512   compat=1.1,cluster_size=512,lazy_refcounts=off
variant v3-c4k-lazy compat=1.1,cluster_size=4k,lazy_refcounts=on
variant v3-c64k   compat=1.1,cluster_size=64k
variant v3-c2M-lazy compat=1.1,cluster_size=2M,lazy_refcounts=on
variant v3-r1     compat=1.1,refcount_bits=1,cluster_size=4k
variant v3-r2     compat=1.1,refcount_bits=2,lazy_refcounts=on
variant v3-r4     compat=1.1,refcount_bits=4,cluster_size=512
variant v3-r8     compat=1.1,refcount_bits=8
variant v3-r32    compat=1.1,refcount_bits=32,cluster_size=2M
variant v3-r64    compat=1.1,refcount_bits=64,lazy_refcounts=on
variant v3-c512-prealloc-lazy compat=1.1,cluster_size=512,preallocation=metadata,lazy_refcounts=on
variant v3-c2M-prealloc-r64 compat=1.1,cluster_size=2M,preallocation=metadata,refcount_bits=64
variant v3-c64k-zlib compat=1.1 yes
variant v3-c64k-zstd compat=1.1,compression_type=zstd yes

variant v3-extl2     compat=1.1,extended_l2=on
variant v3-extl2-zstd compat=1.1,extended_l2=on,compression_type=zstd yes
variant v3-extl2-c2M compat=1.1,extended_l2=on,cluster_size=2M

[ ${#failures[@]} -eq 0 ] || die "failed variants: ${failures[*]}"
echo OK

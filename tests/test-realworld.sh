#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-realworld.sh - images as QEMU writes them in the field, served by
# the plugin.
#
#  1. A matrix of images made by qemu-img and qemu-io: compressed clusters
#     (zlib, zstd; v2, v3; 4 KiB, 64 KiB, 2 MiB clusters), backing chains
#     (raw and qcow2 bases, a 4-image chain mixing formats and cluster
#     sizes, bases smaller than the overlay), internal snapshots (also with
#     compressed clusters, 512-byte clusters, and a metadata cache of L2
#     slices), extended L2 entries
#     (subcluster writes and zeroes, with and without a backing file) and
#     external data files (data_file_raw on and off).  For each:
#       read    the plugin reads exactly what `qemu-img convert` reads;
#       write   tests/random-model.py runs a seeded random workload
#               (writes, FUA, zeroes with and without NO_HOLE, trims,
#               flushes; aligned, unaligned, across cluster and
#               subcluster boundaries) against an in-memory model started
#               from that contents; then `qemu-img check` is clean on the
#               image and on every qcow2 below it, every backing file is
#               byte-for-byte unchanged, `qemu-img compare` finds the image
#               equal to the model, and so does the plugin reopening it
#               (a raw external data file must equal the model too);
#       snaps   every internal snapshot reads the same before and after
#               (`qemu-img convert -l snapshot.name=...`), and the snapshot
#               table lists the same snapshots.
#     A table "variant | read | write+check | snapshots" is printed.
#  2. Backing-chain safety: loops (two images, an image naming itself, a
#     symlink back to itself) and chains deeper than the limit are refused
#     at start-up; a 16-image chain works; a backing file whose format is
#     not recorded is opened as raw, never probed (the guest sees the
#     qcow2 header of a qcow2 base); backing=false refuses images with a
#     backing file; backing-file= and backing-format= override the header;
#     relative names resolve against the naming image's directory, not
#     nbdkit's cwd.
#  3. Encrypted images (LUKS, AES) are refused with a message about
#     encryption, also with -r, and left unchanged.
#
# QCOW_SEED=N repeats a run; the seed is printed at the start and on
# failure.  QCOW_RW_ONLY=REGEX runs only the matching matrix variants and
# safety cases.

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdcopy --version

seed=${QCOW_SEED:-$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')}
echo "seed $seed (QCOW_SEED=$seed repeats this run)"
on_exit '[ "$status" = 0 ] || [ "$status" = 77 ] || echo "$(basename "$0"): seed was $seed" >&2'

: "${QCOW_RW_ONLY:=.}"
export MODEL="$TESTS_DIR/random-model.py"
HELPER="$TESTS_DIR/realworld.py"
# The random workload of each variant: at most this long / this many requests.
WORK_SECONDS=${QCOW_RW_SECONDS:-1.5}
WORK_OPS=1000

K=1024
M=$((1024 * 1024))

# ---------------------------------------------------------------------------
# Helpers.

# qio IMG CMD...: run qemu-io commands on the qcow2 image IMG; any error
# fails the test.
qio ()
{
    local img=$1 c out
    shift
    local -a args=()
    for c in "$@"; do
        args+=(-c "$c")
    done
    out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) ||
        { echo "$out" >&2; die "qemu-io on $img failed"; }
    case "$out" in
    *[Ee]rror*|*[Ff]ailed*|*"not supported"*)
        echo "$out" >&2
        die "qemu-io on $img: a command failed" ;;
    esac
}

# mkdata FILE SIZE SEED: seeded guest-like data (see realworld.py).
mkdata ()
{
    "$HELPER" data "$@" || die "realworld.py data $* failed"
}

# create FILE SIZE [QEMU-IMG-CREATE-ARGS...]
create ()
{
    local file=$1 size=$2
    shift 2
    qemu-img create -q -f qcow2 "$@" "$file" "$size" || die "qemu-img create $file failed"
}

# from_raw RAW QCOW2 [QEMU-IMG-CONVERT-ARGS...]: a qcow2 image of RAW.
from_raw ()
{
    local raw=$1 img=$2
    shift 2
    qemu-img convert -f raw -O qcow2 "$@" "$raw" "$img" || die "qemu-img convert $raw failed"
}

# snap IMG NAME: take an internal snapshot.
snap ()
{
    qemu-img snapshot -c "$2" "$1" || die "qemu-img snapshot -c $2 $1 failed"
}

# snapshot_raws IMG SUFFIX NAME...: each snapshot's contents, as QEMU
# reads them, in snap-NAME.SUFFIX.
snapshot_raws ()
{
    local img=$1 suffix=$2 s
    shift 2
    for s in "$@"; do
        qemu-img convert -f qcow2 -l snapshot.name="$s" -O raw "$img" "snap-$s.$suffix" ||
            die "reading snapshot $s of $img failed"
    done
}

# snapshot_table IMG: the snapshot list (names, sizes, dates, clocks).
snapshot_table ()
{
    qemu-img snapshot -l "$1" || die "qemu-img snapshot -l $1 failed"
}

# ---------------------------------------------------------------------------
# 1. The matrix.  Each build_* function runs in the variant's directory
# and sets:
#   TOP      the image to serve (top.qcow2)
#   LOWERS   every file below it in the backing chain (never modified)
#   GRAN     allocation granularity: the cluster (or subcluster) size the
#            workload aims its boundaries at
#   SNAPS    names of the internal snapshots
#   DATARAW  a raw external data file that must equal the guest contents

# compressed COMPAT CLUSTER TYPE SIZE SEED: `qemu-img convert -c`, then
# QEMU rewrites part of a compressed cluster, writes a compressed
# cluster (QEMU compresses only into unallocated clusters: discard
# first), zeroes and discards.
build_compressed ()
{
    local compat=$1 cs=$2 ctype=$3 size=$4 seed=$5
    local create_opts="compat=$compat,cluster_size=$cs"
    [ "$ctype" = zlib ] || create_opts+=",compression_type=$ctype"
    mkdata src.raw "$size" "$seed"
    from_raw src.raw top.qcow2 -c -o "$create_opts"
    qio top.qcow2 "write -P 0x5a $((cs + 100)) 3000" \
        "discard $((4 * cs)) $cs" "write -c -P 0x6b $((4 * cs)) $cs" \
        "write -z $((6 * cs)) $cs" \
        "discard $((8 * cs)) $((2 * cs))" \
        "write -z $((10 * cs + 512)) 1024" "write -z -u $((12 * cs)) $cs"
    GRAN=$cs
}

# A raw base; QEMU writes, zeroes (partial and whole clusters) and
# discards in the overlay.
build_backing_raw ()
{
    mkdata base.raw $((16 * M)) "$1"
    create top.qcow2 16M -b base.raw -F raw
    qio top.qcow2 "write -P 0x11 70000 100000" "write -z 1M 64k" \
        "write -z $((2 * M + 1000)) 200k" "discard 4M 256k" \
        "write -P 0x22 $((8 * M - 100)) 5000"
    LOWERS=(base.raw)
    GRAN=$((64 * K))
}

# A qcow2 base (64 KiB clusters, with zeroes and discards of its own)
# under a 4 KiB-cluster overlay.
build_backing_qcow2 ()
{
    mkdata src.raw $((16 * M)) "$1"
    from_raw src.raw base.qcow2 -o cluster_size=64k
    qio base.qcow2 "write -z 3M 128k" "discard 5M 1M" "write -P 0x33 $((5 * M + 4096)) 4096"
    create top.qcow2 16M -o cluster_size=4k -b base.qcow2 -F qcow2
    qio top.qcow2 "write -P 0x44 $((64 * K - 1000)) 3000" \
        "write -z $((3 * M - 2048)) 8k" "write -z 5M 4k" \
        "discard 6M 64k" "write -P 0x45 $((7 * M + 12345)) 70000" "write -z -u 9M 64k"
    LOWERS=(base.qcow2)
    GRAN=$((4 * K))
}

# raw <- v2 qcow2 (4 KiB clusters) <- v3 qcow2 (2 MiB clusters, some
# compressed) <- v3 qcow2 (64 KiB clusters): writes, zeroes and discards
# at every level.
build_chain3 ()
{
    mkdata base.raw $((16 * M)) "$1"
    create l1.qcow2 16M -o compat=0.10,cluster_size=4k -b base.raw -F raw
    qio l1.qcow2 "write -P 0x61 100k 300k" "write -z 2M 1M" "write -P 0x62 $((9 * M + 7)) 9000" \
        "discard 12M 64k"
    create l2.qcow2 16M -o cluster_size=2M -b l1.qcow2 -F qcow2
    qio l2.qcow2 "write -P 0x63 $((2 * M - 4096)) 8192" "write -c -P 0x64 4M 2M" \
        "write -z $((8 * M + 4096)) 4096" "discard 14M 2M"
    create top.qcow2 16M -o cluster_size=64k -b l2.qcow2 -F qcow2
    qio top.qcow2 "write -P 0x65 $((4 * M + 1)) 100000" "write -z 2M 128k" \
        "write -z $((9 * M)) 64k" "discard 12M 1M" "write -P 0x66 $((15 * M)) 64k"
    LOWERS=(l2.qcow2 l1.qcow2 base.raw)
    GRAN=$((4 * K))
}

# A raw base of an odd size (10 MiB + 12345 bytes) under a bigger v2
# overlay: reads past its end are zeros.
build_small_raw_v2 ()
{
    mkdata base.raw $((10 * M + 12345)) "$1"
    create top.qcow2 16M -o compat=0.10 -b base.raw -F raw
    qio top.qcow2 "write -P 0x71 $((10 * M)) 64k" "write -z $((10 * M + 65536)) 64k" \
        "write -P 0x72 100 200"
    LOWERS=(base.raw)
    GRAN=$((64 * K))
}

# An 8 MiB qcow2 base under a 24 MiB overlay; writes and zeroes straddle
# the base's end.
build_small_qcow2 ()
{
    mkdata src.raw $((8 * M)) "$1"
    from_raw src.raw base.qcow2 -o cluster_size=16k
    create top.qcow2 24M -b base.qcow2 -F qcow2
    qio top.qcow2 "write -P 0x73 $((8 * M - 5000)) 10000" "write -z $((8 * M - 65536)) 128k" \
        "write -P 0x74 20M 1M"
    LOWERS=(base.qcow2)
    GRAN=$((16 * K))
}

# Three snapshots with writes, discards and zeroes between them.
build_snap ()
{
    mkdata src.raw $((16 * M)) "$1"
    from_raw src.raw top.qcow2
    qio top.qcow2 "write -P 0x81 1M 1M"
    snap top.qcow2 s1
    qio top.qcow2 "write -P 0x82 $((1 * M + 512)) 100k" "discard 4M 2M"
    snap top.qcow2 s2
    qio top.qcow2 "write -z 8M 1M" "write -P 0x83 $((12 * M - 3)) 7"
    snap top.qcow2 s3
    qio top.qcow2 "write -P 0x84 0 64k" "discard 10M 1M"
    SNAPS=(s1 s2 s3)
    GRAN=$((64 * K))
}

# The same with a metadata cache of 4 KiB slices of the L2 tables (the
# copy of a table shared with the snapshots made from slices).
build_snap_slices ()
{
    build_snap "$@"
    PLUGIN_ARGS=(cache-size=260K)
}

# Snapshots of an image with compressed clusters.
build_snap_compressed ()
{
    mkdata src.raw $((16 * M)) "$1"
    from_raw src.raw top.qcow2 -c -o cluster_size=16k
    snap top.qcow2 before-writes
    qio top.qcow2 "write -P 0x91 $((16 * K + 3)) 5000" "discard 1M 16k" "write -c -P 0x92 1M 16k" "discard 2M 64k"
    snap top.qcow2 after-writes
    qio top.qcow2 "write -z 3M 32k"
    SNAPS=(before-writes after-writes)
    GRAN=$((16 * K))
}

# Snapshots with 512-byte clusters.
build_snap_512 ()
{
    mkdata src.raw $((8 * M)) "$1"
    from_raw src.raw top.qcow2 -o cluster_size=512
    snap top.qcow2 a
    qio top.qcow2 "write -P 0xa1 1000 3000" "write -z 1M 4k" "discard 2M 64k"
    snap top.qcow2 b
    qio top.qcow2 "write -P 0xa2 $((4 * M + 256)) 1024"
    SNAPS=(a b)
    GRAN=512
}

# extl2 CLUSTER SIZE SEED [BACKING]: extended L2 entries; QEMU writes
# single subclusters, parts of subclusters, zeroes and discards
# subclusters (over a backing file's data if BACKING is raw or qcow2).
build_extl2 ()
{
    local cs=$1 size=$2 seed=$3 backing=$4
    local sc=$((cs / 32))
    local -a opts=(-o "extended_l2=on,cluster_size=$cs")
    case "$backing" in
    raw)
        mkdata base.raw "$size" "$seed"
        opts+=(-b base.raw -F raw)
        LOWERS=(base.raw) ;;
    qcow2)
        mkdata src.raw "$size" "$seed"
        from_raw src.raw base.qcow2 -o cluster_size=64k
        opts+=(-b base.qcow2 -F qcow2)
        LOWERS=(base.qcow2) ;;
    *)
        mkdata src.raw "$size" "$seed"
        from_raw src.raw top.qcow2 "${opts[@]}"
        opts=() ;;
    esac
    [ ${#opts[@]} -eq 0 ] || create top.qcow2 "$size" "${opts[@]}"
    qio top.qcow2 "write -P 0xb1 $((3 * sc)) $sc" \
        "write -P 0xb2 $((5 * cs + sc + 100)) $((sc / 2))" \
        "write -P 0xb3 $((6 * cs)) $cs" "write -z $((6 * cs + 2 * sc)) $((3 * sc))" \
        "write -z $((7 * cs + 5 * sc)) $sc" "discard $((6 * cs + 10 * sc)) $((4 * sc))" \
        "write -P 0xb4 $((8 * cs - sc / 2)) $sc"
    GRAN=$sc
}

# datafile RAW: an external data file (data_file_raw=on if RAW is on).
build_datafile ()
{
    local raw=$1 seed=$2
    create top.qcow2 16M -o data_file=top.data,data_file_raw="$raw"
    mkdata src.raw $((2 * M)) "$seed"
    qio top.qcow2 "write -s src.raw 3M 2M" "write -P 0xc1 100 1000" "write -z 4M 64k" \
        "discard $((3 * M + 512 * K)) 128k" "write -P 0xc2 $((9 * M - 1)) 2"
    [ "$raw" = on ] && DATARAW=top.data
    GRAN=$((64 * K))
}

# The variants: name and build command; the data seed is appended to
# the command, or replaces its "@" (when a backing kind follows).
VARIANTS=(
    "compressed-zlib-v2-4k       build_compressed 0.10 4096 zlib $((16 * M))"
    "compressed-zlib-v2-64k      build_compressed 0.10 65536 zlib $((16 * M))"
    "compressed-zlib-v2-2M       build_compressed 0.10 2097152 zlib $((32 * M))"
    "compressed-zlib-v3-4k       build_compressed 1.1 4096 zlib $((16 * M))"
    "compressed-zlib-v3-64k      build_compressed 1.1 65536 zlib $((16 * M))"
    "compressed-zlib-v3-2M       build_compressed 1.1 2097152 zlib $((32 * M))"
    "compressed-zstd-v3-4k       build_compressed 1.1 4096 zstd $((16 * M))"
    "compressed-zstd-v3-64k      build_compressed 1.1 65536 zstd $((16 * M))"
    "compressed-zstd-v3-2M       build_compressed 1.1 2097152 zstd $((32 * M))"
    "backing-raw                 build_backing_raw"
    "backing-qcow2               build_backing_qcow2"
    "backing-chain-3-deep        build_chain3"
    "backing-small-raw-v2        build_small_raw_v2"
    "backing-small-qcow2         build_small_qcow2"
    "snapshots                   build_snap"
    "snapshots-l2-slices         build_snap_slices"
    "snapshots-compressed        build_snap_compressed"
    "snapshots-512               build_snap_512"
    "extl2-16k                   build_extl2 16384 $((16 * M))"
    "extl2-64k                   build_extl2 65536 $((16 * M))"
    "extl2-2M                    build_extl2 2097152 $((32 * M))"
    "extl2-64k-qcow2-backing     build_extl2 65536 $((16 * M)) @ qcow2"
    "extl2-2M-raw-backing        build_extl2 2097152 $((32 * M)) @ raw"
    "datafile                    build_datafile off"
    "datafile-raw                build_datafile on"
)

# record STAGE RESULT: remember a stage's outcome for the table.
record ()
{
    echo "$2" > "result.$1"
}

# run_variant NAME SEED BUILD...: build the images in $TMPD/NAME, then
# the read, write and snapshot stages.  Runs in a subshell: a failure
# ends the variant, not the test.
run_variant ()
{
    local name=$1 vseed=$2 f s
    shift 2
    local -a build=("$@")
    # The seed goes last, or in place of "@" (before a backing kind).
    if [[ " ${build[*]} " == *" @ "* ]]; then
        build=("${build[@]/#@/$vseed}")
    else
        build+=("$vseed")
    fi
    mkdir "$TMPD/$name"
    cd "$TMPD/$name"
    TOP=top.qcow2 LOWERS=() GRAN=65536 SNAPS=() DATARAW= PLUGIN_ARGS=()
    "${build[@]}"
    record read FAIL

    # ---- read: the plugin reads what QEMU reads.
    raw_of "$TOP" ref.raw
    plugin_raw "$TOP" got.raw -r
    assert_same ref.raw got.raw "$name: plugin and qemu-img convert"
    rm got.raw
    record read PASS

    # ---- write: a random workload, then the oracles.
    record write FAIL
    sha256sum "${LOWERS[@]}" /dev/null > lowers.sha256
    snapshot_raws "$TOP" before "${SNAPS[@]}"
    [ ${#SNAPS[@]} -eq 0 ] || snapshot_table "$TOP" > snapshots.before
    QCOW_MODEL_ARGS="--seed $vseed --base ref.raw --out model.raw --cluster $GRAN --seconds $WORK_SECONDS --max-ops $WORK_OPS --conns 2" \
        nbdkit -U - "$QCOW_SO" file="$TOP" "${PLUGIN_ARGS[@]}" \
            --run '"$MODEL" "$unixsocket" $QCOW_MODEL_ARGS' ||
        die "$name: random workload failed (seed $vseed)"
    assert_qemu_check "$TOP"
    for f in "${LOWERS[@]}"; do
        [[ $f != *.qcow2 ]] || assert_qemu_check "$f"
    done
    sha256sum --quiet -c lowers.sha256 || die "$name: a backing file was modified"
    qemu-img compare -q -f qcow2 -F raw "$TOP" model.raw ||
        die "$name: qemu-img compare: the image differs from the model (seed $vseed)"
    plugin_raw "$TOP" again.raw -r
    assert_same model.raw again.raw "$name: the model and the plugin reopening the image"
    if [ -n "$DATARAW" ]; then
        cp "$DATARAW" data.copy
        truncate -s "$(stat -c %s model.raw)" data.copy
        assert_same model.raw data.copy "$name: the raw data file and the model"
    fi
    record write PASS

    # ---- snapshots: untouched.
    if [ ${#SNAPS[@]} -gt 0 ]; then
        record snaps FAIL
        snapshot_raws "$TOP" after "${SNAPS[@]}"
        for s in "${SNAPS[@]}"; do
            assert_same "snap-$s.before" "snap-$s.after" "$name: snapshot $s before and after"
        done
        snapshot_table "$TOP" > snapshots.after
        diff snapshots.before snapshots.after >&2 || die "$name: the snapshot table changed"
        record snaps PASS
    fi
    cd "$TMPD"
    rm -rf "${TMPD:?}/$name"/*.raw
}

# guarded CMD...: run CMD in a subshell with errexit; return its status
# without ending the test.
guarded ()
{
    local saved st
    saved=$(trap -p ERR)
    trap - ERR
    set +e
    ( set -e; eval "$saved"; "$@" )
    st=$?
    set -e
    eval "$saved"
    return $st
}

# result NAME STAGE [DEFAULT]: a stage's outcome, for the table.
result ()
{
    cat "$TMPD/$1/result.$2" 2>/dev/null || echo "${3:--}"
}

failed=0
table=()
i=0
for v in "${VARIANTS[@]}"; do
    read -r -a words <<< "$v"
    name=${words[0]}
    i=$((i + 1))
    [[ $name =~ $QCOW_RW_ONLY ]] || continue
    echo "=== $name"
    start=$SECONDS
    guarded run_variant "$name" $((seed * 100 + i)) "${words[@]:1}" 2>&1 |
        tee "$TMPD/$name.log" || failed=1
    table+=("$(printf '%-26s | %-4s | %-11s | %-9s | %ss' "$name" \
                "$(result "$name" read)" "$(result "$name" write)" \
                "$(result "$name" snaps n/a)" $((SECONDS - start)))")
done

# ---------------------------------------------------------------------------
# 2 and 3. Safety cases, in $TMPD/NAME.

# refused PATTERN FILE [NBDKIT-ARGS...]: nbdkit must refuse to start on
# FILE, with a message matching the extended regex PATTERN (any case).
refused ()
{
    local pattern=$1 file=$2
    shift 2
    local -a opts=() params=()
    _qcow_split_args "$@"
    if nbdkit -U - "${opts[@]}" "$QCOW_SO" file="$file" "${params[@]}" \
              --run 'echo started' > out.txt 2> err.txt; then
        cat err.txt >&2
        die "nbdkit served $file ($*)"
    fi
    ! grep -q started out.txt || die "nbdkit served $file ($*) (then failed)"
    grep -Eiq -- "$pattern" err.txt ||
        { cat err.txt >&2; die "$file: the message does not match /$pattern/"; }
    echo "  refused $file${*:+ ($*)}: $(grep -Ei -m1 -- "$pattern" err.txt)"
}

# keep_sums FILE...: record the files' hashes; sums_unchanged: verify.
keep_sums ()
{
    sha256sum "$@" > sums.sha256
}
sums_unchanged ()
{
    sha256sum --quiet -c sums.sha256 || die "a file was modified"
}

# json_chain IMG BACKING-DRIVER BACKING-FILE: a QEMU json: filename for
# the qcow2 IMG with its backing file given explicitly.
json_chain ()
{
    printf 'json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"},"backing":{"driver":"%s","file":{"driver":"file","filename":"%s"}}}' "$1" "$2" "$3"
}

# nbd_write FILE NBDKIT-ARGS... : through the plugin, write, zero and trim
# a little of every kind, with FUA (the bases below must not change).
nbd_write ()
{
    nbdsh_plugin "$@" -- -c '
h.pwrite(b"\xee" * 70000, 12345, nbd.CMD_FLAG_FUA)
h.zero(200000, 1000000)
h.zero(5000, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
h.trim(3 << 20, 1 << 20)
h.flush()'
}

case_loops ()
{
    create a.qcow2 16M -u -b b.qcow2 -F qcow2
    create b.qcow2 16M -u -b a.qcow2 -F qcow2
    create self.qcow2 16M       # (qemu-img create refuses to name itself)
    qemu-img rebase -u -b self.qcow2 -F qcow2 self.qcow2
    create c.qcow2 16M -u -b c-link.qcow2 -F qcow2
    ln -s c.qcow2 c-link.qcow2
    keep_sums a.qcow2 b.qcow2 self.qcow2 c.qcow2
    refused 'loop|cycle|itself|recurs' "$PWD/a.qcow2"
    refused 'loop|cycle|itself|recurs' "$PWD/self.qcow2"
    refused 'loop|cycle|itself|recurs' "$PWD/self.qcow2" -r
    refused 'loop|cycle|itself|recurs' "$PWD/c.qcow2"
    sums_unchanged
}

# 20 images, each writing a marker in its own cluster: the full chain is
# refused, its 16 lowest images (top = l15) are served exactly.
case_depth ()
{
    local i prev=
    for (( i = 0; i < 20; i++ )); do
        if [ -z "$prev" ]; then
            create l$i.qcow2 4M
        else
            create l$i.qcow2 4M -b "$prev" -F qcow2
        fi
        qio l$i.qcow2 "write -P $((i + 1)) $((i * 128 * K + i)) 1000"
        prev=l$i.qcow2
    done
    keep_sums l*.qcow2
    refused 'deep|depth|limit|too many|levels' "$PWD/l19.qcow2"
    refused 'deep|depth|limit|too many|levels' "$PWD/l19.qcow2" -r
    raw_of l15.qcow2 ref.raw
    plugin_raw l15.qcow2 got.raw -r
    assert_same ref.raw got.raw "a 16-image chain: plugin and QEMU"
    echo "  a chain of 16 images is served exactly"
    sums_unchanged
}

# A backing file whose format the header does not record: raw, even
# though it is a qcow2 image.
case_unrecorded_format ()
{
    mkdata src.raw $((4 * M)) "$seed"
    from_raw src.raw base.qcow2
    create over.qcow2 4M -b base.qcow2 -F qcow2
    qio over.qcow2 "write -P 0xd1 1M 64k"
    "$HELPER" drop-backing-format over.qcow2
    [ "$(qemu-img info --output=json -f qcow2 over.qcow2 | grep -c backing-filename-format)" = 0 ] ||
        die "the backing format is still recorded"
    keep_sums base.qcow2
    plugin_raw over.qcow2 got.raw -r
    [ "$(head -c 4 got.raw | od -An -tx1 | tr -d ' ')" = 514649fb ] ||
        die "offset 0 does not read the qcow2 magic of the base: it was not opened as raw"
    qemu-img convert -O raw "$(json_chain over.qcow2 raw base.qcow2)" ref.raw
    assert_same ref.raw got.raw "the plugin and QEMU reading the base as raw"
    echo "  a qcow2 backing file of unrecorded format is served as raw (offset 0: QFI\\xfb)"
    nbd_write over.qcow2
    qemu-img convert -O raw "$(json_chain over.qcow2 raw base.qcow2)" ref.raw
    plugin_raw over.qcow2 got.raw -r
    assert_same ref.raw got.raw "after writes: the plugin and QEMU reading the base as raw"
    assert_qemu_check over.qcow2
    assert_qemu_check base.qcow2
    sums_unchanged
}

# backing=false, and the backing-file= / backing-format= overrides.
case_backing_params ()
{
    mkdata src.raw $((4 * M)) "$seed"
    from_raw src.raw base.qcow2
    mkdata other.raw $((3 * M)) $((seed + 1))
    create over.qcow2 4M -b base.qcow2 -F qcow2
    create plain.qcow2 4M
    qio over.qcow2 "write -P 0xd2 $((2 * M + 1)) 64k"
    keep_sums base.qcow2 other.raw over.qcow2
    refused 'backing' "$PWD/over.qcow2" backing=false
    refused 'backing' "$PWD/over.qcow2" backing=false -r
    plugin_raw plain.qcow2 got.raw -r backing=false
    sums_unchanged

    # The recorded backing file, explicitly.
    raw_of over.qcow2 ref.raw
    plugin_raw over.qcow2 got.raw -r backing-file="$PWD/base.qcow2" backing-format=qcow2
    assert_same ref.raw got.raw "backing-file=base.qcow2 backing-format=qcow2"
    # Another file, as raw.
    qemu-img convert -O raw "$(json_chain over.qcow2 raw other.raw)" ref.raw
    plugin_raw over.qcow2 got.raw -r backing-file="$PWD/other.raw" backing-format=raw
    assert_same ref.raw got.raw "backing-file=other.raw backing-format=raw"
    # The recorded (qcow2) base, forced to raw.
    qemu-img convert -O raw "$(json_chain over.qcow2 raw base.qcow2)" ref.raw
    plugin_raw over.qcow2 got.raw -r backing-format=raw
    assert_same ref.raw got.raw "backing-format=raw over a qcow2 base"
    [ "$(head -c 4 got.raw | od -An -tx1 | tr -d ' ')" = 514649fb ] ||
        die "backing-format=raw: offset 0 does not read the base's qcow2 magic"
    sums_unchanged

    # Writes on top of an override leave the backing file alone.
    cp over.qcow2 over2.qcow2
    nbd_write over2.qcow2 backing-file="$PWD/other.raw" backing-format=raw
    qemu-img convert -O raw "$(json_chain over2.qcow2 raw other.raw)" ref.raw
    plugin_raw over2.qcow2 got.raw -r backing-file="$PWD/other.raw" backing-format=raw
    assert_same ref.raw got.raw "writes over backing-file=other.raw"
    sums_unchanged
}

# Relative names resolve against the directory of the image naming them:
# top/top.qcow2 -> ../mid/mid.qcow2 -> base.raw (mid/base.raw).  Decoy
# base.raw files sit in top/ and in nbdkit's cwd.
case_relative ()
{
    mkdir top mid cwd
    mkdata mid/base.raw $((4 * M)) "$seed"
    head -c $((4 * M)) /dev/zero | tr '\0' '\377' > top/base.raw
    cp top/base.raw cwd/base.raw
    create mid/mid.qcow2 4M -b base.raw -F raw
    qio mid/mid.qcow2 "write -P 0xe1 0 64k"
    create top/top.qcow2 4M -b ../mid/mid.qcow2 -F qcow2
    qio top/top.qcow2 "write -P 0xe2 1M 64k"
    keep_sums mid/base.raw top/base.raw cwd/base.raw mid/mid.qcow2
    raw_of top/top.qcow2 ref.raw
    cmp -s -n $M -i $((2 * M)) ref.raw mid/base.raw ||
        die "QEMU does not read mid/base.raw at 2M (the oracle is wrong)"
    (cd cwd && plugin_raw ../top/top.qcow2 ../got.raw -r)
    assert_same ref.raw got.raw "relative names from another cwd"
    local here=$PWD
    (cd / && plugin_raw "$here/top/top.qcow2" "$here/got2.raw" -r)
    assert_same ref.raw got2.raw "relative names from /"
    echo "  relative backing names resolve against each image's directory"
    (cd cwd && nbd_write ../top/top.qcow2)
    assert_qemu_check top/top.qcow2
    assert_qemu_check mid/mid.qcow2
    sums_unchanged
}

# Encrypted images: refused, also read-only, and never modified.
case_encrypted ()
{
    local secret=(--object secret,id=sec0,data=abc) try
    # QEMU times its key derivation and gives up ("Unable to get accurate
    # CPU usage") when the machine is busy: try a few times.
    for try in 1 2 3 4 5; do
        qemu-img create -q -f qcow2 "${secret[@]}" \
            -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=200 \
            luks.qcow2 16M && break
        [ $try -lt 5 ] || die "qemu-img create luks.qcow2 failed 5 times"
        sleep 1
    done
    local files=(luks.qcow2)
    if qemu-img create -q -f qcow2 "${secret[@]}" -o encrypt.format=aes,encrypt.key-secret=sec0 \
            aes.qcow2 16M 2>/dev/null ||
       qemu-img create -q -f qcow2 -o encryption=on aes.qcow2 16M 2>/dev/null; then
        files+=(aes.qcow2)
    else
        echo "  qemu-img cannot create AES-encrypted images: AES not tested"
    fi
    keep_sums "${files[@]}"
    for f in "${files[@]}"; do
        refused 'encrypt' "$PWD/$f"
        refused 'encrypt' "$PWD/$f" -r
    done
    sums_unchanged
}

CASES=(
    "backing-loops              case_loops"
    "backing-depth-limit        case_depth"
    "backing-unrecorded-format  case_unrecorded_format"
    "backing-parameters         case_backing_params"
    "backing-relative-names     case_relative"
    "encrypted-refused          case_encrypted"
)

run_case ()
{
    mkdir "$TMPD/$1"
    cd "$TMPD/$1"
    "$2"
}

cases=()
for c in "${CASES[@]}"; do
    read -r name func <<< "$c"
    [[ $name =~ $QCOW_RW_ONLY ]] || continue
    echo "=== $name"
    start=$SECONDS
    if guarded run_case "$name" "$func" 2>&1 | tee "$TMPD/$name.log"; then
        result=PASS
    else
        result=FAIL
        failed=1
    fi
    cases+=("$(printf '%-26s | %-6s | %ss' "$name" "$result" $((SECONDS - start)))")
done

if [ ${#table[@]} -gt 0 ]; then
    echo
    printf '%-26s | %-4s | %-11s | %-9s | %s\n' variant read write+check snapshots time
    printf '%s\n' "${table[@]}"
fi
if [ ${#cases[@]} -gt 0 ]; then
    echo
    printf '%-26s | %-6s | %s\n' "safety case" result time
    printf '%s\n' "${cases[@]}"
fi
if [ "$failed" != 0 ]; then
    echo
    echo "failures (seed $seed):"
    for log in "$TMPD"/*.log; do
        { grep -m3 -E 'FAIL|differ|mismatch' "$log" || true; } |
            sed "s|^|  $(basename "$log" .log): |"
    done
    die "some variants failed (seed $seed)"
fi

#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# test-hostile.sh - hostile and broken images.
#
# Small valid images made by qemu-img/qemu-io are damaged one field at a
# time (tests/mkhostile.py).  Damage in the header or the top-level tables
# must make nbdkit refuse the image at start-up: exit status 1, an error
# line naming the file and the problem, no signal, no sanitizer report, no
# hang, and the file left byte-for-byte unchanged (both read-write and -r).
# Damage deeper down (L1/L2 entries, lost data clusters) may be found only
# when touched: then the server starts, reading the damaged range fails
# with EIO, other ranges still read correctly, writes into the damaged
# range fail, and the server does not crash.  A refcount block pointer
# that is bad must never lead to other metadata being overwritten, and an
# image marked corrupt is refused or served read-only.  Each case prints
# its name; the test fails if any case misbehaves.  With QCOW_VIA=filter
# (tests/test-filter-hostile.sh) every image is served by the filter over
# nbdkit's file plugin instead (tests/functions.sh: serve_args).

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdsh --version
requires sha256sum --version
requires timeout --version

mk () { /usr/bin/python3 "$TESTS_DIR/mkhostile.py" "$@"; }

# Case-insensitive ERE that the error line must match, by problem.
RE_TRUNC='truncat|short|end of( the)? file|eof|beyond|past|outside|too small|extends|exceeds'

# ---------------------------------------------------------------------------
# Base images: 16 MiB, 4 KiB clusters (one L2 table maps 2 MiB), so the
# data below sits under three different L1 entries (0, 2 and 6):
#   0x11 at [0, 64K), 0x22 at [4M, 4M+64K), 0x33 at [12M, 12M+4K).
# 12M is written last, so its data cluster is the last one in the file.

make_base ()
{
    local out=$1 compat=$2
    qemu-img create -q -f qcow2 -o compat="$compat",cluster_size=4096 "$out" 16M
    qemu-io -f qcow2 -c 'write -q -P 0x11 0 64k' -c 'write -q -P 0x22 4M 64k' \
            -c 'write -q -P 0x33 12M 4k' "$out"
    qemu-img check -q "$out"
}
make_base "$TMPD/base-v2.qcow2" 0.10
make_base "$TMPD/base-v3.qcow2" 1.1
V2=$TMPD/base-v2.qcow2
V3=$TMPD/base-v3.qcow2

# The last cluster of $V3 must be the data at 12M (the "data-lost" case).
[ "$(qemu-img map -f qcow2 --output=json "$V3" |
     /usr/bin/python3 -c 'import json, sys
print([e["offset"] for e in json.load(sys.stdin) if e["start"] == 12 << 20][0])')" \
  = $(( $(stat -c %s "$V3") - 4096 )) ] || die "unexpected layout of $V3"

# ---------------------------------------------------------------------------
# Bookkeeping.

failures=0
ncases=0

# new_case NAME BASE: start a case; $img is a fresh copy of BASE.  Error
# messages must name $named (a glob; by default $img).
new_case ()
{
    name=$1
    img=$TMPD/$1.qcow2
    named=$img
    ncases=$((ncases + 1))
    echo "--- $name"
    cp "$2" "$img"
}

bad ()
{
    echo "    FAIL ($name): $*"
    [ -s "$TMPD/err" ] && sed 's/^/    | /' "$TMPD/err" | head -20
    failures=$((failures + 1))
}

# sane STATUS: the last command neither hung, nor died of a signal, nor
# produced a sanitizer or valgrind report.
sane ()
{
    if [ "$1" = 124 ]; then
        bad "timed out (hang)"; return 1
    elif [ "$1" -gt 128 ]; then
        bad "exit status $1 (killed by signal $(( $1 - 128 )))"; return 1
    elif grep -Eq 'Sanitizer|runtime error:|==[0-9]+==' "$TMPD/err"; then
        bad "sanitizer or valgrind report"; return 1
    fi
}

# start_status [NBDKIT-OPTS...]: try to start nbdkit on $img, stopping
# straight away if it starts: nbdkit -s with no client (stdin empty)
# exits 0 once it has opened the image, 1 if it refused it.  (Not --run:
# the filter checks the image in .after_fork, after nbdkit has started
# the --run command, whose exit status would then win the race.)  Sets
# $status; stderr in $TMPD/err.
start_status ()
{
    status=0
    serve_args "$img"
    timeout 20 nbdkit -s "$@" "${SERVE[@]}" </dev/null >/dev/null \
        2>"$TMPD/err" || status=$?
}

# refused_ok ERE: the last start was refused properly: an error line
# names $named and, with every file name taken out (case names contain
# keywords too), matches ERE.
refused_ok ()
{
    local re=$1 base line
    base=$(basename "$named")
    [ "$status" = 1 ] || return 1
    while IFS= read -r line; do
        [[ $line == *$base* ]] || continue
        sed -E 's#[^ ]*\.(qcow2|raw)##g' <<<"$line" | grep -Eiq -- "$re" && return 0
    done <"$TMPD/err"
    bad "refused, but no error line names $base and matches /$re/"
    return 1
}

# expect_refused ERE: $img must be refused at start-up, read-write and
# read-only, with a message naming $named and matching ERE; the file must
# not change.
expect_refused ()
{
    local re=$1 before mode
    before=$(sha256_of "$img")
    for mode in "" -r; do
        start_status $mode
        sane "$status" || return 0
        if [ "$status" = 0 ]; then
            bad "nbdkit ${mode:+$mode }started: image not refused"
            return 0
        fi
        [ "$status" = 1 ] || { bad "exit status $status, want 1"; return 0; }
        refused_ok "$re" || return 0
        [ "$(sha256_of "$img")" = "$before" ] ||
            { bad "image modified by nbdkit ${mode}"; return 0; }
    done
    sed -n '1s/^/    ok: /p' "$TMPD/err"
}

# started_ro_or_refused ERE: start nbdkit read-only on $img; true if it
# serves, false once a refusal (with a message matching ERE, else a
# failure) or another outcome has been reported.
started_ro_or_refused ()
{
    start_status -r
    sane "$status" || return 1
    if [ "$status" = 1 ]; then
        refused_ok "$1" && sed -n '1s/^/    ok (refused): /p' "$TMPD/err"
        return 1
    fi
    [ "$status" = 0 ] || { bad "exit status $status"; return 1; }
}

# expect_refused_or_served ERE: a valid image with a feature that may not
# be supported yet: refused at start-up with a message matching ERE, or
# served read-only with exactly the contents QEMU reads, file unchanged.
expect_refused_or_served ()
{
    local re=$1 before
    before=$(sha256_of "$img")
    started_ro_or_refused "$re" || return 0
    qemu-img convert -U -f qcow2 -O raw "$img" "$TMPD/want.raw"
    rm -f "$TMPD/got.raw"
    status=0
    serve_args "$img"
    timeout 20 nbdkit -U - -r "${SERVE[@]}" \
        --run 'nbdcopy "$uri" "$TMPD/got.raw"' 2>"$TMPD/err" || status=$?
    sane "$status" || return 0
    [ "$status" = 0 ] || { bad "reading it through the plugin failed"; return 0; }
    cmp -s "$TMPD/want.raw" "$TMPD/got.raw" ||
        { bad "served, but reads differently from QEMU"; return 0; }
    [ "$(sha256_of "$img")" = "$before" ] || { bad "image modified"; return 0; }
    echo "    ok (served; reads as QEMU reads it)"
}

# Python run inside nbdsh: read and write checks of touched damage.
# BAD is an offset whose cluster is damaged; GOOD:BYTE a 64 KiB range that
# must read as BYTE.
PY_PRELUDE='import os
bad, good, byte = (int(os.environ[k], 0) for k in ("BAD", "GOOD", "BYTE"))
def read_good():
    data = h.pread(65536, good)
    assert data == bytes([byte]) * 65536, "intact range %d reads wrong" % good
def must_fail(what, fn, want_eio):
    try:
        fn()
    except nbd.Error as e:
        if want_eio:
            assert e.errno == "EIO", "%s: want EIO, got %s" % (what, e)
        return
    raise AssertionError("%s of the damaged range succeeded" % what)
read_good()
must_fail("read", lambda: h.pread(4096, bad), True)
read_good()
'
PY_WRITE='must_fail("write", lambda: h.pwrite(b"\xee" * 4096, bad), False)
read_good()
must_fail("read", lambda: h.pread(4096, bad), True)
'

# expect_eio BAD GOOD BYTE: $img may be refused at start-up (ERE $RE_TOUCH);
# if it is served, reading at BAD fails with EIO and GOOD still reads as
# BYTE, without modifying the file (-r); and read-write, a write at BAD fails.
expect_eio ()
{
    local before
    export BAD=$1 GOOD=$2 BYTE=$3
    before=$(sha256_of "$img")
    started_ro_or_refused "$RE_TOUCH" || return 0

    status=0
    timeout 20 bash -c 'nbdsh_plugin "$0" -r -- -c "$1"' "$img" "$PY_PRELUDE" \
        2>"$TMPD/err" || status=$?
    sane "$status" || return 0
    [ "$status" = 0 ] || { bad "read-only checks failed"; return 0; }
    [ "$(sha256_of "$img")" = "$before" ] || { bad "image modified by reads"; return 0; }

    status=0
    timeout 20 bash -c 'nbdsh_plugin "$0" -- -c "$1"' "$img" "$PY_PRELUDE$PY_WRITE" \
        2>"$TMPD/err" || status=$?
    sane "$status" || return 0
    [ "$status" = 0 ] || { bad "read-write checks failed"; return 0; }
    echo "    ok (EIO when touched)"
}
export -f nbdsh_plugin serve_args _qcow_split_args die

# ---------------------------------------------------------------------------
# Refused at start-up: header fields, both versions where they apply.

for v in 2 3; do
    base=$TMPD/base-v$v.qcow2

    new_case "v$v-bad-magic" "$base"
    mk "$img" set magic 0x514649fc
    expect_refused 'magic|not a qcow'

    for ver in 1 4; do
        new_case "v$v-version-$ver" "$base"
        mk "$img" set version "$ver"
        expect_refused 'version'
    done

    for cb in 8 22 63; do
        new_case "v$v-cluster-bits-$cb" "$base"
        mk "$img" set cluster_bits "$cb"
        expect_refused 'cluster'
    done

    new_case "v$v-size-2^63" "$base"
    mk "$img" set size '1<<63'
    expect_refused 'size'

    new_case "v$v-l1-size-too-small" "$base"
    mk "$img" set l1_size 1
    expect_refused 'l1'

    new_case "v$v-l1-size-2^31" "$base"
    mk "$img" set l1_size '1<<31'
    expect_refused 'l1'

    new_case "v$v-l1-offset-misaligned" "$base"
    mk "$img" set l1_table_offset 'l1_table_offset+512'
    expect_refused 'l1'

    new_case "v$v-l1-offset-beyond-eof" "$base"
    mk "$img" set l1_table_offset 'filesize+16*cluster'
    expect_refused 'l1'

    new_case "v$v-l1-offset-on-header" "$base"
    mk "$img" set l1_table_offset 0
    expect_refused 'l1'

    new_case "v$v-refcount-offset-misaligned" "$base"
    mk "$img" set refcount_table_offset 'refcount_table_offset+512'
    expect_refused 'refcount'

    new_case "v$v-refcount-offset-beyond-eof" "$base"
    mk "$img" set refcount_table_offset 'filesize+16*cluster'
    expect_refused 'refcount'

    new_case "v$v-refcount-offset-0" "$base"
    mk "$img" set refcount_table_offset 0
    expect_refused 'refcount'

    new_case "v$v-refcount-clusters-huge" "$base"
    mk "$img" set refcount_table_clusters '1<<31'
    expect_refused 'refcount'

    for m in 1 2; do
        new_case "v$v-crypt-method-$m" "$base"
        mk "$img" set crypt_method "$m"
        expect_refused 'encrypt'
    done

    new_case "v$v-extension-past-cluster" "$base"
    mk "$img" ext 0x12345678 cluster
    expect_refused 'extension'

    new_case "v$v-snapshot" "$base"
    qemu-img snapshot -c snap1 "$img"
    qemu-io -f qcow2 -c 'write -q -P 0x55 32k 64k' "$img"
    expect_refused_or_served 'snapshot'

    new_case "v$v-backing-file" "$base"
    rm "$img"
    qemu-img create -q -f qcow2 -o compat=$([ $v = 2 ] && echo 0.10 || echo 1.1) \
        -b "$base" -F qcow2 "$img"
    qemu-io -f qcow2 -c 'write -q -P 0x55 32k 64k' "$img"
    expect_refused_or_served 'backing'

    for cut in 50 100; do
        new_case "v$v-truncated-$cut" "$base"
        mk "$img" truncate "$cut"
        expect_refused "$RE_TRUNC"
    done

    new_case "v$v-truncated-at-l1" "$base"
    mk "$img" truncate l1_table_offset
    expect_refused "$RE_TRUNC|l1"

    new_case "v$v-truncated-at-refcount-table" "$base"
    mk "$img" truncate refcount_table_offset
    expect_refused "$RE_TRUNC|refcount"

    new_case "v$v-truncated-halfway" "$base"
    mk "$img" truncate 'filesize//2'
    expect_refused "$RE_TRUNC|l1|l2|refcount"
done

# Version 3 only.

for hl in 96 108 4104; do
    new_case "v3-header-length-$hl" "$V3"
    mk "$img" set header_length "$hl"
    expect_refused 'header'
done

new_case "v3-refcount-order-7" "$V3"
mk "$img" set refcount_order 7
expect_refused 'refcount'

new_case "v3-incompatible-bit-10" "$V3"
mk "$img" set incompatible_features 'incompatible_features|1<<10'
expect_refused '(bit|feature)s?[^0-9]{0,30}\b10\b|0x0*400\b'

new_case "v3-extended-l2" "$V3"
mk "$img" set incompatible_features 'incompatible_features|1<<4'
expect_refused 'extended.?l2|extl2'

new_case "v3-external-data-file" "$V3"
mk "$img" set incompatible_features 'incompatible_features|1<<2'
expect_refused 'data.?file'

# Snapshot tables that cannot be trusted.

cp "$V3" "$TMPD/base-snap.qcow2"
qemu-img snapshot -c snap1 "$TMPD/base-snap.qcow2"
SNAP=$TMPD/base-snap.qcow2

new_case "v3-snapshot-table-beyond-eof" "$SNAP"
mk "$img" set snapshots_offset '(filesize//cluster+4)*cluster'
expect_refused 'snapshot'

new_case "v3-snapshot-table-misaligned" "$SNAP"
mk "$img" set snapshots_offset 'snapshots_offset+8'
expect_refused 'snapshot'

new_case "v3-snapshot-table-on-header" "$SNAP"
mk "$img" set snapshots_offset 0
expect_refused 'snapshot'

new_case "v3-snapshot-count-2^31" "$SNAP"
mk "$img" set nb_snapshots '1<<31'
expect_refused 'snapshot'

new_case "v3-snapshot-count-past-table" "$SNAP"
mk "$img" set nb_snapshots 5000
expect_refused 'snapshot'

new_case "v3-snapshot-l1-beyond-eof" "$SNAP"
mk "$img" poke snapshots_offset Q '(filesize//cluster+4)*cluster'
expect_refused 'snapshot'

new_case "v3-snapshot-l1-misaligned" "$SNAP"
mk "$img" poke snapshots_offset Q l1_table_offset+8
expect_refused 'snapshot'

new_case "v3-snapshot-l1-size-2^31" "$SNAP"
mk "$img" poke snapshots_offset+8 I '1<<31'
expect_refused 'snapshot'

new_case "v3-snapshot-extra-data-huge" "$SNAP"
mk "$img" poke snapshots_offset+36 I 0xffffffff
expect_refused 'snapshot'

# Backing files that cannot be trusted.  Each overlay is made with
# "qemu-img create -u" (QEMU does not open the backing file).

overlay () # OVERLAY BACKING [FORMAT]
{
    rm -f "$1"
    qemu-img create -q -f qcow2 -u -b "$2" -F "${3:-qcow2}" "$1" 16M
}

new_case "v3-backing-missing" "$V3"
overlay "$img" "$TMPD/no-such-file.qcow2"
expect_refused 'backing|no such file'

new_case "v3-backing-name-past-cluster" "$V3"
overlay "$img" "$V3"
mk "$img" set backing_file_offset 'cluster-8'
expect_refused 'backing'

new_case "v3-backing-name-too-long" "$V3"
overlay "$img" "$V3"
mk "$img" set backing_file_size 2000
expect_refused 'backing'

new_case "v3-backing-name-beyond-eof" "$V3"
overlay "$img" "$V3"
mk "$img" set backing_file_offset 'filesize+8'
expect_refused 'backing'

new_case "v3-backing-loop-self" "$V3"
overlay "$img" "$(basename "$img")"    # (relative: qemu-img refuses the path)
expect_refused 'loop|chain|deep|recurs|itself'

new_case "v3-backing-loop-two" "$V3"
overlay "$img" "$TMPD/loop-b.qcow2"
overlay "$TMPD/loop-b.qcow2" "$img"
expect_refused 'loop|chain|deep|recurs|itself'

# 40 overlays: refused (a bound on the chain), or served correctly; the
# message may name any image of the chain.
new_case "v3-backing-chain-40-deep" "$V3"
prev=$V3
for i in $(seq 1 39); do
    overlay "$TMPD/deep-$i.qcow2" "$prev"
    prev=$TMPD/deep-$i.qcow2
done
overlay "$img" "$prev"
named='*.qcow2'
expect_refused_or_served 'chain|deep|depth|recurs|too many'

new_case "v3-backing-bad-magic" "$V3"
cp "$V3" "$TMPD/bad-backing.qcow2"
mk "$TMPD/bad-backing.qcow2" set magic 0
overlay "$img" "$TMPD/bad-backing.qcow2"
named=$TMPD/bad-backing.qcow2
expect_refused 'magic|not a qcow'


new_case "v3-backing-truncated" "$V3"
cp "$V3" "$TMPD/cut-backing.qcow2"
mk "$TMPD/cut-backing.qcow2" truncate l1_table_offset
overlay "$img" "$TMPD/cut-backing.qcow2"
named=$TMPD/cut-backing.qcow2
expect_refused "$RE_TRUNC"

# ---------------------------------------------------------------------------
# Found when touched (or refused at start-up, naming the problem).

RE_TOUCH="l1|l2|$RE_TRUNC|corrupt|misaligned|align"

new_case "v3-l1-entry-beyond-eof" "$V3"
mk "$img" l1 2 '(filesize+64*cluster)|1<<63'
expect_eio $((4 << 20)) 0 0x11

new_case "v3-l2-entry-beyond-eof" "$V3"
mk "$img" l2 2 0 '(filesize+64*cluster)|1<<63'
expect_eio $((4 << 20)) 0 0x11

new_case "v2-l2-entry-beyond-eof" "$V2"
mk "$img" l2 0 0 '(filesize+64*cluster)|1<<63'
expect_eio 0 $((4 << 20)) 0x22

new_case "v3-l2-entry-misaligned" "$V3"
mk "$img" l2 2 0 'entry+512'
expect_eio $((4 << 20)) 0 0x11

new_case "v3-data-cluster-lost" "$V3"
mk "$img" truncate 'filesize-cluster'
expect_eio $((12 << 20)) $((4 << 20)) 0x22

# ---------------------------------------------------------------------------
# Refcount blocks that must not be followed: a block that overlaps the L1
# table (updating it would destroy the L1 table) and one beyond the end of
# the file.  Refused at start-up, or a write that needs a refcount update
# either fails or works, and in any case QEMU afterwards reads the guest
# data as it should be: nothing else was destroyed.

qemu-img convert -f qcow2 -O raw "$V3" "$TMPD/base.raw"

expect_write_safe ()
{
    local want=$TMPD/want.raw got=$TMPD/got.raw
    start_status
    sane "$status" || return 0
    if [ "$status" = 1 ]; then
        refused_ok 'refcount' && sed -n '1s/^/    ok (refused): /p' "$TMPD/err"
        return 0
    fi
    [ "$status" = 0 ] || { bad "exit status $status"; return 0; }
    rm -f "$TMPD/written"
    status=0
    timeout 20 bash -c 'nbdsh_plugin "$0" -- -c "$1"' "$img" '
import os
try:
    h.pwrite(b"\x44" * 65536, 8 << 20)
    h.flush()
    open(os.environ["TMPD"] + "/written", "w").close()
except nbd.Error:
    pass
assert h.pread(65536, 0) == b"\x11" * 65536, "intact data reads wrong"
' 2>"$TMPD/err" || status=$?
    sane "$status" || return 0
    [ "$status" = 0 ] || { bad "nbdsh checks failed"; return 0; }
    cp "$TMPD/base.raw" "$want"
    if [ -e "$TMPD/written" ]; then
        qemu-io -f raw -c 'write -q -P 0x44 8M 64k' "$want"
    fi
    qemu-img convert -U -f qcow2 -O raw "$img" "$got" 2>"$TMPD/err" ||
        { bad "QEMU can no longer read the image"; return 0; }
    cmp -s "$want" "$got" ||
        { bad "guest data damaged (write $([ -e "$TMPD/written" ] || echo not )accepted)"; return 0; }
    echo "    ok (write $([ -e "$TMPD/written" ] && echo accepted || echo refused), nothing destroyed)"
}

new_case "v3-refcount-block-on-l1" "$V3"
mk "$img" rt 0 l1_table_offset
expect_write_safe

new_case "v3-refcount-block-beyond-eof" "$V3"
mk "$img" rt 0 'filesize+256*cluster'
expect_write_safe

# ---------------------------------------------------------------------------
# The corrupt bit: refused, or served read-only (reads work, writes fail).

new_case "v3-corrupt-bit" "$V3"
mk "$img" set incompatible_features 'incompatible_features|1<<1'
before=$(sha256_of "$img")
start_status
if sane "$status"; then
    if [ "$status" = 1 ]; then
        refused_ok 'corrupt' && sed -n '1s/^/    ok (refused): /p' "$TMPD/err"
    elif [ "$status" != 0 ]; then
        bad "exit status $status"
    else
        status=0
        timeout 20 bash -c 'nbdsh_plugin "$0" -- -c "$1"' "$img" '
assert h.pread(65536, 0) == b"\x11" * 65536
try:
    h.pwrite(b"\xee" * 512, 0)
except nbd.Error:
    pass
else:
    raise AssertionError("write to an image marked corrupt succeeded")
assert h.pread(65536, 0) == b"\x11" * 65536
' 2>"$TMPD/err" || status=$?
        if sane "$status"; then
            if [ "$status" != 0 ]; then
                bad "served, but not read-only"
            elif [ "$(sha256_of "$img")" != "$before" ]; then
                bad "image modified"
            else
                echo "    ok (served read-only)"
            fi
        fi
    fi
fi
[ "$(sha256_of "$img")" = "$before" ] || bad "image modified"

echo "$ncases cases, $failures failed"
[ "$failures" = 0 ] || die "$failures of $ncases hostile-image cases misbehaved"

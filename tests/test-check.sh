#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool check and repair, judged by qemu-img check.
#
# A set of images (clean ones made by qemu-img, qemu-io and the plugin:
# plain, v2, 512-byte and 2 MiB clusters, 1- and 64-bit refcounts,
# extended L2, zlib and zstd compressed, internal snapshots, persistent
# bitmaps; and copies damaged in one precise way each by mkdamaged.py) is
# checked by both tools:
#   - qcow-tool check must exit as qemu-img check does (0 clean,
#     2 corrupt, 3 leaks only, 1 could not check), and its --json verdict
#     and counts must agree with its exit status and problem list;
#   - qcow-tool repair of every damaged image it can repair must leave
#     an image that both qemu-img check and qcow-tool check find clean,
#     and every guest cluster the damage did not touch must read as it
#     did before the damage (qemu-img convert of both);
#   - an image it cannot repair is left byte-for-byte unchanged, and so
#     is a clean image (one only marked corrupt just loses the mark).
# The results are printed as a table.

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdcopy --version
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
DAMAGE="$TESTS_DIR/mkdamaged.py"
cd "$TMPD"

MiB=$((1024 * 1024))

# ---- the clean images ----

# Guest data: 2 MiB of random bytes at 0 and 1 MiB at 32 MiB (seeded),
# and a compressible variant.
/usr/bin/python3 - <<'EOF'
import random
r = random.Random(20240531)
with open("data.raw", "wb") as f:
    f.write(r.randbytes(2 << 20))
    f.seek(32 << 20)
    f.write(r.randbytes(1 << 20))
    f.truncate(64 << 20)
with open("text.raw", "wb") as f:
    for i in range(48):
        f.write(bytes(65 + r.randrange(4) for _ in range(65536)))
    f.truncate(16 << 20)
EOF

qemu-img create -q -f qcow2 empty.qcow2 64M
qemu-img convert -O qcow2 data.raw base.qcow2
qemu-img convert -O qcow2 -o compat=0.10 data.raw v2.qcow2
qemu-img convert -O qcow2 -o cluster_size=512 data.raw c512.qcow2
qemu-img convert -O qcow2 -o cluster_size=2M data.raw c2m.qcow2
qemu-img convert -O qcow2 -o extended_l2=on data.raw extl2.qcow2
qemu-img convert -O qcow2 -o refcount_bits=1 data.raw rb1.qcow2
qemu-img convert -O qcow2 -o refcount_bits=64 data.raw rb64.qcow2
qemu-img convert -c -O qcow2 text.raw zlib.qcow2
qemu-img convert -c -O qcow2 -o compression_type=zstd text.raw zstd.qcow2

qemu-img create -q -f qcow2 snap.qcow2 64M
qemu-io -c 'write -P 1 0 1M' snap.qcow2 >/dev/null
qemu-img snapshot -c s1 snap.qcow2
qemu-io -c 'write -P 2 512k 1M' snap.qcow2 >/dev/null
qemu-img snapshot -c s2 snap.qcow2
qemu-io -c 'write -P 3 2M 1M' -c 'write -P 4 0 64k' snap.qcow2 >/dev/null

qemu-img create -q -f qcow2 -o lazy_refcounts=on bitmap.qcow2 64M
qemu-img bitmap --add bitmap.qcow2 b0
qemu-io -c 'write -P 5 0 1M' -c 'write -P 6 8M 64k' bitmap.qcow2 >/dev/null
qemu-img bitmap --add bitmap.qcow2 b1

"$QCOW_TOOL" create ours.qcow2 64M >/dev/null
nbdkit -U - --exit-with-parent "$QCOW_SO" file=ours.qcow2 \
    --run 'nbdcopy -- data.raw "$uri"' || die "writing ours.qcow2 failed"

# ---- the cases: NAME BASE DAMAGE KIND ----
# DAMAGE "-" is the clean image; the kinds are in mkdamaged.py.  KIND is
# a problem qcow-tool check --json must report ("-": none in particular).
cases=(
    "empty          empty   -                   -"
    "base           base    -                   -"
    "v2             v2      -                   -"
    "c512           c512    -                   -"
    "c2m            c2m     -                   -"
    "extl2          extl2   -                   -"
    "rb1            rb1     -                   -"
    "rb64           rb64    -                   -"
    "zlib           zlib    -                   -"
    "zstd           zstd    -                   -"
    "snapshots      snap    -                   -"
    "bitmaps        bitmap  -                   -"
    "ours           ours    -                   -"
    "leak-header    base    leak-header         leak"
    "leak-free      base    leak-free           leak"
    "refcount-zero  base    refcount-zero       refcount"
    "l2-outside     base    l2-outside          outside-file"
    "l2-duplicate   base    l2-duplicate        duplicate"
    "l2-into-l1     base    l2-into-l1          overlap"
    "l2-misaligned  base    l2-misaligned       misaligned"
    "l1-misaligned  base    l1-misaligned       misaligned"
    "l1-outside     base    l1-outside          outside-file"
    "copied-l2      base    copied-l2           copied-flag"
    "copied-l1      base    copied-l1           copied-flag"
    "reserved-l2    base    reserved-l2         reserved-bits"
    "corrupt-bit    base    corrupt-bit         -"
    "bad-header     base    bad-header          -"
    "v2-outside     v2      l2-outside          outside-file"
    "v2-duplicate   v2      l2-duplicate        duplicate"
    "c512-dup       c512    l2-duplicate        duplicate"
    # (half of a 512-byte cluster is bit 8 of the entry: a reserved bit)
    "c512-l1-mis    c512    l1-misaligned       reserved-bits"
    "extl2-outside  extl2   l2-outside          outside-file"
    "extl2-dup      extl2   l2-duplicate        duplicate"
    "rb1-dup        rb1     l2-duplicate        duplicate"
    "zlib-outside   zlib    compressed-outside  outside-file"
    "zstd-outside   zstd    compressed-outside  outside-file"
    "zlib-leak      zlib    leak-header         leak"
    "snap-overlap   snap    snap-l1-overlap     overlap"
    "snap-dup       snap    l2-duplicate        duplicate"
    "snap-copied    snap    copied-l1           copied-flag"
    "snap-rc-zero   snap    refcount-zero       refcount"
    "snap-l1-mis    snap    l1-misaligned       misaligned"
    "ours-dup       ours    l2-duplicate        duplicate"
    "ours-leak      ours    leak-free           leak"
)
# Damage qcow-tool repair must refuse (the file stays unchanged):
# overlapping snapshot L1 tables, and a shared cluster that 1-bit
# refcounts cannot count.
unrepairable=" snap-overlap rb1-dup bad-header "

# check_json IMG STATUS KIND: the JSON output agrees with the exit status
# and with its own problem list, and reports a problem of KIND.
check_json ()
{
    "$QCOW_TOOL" check --json "$1" > "$1.json" || true
    /usr/bin/python3 - "$1.json" "$2" "$3" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
status = int(sys.argv[2])
if sys.argv[3] != "-":
    assert j["problem-counts"][sys.argv[3]] > 0, "no %s problem" % sys.argv[3]
want = {0: "clean", 1: "failed", 2: "corrupt", 3: "leaks"}[status]
assert j["verdict"] == want, "verdict %s, exit status %d" % (j["verdict"], status)
if want != "failed":
    p = j["problems"]
    assert not j["problems-truncated"]
    assert j["corruptions"] == sum(1 for x in p if x["corruption"]), "corruptions"
    assert j["leaks"] == sum(1 for x in p if x["kind"] == "leak"), "leaks"
    assert sum(j["problem-counts"].values()) == len(p), "problem-counts"
    assert (want == "clean") == (len(p) == 0), "problems for a clean image"
    assert j["used-clusters"] + j["free-clusters"] == j["file-clusters"]
    assert j["used-bytes"] == j["used-clusters"] * j["cluster-size"]
EOF
}

status_of ()
{
    local s=0
    "$@" > /dev/null 2>&1 || s=$?
    echo "$s"
}

failed=0
printf '%-15s %-20s %8s %8s %8s\n' image damage qemu-img qcow-tool repair
for c in "${cases[@]}"; do
    read -r name base kind problem <<< "$c"
    img=case-$name.qcow2
    cp "$base.qcow2" "$img"
    : > "$name.tainted"
    [ "$kind" = - ] || "$DAMAGE" damage "$kind" "$img" > "$name.tainted"

    q=$(status_of qemu-img check -f qcow2 "$img")
    o=$(status_of "$QCOW_TOOL" check "$img")
    check_json "$img" "$o" "$problem" || { echo "$name: check --json is inconsistent" >&2; failed=1; }

    # Repair what is damaged; a clean image must come out untouched.
    r=-
    before=$(sha256_of "$img")
    r=$(status_of "$QCOW_TOOL" repair "$img")
    after=$(sha256_of "$img")
    printf '%-15s %-20s %8s %8s %8s\n' "$name" "$kind" "$q" "$o" "$r"

    if [ "$q" != "$o" ]; then
        echo "$name: qemu-img check exits $q, qcow-tool check $o" >&2
        "$QCOW_TOOL" check "$img" >&2 || true
        failed=1
        continue
    fi
    if [ "$kind" = corrupt-bit ]; then
        # Clean but marked corrupt: the repair only clears the mark.
        if [ "$r" != 0 ] || [ "$(qemu_info_field "$img" format-specific.data.corrupt)" != false ]; then
            echo "$name: repair did not clear the corrupt bit" >&2
            failed=1
        fi
        continue
    fi
    if [ "$o" = 0 ] || [[ $unrepairable == *" $name "* ]]; then
        if [ "$before" != "$after" ]; then
            echo "$name: repair changed an image it should leave alone" >&2
            failed=1
        elif [ "$o" != 0 ] && [ "$r" = 0 ]; then
            echo "$name: repair claims success on an unrepairable image" >&2
            failed=1
        fi
        continue
    fi
    # Repaired: clean for both tools, untouched clusters read the same.
    qa=$(status_of qemu-img check -f qcow2 "$img")
    oa=$(status_of "$QCOW_TOOL" check "$img")
    if [ "$r" != 0 ] || [ "$qa" != 0 ] || [ "$oa" != 0 ]; then
        echo "$name: after repair (status $r): qemu-img check $qa, qcow-tool check $oa" >&2
        qemu-img check -f qcow2 "$img" >&2 || true
        failed=1
        continue
    fi
    [ -f "$base.raw" ] || raw_of "$base.qcow2" "$base.raw"
    raw_of "$img" "$name.raw"
    cs=$((1 << $(header_get "$img" 20 4)))
    # shellcheck disable=SC2046
    if ! "$DAMAGE" compare "$base.raw" "$name.raw" "$cs" $(cat "$name.tainted"); then
        echo "$name: the repair changed clusters the damage did not touch" >&2
        failed=1
    fi
    rm -f "$name.raw"
done

# A file that is not there cannot be checked.
s=$(status_of "$QCOW_TOOL" check missing.qcow2)
[ "$s" = 1 ] || { echo "check of a missing file exits $s" >&2; failed=1; }

[ "$failed" = 0 ] || die "check/repair disagree with qemu-img (see above)"
echo "$(basename "$0"): all ${#cases[@]} images agree"

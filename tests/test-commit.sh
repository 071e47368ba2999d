#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool commit against qemu-img commit: each scenario is made twice
# (the same qemu-io commands on two copies), committed by each tool, and
# the results compared:
#   - the backing files read the same (qemu-img compare), and both are
#     clean (qemu-img check);
#   - the overlays read the same as before, store nothing of their own
#     any more (qemu-img map: no run at depth 0 is present), and are clean;
#   - with -d the overlay is unchanged;
# for a qcow2 and a raw backing file, an overlay larger than its backing
# file (which grows), zero and compressed clusters, subclusters, version
# 2, and the middle of a 3-deep chain.  Then the refusals: no backing
# file, a backing file in use by QEMU (nothing changes), bad options.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
cd "$TMPD"

io () { qemu-io -f "$1" "${@:3}" "$2" >/dev/null || die "qemu-io $*"; }

# stores_nothing OVERLAY: qemu-img map shows nothing present at depth 0.
stores_nothing ()
{
    qemu-img map --output=json "$1" | /usr/bin/python3 -c '
import json, sys
bad = [e for e in json.load(sys.stdin) if e["depth"] == 0 and e["present"]]
sys.exit(1 if bad else 0)' || die "$1 still stores data after commit"
}

# scenario NAME BASE-FMT BASE-CREATE-OPTS OVER-OPTS OVER-SIZE
#          BASE-IO-CMDS OVER-IO-CMDS [COMMIT-ARGS]
agreed=0
scenario ()
{
    local name=$1 bfmt=$2 bopts=$3 oopts=$4 osize=$5 bio=$6 oio=$7 args=$8
    local d t
    for t in tool qemu; do
        d=$name-$t
        mkdir "$d"
        if [ "$bfmt" = raw ]; then truncate -s 4M "$d/base"; else
            qemu-img create -q -f qcow2 ${bopts:+-o "$bopts"} "$d/base" 4M; fi
        eval "io $bfmt $d/base $bio"
        qemu-img create -q -f qcow2 ${oopts:+-o "$oopts"} -b base -F "$bfmt" "$d/over" "$osize"
        eval "io qcow2 $d/over $oio"
    done
    qemu-img convert -O raw "$name-tool/over" "$name-before.raw"
    cp "$name-tool/over" "$name-over.orig"
    "$QCOW_TOOL" commit $args "$name-tool/over" >/dev/null || die "$name: qcow-tool commit failed"
    qemu-img commit -q $args "$name-qemu/over" || die "$name: qemu-img commit failed"
    qemu-img compare -q -f "$bfmt" -F "$bfmt" "$name-tool/base" "$name-qemu/base" ||
        die "$name: the backing files differ after commit"
    [ "$bfmt" = raw ] || { assert_qemu_check "$name-tool/base"; assert_qemu_check "$name-qemu/base"; }
    [ "$(qemu_info_field "$name-tool/base" virtual-size 2>/dev/null || stat -c %s "$name-tool/base")" = \
      "$(qemu_info_field "$name-qemu/base" virtual-size 2>/dev/null || stat -c %s "$name-qemu/base")" ] ||
        die "$name: the backing files' sizes differ"
    qemu-img compare -q "$name-tool/over" "$name-qemu/over" || die "$name: the overlays differ"
    qemu-img compare -q "$name-before.raw" "$name-tool/over" || die "$name: the overlay reads differently"
    assert_qemu_check "$name-tool/over"
    if [ -z "$args" ]; then
        stores_nothing "$name-tool/over"
    else
        cmp -s "$name-tool/over" "$name-over.orig" || qemu-img compare -q "$name-tool/over" "$name-over.orig" ||
            die "$name: -d changed the overlay"
    fi
    agreed=$((agreed + 1))
    echo "$name: same as qemu-img commit"
}

scenario qcow2 qcow2 "" "" 4M \
    '-c "write -P 1 0 4M"' \
    '-c "write -P 2 1M 100k" -c "write -z 2M 64k" -c "write -c -P 3 3M 64k" -c "write -z 3200k 1k"'
scenario grows qcow2 "cluster_size=4096" "" 6M \
    '-c "write -P 1 0 2M"' \
    '-c "write -P 2 1M 100k" -c "write -P 3 5M 64k" -c "write -z 4100k 64k"'
scenario raw raw "" "" 5M \
    '-c "write -P 1 0 1M"' \
    '-c "write -P 2 512k 1M" -c "write -z 0 64k" -c "write -P 3 4500k 64k"'
scenario extl2 qcow2 "" "extended_l2=on" 4M \
    '-c "write -P 1 0 4M"' \
    '-c "write -P 2 4k 8k" -c "write -z 1M 4k" -c "discard 2M 1M" -c "write -P 3 3M 100k"'
scenario v2 qcow2 "compat=0.10" "compat=0.10" 4M \
    '-c "write -P 1 0 3M"' \
    '-c "write -P 2 1M 100k" -c "write -P 0 2M 64k"'
scenario keep qcow2 "" "" 4M \
    '-c "write -P 1 0 4M"' \
    '-c "write -P 2 1M 100k" -c "write -z 2M 64k"' -d

# The middle of a chain: base <- mid <- top; commit mid into base.
for t in tool qemu; do
    mkdir chain-$t
    qemu-img create -q -f qcow2 chain-$t/base 4M
    io qcow2 chain-$t/base -c "write -P 1 0 4M"
    qemu-img create -q -f qcow2 -b base -F qcow2 chain-$t/mid
    io qcow2 chain-$t/mid -c "write -P 2 1M 1M" -c "write -z 3M 64k"
    qemu-img create -q -f qcow2 -b mid -F qcow2 chain-$t/top
    io qcow2 chain-$t/top -c "write -P 3 1536k 64k"
done
qemu-img convert -O raw chain-tool/top chain-before.raw
"$QCOW_TOOL" commit chain-tool/mid >/dev/null
qemu-img commit -q chain-qemu/mid
qemu-img compare -q chain-tool/base chain-qemu/base || die "chain: the bases differ"
qemu-img compare -q chain-before.raw chain-tool/top || die "chain: the top reads differently"
stores_nothing chain-tool/mid
assert_qemu_check chain-tool/base
agreed=$((agreed + 1))
echo "chain: same as qemu-img commit"

# Refusals: nothing changes.
refuse ()   # refuse WHAT FILE ARGS...
{
    local what=$1 file=$2; shift 2
    cp "$file" before.copy
    tool_refuses "$what" "$QCOW_TOOL" commit "$@"
    cmp -s "$file" before.copy || die "$what: $file changed"
}
qemu-img create -q -f qcow2 alone.qcow2 1M
refuse "no backing file" alone.qcow2 alone.qcow2
mkdir busy
qemu-img create -q -f qcow2 busy/base 4M
io qcow2 busy/base -c "write -P 1 0 4M"
qemu-img create -q -f qcow2 -b base -F qcow2 busy/over
qemu-img create -q -f qcow2 -b base -F qcow2 busy/other
io qcow2 busy/over -c "write -P 2 0 1M"
qemu-io -f qcow2 -c "sleep 100000" busy/other &         # QEMU reads base
reader=$!
on_exit "kill $reader 2>/dev/null"
wait_locked busy/base
cp busy/base base.copy
refuse "backing file in use" busy/over busy/over
cmp -s busy/base base.copy || die "backing file in use: it changed"
kill $reader; wait $reader 2>/dev/null || :
refuse "bad option" alone.qcow2 --frobnicate alone.qcow2
echo "agreement: $agreed scenarios, qcow-tool commit = qemu-img commit"

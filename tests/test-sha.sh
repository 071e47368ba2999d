#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool sha: the SHA-256 of the virtual disk must be what sha256sum
# gives for `qemu-img convert -O raw`, on images of every kind (data,
# zeros, holes, compressed clusters, subclusters, backing chains, a large
# sparse disk), with the SHA extensions and with the portable code; and
# --json, and errors.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io sha256sum
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
cd "$TMPD"

io () { qemu-io -f qcow2 "${@:2}" "$1" >/dev/null || die "qemu-io $*"; }

qemu-img create -q -f qcow2 plain.qcow2 7340033          # not a multiple of 512
io plain.qcow2 -c "write -P 1 0 1M" -c "write -z 2M 1M" -c "write -P 2 3M 64k" -c "write -P 3 7000000 340033"
qemu-img convert -q -c -O qcow2 -o compression_type=zstd plain.qcow2 zstd.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k -b plain.qcow2 -F qcow2 over.qcow2 9M
io over.qcow2 -c "write -P 4 4k 8k" -c "write -z 1M 4k" -c "discard 3M 1M" -c "write -P 5 8M 1k"
qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 300k
io small.qcow2 -c "write -P 6 1000 20000"
qemu-img create -q -f qcow2 sparse.qcow2 1G
io sparse.qcow2 -c "write -P 7 100M 1M" -c "write -P 8 1022M 2M"

agreed=0
for img in plain zstd over small sparse; do
    qemu-img convert -O raw $img.qcow2 $img.raw
    want=$(sha256sum < $img.raw | cut -d' ' -f1)
    rm -f $img.raw
    got=$("$QCOW_TOOL" sha $img.qcow2)
    [ "$got" = "$want  $img.qcow2" ] || die "$img: qcow-tool sha says '$got', sha256sum $want"
    if [ $img != sparse ]; then
        got=$(QCOW_TOOL_SHA_PORTABLE=1 "$QCOW_TOOL" sha $img.qcow2 | cut -d' ' -f1)
        [ "$got" = "$want" ] || die "$img: the portable SHA-256 says $got, sha256sum $want"
    fi
    agreed=$((agreed + 1))
    echo "$img: $want"
done
"$QCOW_TOOL" sha --json plain.qcow2 | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["filename"] == "plain.qcow2" and d["virtual-size"] == 7340544 and len(d["sha256"]) == 64, d
' || die "sha --json"

for args in "nosuch.qcow2" "" "-l nosuch plain.qcow2"; do
    tool_refuses "sha $args" "$QCOW_TOOL" sha $args
done
echo "agreement: $agreed images, qcow-tool sha = qemu-img convert -O raw | sha256sum"

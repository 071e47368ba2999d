#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-compact-load.sh - background compaction while two connections keep
# the image busy (issue 15; the client is tests/compact-load.py):
#
#  a) the scenario: a new 1 GiB image served with compact-after-unmaps=64M
#     (and the default compact-rate); write 512 MiB, trim the first 400 MiB,
#     then two connections do 4 KiB random reads and writes (a flush now
#     and then) over the live 112 MiB for 15 s.  When the load stops the
#     file must be below 1.5 times the clusters in use (data and metadata,
#     counted from the refcount table by space-client.py used); every read
#     matched the model, the disk reads back as the model, QEMU finds the
#     image clean and equal to the model;
#  b) the same on an image with extended L2 entries (made by qemu-img),
#     smaller, with half of the writes going to a few hot clusters (moves
#     called off by writes, then held);
#  c) kill -9 during compaction under that load (compact-rate slowed so
#     that the kill lands mid-way): QEMU finds no errors (leaks allowed),
#     every write flushed before the kill is there, the plugin opens the
#     image and works on it again.
#
#   SEED=N    reproduce a run (always printed)
#   QCOW_COMPACT_LOAD_ROUNDS=N   kill -9 rounds in c) (default 4)

. "$(dirname "$0")/functions.sh"
require qemu-img nbdkit

use_seed
rounds=${QCOW_COMPACT_LOAD_ROUNDS:-4}
RANDOM=$SEED
py=/usr/bin/python3
sock="$TMPD/sock"
SERVER_LOG="$TMPD/server.log"
SERVER_PID=

MiB=1048576

# load IMG ARGS...: tests/compact-load.py against the server on $sock.
load ()
{
    local img=$1
    shift
    timeout 300 $py "$TESTS_DIR/compact-load.py" "$sock" "$img" --seed "$SEED" \
        --log "$SERVER_LOG" "$@" || {
        grep -v ': debug: ' "$SERVER_LOG" | tail -20 >&2
        fail "compact-load.py $* failed"
    }
}

# json_get FILE EXPR: a Python expression over the JSON in FILE (as r).
json_get ()
{
    $py -c 'import json, sys; r = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# stop: a clean shutdown of the server started by start_child.
stop ()
{
    local status=0
    kill "$SERVER_PID"
    wait "$SERVER_PID" || status=$?
    SERVER_PID=
    [ "$status" = 0 ] || fail "nbdkit exited with status $status when stopped"
}

# shrunk IMG RESULT: the file when the load stopped was below 1.5 times
# the clusters in use (counted after the server stopped: the data it
# held and the metadata).
shrunk ()
{
    local img=$1 res=$2 cs used clusters end limit
    read -r cs used clusters <<< "$($py "$TESTS_DIR/space-client.py" used "$img")"
    end=$(json_get "$res" 'r["size_end"]')
    limit=$(( used * cs * 3 / 2 ))
    echo "file $(( $(json_get "$res" 'r["size_full"]') / MiB )) MiB after writing," \
         "$(( end / MiB )) MiB when the load stopped; $(( used * cs / MiB )) MiB in use," \
         "limit $(( limit / MiB )) MiB; compactions $(json_get "$res" 'r["compactions"]')"
    json_get "$res" '"\n".join(r["reports"])'
    grep 'background compaction: failed' "$SERVER_LOG" && fail "a background compaction failed"
    [ "$end" -lt "$limit" ] ||
        fail "the file was $end bytes when the load stopped, not below $limit (1.5 x the $used clusters in use)"
}

# ---- a) the scenario -------------------------------------------------------
echo "== a) 1 GiB, 512 MiB written, 400 MiB trimmed, 2 connections for 15 s (${SECONDS}s)"
img="$TMPD/a.qcow2"
start_child "$sock" "$SERVER_LOG" -v -D qcow.verbose=1 "$QCOW_SO" file="$img" create=true size=1G \
    compact-after-unmaps=64M
load "$img" --fill 512M --trim 400M --seconds 15 --conns 2 \
    --json "$TMPD/a.json" --out "$TMPD/a.raw"
stop
shrunk "$img" "$TMPD/a.json"
assert_qemu_check "$img"
qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/a.raw" ||
    fail "a): the image differs from the model"
rm -f "$img" "$TMPD/a.raw"

# ---- b) extended L2, hot clusters -------------------------------------------
echo "== b) extended L2 entries, 4 KiB subclusters, hot clusters (${SECONDS}s)"
img="$TMPD/b.qcow2"
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k,lazy_refcounts=on \
    "$img" 256M
start_child "$sock" "$SERVER_LOG" -v -D qcow.verbose=1 "$QCOW_SO" file="$img" compact-after-unmaps=16M \
    compact-rate=16M
load "$img" --fill 128M --trim 96M --seconds 8 --conns 2 --hot 512K \
    --json "$TMPD/b.json" --out "$TMPD/b.raw"
stop
shrunk "$img" "$TMPD/b.json"
assert_qemu_check "$img"
qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/b.raw" ||
    fail "b): the image differs from the model"
rm -f "$img" "$TMPD/b.raw"

# ---- c) kill -9 during compaction under load --------------------------------
clusters=(65536 4096)
for (( round = 1; round <= rounds; round++ )); do
    cluster=${clusters[(round - 1) % 2]}
    (( round % 2 )) && lazy=false || lazy=true
    ms=$(( 300 + RANDOM % 2700 ))
    after=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
    echo "== c) kill -9 round $round: cluster $cluster, lazy refcounts $lazy," \
         "kill ${after}s into the load (${SECONDS}s)"
    img="$TMPD/c.qcow2"
    rm -f "$img"
    start_child "$sock" "$SERVER_LOG" -v -D qcow.verbose=1 "$QCOW_SO" file="$img" create=true size=256M \
        cluster-size=$cluster lazy-refcounts=$lazy compact-after-unmaps=16M \
        compact-rate=8M
    SEED=$((SEED + round)) load "$img" --fill 128M --trim 100M --seconds 10 \
        --conns 2 --hot 256K --flush-every 50 --kill "$SERVER_PID" \
        --kill-after "$after" --state "$TMPD/state.json"
    status=0
    wait "$SERVER_PID" || status=$?
    SERVER_PID=
    [ "$status" = 137 ] || fail "round $round: nbdkit exited with $status, not killed by SIGKILL"
    grep 'background compaction' "$SERVER_LOG" | sed 's/.*background/background/' || true
    assert_qemu_check "$img" --allow-leaks
    plugin_raw "$img" "$TMPD/plugin.raw" -r
    raw_of "$img" "$TMPD/qemu.raw"
    assert_same "$TMPD/plugin.raw" "$TMPD/qemu.raw" "round $round: plugin and QEMU contents after the kill"
    $py "$TESTS_DIR/compact-load.py" verify "$TMPD/state.json" "$TMPD/plugin.raw" ||
        fail "round $round: a flushed write is missing after the kill"
    # Open it read-write again (compacting) and work on it.
    run=$(printf ' %q' $py "$TESTS_DIR/random-model.py" --seed "$((SEED + round))" \
          --cluster "$cluster" --seconds 1 --base "$TMPD/plugin.raw" \
          --out "$TMPD/model.raw" --conns 2)
    timeout -k 5 120 nbdkit -U - "$QCOW_SO" file="$img" compact-after-unmaps=1M \
        --run "$run \"\$unixsocket\"" || fail "round $round: workload after the kill failed"
    assert_qemu_check "$img" --allow-leaks
    qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/model.raw" ||
        fail "round $round: after the workload the image differs from the model"
    rm -f "$img" "$TMPD"/*.raw "$TMPD/state.json"
done

echo "all parts passed in ${SECONDS}s (seed $SEED)"

#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-compact.sh - compaction: clusters move from the end of the file into
# free space and the file is truncated (the client side is
# tests/space-client.py, and tests/random-model.py for the workload):
#
#  a) offline, `qcow-tool compact` on images QEMU made and fragmented
#     (v2 and v3, 512 B and 64 KiB clusters, refcount_bits 1 and 16):
#     the file shrinks to the clusters in use (counted from the refcount
#     table by space-client.py used, and QEMU's image end offset), the
#     contents stay the same and qemu-img check is clean;
#  b) online, compact-after-unmaps=1M: after trimming most of the data the
#     file shrinks within seconds while the data reads back intact;
#  c) a random workload over 4 and 8 connections (writes, trims, zeroes,
#     flushes, checked reads; tests/random-model.py) while background
#     compaction runs again and again (it must run and move clusters);
#  d) kill -9 during compaction: QEMU finds no errors, everything as of
#     the last completed flush is there, and the plugin opens the image
#     and works again.
#
#   SEED=N    reproduce a run (always printed)
#   QCOW_COMPACT_ROUNDS=N   kill -9 rounds in d) (default 6)
#   QCOW_COMPACT_PARTS=abcd the parts to run (default all)
#   QCOW_VIA=filter|powerloss  d) through the filter (functions.sh
#                           serve_args), the image inside a fixed-size file
#                           (so only busy rounds: the file never shrinks);
#                           with powerloss the kill is a power cut
#                           (tests/test-powerloss.sh)

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdkit --version

use_seed
rounds=${QCOW_COMPACT_ROUNDS:-6}
parts=${QCOW_COMPACT_PARTS:-abcd}
RANDOM=$SEED

# part X: true if part X is to run.
part ()
{
    [[ $parts == *$1* ]]
}

py=/usr/bin/python3
client ()
{
    $py "$TESTS_DIR/space-client.py" "$@" || fail "space-client.py $1 failed"
}

sock="$TMPD/sock"

# verdict IMG MODEL [--allow-leaks]: QEMU finds IMG clean and equal to MODEL.
verdict ()
{
    assert_qemu_check "$1" $3
    qemu-img compare -q -f qcow2 -F raw "$1" "$2" ||
        fail "qemu-img compare: $1 differs from the model $2"
}

file_size ()
{
    stat -c %s "$1"
}

# The server started by start_child, until it has been waited for.
SERVER_PID=
on_exit '[ -n "$SERVER_PID" ] && kill -9 "$SERVER_PID" 2>/dev/null'

# Its debug messages (compaction runs) go here.
SERVER_LOG="$TMPD/server.log"

# hung WHAT: the server (or its client) made no progress for a minute:
# show where the server's threads are in the plugin (if gdb is there),
# kill it and fail.
hung ()
{
    if command -v gdb >/dev/null; then
        echo "--- nbdkit (pid $SERVER_PID) threads, frames in the plugin:" >&2
        timeout 60 gdb -p "$SERVER_PID" -batch -ex 'thread apply all bt' 2>/dev/null |
            grep -E '^Thread|core/|plugin/' >&2 || true
    fi
    kill -9 "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    fail "$*: no progress for 60 s (nbdkit hung)"
}

# stop_child: stop the server started by start_child (a clean shutdown:
# it must exit with status 0 within a minute).
stop_child ()
{
    local status=0
    kill "$SERVER_PID"
    ( sleep 60; kill -9 "$SERVER_PID" 2>/dev/null ) &
    local watchdog=$!
    wait "$SERVER_PID" || status=$?
    SERVER_PID=
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null || true
    [ "$status" = 0 ] || fail "nbdkit exited with status $status when stopped"
}

# ---- a) offline -----------------------------------------------------------

# fragment IMG SIZE-MIB: write the image in 16 pieces (and two unaligned
# writes) in random order, then discard every other piece and a few more,
# so that data sits at the end of the file behind holes.
fragment ()
{
    local img=$1 piece=$(( $2 * 1048576 / 16 )) i j t order=() cmds=()
    for (( i = 0; i < 16; i++ )); do order+=("$i"); done
    for (( i = 15; i > 0; i-- )); do
        j=$(( RANDOM % (i + 1) ))
        t=${order[i]}; order[i]=${order[j]}; order[j]=$t
    done
    for i in "${order[@]}"; do
        cmds+=(-c "write -P $(( i * 15 + 1 )) $(( i * piece )) $piece")
    done
    cmds+=(-c "write -P 0xee $(( 3 * piece + 1000 )) 5000")
    cmds+=(-c "write -P 0xdd $(( 15 * piece - 777 )) 3333")
    qemu-io -f qcow2 "${cmds[@]}" "$img" >/dev/null || fail "qemu-io write $img"
    cmds=()
    for (( i = 0; i < 16; i++ )); do
        (( i % 2 == 0 || RANDOM % 4 == 0 )) && cmds+=(-c "discard $(( i * piece )) $piece")
    done
    qemu-io -f qcow2 -d unmap "${cmds[@]}" "$img" >/dev/null || fail "qemu-io discard $img"
}

# json_field JSON KEY
json_field ()
{
    echo "$1" | $py -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$2"
}

offline ()
{
    local create_opts=$1 mib=$2 img="$TMPD/off.qcow2" res before after end
    local cs used_before used file_clusters
    echo "== offline: $create_opts, $mib MiB (${SECONDS}s)"
    qemu-img create -q -f qcow2 -o "$create_opts" "$img" ${mib}M
    fragment "$img" "$mib"
    assert_qemu_check "$img"
    raw_of "$img" "$TMPD/off.raw"
    before=$(file_size "$img")
    read -r cs used_before _ <<< "$(client used "$img")"
    res=$("$QCOW_TOOL" compact "$img" --json) || fail "qcow-tool compact $img failed"
    echo "$res"
    after=$(file_size "$img")
    read -r cs used file_clusters <<< "$(client used "$img")"
    echo "file $before -> $after bytes; $used_before -> $used clusters of $cs bytes in use"
    [ "$(json_field "$res" old_size)" = $(( (before + 511) / 512 )) ] ||
        fail "$create_opts: old_size is not the file size before ($before bytes)"
    [ "$(json_field "$res" new_size)" = $(( (after + 511) / 512 )) ] ||
        fail "$create_opts: new_size is not the file size after ($after bytes)"
    [ "$after" -lt "$before" ] || fail "$create_opts: compact did not shrink the file ($before -> $after)"
    [ "$used" -le "$used_before" ] ||
        fail "$create_opts: compaction left more clusters in use ($used_before -> $used)"
    # Close to the space in use: at most 1% (and 2 clusters) over.
    (( file_clusters <= used + used / 100 + 2 )) ||
        fail "$create_opts: after compaction the file has $file_clusters clusters, $used in use"
    end=$(qemu-img check -f qcow2 --output=json "$img" |
          $py -c 'import json, sys; print(json.load(sys.stdin)["image-end-offset"])')
    [ "$end" = "$after" ] || fail "$create_opts: QEMU's image end offset $end is not the file size $after"
    assert_qemu_check "$img"
    qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/off.raw" ||
        fail "$create_opts: compaction changed the contents"
    rm -f "$img" "$TMPD/off.raw"
}

if part a; then
    offline compat=1.1,cluster_size=65536,refcount_bits=16 16
    offline compat=1.1,cluster_size=65536,refcount_bits=1 16
    offline compat=1.1,cluster_size=512,refcount_bits=16 4
    offline compat=1.1,cluster_size=512,refcount_bits=1 4
    offline compat=0.10,cluster_size=65536 16
    offline compat=0.10,cluster_size=512 4
fi

# ---- b) online ------------------------------------------------------------
if part b; then
    for cluster in 65536 512; do
        echo "== online: cluster $cluster, compact-after-unmaps=1M (${SECONDS}s)"
        img="$TMPD/online.qcow2"
        start_server "$sock" "$QCOW_SO" file="$img" create=true size=32M \
            cluster-size=$cluster compact-after-unmaps=1M
        client online "$sock" "$img" --seed "$SEED" --cluster $cluster \
            --out "$TMPD/model" --wait 8
        stop_server "$sock"
        verdict "$img" "$TMPD/model"
        plugin_raw "$img" "$TMPD/reread" -r
        assert_same "$TMPD/reread" "$TMPD/model" "online: image reopened and the model"
        rm -f "$img" "$TMPD/model" "$TMPD/reread"
    done
fi

# ---- c) under load --------------------------------------------------------
# load CLUSTER SIZE SECONDS THRESHOLD CONNECTIONS: the workload on a new
# image, compacting whenever THRESHOLD bytes were freed.
load ()
{
    local cluster=$1 size=$2 seconds=$3 threshold=$4 conns=$5
    local img="$TMPD/load.qcow2" log="$TMPD/server.log" status=0
    local seed=$((SEED + cluster))
    echo "== under load: cluster $cluster, $size, ${seconds}s, $conns connections, compact-after-unmaps=$threshold (seed $seed) (${SECONDS}s)"
    start_child "$sock" "$SERVER_LOG" -v -D qcow.verbose=1 "$QCOW_SO" file="$img" create=true size="$size" \
        cluster-size="$cluster" compact-after-unmaps="$threshold"
    timeout 60 $py "$TESTS_DIR/random-model.py" "$sock" --seed "$seed" \
        --cluster "$cluster" --seconds "$seconds" --out "$TMPD/model" \
        --conns "$conns" --depth 8 \
        --mix read=25,write=30,fua=4,flush=6,zero=10,trim=20,burst=5 || status=$?
    [ $status = 124 ] && hung "the workload under compaction (random-model.py seed $seed)"
    if [ $status != 0 ]; then
        grep -v ': debug: ' "$log" | tail -20 >&2
        fail "the workload under compaction failed (random-model.py seed $seed)"
    fi
    stop_child
    grep 'background compaction' "$log" | sed 's/.*background/background/' | tail -5
    local runs moved
    runs=$(grep -c 'background compaction: done' "$log" || true)
    moved=$(grep 'background compaction: done' "$log" |
            sed 's/.*done, \([0-9]*\) references.*/\1/' | awk '{ s += $1 } END { print s + 0 }')
    ! grep -q 'background compaction: failed' "$log" || fail "a background compaction failed"
    echo "$runs compactions, $moved references updated"
    [ "$runs" -ge 2 ] || fail "only $runs background compactions ran during the workload"
    [ "$moved" -gt 0 ] || fail "the background compactions moved nothing"
    verdict "$img" "$TMPD/model"
    rm -f "$img" "$TMPD/model" "$log"
}
if part c; then
    load 65536 32M 6 256K 4
    load 4096 16M 6 64K 8
fi

# ---- d) kill -9 during compaction -----------------------------------------

if part d; then
    img="$TMPD/crash.qcow2"
    state="$TMPD/state.json"
    clusters=(512 4096 65536)
    midway=0
    for (( round = 1; round <= rounds; round++ )); do
        seed=$((SEED + round))
        cluster=${clusters[(round - 1) % 3]}
        (( (round - 1) / 3 % 2 == 0 )) && mode=--quiet || mode=--busy
        [ "${QCOW_VIA:-plugin}" = plugin ] || mode=--busy
        # Quiet rounds kill within 0.3 s of seeing compaction copy (it takes
        # 0.1 to 1 s), busy ones within a second of the flush.
        [ $mode = --quiet ] && ms=$(( RANDOM % 300 )) || ms=$(( RANDOM % 1000 ))
        kill_after=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
        echo "== kill -9 round $round: seed $seed, cluster $cluster, ${mode#--}, kill within ${kill_after}s (${SECONDS}s)"
        rm -f "$img"
        # Lazy refcounts off: refcounts on disk must be right at every moment.
        serve_args "$img" create=true size=16M cluster-size=$cluster \
            lazy-refcounts=false compact-after-unmaps=1M
        start_child "$sock" "$SERVER_LOG" -v -D qcow.verbose=1 "${SERVE[@]}"
        extra=()
        [ $mode = --quiet ] && extra=(--quiet)
        status=0
        timeout 60 $py "$TESTS_DIR/space-client.py" crash "$sock" "$SERVER_PID" "$state" \
            --image "$img" --seed "$seed" --cluster $cluster --kill-after "$kill_after" \
            "${extra[@]}" || status=$?
        [ $status = 124 ] && hung "round $round: I/O during compaction"
        [ $status = 0 ] || fail "round $round: space-client.py crash failed"
        status=0
        wait "$SERVER_PID" || status=$?
        SERVER_PID=
        [ "$status" = 137 ] || fail "round $round: nbdkit exited with $status, not killed by SIGKILL"
        power_cut "$img" "$seed"
        if grep 'background compaction' "$TMPD/server.log" | sed 's/.*background/background/'; then
            :
        else
            echo "(killed before any compaction finished)"
            midway=$((midway + 1))
        fi

        status=0
        out=$(qemu-img check -f qcow2 "$img" 2>&1) || status=$?
        case $status in
        0|3) echo "qemu-img check: $status" ;;
        *) echo "$out" >&2; fail "round $round: qemu-img check exited with $status after the kill" ;;
        esac
        read_crashed "$img" "round $round"
        client verify "$state" "$TMPD/plugin.raw"

        # Open it read-write again and work on it.
        run=$(printf ' %q' $py "$TESTS_DIR/random-model.py" --seed "$seed" \
              --cluster "$cluster" --seconds 0.5 --base "$TMPD/plugin.raw" \
              --out "$TMPD/model.raw")
        serve_args "$img" compact-after-unmaps=1M
        timeout -k 5 60 nbdkit -U - "${SERVE[@]}" \
            --run "$run \"\$unixsocket\"" || fail "round $round: workload after the kill failed"
        verdict "$img" "$TMPD/model.raw" --allow-leaks
        rm -f "$img" "$state" "$state.durable" "$TMPD"/*.raw
    done

    echo "$midway of $rounds kills came before the first compaction finished"
fi
echo "all parts passed in ${SECONDS}s (seed $SEED)"

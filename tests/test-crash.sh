#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-crash.sh - crash safety: kill -9 nbdkit while it writes.
#
# Each round: the plugin creates an image (512 B to 64 KiB clusters, so
# that L2 tables, refcount blocks and the refcount table grow all the
# time; lazy refcounts on and off), tests/crash-client.py writes random
# data over 4 connections with FUA writes and flushes mixed in, and kills
# nbdkit with SIGKILL at a random moment with commands in flight.  Then:
#
#  - qemu-img check: no errors (leaks are fine).  A dirty image with lazy
#    refcounts may have refcounts that are too low (QEMU's own crashed
#    images do: qemu-img check exits 2 on them), nothing else, and
#    `qemu-img check -r all` must repair it without changing the data;
#  - the plugin (read-only, leaving the file untouched) and QEMU must
#    read the same contents, in which every write acknowledged as durable
#    is present;
#  - the plugin must open it read-write again (repairing it if dirty),
#    keep the data, pass a random workload, and leave it clean: qemu-img
#    check clean (leaks left by the crash excepted, unless the image was
#    dirty and so rebuilt) and equal to the model.
#
#   SEED=N                    reproduce a run (always printed)
#   QCOW_CRASH_ROUNDS=N       number of rounds (default 8)
#   QCOW_VIA=filter           through the filter over nbdkit's file plugin,
#                             the image inside a fixed-size file
#                             (tests/test-filter-crash.sh; functions.sh)
#   QCOW_VIA=powerloss        the same, and the kill is a power cut: every
#                             write since the last flush may be lost, in
#                             part or whole; every other round the server
#                             is cut when its N-th flush reaches the disk
#                             (tests/test-powerloss.sh)

. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdkit --version

use_seed
rounds=${QCOW_CRASH_ROUNDS:-8}
RANDOM=$SEED

py=/usr/bin/python3
client="$TESTS_DIR/crash-client.py"
sock="$TMPD/sock"
img="$TMPD/crash.qcow2"
state="$TMPD/state.json"


# json_leaks IMG: the number of leaked clusters qemu-img check finds.
# QEMU looks only at clusters inside the file, but a crash can leave
# refcounts for clusters past its end (counted before their data was
# written): so check a copy grown by 64 MiB of zeros (the same image).
json_leaks ()
{
    local out copy="$TMPD/leaks.qcow2"
    cp --sparse=always "$1" "$copy"
    truncate -s +64M "$copy"
    out=$(qemu-img check -f qcow2 --output=json "$copy" 2>/dev/null) || true
    rm -f "$copy"
    echo "$out" | $py -c 'import json, sys; print(json.load(sys.stdin).get("leaks", 0))' ||
        fail "qemu-img check --output=json $1 gave no verdict"
}

# check_crashed: QEMU's verdict on the image just after the crash.
# Sets $leaks (leaked clusters) and $dirty (true if the image is marked
# dirty: its refcounts must be rebuilt before it is written again).
check_crashed ()
{
    local out status=0 bad
    out=$(qemu-img check -f qcow2 "$img" 2>&1) || status=$?
    dirty=$(qemu_info_field "$img" dirty-flag)
    case $status in
    0|3) ;;
    2)
        # Lazy refcounts: the dirty bit stands for "refcounts may be too
        # low", which is exactly what qemu-img check reports as errors.
        [ "$dirty" = true ] || { echo "$out" >&2; fail "qemu-img check found corruption in an image not marked dirty"; }
        [ "$lazy" = on ] || { echo "$out" >&2; fail "dirty image with lazy refcounts off has errors"; }
        bad=$(echo "$out" | grep '^ERROR' |
              grep -v -E '^ERROR cluster [0-9]+ refcount=0 reference=1$' |
              grep -v -E '^ERROR OFLAG_COPIED (data|L2) cluster: .* refcount=0$' || true)
        [ -z "$bad" ] || { echo "$out" >&2; fail "qemu-img check: errors a lazy refcount crash cannot explain: $bad"; }
        ;;
    *)
        echo "$out" >&2
        fail "qemu-img check exited with $status after the crash"
        ;;
    esac
    leaks=$(json_leaks "$img")
    echo "after the crash: qemu-img check $status, dirty $dirty, $leaks leaked clusters"
}

for (( round = 1; round <= rounds; round++ )); do
    seed=$((SEED + round))
    clusters=(512 512 4096 512 65536 1024 512 65536)
    cluster=${clusters[(round - 1) % ${#clusters[@]}]}
    (( round % 2 )) && lazy=on || lazy=off
    # A fifth of the kills come in the first 50 ms (the first metadata
    # writes, the dirty bit), the others within 2.5 s.
    (( RANDOM % 5 == 0 )) && ms=$(( RANDOM % 50 )) || ms=$(( RANDOM % 2450 + 50 ))
    kill_after=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
    # Power cuts: half the rounds (with lazy refcounts on and off) at the
    # moment of greatest risk, when the N-th flush reaches the disk (the
    # server kills itself there).
    until_dead=()
    if [ "$QCOW_VIA" = powerloss ] && (( (round - 1) % 4 < 2 )); then
        # (the first few flushes create the image)
        QCOW_POWERLOSS_CUT=$(( RANDOM % 60 + 10 ))   # read by serve_args
        until_dead=(--until-dead)
        kill_after=20
        echo "== round $round: seed $seed, cluster $cluster, lazy refcounts $lazy, cut at flush $QCOW_POWERLOSS_CUT"
    else
        echo "== round $round: seed $seed, cluster $cluster, lazy refcounts $lazy, kill after ${kill_after}s"
    fi

    rm -f "$img" "$TMPD"/*.raw
    serve_args "$img" create=true size=64M \
        cluster-size="$cluster" lazy-refcounts="$lazy"
    unset QCOW_POWERLOSS_CUT
    start_child "$sock" "" "${SERVE[@]}"
    $py "$client" run "$sock" "$SERVER_PID" "$state" --seed "$seed" \
        --kill-after "$kill_after" --cluster "$cluster" --image "$img" \
        "${until_dead[@]}" || fail "round $round: crash client failed"
    status=0
    wait "$SERVER_PID" || status=$?
    [ "$status" = 137 ] || fail "nbdkit exited with $status, not killed by SIGKILL"
    power_cut "$img" "$seed"

    check_crashed

    # What the plugin (read-only: it must not repair anything) and QEMU
    # read must agree, and hold every durable write.
    read_crashed "$img" "round $round"
    $py "$client" verify "$state" "$TMPD/plugin.raw" ||
        fail "round $round: durable writes lost"

    if [ "$dirty" = true ]; then
        # QEMU can repair it, and the repair changes no data.
        cp "$img" "$TMPD/copy.qcow2"
        qemu-img check -q -r all -f qcow2 "$TMPD/copy.qcow2" >/dev/null 2>&1 || true
        assert_qemu_check "$TMPD/copy.qcow2"
        qemu-img compare -q -f qcow2 -F raw "$TMPD/copy.qcow2" "$TMPD/plugin.raw" ||
            fail "round $round: qemu-img check -r all changed the data"
        rm -f "$TMPD/copy.qcow2"
    fi

    # Open read-write again (a dirty image is repaired first), write, and
    # shut down cleanly.
    run=$(printf ' %q' $py "$TESTS_DIR/random-model.py" --seed "$seed" \
          --cluster "$cluster" --seconds 1.5 --base "$TMPD/plugin.raw" \
          --out "$TMPD/model.raw")
    serve_args "$img"
    nbdkit -U - "${SERVE[@]}" --run "$run \"\$unixsocket\"" ||
        fail "round $round: workload after the crash failed"
    status=0
    qemu-img check -q -f qcow2 "$img" >/dev/null 2>&1 || status=$?
    now_leaks=$(json_leaks "$img")
    # A dirty image was rebuilt, so it has no leaks; otherwise clusters
    # leaked by the crash may stay leaked, but no more.
    if [ "$status" = 3 ] && [ "$dirty" = false ] && [ "$now_leaks" -le "$leaks" ]; then
        echo "the $leaks clusters leaked by the crash remain leaked ($now_leaks)"
    elif [ "$status" != 0 ]; then
        qemu-img check -f qcow2 "$img" >&2 || true
        fail "round $round: qemu-img check exited with $status after reopening (leaks $now_leaks, before $leaks; dirty after the crash: $dirty)"
    fi
    [ "$(qemu_info_field "$img" dirty-flag)" = false ] ||
        fail "round $round: image still dirty after a clean shutdown"
    qemu-img compare -q -f qcow2 -F raw "$img" "$TMPD/model.raw" ||
        fail "round $round: image differs from the model after reopening"
done

echo "all $rounds rounds passed (seed $SEED)"

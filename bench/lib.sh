# SPDX-License-Identifier: BSD-3-Clause
# bench/lib.sh - shared by the bench/run-* section scripts (sourced, not run).
#
# Sets: top bench results runs so filter_so plugin_args qemu_opts data
# sockdir out;
# provides: die, parse_size, now, elapsed, start_server, server_command,
# stop_server,
# rotate, record, check_image, require_space.
#
# bench/run exports BENCH_OUT (the directory where each section leaves
# SECTION.tsv and SECTION.md) and BENCH_DATA (the parent directory of
# the images); the other settings are the BENCH_* variables documented
# in bench/run.

set -euo pipefail
export PATH=/usr/bin:$PATH   # Debian's nbdinfo, nbdcopy and python3 (libnbd)

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bench=$top/bench
results=$bench/results
runs=${BENCH_RUNS:-3}
plugin_args=(${BENCH_PLUGIN_ARGS:-})
so=$(realpath -m "${QCOW_BUILD:-$top}/qcow.so")
filter_so=$(realpath -m "${QCOW_BUILD:-$top}/qcow-filter.so")
floor_so=$(realpath -m "${QCOW_BUILD:-$top}/bench-floor.so")
out=${BENCH_OUT:?bench/lib.sh: run the sections through bench/run}
py=/usr/bin/python3

# The server flags, the same in every section.
qemu_opts=(--format=qcow2 --cache=writeback --aio=threads --persistent --shared=8)

die () { echo "${0##*/}: $*" >&2; exit 1; }
warn () { echo "${0##*/}: $*" >&2; }

# parse_size NAME VALUE: print VALUE (1G, 64k, ...) in bytes.
parse_size () {
    numfmt --from=iec "${2^^}" 2>/dev/null || die "$1=$2 is not a size"
}

[[ $runs =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS=$runs is not a positive number"

# ---- temporary files and servers, cleaned up on exit ----------------------
data=$(mktemp -d "${BENCH_DATA:-$results}/tmp.XXXXXX")   # images: on disk
sockdir=$(mktemp -d)                                      # sockets: short paths
srv_pid=
bench_cleanup () {
    if [[ -n $srv_pid ]]; then
        kill -KILL "$srv_pid" 2>/dev/null || :
        wait "$srv_pid" 2>/dev/null || :
    fi
    rm -rf "$data" "$sockdir"
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# Every run uses this copy, so a rebuild during the benchmark changes nothing.
if [[ -f $so ]]; then
    cp "$so" "$data/qcow.so"
    so=$data/qcow.so
fi
if [[ -f $filter_so ]]; then
    cp "$filter_so" "$data/qcow-filter.so"
    filter_so=$data/qcow-filter.so
fi
if [[ -f $floor_so ]]; then
    cp "$floor_so" "$data/bench-floor.so"
    floor_so=$data/bench-floor.so
fi

# require_space BYTES: the image directory must have that much free.
require_space () {
    local avail
    avail=$(df -B1 --output=avail "$data" | tail -1)
    (( avail > $1 )) ||
        die "$data: need $(numfmt --to=iec "$1") free, have $(numfmt --to=iec "$avail")"
}

now () { date +%s.%N; }
# elapsed START: seconds since START (from now), 3 decimals.
elapsed () { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

# rotate RUN ITEM...: print the items rotated left by RUN - 1, one per
# line, so that each run gives a different server the first turn.
rotate () {
    local run=$1 k n; shift
    n=$#
    local items=("$@")
    for ((k = 0; k < n; k++)); do echo "${items[(k + run - 1) % n]}"; done
}

# start_server [-r] SERVER IMAGE [PLUGIN-ARGS...]: start SERVER (plugin,
# filter (qcow-filter.so over nbdkit's file plugin), qemu, qemu-unmap
# (qemu with --discard=unmap) or raw) on IMAGE in the background (-r:
# read-only), set srv_pid and uri, and return once it answers (1 if it
# does not).  PLUGIN-ARGS are extra key=value parameters for the plugin
# (given to the filter with the qcow- prefix).
start_server () {
    local ro=()
    if [[ $1 == -r ]]; then ro=(-r); shift; fi
    local server=$1 img=$2 sock=$sockdir/$1.sock cmd a; shift 2
    rm -f "$sock"
    case $server in
        plugin) cmd=(nbdkit -f "${ro[@]}" -U "$sock" --exit-with-parent "$so" file="$img"
                     "${plugin_args[@]}" "$@") ;;
        filter) cmd=(nbdkit -f "${ro[@]}" -U "$sock" --exit-with-parent
                     --filter="$filter_so" file file="$img")
                for a in "${plugin_args[@]}" "$@"; do cmd+=("qcow-$a"); done ;;
        qemu)   cmd=(qemu-nbd "${ro[@]}" -k "$sock" "${qemu_opts[@]}" "$img") ;;
        qemu-unmap)     # a reference where discarding matters
                cmd=(qemu-nbd "${ro[@]}" -k "$sock" "${qemu_opts[@]}" --discard=unmap "$img") ;;
        raw)    cmd=(nbdkit -f "${ro[@]}" -U "$sock" --exit-with-parent file file="$img") ;;
        floor)  # nbdkit's own cost: a plugin that does no work (bench/floor.c);
                # IMG is ignored, the arguments say what it serves
                cmd=(nbdkit -f "${ro[@]}" -U "$sock" --exit-with-parent "$floor_so" "$@") ;;
        *)      die "unknown server $server" ;;
    esac
    "${cmd[@]}" >"$data/server.log" 2>&1 &
    srv_pid=$!
    uri="nbd+unix:///?socket=$sock"
    srv_sock=$sock
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$srv_pid" 2>/dev/null || break
        if [[ -S $sock ]] && nbdinfo --size "$uri" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    warn "$server did not start: ${cmd[*]}"
    sed 's/^/  /' "$data/server.log" >&2
    stop_server 2>/dev/null
    return 1
}

# server_command [-r] SERVER IMAGE [PLUGIN-ARGS...]: print the command line
# of SERVER (plugin, qemu or raw) for IMAGE, one word per line, without a
# socket: for libnbd's socket activation (bench/client.py open).
server_command () {
    local ro=()
    if [[ $1 == -r ]]; then ro=(-r); shift; fi
    local server=$1 img=$2; shift 2
    case $server in
        plugin) printf '%s\n' nbdkit "${ro[@]}" "$so" file="$img" "${plugin_args[@]}" "$@" ;;
        qemu)   printf '%s\n' qemu-nbd "${ro[@]}" "${qemu_opts[@]}" "$img" ;;
        raw)    printf '%s\n' nbdkit "${ro[@]}" file file="$img" ;;
        *)      die "unknown server $server" ;;
    esac
}

# stop_server: set rss to the server's peak RSS in KiB ("-" if it is gone),
# then stop it by its PID and wait for it (it may flush on the way out).
# Returns 1 if the server failed (a status other than 0 or SIGTERM's).
stop_server () {
    local pid=$srv_pid i status=0
    rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || :
    rss=${rss:--}
    kill -TERM "$pid" 2>/dev/null || :
    for ((i = 0; i < 1200; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || :
    wait "$pid" || status=$?
    srv_pid=
    if (( status != 0 && status != 143 )); then
        warn "server exited with status $status"
        sed 's/^/  /' "$data/server.log" >&2
        return 1
    fi
}

# check_image IMG WHAT: qemu-img check must find IMG clean (else say so,
# naming WHAT, and return 1).
check_image () {
    if ! qemu-img check -q "$1" >"$data/check.log" 2>&1; then
        warn "qemu-img check failed after $2:"
        sed 's/^/  /' "$data/check.log" >&2
        return 1
    fi
}

# record SECTION ROW SERVER RUN VALUE UNIT LABEL RSS-KIB [TARGET]: append
# one result to $out/SECTION.tsv (VALUE FAIL for a failed run).  UNIT "s"
# means lower is better; MiB/s and IOPS, higher.  TARGET is the speed-up
# over qemu-nbd the row aims at.
record () {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$2" "$3" "$4" "$5" "$6" "$7" "$8" "${9:--}" \
        >>"$out/$1.tsv"
    printf '  %-34s run %d/%d  %-6s %12s %-5s  peak RSS %s\n' "$7" "$4" "$runs" "$3" "$5" "$6" \
        "$([[ $8 == - ]] && echo - || echo "$(($8 / 1024)) MiB")"
}

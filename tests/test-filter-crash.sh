#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-filter-crash.sh - crash safety through the filter: the crash test
# (tests/test-crash.sh, tests/crash-client.py) with the image served as
# `nbdkit --filter=qcow file IMAGE`, IMAGE a fixed-size sparse file that
# qcow-create=true formats (so the image lives inside storage that cannot
# grow).  kill -9 while 4 connections write; then qemu-img check has no
# errors, the filter (read-only) and QEMU read the same contents holding
# every write acknowledged as durable, and the filter reopens it
# read-write (repairing a dirty image), passes a random workload and
# leaves it clean and equal to the model.
#
#   SEED=N                    reproduce a run (always printed)
#   QCOW_CRASH_ROUNDS=N       number of rounds (default 4 here)
QCOW_VIA=filter QCOW_CRASH_ROUNDS=${QCOW_CRASH_ROUNDS:-4} \
    exec "$(dirname "$0")/test-crash.sh" "$@"

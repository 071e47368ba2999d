#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow-tool snapshot (-c, -a, -d, -l) against QEMU: seeded random
# sequences of snapshot operations and writes, done in turn by qcow-tool
# (and the plugin) and by QEMU, on images of every kind; qemu-img check,
# qemu-img snapshot -l and every snapshot's contents as QEMU reads them
# judge each step.  See tests/snapshot-model.py.  SEED=N repeats a run.

. "$(dirname "$0")/functions.sh"
require qemu-img qemu-io nbdkit
[ -x "$QCOW_TOOL" ] || die "$QCOW_TOOL not found: run make"
use_seed
export SEED TMPD QCOW_TOOL QCOW_SO
/usr/bin/python3 "$TESTS_DIR/snapshot-model.py" || fail "snapshot model"

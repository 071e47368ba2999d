#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# test-filter-hostile.sh - the hostile-image suite (tests/test-hostile.sh,
# images damaged by tests/mkhostile.py) through the filter: every image
# is served as `nbdkit --filter=qcow file IMAGE`.  Each must be refused at
# start-up (exit status 1, a one-line reason naming the file) or give EIO
# when touched, never crash, hang or modify the file; under QCOW_VALGRIND=1
# nbdkit (and so the filter) runs under valgrind, under SANITIZE=1 with
# ASan and UBSan.
QCOW_VIA=filter exec "$(dirname "$0")/test-hostile.sh" "$@"

/* SPDX-License-Identifier: BSD-3-Clause */
/* shim.h - request translation shared by the nbdkit plugin and filter:
 * nbdkit's flags to the core's, block status into nbdkit's extents, the
 * statistics line of -D qcow.stats=1. */
#ifndef QCOW_SHIM_H
#define QCOW_SHIM_H

#include <stdint.h>

#include "qcow.h"

struct nbdkit_extents;

/* NBDKIT_FLAG_FUA, _MAY_TRIM, _FAST_ZERO as QCOW_FUA, _MAY_TRIM, _FAST_ZERO. */
unsigned shim_flags (uint32_t nbdkit_flags);

/* Block status of [OFFSET, OFFSET+COUNT) into EXTENTS (just the first
 * extent with NBDKIT_FLAG_REQ_ONE).  0 or -errno. */
int shim_extents (struct qcow *q, uint32_t count, uint64_t offset,
                  uint32_t flags, struct nbdkit_extents *extents);

/* The image's statistics as one debug line. */
void shim_print_stats (struct qcow *q);

#endif /* QCOW_SHIM_H */

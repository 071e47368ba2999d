/* SPDX-License-Identifier: BSD-3-Clause */
/* shim.c - request translation shared by the plugin and the filter
 * (shim.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>      /* only nbdkit's common functions */

#include "shim.h"

unsigned
shim_flags (uint32_t flags)
{
  return (flags & NBDKIT_FLAG_FUA ? QCOW_FUA : 0) |
         (flags & NBDKIT_FLAG_MAY_TRIM ? QCOW_MAY_TRIM : 0) |
         (flags & NBDKIT_FLAG_FAST_ZERO ? QCOW_FAST_ZERO : 0);
}

struct extents_ctx {
  struct nbdkit_extents *extents;
  uint64_t end;                 /* of the request */
  bool req_one;
  int err;                      /* nbdkit_add_extent failed: -errno */
};

static int
add_extent (uint64_t offset, uint64_t len, unsigned f, void *opaque)
{
  struct extents_ctx *c = opaque;
  uint32_t type = (f & QCOW_EXTENT_HOLE ? NBDKIT_EXTENT_HOLE : 0) |
                  (f & QCOW_EXTENT_ZERO ? NBDKIT_EXTENT_ZERO : 0);
  if (nbdkit_add_extent (c->extents, offset, len, type) == -1) {
    c->err = errno ? -errno : -EIO;
    return 1;
  }
  return c->req_one || offset + len >= c->end;
}

int
shim_extents (struct qcow *q, uint32_t count, uint64_t offset, uint32_t flags,
              struct nbdkit_extents *extents)
{
  /* One pass over the image's tables (qcow_map_all).  The run that
   * reaches past the end of the request is given whole (a hole up to the
   * next data, as nbdkit's file plugin does with SEEK_DATA): nbdkit passes
   * it on, and the client's next request starts after it. */
  struct qcow_info info;
  qcow_get_info (q, &info);
  struct extents_ctx c = { extents, offset + count,
                           (flags & NBDKIT_FLAG_REQ_ONE) != 0, 0 };
  int r = qcow_map_all (q, offset, info.size - offset, add_extent, &c);
  return r < 0 ? r : c.err;
}

void
shim_print_stats (struct qcow *q)
{
  struct qcow_stats st;
  qcow_get_stats (q, &st);
  nbdkit_debug ("stats: reads=%" PRIu64 " writes=%" PRIu64 " flushes=%" PRIu64
                " clusters_allocated=%" PRIu64 " discarded=%" PRIu64
                " erased=%" PRIu64 " freed=%" PRIu64 " bytes_punched=%" PRIu64
                " l2_cache_hits=%" PRIu64 " l2_cache_misses=%" PRIu64
                " metadata_writes=%" PRIu64 " compacted=%" PRIu64
                " compactions=%" PRIu64,
                st.reads, st.writes, st.flushes, st.clusters_allocated,
                st.discarded, st.erased, st.freed, st.bytes_punched,
                st.l2_cache_hits, st.l2_cache_misses, st.metadata_writes,
                st.compacted, st.compactions);
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* create.c - defaults and creating a new image file.
 *
 * qcow_create writes a complete, empty image (header, refcount structure,
 * an all-zero L1 table), syncs it and closes it; the file is locked as a
 * writer while that happens, so an image in use is refused before it is
 * truncated. */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

/* ---- defaults ---- */
void
qcow_config_default (struct qcow_config *cfg)
{
  memset (cfg, 0, sizeof *cfg);
  cfg->discard = true;
  cfg->locking = true;
  cfg->compact_rate = QCOW_DEFAULT_COMPACT_RATE;
}

void
qcow_create_opts_default (struct qcow_create_opts *o)
{
  memset (o, 0, sizeof *o);
  o->cluster_bits = 16;
  o->refcount_order = 4;
  o->version = 3;
  o->lazy_refcounts = true;
}

/* ---- create ---- */

/* The options checked and rounded; *L1_SIZE gets the L1 entries. */
static int
check_opts (const char *name, const struct qcow_create_opts *o,
            struct qcow_create_opts *opts, uint64_t *l1_size)
{
  if (o->cluster_bits < QCOW_MIN_CLUSTER_BITS || o->cluster_bits > QCOW_MAX_CLUSTER_BITS) {
    qcow_errorf (name, "cluster size must be a power of two between 512 and 2M");
    return -EINVAL;
  }
  if (o->version != 2 && o->version != 3) {
    qcow_errorf (name, "version must be 2 or 3");
    return -EINVAL;
  }
  if (o->refcount_order > 6 || (o->version == 2 && o->refcount_order != 4)) {
    qcow_errorf (name, "refcount width must be 1..64 bits (16 for version 2)");
    return -EINVAL;
  }
  if (o->compression_type > 1 || (o->version == 2 && o->compression_type)) {
    qcow_errorf (name, "compression type must be zlib, or zstd with version 3");
    return -EINVAL;
  }
  if (o->version == 2 && o->lazy_refcounts) {
    qcow_errorf (name, "lazy refcounts need version 3 (compat=1.1)");
    return -EINVAL;
  }
  const uint64_t cs = 1ULL << o->cluster_bits;
  *opts = *o;
  opts->size = (o->size + 511) & ~511ULL;
  *l1_size = div_round_up (opts->size, cs << (o->cluster_bits - 3));
  if (opts->size > (1ULL << 62) || *l1_size > QCOW_MAX_L1_BYTES / 8) {
    qcow_errorf (name, "virtual size %" PRIu64 " is too large for %" PRIu64
                 "-byte clusters", o->size, cs);
    return -EFBIG;
  }
  return 0;
}

int
qcow_create_backend (struct qcow_backend *b, const struct qcow_create_opts *o)
{
  struct qcow_create_opts opts;
  uint64_t l1_size, size;
  int r = check_opts (b->name, o, &opts, &l1_size);
  if (r < 0)
    return r;
  if (b->read_only) {
    qcow_errorf (b->name, "cannot create an image: the storage is read-only");
    return -EROFS;
  }
  if ((r = io_bsize (b, &size)) < 0)
    return r;
  const uint64_t cs = 1ULL << o->cluster_bits;
  uint64_t l1_clusters = div_round_up (l1_size * 8, cs);
  if (l1_clusters == 0)
    l1_clusters = 1;

  r = -ENOMEM;
  uint8_t *hdr = calloc (1, cs), *zero = calloc (l1_clusters, cs);
  uint16_t *counts = calloc (1 + l1_clusters, sizeof *counts);
  if (!hdr || !zero || !counts)
    goto out;
  header_build (hdr, cs, &opts, cs, l1_size);
  for (uint64_t i = 0; i < 1 + l1_clusters; i++)
    counts[i] = 1;
  uint64_t rct_off, end;
  uint32_t rct_clusters;
  r = rc_write_structure (b, o->cluster_bits, opts.refcount_order, counts,
                          1 + l1_clusters, b->ops.truncate ? UINT64_MAX : size / cs,
                          &rct_off, &rct_clusters, &end);
  if (r < 0)
    goto out;
  wr64 (hdr + HDR_RCT_OFFSET, rct_off);
  wr32 (hdr + HDR_RCT_CLUSTERS, rct_clusters);
  /* The L1 table: zeros (written so the file covers it), then the header
   * last, so that a crash before it leaves no half image behind. */
  if ((r = io_bpwrite (b, zero, l1_clusters * cs, cs)) < 0 ||
      (r = io_bflush (b)) < 0 || (r = io_bpwrite (b, hdr, cs, 0)) < 0)
    goto out;
  if (b->ops.truncate && (r = b->ops.truncate (b->opaque, end * cs)) < 0) {
    qcow_errorf (b->name, "truncate: %s", strerror (-r));
    goto out;
  }
  r = io_bflush (b);
 out:
  free (hdr);
  free (zero);
  free (counts);
  return r;
}

int
qcow_create (const char *path, const struct qcow_create_opts *o, bool overwrite)
{
  struct qcow_create_opts opts;
  uint64_t l1_size;
  int r = check_opts (path, o, &opts, &l1_size);
  if (r < 0)
    return r;
  /* No O_TRUNC: an image in use is refused before it is truncated. */
  struct qcow_backend *b;
  r = backend_open_file_flags (path, O_RDWR | O_CREAT | (overwrite ? 0 : O_EXCL),
                               0644, &b);
  if (r < 0) {
    qcow_errorf (path, "%s", r == -EEXIST ? "file exists" : strerror (-r));
    return r;
  }
  char lockmsg[256];
  if ((r = backend_lock (b, QCOW_LOCK_WRITE, lockmsg, sizeof lockmsg)) < 0) {
    qcow_errorf (path, "%s", lockmsg);
    qcow_backend_free (b);
    return r;
  }
  if (overwrite && b->ops.truncate && (r = b->ops.truncate (b->opaque, 0)) < 0)
    qcow_errorf (path, "truncate: %s", strerror (-r));
  if (r == 0)
    r = qcow_create_backend (b, o);
  qcow_backend_free (b);
  return r;
}

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
int
qcow_create (const char *path, const struct qcow_create_opts *o, bool overwrite)
{
  if (o->cluster_bits < QCOW_MIN_CLUSTER_BITS || o->cluster_bits > QCOW_MAX_CLUSTER_BITS) {
    qcow_errorf (path, "cluster size must be a power of two between 512 and 2M");
    return -EINVAL;
  }
  if (o->version != 2 && o->version != 3) {
    qcow_errorf (path, "version must be 2 or 3");
    return -EINVAL;
  }
  if (o->refcount_order > 6 || (o->version == 2 && o->refcount_order != 4)) {
    qcow_errorf (path, "refcount width must be 1..64 bits (16 for version 2)");
    return -EINVAL;
  }
  if (o->version == 2 && o->lazy_refcounts) {
    qcow_errorf (path, "lazy refcounts need version 3 (compat=1.1)");
    return -EINVAL;
  }
  const uint64_t cs = 1ULL << o->cluster_bits;
  struct qcow_create_opts opts = *o;
  opts.size = (o->size + 511) & ~511ULL;
  uint64_t l1_size = div_round_up (opts.size, cs << (o->cluster_bits - 3));
  if (opts.size > (1ULL << 62) || l1_size > QCOW_MAX_L1_BYTES / 8) {
    qcow_errorf (path, "virtual size %" PRIu64 " is too large for %" PRIu64
                 "-byte clusters", o->size, cs);
    return -EFBIG;
  }
  uint64_t l1_clusters = div_round_up (l1_size * 8, cs);
  if (l1_clusters == 0)
    l1_clusters = 1;

  /* No O_TRUNC: an image in use is refused before it is truncated. */
  int fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC | (overwrite ? 0 : O_EXCL), 0644);
  if (fd == -1) {
    int e = errno;
    qcow_errorf (path, "%s", e == EEXIST ? "file exists" : strerror (e));
    return -e;
  }
  char lockmsg[256];
  int r = qcow_lock_image (fd, NULL, true, lockmsg, sizeof lockmsg);
  if (r < 0) {
    qcow_errorf (path, "%s", lockmsg);
    close (fd);
    return r;
  }
  r = -ENOMEM;
  uint8_t *hdr = calloc (1, cs);
  uint16_t *counts = calloc (1 + l1_clusters, sizeof *counts);
  if (!hdr || !counts)
    goto out;
  if (overwrite && ftruncate (fd, 0) == -1) {
    r = -errno;
    qcow_errorf (path, "truncate: %s", strerror (errno));
    goto out;
  }
  header_build (hdr, cs, &opts, cs, l1_size);
  for (uint64_t i = 0; i < 1 + l1_clusters; i++)
    counts[i] = 1;
  uint64_t rct_off, end;
  uint32_t rct_clusters;
  r = rc_write_structure (fd, path, o->cluster_bits, opts.refcount_order,
                          counts, 1 + l1_clusters, &rct_off, &rct_clusters, &end);
  if (r < 0)
    goto out;
  wr64 (hdr + 48, rct_off);
  wr32 (hdr + 56, rct_clusters);
  /* The L1 table: zeros (written so the file covers it). */
  uint8_t *zero = calloc (l1_clusters, cs);
  if (!zero) { r = -ENOMEM; goto out; }
  r = io_pwrite_fd (fd, path, zero, l1_clusters * cs, cs);
  free (zero);
  if (r < 0)
    goto out;
  if ((r = io_pwrite_fd (fd, path, hdr, cs, 0)) < 0)
    goto out;
  if (ftruncate (fd, end * cs) == -1 || fsync (fd) == -1) {
    r = -errno;
    qcow_errorf (path, "%s", strerror (errno));
    goto out;
  }
  r = 0;
 out:
  free (hdr);
  free (counts);
  if (close (fd) == -1 && r == 0) {
    r = -errno;
    qcow_errorf (path, "close: %s", strerror (errno));
  }
  return r;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* commit.c - write an image's own data into its backing file, then empty
 * the image (qemu-img commit).
 *
 * The backing file (qcow2 or raw) is reopened read-write with QEMU's
 * write locks: if anyone else has it open, nothing is changed.  Then:
 *   1. the backing file grows to the image's virtual size if smaller;
 *   2. every run this image stores (qemu-img map depth 0) is copied into
 *      it: data as read, zero clusters as zeros (on a qcow2 backing file
 *      qcow_zero, so it may unmap);
 *   3. the backing file is flushed: the data is durable there;
 *   4. unless KEEP, the image is emptied: every L1 entry is cleared (its
 *      L2 tables and data lose this image's reference once that is
 *      durable, as any unlink), so it reads through to the backing file.
 * A crash before 3 leaves the image reading as before (its own clusters
 * win); after it, the image and its backing file read the same wherever
 * the emptying has got to.  The backing file stays open read-write (and
 * locked) until the image is closed.  Not for an image other requests
 * are using at the same time. */
#include <fcntl.h>
#include <stdlib.h>

#include "internal.h"

#define COPY_CHUNK (4u << 20)

/* Swap the read-only backing file for a read-write one. */
static int
reopen_backing_rw (struct qcow *q)
{
  int r;
  if (q->backing) {
    struct qcow_config cfg;
    struct qcow *b;
    qcow_config_default (&cfg);
    cfg.cache_size = q->cfg.cache_size;
    cfg.locking = q->cfg.locking;
    /* Our own read-only open holds locks that exclude a writer: drop it
     * first, and take it back if the read-write open fails. */
    qcow_disconnect (q->backing);
    q->backing = NULL;
    r = qcow_connect (q->backing_path, &cfg, &b);
    if (r == 0) {
      struct qcow_info info;
      qcow_get_info (b, &info);
      if (!info.read_write) {
        ERR (q, "backing file %s cannot be written", q->backing_path);
        qcow_disconnect (b);
        r = -EROFS;
      }
      else if ((r = qcow_lock_write (b)) < 0)
        qcow_disconnect (b);
      else
        q->backing = b;
    }
    if (r < 0) {
      cfg.read_only = true;
      if (qcow_connect (q->backing_path, &cfg, &q->backing) < 0)
        q->backing = NULL;      /* reads past this image now fail */
    }
    return r;
  }
  struct qcow_backend *b;
  if ((r = backend_open_file_flags (q->backing_path, O_RDWR, 0, &b)) < 0) {
    ERR (q, "backing file %s: %s", q->backing_path, strerror (-r));
    return r;
  }
  /* The same dance for the raw file's locks. */
  lock_change (q, q->backing_raw, QCOW_LOCK_NONE);
  if ((r = lock_change (q, b, QCOW_LOCK_WRITE)) < 0) {
    qcow_backend_free (b);
    lock_change (q, q->backing_raw, QCOW_LOCK_READ);
    return r;
  }
  qcow_backend_free (q->backing_raw);
  q->backing_raw = b;
  return 0;
}

static int
backing_write (struct qcow *q, const void *buf, uint64_t len, uint64_t off)
{
  if (q->backing)
    return qcow_write (q->backing, buf, len, off, 0);
  return io_bpwrite (q->backing_raw, buf, len, off);
}

/* Zeros into the backing file. */
static int
backing_zero (struct qcow *q, uint64_t len, uint64_t off)
{
  if (q->backing)
    return qcow_zero (q->backing, len, off, QCOW_MAY_TRIM);
  int r = 0;
  while (r == 0 && len > 0) {
    uint64_t n = len < q->cluster_size ? len : q->cluster_size;
    r = io_bpwrite (q->backing_raw, q->zero_cluster, n, off);
    off += n;
    len -= n;
  }
  return r;
}

static int
grow_backing (struct qcow *q)
{
  int r = 0;
  if (q->backing_size >= q->h.size)
    return 0;
  if (q->backing)
    r = qcow_resize (q->backing, q->h.size, false);
  else if (!q->backing_raw->ops.truncate) {
    ERR (q, "backing file %s is smaller than the image and cannot grow", q->backing_path);
    r = -ENOSPC;
  }
  else if ((r = q->backing_raw->ops.truncate (q->backing_raw->opaque, q->h.size)) < 0)
    ERR (q, "backing file %s: truncate: %s", q->backing_path, strerror (-r));
  if (r == 0)
    q->backing_size = q->h.size;
  return r;
}

/* Clear every L1 entry; the references go once that is durable. */
static int
empty_image (struct qcow *q)
{
  int r;
  uint8_t *buf = malloc (q->cluster_size);
  if (!buf)
    return -ENOMEM;
  io_lock_exclusive (q);
  pthread_mutex_lock (&q->lock);
  if ((r = begin_modify (q)) < 0 || (r = metadata_sync (q)) < 0)
    goto out;
  for (uint64_t idx = 0; idx < q->h.l1_size; idx++) {
    uint64_t l2 = q->l1[idx] & L1_OFFSET_MASK;
    if (!l2)
      continue;
    if ((r = l2_read_table (q, idx, buf)) < 0)
      goto out;
    for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++) {
      uint64_t ent = rd64 (L2E (q, buf, j)), host = ent & L2_OFFSET_MASK;
      if (ent & ENTRY_COMPRESSED)
        compressed_defer_free (q, ent);
      else if (host && q->data_path)
        rc_defer_free (q, (host >> q->cluster_bits) | DEFER_DATA_FILE);
      else if (host)
        rc_defer_free (q, host >> q->cluster_bits);
    }
    l2_drop_table (q, idx);
    q->l1[idx] = 0;
    mark_l1_dirty (q, idx);
    rc_defer_free (q, l2 >> q->cluster_bits);
  }
 out:
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);
  free (buf);
  return r;
}

int
qcow_commit (struct qcow *q, bool keep, qcow_progress_fn progress, void *opaque)
{
  int r;
  if (q->read_only) {
    ERR (q, "image is open read-only");
    return -EROFS;
  }
  if (!q->backing_path) {
    ERR (q, "image has no backing file to commit to");
    return -EINVAL;
  }
  if (q->data_raw) {
    ERR (q, "an image with a raw external data file has no backing file");
    return -EINVAL;
  }
  /* Our own write locks, then the backing file's: either fails (the
   * image or its backing file in use) before anything is written. */
  pthread_mutex_lock (&q->lock);
  r = lock_write (q);
  pthread_mutex_unlock (&q->lock);
  if (r < 0 || (r = reopen_backing_rw (q)) < 0)
    return r;
  if ((r = grow_backing (q)) < 0)
    return r;

  uint8_t *buf = malloc (COPY_CHUNK);
  if (!buf)
    return -ENOMEM;
  int last = -1;
  for (uint64_t off = 0; r == 0 && off < q->h.size;) {
    uint64_t len, host;
    unsigned f;
    if ((r = qcow_map_layer (q, off, q->h.size - off, &len, &f, &host)) < 0)
      break;
    if (len > COPY_CHUNK)
      len = COPY_CHUNK;
    if (f & QCOW_LAYER_ZERO)
      r = backing_zero (q, len, off);
    else if (f & QCOW_LAYER_DATA) {
      if ((r = qcow_read (q, buf, len, off)) == 0)
        r = backing_write (q, buf, len, off);
    }
    off += len;
    int percent = (int) (off * 100 / q->h.size);
    if (progress && percent != last && percent < 100)
      progress (last = percent, opaque);
  }
  free (buf);
  if (r < 0)
    return r;
  /* The data is durable in the backing file before the image lets go. */
  if ((r = q->backing ? qcow_flush (q->backing) : io_bflush (q->backing_raw)) < 0)
    return r;
  if (!keep && ((r = empty_image (q)) < 0 || (r = flush_all (q)) < 0))
    return r;
  if (progress)
    progress (100, opaque);
  qcow_debugf ("%s: committed into %s%s", q->filename, q->backing_path,
               keep ? "" : " and emptied");
  return 0;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* resize.c - changing the virtual size (qcow_resize).
 *
 * Growing may need a bigger L1 table, written in full to new clusters,
 * synced, then switched to in the header (the old table is freed once that
 * is durable).  Shrinking zeroes the tail of a partial last cluster and
 * unlinks everything past the new end.  Holds io_lock exclusively: no
 * request is in flight while the size changes. */
#include <stdlib.h>

#include "internal.h"

/* ---- resize and rebuild ---- */
static int
grow_l1 (struct qcow *q, uint64_t entries)
{
  const uint64_t cs = q->cluster_size;
  uint64_t nclusters = div_round_up (entries * 8, cs), first;
  int r;
  if (entries * 8 > QCOW_MAX_L1_BYTES) {
    ERR (q, "new size needs an L1 table larger than %u bytes", QCOW_MAX_L1_BYTES);
    return -EFBIG;
  }
  if ((r = metadata_sync (q)) < 0)             /* L2 tables before the new L1 */
    return r;
  if ((r = rc_alloc_contiguous (q, nclusters, &first)) < 0)
    return r;
  uint64_t *l1 = calloc (nclusters * cs / 8, 8);
  if (!l1)
    return -ENOMEM;
  memcpy (l1, q->l1, (uint64_t) q->h.l1_size * 8);
  uint64_t *buf = calloc (nclusters * cs / 8, 8);
  if (!buf) { free (l1); return -ENOMEM; }
  for (uint64_t i = 0; i < q->h.l1_size; i++)
    buf[i] = htobe64 (l1[i]);
  r = io_pwrite (q, buf, nclusters * cs, first << q->cluster_bits);
  free (buf);
  if (r < 0 || (r = metadata_sync (q)) < 0 || (r = io_sync (q)) < 0 ||
      (r = cache_resize_slots (&q->l2_cache, l2_slots (q, entries))) < 0) {
    free (l1);
    return r;
  }
  uint64_t old_off = q->h.l1_table_offset, old_n = q->h.l1_size;
  free (q->l1);
  q->l1 = l1;
  q->h.l1_size = entries;
  q->h.l1_table_offset = first << q->cluster_bits;
  q->l1_dirty_lo = q->l1_dirty_hi = 0;
  if ((r = header_write_fields (q, HDR_SIZE, HDR_RCT_OFFSET - HDR_SIZE)) < 0 || (r = io_sync (q)) < 0)
    return r;
  if (old_n)
    for (uint64_t i = 0; i < div_round_up (old_n * 8, cs); i++)
      rc_defer_free (q, (old_off >> q->cluster_bits) + i);
  return 0;
}

/* Unlink everything at or past guest cluster FROM. */
static int
discard_tail (struct qcow *q, uint64_t from)
{
  int r;
  for (uint64_t idx = from >> q->l2_bits; idx < q->h.l1_size; idx++) {
    struct centry *e = NULL;
    if (!(q->l1[idx] & L1_OFFSET_MASK))
      continue;
    uint64_t j0 = idx == (from >> q->l2_bits) ? from & ((1ULL << q->l2_bits) - 1) : 0;
    for (uint64_t j = j0; j < (1ULL << q->l2_bits); j++) {
      uint64_t gc = (idx << q->l2_bits) + j;
      if ((j == j0 || l2_slice_index (q, gc) == 0) &&
          (r = l2_get_slice (q, gc, true, &e)) < 0)
        return r;
      uint8_t *ep = L2E (q, e->data, l2_slice_index (q, gc));
      uint64_t ent = rd64 (ep);
      if (q->extl2 && rd64 (ep + 8)) {
        wr64 (ep + 8, 0);
        cache_mark_dirty (&q->l2_cache, e);
      }
      if (ent & ENTRY_COMPRESSED)
        compressed_defer_free (q, ent);
      else if (ent & L2_OFFSET_MASK)
        rc_defer_free (q, ((ent & L2_OFFSET_MASK) >> q->cluster_bits) |
                          (q->data_path ? DEFER_DATA_FILE : 0));
      if (ent) {
        wr64 (ep, 0);
        cache_mark_dirty (&q->l2_cache, e);
      }
    }
    if (j0 == 0) {                /* the whole table goes */
      uint64_t off = q->l1[idx] & L1_OFFSET_MASK;
      if ((r = metadata_sync (q)) < 0)
        return r;
      l2_drop_table (q, idx);
      q->l1[idx] = 0;
      mark_l1_dirty (q, idx);
      rc_defer_free (q, off >> q->cluster_bits);
    }
  }
  return 0;
}

int
qcow_resize (struct qcow *q, uint64_t new_size, bool ignore_data_loss)
{
  int r;
  new_size = (new_size + 511) & ~511ULL;
  if (q->read_only) {
    ERR (q, "image is open read-only");
    return -EROFS;
  }
  if (new_size > (1ULL << 62)) {
    ERR (q, "new size %" PRIu64 " is too large", new_size);
    return -EFBIG;
  }
  if (new_size < q->h.size && q->nsnap) {
    ERR (q, "cannot shrink an image that has internal snapshots");
    return -ENOTSUP;
  }
  if (new_size != q->h.size && q->nsnap && q->h.version < 3) {
    /* As QEMU: its v2 readers take every snapshot to be of the image's
     * size, and it could not apply them afterwards. */
    ERR (q, "cannot resize a version 2 image that has internal snapshots");
    return -ENOTSUP;
  }
  if (new_size < q->h.size && !ignore_data_loss) {
    ERR (q, "shrinking from %" PRIu64 " to %" PRIu64 " bytes would lose data "
         "(use --ignore-data-loss)", q->h.size, new_size);
    return -EINVAL;
  }
  io_lock_exclusive (q);
  pthread_mutex_lock (&q->lock);
  r = begin_modify (q);
  const uint64_t cs = q->cluster_size;
  if (r == 0 && new_size < q->h.size) {
    /* Zero the tail of a partial last cluster, then unlink the rest. */
    uint64_t in = new_size & (cs - 1);
    if (in) {
      struct cmap m;
      note_write (q, new_size >> q->cluster_bits, new_size >> q->cluster_bits);
      if ((r = l2_lookup (q, new_size >> q->cluster_bits, &m)) == 0 &&
          (m.kind == C_DATA || (m.kind == C_SUBCL && m.host)))
        r = io_data_pwrite (q, q->zero_cluster, cs - in, m.host + in);
    }
    if (r == 0)
      r = discard_tail (q, div_round_up (new_size, cs));
  }
  uint64_t entries = div_round_up (new_size, cs << q->l2_bits);
  if (r == 0 && entries > q->h.l1_size)
    r = grow_l1 (q, entries);
  if (r == 0 && (r = metadata_sync (q)) == 0 && (r = io_sync (q)) == 0) {
    q->h.size = new_size;
    if ((r = header_write_fields (q, HDR_SIZE, 8)) == 0)
      r = io_sync (q);
  }
  if (r == 0)
    r = rc_apply_deferred (q);
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);
  return r;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* rebuild.c - rebuilding the refcount structure from the references.
 *
 * rc_rebuild counts every reference (header, L1 and L2 tables, data and
 * compressed clusters, snapshots, the refcount structure itself) and
 * writes a fresh refcount table and blocks past the end of the file, then
 * switches the header to them: until that one write the old structure is
 * what the file says, so a crash in between leaves the image as it was.
 * Used for images opened dirty (lazy refcounts) and by
 * qcow_rebuild_refcount_table.  Under q->lock. */
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

static int
count_ref (struct qcow *q, uint16_t *counts, uint64_t E, uint64_t off,
           uint64_t n, const char *what)
{
  uint64_t c = off >> q->cluster_bits;
  if (off % q->cluster_size != 0 || c + n > E || c + n < c) {
    ERR (q, "cannot rebuild refcounts: %s at 0x%" PRIx64 " is %s", what, off,
         off % q->cluster_size ? "misaligned" : "beyond the end of the file");
    return -EIO;
  }
  if (c == 0) {
    ERR (q, "cannot rebuild refcounts: %s points into the header", what);
    return -EIO;
  }
  for (uint64_t i = c; i < c + n; i++)
    if (counts[i]++ == UINT16_MAX) {
      ERR (q, "cannot rebuild refcounts: too many references to 0x%" PRIx64,
           i << q->cluster_bits);
      return -EIO;
    }
  return 0;
}

/* Count the L2 tables and data clusters reachable from an L1 table. */
static int
count_l1 (struct qcow *q, uint16_t *counts, uint64_t E, const uint64_t *l1,
          uint64_t n, bool active, uint64_t *l2)
{
  const uint64_t cs = q->cluster_size;
  int r;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t l2off = l1[i] & L1_OFFSET_MASK;
    if (!l2off)
      continue;
    if ((r = count_ref (q, counts, E, l2off, 1, "L2 table")) < 0)
      return r;
    if (active)
      r = l2_read_table (q, i, (uint8_t *) l2);   /* with cached changes */
    else
      r = io_pread (q, l2, cs, l2off);
    if (r < 0)
      return r;
    for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++) {
      uint64_t ent = rd64 (L2E (q, l2, j));
      if (ent & ENTRY_COMPRESSED) {
        uint64_t coff, clen;
        compressed_extent (q, ent, &coff, &clen);
        uint64_t c0 = coff >> q->cluster_bits, c1 = (coff + clen - 1) >> q->cluster_bits;
        for (uint64_t c = c0; c <= c1; c++)
          if ((r = count_ref (q, counts, E, c << q->cluster_bits, 1, "compressed cluster")) < 0)
            return r;
        continue;
      }
      uint64_t off = ent & L2_OFFSET_MASK;
      if (off && !q->data_path &&       /* data file clusters: not counted */
          (r = count_ref (q, counts, E, off, 1, "data cluster")) < 0)
        return r;
    }
  }
  return 0;
}

/* Recount every reference and write a fresh refcount structure past the
 * end of the file.  Call with q->lock held and the L2 cache clean. */
int
rc_rebuild (struct qcow *q)
{
  const uint64_t cs = q->cluster_size;
  uint64_t E = div_round_up (q->file_size, cs);
  uint16_t *counts = calloc (E ? E : 1, sizeof *counts);
  uint64_t *l2 = malloc (cs);
  int r = -ENOMEM;
  if (!counts || !l2)
    goto out;
  counts[0] = 1;                /* header */
  if (q->h.l1_size &&
      (r = count_ref (q, counts, E, q->h.l1_table_offset,
                      div_round_up ((uint64_t) q->h.l1_size * 8, cs), "L1 table")) < 0)
    goto out;
  if ((r = count_l1 (q, counts, E, q->l1, q->h.l1_size, true, l2)) < 0)
    goto out;
  if (q->nsnap &&
      (r = count_ref (q, counts, E, q->h.snapshots_offset,
                      div_round_up (q->snap_table_len, cs), "snapshot table")) < 0)
    goto out;
  for (uint32_t i = 0; i < q->nsnap; i++) {
    const struct snapshot *sn = &q->snap[i];
    if (sn->l1_size == 0)
      continue;
    uint64_t *sl1 = malloc ((uint64_t) sn->l1_size * 8);
    if (!sl1) { r = -ENOMEM; goto out; }
    r = count_ref (q, counts, E, sn->l1_offset,
                   div_round_up ((uint64_t) sn->l1_size * 8, cs), "snapshot L1 table");
    if (r == 0)
      r = io_pread (q, sl1, (uint64_t) sn->l1_size * 8, sn->l1_offset);
    for (uint32_t j = 0; r == 0 && j < sn->l1_size; j++)
      sl1[j] = be64toh (sl1[j]);
    if (r == 0)
      r = count_l1 (q, counts, E, sl1, sn->l1_size, false, l2);
    free (sl1);
    if (r < 0)
      goto out;
  }
  uint64_t rct_off, new_end, limit = E;
  uint32_t rct_clusters;
  if (q->fixed_size) {
    /* The new structure goes after every cluster in use, and after the
     * old structure, which stays valid until the header switches. */
    uint64_t end = 0;
    for (uint64_t c = 0; c < E; c++)
      if (counts[c])
        end = c + 1;
    for (uint64_t c = 0; c < q->h.refcount_table_clusters; c++)
      if ((q->h.refcount_table_offset >> q->cluster_bits) + c + 1 > end)
        end = (q->h.refcount_table_offset >> q->cluster_bits) + c + 1;
    for (uint64_t i = 0; i < q->rct_entries; i++) {
      uint64_t c = (q->rct[i] & RCT_OFFSET_MASK) >> q->cluster_bits;
      if (c && c < E && c + 1 > end)
        end = c + 1;
    }
    E = end;
  }
  r = rc_write_structure (q->img, q->cluster_bits, q->h.refcount_order,
                          counts, E, q->fixed_size ? limit : UINT64_MAX,
                          &rct_off, &rct_clusters, &new_end);
  if (r < 0 || (r = io_sync (q)) < 0)
    goto out;

  /* Switch to it in memory, then on disk. */
  uint64_t entries = (uint64_t) rct_clusters * cs / 8;
  uint64_t *tab = malloc (entries * 8);
  if (!tab || (r = io_pread (q, tab, entries * 8, rct_off)) < 0) {
    free (tab);
    r = r < 0 ? r : -ENOMEM;
    goto out;
  }
  for (uint64_t i = 0; i < entries; i++)
    tab[i] = be64toh (tab[i]);
  cache_drop_all (&q->refblock_cache);
  if ((r = cache_resize_slots (&q->refblock_cache, entries)) < 0) {
    free (tab);
    goto out;
  }
  free (q->rct);
  q->rct = tab;
  q->rct_entries = entries;
  q->rct_dirty = false;
  q->h.refcount_table_offset = rct_off;
  q->h.refcount_table_clusters = rct_clusters;
  if ((r = header_write_fields (q, HDR_RCT_OFFSET, HDR_NB_SNAPSHOTS - HDR_RCT_OFFSET)) < 0 || (r = io_sync (q)) < 0)
    goto out;
  q->free_hint = 1;
  if (new_end > q->frontier)
    q->frontier = new_end;
  if (new_end << q->cluster_bits > q->file_size)
    q->file_size = new_end << q->cluster_bits;
  q->npending = 0;              /* recounted from the tables */
  q->cfill = 0;
  qcow_debugf ("%s: refcounts rebuilt (%" PRIu64 " clusters)", q->filename, E);
 out:
  free (counts);
  free (l2);
  return r;
}

int
qcow_rebuild_refcount_table (struct qcow *q)
{
  int r;
  if (q->read_only) {
    ERR (q, "image is open read-only");
    return -EROFS;
  }
  io_lock_exclusive (q);
  pthread_mutex_lock (&q->lock);
  /* Rebuild before anything else changes the file (begin_modify would
   * set the dirty bit, clear autoclear bits), so that an image whose
   * references cannot be trusted is left exactly as it was. */
  uint64_t size, now;
  r = io_bsize (q->img, &size);
  if (r == 0)
    r = lock_write (q);
  if (r == 0 && (r = metadata_sync (q)) == 0 && (r = io_sync (q)) == 0)
    r = rc_rebuild (q);
  if (r < 0 && !q->fixed_size && !q->modified &&
      io_bsize (q->img, &now) == 0 && now > size) {
    io_truncate (q, size);            /* drop a half-written structure */
    q->file_size = size;
  }
  if (r == 0 && (q->h.incompatible_features & QCOW_INCOMPAT_DIRTY) && !q->modified)
    r = header_set_incompat (q, q->h.incompatible_features & ~QCOW_INCOMPAT_DIRTY);
  if (r == 0)
    r = begin_modify (q);
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);
  return r;
}

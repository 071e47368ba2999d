/* SPDX-License-Identifier: BSD-3-Clause */
/* cluster.c - guest offset -> host offset: L1/L2 lookup and update, and
 * the ordered write-back of metadata (metadata_sync).
 *
 * Owns the in-memory L1 table (q->l1, host-endian, with a dirty index
 * range) and the L2 tables in q->l2_cache; decodes an entry into a
 * struct cmap, checking it against the file before anything follows it
 * (damage is reported through qcow_corrupt).  An L2 table about to be
 * modified is never shared with a snapshot: it is copied first.
 *
 * metadata_sync is the one place that decides the order in which dirty
 * metadata reaches the disk, so that the file is consistent at every
 * instant: data and refcount blocks (and a new refcount table) before the
 * L2 tables that use them, L2 tables before the L1 entries that point to
 * them, with a sync between each step unless lazy refcounts make the
 * refcounts' order irrelevant.  The cache calls it back before evicting a
 * dirty table.  Everything here runs with q->lock held. */
#include <stdlib.h>

#include "internal.h"

/* L1 entry IDX changed in memory: write it back at the next sync. */
void
mark_l1_dirty (struct qcow *q, uint64_t idx)
{
  if (q->l1_dirty_hi <= q->l1_dirty_lo) {
    q->l1_dirty_lo = idx;
    q->l1_dirty_hi = idx + 1;
  }
  else {
    if (idx < q->l1_dirty_lo) q->l1_dirty_lo = idx;
    if (idx + 1 > q->l1_dirty_hi) q->l1_dirty_hi = idx + 1;
  }
}

/* Where L1 entry IDX points (0: no table), validated. */
static int
table_offset (struct qcow *q, uint64_t idx, uint64_t *off)
{
  assert (idx < q->h.l1_size);     /* guest offsets are checked first */
  *off = q->l1[idx] & L1_OFFSET_MASK;
  if (*off && (*off % q->cluster_size != 0 || *off < q->cluster_size ||
               *off >= q->file_size))
    return qcow_corrupt (q, "L1 table", q->h.l1_table_offset + idx * 8,
                         "entry %" PRIu64 " points to an L2 table at 0x%"
                         PRIx64 " %s", idx, *off, *off % q->cluster_size
                         ? "that is misaligned" : *off < q->cluster_size
                         ? "inside the header" : "beyond the end of the file");
  return 0;
}

int
l2_read_slices (struct qcow *q, uint64_t idx, uint64_t first, uint64_t n,
                uint8_t *buf)
{
  uint64_t off;
  struct centry *e;
  const size_t es = q->l2_cache.esize;
  assert (first + n <= l2_slots (q, 1));
  if (l2_slots (q, 1) == 1 && idx < q->h.l1_size &&
      (e = cache_peek (&q->l2_cache, l2_slots (q, idx)))) {
    memcpy (buf, e->data, q->cluster_size);   /* maybe not written yet */
    return 0;
  }
  int r = table_offset (q, idx, &off);
  if (r < 0)
    return r;
  if (!off)
    memset (buf + first * es, 0, n * es);
  else if ((r = io_pread (q, buf + first * es, n * es, off + first * es)) < 0)
    return r;
  for (uint64_t s = first; s < first + n; s++) {
    struct centry *e = cache_peek (&q->l2_cache, l2_slots (q, idx) + s);
    if (e)
      memcpy (buf + s * es, e->data, es);
  }
  return 0;
}

int
l2_read_table (struct qcow *q, uint64_t idx, uint8_t *buf)
{
  return l2_read_slices (q, idx, 0, l2_slots (q, 1), buf);
}

/* Table IDX as it is now (with CLEAR_COPIED, no entry claiming COPIED)
 * written whole at TO; the cached slices follow it there. */
static int
write_table_at (struct qcow *q, uint64_t idx, uint64_t to, bool clear_copied)
{
  const uint64_t cs = q->cluster_size;
  const size_t es = q->l2_cache.esize;
  uint8_t *buf = malloc (cs);
  if (!buf)
    return -ENOMEM;
  int r = l2_read_table (q, idx, buf);
  if (r == 0 && clear_copied)
    for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++)
      wr64 (L2E (q, buf, j), rd64 (L2E (q, buf, j)) & ~ENTRY_COPIED);
  if (r == 0)
    r = io_pwrite (q, buf, cs, to);
  free (buf);
  if (r < 0)
    return r;
  for (uint64_t s = 0; s < l2_slots (q, 1); s++) {
    struct centry *e = cache_peek (&q->l2_cache, l2_slots (q, idx) + s);
    if (!e)
      continue;
    if (clear_copied)
      for (uint64_t j = 0; j < (1ULL << q->sl_bits); j++)
        wr64_whole (L2E (q, e->data, j), rd64 (L2E (q, e->data, j)) & ~ENTRY_COPIED);
    e->offset = to + s * es;
  }
  return 0;
}

int
l2_move_table (struct qcow *q, uint64_t idx, uint64_t to)
{
  return write_table_at (q, idx, to, false);
}

void
l2_drop_table (struct qcow *q, uint64_t idx)
{
  for (uint64_t s = 0; s < l2_slots (q, 1); s++)
    cache_drop (&q->l2_cache, l2_slots (q, idx) + s);
}

/* Table IDX is about to be modified: it must not be shared.  If its
 * refcount says it is (a snapshot refers to it), copy it to a new
 * cluster for the active L1.  Its data clusters keep their refcounts
 * (they are now reached once through each copy instead of twice through
 * one), but they are shared, so no entry in the copy may claim COPIED.
 * The old table loses our reference once the new L1 entry is durable. */
static int
unshare_table (struct qcow *q, uint64_t idx)
{
  uint64_t rc, old = q->l1[idx] & L1_OFFSET_MASK;
  int r;
  if ((r = rc_get (q, old >> q->cluster_bits, &rc)) < 0)
    return r;
  if (rc == 1) {
    __atomic_store_n (&q->l1[idx], q->l1[idx] | ENTRY_COPIED, __ATOMIC_RELEASE);
    mark_l1_dirty (q, idx);
    return 0;
  }
  uint64_t c, got;
  bool fresh;
  if ((r = rc_alloc (q, 1, &c, &got, &fresh)) < 0)
    return r;
  if ((r = write_table_at (q, idx, c << q->cluster_bits, true)) < 0) {
    rc_free (q, c, 1);
    return r;
  }
  __atomic_store_n (&q->l1[idx], (c << q->cluster_bits) | ENTRY_COPIED, __ATOMIC_RELEASE);
  mark_l1_dirty (q, idx);
  rc_defer_free (q, old >> q->cluster_bits);
  return 0;
}

int
l2_get_slice (struct qcow *q, uint64_t gc, bool alloc, struct centry **ep)
{
  const uint64_t idx = gc >> q->l2_bits, key = gc >> q->sl_bits;
  const uint64_t soff = (key & (l2_slots (q, 1) - 1)) * q->l2_cache.esize;
  uint64_t off;
  int r;
  *ep = NULL;
  assert (idx < q->h.l1_size);     /* guest offsets are checked first */
  struct centry *e = cache_peek (&q->l2_cache, key);
  if (e && (!alloc || q->l1[idx] & ENTRY_COPIED))
    return cache_get (q, &q->l2_cache, key, e->offset, false, ep);   /* LRU touch */
  if ((r = table_offset (q, idx, &off)) < 0)
    return r;
  if (!off) {
    if (!alloc)
      return 0;
    /* A new table.  Only this slice is made in the cache: the rest of
     * the cluster is written as zeros now (so that it also lies inside
     * the file when another slice is read). */
    uint64_t c, got;
    bool fresh;
    if ((r = rc_alloc (q, 1, &c, &got, &fresh)) < 0)
      return r;
    if (l2_slots (q, 1) > 1)
      r = io_pwrite (q, q->zero_cluster, q->cluster_size, c << q->cluster_bits);
    if (r == 0)
      r = cache_get (q, &q->l2_cache, key, (c << q->cluster_bits) + soff, true, ep);
    if (r < 0) {
      rc_free (q, c, 1);
      return r;
    }
    __atomic_store_n (&q->l1[idx], (c << q->cluster_bits) | ENTRY_COPIED, __ATOMIC_RELEASE);
    mark_l1_dirty (q, idx);
    return 0;
  }
  if (alloc && !(q->l1[idx] & ENTRY_COPIED)) {
    if ((r = unshare_table (q, idx)) < 0)
      return r;
    off = q->l1[idx] & L1_OFFSET_MASK;
  }
  return cache_get (q, &q->l2_cache, key, off + soff, false, ep);   /* (a hit keeps its offset) */
}

int
l2_lookup (struct qcow *q, uint64_t gc, struct cmap *m)
{
  struct centry *e;
  int r = l2_get_slice (q, gc, false, &e);
  if (r < 0) {
    memset (m, 0, sizeof *m);
    return r;
  }
  return l2_decode (q, gc, e, m);
}

/* The lock-free lookup of the read and overwrite fast path (rw.c): with
 * io_lock held shared but not q->lock, GC's mapping if its L2 table is
 * cached (or not allocated at all) and the entry is a plain one: data,
 * zero or unallocated, in an image without extended L2 entries or an
 * external data file (the caller checks those).  False: take the locked
 * path (which also reports damaged entries).  The L1 table and the slot
 * array are replaced only with io_lock held exclusively. */
bool
l2_fast_lookup (struct qcow *q, uint64_t gc, struct cmap *m)
{
  uint64_t idx = gc >> q->l2_bits, ent;
  if (idx >= q->h.l1_size)
    return false;
  if (!cache_read_word (&q->l2_cache, gc >> q->sl_bits, l2_slice_index (q, gc) << 3,
                        &ent)) {
    /* Not cached: fine if there is no table (a table linked since was
     * published in the cache first). */
    if (__atomic_load_n (&q->l1[idx], __ATOMIC_ACQUIRE) & L1_OFFSET_MASK)
      return false;
    ent = 0;
  }
  uint64_t off = ent & L2_OFFSET_MASK;
  if (ent & ENTRY_COMPRESSED)
    return false;
  if (off && (off & (q->cluster_size - 1) || off < q->cluster_size ||
              off >= __atomic_load_n (&q->file_size, __ATOMIC_RELAXED)))
    return false;
  m->copied = ent & ENTRY_COPIED;
  m->host = off;
  m->bitmap = 0;
  if (q->h.version >= 3 && (ent & ENTRY_ZERO))
    m->kind = off ? C_ZERO_ALLOC : C_ZERO;
  else
    m->kind = off ? C_DATA : C_UNALLOC;
  return true;
}

/* Guest cluster GC's mapping from its L2 table E (NULL: none allocated),
 * validated. */
int
l2_decode (struct qcow *q, uint64_t gc, const struct centry *e, struct cmap *m)
{
  if (!e) {
    memset (m, 0, sizeof *m);
    m->kind = q->extl2 ? C_SUBCL : C_UNALLOC;
    return 0;
  }
  return l2_decode_at (q, gc, L2E (q, e->data, l2_slice_index (q, gc)),
                       e->offset + L2E_OFF (q, gc), m);
}

/* The same from the entry at EP (in a table or a slice), which is at
 * AT in the file (for messages). */
int
l2_decode_at (struct qcow *q, uint64_t gc, const uint8_t *ep, uint64_t at,
              struct cmap *m)
{
  memset (m, 0, sizeof *m);
  uint64_t ent = rd64 (ep);
  if (q->extl2)
    m->bitmap = rd64 (ep + 8);
  m->copied = ent & ENTRY_COPIED;
  if ((ent & ENTRY_COMPRESSED) && q->data_path) {
    return qcow_corrupt (q, "L2 table", at,
                         "compressed cluster at guest offset 0x%" PRIx64
                         " in an image with an external data file",
                         gc << q->cluster_bits);
  }
  if (ent & ENTRY_COMPRESSED) {
    if (q->extl2 && m->bitmap) {
      return qcow_corrupt (q, "L2 table", at,
                           "compressed cluster at guest offset 0x%" PRIx64
                           " has a subcluster bitmap", gc << q->cluster_bits);
    }
    m->kind = C_COMPRESSED;
    m->host = ent;
    return 0;
  }
  if (q->extl2) {
    uint64_t off = ent & L2_OFFSET_MASK;
    uint64_t alloc = m->bitmap & EXTL2_ALLOC_MASK, zero = m->bitmap >> 32;
    if ((ent & ENTRY_ZERO) || (alloc & zero) || (alloc && !off) ||
        (off && (off % q->cluster_size != 0 || off < q->cluster_size ||
                 off >= q->file_size))) {
      return qcow_corrupt (q, "L2 table", at,
                           "extended entry for guest offset 0x%" PRIx64
                           " is invalid (0x%016" PRIx64 " 0x%016" PRIx64 ")",
                           gc << q->cluster_bits, ent, m->bitmap);
    }
    m->kind = C_SUBCL;
    m->host = off;
    return 0;
  }
  uint64_t off = ent & L2_OFFSET_MASK;
  bool zero = q->h.version >= 3 && (ent & ENTRY_ZERO);
  if (q->data_path) {
    /* External data file: host offset = guest offset, or unallocated. */
    bool alloc = off || (ent & ENTRY_COPIED);
    if (alloc && off != gc << q->cluster_bits) {
      return qcow_corrupt (q, "L2 table", at,
                           "entry for guest offset 0x%" PRIx64 " points to 0x%"
                           PRIx64 ": with an external data file they must "
                           "be equal", gc << q->cluster_bits, off);
    }
    m->copied = true;
    m->host = off;
    m->kind = zero ? (alloc ? C_ZERO_ALLOC : C_ZERO) : alloc ? C_DATA : C_UNALLOC;
    return 0;
  }
  if (off && (off % q->cluster_size != 0 || off < q->cluster_size ||
              off >= q->file_size)) {
    return qcow_corrupt (q, "L2 table", at,
                         "entry for guest offset 0x%" PRIx64 " points to 0x%"
                         PRIx64 " %s", gc << q->cluster_bits, off,
                         off % q->cluster_size ? "which is misaligned"
                         : off < q->cluster_size ? "inside the header"
                         : "beyond the end of the file");
  }
  if (zero) {
    m->kind = off ? C_ZERO_ALLOC : C_ZERO;
    m->host = off;
    return 0;
  }
  if (!off) {
    m->kind = C_UNALLOC;
    return 0;
  }
  m->kind = C_DATA;
  m->host = off;
  return 0;
}

/* Both words of an extended entry. */
int
l2_set_with_bitmap (struct qcow *q, uint64_t gc, uint64_t entry, uint64_t bitmap)
{
  struct centry *e;
  int r = l2_get_slice (q, gc, true, &e);
  if (r < 0)
    return r;
  uint8_t *ep = L2E (q, e->data, l2_slice_index (q, gc));
  wr64_whole (ep, entry);
  if (q->extl2)
    wr64 (ep + 8, bitmap);
  cache_mark_dirty (&q->l2_cache, e);
  if (entry & L2_OFFSET_MASK)
    note_link (q);
  return 0;
}

/* The descriptor only (an extended entry keeps its bitmap). */
int
l2_set (struct qcow *q, uint64_t gc, uint64_t entry)
{
  struct centry *e;
  int r = l2_get_slice (q, gc, true, &e);
  if (r < 0)
    return r;
  l2_set_in (q, e, gc, entry);
  return 0;
}

/* The same in E, GC's L2 slice, already in hand (and not shared). */
void
l2_set_in (struct qcow *q, struct centry *e, uint64_t gc, uint64_t entry)
{
  wr64_whole (L2E (q, e->data, l2_slice_index (q, gc)), entry);
  cache_mark_dirty (&q->l2_cache, e);
  if (entry & L2_OFFSET_MASK)
    note_link (q);              /* it may point at data not synced yet */
}

/* l2_set for an entry whose data is known to be durable already (a
 * cluster compaction copied and synced): no link to sync for. */
int
l2_set_synced (struct qcow *q, uint64_t gc, uint64_t entry)
{
  struct centry *e;
  int r = l2_get_slice (q, gc, true, &e);
  if (r == 0) {
    wr64_whole (L2E (q, e->data, l2_slice_index (q, gc)), entry);
    cache_mark_dirty (&q->l2_cache, e);
  }
  return r;
}

static int
write_l1_range (struct qcow *q)
{
  uint64_t lo = q->l1_dirty_lo, hi = q->l1_dirty_hi;
  uint64_t *buf = malloc ((hi - lo) * 8);
  if (!buf)
    return -ENOMEM;
  for (uint64_t i = lo; i < hi; i++)
    buf[i - lo] = htobe64 (q->l1[i]);
  int r = io_pwrite (q, buf, (hi - lo) * 8, q->h.l1_table_offset + lo * 8);
  free (buf);
  if (r == 0)
    q->l1_dirty_lo = q->l1_dirty_hi = 0;
  return r;
}

int
write_rct (struct qcow *q)
{
  uint64_t n = q->rct_entries;
  uint64_t *buf = malloc (n * 8);
  if (!buf)
    return -ENOMEM;
  for (uint64_t i = 0; i < n; i++)
    buf[i] = htobe64 (q->rct[i]);
  int r = io_pwrite (q, buf, n * 8, q->h.refcount_table_offset);
  free (buf);
  if (r == 0)
    q->rct_dirty = false;
  return r;
}

static bool
links_unsynced (struct qcow *q)
{
  return __atomic_load_n (&q->link_seq, __ATOMIC_SEQ_CST) !=
         __atomic_load_n (&q->link_synced, __ATOMIC_SEQ_CST);
}

/* io_sync, and then every link made before it started is durable (its
 * data was written before the link was made). */
int
sync_links (struct qcow *q)
{
  uint64_t seq = __atomic_load_n (&q->link_seq, __ATOMIC_SEQ_CST);
  int r = io_sync (q);
  if (r == 0) {
    uint64_t cur = __atomic_load_n (&q->link_synced, __ATOMIC_SEQ_CST);
    while (seq > cur &&
           !__atomic_compare_exchange_n (&q->link_synced, &cur, seq, false,
                                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
      ;
  }
  return r;
}

/* Write all dirty metadata so that at every instant the file on disk is
 * consistent: new clusters (data and tables) and refcount increases are
 * durable before any table that points to them. */
int
metadata_sync (struct qcow *q)
{
  bool l1dirty = q->l1_dirty_hi > q->l1_dirty_lo;
  bool l2dirty = q->l2_cache.ndirty > 0;
  bool rcdirty = q->refblock_cache.ndirty > 0 || q->rct_dirty;
  bool lazy = q->dirty_bit_set;   /* refcounts need no ordering */
  int r;

  if (q->rct_switch_pending && (r = rct_commit_switch (q)) < 0)
    return r;                   /* nothing may point past it before */
  if (!l1dirty && !l2dirty && !rcdirty)
    return 0;
  if (rcdirty) {
    if ((r = cache_write_dirty (q, &q->refblock_cache)) < 0)
      return r;
    if (q->rct_dirty) {
      if (!lazy && (r = sync_links (q)) < 0)   /* blocks before the table */
        return r;
      if ((r = write_rct (q)) < 0)
        return r;
    }
    if (!lazy)
      note_link (q);            /* refcounts before the references */
  }
  if (l2dirty || l1dirty) {
    /* data and refcounts before the L2 entries that point to them: new
     * links (note_link) not yet covered by a sync; data written in place
     * is no reason to sync here */
    if (links_unsynced (q) && (r = sync_links (q)) < 0)
      return r;
    if ((r = cache_write_dirty (q, &q->l2_cache)) < 0)
      return r;
    if (l1dirty) {
      if ((r = io_sync (q)) < 0)                /* L2 tables before L1 */
        return r;
      if ((r = write_l1_range (q)) < 0)
        return r;
    }
  }
  return 0;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* refcount.c - refcounts: read and update them, allocate clusters, grow
 * the refcount table, and free clusters once that is safe.
 *
 * Owns q->rct (the refcount table, host-endian), the refcount blocks in
 * q->refblock_cache, the allocator's hints (free_hint: no free cluster
 * below it; frontier: the first cluster never handed out past the
 * original end of the file, which reads as zeros) and the deferred frees
 * (q->pending_free).  Invariants: a cluster is handed out only with its
 * refcount raised; a refcount drops only once the reference it accounts
 * for is durably gone (rc_defer_free, applied by flush_all in the
 * rc_deferred_* steps); freed space is punched before it is reused.
 * Storage of a fixed size (q->fixed_size) is never grown: allocation
 * stays below its size, else -ENOSPC.  Everything runs under q->lock,
 * except the punching of rc_deferred_punch_part (no lock, the clusters
 * still counted). */
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

/* The cached refcount block IDX, or NULL in *EP if it does not exist. */
static int
rc_block (struct qcow *q, uint64_t idx, struct centry **ep)
{
  *ep = NULL;
  if (idx >= q->rct_entries || q->rct[idx] == 0)
    return 0;
  struct centry *e = cache_peek (&q->refblock_cache, idx);
  if (!e) {
    uint64_t off = q->rct[idx];
    if (off & ~RCT_OFFSET_MASK || off % q->cluster_size != 0) {
      return qcow_corrupt (q, "refcount table", q->h.refcount_table_offset + idx * 8,
                           "entry %" PRIu64 " (0x%" PRIx64 ") is misaligned",
                           idx, off);
    }
    if (off < q->cluster_size || off >= q->file_size) {
      return qcow_corrupt (q, "refcount table", q->h.refcount_table_offset + idx * 8,
                           "refcount block %" PRIu64 " at 0x%" PRIx64 " lies %s",
                           idx, off, off < q->cluster_size ? "inside the header"
                           : "beyond the end of the file");
    }
  }
  return cache_get (q, &q->refblock_cache, idx, q->rct[idx], false, ep);
}

int
rc_get (struct qcow *q, uint64_t cluster, uint64_t *rc)
{
  struct centry *e;
  int r = rc_block (q, cluster >> q->rb_bits, &e);
  if (r < 0)
    return r;
  uint64_t mask = (1ULL << q->rb_bits) - 1;
  *rc = e ? fmt_refcount_get (q->h.refcount_order, e->data, cluster & mask) : 0;
  return 0;
}

/* Set a refcount whose block exists. */
int
rc_set (struct qcow *q, uint64_t cluster, uint64_t rc)
{
  struct centry *e;
  int r = rc_block (q, cluster >> q->rb_bits, &e);
  if (r < 0)
    return r;
  assert (e);                   /* callers make sure the block exists */
  uint64_t mask = (1ULL << q->rb_bits) - 1;
  fmt_refcount_set (q->h.refcount_order, e->data, cluster & mask, rc);
  cache_mark_dirty (&q->refblock_cache, e);
  return 0;
}

/* The first used cluster in [from, from+n), or from+n if all are free. */
static int
first_used (struct qcow *q, uint64_t from, uint64_t n, uint64_t *used)
{
  for (uint64_t c = from; c < from + n; c++) {
    uint64_t rc;
    int r = rc_get (q, c, &rc);
    if (r < 0)
      return r;
    if (rc) {
      *used = c;
      return 0;
    }
  }
  *used = from + n;
  return 0;
}

/* Where a run of clusters that must be contiguous is looked for: past
 * everything in use in a file that grows; in fixed-size storage, from the
 * lowest cluster that may be free. */
static uint64_t
run_start (struct qcow *q)
{
  if (q->fixed_size)
    return q->free_hint;
  uint64_t start = div_round_up (q->file_size, q->cluster_size);
  return q->frontier > start ? q->frontier : start;
}

/* Clusters [.., END) fit in the storage, or -ENOSPC (with the message). */
static int
check_room (struct qcow *q, uint64_t end)
{
  if (end << q->cluster_bits > QCOW_MAX_HOST_OFFSET) {
    ERR (q, "image is full: host offset limit reached");
    return -ENOSPC;
  }
  if (q->fixed_size && end << q->cluster_bits > q->file_size) {
    ERR (q, "no space left: the image fills its storage (%" PRIu64 " bytes)",
         q->file_size);
    return -ENOSPC;
  }
  return 0;
}

/* Grow the refcount table so that index NEED exists.  The new table and
 * the refcount blocks that describe it are placed past everything
 * allocated; the header is switched only once they are durable. */
static int
grow_rct (struct qcow *q, uint64_t need)
{
  const uint64_t cs = q->cluster_size, epc = cs / 8;
  uint64_t entries = need + 1 > q->rct_entries * 2 ? need + 1 : q->rct_entries * 2;
  uint64_t start = run_start (q), T, B = 0;
  int r;

  for (int iter = 0;; iter++) {
    assert (iter <= 64);        /* T and B only grow, bounded */
    entries = div_round_up (entries, epc) * epc;
    T = entries / epc;
    if (entries * 8 > QCOW_MAX_RCT_BYTES) {
      ERR (q, "image is full: the refcount table would exceed %u bytes",
           QCOW_MAX_RCT_BYTES);
      return -ENOSPC;
    }
    uint64_t used = 0;
    if ((r = first_used (q, start, T + B, &used)) < 0)
      return r;
    if (used < start + T + B) {
      start = used + 1;         /* allocated but not yet written: skip it */
      iter--;
      continue;
    }
    uint64_t end = start + T + B;
    uint64_t last_idx = (end - 1) >> q->rb_bits, missing = 0;
    for (uint64_t i = start >> q->rb_bits; i <= last_idx; i++)
      missing += i >= q->rct_entries || q->rct[i] == 0;
    if (last_idx + 1 > entries) {
      entries = last_idx + 1;
      continue;
    }
    if (missing <= B)
      break;
    B = missing;
  }
  if ((r = check_room (q, start + T + B)) < 0)
    return r;

  uint64_t *tab = calloc (entries, 8);
  if (!tab)
    return -ENOMEM;
  memcpy (tab, q->rct, q->rct_entries * 8);
  r = cache_resize_slots (&q->refblock_cache, entries);
  if (r < 0) {
    free (tab);
    return r;
  }
  q->rct_old_off = q->h.refcount_table_offset;
  q->rct_old_clusters = q->h.refcount_table_clusters;
  q->rct_switch_pending = true;
  /* No eviction (hence no metadata_sync) until the move is complete. */
  size_t saved_max = q->refblock_cache.max;
  q->refblock_cache.max += B + 16;
  free (q->rct);
  q->rct = tab;
  q->rct_entries = entries;
  q->h.refcount_table_offset = start << q->cluster_bits;
  q->h.refcount_table_clusters = T;
  q->rct_dirty = true;

  /* New refcount blocks after the table, one for each missing index. */
  uint64_t next = start + T, end = start + T + B;
  for (uint64_t i = start >> q->rb_bits; i <= (end - 1) >> q->rb_bits; i++) {
    if (tab[i] != 0)
      continue;
    struct centry *e;
    tab[i] = next << q->cluster_bits;
    r = cache_get (q, &q->refblock_cache, i, tab[i], true, &e);
    if (r < 0)
      break;
    next++;
  }
  for (uint64_t c = start; r == 0 && c < next; c++)
    r = rc_set (q, c, 1);
  q->refblock_cache.max = saved_max;
  if (r < 0)
    return r;
  if (next > q->frontier)
    q->frontier = next;
  qcow_debugf ("%s: refcount table grown to %" PRIu64 " entries at 0x%" PRIx64,
               q->filename, entries, q->h.refcount_table_offset);
  return rct_commit_switch (q);
}

/* Finish moving the refcount table: blocks and table durable, then the
 * header, then free the old table.  Retried by metadata_sync until it
 * succeeds, before any other metadata is written. */
int
rct_commit_switch (struct qcow *q)
{
  int r;
  if ((r = cache_write_dirty (q, &q->refblock_cache)) < 0 || (r = write_rct (q)) < 0 ||
      (r = io_sync (q)) < 0)
    return r;
  if ((r = header_write_fields (q, HDR_RCT_OFFSET, HDR_NB_SNAPSHOTS - HDR_RCT_OFFSET)) < 0 || (r = io_sync (q)) < 0)
    return r;
  q->rct_switch_pending = false;
  /* Deferred, not freed here: this may run inside a cache eviction. */
  for (uint32_t i = 0; i < q->rct_old_clusters; i++)
    rc_defer_free (q, (q->rct_old_off >> q->cluster_bits) + i);
  return 0;
}

/* Refcount block IDX is new, at host cluster AT: in the table (dirty)
 * and in the cache, zeroed, in *EP. */
static int
install_block (struct qcow *q, uint64_t idx, uint64_t at, struct centry **ep)
{
  q->rct[idx] = at << q->cluster_bits;
  q->rct_dirty = true;
  int r = cache_get (q, &q->refblock_cache, idx, q->rct[idx], true, ep);
  if (r < 0)
    q->rct[idx] = 0;
  return r;
}

/* Make sure the refcount block covering CLUSTER exists.  A new block is
 * placed at the first cluster of the range it describes (all of which is
 * free, since no block counted it), so it describes itself. */
static int
ensure_block (struct qcow *q, uint64_t cluster, bool *created)
{
  uint64_t idx = cluster >> q->rb_bits;
  int r;
  *created = false;
  if (idx >= q->rct_entries) {
    if ((r = grow_rct (q, idx)) < 0)
      return r;
    *created = true;
  }
  if (q->rct[idx] != 0)
    return 0;
  uint64_t c = idx << q->rb_bits;
  if (c == 0 || (c + 1) << q->cluster_bits > QCOW_MAX_HOST_OFFSET) {
    ERR (q, "cannot place refcount block %" PRIu64, idx);
    return -EIO;
  }
  struct centry *e;
  if ((r = install_block (q, idx, c, &e)) < 0)
    return r;
  fmt_refcount_set (q->h.refcount_order, e->data, 0, 1);
  if (c + 1 > q->frontier)
    q->frontier = c + 1;
  *created = true;
  return 0;
}

/* Allocate up to N contiguous free clusters (at least one).  *FRESH says
 * they were never used before (they read as zeros). */
int
rc_alloc (struct qcow *q, uint64_t n, uint64_t *first, uint64_t *got, bool *fresh)
{
  int r;
  for (;;) {
    /* First free cluster at or after the hint. */
    uint64_t c = q->free_hint;
    for (;;) {
      uint64_t idx = c >> q->rb_bits;
      if (idx >= q->rct_entries || q->rct[idx] == 0)
        break;                  /* whole block range free */
      uint64_t rc;
      if ((r = rc_get (q, c, &rc)) < 0)
        return r;
      if (rc == 0)
        break;
      c++;
    }
    q->free_hint = c;
    uint64_t k = 1;
    while (k < n) {
      uint64_t rc;
      if ((r = rc_get (q, c + k, &rc)) < 0)
        return r;
      if (rc)
        break;
      k++;
    }
    if (q->fixed_size && (c + k) << q->cluster_bits > q->file_size &&
        c < q->file_size >> q->cluster_bits)
      k = (q->file_size >> q->cluster_bits) - c;
    if ((r = check_room (q, c + k)) < 0)
      return r;
    bool created = false;
    for (uint64_t i = c >> q->rb_bits; i <= (c + k - 1) >> q->rb_bits; i++) {
      if ((r = ensure_block (q, i << q->rb_bits, &created)) < 0)
        return r;
      if (created)
        break;
    }
    if (created)
      continue;                 /* the block took a cluster: look again */
    for (uint64_t i = 0; i < k; i++)
      if ((r = rc_set (q, c + i, 1)) < 0)
        return r;
    *fresh = c >= q->frontier;
    if (c + k > q->frontier)
      q->frontier = c + k;
    q->free_hint = c + k;
    q->stats.clusters_allocated += k;
    *first = c;
    *got = k;
    return 0;
  }
}

/* Allocate N contiguous clusters past everything in use (for a table
 * that must be contiguous, like a new L1 table).  Refcount blocks placed
 * at the start of their own range would cut any run longer than a block
 * covers, so the missing ones go right after the run instead. */
int
rc_alloc_contiguous (struct qcow *q, uint64_t n, uint64_t *first)
{
  uint64_t start = run_start (q), B = 0, end;
  int r;
  for (int iter = 0;; iter++) {
    assert (iter <= 64);        /* B only grows, bounded */
    uint64_t used = 0;
    if ((r = first_used (q, start, n + B, &used)) < 0)
      return r;
    if (used < start + n + B) {
      start = used + 1;
      iter--;
      continue;
    }
    end = start + n + B;
    uint64_t last = (end - 1) >> q->rb_bits;
    if (last >= q->rct_entries) {
      if ((r = grow_rct (q, last)) < 0)
        return r;
      start = run_start (q);
      B = 0;
      continue;
    }
    uint64_t missing = 0;
    for (uint64_t i = start >> q->rb_bits; i <= last; i++)
      missing += q->rct[i] == 0;
    if (missing <= B)
      break;
    B = missing;
  }
  if ((r = check_room (q, end)) < 0)
    return r;
  uint64_t next = start + n;
  for (uint64_t i = start >> q->rb_bits; i <= (end - 1) >> q->rb_bits; i++) {
    if (q->rct[i] != 0)
      continue;
    struct centry *e;
    if ((r = install_block (q, i, next, &e)) < 0)
      return r;
    next++;
  }
  for (uint64_t c = start; c < next; c++)
    if ((r = rc_set (q, c, 1)) < 0)
      return r;
  if (next > q->frontier)
    q->frontier = next;
  q->stats.clusters_allocated += n;
  *first = start;
  return 0;
}

/* *END: one past the last cluster with a non-zero refcount. */
int
rc_used_end (struct qcow *q, uint64_t *end)
{
  *end = 0;
  for (uint64_t i = q->rct_entries; i-- > 0;) {
    struct centry *e;
    int r = rc_block (q, i, &e);
    if (r < 0)
      return r;
    for (uint64_t j = e ? 1ULL << q->rb_bits : 0; j-- > 0;)
      if (fmt_refcount_get (q->h.refcount_order, e->data, j)) {
        *end = (i << q->rb_bits) + j + 1;
        return 0;
      }
  }
  return 0;
}

/* Drop one reference from each of N clusters. */
int
rc_free (struct qcow *q, uint64_t cluster, uint64_t n)
{
  for (uint64_t c = cluster; c < cluster + n; c++) {
    uint64_t rc;
    int r = rc_get (q, c, &rc);
    if (r < 0)
      return r;
    if (rc == 0) {
      return qcow_corrupt (q, "refcount block", UINT64_MAX, "refcount of "
                           "cluster 0x%" PRIx64 " would drop below zero",
                           c << q->cluster_bits);
    }
    if ((r = rc_set (q, c, rc - 1)) < 0)
      return r;
    if (rc == 1 && c < q->free_hint)
      q->free_hint = c;
    if (rc == 1 && c == q->cfill >> q->cluster_bits)
      q->cfill = 0;             /* no more compressed data into it */
  }
  return 0;
}

/* A reference to CLUSTER was removed in memory: drop its refcount only
 * once the removal is durable (the rc_deferred_* steps, from flush_all). */
void
rc_defer_free (struct qcow *q, uint64_t cluster)
{
  uint64_t *p = grow_array (q->pending_free, q->npending, &q->pending_cap, sizeof *p, 64);
  if (!p)
    return;    /* out of memory: the cluster leaks (qemu-img check -r leaks reclaims it) */
  q->pending_free = p;
  q->pending_free[q->npending++] = cluster;
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

/* Punch the sorted clusters C[0..N) out of the file (or the data file),
 * a contiguous run at a time: small clusters punched one by one would
 * free nothing on a file system with larger blocks. */
static void
punch_runs (struct qcow *q, bool data, uint64_t *c, size_t n)
{
  qsort (c, n, sizeof *c, cmp_u64);
  for (size_t i = 0, j; i < n; i = j) {
    for (j = i + 1; j < n && c[j] == c[j - 1] + 1; j++)
      ;
    uint64_t len = (j - i) << q->cluster_bits;
    if (io_punch (q, data, c[i] << q->cluster_bits, len) == 0)
      __atomic_add_fetch (&q->stats.bytes_punched, len, __ATOMIC_RELAXED);
  }
}

/* Applying the deferred frees (their unlinking is durable) in steps, so
 * that the slow part, punching holes, runs with no lock held (flush_all,
 * or the background thread):
 *   take   (locks held, nothing in flight): the first N deferred entries
 *          leave the list; data-file clusters (not refcounted: they could
 *          be written again at once) are punched right away;
 *   plan   (q->lock): image clusters whose last references these are go
 *          on a punch list;
 *   punch  (no lock): they are still counted, so nothing can reuse them;
 *   finish (q->lock): drop the references. */
int
rc_deferred_take (struct qcow *q, size_t n, struct freeing *f)
{
  memset (f, 0, sizeof *f);
  if (n > q->npending)
    n = q->npending;
  f->c = malloc (n * sizeof *f->c + 1);
  f->punch = malloc (n * sizeof *f->punch + 1);
  uint64_t *data = malloc (n * sizeof *data + 1);
  int r = 0;
  if (!f->c || !f->punch || !data) {
    free (data);
    return -ENOMEM;
  }
  size_t ndata = 0;
  for (size_t i = 0; i < n; i++) {
    uint64_t c = q->pending_free[i];
    if (c & DEFER_DATA_FILE) {
      struct cmap m;
      c &= ~DEFER_DATA_FILE;
      if ((r = l2_lookup (q, c, &m)) < 0)
        break;
      if (m.kind == C_UNALLOC || m.kind == C_ZERO)
        data[ndata++] = c;
    }
    else
      f->c[f->n++] = c;
  }
  if (r == 0 && n > 0) {         /* (nothing was ever deferred: no list) */
    memmove (q->pending_free, q->pending_free + n, (q->npending - n) * sizeof *q->pending_free);
    q->npending -= n;
    if (q->cfg.discard)
      punch_runs (q, true, data, ndata);
  }
  free (data);
  return r;
}

/* Which of F's clusters to punch: those whose references all go with F
 * (other freeings of the same cluster not yet finished keep its count
 * higher: then it is not punched, which is safe).  With q->lock held;
 * the slow part of a big freeing, so not done by rc_deferred_take, under
 * the exclusive I/O lock. */
int
rc_deferred_plan (struct qcow *q, struct freeing *f)
{
  int r = 0;
  bool sorted = true;
  for (size_t i = 1; sorted && i < f->n; i++)
    sorted = f->c[i - 1] <= f->c[i];
  if (!sorted)
    qsort (f->c, f->n, sizeof *f->c, cmp_u64);
  f->npunch = 0;
  for (size_t i = 0, j; r == 0 && i < f->n; i = j) {
    for (j = i + 1; j < f->n && f->c[j] == f->c[i]; j++)
      ;
    uint64_t rc;
    if ((r = rc_get (q, f->c[i], &rc)) == 0 && rc == j - i)
      f->punch[f->npunch++] = f->c[i];
  }
  return r;
}

/* Punch F->punch[i..k) (all of it: rc_deferred_punch). */
void
rc_deferred_punch_part (struct qcow *q, struct freeing *f, size_t i, size_t k)
{
  if (q->cfg.discard && i < k)
    punch_runs (q, false, f->punch + i, k - i);
}

void
rc_deferred_punch (struct qcow *q, struct freeing *f)
{
  rc_deferred_punch_part (q, f, 0, f->npunch);
}

/* Drop the references F->c[*I..] to clusters up to LAST (F->c is sorted),
 * advancing *I: a freeing punched a part at a time gives back each part
 * once it is punched. */
int
rc_deferred_drop (struct qcow *q, struct freeing *f, size_t *i, uint64_t last)
{
  int r = 0;
  for (; r == 0 && *i < f->n && f->c[*i] <= last; (*i)++) {
    uint64_t rc;
    if ((r = rc_free (q, f->c[*i], 1)) == 0 && (r = rc_get (q, f->c[*i], &rc)) == 0 && rc == 0)
      q->stats.freed++;
  }
  return r;
}

int
rc_deferred_finish (struct qcow *q, struct freeing *f)
{
  size_t i = 0;
  int r = rc_deferred_drop (q, f, &i, UINT64_MAX);
  free (f->c);
  free (f->punch);
  f->c = f->punch = NULL;
  return r;
}

/* All the steps at once, the locks held throughout (resize). */
int
rc_apply_deferred (struct qcow *q)
{
  struct freeing f;
  int r = rc_deferred_take (q, q->npending, &f);
  if (r == 0 && (r = rc_deferred_plan (q, &f)) == 0)
    rc_deferred_punch (q, &f);
  if (r == 0)
    return rc_deferred_finish (q, &f);
  free (f.c);
  free (f.punch);
  return r;
}

/* ---- building a whole refcount structure ---- */

/* Given COUNTS for host clusters [0, NCLUSTERS), place refcount blocks
 * and a refcount table at NCLUSTERS onwards (failing with -ENOSPC if they
 * would pass cluster LIMIT), write them (no sync), and return where the
 * table is.  Used by create and by rebuild. */
int
rc_write_structure (struct qcow_backend *b, unsigned cluster_bits,
                    unsigned order, const uint16_t *counts, uint64_t E,
                    uint64_t limit, uint64_t *rct_offset, uint32_t *rct_clusters,
                    uint64_t *new_end)
{
  const uint64_t cs = 1ULL << cluster_bits, epc = cs / 8;
  const unsigned rb_bits = cluster_bits + 3 - order;
  const uint64_t rbe = 1ULL << rb_bits;
  const uint64_t max = order == 6 ? UINT64_MAX : (1ULL << (1u << order)) - 1;
  uint64_t B = 0, T = 1, nidx = 0;
  int r = 0;

  /* Which block ranges below E hold a used cluster. */
  uint64_t eidx = div_round_up (E, rbe);
  bool *used = calloc (eidx + 1, 1);
  if (!used)
    return -ENOMEM;
  for (uint64_t c = 0; c < E; c++)
    if (counts[c]) {
      if (counts[c] > max) {
        qcow_errorf (b->name, "cluster 0x%" PRIx64 " has %u references, more "
                     "than %u-bit refcounts can hold", c << cluster_bits,
                     counts[c], 1u << order);
        free (used);
        return -EINVAL;
      }
      used[c >> rb_bits] = true;
    }
  for (int iter = 0; iter < 64; iter++) {
    uint64_t total = E + B + T;
    nidx = div_round_up (total, rbe);
    uint64_t needed = 0;
    for (uint64_t i = 0; i < nidx; i++)
      needed += (i < eidx && used[i]) || ((i + 1) * rbe > E);
    uint64_t T2 = div_round_up (nidx, epc);
    if (needed <= B && T2 <= T)
      break;
    if (needed > B) B = needed;
    if (T2 > T) T = T2;
  }
  if (T * cs > QCOW_MAX_RCT_BYTES) {
    qcow_errorf (b->name, "image too large for a refcount table");
    free (used);
    return -EFBIG;
  }

  uint8_t *tab = calloc (T, cs), *blk = malloc (cs);
  if (!tab || !blk) {
    r = -ENOMEM;
    goto out;
  }
  /* Blocks at E.., table right after the blocks actually used. */
  uint64_t nblocks = 0;
  for (uint64_t i = 0; i < nidx; i++)
    nblocks += (i < eidx && used[i]) || ((i + 1) * rbe > E);
  uint64_t tstart = E + nblocks, tend = tstart + T;
  if (tend > limit) {
    qcow_errorf (b->name, "no space left in the storage for the refcount "
                 "structure (%" PRIu64 " clusters needed, %" PRIu64 " there)",
                 tend, limit);
    r = -ENOSPC;
    goto out;
  }
  uint64_t next = E;
  for (uint64_t i = 0; i < nidx; i++) {
    if (!((i < eidx && used[i]) || ((i + 1) * rbe > E)))
      continue;
    memset (blk, 0, cs);
    for (uint64_t j = 0; j < rbe; j++) {
      uint64_t c = i * rbe + j, v;
      if (c < E) v = counts[c];
      else if (c < tend) v = 1;
      else break;
      if (v)
        fmt_refcount_set (order, blk, j, v);
    }
    wr64 (tab + 8 * i, next << cluster_bits);
    if ((r = io_bpwrite (b, blk, cs, next << cluster_bits)) < 0)
      goto out;
    next++;
  }
  if ((r = io_bpwrite (b, tab, T * cs, tstart << cluster_bits)) < 0)
    goto out;
  *rct_offset = tstart << cluster_bits;
  *rct_clusters = T;
  *new_end = tend;
 out:
  free (used);
  free (tab);
  free (blk);
  return r;
}

/* ---- counting ---- */

int
qcow_used_clusters (struct qcow *q, uint64_t n, uint64_t limit, uint64_t *count)
{
  int r = 0;
  uint64_t k = 0;
  pthread_mutex_lock (&q->lock);
  for (uint64_t c = 0; c < n && k < limit && r == 0; c++) {
    uint64_t idx = c >> q->rb_bits, rc;
    if (idx >= q->rct_entries)
      break;
    if (q->rct[idx] == 0) {
      c |= (1ULL << q->rb_bits) - 1;    /* no block: the whole range is free */
      continue;
    }
    if ((r = rc_get (q, c, &rc)) == 0 && rc)
      k++;
  }
  pthread_mutex_unlock (&q->lock);
  *count = k;
  return r;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* compact.c - move clusters from the end of the file into free space
 * nearer the start, rewrite the references, and truncate the file.
 *
 * Each move is crash-safe: copy, flush, switch the reference, flush, and
 * only then free the old cluster (freeing goes through the deferred-free
 * list, which also waits for requests that still use the old mapping).
 * Client I/O goes on meanwhile: only writes to a cluster being moved wait
 * (it is marked in flight, like an allocation), and the image lock is
 * held only for short metadata steps. */
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

enum src_kind { SRC_DATA, SRC_ZERO_ALLOC, SRC_L2, SRC_REFBLOCK };
struct source {
  uint64_t host;           /* host cluster number */
  enum src_kind kind;
  uint64_t key;            /* guest cluster, L1 index or refcount table index */
};

#define BATCH 64

static int
cmp_source_desc (const void *a, const void *b)
{
  const struct source *x = a, *y = b;
  return x->host < y->host ? 1 : x->host > y->host ? -1 : 0;
}

struct srclist {
  struct source *v;
  size_t n, cap;
};

static int
add_source (struct srclist *l, uint64_t host, enum src_kind kind, uint64_t key)
{
  struct source *v = grow_array (l->v, l->n, &l->cap, sizeof *v, 256);
  if (!v)
    return -ENOMEM;
  l->v = v;
  l->v[l->n++] = (struct source) { host, kind, key };
  return 0;
}

/* Used clusters, and the last used one + 1.  With q->lock held. */
static int
count_used (struct qcow *q, uint64_t *used, uint64_t *end)
{
  uint64_t limit = div_round_up (q->file_size, q->cluster_size);
  if (q->frontier > limit)
    limit = q->frontier;
  *used = *end = 0;
  for (uint64_t c = 0; c < limit; c++) {
    uint64_t idx = c >> q->rb_bits, rc;
    if (idx >= q->rct_entries)
      break;
    if (q->rct[idx] == 0) {
      c |= (1ULL << q->rb_bits) - 1;     /* whole block range is free */
      continue;
    }
    int r = rc_get (q, c, &rc);
    if (r < 0)
      return r;
    if (rc) {
      (*used)++;
      *end = c + 1;
    }
  }
  return 0;
}

/* Everything that lives at host cluster >= BOUND and can be moved. */
static int
collect_sources (struct qcow *q, uint64_t bound, struct srclist *l)
{
  int r = 0;
  const uint64_t cs = q->cluster_size;
  uint8_t *buf = malloc (cs);
  if (!buf)
    return -ENOMEM;
  for (uint64_t j = 0; j < q->rct_entries && r == 0; j++)
    if (q->rct[j] && (q->rct[j] >> q->cluster_bits) >= bound)
      r = add_source (l, q->rct[j] >> q->cluster_bits, SRC_REFBLOCK, j);
  for (uint64_t i = 0; i < q->h.l1_size && r == 0; i++) {
    pthread_mutex_lock (&q->lock);        /* one L2 table at a time */
    uint64_t l2off = i < q->h.l1_size ? q->l1[i] & L1_OFFSET_MASK : 0;
    if (l2off)
      r = l2_read_table (q, i, buf);
    pthread_mutex_unlock (&q->lock);
    if (r < 0 || !l2off)
      continue;
    if ((l2off >> q->cluster_bits) >= bound)
      r = add_source (l, l2off >> q->cluster_bits, SRC_L2, i);
    for (uint64_t j = 0; j < (1ULL << q->l2_bits) && r == 0; j++) {
      uint64_t ent = rd64 (L2E (q, buf, j)), host = ent & L2_OFFSET_MASK;
      if (ent & ENTRY_COMPRESSED || !host || q->data_path ||
          (host >> q->cluster_bits) < bound)
        continue;
      bool zero = q->h.version >= 3 && (ent & ENTRY_ZERO);
      if (!(ent & ENTRY_COPIED))
        continue;                           /* shared: leave it */
      r = add_source (l, host >> q->cluster_bits, zero ? SRC_ZERO_ALLOC : SRC_DATA,
                      (i << q->l2_bits) + j);
    }
  }
  free (buf);
  if (r == 0 && l->n > 0)
    qsort (l->v, l->n, sizeof *l->v, cmp_source_desc);
  return r;
}

/* Is S still what lives at its host cluster?  With q->lock held. */
static int
still_valid (struct qcow *q, const struct source *s, bool *ok)
{
  *ok = false;
  switch (s->kind) {
  case SRC_REFBLOCK:
    *ok = s->key < q->rct_entries && q->rct[s->key] == s->host << q->cluster_bits;
    return 0;
  case SRC_L2:
    *ok = (q->l1[s->key] & L1_OFFSET_MASK) == s->host << q->cluster_bits &&
          (q->l1[s->key] & ENTRY_COPIED);
    return 0;
  default: {
    struct cmap m;
    int r = l2_lookup (q, s->key, &m);
    if (r < 0)
      return r;
    enum ckind want = s->kind == SRC_DATA ? (q->extl2 ? C_SUBCL : C_DATA) : C_ZERO_ALLOC;
    *ok = m.host == s->host << q->cluster_bits && m.copied && m.kind == want &&
          !inflight_find (q, s->key);
    return 0;
  }
  }
}

/* A free cluster below LIMIT, or 0. */
static int
alloc_below (struct qcow *q, uint64_t limit, uint64_t *dst)
{
  uint64_t c, got;
  bool fresh;
  int r = rc_alloc (q, 1, &c, &got, &fresh);
  if (r < 0)
    return r;
  if (c >= limit) {
    rc_free (q, c, 1);
    if (c < q->free_hint)
      q->free_hint = c;
    *dst = 0;
    return 0;
  }
  *dst = c;
  return 0;
}

/* Move one table cluster (L2 table or refcount block): an L2 table is
 * written at its new place now (l2_move_table), a refcount block is in
 * the cache, so only its location changes; either way the ordered
 * write-back puts the table before the pointer. */
static int
move_table (struct qcow *q, const struct source *s, uint64_t dst)
{
  struct centry *e;
  int r;
  uint64_t off = dst << q->cluster_bits;
  if (s->kind == SRC_L2) {
    if ((r = l2_move_table (q, s->key, off)) < 0)
      return r;
    q->l1[s->key] = off | ENTRY_COPIED;
    mark_l1_dirty (q, s->key);
  }
  else {
    if ((r = cache_get (q, &q->refblock_cache, s->key, s->host << q->cluster_bits, false, &e)) < 0)
      return r;
    e->offset = off;
    cache_mark_dirty (&q->refblock_cache, e);
    q->rct[s->key] = off;
    q->rct_dirty = true;
  }
  rc_defer_free (q, s->host);
  return 0;
}

/* Move up to BATCH sources, highest first.  Returns the number moved in
 * *MOVED, and 0 in *MOVED when nothing can move any more. */
static int
move_batch (struct qcow *q, struct srclist *l, size_t *pos,
            struct qcow_compact_result *res, size_t *moved)
{
  struct { struct source s; uint64_t dst; struct inflight f; } data[BATCH];
  size_t nd = 0;
  int r = 0;
  *moved = 0;

  /* Mark the batch with no request in flight: a request that looked up
   * an old mapping has finished, and later ones see the marks and wait
   * for them (never the other way round, which could deadlock with a
   * request waiting on a mark while holding io_lock). */
  io_lock_exclusive (q);
  pthread_mutex_lock (&q->lock);
  while (*pos < l->n && nd < BATCH) {
    const struct source *s = &l->v[*pos];
    bool ok;
    if ((r = still_valid (q, s, &ok)) < 0)
      break;
    if (!ok) {
      (*pos)++;
      continue;
    }
    uint64_t dst;
    if ((r = alloc_below (q, s->host, &dst)) < 0)
      break;
    if (dst == 0) {
      *pos = l->n;                          /* no hole below: done */
      break;
    }
    (*pos)++;
    (*moved)++;
    res->refs_updated++;
    if (s->kind == SRC_L2 || s->kind == SRC_REFBLOCK) {
      if ((r = move_table (q, s, dst)) < 0)
        break;
      continue;
    }
    data[nd].s = *s;
    data[nd].dst = dst;
    data[nd].f = (struct inflight) { .first = s->key, .count = 1, .next = q->inflight };
    q->inflight = &data[nd].f;
    nd++;
  }
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);

  if (nd > 0) {
    uint8_t *buf = malloc (q->cluster_size);
    if (!buf && r == 0)
      r = -ENOMEM;
    for (size_t i = 0; i < nd && r == 0; i++) {
      if (data[i].s.kind != SRC_DATA)
        continue;                           /* zero flag: nothing to copy */
      if ((r = io_pread (q, buf, q->cluster_size, data[i].s.host << q->cluster_bits)) == 0)
        r = io_pwrite (q, buf, q->cluster_size, data[i].dst << q->cluster_bits);
      res->copied += q->cluster_size / 512;
    }
    free (buf);
    if (r == 0)
      r = io_sync (q);                      /* copies durable before the switch */
    pthread_mutex_lock (&q->lock);
    for (size_t i = 0; i < nd; i++) {
      if (r == 0) {
        uint64_t ent = (data[i].dst << q->cluster_bits) | ENTRY_COPIED |
                       (data[i].s.kind == SRC_ZERO_ALLOC ? ENTRY_ZERO : 0);
        r = l2_set (q, data[i].s.key, ent);
        if (r == 0)
          rc_defer_free (q, data[i].s.host);
      }
      else
        rc_free (q, data[i].dst, 1);        /* never referenced */
      for (struct inflight **pp = &q->inflight; *pp; pp = &(*pp)->next)
        if (*pp == &data[i].f) {
          *pp = data[i].f.next;
          break;
        }
    }
    pthread_cond_broadcast (&q->alloc_cond);
    pthread_mutex_unlock (&q->lock);
  }
  if (r == 0 && *moved > 0)
    r = flush_all (q);                      /* switch durable, then free */
  q->stats.compacted += *moved;
  return r;
}

/* Move the L1 table (L1 true) or the refcount table to a contiguous run
 * of free clusters below where it is now, if there is one: write the copy,
 * flush, switch the header, flush, free the old place.  With q->lock held
 * and no I/O in flight. */
static int
move_multi (struct qcow *q, bool l1, struct qcow_compact_result *res)
{
  const uint64_t cs = q->cluster_size;
  uint64_t n = l1 ? div_round_up ((uint64_t) q->h.l1_size * 8, cs)
                  : q->h.refcount_table_clusters;
  uint64_t old = (l1 ? q->h.l1_table_offset : q->h.refcount_table_offset) >> q->cluster_bits;
  uint64_t skipped[64][2], nskip = 0, first = 0, got = 0;
  bool fresh;
  int r = 0;
  if (n == 0)
    return 0;
  /* Find a run of n below OLD; short runs are held and released after. */
  while (nskip < 64) {
    if ((r = rc_alloc (q, n, &first, &got, &fresh)) < 0)
      break;
    if (got == n || first >= old)
      break;
    skipped[nskip][0] = first;
    skipped[nskip++][1] = got;
  }
  for (uint64_t i = 0; i < nskip; i++)
    rc_free (q, skipped[i][0], skipped[i][1]);
  if (r < 0)
    return r;
  if (got != n || first >= old) {
    rc_free (q, first, got);
    q->free_hint = 1;
    return 0;
  }
  uint64_t entries = l1 ? q->h.l1_size : q->rct_entries;
  uint64_t *buf = calloc (n, cs);
  if (!buf)
    return -ENOMEM;
  if ((r = metadata_sync (q)) == 0) {       /* memory == what is pointed to */
    for (uint64_t i = 0; i < entries; i++)
      buf[i] = htobe64 (l1 ? q->l1[i] : q->rct[i]);
    r = io_pwrite (q, buf, n * cs, first << q->cluster_bits);
  }
  free (buf);
  if (r == 0)
    r = io_sync (q);
  if (r < 0) {
    rc_free (q, first, n);
    return r;
  }
  uint64_t *field = l1 ? &q->h.l1_table_offset : &q->h.refcount_table_offset;
  *field = first << q->cluster_bits;
  if ((r = header_write_fields (q, l1 ? 40 : 48, 8)) < 0 || (r = io_sync (q)) < 0) {
    /* Stay where we were, on disk too (the new header may be in the page
     * cache): the copy is simply not used. */
    *field = old << q->cluster_bits;
    header_write_fields (q, l1 ? 40 : 48, 8);
    rc_free (q, first, n);
    return r;
  }
  res->copied += n * cs / 512;
  res->refs_updated++;
  return rc_free (q, old, n);
}

static int
move_tables (struct qcow *q, uint64_t bound, struct qcow_compact_result *res)
{
  int r = 0;
  io_lock_exclusive (q);
  pthread_mutex_lock (&q->lock);
  uint64_t l1_end = div_round_up (q->h.l1_table_offset + (uint64_t) q->h.l1_size * 8,
                                  q->cluster_size);
  uint64_t rct_end = (q->h.refcount_table_offset >> q->cluster_bits) +
                     q->h.refcount_table_clusters;
  if (q->h.l1_size && l1_end > bound)
    r = move_multi (q, true, res);
  if (r == 0 && rct_end > bound)
    r = move_multi (q, false, res);
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);
  return r;
}

int
qcow_compact (struct qcow *q, qcow_progress_fn progress, void *opaque,
              struct qcow_compact_result *res)
{
  int r;
  memset (res, 0, sizeof *res);
  if (q->read_only) {
    ERR (q, "image is open read-only");
    return -EROFS;
  }
  pthread_mutex_lock (&q->compact_lock);
  __atomic_store_n (&q->compacting, true, __ATOMIC_RELAXED);   /* rw.c */
  pthread_mutex_lock (&q->lock);
  r = begin_modify (q);
  pthread_mutex_unlock (&q->lock);
  if (r == 0)
    r = flush_all (q);                      /* apply pending frees first */
  uint64_t used = 0, end = 0;
  struct srclist l = { 0 };
  res->old_size = div_round_up (q->file_size, 512);
  if (r == 0) {
    pthread_mutex_lock (&q->lock);
    r = count_used (q, &used, &end);
    pthread_mutex_unlock (&q->lock);
  }
  if (r == 0 && used < end)
    r = move_tables (q, used, res);
  if (r == 0 && used < end)
    r = collect_sources (q, used, &l);
  size_t pos = 0, moved = 1;
  while (r == 0 && moved > 0 && pos < l.n) {
    r = move_batch (q, &l, &pos, res, &moved);
    if (progress)
      progress ((int) (pos * 100 / l.n), opaque);
  }
  free (l.v);
  if (r == 0 && used < end)
    r = move_tables (q, used, res);     /* room may have appeared below */

  /* Truncate after the last used cluster (keeping keep_erased bytes). */
  if (r == 0) {
    io_lock_exclusive (q);
    pthread_mutex_lock (&q->lock);
    r = metadata_sync (q);
    if (r == 0)
      r = io_sync (q);
    if (r == 0)
      r = count_used (q, &used, &end);
    uint64_t keep = div_round_up (q->cfg.keep_erased, q->cluster_size);
    uint64_t new_size = (end + keep) << q->cluster_bits;
    /* Storage of a fixed size keeps it: what is past END is free space,
     * given back cluster by cluster as it was freed. */
    if (r == 0 && q->fixed_size && q->free_hint > end)
      q->free_hint = end;
    if (r == 0 && !q->fixed_size && new_size < q->file_size && q->inflight == NULL) {
      if ((r = io_truncate (q, new_size)) == 0) {
        q->file_size = new_size;
        q->frontier = end + keep;
        if (q->free_hint > end)
          q->free_hint = end;
        r = io_sync (q);
      }
    }
    pthread_mutex_unlock (&q->lock);
    io_unlock_exclusive (q);
  }
  res->new_size = div_round_up (q->file_size, 512);
  if (progress && r == 0)
    progress (100, opaque);
  __atomic_store_n (&q->compacting, false, __ATOMIC_RELAXED);
  pthread_mutex_unlock (&q->compact_lock);
  return r;
}

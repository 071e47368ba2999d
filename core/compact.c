/* SPDX-License-Identifier: BSD-3-Clause */
/* compact.c - move clusters from the end of the file into free space
 * nearer the start, rewrite the references, and truncate the file.
 *
 * Each move is crash-safe: copy, flush, switch the reference, flush, and
 * only then free the old cluster, once no request that looked up the old
 * mapping is in flight.
 *
 * It runs while clients keep the image busy (the background thread,
 * compact-after-unmaps=), so it must neither stall nor hold them up:
 *
 *  - Data clusters move in batches (up to 4 MiB).  A batch is chosen
 *    with io_lock held exclusively, which waits only for the requests in
 *    flight (a request that looked up an old mapping has finished then);
 *    since new requests wait meanwhile, compaction gives up after
 *    DRAIN_NS and tries again a little later (exclusive).  Later writes
 *    to a cluster of the batch do not wait: they mark the move off
 *    (note_write) and go to the old place.  The batch is copied and
 *    synced with no lock held, then switched under q->lock, except the
 *    moves a write called off: those clusters are tried again, and after
 *    OPTIMISTIC_TRIES the writes to them wait for their copy (not for the
 *    sync: that switch is a link like an allocating write's, see
 *    note_link, and the next metadata write-back syncs first).
 *  - A batch makes its switches durable only with the next flush (a
 *    client's, or the commit below): no sync under any lock for it, and
 *    no flush_lock a client's flush would wait for.  The old clusters
 *    stay on this run's own list (not the deferred frees a client's flush
 *    takes, which would make every such flush wait for the requests in
 *    flight) until a flush has made their switch durable.
 *  - Every COMMIT_SECONDS it commits: flush if no client did, free the
 *    old clusters whose switch is durable, apply the frees the clients'
 *    flushes queued for the background thread (this thread), and
 *    truncate the file after the last cluster in use.  So the file
 *    shrinks while the clients work, not only at the end.
 *  - In the background it paces itself to cfg.compact_rate bytes a
 *    second, and stops early when the thread is told to.
 *
 * Locks: compact_lock for the whole run; then io_lock (exclusive, short)
 * before q->lock, or flush_lock (flush_all) on its own. */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

enum src_kind { SRC_DATA, SRC_ZERO_ALLOC, SRC_L2, SRC_REFBLOCK };
struct source {
  uint64_t host;           /* host cluster number */
  enum src_kind kind;
  uint64_t key;            /* guest cluster, L1 index or refcount table index */
  unsigned tries;          /* moves called off by writes so far */
};

#define BATCH_BYTES (4u << 20) /* data copied per batch, at most */
#define BATCH_MAX 1024         /* clusters per batch, at most */
#define OPTIMISTIC_TRIES 2     /* then writes to the cluster wait for its copy */
#define COMMIT_SECONDS 1.0     /* make moves durable and truncate this often */
#define SCAN_MAX 65536         /* refcounts looked at per exclusive lock hold */
#define DRAIN_NS 2000000       /* wait this long for io_lock exclusively, */
#define BACKOFF_US 2000        /* else let requests go on this long, retry */

static int
cmp_source_desc (const void *a, const void *b)
{
  const struct source *x = a, *y = b;
  return x->host < y->host ? 1 : x->host > y->host ? -1 : 0;
}

static int
cmp_mark (const void *a, const void *b)
{
  const struct move_mark *x = a, *y = b;
  return x->gc < y->gc ? -1 : x->gc > y->gc;
}

struct srclist {
  struct source *v;
  size_t n, cap;
};

static int
add_source (struct srclist *l, struct source s)
{
  struct source *v = grow_array (l->v, l->n, &l->cap, sizeof *v, 256);
  if (!v)
    return -ENOMEM;
  l->v = v;
  l->v[l->n++] = s;
  return 0;
}

/* What one run did and the longest each client could have waited for it
 * (seconds), for the debug message of the background thread. */
struct compact_report {
  double seconds;
  uint64_t batches, called_off, held_moves, commits, flushes, drain_timeouts;
  double excl;             /* io_lock wanted or held exclusively */
  double lock;             /* q->lock held in a batch */
  double held;             /* writes to a cluster held by its move */
  double flush;            /* a commit's flush (flush_lock held) */
};

static void
longest (double *m, double t)
{
  if (t > *m)
    *m = t;
}

/* One run of compaction. */
struct run {
  struct qcow *q;
  struct qcow_compact_result *res;
  struct compact_report rep;
  struct srclist l;        /* sources, highest first */
  size_t pos;              /* next in l */
  struct srclist retry;    /* moves called off, to try again first */
  bool no_room;            /* no free cluster below the next source */
  size_t batch;            /* clusters per batch */
  bool paced;              /* background, with a rate */
  double start, last_commit;
  uint64_t durable_seen;   /* q->durable_gen at the last commit */
  struct pfree {           /* old clusters to free once the switch is */
    uint64_t cluster, gen; /* durable (q->durable_gen > gen) */
  } *frees;
  size_t nfrees, frees_cap;
  uint64_t paced_bytes;    /* bytes moved (or copied in vain) so far */
};

/* The old cluster of a move, freed by this run once the switch is
 * durable (take_frees); not through the deferred-free list, which a
 * client's flush would take, holding up every request while it waits
 * for those in flight.  With q->lock held. */
static void
defer (struct run *run, uint64_t cluster)
{
  struct pfree *v = grow_array (run->frees, run->nfrees, &run->frees_cap, sizeof *v, 256);
  if (!v) {
    rc_defer_free (run->q, cluster);        /* the usual way, then */
    return;
  }
  run->frees = v;
  run->frees[run->nfrees++] = (struct pfree) { cluster, run->q->meta_gen };
}

/* Take io_lock exclusively: wait for the requests in flight to finish.
 * New requests wait meanwhile (it prefers writers), so never for long:
 * after DRAIN_NS (a request in flight is slow) give up, let them go on
 * for BACKOFF_US and try again.  Returns when the wait began. */
static double
exclusive (struct run *run)
{
  struct qcow *q = run->q;
  for (;;) {
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    double t0 = ts.tv_sec + ts.tv_nsec * 1e-9;
    ts.tv_nsec += DRAIN_NS;
    if (ts.tv_nsec >= 1000000000) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000;
    }
    if (io_lock_exclusive_until (q, &ts) == 0)
      return t0;
    longest (&run->rep.excl, monotonic_seconds () - t0);
    run->rep.drain_timeouts++;
    usleep (BACKOFF_US);
  }
}

/* Clusters in use, and the last used one + 1.  Takes q->lock one
 * refcount block at a time (the image may change meanwhile: a bound). */
static int
count_used (struct qcow *q, uint64_t *used, uint64_t *end)
{
  int r = 0;
  *used = *end = 0;
  pthread_mutex_lock (&q->lock);
  uint64_t limit = div_round_up (q->file_size, q->cluster_size);
  if (q->frontier > limit)
    limit = q->frontier;
  pthread_mutex_unlock (&q->lock);
  for (uint64_t c = 0; r == 0 && c < limit; ) {
    uint64_t idx = c >> q->rb_bits, next = (idx + 1) << q->rb_bits;
    pthread_mutex_lock (&q->lock);
    if (idx >= q->rct_entries) {
      pthread_mutex_unlock (&q->lock);
      break;
    }
    if (q->rct[idx] != 0) {
      for (; c < next && c < limit; c++) {
        uint64_t rc;
        if ((r = rc_get (q, c, &rc)) < 0)
          break;
        if (rc) {
          (*used)++;
          *end = c + 1;
        }
      }
    }
    pthread_mutex_unlock (&q->lock);
    c = next;
  }
  return r;
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
  pthread_mutex_lock (&q->lock);
  for (uint64_t j = 0; j < q->rct_entries && r == 0; j++)
    if (q->rct[j] && (q->rct[j] >> q->cluster_bits) >= bound)
      r = add_source (l, (struct source) { q->rct[j] >> q->cluster_bits, SRC_REFBLOCK, j, 0 });
  pthread_mutex_unlock (&q->lock);
  for (uint64_t i = 0; i < q->h.l1_size && r == 0; i++) {
    pthread_mutex_lock (&q->lock);        /* one L2 table at a time */
    uint64_t l2off = i < q->h.l1_size ? q->l1[i] & L1_OFFSET_MASK : 0;
    if (l2off)
      r = l2_read_table (q, i, buf);
    pthread_mutex_unlock (&q->lock);
    if (r < 0 || !l2off)
      continue;
    if ((l2off >> q->cluster_bits) >= bound)
      r = add_source (l, (struct source) { l2off >> q->cluster_bits, SRC_L2, i, 0 });
    for (uint64_t j = 0; j < (1ULL << q->l2_bits) && r == 0; j++) {
      uint64_t ent = rd64 (L2E (q, buf, j)), host = ent & L2_OFFSET_MASK;
      if (ent & ENTRY_COMPRESSED || !host || q->data_path ||
          (host >> q->cluster_bits) < bound)
        continue;
      bool zero = q->h.version >= 3 && (ent & ENTRY_ZERO);
      if (!(ent & ENTRY_COPIED))
        continue;                           /* shared: leave it */
      r = add_source (l, (struct source) { host >> q->cluster_bits,
                                           zero ? SRC_ZERO_ALLOC : SRC_DATA,
                                           (i << q->l2_bits) + j, 0 });
    }
  }
  free (buf);
  if (r == 0 && l->n > 0)
    qsort (l->v, l->n, sizeof *l->v, cmp_source_desc);
  return r;
}

/* Is S still what lives at its host cluster?  Its mapping in *M (data
 * sources).  With q->lock held. */
static int
still_valid (struct qcow *q, const struct source *s, bool *ok, struct cmap *m)
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
    int r = l2_lookup (q, s->key, m);
    if (r < 0)
      return r;
    enum ckind want = s->kind == SRC_DATA ? (q->extl2 ? C_SUBCL : C_DATA) : C_ZERO_ALLOC;
    *ok = m->host == s->host << q->cluster_bits && m->copied && m->kind == want &&
          !inflight_find (q, s->key);
    return 0;
  }
  }
}

static bool
same_mapping (const struct cmap *a, const struct cmap *b)
{
  return a->kind == b->kind && a->host == b->host && a->copied == b->copied &&
         (a->kind != C_SUBCL || a->bitmap == b->bitmap);
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

/* Move one table cluster (L2 table or refcount block): its content is in
 * the cache, so only its location and the pointer to it change; the
 * ordered write-back puts the table before the pointer. */
static int
move_table (struct run *run, const struct source *s, uint64_t dst)
{
  struct qcow *q = run->q;
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
  defer (run, s->host);
  return 0;
}

/* A write is about to reach guest clusters [FIRST, LAST]: call off the
 * moves of any of them in the current batch (q->moving, sorted). */
void
compact_note_write (struct qcow *q, uint64_t first, uint64_t last)
{
  size_t lo = 0, hi = q->nmoving;
  while (lo < hi) {                         /* first mark with gc >= FIRST */
    size_t mid = lo + (hi - lo) / 2;
    if (q->moving[mid].gc < first)
      lo = mid + 1;
    else
      hi = mid;
  }
  for (; lo < q->nmoving && q->moving[lo].gc <= last; lo++)
    q->moving[lo].written = true;
}

static struct move_mark *
find_mark (struct qcow *q, uint64_t gc)
{
  struct move_mark key = { .gc = gc };
  return bsearch (&key, q->moving, q->nmoving, sizeof key, cmp_mark);
}

/* A data cluster of the current batch. */
struct item {
  struct source s;
  uint64_t dst;
  struct cmap m;           /* its mapping when the batch was chosen */
  bool hold;               /* writes to it wait (an inflight mark); moved
                              first, on their own */
  struct inflight f;
};

static int
copy_item (struct qcow *q, struct item *it, uint8_t *buf, struct qcow_compact_result *res)
{
  int r = 0;
  if (it->s.kind == SRC_DATA) {             /* zero flag: nothing to copy */
    if ((r = io_pread (q, buf, q->cluster_size, it->s.host << q->cluster_bits)) == 0)
      r = io_pwrite (q, buf, q->cluster_size, it->dst << q->cluster_bits);
    res->copied += q->cluster_size / 512;
  }
  return r;
}

/* The L2 entry that links IT's copy. */
static uint64_t
copy_entry (struct qcow *q, const struct item *it)
{
  return (it->dst << q->cluster_bits) | ENTRY_COPIED |
    (it->s.kind == SRC_ZERO_ALLOC ? ENTRY_ZERO : 0);
}

/* Switch IT to its copy if nothing changed it (with q->lock held), else
 * give the copy up and, if it is still a source, try again later. */
static int
switch_item (struct run *run, struct item *it, bool written, size_t *moved)
{
  struct qcow *q = run->q;
  struct cmap m;
  bool ok = false;
  int r = 0;
  if ((r = still_valid (q, &it->s, &ok, &m)) == 0 && ok)
    ok = !written && same_mapping (&m, &it->m);
  if (r == 0 && ok) {
    if ((r = l2_set_synced (q, it->s.key, copy_entry (q, it))) == 0) {
      defer (run, it->s.host);
      (*moved)++;
      run->res->refs_updated++;
      return 0;
    }
  }
  rc_free (q, it->dst, 1);                  /* never referenced */
  if (r == 0 && written) {
    run->rep.called_off++;
    struct source s = it->s;
    s.tries++;
    r = add_source (&run->retry, s);
  }
  return r;
}

/* Move up to run->batch sources, highest first (moves called off before
 * first).  *MOVED gets the number moved. */
static int
move_batch (struct run *run, struct item *items, size_t *moved)
{
  struct qcow *q = run->q;
  size_t n = 0, nmarks = 0;
  int r = 0;
  *moved = 0;

  /* Choose with no request in flight: one that looked up an old mapping
   * has finished, later ones see the marks (never the other way round: a
   * request waiting on a hold mark while holding io_lock would deadlock
   * with us). */
  double t0 = exclusive (run);
  pthread_mutex_lock (&q->lock);
  while (n < run->batch) {
    struct source s;
    if (run->retry.n > 0)
      s = run->retry.v[--run->retry.n];
    else if (run->pos < run->l.n)
      s = run->l.v[run->pos++];
    else
      break;
    struct cmap m;
    bool ok;
    if ((r = still_valid (q, &s, &ok, &m)) < 0)
      break;
    if (!ok)
      continue;
    uint64_t dst;
    if ((r = alloc_below (q, s.host, &dst)) < 0)
      break;
    if (dst == 0) {
      run->no_room = true;                  /* no hole below: done */
      break;
    }
    if (s.kind == SRC_L2 || s.kind == SRC_REFBLOCK) {
      if ((r = move_table (run, &s, dst)) < 0)
        break;
      (*moved)++;
      run->res->refs_updated++;
      continue;
    }
    struct item *it = &items[n++];
    *it = (struct item) { .s = s, .dst = dst, .m = m, .hold = s.tries >= OPTIMISTIC_TRIES };
    if (it->hold) {
      it->f = (struct inflight) { .first = s.key, .count = 1, .next = q->inflight };
      q->inflight = &it->f;
      run->rep.held_moves++;
    }
    else
      q->moving[nmarks++] = (struct move_mark) { .gc = s.key };
  }
  qsort (q->moving, nmarks, sizeof *q->moving, cmp_mark);
  q->nmoving = nmarks;
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);
  double t1 = monotonic_seconds ();
  longest (&run->rep.excl, t1 - t0);
  run->paced_bytes += (*moved + n) * q->cluster_size;

  uint8_t *buf = n ? malloc (q->cluster_size) : NULL;
  if (n && !buf && r == 0)
    r = -ENOMEM;

  /* Held moves first: copy, then switch at once, a link whose data is
   * not synced yet (note_link): the writes waiting for them wait for
   * their copy only. */
  for (size_t i = 0; i < n && r == 0; i++)
    if (items[i].hold)
      r = copy_item (q, &items[i], buf, run->res);
  if (n > nmarks) {
    pthread_mutex_lock (&q->lock);
    double t2 = monotonic_seconds ();
    for (size_t i = 0; i < n; i++) {
      struct item *it = &items[i];
      if (!it->hold)
        continue;
      struct cmap m;
      int e = 0;
      if (r == 0 && (e = l2_lookup (q, it->s.key, &m)) == 0 &&
          same_mapping (&m, &it->m)) {
        if ((e = l2_set (q, it->s.key, copy_entry (q, it))) == 0) {   /* (a link) */
          defer (run, it->s.host);
          (*moved)++;
          run->res->refs_updated++;
        }
      }
      else
        e = e < 0 ? e : 1;
      if (e != 0)
        rc_free (q, it->dst, 1);            /* never referenced */
      if (e < 0 && r == 0)
        r = e;
      inflight_remove (q, &it->f);
    }
    pthread_mutex_unlock (&q->lock);
    double t3 = monotonic_seconds ();
    longest (&run->rep.held, t3 - t0);
    longest (&run->rep.lock, t3 - t2);
  }

  /* The rest: copy, sync, then switch what no write called off. */
  for (size_t i = 0; i < n && r == 0; i++)
    if (!items[i].hold)
      r = copy_item (q, &items[i], buf, run->res);
  free (buf);
  if (r == 0 && n > 0)
    r = sync_links (q);                     /* copies durable before the switch
                                               (and the held ones' links) */
  pthread_mutex_lock (&q->lock);
  double t4 = monotonic_seconds ();
  for (size_t i = 0; i < n; i++) {
    struct item *it = &items[i];
    if (it->hold)
      continue;
    if (r < 0) {
      rc_free (q, it->dst, 1);
      continue;
    }
    struct move_mark *mk = find_mark (q, it->s.key);
    int e = switch_item (run, it, mk && mk->written, moved);
    if (e < 0)
      r = e;
  }
  q->nmoving = 0;
  pthread_mutex_unlock (&q->lock);
  longest (&run->rep.lock, monotonic_seconds () - t4);
  run->rep.batches++;
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

/* Does the L1 table (L1) or the refcount table end past BOUND?  With
 * q->lock held. */
static bool
table_beyond (struct qcow *q, bool l1, uint64_t bound)
{
  if (l1)
    return q->h.l1_size &&
           div_round_up (q->h.l1_table_offset + (uint64_t) q->h.l1_size * 8,
                         q->cluster_size) > bound;
  return (q->h.refcount_table_offset >> q->cluster_bits) +
         q->h.refcount_table_clusters > bound;
}

/* Move the L1 and refcount tables, if they lie past BOUND.  This stops
 * all I/O for a few syncs, at the start and at the end of a run, and only
 * when a table is that far out (a grown refcount table). */
static int
move_tables (struct run *run, uint64_t bound)
{
  struct qcow *q = run->q;
  int r = 0;
  pthread_mutex_lock (&q->lock);
  bool l1 = table_beyond (q, true, bound), rct = table_beyond (q, false, bound);
  pthread_mutex_unlock (&q->lock);
  if (!l1 && !rct)
    return 0;
  double t0 = exclusive (run);
  pthread_mutex_lock (&q->lock);
  if (table_beyond (q, true, bound))
    r = move_multi (q, true, run->res);
  if (r == 0 && table_beyond (q, false, bound))
    r = move_multi (q, false, run->res);
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);
  longest (&run->rep.excl, monotonic_seconds () - t0);
  return r;
}

/* Apply the frees queued for the background thread: compaction's own,
 * taken by a client's flush, and the clients'.  Until they are applied
 * their clusters count as used, and the file cannot shrink past them. */
static void
apply_queued_frees (struct qcow *q)
{
  pthread_mutex_lock (&q->lock);
  punch_queued (q);
  pthread_mutex_unlock (&q->lock);
}

/* Truncate the file after the last cluster in use (keeping keep_erased
 * bytes), looking at no more than SCAN_MAX refcounts per exclusive hold
 * of io_lock (a huge free tail is cut a piece at a time).  No request
 * is in flight meanwhile, so nothing allocated past the end is still
 * being written; clusters freed are unreferenced on disk already (the
 * frees are deferred until then), so no sync is needed first. */
static int
truncate_tail (struct run *run)
{
  struct qcow *q = run->q;
  const uint64_t keep = div_round_up (q->cfg.keep_erased, q->cluster_size);
  int r = 0;
  for (;;) {
    bool more = false;
    double t0 = exclusive (run);
    pthread_mutex_lock (&q->lock);
    uint64_t limit = div_round_up (q->file_size, q->cluster_size);
    if (q->frontier > limit)
      limit = q->frontier;
    uint64_t end = limit, looked = 0;
    while (end > 0 && looked < SCAN_MAX) {
      uint64_t c = end - 1, idx = c >> q->rb_bits, rc;
      if (idx >= q->rct_entries || q->rct[idx] == 0) {
        end = idx << q->rb_bits;            /* the whole block range is free */
        looked++;
        continue;
      }
      if ((r = rc_get (q, c, &rc)) < 0)
        break;
      if (rc)
        break;
      end--;
      looked++;
    }
    more = r == 0 && looked >= SCAN_MAX && end > 0;
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
      }
    }
    else
      more = false;
    pthread_mutex_unlock (&q->lock);
    io_unlock_exclusive (q);
    longest (&run->rep.excl, monotonic_seconds () - t0);
    if (!more || r < 0)
      return r;
  }
}

/* Free the old clusters whose switch is durable: once no request that
 * looked up the old mapping is in flight (io_lock exclusively, briefly),
 * they leave the list; they are punched and given back with no lock
 * held (apply_freeing). */
static int
take_frees (struct run *run)
{
  struct qcow *q = run->q;
  pthread_mutex_lock (&q->lock);
  size_t ready = 0;
  for (size_t i = 0; i < run->nfrees; i++)
    ready += run->frees[i].gen < q->durable_gen;
  pthread_mutex_unlock (&q->lock);
  if (ready == 0)
    return 0;
  struct freeing f = { malloc (ready * sizeof *f.c), 0, malloc (ready * sizeof *f.punch), 0 };
  if (!f.c || !f.punch) {
    free (f.c);
    free (f.punch);
    return -ENOMEM;
  }
  double t0 = exclusive (run);
  pthread_mutex_lock (&q->lock);
  size_t k = 0;
  for (size_t i = 0; i < run->nfrees; i++) {
    if (run->frees[i].gen < q->durable_gen && f.n < ready)
      f.c[f.n++] = run->frees[i].cluster;
    else
      run->frees[k++] = run->frees[i];
  }
  run->nfrees = k;
  io_unlock_exclusive (q);
  longest (&run->rep.excl, monotonic_seconds () - t0);
  int r = apply_freeing (q, &f);
  pthread_mutex_unlock (&q->lock);
  return r;
}

/* Make the moves so far durable, free the old clusters, and cut the file
 * after what is still in use.  While clients flush, their flushes make
 * the moves durable: then there is no need to flush (and hold up the
 * clients' next flushes), except to finish (FINAL). */
static int
commit (struct run *run, bool final)
{
  struct qcow *q = run->q;
  int r = 0;
  pthread_mutex_lock (&q->lock);
  bool flushed = q->durable_gen != run->durable_seen;
  pthread_mutex_unlock (&q->lock);
  if (final || !flushed) {
    r = sync_links (q);                     /* the bulk of it, before flush_lock */
    double t0 = monotonic_seconds ();
    if (r == 0)
      r = flush_all (q);                    /* switches durable */
    longest (&run->rep.flush, monotonic_seconds () - t0);
    run->rep.flushes++;
  }
  pthread_mutex_lock (&q->lock);
  run->durable_seen = q->durable_gen;
  pthread_mutex_unlock (&q->lock);
  if (r == 0)
    r = take_frees (run);
  apply_queued_frees (q);                   /* the clients' */
  if (r == 0)
    r = truncate_tail (run);
  run->rep.commits++;
  run->last_commit = monotonic_seconds ();
  return r;
}

static bool
stopping (struct qcow *q)
{
  return qcow_in_background && __atomic_load_n (&q->bg_stop, __ATOMIC_RELAXED);
}

/* Keep to cfg.compact_rate: sleep until the bytes moved so far are due,
 * applying queued frees meanwhile.  Woken early to stop. */
static void
pace (struct run *run)
{
  struct qcow *q = run->q;
  if (!run->paced)
    return;
  double due = run->start + (double) run->paced_bytes / q->cfg.compact_rate;
  pthread_mutex_lock (&q->lock);
  while (!q->bg_stop) {
    punch_queued (q);
    if (monotonic_seconds () >= due)
      break;
    struct timespec ts = { .tv_sec = (time_t) due,
                           .tv_nsec = (long) ((due - (time_t) due) * 1e9) };
    pthread_cond_clockwait (&q->bg_cond, &q->lock, CLOCK_MONOTONIC, &ts);
  }
  pthread_mutex_unlock (&q->lock);
}

static int
compact_run (struct qcow *q, qcow_progress_fn progress, void *opaque,
             struct qcow_compact_result *res, struct compact_report *rep)
{
  int r;
  struct run run = { .q = q, .res = res };
  run.start = run.last_commit = monotonic_seconds ();
  run.paced = qcow_in_background && q->cfg.compact_rate > 0;
  uint64_t bytes = BATCH_BYTES;
  if (run.paced && q->cfg.compact_rate / 16 < bytes)
    bytes = q->cfg.compact_rate / 16;       /* at least 16 batches a second */
  run.batch = bytes / q->cluster_size;
  if (run.batch < 1)
    run.batch = 1;
  if (run.batch > BATCH_MAX)
    run.batch = BATCH_MAX;
  struct item *items = calloc (run.batch, sizeof *items);
  struct move_mark *marks = calloc (run.batch, sizeof *marks);
  if (!items || !marks) {
    free (items);
    free (marks);
    return -ENOMEM;
  }

  pthread_mutex_lock (&q->lock);
  r = begin_modify (q);
  q->moving = marks;
  pthread_mutex_unlock (&q->lock);
  if (r == 0)
    r = flush_all (q);                      /* apply pending frees first */
  apply_queued_frees (q);
  uint64_t used = 0, end = 0;
  res->old_size = div_round_up (q->file_size, 512);
  if (r == 0)
    r = count_used (q, &used, &end);
  if (r == 0 && used < end)
    r = move_tables (&run, used);
  if (r == 0 && used < end)
    r = collect_sources (q, used, &run.l);
  while (r == 0 && !run.no_room && (run.pos < run.l.n || run.retry.n > 0) &&
         !stopping (q)) {
    size_t moved;
    r = move_batch (&run, items, &moved);
    if (progress && run.l.n)
      progress ((int) (run.pos * 100 / run.l.n), opaque);
    if (r == 0 && monotonic_seconds () - run.last_commit >= COMMIT_SECONDS)
      r = commit (&run, false);
    if (r == 0)
      pace (&run);
  }
  free (run.l.v);
  free (run.retry.v);
  pthread_mutex_lock (&q->lock);
  bool tables = table_beyond (q, true, used) || table_beyond (q, false, used);
  pthread_mutex_unlock (&q->lock);
  if (r == 0 && used < end && tables && !stopping (q)) {
    r = commit (&run, true);                /* room may have appeared below */
    if (r == 0)
      r = move_tables (&run, used);
  }
  if (r == 0)
    r = commit (&run, true);

  /* Anything not freed yet (an error) goes the usual way: the next
   * flush frees it. */
  pthread_mutex_lock (&q->lock);
  q->moving = NULL;
  q->nmoving = 0;
  for (size_t i = 0; i < run.nfrees; i++)
    rc_defer_free (q, run.frees[i].cluster);
  pthread_mutex_unlock (&q->lock);
  free (run.frees);
  free (items);
  free (marks);
  res->new_size = div_round_up (q->file_size, 512);
  run.rep.seconds = monotonic_seconds () - run.start;
  *rep = run.rep;
  if (progress && r == 0)
    progress (100, opaque);
  return r;
}

int
qcow_compact (struct qcow *q, qcow_progress_fn progress, void *opaque,
              struct qcow_compact_result *res)
{
  memset (res, 0, sizeof *res);
  if (q->read_only) {
    ERR (q, "image is open read-only");
    return -EROFS;
  }
  struct compact_report rep = { 0 };
  pthread_mutex_lock (&q->compact_lock);
  __atomic_store_n (&q->compacting, true, __ATOMIC_RELAXED);   /* rw.c */
  int r = compact_run (q, progress, opaque, res, &rep);
  __atomic_store_n (&q->compacting, false, __ATOMIC_RELAXED);
  pthread_mutex_unlock (&q->compact_lock);
  if (qcow_in_background)
    qcow_debugf ("%s: background compaction: %.3f s, %" PRIu64 " batches, %"
                 PRIu64 " moves called off by writes, %" PRIu64 " held, %"
                 PRIu64 " commits, %" PRIu64 " flushes, %" PRIu64 " drains given up; "
                 "longest: io_lock exclusive %.1f ms, image "
                 "lock %.1f ms, writes held %.1f ms, flush %.1f ms",
                 q->filename, rep.seconds, rep.batches, rep.called_off,
                 rep.held_moves, rep.commits, rep.flushes, rep.drain_timeouts,
                 rep.excl * 1e3, rep.lock * 1e3,
                 rep.held * 1e3, rep.flush * 1e3);
  return r;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* cache.c - metadata table cache for L2 tables and refcount blocks.
 *
 * Entries are found by key (the index of an L2 slice: a whole L2 table,
 * or a 4 KiB part of one when the cache cannot map the whole image, see
 * caches_setup; the refcount table index of a refcount block) through a
 * slot array, and kept on an LRU list.  Every change to the cache is made
 * with q->lock held.
 *
 * The cache knows nothing of the order in which dirty tables must reach
 * the disk (refcount blocks before the L2 tables that use their clusters,
 * L2 tables before the L1 entries that point to them): the layer above
 * gives it, at cache_init, a write-back callback that writes every dirty
 * table in that order (cluster.c's metadata_sync), and the cache calls it
 * before it evicts a dirty entry, so the order is never broken.
 *
 * Lock-free readers (cache_read_word: the read and overwrite fast path
 * in rw.c, which holds io_lock shared but not q->lock) may look at an
 * entry at any time, so:
 *   - an entry and its table buffer are never freed while the image is
 *     open: an evicted entry is reused for the table loaded in its place,
 *     a dropped one waits on the spare list (cache_free frees them all);
 *   - a reused entry is unpublished first (its slot cleared), and its
 *     sequence number is odd while its key and contents change, so a
 *     reader that picked it up before compares the number before and
 *     after its read and falls back to the locked path on a change;
 *   - single table words are stored whole (8-byte aligned stores), so a
 *     reader sees the old or the new word, never a mix;
 *   - the slot array is reallocated only with io_lock held exclusively
 *     (resize), never under a reader.
 * Eviction is LRU, except that an entry the fast path used since it was
 * last on the cold end gets a second chance (its `referenced` bit): the
 * fast path cannot reorder the list. */
#include <stdlib.h>

#include "internal.h"

static void
cache_init (struct cache *c, const char *what, size_t max, size_t esize,
            int (*writeback) (struct qcow *q))
{
  memset (c, 0, sizeof *c);
  c->what = what;
  c->writeback = writeback;
  c->max = max;               /* at least 16: caches_setup */
  c->esize = esize;
  c->lru.prev = c->lru.next = &c->lru;
}

/* Size the caches as QEMU does: enough L2 to map the whole image, up to
 * 32 MiB (cfg.cache_size, if given, is the total for both caches, L2
 * first); refcount blocks a quarter of that.  When the L2 cache cannot
 * map the whole image, its entries are 4 KiB slices of the tables rather
 * than whole tables: a miss reads 4 KiB, and memory holds only the parts
 * of the tables in use.  Nothing is allocated until used.  WRITEBACK:
 * see cache_init. */
int
caches_setup (struct qcow *q, int (*writeback) (struct qcow *q))
{
  const uint64_t cs = q->cluster_size, min_rc = 4 * cs;
  uint64_t clusters = div_round_up (q->h.size, cs);
  uint64_t l2_need = div_round_up (clusters << q->l2_esh, cs) * cs;
  uint64_t l2, rc;
  if (q->cfg.cache_size == 0) {
    l2 = l2_need < QCOW_DEFAULT_L2_CACHE ? l2_need : QCOW_DEFAULT_L2_CACHE;
    rc = l2 / 4;
  }
  else {
    uint64_t total = q->cfg.cache_size;
    l2 = total > min_rc ? total - min_rc : 0;
    if (l2 > l2_need)
      l2 = l2_need;
    rc = total - l2;
  }
  /* Slices: at least 512 bytes, a power of two, at most the table. */
  unsigned sl_bits = q->l2_bits;
  if (l2 < l2_need && cs > 4096)
    sl_bits = 12 - q->l2_esh;
  /* The slot array has an entry per slice of the whole image's tables:
   * fall back to whole tables where that would be huge. */
  if (((uint64_t) q->h.l1_size << (q->l2_bits - sl_bits)) > (1ULL << 24))
    sl_bits = q->l2_bits;
  q->sl_bits = sl_bits;
  size_t esize = (size_t) 1 << (sl_bits + q->l2_esh);
  uint64_t l2n = l2 / esize, rcn = rc / cs;
  if (rcn > q->rct_entries) rcn = q->rct_entries;
  cache_init (&q->l2_cache, "L2 table", l2n < 16 ? 16 : l2n, esize, writeback);
  cache_init (&q->refblock_cache, "refcount block", rcn < 16 ? 16 : rcn, cs, writeback);
  int r = cache_resize_slots (&q->l2_cache, l2_slots (q, q->h.l1_size));
  if (r == 0)
    r = cache_resize_slots (&q->refblock_cache, q->rct_entries);
  if (r < 0)
    ERR (q, "out of memory for the metadata caches");
  return r;
}

int
cache_resize_slots (struct cache *c, uint64_t nslots)
{
  if (nslots <= c->nslots)
    return 0;
  /* The first time calloc: pages never touched cost no memory. */
  struct centry **s = c->slot ? realloc (c->slot, nslots * sizeof *s)
                              : calloc (nslots, sizeof *s);
  if (!s)
    return -ENOMEM;
  if (c->slot)
    memset (s + c->nslots, 0, (nslots - c->nslots) * sizeof *s);
  c->slot = s;
  c->nslots = nslots;
  return 0;
}

static void
lru_unlink (struct centry *e)
{
  e->prev->next = e->next;
  e->next->prev = e->prev;
}

static void
lru_push_front (struct cache *c, struct centry *e)
{
  e->next = c->lru.next;
  e->prev = &c->lru;
  c->lru.next->prev = e;
  c->lru.next = e;
}

/* The seqlock around a change of an entry's identity (key, contents). */
static void
change_begin (struct centry *e)
{
  __atomic_store_n (&e->seq, e->seq + 1, __ATOMIC_RELAXED);
  __atomic_thread_fence (__ATOMIC_RELEASE);
}

static void
change_end (struct centry *e)
{
  __atomic_store_n (&e->seq, e->seq + 1, __ATOMIC_RELEASE);
}

/* Take E out of the cache (slot, LRU list, counts): it may be reused. */
static void
entry_unpublish (struct cache *c, struct centry *e)
{
  lru_unlink (e);
  if (e->dirty)
    c->ndirty--;
  e->dirty = false;
  __atomic_store_n (&c->slot[e->key], NULL, __ATOMIC_RELEASE);
  c->count--;
}

static void
entry_to_spare (struct cache *c, struct centry *e)
{
  entry_unpublish (c, e);
  change_begin (e);             /* a reader holding it sees the change */
  change_end (e);
  e->next = c->spare;
  c->spare = e;
}

void
cache_drop (struct cache *c, uint64_t key)
{
  if (key < c->nslots && c->slot[key])
    entry_to_spare (c, c->slot[key]);
}

void
cache_drop_all (struct cache *c)
{
  while (c->lru.next != &c->lru)
    entry_to_spare (c, c->lru.next);
}

/* With the image closing: no reader is left. */
void
cache_free (struct cache *c)
{
  if (c->lru.next)              /* initialised */
    cache_drop_all (c);
  while (c->spare) {
    struct centry *e = c->spare;
    c->spare = e->next;
    free (e->data);
    free (e);
  }
  free (c->slot);
  c->slot = NULL;
  c->nslots = 0;
}

struct centry *
cache_peek (struct cache *c, uint64_t key)
{
  return key < c->nslots ? c->slot[key] : NULL;
}

void
cache_mark_dirty (struct cache *c, struct centry *e)
{
  if (!e->dirty) {
    e->dirty = true;
    c->ndirty++;
  }
}

/* An entry to load a table into: a spare one, a new one, or (the cache
 * being full) the least recently used, unpublished.  NULL: out of
 * memory, or the write-back before evicting a dirty entry failed (*R). */
static struct centry *
entry_for_load (struct qcow *q, struct cache *c, int *r)
{
  *r = 0;
  if (c->count < c->max) {
    struct centry *e = c->spare;
    if (e) {
      c->spare = e->next;
      return e;
    }
    e = calloc (1, sizeof *e);
    if (e && !(e->data = malloc (c->esize))) {
      free (e);
      e = NULL;
    }
    if (!e)
      *r = -ENOMEM;
    return e;
  }
  /* Full: evict from the cold end; what the fast path used since it was
   * last seen there goes back to the front once. */
  for (size_t tries = 0;; tries++) {
    struct centry *victim = c->lru.prev;
    if (tries < c->count &&
        __atomic_load_n (&victim->referenced, __ATOMIC_RELAXED)) {
      __atomic_store_n (&victim->referenced, false, __ATOMIC_RELAXED);
      lru_unlink (victim);
      lru_push_front (c, victim);
      continue;
    }
    if (victim->dirty && (*r = c->writeback (q)) < 0)
      return NULL;
    entry_unpublish (c, victim);
    return victim;
  }
}

int
cache_get (struct qcow *q, struct cache *c, uint64_t key, uint64_t offset,
           bool fresh, struct centry **ep)
{
  assert (key < c->nslots);     /* slots cover the L1 / refcount table */
  struct centry *e = c->slot[key];
  if (e) {
    if (c->lru.next != e) {
      lru_unlink (e);
      lru_push_front (c, e);
    }
    q->stats.l2_cache_hits += c == &q->l2_cache;
    *ep = e;
    return 0;
  }
  q->stats.l2_cache_misses += c == &q->l2_cache;
  int r;
  if (!(e = entry_for_load (q, c, &r))) {
    if (r == -ENOMEM)
      ERR (q, "out of memory for the %s cache", c->what);
    return r;
  }
  change_begin (e);
  if (fresh)
    memset (e->data, 0, c->esize);
  else
    r = io_pread (q, e->data, c->esize, offset);
  __atomic_store_n (&e->key, key, __ATOMIC_RELAXED);
  e->offset = offset;
  e->referenced = false;
  change_end (e);
  if (r < 0) {
    e->next = c->spare;
    c->spare = e;
    return r;
  }
  c->count++;
  lru_push_front (c, e);
  __atomic_store_n (&c->slot[key], e, __ATOMIC_RELEASE);
  if (fresh)
    cache_mark_dirty (c, e);
  *ep = e;
  return 0;
}

/* Without q->lock (see the top of the file): the big-endian word at byte
 * OFF of the cached table KEY, in *V.  False if the table is not cached
 * or changed under the read (the caller takes the locked path). */
bool
cache_read_word (struct cache *c, uint64_t key, size_t off, uint64_t *v)
{
  struct centry *e = __atomic_load_n (&c->slot[key], __ATOMIC_ACQUIRE);
  if (!e)
    return false;
  unsigned s1 = __atomic_load_n (&e->seq, __ATOMIC_ACQUIRE);
  if (s1 & 1)
    return false;
  uint64_t k = __atomic_load_n (&e->key, __ATOMIC_RELAXED);
  uint64_t w = __atomic_load_n ((uint64_t *) (e->data + off), __ATOMIC_RELAXED);
  __atomic_thread_fence (__ATOMIC_ACQUIRE);
  if (__atomic_load_n (&e->seq, __ATOMIC_RELAXED) != s1 || k != key)
    return false;
  if (!__atomic_load_n (&e->referenced, __ATOMIC_RELAXED))
    __atomic_store_n (&e->referenced, true, __ATOMIC_RELAXED);
  *v = be64toh (w);
  return true;
}

/* Write every dirty entry (no ordering between them, no sync). */
int
cache_write_dirty (struct qcow *q, struct cache *c)
{
  if (c->ndirty == 0)
    return 0;
  for (struct centry *e = c->lru.next; e != &c->lru; e = e->next) {
    if (!e->dirty)
      continue;
    int r = io_pwrite (q, e->data, c->esize, e->offset);
    if (r < 0)
      return r;
    e->dirty = false;
    c->ndirty--;
    q->stats.metadata_writes++;
  }
  return 0;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* cache.c - metadata table cache for L2 tables and refcount blocks.
 *
 * Entries are found by key (the L1 index of an L2 table, the refcount
 * table index of a refcount block) through a slot array, and kept on an
 * LRU list.  All calls are made with q->lock held.
 *
 * The cache knows nothing of the order in which dirty tables must reach
 * the disk (refcount blocks before the L2 tables that use their clusters,
 * L2 tables before the L1 entries that point to them): the layer above
 * gives it, at cache_init, a write-back callback that writes every dirty
 * table in that order (cluster.c's metadata_sync), and the cache calls it
 * before it evicts a dirty entry, so the order is never broken. */
#include <stdlib.h>

#include "internal.h"

void
cache_init (struct cache *c, const char *what, size_t max,
            int (*writeback) (struct qcow *q))
{
  memset (c, 0, sizeof *c);
  c->what = what;
  c->writeback = writeback;
  c->max = max < 4 ? 4 : max;
  c->lru.prev = c->lru.next = &c->lru;
}

int
cache_resize_slots (struct cache *c, uint64_t nslots)
{
  if (nslots <= c->nslots)
    return 0;
  struct centry **s = realloc (c->slot, nslots * sizeof *s);
  if (!s)
    return -ENOMEM;
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

static void
entry_free (struct cache *c, struct centry *e)
{
  lru_unlink (e);
  if (e->dirty)
    c->ndirty--;
  c->slot[e->key] = NULL;
  c->count--;
  free (e->data);
  free (e);
}

void
cache_drop (struct cache *c, uint64_t key)
{
  if (key < c->nslots && c->slot[key])
    entry_free (c, c->slot[key]);
}

void
cache_drop_all (struct cache *c)
{
  while (c->lru.next != &c->lru)
    entry_free (c, c->lru.next);
}

void
cache_free (struct cache *c)
{
  if (c->lru.next)              /* initialised */
    cache_drop_all (c);
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

/* Make room for one more entry. */
static int
cache_evict (struct qcow *q, struct cache *c)
{
  while (c->count >= c->max) {
    struct centry *victim = c->lru.prev;
    if (victim->dirty) {
      int r = c->writeback (q);
      if (r < 0)
        return r;
    }
    entry_free (c, victim);
  }
  return 0;
}

int
cache_get (struct qcow *q, struct cache *c, uint64_t key, uint64_t offset,
           bool fresh, struct centry **ep)
{
  assert (key < c->nslots);     /* slots cover the L1 / refcount table */
  struct centry *e = c->slot[key];
  if (e) {
    lru_unlink (e);
    lru_push_front (c, e);
    q->stats.l2_cache_hits += c == &q->l2_cache;
    *ep = e;
    return 0;
  }
  q->stats.l2_cache_misses += c == &q->l2_cache;
  int r = cache_evict (q, c);
  if (r < 0)
    return r;
  e = calloc (1, sizeof *e);
  if (e)
    e->data = fresh ? calloc (1, q->cluster_size) : malloc (q->cluster_size);
  if (!e || !e->data) {
    free (e);
    ERR (q, "out of memory for the %s cache", c->what);
    return -ENOMEM;
  }
  if (!fresh) {
    r = io_pread (q, e->data, q->cluster_size, offset);
    if (r < 0) {
      free (e->data);
      free (e);
      return r;
    }
  }
  e->key = key;
  e->offset = offset;
  c->slot[key] = e;
  c->count++;
  lru_push_front (c, e);
  if (fresh)
    cache_mark_dirty (c, e);
  *ep = e;
  return 0;
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
    int r = io_pwrite (q, e->data, q->cluster_size, e->offset);
    if (r < 0)
      return r;
    e->dirty = false;
    c->ndirty--;
    q->stats.metadata_writes++;
  }
  return 0;
}

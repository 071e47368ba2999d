/* SPDX-License-Identifier: BSD-3-Clause */
/* map.c - block status: qcow_map, seek_mapped/unmapped, allocated bytes.
 *
 * Runs of clusters that read alike are merged; an L2 table that is not
 * allocated answers for all its clusters at once; what an unallocated
 * cluster shows of the backing file is asked of the backing image.
 * Under q->lock. */


#include "internal.h"

/* ---- map ---- */
static unsigned
kind_flags (enum ckind k)
{
  switch (k) {
  case C_UNALLOC: case C_ZERO: return QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
  case C_ZERO_ALLOC: return QCOW_EXTENT_ZERO;
  default: return 0;
  }
}

static int
map_locked (struct qcow *q, uint64_t offset, uint64_t count, uint64_t *lenp,
            unsigned *flagsp)
{
  const uint64_t cs = q->cluster_size;
  uint64_t len = 0;
  unsigned flags = 0;
  while (len < count) {
    uint64_t off = offset + len, gc = off >> q->cluster_bits;
    uint64_t idx = gc >> q->l2_bits;
    unsigned f;
    uint64_t step;
    bool unalloc;
    if (!(q->l1[idx] & L1_OFFSET_MASK) && !cache_peek (&q->l2_cache, idx)) {
      unalloc = true;
      f = QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
      step = ((idx + 1) << (q->l2_bits + q->cluster_bits)) - off;
    }
    else {
      struct cmap m;
      int r = l2_lookup (q, gc, &m);
      if (r < 0)
        return r;
      unalloc = m.kind == C_UNALLOC;
      f = kind_flags (m.kind);
      step = cs - (off & (cs - 1));
      if (m.kind == C_SUBCL)
        sc_map (q, &m, off, count - len, &step, &f, &unalloc);
    }
    if (unalloc && q->backing_path) {       /* what shows through */
      int r = backing_map (q, off, step < count - len ? step : count - len, &step, &f);
      if (r < 0)
        return r;
    }
    if (len == 0)
      flags = f;
    else if (f != flags)
      break;
    len += step < count - len ? step : count - len;
  }
  *lenp = len;
  *flagsp = flags;
  return 0;
}

int
qcow_map (struct qcow *q, uint64_t offset, uint64_t count, uint64_t *len,
          unsigned *flags)
{
  int r = check_range (q, count, offset);
  if (r < 0)
    return r;
  pthread_mutex_lock (&q->lock);
  r = map_locked (q, offset, count, len, flags);
  pthread_mutex_unlock (&q->lock);
  return r;
}

static int64_t
seek_flags (struct qcow *q, uint64_t from, unsigned mask, bool want_set)
{
  while (from < q->h.size) {
    uint64_t len;
    unsigned flags;
    int r = qcow_map (q, from, q->h.size - from, &len, &flags);
    if (r < 0)
      return r;
    if (((flags & mask) != 0) == want_set)
      return from;
    from += len;
  }
  return q->h.size;
}

int64_t qcow_seek_mapped (struct qcow *q, uint64_t from)
{ return seek_flags (q, from, QCOW_EXTENT_HOLE, false); }
int64_t qcow_seek_unmapped (struct qcow *q, uint64_t from)
{ return seek_flags (q, from, QCOW_EXTENT_ZERO, true); }

int
qcow_allocated_bytes (struct qcow *q, uint64_t *bytes)
{
  uint64_t n = 0;
  int r = 0;
  pthread_mutex_lock (&q->lock);
  for (uint64_t i = 0; i < q->h.l1_size && r == 0; i++) {
    struct centry *e;
    if ((r = l2_get_table (q, i, false, &e)) < 0 || !e)
      continue;
    for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++) {
      uint64_t ent = rd64 (L2E (q, e->data, j));
      if (ent & ENTRY_COMPRESSED ||
          ((ent & L2_OFFSET_MASK) && !(q->h.version >= 3 && (ent & ENTRY_ZERO))))
        n++;
    }
  }
  pthread_mutex_unlock (&q->lock);
  *bytes = n * q->cluster_size;
  return r;
}

/* ---- one layer's mapping (qcow_map_layer) ---- */

/* What this image alone says of guest cluster GC (mapped as M) at byte IN
 * of it: flags, host offset, and the bytes from IN on that it says the
 * same of (the rest of the cluster, or the run of like subclusters). */
static void
layer_cluster (struct qcow *q, const struct cmap *m, uint64_t in,
               unsigned *flags, uint64_t *host, uint64_t *step)
{
  const uint64_t cs = q->cluster_size;
  *step = cs - in;
  *host = 0;
  *flags = 0;
  switch (m->kind) {
  case C_UNALLOC: *flags = 0; return;
  case C_ZERO: *flags = QCOW_LAYER_ZERO; return;
  case C_ZERO_ALLOC: *flags = QCOW_LAYER_ZERO | QCOW_LAYER_OFFSET; break;
  case C_DATA: *flags = QCOW_LAYER_DATA | QCOW_LAYER_OFFSET; break;
  case C_COMPRESSED: *flags = QCOW_LAYER_DATA | QCOW_LAYER_COMPRESSED; return;
  case C_SUBCL: {
    /* Per subcluster, as QEMU's qcow2_get_subcluster_type: allocated,
     * zero (with or without a host cluster), or unallocated (with or
     * without one). */
    const uint64_t us = 1ULL << q->sc_bits;
    unsigned u = in >> q->sc_bits;
    uint64_t bits = (m->bitmap >> u & 1) | (m->bitmap >> (u + 32) & 1) << 1;
    uint64_t n = us - (in & (us - 1));
    while (in + n < cs) {
      unsigned v = (in + n) >> q->sc_bits;
      if (((m->bitmap >> v & 1) | (m->bitmap >> (v + 32) & 1) << 1) != bits)
        break;
      n += us;
    }
    *step = n;
    *flags = bits & 1 ? QCOW_LAYER_DATA : bits & 2 ? QCOW_LAYER_ZERO : 0;
    if (!m->host)
      return;
    *flags |= QCOW_LAYER_OFFSET;
    break;
  }
  }
  *host = m->host + in;
}

int
qcow_map_layer (struct qcow *q, uint64_t offset, uint64_t count, uint64_t *lenp,
                unsigned *flagsp, uint64_t *hostp)
{
  int r = check_range (q, count, offset);
  if (r < 0)
    return r;
  const uint64_t cs = q->cluster_size;
  uint64_t len = 0, host = 0;
  unsigned flags = 0;
  pthread_mutex_lock (&q->lock);
  while (len < count) {
    uint64_t off = offset + len, gc = off >> q->cluster_bits;
    uint64_t idx = gc >> q->l2_bits, h = 0, step;
    unsigned f;
    if (!(q->l1[idx] & L1_OFFSET_MASK) && !cache_peek (&q->l2_cache, idx)) {
      f = 0;                    /* no L2 table: all unallocated */
      step = ((idx + 1) << (q->l2_bits + q->cluster_bits)) - off;
    }
    else {
      struct cmap m;
      if ((r = l2_lookup (q, gc, &m)) < 0)
        break;
      layer_cluster (q, &m, off & (cs - 1), &f, &h, &step);
    }
    if (step > count - len)
      step = count - len;
    if (len == 0) {
      flags = f;
      host = h;
    }
    else if (f != flags || ((f & QCOW_LAYER_OFFSET) && h != host + len))
      break;
    len += step;
  }
  pthread_mutex_unlock (&q->lock);
  *lenp = len;
  *flagsp = flags;
  *hostp = host;
  return r;
}

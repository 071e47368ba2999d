/* SPDX-License-Identifier: BSD-3-Clause */
/* map.c - block status: qcow_map, seek_mapped/unmapped, allocated bytes.
 *
 * Runs of clusters that read alike are merged; an L2 table that is not
 * allocated answers for all its clusters at once, and in a table runs of
 * unallocated entries are skipped a word at a time; what an unallocated
 * cluster shows of the backing file is asked of the backing image.
 * Under q->lock. */


#include <stdlib.h>

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

/* When the cache holds slices, a scan reads the slices it needs and the
 * cache does not hold into q->map, without caching them: a map of a large
 * image would only push out what the I/O path uses.  A client maps a
 * disk in requests that each end at the next data (see shim.c), so the
 * next request starts in the table the last one stopped in.  An image
 * read-only from the start keeps what it read between calls (as the
 * cache would) and reads the rest of a table at once: each table is read
 * once.  Otherwise a call starts afresh; going on in a table it reads
 * ahead as many slices as it has read of it, else one, so a request
 * reads little past the data it stops at. */

/* The L2 slice of guest cluster GC, for a scan: its entries at *DATA,
 * which lie at *AT in the file. */
static int
scan_slice (struct qcow *q, uint64_t gc, const uint8_t **data, uint64_t *at)
{
  uint64_t idx = gc >> q->l2_bits, key = gc >> q->sl_bits;
  uint64_t s = key & (l2_slots (q, 1) - 1), toff = q->l1[idx] & L1_OFFSET_MASK;
  struct centry *e = cache_peek (&q->l2_cache, key);
  struct map_scan *st = &q->map;
  int r;
  if (q->sl_bits == q->l2_bits || e) {
    if ((r = l2_get_slice (q, gc, false, &e)) < 0)
      return r;
    *data = e->data;
    *at = e->offset;
    return 0;
  }
  if (!st->buf && !(st->buf = malloc (q->cluster_size)))
    return -ENOMEM;
  if (st->idx != idx || st->at != toff || s < st->lo || s >= st->hi) {
    bool on = st->idx == idx && st->at == toff && s == st->hi;
    uint64_t n = q->map_keep ? l2_slots (q, 1) - s : on ? st->hi - st->lo : 1;
    if (!on)
      st->lo = s;
    if (n > l2_slots (q, 1) - s)
      n = l2_slots (q, 1) - s;
    st->idx = UINT64_MAX;
    if ((r = l2_read_slices (q, idx, s, n, st->buf)) < 0)
      return r;
    st->idx = idx;
    st->at = toff;
    st->hi = s + n;
  }
  const uint64_t b = s * q->l2_cache.esize;
  *data = st->buf + b;
  *at = toff + b;
  return 0;
}

/* The flags of the entry at EP (AT in the file), for guest cluster GC:
 * holes (the commonest entry, 0) without decoding. */
static int
entry_flags (struct qcow *q, uint64_t gc, const uint8_t *ep, uint64_t at,
             unsigned *f)
{
  if (*(const uint64_t *) ep == 0) {
    *f = QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
    return 0;
  }
  struct cmap m;
  int r = l2_decode_at (q, gc, ep, at, &m);
  *f = kind_flags (m.kind);
  return r;
}

/* From guest cluster GC (at OFF), in its L2 slice at D (AT in the file), the clusters
 * that map alike, at most MAX bytes: their byte count in *STEP and flags
 * in *F.  A run of unallocated entries is skipped 512 bytes at a time.
 * For images whose entries all map by themselves (no backing file to
 * show through, no subclusters). */
static int
scan_entries (struct qcow *q, const uint8_t *d, uint64_t at, uint64_t gc,
              uint64_t off, uint64_t max, uint64_t *step, unsigned *f)
{
  const uint64_t cs = q->cluster_size, in = off & (cs - 1);
  const uint64_t j0 = l2_slice_index (q, gc);
  uint64_t jend = 1ULL << q->sl_bits;
  if (jend - j0 > div_round_up (in + max, cs))
    jend = j0 + div_round_up (in + max, cs);
  int r = entry_flags (q, gc, L2E (q, d, j0), at + (j0 << q->l2_esh), f);
  if (r < 0)
    return r;
  const uint64_t *w = (const uint64_t *) d;
  uint64_t j = j0 + 1;
  while (j < jend) {
    if (*f == (QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO)) {
      while (j < jend && j % 8)
        if (w[j]) break; else j++;
      while (j + 64 <= jend && memcmp (w + j, q->zero_cluster, 512) == 0)
        j += 64;
      while (j + 8 <= jend &&
             !(w[j] | w[j + 1] | w[j + 2] | w[j + 3] | w[j + 4] | w[j + 5] |
               w[j + 6] | w[j + 7]))
        j += 8;
      while (j < jend && w[j] == 0)
        j++;
    }
    if (j == jend)
      break;
    unsigned fj;
    if ((r = entry_flags (q, gc - j0 + j, L2E (q, d, j), at + (j << q->l2_esh),
                          &fj)) < 0)
      return r;
    if (fj != *f)
      break;
    j++;
  }
  *step = (j - j0) * cs - in;
  return 0;
}

/* The run at OFFSET (at most COUNT bytes) that maps alike. */
static int
map_locked (struct qcow *q, uint64_t offset, uint64_t count,
            uint64_t *lenp, unsigned *flagsp)
{
  const uint64_t cs = q->cluster_size;
  uint64_t len = 0;
  unsigned flags = 0;
  while (len < count) {
    uint64_t off = offset + len, gc = off >> q->cluster_bits;
    uint64_t idx = gc >> q->l2_bits;
    unsigned f;
    uint64_t step;
    bool unalloc = false;
    const uint8_t *d;
    uint64_t at;
    int r;
    if (!(q->l1[idx] & L1_OFFSET_MASK)) {
      unalloc = true;
      f = QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
      step = ((idx + 1) << (q->l2_bits + q->cluster_bits)) - off;
    }
    else if (!q->extl2 && !q->backing_path) {
      if ((r = scan_slice (q, gc, &d, &at)) < 0 ||
          (r = scan_entries (q, d, at, gc, off, count - len, &step, &f)) < 0)
        return r;
    }
    else {
      struct cmap m;
      if ((r = l2_lookup (q, gc, &m)) < 0)
        return r;
      unalloc = m.kind == C_UNALLOC;
      f = kind_flags (m.kind);
      step = cs - (off & (cs - 1));
      if (m.kind == C_SUBCL)
        sc_map (q, &m, off, count - len, &step, &f, &unalloc);
    }
    if (unalloc && q->backing_path) {       /* what shows through */
      r = backing_map (q, off, step < count - len ? step : count - len, &step, &f);
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
qcow_map_all (struct qcow *q, uint64_t offset, uint64_t count,
              qcow_extent_fn fn, void *opaque)
{
  int r = check_range (q, count, offset);
  if (r < 0)
    return r;
  pthread_mutex_lock (&q->lock);
  if (!q->map_keep)
    q->map.idx = UINT64_MAX;
  while (count > 0) {
    uint64_t len;
    unsigned flags;
    if ((r = map_locked (q, offset, count, &len, &flags)) < 0 ||
        (r = fn (offset, len, flags, opaque)) != 0)
      break;
    offset += len;
    count -= len;
  }
  pthread_mutex_unlock (&q->lock);
  return r < 0 ? r : 0;
}

struct first_run { uint64_t len; unsigned flags; };

static int
take_first (uint64_t offset, uint64_t len, unsigned flags, void *opaque)
{
  struct first_run *fr = opaque;
  (void) offset;
  fr->len = len;
  fr->flags = flags;
  return 1;
}

int
qcow_map (struct qcow *q, uint64_t offset, uint64_t count, uint64_t *len,
          unsigned *flags)
{
  struct first_run fr = { 0, 0 };
  int r = qcow_map_all (q, offset, count, take_first, &fr);
  *len = fr.len;
  *flags = fr.flags;
  return r;
}

struct seek { unsigned mask; bool want_set; uint64_t found; };

static int
seek_match (uint64_t offset, uint64_t len, unsigned flags, void *opaque)
{
  struct seek *sk = opaque;
  (void) len;
  if (((flags & sk->mask) != 0) != sk->want_set)
    return 0;
  sk->found = offset;
  return 1;
}

static int64_t
seek_flags (struct qcow *q, uint64_t from, unsigned mask, bool want_set)
{
  struct seek sk = { mask, want_set, q->h.size };
  if (from >= q->h.size)
    return q->h.size;
  int r = qcow_map_all (q, from, q->h.size - from, seek_match, &sk);
  return r < 0 ? r : (int64_t) sk.found;
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
  uint8_t *buf = malloc (q->cluster_size);
  if (!buf)
    return -ENOMEM;
  pthread_mutex_lock (&q->lock);
  for (uint64_t i = 0; i < q->h.l1_size && r == 0; i++) {
    if (!(q->l1[i] & L1_OFFSET_MASK) || (r = l2_read_table (q, i, buf)) < 0)
      continue;
    for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++) {
      uint64_t ent = rd64 (L2E (q, buf, j));
      if (ent & ENTRY_COMPRESSED ||
          ((ent & L2_OFFSET_MASK) && !(q->h.version >= 3 && (ent & ENTRY_ZERO))))
        n++;
    }
  }
  pthread_mutex_unlock (&q->lock);
  free (buf);
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
  case C_UNALLOC: return;
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
    if (!(q->l1[idx] & L1_OFFSET_MASK)) {
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

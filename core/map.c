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

/* The flags of L2 entry ENT (big-endian, as in the table) for guest
 * cluster GC: holes (the commonest entry, 0) without decoding. */
static int
entry_flags (struct qcow *q, uint64_t gc, const struct centry *e, unsigned *f)
{
  if (*(const uint64_t *) L2E (q, e->data, l2_slice_index (q, gc)) == 0) {
    *f = QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
    return 0;
  }
  struct cmap m;
  int r = l2_decode (q, gc, e, &m);
  *f = kind_flags (m.kind);
  return r;
}

/* From guest cluster GC (at OFF), in its L2 slice E, the clusters that
 * map alike, at most MAX bytes: their byte count in *STEP and flags in
 * *F.  A run of unallocated entries is skipped a word at a time.  For
 * images whose entries all map by themselves (no backing file to show
 * through, no subclusters). */
static int
scan_slice (struct qcow *q, const struct centry *e, uint64_t gc, uint64_t off,
            uint64_t max, uint64_t *step, unsigned *f)
{
  const uint64_t cs = q->cluster_size, in = off & (cs - 1);
  const uint64_t j0 = l2_slice_index (q, gc);
  uint64_t jend = 1ULL << q->sl_bits;
  if (jend - j0 > div_round_up (in + max, cs))
    jend = j0 + div_round_up (in + max, cs);
  int r = entry_flags (q, gc, e, f);
  if (r < 0)
    return r;
  const uint64_t *w = (const uint64_t *) e->data;
  uint64_t j = j0 + 1;
  while (j < jend) {
    if (*f == (QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO) && !q->extl2)
      while (j < jend && w[j] == 0)
        j++;
    if (j == jend)
      break;
    unsigned fj;
    if ((r = entry_flags (q, gc - j0 + j, e, &fj)) < 0)
      return r;
    if (fj != *f)
      break;
    j++;
  }
  *step = (j - j0) * cs - in;
  return 0;
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
    bool unalloc = false;
    int r;
    if (!(q->l1[idx] & L1_OFFSET_MASK)) {
      unalloc = true;
      f = QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
      step = ((idx + 1) << (q->l2_bits + q->cluster_bits)) - off;
    }
    else if (!q->extl2 && !q->backing_path) {
      struct centry *e;
      if ((r = l2_get_slice (q, gc, false, &e)) < 0)
        return r;
      if ((r = scan_slice (q, e, gc, off, count - len, &step, &f)) < 0)
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

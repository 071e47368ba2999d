/* SPDX-License-Identifier: BSD-3-Clause */
/* subcluster.c - extended L2 entries (incompatible feature bit 4): each
 * cluster is split into 32 subclusters, each allocated, reading as
 * zeros, or unallocated (backing file or zeros) on its own.  The entry's
 * second word is the bitmap: bits 0-31 allocated, bits 32-63 zero. */
#include <stdlib.h>

#include "internal.h"

#define ALL_UNITS EXTL2_ALLOC_MASK

enum unit_state { U_ALLOC, U_ZERO, U_UNALLOC };

static enum unit_state
unit_state (const struct cmap *m, unsigned u)
{
  if (m->bitmap & (1ULL << u))
    return U_ALLOC;
  if (m->bitmap & (1ULL << (u + 32)))
    return U_ZERO;
  return U_UNALLOC;
}

/* Bitmask of units [u0, u1]. */
static uint64_t
unit_mask (unsigned u0, unsigned u1)
{
  return ((u1 == 31 ? 0 : 1ULL << (u1 + 1)) - 1) & ~((1ULL << u0) - 1) & ALL_UNITS;
}

/* Read [offset, offset+len) inside one cluster described by M. */
int
sc_read (struct qcow *q, uint8_t *p, uint64_t len, uint64_t offset,
         const struct cmap *m)
{
  const uint64_t cs = q->cluster_size, us = 1ULL << q->sc_bits;
  uint64_t in = offset & (cs - 1);
  int r = 0;
  while (len > 0 && r == 0) {
    unsigned u = in >> q->sc_bits;
    enum unit_state st = unit_state (m, u);
    uint64_t n = us - (in & (us - 1));
    while (n < len && (in + n) < cs && unit_state (m, (in + n) >> q->sc_bits) == st)
      n += us;
    if (n > len)
      n = len;
    if (st == U_ALLOC)
      r = io_data_pread (q, p, n, m->host + in);
    else if (st == U_UNALLOC && q->backing_path)
      r = backing_read (q, p, n, offset);
    else
      memset (p, 0, n);
    p += n; in += n; offset += n; len -= n;
  }
  return r;
}

/* Block status of the unit at OFFSET and the run of units like it. */
void
sc_map (struct qcow *q, const struct cmap *m, uint64_t offset, uint64_t max,
        uint64_t *len, unsigned *flags, bool *show_backing)
{
  const uint64_t cs = q->cluster_size, us = 1ULL << q->sc_bits;
  uint64_t in = offset & (cs - 1);
  enum unit_state st = unit_state (m, in >> q->sc_bits);
  uint64_t n = us - (in & (us - 1));
  while (n < max && in + n < cs && unit_state (m, (in + n) >> q->sc_bits) == st)
    n += us;
  *len = n < max ? n : max;
  *flags = st == U_ALLOC ? 0 : QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
  *show_backing = st == U_UNALLOC && q->backing_path;
}

/* Does the unit at OFFSET already read as zeros? */
bool
sc_reads_zero (struct qcow *q, const struct cmap *m, uint64_t offset)
{
  enum unit_state st = unit_state (m, (offset & (q->cluster_size - 1)) >> q->sc_bits);
  return st == U_ZERO || (st == U_UNALLOC && !q->backing_path);
}

/* The base content of unit U for a partial write: what it reads now. */
static int
unit_base (struct qcow *q, const struct cmap *m, uint64_t gc, unsigned u, uint8_t *buf)
{
  const uint64_t us = 1ULL << q->sc_bits;
  switch (unit_state (m, u)) {
  case U_ALLOC:
    return io_data_pread (q, buf, us, m->host + u * us);
  case U_UNALLOC:
    if (q->backing_path)
      return backing_read (q, buf, us, (gc << q->cluster_bits) + u * us);
    /* fallthrough */
  default:
    memset (buf, 0, us);
    return 0;
  }
}

/* Write [offset, offset+len) inside one cluster described by M (kind
 * C_SUBCL).  Called with q->lock held; returns with it held. */
int
sc_write (struct qcow *q, const uint8_t *p, uint64_t len, uint64_t offset,
          struct cmap *m)
{
  const uint64_t cs = q->cluster_size, us = 1ULL << q->sc_bits;
  uint64_t gc = offset >> q->cluster_bits, in = offset & (cs - 1);
  unsigned u0 = in >> q->sc_bits, u1 = (in + len - 1) >> q->sc_bits;
  uint64_t mask = unit_mask (u0, u1), old = m->host;
  int r;

  if (old && !m->copied) {
    uint64_t rc;
    if ((r = rc_get (q, old >> q->cluster_bits, &rc)) < 0)
      return r;
    if (rc == 1) {
      if ((r = l2_set (q, gc, old | ENTRY_COPIED)) < 0)
        return r;
      m->copied = true;
    }
  }
  if (old && m->copied && (m->bitmap & mask) == mask) {
    /* Every unit is allocated and ours: in place. */
    pthread_mutex_unlock (&q->lock);
    r = io_data_pwrite (q, p, len, old + in);
    pthread_mutex_lock (&q->lock);
    return r;
  }

  struct centry *e;
  if ((r = l2_get_slice (q, gc, true, &e)) < 0)
    return r;
  bool cow = old && !m->copied, fresh;
  uint64_t host = old, c, got;
  if (!old || cow) {
    if ((r = rc_alloc (q, 1, &c, &got, &fresh)) < 0)
      return r;
    host = c << q->cluster_bits;
  }
  struct inflight f = { .first = gc, .count = 1, .next = q->inflight };
  q->inflight = &f;
  pthread_mutex_unlock (&q->lock);

  /* The bytes written, and around them the rest of any partial unit that
   * is not yet allocated, filled from what it reads now (zeros or the
   * backing file).  Allocated units are never read and rewritten here: an
   * in-place writer that looked them up before this cluster was marked in
   * flight may still be writing into them.  For copy-on-write (a shared
   * cluster, which nobody writes in place) the whole old cluster comes
   * along. */
  bool head = (in & (us - 1)) && unit_state (m, u0) != U_ALLOC;
  bool tail = ((in + len) & (us - 1)) && unit_state (m, u1) != U_ALLOC;
  uint64_t start = cow ? 0 : head ? u0 * us : in;
  uint64_t end = cow ? cs : tail ? (u1 + 1) * us : in + len;
  uint8_t *buf = malloc (end - start);
  r = buf ? 0 : -ENOMEM;
  if (r == 0 && cow)
    r = io_data_pread (q, buf, cs, old);
  if (r == 0 && head)
    r = unit_base (q, m, gc, u0, buf + u0 * us - start);
  if (r == 0 && tail && (u1 != u0 || !head))
    r = unit_base (q, m, gc, u1, buf + u1 * us - start);
  if (r == 0) {
    memcpy (buf + in - start, p, len);
    r = io_data_pwrite (q, buf, end - start, host + start);
  }
  free (buf);

  pthread_mutex_lock (&q->lock);
  if (r == 0) {
    uint64_t alloc = (m->bitmap & ALL_UNITS) | mask;
    uint64_t zero = (m->bitmap >> 32) & ~mask;
    r = l2_set_with_bitmap (q, gc, host | ENTRY_COPIED, alloc | (zero << 32));
    if (r == 0 && cow)
      rc_defer_free (q, old >> q->cluster_bits);
  }
  else if (host != old)
    rc_free (q, host >> q->cluster_bits, 1);
  inflight_remove (q, &f);
  return r;
}

/* Make the whole units MASK of cluster GC read as zeros (zero) or drop
 * them (trim).  With q->lock held.  *MUST_WRITE: the caller has to write
 * zeros instead (a compressed cluster only partly covered). */
int
sc_clear (struct qcow *q, uint64_t gc, uint64_t mask, bool trim, bool unlink,
          bool *must_write)
{
  struct cmap m;
  bool backing = q->backing_path != NULL;
  int r = l2_lookup (q, gc, &m);
  *must_write = false;
  if (r < 0)
    return r;
  if (m.kind == C_COMPRESSED) {
    if (mask != ALL_UNITS) {
      *must_write = !trim;
      return 0;
    }
    if ((r = l2_set_with_bitmap (q, gc, 0, backing ? ALL_UNITS << 32 : 0)) < 0)
      return r;
    compressed_defer_free (q, m.host);
    return 0;
  }
  uint64_t alloc = m.bitmap & ALL_UNITS, zero = m.bitmap >> 32;
  if (mask == ALL_UNITS && m.host && (unlink || trim)) {
    /* The whole cluster goes. */
    if ((r = l2_set_with_bitmap (q, gc, 0, backing || !trim ? ALL_UNITS << 32 : 0)) < 0)
      return r;
    rc_defer_free (q, m.host >> q->cluster_bits);
    return 0;
  }
  if (trim) {
    alloc &= ~mask;
    if (backing)
      zero |= mask;             /* never expose the backing file */
  }
  else {
    alloc &= ~mask;
    zero |= mask;
  }
  uint64_t bitmap = alloc | (zero << 32);
  if (bitmap == m.bitmap)
    return 0;
  return l2_set_with_bitmap (q, gc, m.host ? m.host | (m.copied ? ENTRY_COPIED : 0) : 0, bitmap);
}

uint64_t
sc_units (struct qcow *q, uint64_t gc, uint64_t from, uint64_t to)
{
  /* Whole units of cluster GC inside [from, to). */
  uint64_t cstart = gc << q->cluster_bits, us = 1ULL << q->sc_bits;
  uint64_t a = from > cstart ? from - cstart : 0;
  uint64_t b = to - cstart < q->cluster_size ? to - cstart : q->cluster_size;
  a = div_round_up (a, us);
  b = b / us;
  return b > a ? unit_mask (a, b - 1) : 0;
}

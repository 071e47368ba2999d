/* SPDX-License-Identifier: BSD-3-Clause */
/* discard.c - giving space back: discard (trim) and write-zeroes.
 *
 * Whole clusters are changed in their L2 entries only (zero flag, or
 * unlinked), a whole L2 table at a time, under q->lock; partial clusters
 * are written (zeroes) or left alone (trim).  The old host clusters are
 * not freed here: rc_defer_free queues them, and the next flush frees
 * them once the unlinking is durable (crash-safety rule 3), after which
 * the background thread punches them out of the file.  A raw external
 * data file (data_file_raw) must read as the image does: there a whole
 * cluster zeroed gets zeros written, and one trimmed is punched, before
 * its entry changes (as QEMU does; its place is fixed, never reused, and
 * a failure or a crash before the entry changed leaves the image and
 * the data file reading the same).  Neither syncs
 * on its own (only with QCOW_FUA). */
#include <stdlib.h>

#include "internal.h"

enum clear_mode {
  CLEAR_UNLINK,      /* unallocated (reads as zeros: there is no backing) */
  CLEAR_ZERO_KEEP,   /* reads as zeros, host cluster kept (v3 zero flag) */
};

/* Set GC's L2 entry, in its table E when the caller has it in hand (and
 * unshared), else through l2_set (which copies a shared table). */
static int
set_entry (struct qcow *q, struct centry *e, uint64_t gc, uint64_t ent)
{
  if (!e)
    return l2_set (q, gc, ent);
  l2_set_in (q, e, gc, ent);
  return 0;
}

/* Make whole guest cluster GC, mapped as M, read as zeros (zero), or give
 * up its data (trim).  With q->lock held; E as for set_entry.  Sets
 * *WRITE_HOST when the caller must zero the host cluster M->host (which
 * may be 0: guest cluster 0 of an external data file): write zeros in
 * place (v2 has no zero flag; then nothing was changed), or, with a raw
 * data file, make the data file read zeros as the image now does (zero:
 * write them; trim: punch).  With a backing file (v3 only, see
 * qcow_zero/qcow_discard) unlinking would expose the backing data, so the
 * zero flag is used instead. */
static int
clear_mapped (struct qcow *q, uint64_t gc, const struct cmap *m,
              struct centry *e, bool trim, enum clear_mode mode,
              bool *write_host)
{
  bool backing = q->backing_path != NULL;
  int r;
  *write_host = false;
  switch (m->kind) {
  case C_SUBCL:                 /* handled by sc_clear */
  case C_ZERO:
    return 0;                   /* already reads as zeros */
  case C_UNALLOC:
    if (!backing || trim)
      return 0;                 /* zeros, or (trim) what it showed before */
    return set_entry (q, e, gc, ENTRY_ZERO);
  case C_ZERO_ALLOC:
    if (mode == CLEAR_ZERO_KEEP && m->copied)
      return 0;
    break;
  case C_DATA:
    if (q->data_raw && !trim)
      mode = CLEAR_ZERO_KEEP;   /* the raw data file must read zeros too */
    if (mode == CLEAR_ZERO_KEEP && m->copied) {
      if (q->data_raw || q->h.version < 3)
        *write_host = true;
      if (q->h.version >= 3)
        return set_entry (q, e, gc, m->host | ENTRY_ZERO | ENTRY_COPIED);
      return 0;
    }
    *write_host = q->data_raw;  /* trim: punched by the caller */
    break;
  case C_COMPRESSED:
    break;
  }
  /* Unlink (zero flag over a backing file, or when the cluster must read
   * as zeros on v3 and cannot be kept), and drop the reference once the
   * unlink is durable. */
  uint64_t ent = backing || (mode == CLEAR_ZERO_KEEP && q->h.version >= 3) ? ENTRY_ZERO : 0;
  if ((r = set_entry (q, e, gc, ent)) < 0)
    return r;
  if (m->kind == C_COMPRESSED)
    compressed_defer_free (q, m->host);
  else if (q->data_path) {
    if (!*write_host)           /* (a raw one: punched by the caller) */
      rc_defer_free (q, (m->host >> q->cluster_bits) | DEFER_DATA_FILE);
  }
  else
    rc_defer_free (q, m->host >> q->cluster_bits);
  return 0;
}

static int
clear_cluster (struct qcow *q, uint64_t gc, bool trim, enum clear_mode mode,
               struct cmap *m, bool *write_host)
{
  int r = l2_lookup (q, gc, m);
  *write_host = false;
  return r < 0 ? r : clear_mapped (q, gc, m, NULL, trim, mode, write_host);
}

/* clear_cluster for the clusters [gc, gend) of one L2 table, as far as
 * the end of GC's slice, looked up once (a whole-disk zero touches every
 * entry): when the table is
 * allocated and unshared, no allocation is in flight and there is no
 * external data file.  Returns the first cluster not handled, left to
 * clear_cluster (one that needs zeros written, or all of them when the
 * table does not qualify). */
static uint64_t
clear_table (struct qcow *q, uint64_t gc, uint64_t gend, bool trim,
             enum clear_mode mode, uint64_t *nclusters, int *r)
{
  const uint64_t idx = gc >> q->l2_bits;
  const uint64_t send = ((gc >> q->sl_bits) + 1) << q->sl_bits;
  struct centry *e;
  *r = 0;
  if (q->data_path || q->inflight || !(q->l1[idx] & ENTRY_COPIED) ||
      l2_get_slice (q, gc, false, &e) < 0 || !e)
    return gc;
  if (gend > send)
    gend = send;                /* the rest in the next slice */
  for (; gc < gend; gc++) {
    struct cmap m;
    bool write;
    if ((*r = l2_decode (q, gc, e, &m)) < 0 ||
        (*r = clear_mapped (q, gc, &m, e, trim, mode, &write)) < 0 || write)
      break;
    (*nclusters)++;
  }
  return gc;
}

/* Make host cluster HOST of the data file read zeros, with q->lock held
 * (dropped meanwhile): for a trim a punched hole (a file), else, or if it
 * cannot be punched, zeros written.  FAST (a fast zero): -ENOTSUP. */
static int
zero_host (struct qcow *q, uint64_t host, bool trim, bool fast)
{
  if (fast)
    return -ENOTSUP;
  pthread_mutex_unlock (&q->lock);
  int r = 0;
  if (!trim || io_punch (q, true, host, q->cluster_size) < 0)
    r = io_data_pwrite (q, q->zero_cluster, q->cluster_size, host);
  pthread_mutex_lock (&q->lock);
  return r;
}

/* Apply MODE to the whole clusters inside [offset, offset+count); return
 * in *HEAD / *TAIL the partial edges left over. */
static int
clear_range (struct qcow *q, uint64_t count, uint64_t offset, bool trim,
             enum clear_mode mode, bool fast, uint64_t *nclusters)
{
  const uint64_t cs = q->cluster_size;
  uint64_t first = div_round_up (offset, cs), end = (offset + count) / cs;
  int r = 0;
  /* A last cluster the virtual size cuts short counts as whole when the
   * range reaches the end (a trim, as QEMU discards it). */
  if (trim && offset + count == q->h.size && q->h.size % cs && first <= end)
    end++;
  *nclusters = 0;
  pthread_mutex_lock (&q->lock);
  r = begin_modify (q);
  if (count > 0)                /* (v2 writes zeros in place) */
    note_write (q, offset / cs, (offset + count - 1) / cs);
  if (q->extl2) {
    /* Subcluster granularity: every cluster the range touches. */
    uint64_t last = div_round_up (offset + count, cs);
    for (uint64_t gc = offset / cs; r == 0 && gc < last; gc++) {
      uint64_t mask = sc_units (q, gc, offset, offset + count);
      if (!mask)
        continue;
      if (inflight_find (q, gc)) {
        pthread_cond_wait (&q->alloc_cond, &q->lock);
        gc--;
        continue;
      }
      bool must_write;
      r = sc_clear (q, gc, mask, trim, mode == CLEAR_UNLINK, &must_write);
      if (r == 0 && must_write)
        r = -EAGAIN;            /* caller writes the zeros */
      if (r == 0)
        (*nclusters)++;
    }
    pthread_mutex_unlock (&q->lock);
    return r;
  }
  for (uint64_t gc = first; r == 0 && gc < end; gc++) {
    uint64_t tend = ((gc >> q->l2_bits) + 1) << q->l2_bits;
    uint64_t next = clear_table (q, gc, tend < end ? tend : end, trim, mode, nclusters, &r);
    if (r < 0)
      break;
    if (next > gc) {
      gc = next - 1;
      continue;
    }
    if (inflight_find (q, gc)) {          /* wait for the allocation */
      pthread_cond_wait (&q->alloc_cond, &q->lock);
      gc--;
      continue;
    }
    struct cmap m;
    bool write_host;
    uint64_t zeroed = UINT64_MAX;   /* host cluster already zeroed */
    if (q->data_raw) {
      /* As QEMU does, the raw data file reads zeros before the entry
       * says so: a failure or a crash in between leaves the two
       * agreeing. */
      if ((r = l2_lookup (q, gc, &m)) < 0)
        break;
      if (m.kind == C_DATA) {
        if ((r = zero_host (q, m.host, trim, fast)) < 0)
          break;
        zeroed = m.host;
      }
    }
    r = clear_cluster (q, gc, trim, mode, &m, &write_host);
    if (r == 0 && write_host && m.host != zeroed)
      r = zero_host (q, m.host, trim, fast);
    if (r == 0)
      (*nclusters)++;
  }
  pthread_mutex_unlock (&q->lock);
  return r;
}

int
qcow_discard (struct qcow *q, uint64_t count, uint64_t offset, unsigned flags)
{
  int r = check_write_range (q, count, offset);
  if (r < 0 || !q->cfg.discard)
    return r;
  if (q->backing_path && q->h.version < 3)
    return 0;     /* no zero flag: unlinking would expose the backing file */
  uint64_t n;
  io_lock_shared (q);
  r = clear_range (q, count, offset, true, CLEAR_UNLINK, false, &n);
  io_unlock_shared (q);
  __atomic_add_fetch (&q->stats.discarded, n, __ATOMIC_RELAXED);
  if (r == 0 && (flags & QCOW_FUA))
    r = flush_all (q);
  return r == -ENOTSUP ? -EIO : r;
}

/* Would zeroing [offset, offset+count) have to write data (v2 has no zero
 * flag; part of a compressed cluster with subclusters)?  Asked before
 * anything changes, for NBD_CMD_FLAG_FAST_ZERO. */
static int
zero_needs_writes (struct qcow *q, uint64_t count, uint64_t offset,
                   enum clear_mode mode, bool *yes)
{
  const uint64_t cs = q->cluster_size;
  int r = 0;
  *yes = (q->backing_path && q->h.version < 3) || (q->data_raw && mode == CLEAR_ZERO_KEEP);
  pthread_mutex_lock (&q->lock);
  for (uint64_t gc = offset / cs; !*yes && r == 0 && gc < div_round_up (offset + count, cs); gc++) {
    struct cmap m;
    if ((r = l2_lookup (q, gc, &m)) < 0)
      break;
    bool whole = gc * cs >= offset && (gc + 1) * cs <= offset + count;
    if (q->extl2)
      *yes = m.kind == C_COMPRESSED && sc_units (q, gc, offset, offset + count) != EXTL2_ALLOC_MASK;
    else if (whole)
      *yes = mode == CLEAR_ZERO_KEEP && q->h.version < 3 && m.kind == C_DATA;
    else                        /* a partial edge is a byte write */
      *yes = m.kind == C_DATA || m.kind == C_COMPRESSED ||
             (m.kind == C_UNALLOC && q->backing_path);
  }
  /* Subcluster edges. */
  const uint64_t us = 1ULL << q->sc_bits;
  for (int edge = 0; q->extl2 && !*yes && r == 0 && edge < 2; edge++) {
    uint64_t at = edge ? offset + count - 1 : offset;
    if ((edge ? (offset + count) : offset) % us == 0)
      continue;
    struct cmap m;
    if ((r = l2_lookup (q, at / cs, &m)) == 0)
      *yes = m.kind == C_COMPRESSED || !sc_reads_zero (q, &m, at);
  }
  pthread_mutex_unlock (&q->lock);
  return r;
}

/* Write zeros over [offset, offset+count) inside one cluster, unless it
 * already reads as zeros. */
static int
zero_partial (struct qcow *q, uint64_t count, uint64_t offset)
{
  struct cmap m;
  pthread_mutex_lock (&q->lock);
  int r = l2_lookup (q, offset >> q->cluster_bits, &m);
  bool in_flight = inflight_find (q, offset >> q->cluster_bits) != NULL;
  pthread_mutex_unlock (&q->lock);
  if (r < 0)
    return r;
  if (!in_flight && ((m.kind == C_UNALLOC && !q->backing_path) ||
                     m.kind == C_ZERO || m.kind == C_ZERO_ALLOC ||
                     (m.kind == C_SUBCL && sc_reads_zero (q, &m, offset))))
    return 0;
  return qcow_write (q, q->zero_cluster, count, offset, 0);
}

int
qcow_zero (struct qcow *q, uint64_t count, uint64_t offset, unsigned flags)
{
  int r = check_write_range (q, count, offset);
  if (r < 0)
    return r;
  const uint64_t cs = q->cluster_size, us = 1ULL << q->sc_bits;
  enum clear_mode mode = (flags & QCOW_MAY_TRIM) && q->cfg.discard
    ? CLEAR_UNLINK : CLEAR_ZERO_KEEP;
  if (flags & QCOW_FAST_ZERO) {
    bool slow;
    if ((r = zero_needs_writes (q, count, offset, mode, &slow)) < 0)
      return r;
    if (slow)
      return -ENOTSUP;
  }
  if (q->backing_path && q->h.version < 3) {
    /* No zero flag, and unlinking would expose the backing file: the
     * zeros have to be written. */
    if (flags & QCOW_FAST_ZERO)
      return -ENOTSUP;
  write_zeros:
    while (r == 0 && count > 0) {
      uint64_t n = count < cs ? count : cs;
      r = qcow_write (q, q->zero_cluster, n, offset, 0);
      offset += n;
      count -= n;
    }
    if (r == 0 && (flags & QCOW_FUA))
      r = flush_all (q);
    return r;
  }
  /* Edges smaller than a unit (cluster, or subcluster) get byte writes. */
  uint64_t head_end = (offset + us - 1) & ~(us - 1), tail_start = (offset + count) & ~(us - 1);
  if (head_end > offset + count)
    head_end = offset + count;
  if (tail_start < head_end)
    tail_start = head_end;
  /* Partial edges first: a byte write each. */
  if (head_end > offset && (r = zero_partial (q, head_end - offset, offset)) < 0)
    return r;
  if (offset + count > tail_start &&
      (r = zero_partial (q, offset + count - tail_start, tail_start)) < 0)
    return r;
  uint64_t n;
  io_lock_shared (q);
  r = clear_range (q, count, offset, false, mode, flags & QCOW_FAST_ZERO, &n);
  io_unlock_shared (q);
  __atomic_add_fetch (&q->stats.erased, n, __ATOMIC_RELAXED);
  if (r == -EAGAIN) {           /* part of a compressed cluster: write */
    if (flags & QCOW_FAST_ZERO)
      return -ENOTSUP;
    r = 0;
    goto write_zeros;
  }
  if (r == 0 && (flags & QCOW_FUA))
    r = flush_all (q);
  return r == -ENOTSUP && !(flags & QCOW_FAST_ZERO) ? -EIO : r;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* rw.c - the read and write path.
 *
 * A request looks up its clusters, copies the mapping and does the data
 * I/O with no lock but io_lock held; the lookup is lock-free when the L2
 * table is cached and the entry is plain data, zero or unallocated (see
 * l2_fast_lookup and cache.c), and under q->lock otherwise.  It holds
 * io_lock shared throughout,
 * so nothing it looked up can be freed and reused under it (freeing takes
 * io_lock exclusively).  Writes to clusters already allocated and not
 * shared are a lookup plus a pwrite.  An allocating write reserves host
 * clusters under the lock, records the guest clusters as in flight (a
 * second writer of the same cluster waits on alloc_cond), writes the data
 * and the rest of each new cluster outside the lock, then links the L2
 * entries.  The old cluster of a copy on write is freed once the new link
 * is durable (rc_defer_free). */
#include <stdlib.h>

#include "internal.h"

/* The same, for a request that changes the image. */
int
check_write_range (struct qcow *q, size_t count, uint64_t offset)
{
  int r = check_range (q, count, offset);
  if (r == 0 && q->read_only) {
    ERR (q, "image is open read-only");
    r = -EROFS;
  }
  return r;
}

int
check_range (struct qcow *q, size_t count, uint64_t offset)
{
  if (offset > q->h.size || count > q->h.size - offset) {
    ERR (q, "request [%" PRIu64 ", +%zu) is beyond the virtual size %" PRIu64,
         offset, count, q->h.size);
    return -EINVAL;
  }
  return 0;
}

/* Clusters that read alike: zeros, the backing file, data, compressed. */
enum rclass { R_ZERO, R_BACKING, R_DATA, R_COMPRESSED, R_SUBCL };
static enum rclass
read_class (struct qcow *q, enum ckind k)
{
  switch (k) {
  case C_UNALLOC: return q->backing_path ? R_BACKING : R_ZERO;
  case C_DATA: return R_DATA;
  case C_COMPRESSED: return R_COMPRESSED;
  case C_SUBCL: return R_SUBCL;
  default: return R_ZERO;
  }
}

/* ---- per-thread stat shards ---- */
static __thread unsigned shard_plus_one
  __attribute__ ((tls_model ("initial-exec")));   /* 0: not assigned yet */
static unsigned next_shard;

unsigned
stat_shard_index (void)
{
  if (__builtin_expect (shard_plus_one == 0, 0))
    shard_plus_one = __atomic_fetch_add (&next_shard, 1, __ATOMIC_RELAXED) % STAT_SHARDS + 1;
  return shard_plus_one - 1;
}

void
stats_sum (struct qcow *q, struct qcow_stats *st)
{
  uint64_t v[STAT_NR] = { 0 };
  for (unsigned i = 0; i < STAT_SHARDS; i++)
    for (unsigned k = 0; k < STAT_NR; k++)
      v[k] += __atomic_load_n (&q->shard[i].v[k], __ATOMIC_RELAXED);
  st->reads += v[STAT_READS];
  st->writes += v[STAT_WRITES];
}

/* ---- read ---- */

/* Does guest cluster M2, which starts AT bytes past the start of M's
 * cluster, read the same way as M, continuing it? */
static bool
continues (struct qcow *q, const struct cmap *m, const struct cmap *m2, uint64_t at)
{
  enum rclass c = read_class (q, m->kind);
  return c == read_class (q, m2->kind) &&
    (c == R_ZERO || c == R_BACKING ||
     (c == R_DATA && m2->host == m->host + (at & ~(q->cluster_size - 1))));
}

/* The fast path (no q->lock; see l2_fast_lookup) for an image whose
 * entries it understands. */
static bool
fast_path_ok (struct qcow *q)
{
  return !q->extl2 && !q->data_path;
}

int
qcow_read (struct qcow *q, void *buf, size_t count, uint64_t offset)
{
  int r = check_range (q, count, offset);
  if (r < 0)
    return r;
  stat_add (q, STAT_READS, 1);
  uint8_t *p = buf;
  const uint64_t cs = q->cluster_size;
  const bool fast = fast_path_ok (q);
  io_lock_shared (q);
  while (count > 0) {
    uint64_t gc = offset >> q->cluster_bits, in = offset & (cs - 1);
    uint64_t len = cs - in < count ? cs - in : count;
    struct cmap m, m2;
    if (fast && l2_fast_lookup (q, gc, &m)) {
      /* Extend over clusters that read alike (contiguous for data). */
      while (len < count &&
             l2_fast_lookup (q, gc + div_round_up (in + len, cs), &m2) &&
             continues (q, &m, &m2, in + len))
        len += cs < count - len ? cs : count - len;
    }
    else {
      pthread_mutex_lock (&q->lock);
      r = l2_lookup (q, gc, &m);
      while (r == 0 && len < count) {
        r = l2_lookup (q, gc + div_round_up (in + len, cs), &m2);
        if (r < 0 || !continues (q, &m, &m2, in + len))
          break;
        len += cs < count - len ? cs : count - len;
      }
      pthread_mutex_unlock (&q->lock);
      if (r < 0)
        break;
    }
    if (m.kind == C_DATA)
      r = io_data_pread (q, p, len, m.host + in);
    else if (m.kind == C_SUBCL)
      r = sc_read (q, p, len, offset, &m);
    else if (m.kind == C_COMPRESSED && len == cs)
      r = compressed_read (q, m.host, p);   /* straight into the buffer */
    else if (m.kind == C_COMPRESSED) {
      uint8_t *c = malloc (cs);
      r = c ? compressed_read (q, m.host, c) : -ENOMEM;
      if (r == 0)
        memcpy (p, c + in, len);
      free (c);
    }
    else if (read_class (q, m.kind) == R_BACKING)
      r = backing_read (q, p, len, offset);
    else
      memset (p, 0, len);
    if (r < 0)
      break;
    p += len; offset += len; count -= len;
  }
  io_unlock_shared (q);
  return r == -ENOTSUP ? -EIO : r;
}

/* ---- write ---- */
struct inflight *
inflight_find (struct qcow *q, uint64_t gc)
{
  for (struct inflight *f = q->inflight; f; f = f->next)
    if (gc >= f->first && gc < f->first + f->count)
      return f;
  return NULL;
}

void
inflight_remove (struct qcow *q, struct inflight *f)
{
  for (struct inflight **pp = &q->inflight; *pp; pp = &(*pp)->next)
    if (*pp == f) {
      *pp = f->next;
      break;
    }
  pthread_cond_broadcast (&q->alloc_cond);
}

/* Write into clusters that need allocation, starting at guest cluster GC.
 * Called with q->lock held; returns with it held.  *DONE gets the bytes
 * written. */
static int
write_alloc (struct qcow *q, const uint8_t *p, uint64_t count, uint64_t offset,
             const struct cmap *m, uint64_t *done)
{
  const uint64_t cs = q->cluster_size;
  uint64_t gc = offset >> q->cluster_bits, in = offset & (cs - 1);
  uint64_t host, n = 1, first;
  bool fresh = false, reuse = m->kind == C_ZERO_ALLOC && m->copied;
  /* Where the rest of the new cluster comes from. */
  bool from_backing = m->kind == C_UNALLOC && q->backing_path;
  bool whole_base = m->kind == C_COMPRESSED || m->kind == C_DATA;   /* COW */
  int r;

  /* The L2 table must exist (and not be shared) before the data is
   * written. */
  struct centry *e;
  if ((r = l2_get_slice (q, gc, true, &e)) < 0)
    return r;
  if (reuse)
    host = m->host;
  else {
    if (m->kind == C_UNALLOC || m->kind == C_ZERO) {
      /* Following clusters of the same kind (same L2 table) join in. */
      uint64_t want = div_round_up (in + count, cs);
      uint64_t table_left = (1ULL << q->l2_bits) - (gc & ((1ULL << q->l2_bits) - 1));
      if (want > table_left) want = table_left;
      while (n < want) {
        struct cmap m2;
        if ((r = l2_lookup (q, gc + n, &m2)) < 0)
          return r;
        if (m2.kind != m->kind || inflight_find (q, gc + n))
          break;
        n++;
      }
    }
    if (q->data_path) {                     /* fixed place, not counted; */
      first = gc;                           /* it may hold trimmed data */
      fresh = false;
    }
    else if ((r = rc_alloc (q, n, &first, &n, &fresh)) < 0)
      return r;
    host = first << q->cluster_bits;
  }
  struct inflight f = { .first = gc, .count = n, .next = q->inflight };
  q->inflight = &f;
  pthread_mutex_unlock (&q->lock);

  uint64_t len = n * cs - in < count ? n * cs - in : count;
  uint64_t tail = n * cs - in - len;
  if (whole_base) {
    /* Copy on write: old content (decompressed or shared), merged. */
    uint8_t *c = malloc (cs);
    if (!c)
      r = -ENOMEM;
    else if (m->kind == C_COMPRESSED)
      r = compressed_read (q, m->host, c);
    else
      r = io_data_pread (q, c, cs, m->host);
    if (r == 0) {
      memcpy (c + in, p, len);
      r = io_data_pwrite (q, c, cs, host);
    }
    free (c);
  }
  else if (fresh && !from_backing)
    r = io_data_pwrite (q, p, len, host + in);   /* the rest already reads zero */
  else {
    uint8_t *head_buf = q->zero_cluster, *tail_buf = q->zero_cluster;
    if (from_backing) {
      head_buf = in ? malloc (in) : NULL;
      tail_buf = tail ? malloc (tail) : NULL;
      if ((in && !head_buf) || (tail && !tail_buf))
        r = -ENOMEM;
      if (r == 0 && in)
        r = backing_read (q, head_buf, in, gc * cs);
      if (r == 0 && tail)
        r = backing_read (q, tail_buf, tail, offset + len);
    }
    if (r == 0) {
      struct iovec iov[3];
      int k = 0;
      if (in) iov[k++] = (struct iovec) { head_buf, in };
      iov[k++] = (struct iovec) { (void *) p, len };
      if (tail) iov[k++] = (struct iovec) { tail_buf, tail };
      r = io_data_pwritev (q, iov, k, host);
    }
    if (from_backing) {
      free (head_buf);
      free (tail_buf);
    }
  }

  pthread_mutex_lock (&q->lock);
  if (r == 0) {
    for (uint64_t i = 0; i < n && r == 0; i++)
      r = l2_set_with_bitmap (q, gc + i, (host + i * cs) | ENTRY_COPIED, EXTL2_ALLOC_MASK);
    /* Our old reference goes once the new link is durable. */
    if (r == 0 && m->kind == C_COMPRESSED)
      compressed_defer_free (q, m->host);
    else if (r == 0 && !q->data_path &&
             (m->kind == C_DATA || (m->kind == C_ZERO_ALLOC && !reuse)))
      rc_defer_free (q, m->host >> q->cluster_bits);
  }
  else if (!reuse && !q->data_path)
    rc_free (q, host >> q->cluster_bits, n);   /* never referenced */
  inflight_remove (q, &f);
  *done = len;
  return r;
}

/* A write needs a new cluster, none is known to be free below the end
 * of the file (or of fixed-size storage), and the background thread is
 * punching the holes of freed clusters, or has some queued: rather than
 * grow the file (or fail with ENOSPC), wait (q->lock dropped) until it
 * gives back its current part of them.  Not while it compacts: it wants
 * io_lock exclusively, which this request holds shared.  True if it
 * waited. */
static bool
wait_for_punching (struct qcow *q)
{
  bool queued = q->punch_head && !q->bg_compacting;
  uint64_t end = q->fixed_size ? q->file_size >> q->cluster_bits : q->frontier;
  if (!(q->punch_busy || queued) || q->free_hint < end ||
      pthread_equal (pthread_self (), q->bg_thread))
    return false;
  uint64_t gen = q->punch_gen;
  while ((q->punch_busy || (q->punch_head && !q->bg_compacting)) &&
         q->punch_gen == gen)
    pthread_cond_wait (&q->punch_cond, &q->lock);
  return true;
}

/* The overwrite fast path: while the clusters at OFFSET are allocated,
 * unshared (COPIED) and cached, a lookup without q->lock and a pwrite.
 * With io_lock held shared, after begin_modify and outside compaction
 * (whose in-flight marks are added with io_lock exclusive, so none
 * appears meanwhile; an allocation in flight is never of a cluster that
 * is already allocated and unshared).  Advances *P, *OFFSET and *COUNT
 * over what it wrote. */
static int
write_fast (struct qcow *q, const uint8_t **p, uint64_t *offset, size_t *count)
{
  const uint64_t cs = q->cluster_size;
  while (*count > 0) {
    uint64_t gc = *offset >> q->cluster_bits, in = *offset & (cs - 1);
    uint64_t len = cs - in < *count ? cs - in : *count;
    struct cmap m, m2;
    if (!l2_fast_lookup (q, gc, &m) || m.kind != C_DATA || !m.copied)
      return 0;
    while (len < *count &&
           l2_fast_lookup (q, gc + div_round_up (in + len, cs), &m2) &&
           m2.copied && continues (q, &m, &m2, in + len))
      len += cs < *count - len ? cs : *count - len;
    int r = io_data_pwrite (q, *p, len, m.host + in);
    if (r < 0)
      return r;
    *p += len; *offset += len; *count -= len;
  }
  return 0;
}

int
qcow_write (struct qcow *q, const void *buf, size_t count, uint64_t offset,
            unsigned flags)
{
  int r = check_write_range (q, count, offset);
  if (r < 0)
    return r;
  stat_add (q, STAT_WRITES, 1);
  const uint8_t *p = buf;
  const uint64_t cs = q->cluster_size;
  io_lock_shared (q);
  if (fast_path_ok (q) && __atomic_load_n (&q->modified, __ATOMIC_ACQUIRE) &&
      !__atomic_load_n (&q->compacting, __ATOMIC_RELAXED))
    r = write_fast (q, &p, &offset, &count);
  if (r < 0 || count == 0)
    goto out;
  pthread_mutex_lock (&q->lock);
  r = begin_modify (q);
  note_write (q, offset >> q->cluster_bits, (offset + count - 1) >> q->cluster_bits);
  while (r == 0 && count > 0) {
    uint64_t gc = offset >> q->cluster_bits, in = offset & (cs - 1);
    uint64_t len = cs - in < count ? cs - in : count;
    struct cmap m, m2;
    if ((r = l2_lookup (q, gc, &m)) < 0)
      break;
    if (inflight_find (q, gc)) {
      /* Being allocated or moved: look again once that is done. */
      pthread_cond_wait (&q->alloc_cond, &q->lock);
      continue;
    }
    if (m.kind == C_DATA && !m.copied) {
      uint64_t rc;
      if ((r = rc_get (q, m.host >> q->cluster_bits, &rc)) < 0)
        break;
      if (rc == 1) {            /* not shared after all: mark it so */
        if ((r = l2_set (q, gc, m.host | ENTRY_COPIED)) < 0)
          break;
        m.copied = true;
      }
    }
    if (m.kind == C_SUBCL)
      r = sc_write (q, p, len, offset, &m);
    else if (m.kind == C_DATA && m.copied) {
      /* In place: extend over contiguous allocated clusters. */
      while (len < count) {
        if ((r = l2_lookup (q, gc + div_round_up (in + len, cs), &m2)) < 0)
          break;
        if (m2.kind != C_DATA || !m2.copied ||
            m2.host != m.host + ((in + len) & ~(cs - 1)) ||
            inflight_find (q, gc + div_round_up (in + len, cs)))
          break;
        len += cs < count - len ? cs : count - len;
      }
      if (r < 0)
        break;
      pthread_mutex_unlock (&q->lock);
      r = io_data_pwrite (q, p, len, m.host + in);
      pthread_mutex_lock (&q->lock);
    }
    else if (wait_for_punching (q))
      continue;                 /* look again */
    else
      r = write_alloc (q, p, count, offset, &m, &len);
    if (r < 0)
      break;
    p += len; offset += len; count -= len;
  }
  pthread_mutex_unlock (&q->lock);
 out:
  io_unlock_shared (q);
  if (r == 0 && (flags & QCOW_FUA))
    r = flush_all (q);
  return r == -ENOTSUP ? -EIO : r;
}

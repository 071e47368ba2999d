/* SPDX-License-Identifier: BSD-3-Clause */
/* flush.c - flush, and the background thread (hole punching, compaction).
 *
 * flush_all makes every completed write durable: data first (outside the
 * image lock), then the metadata in dependency order (metadata_sync), then
 * the frees whose unlinking is now durable.  Those frees are punched out
 * of the file with no lock held, by the background thread where it runs:
 * their clusters stay counted (unusable) until punched, then are given
 * back a part at a time.  The background thread also compacts once
 * compact_after_unmaps bytes were freed; while it compacts it applies the
 * queued frees between batches (compact.c: the file cannot shrink past a
 * cluster whose free waits in the queue).  Each flush counts the
 * metadata it made durable (meta_gen, durable_gen), which tells
 * compaction when it may free the clusters it moved away from.  Errors of
 * the thread are kept in q->bg_error and returned by the next flush.
 *
 * The syncs go through sync_links (cluster.c): data written in place
 * needs no sync before the metadata, only new links do, so a flush syncs
 * under q->lock only if a link was made after its first sync began.
 *
 * Locks: flush_lock (one flush at a time) is taken before io_lock and
 * q->lock; compact_lock (qcow_compact) before all three. */
#include <stdlib.h>
#include <time.h>

#include "internal.h"

void
stop_background (struct qcow *q)
{
  if (!q->bg_running)
    return;
  pthread_mutex_lock (&q->lock);
  q->bg_stop = true;
  pthread_cond_broadcast (&q->bg_cond);
  pthread_mutex_unlock (&q->lock);
  pthread_join (q->bg_thread, NULL);
  q->bg_running = false;
}

/* Hand F over to the background thread, if it runs (compaction, in that
 * thread, applies what it queues itself: punch_queued).  False if the
 * caller must punch and finish F itself. */
static bool
punch_in_background (struct qcow *q, struct freeing *f)
{
  struct punch_job *j;
  if (!q->bg_running || !q->cfg.discard || !(j = malloc (sizeof *j)))
    return false;
  j->f = *f;
  j->next = NULL;
  pthread_mutex_lock (&q->lock);
  bool ok = !q->bg_stop;
  if (ok) {
    *q->punch_tail = j;
    q->punch_tail = &j->next;
    pthread_cond_broadcast (&q->bg_cond);
  }
  pthread_mutex_unlock (&q->lock);
  if (!ok)
    free (j);
  return ok;
}

/* Bytes punched at a time before the clusters are given back: a writer
 * that needs a new cluster while the file would otherwise grow waits for
 * one such part (a few milliseconds), see wait_for_punching. */
#define PUNCH_PART (8u << 20)

/* Apply F (from rc_deferred_take, or compaction's own): punch its
 * clusters a part at a time with q->lock dropped, giving each part back
 * once it is punched, then drop the rest of its references.  With q->lock
 * held; frees F's arrays.  On failure the references not dropped leak (no
 * harm). */
int
apply_freeing (struct qcow *q, struct freeing *f)
{
  size_t part = PUNCH_PART >> q->cluster_bits, i = 0, ci = 0;
  if (part == 0)
    part = 1;
  int r = rc_deferred_plan (q, f);
  q->punch_busy = true;
  while (r == 0 && i < f->npunch) {
    size_t k = f->npunch - i > part ? i + part : f->npunch;
    pthread_mutex_unlock (&q->lock);
    rc_deferred_punch_part (q, f, i, k);
    pthread_mutex_lock (&q->lock);
    r = rc_deferred_drop (q, f, &ci, f->punch[k - 1]);
    q->punch_gen++;
    pthread_cond_broadcast (&q->punch_cond);
    i = k;
  }
  if (r == 0)                   /* the references to unpunched clusters */
    r = rc_deferred_drop (q, f, &ci, UINT64_MAX);
  free (f->c);
  free (f->punch);
  f->c = f->punch = NULL;
  q->punch_busy = false;
  q->punch_gen++;
  pthread_cond_broadcast (&q->punch_cond);
  return r;
}

/* Apply every queued job.  With q->lock held (dropped while punching).
 * Run by the background thread. */
void
punch_queued (struct qcow *q)
{
  struct punch_job *j;
  while ((j = q->punch_head) != NULL) {
    if (!(q->punch_head = j->next))
      q->punch_tail = &q->punch_head;
    int r = apply_freeing (q, &j->f);
    if (r < 0) {
      ERR (q, "background: dropping references after punching holes "
           "failed: %s", strerror (-r));
      if (!q->bg_error)
        q->bg_error = r;
    }
    free (j);
  }
}

/* Metadata out, deferred frees applied, everything durable. */
int
flush_all (struct qcow *q)
{
  int r;
  pthread_mutex_lock (&q->flush_lock);
  /* Most of the cost of a flush is the data: sync it before taking the
   * image lock, so that other requests are not held up by it; the syncs
   * metadata_sync does under the lock then have little left to do. */
  if (__atomic_load_n (&q->data_unsynced, __ATOMIC_RELAXED) &&
      (r = sync_links (q)) < 0) {
    pthread_mutex_unlock (&q->flush_lock);
    return r;
  }
  pthread_mutex_lock (&q->lock);
  r = metadata_sync (q);
  size_t durable = q->npending;
  uint64_t gen = ++q->meta_gen;
  pthread_mutex_unlock (&q->lock);
  /* Only if metadata was written (an overwrite-only workload writes
   * none): the data was synced above. */
  if (r == 0 && __atomic_load_n (&q->data_unsynced, __ATOMIC_RELAXED))
    r = sync_links (q);
  if (r == 0) {
    pthread_mutex_lock (&q->lock);
    q->durable_gen = gen;     /* what was in memory before is on disk */
    pthread_mutex_unlock (&q->lock);
  }
  if (r == 0 && durable > 0) {
    /* The removals are durable: let the space be reused once no request
     * that looked up an old mapping is still in flight. */
    struct freeing f;
    io_lock_exclusive (q);
    pthread_mutex_lock (&q->lock);
    r = rc_deferred_take (q, durable, &f);
    pthread_mutex_unlock (&q->lock);
    io_unlock_exclusive (q);
    /* Hole punching is slow (the kernel frees the blocks, drops cached
     * pages, may discard on the device: about a second for 4 GiB on
     * ext4): it is done with no lock held, while the clusters are still
     * counted so nothing can reuse them, and, where the background
     * thread runs, by that thread, so that the flush (a client's, which
     * asked only for durability) does not wait for it. */
    if (r < 0) {
      free (f.c);
      free (f.punch);
    }
    else if (f.n == 0 || !punch_in_background (q, &f)) {
      pthread_mutex_lock (&q->lock);
      r = apply_freeing (q, &f);
      pthread_mutex_unlock (&q->lock);
    }
  }
  pthread_mutex_unlock (&q->flush_lock);
  if (r == 0 && !qcow_in_background) {
    /* An error of the background thread (it leaked clusters at worst)
     * is reported by the next flush: never swallowed. */
    pthread_mutex_lock (&q->lock);
    r = q->bg_error;
    q->bg_error = 0;
    pthread_mutex_unlock (&q->lock);
  }
  if (r == 0 && q->cfg.runtime_asserts) {
    /* The invariant behind crash safety: what is on disk is consistent
     * (leaks allowed) after every flush. */
    struct qcow_check_result cr;
    r = qcow_check (q, &cr, NULL, NULL);
    if (r == 0 && cr.verdict != QCOW_CHECK_CLEAN && cr.verdict != QCOW_CHECK_LEAKS) {
      ERR (q, "runtime assertion failed after a flush: %s (%" PRIu64
           " corruptions)", cr.verdict == QCOW_CHECK_FAILED ? cr.reason
           : "image is inconsistent", cr.corruptions);
      r = -EIO;
    }
  }
  return r;
}

int
qcow_flush (struct qcow *q)
{
  __atomic_add_fetch (&q->stats.flushes, 1, __ATOMIC_RELAXED);
  if (q->read_only || !q->modified)
    return 0;
  return flush_all (q);
}

/* The background thread: punches the holes of flushed frees, and, once
 * compact_after_unmaps bytes were freed (or are waiting to be), compacts.
 * On stop it punches what is queued before it ends. */
static void *
bg_main (void *arg)
{
  struct qcow *q = arg;
  qcow_in_background = true;
  pthread_mutex_lock (&q->lock);
  while (!q->bg_stop || q->punch_head) {
    if (!q->punch_head && !q->bg_stop) {
      struct timespec ts;
      clock_gettime (CLOCK_REALTIME, &ts);
      ts.tv_sec += 1;
      pthread_cond_timedwait (&q->bg_cond, &q->lock, &ts);
    }
    punch_queued (q);
    if (!q->cfg.compact_after_unmaps)
      continue;
    uint64_t freed = (q->stats.freed - q->bg_freed_mark + q->npending) * q->cluster_size;
    if (q->bg_stop || freed < q->cfg.compact_after_unmaps)
      continue;
    q->bg_compacting = true;
    pthread_cond_broadcast (&q->punch_cond);  /* see wait_for_punching */
    pthread_mutex_unlock (&q->lock);
    /* (The monotonic clock lets a client tell which of its requests
     * overlapped the run: bench/run-space.) */
    qcow_debugf ("%s: background compaction: started, %" PRIu64 " bytes freed "
                 "(monotonic %.3f)", q->filename, freed, monotonic_seconds ());
    struct qcow_compact_result res;
    int r = qcow_compact (q, NULL, NULL, &res);
    pthread_mutex_lock (&q->lock);
    q->bg_compacting = false;
    q->bg_freed_mark = q->stats.freed;
    q->stats.compactions++;
    qcow_debugf ("%s: background compaction: %s, %" PRIu64 " references "
                 "updated, file %" PRIu64 " -> %" PRIu64 " bytes (monotonic %.3f)",
                 q->filename, r == 0 ? "done" : "failed", res.refs_updated,
                 res.old_size * 512, res.new_size * 512, monotonic_seconds ());
  }
  pthread_mutex_unlock (&q->lock);
  return NULL;
}

int
qcow_start_background (struct qcow *q)
{
  if (q->read_only || (!q->cfg.discard && q->cfg.compact_after_unmaps == 0) ||
      q->bg_running)
    return 0;
  int e = pthread_create (&q->bg_thread, NULL, bg_main, q);
  if (e) {
    ERR (q, "cannot start the background thread: %s", strerror (e));
    return -e;
  }
  q->bg_running = true;
  return 0;
}

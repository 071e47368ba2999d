/* iolock.c - io_lock: held shared by every request for as long as it uses
 * a mapping it looked up, exclusively by whatever frees, moves or
 * reallocates what such a request may be using (applying frees, resize,
 * compaction's marks, check, rebuild).
 *
 * A pthread rwlock costs every request two atomic read-modify-writes of
 * one cache line shared by all CPUs (lock and unlock), which moves
 * between them on each request.  Here a reader counts itself in its own
 * shard (struct stat_shard, one cache line per thread group), then
 * checks the writer flag:
 *
 *   reader:  shard.readers++ (seq_cst); if writer: back off and wait
 *   writer:  writer = true (seq_cst); wait until every shard reads 0
 *
 * With both steps sequentially consistent, at least one side sees the
 * other: a reader that saw no writer is counted by the writer's sum, and
 * a writer that saw no reader will be seen by every later reader.  A
 * reader leaving while a writer waits wakes it (under the mutex, so the
 * wakeup is never lost).  Writers exclude each other and are preferred:
 * new readers wait while one is waiting, as PTHREAD_RWLOCK_PREFER_WRITER
 * does.  Not recursive; unlocked by the thread that locked. */
#include <time.h>

#include "internal.h"

void
io_lock_init (struct qcow *q)
{
  pthread_mutex_init (&q->io_lock.m, NULL);
  pthread_cond_init (&q->io_lock.cond, NULL);
  q->io_lock.writer = false;
}

void
io_lock_destroy (struct qcow *q)
{
  pthread_mutex_destroy (&q->io_lock.m);
  pthread_cond_destroy (&q->io_lock.cond);
}

void
io_lock_shared (struct qcow *q)
{
  struct stat_shard *s = &q->shard[stat_shard_index ()];
  __atomic_add_fetch (&s->readers, 1, __ATOMIC_SEQ_CST);
  if (__builtin_expect (!__atomic_load_n (&q->io_lock.writer, __ATOMIC_SEQ_CST), 1))
    return;
  /* A writer holds it or waits for it: step back (waking it, since it
   * may be waiting for this count), wait, and count in again while no
   * writer can start (it sets its flag under the mutex). */
  __atomic_sub_fetch (&s->readers, 1, __ATOMIC_SEQ_CST);
  pthread_mutex_lock (&q->io_lock.m);
  pthread_cond_broadcast (&q->io_lock.cond);
  while (__atomic_load_n (&q->io_lock.writer, __ATOMIC_SEQ_CST))
    pthread_cond_wait (&q->io_lock.cond, &q->io_lock.m);
  __atomic_add_fetch (&s->readers, 1, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock (&q->io_lock.m);
}

void
io_unlock_shared (struct qcow *q)
{
  struct stat_shard *s = &q->shard[stat_shard_index ()];
  __atomic_sub_fetch (&s->readers, 1, __ATOMIC_SEQ_CST);
  if (__builtin_expect (__atomic_load_n (&q->io_lock.writer, __ATOMIC_SEQ_CST), 0)) {
    pthread_mutex_lock (&q->io_lock.m);
    pthread_cond_broadcast (&q->io_lock.cond);
    pthread_mutex_unlock (&q->io_lock.m);
  }
}

static uint64_t
readers (struct qcow *q)
{
  uint64_t n = 0;
  for (unsigned i = 0; i < STAT_SHARDS; i++)
    n += __atomic_load_n (&q->shard[i].readers, __ATOMIC_SEQ_CST);
  return n;
}

/* Wait on io_lock's condition (its mutex held), until DEADLINE
 * (CLOCK_MONOTONIC) if there is one: 0, or ETIMEDOUT. */
static int
io_lock_wait (struct qcow *q, const struct timespec *deadline)
{
  if (!deadline)
    return pthread_cond_wait (&q->io_lock.cond, &q->io_lock.m);
  return pthread_cond_clockwait (&q->io_lock.cond, &q->io_lock.m,
                                 CLOCK_MONOTONIC, deadline);
}

void
io_lock_exclusive (struct qcow *q)
{
  io_lock_exclusive_until (q, NULL);
}

/* The same, giving up at DEADLINE (CLOCK_MONOTONIC; NULL: never): then
 * the requests held back meanwhile go on, and -ETIMEDOUT is returned
 * (compaction's bounded drains). */
int
io_lock_exclusive_until (struct qcow *q, const struct timespec *deadline)
{
  int e = 0;
  pthread_mutex_lock (&q->io_lock.m);
  while (e == 0 && __atomic_load_n (&q->io_lock.writer, __ATOMIC_SEQ_CST))
    e = io_lock_wait (q, deadline);
  if (e == 0) {
    __atomic_store_n (&q->io_lock.writer, true, __ATOMIC_SEQ_CST);
    while (e == 0 && readers (q) != 0)
      e = io_lock_wait (q, deadline);
    if (e != 0 && readers (q) == 0)
      e = 0;                    /* drained just in time */
    if (e != 0) {
      __atomic_store_n (&q->io_lock.writer, false, __ATOMIC_SEQ_CST);
      pthread_cond_broadcast (&q->io_lock.cond);
    }
  }
  pthread_mutex_unlock (&q->io_lock.m);
  return -e;
}

void
io_unlock_exclusive (struct qcow *q)
{
  pthread_mutex_lock (&q->io_lock.m);
  __atomic_store_n (&q->io_lock.writer, false, __ATOMIC_SEQ_CST);
  pthread_cond_broadcast (&q->io_lock.cond);
  pthread_mutex_unlock (&q->io_lock.m);
}

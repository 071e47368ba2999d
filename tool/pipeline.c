/* SPDX-License-Identifier: BSD-3-Clause */
/* pipeline.c - an ordered pipeline for the subcommands that stream a
 * whole disk (convert, sha): the main thread cuts the work into jobs and
 * finishes them in order; worker threads, one per CPU, do the slow part
 * of each (reading, decompressing, compressing) in between.
 *
 * Jobs go into a ring of slots, four per worker.  The main thread fills
 * free slots in sequence (next), the workers take them in sequence
 * (work: any number at once), and the main thread waits for the oldest
 * and finishes it (done), so the results come out in the order of the
 * disk whatever order the workers finish in.  A job marked zero skips
 * the workers.  The first error stops everything.
 */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "tool.h"

enum state { FREE, READY, BUSY, DONE };
struct slot {
  struct job job;
  enum state state;
  uint64_t seq;
};

struct pipeline {
  void *opaque;
  job_fn work;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct slot *slots;
  unsigned nslots;
  uint64_t next_take;           /* the next job a worker takes */
  bool stop, error;
};

static void *
worker (void *arg)
{
  struct pipeline *p = arg;
  pthread_mutex_lock (&p->lock);
  for (;;) {
    struct slot *s = &p->slots[p->next_take % p->nslots];
    while (!p->stop && !(s->state == READY && s->seq == p->next_take)) {
      pthread_cond_wait (&p->cond, &p->lock);
      s = &p->slots[p->next_take % p->nslots];
    }
    if (p->stop)
      break;
    p->next_take++;
    s->state = BUSY;
    pthread_mutex_unlock (&p->lock);
    int r = s->job.zero ? 0 : p->work (p->opaque, &s->job);
    pthread_mutex_lock (&p->lock);
    s->state = DONE;
    if (r < 0)
      p->error = p->stop = true;
    pthread_cond_broadcast (&p->cond);
  }
  pthread_mutex_unlock (&p->lock);
  return NULL;
}

int
pipeline_run (void *opaque, size_t chunk, size_t unit, bool want_out,
              job_fn next, job_fn work, job_fn done)
{
  long ncpu = sysconf (_SC_NPROCESSORS_ONLN);
  unsigned nworkers = ncpu < 1 ? 1 : ncpu > 64 ? 64 : (unsigned) ncpu;
  struct pipeline p = { .opaque = opaque, .work = work, .nslots = 4 * nworkers };
  pthread_t *th = calloc (nworkers, sizeof *th);
  unsigned started = 0;
  int r = 0;
  p.slots = calloc (p.nslots, sizeof *p.slots);
  if (!p.slots || !th)
    goto nomem;
  for (unsigned i = 0; i < p.nslots; i++) {
    struct job *j = &p.slots[i].job;
    j->in = malloc (chunk);
    j->out = want_out ? malloc (chunk) : NULL;
    j->clen = malloc ((chunk / unit + 1) * sizeof *j->clen);
    if (!j->in || (want_out && !j->out) || !j->clen)
      goto nomem;
  }
  pthread_mutex_init (&p.lock, NULL);
  pthread_cond_init (&p.cond, NULL);
  for (; started < nworkers; started++)
    if (pthread_create (&th[started], NULL, worker, &p) != 0)
      break;
  if (started == 0) {
    fail ("cannot start threads");
    r = -1;
    goto destroy;
  }

  uint64_t produced = 0, finished = 0;
  bool more = true;
  pthread_mutex_lock (&p.lock);
  while (r == 0 && !p.error) {
    /* Fill every free slot with the next jobs, in order. */
    while (more && p.slots[produced % p.nslots].state == FREE) {
      struct slot *s = &p.slots[produced % p.nslots];
      pthread_mutex_unlock (&p.lock);
      s->job.len = 0;
      s->job.zero = false;
      int e = next (opaque, &s->job);
      pthread_mutex_lock (&p.lock);
      if (e < 0) {
        r = -1;
        break;
      }
      if (s->job.len == 0) {
        more = false;
        break;
      }
      s->seq = produced++;
      s->state = READY;
      pthread_cond_broadcast (&p.cond);
    }
    if (r < 0 || finished == produced)
      break;
    struct slot *s = &p.slots[finished % p.nslots];
    while (s->state != DONE && !p.error)
      pthread_cond_wait (&p.cond, &p.lock);
    if (p.error)
      break;
    pthread_mutex_unlock (&p.lock);
    r = done (opaque, &s->job);
    pthread_mutex_lock (&p.lock);
    s->state = FREE;
    finished++;
  }
  if (p.error)
    r = -1;
  p.stop = true;
  pthread_cond_broadcast (&p.cond);
  pthread_mutex_unlock (&p.lock);
  for (unsigned i = 0; i < started; i++)
    pthread_join (th[i], NULL);
 destroy:
  pthread_mutex_destroy (&p.lock);
  pthread_cond_destroy (&p.cond);
  goto out;
 nomem:
  fail ("out of memory");
  r = -1;
 out:
  for (unsigned i = 0; p.slots && i < p.nslots; i++) {
    free (p.slots[i].job.in);
    free (p.slots[i].job.out);
    free (p.slots[i].job.clen);
  }
  free (p.slots);
  free (th);
  return r;
}

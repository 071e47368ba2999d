/* SPDX-License-Identifier: BSD-3-Clause */
/* tests/powerloss-filter.c - an nbdkit filter for the power-loss tests
 * (QCOW_VIA=powerloss in tests/functions.sh; tests/powerloss-apply.py).
 *
 *   nbdkit --filter=qcow --filter=tests/powerloss-filter.so \
 *          file IMAGE powerloss-log=LOG
 *
 * Every write, write-zeroes and trim is passed on at once, and also
 * appended to LOG first, with what the range held before: a record is in
 * LOG before its write reaches the storage.  A flush passes the flush on
 * and then empties LOG: what it held is durable.  A write with FUA gets
 * an acknowledgement record once it is done.  So after kill -9, LOG holds
 * exactly the writes that a power cut could have lost, and
 * powerloss-apply.py turns IMAGE into what the disk could hold after one:
 * the state of the last flush, plus any subset of the later writes
 * (acknowledged FUA writes always), torn at 4 KiB.
 *
 * Write-type requests are serialized (one lock), so that the content
 * read before a write is what that write replaced.
 *
 * powerloss-cut-at-flush=N: nbdkit kills itself (SIGKILL) when the N-th
 * flush (counting those made while the image is created or opened)
 * reaches the filter, before passing it on: the moment when LOG
 * holds the most that a power cut could lose (the metadata written back
 * for that flush, none of it durable yet). */
#define NBDKIT_API_VERSION 2
#include <nbdkit-filter.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

enum { REC_WRITE = 1, REC_ZERO = 2, REC_ACK = 3 };   /* record types */
/* Requests logged; a trim as REC_ZERO (a trimmed range of the file plugin
 * reads as zeros: a punched hole). */
enum op { OP_WRITE, OP_ZERO, OP_TRIM };

struct rec {            /* then LEN bytes before, and for REC_WRITE LEN after */
  uint32_t type, pad;
  uint64_t seq, offset, len;
};

static char *log_path;
static int log_fd = -1;
static unsigned cut_at;                 /* powerloss-cut-at-flush=N */
static unsigned flushes;
static uint64_t seq;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int
pl_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
           const char *key, const char *value)
{
  if (strcmp (key, "powerloss-log") == 0) {
    free (log_path);
    log_path = nbdkit_absolute_path (value);   /* nbdkit may chdir */
    return log_path ? 0 : -1;
  }
  if (strcmp (key, "powerloss-cut-at-flush") == 0)
    return nbdkit_parse_unsigned ("powerloss-cut-at-flush", value, &cut_at);
  return next (nxdata, key, value);
}

static int
pl_get_ready (int thread_model)
{
  if (!log_path) {
    nbdkit_error ("powerloss-log= is required");
    return -1;
  }
  log_fd = open (log_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd == -1) {
    nbdkit_error ("%s: %m", log_path);
    return -1;
  }
  return 0;
}

static void
pl_unload (void)
{
  if (log_fd >= 0)
    close (log_fd);
  free (log_path);
}

static int
append (struct iovec *iov, int n)
{
  size_t total = 0;
  for (int i = 0; i < n; i++)
    total += iov[i].iov_len;
  ssize_t r = writev (log_fd, iov, n);
  if (r < 0 || (size_t) r != total) {
    nbdkit_error ("%s: short write", log_path);
    return -1;
  }
  return 0;
}

/* Log a write-type request OP of COUNT bytes at OFFSET (BUF: the data of
 * a write), then pass it on; acknowledge it if FUA.  Under LOCK. */
static int
logged (nbdkit_next *next, enum op op, const void *buf, uint32_t count,
        uint64_t offset, uint32_t flags, int *err)
{
  int r = -1;
  void *old = malloc (count ? count : 1);
  if (!old) {
    *err = ENOMEM;
    return -1;
  }
  pthread_mutex_lock (&lock);
  struct rec h = { op == OP_WRITE ? REC_WRITE : REC_ZERO, 0, ++seq, offset, count };
  struct iovec iov[3] = { { &h, sizeof h }, { old, count }, { (void *) buf, count } };
  if (next->pread (next, old, count, offset, 0, err) == -1)
    goto out;
  if (append (iov, op == OP_WRITE ? 3 : 2) == -1) {
    *err = EIO;
    goto out;
  }
  switch (op) {
  case OP_WRITE: r = next->pwrite (next, buf, count, offset, flags, err); break;
  case OP_ZERO: r = next->zero (next, count, offset, flags, err); break;
  case OP_TRIM: r = next->trim (next, count, offset, flags, err); break;
  }
  if (r == 0 && (flags & NBDKIT_FLAG_FUA)) {
    struct rec a = { REC_ACK, 0, h.seq, 0, 0 };
    struct iovec ia = { &a, sizeof a };
    if (append (&ia, 1) == -1) {
      *err = EIO;
      r = -1;
    }
  }
 out:
  pthread_mutex_unlock (&lock);
  free (old);
  return r;
}

static int
pl_pwrite (nbdkit_next *next, void *handle, const void *buf, uint32_t count,
           uint64_t offset, uint32_t flags, int *err)
{
  return logged (next, OP_WRITE, buf, count, offset, flags, err);
}

static int
pl_zero (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
         uint32_t flags, int *err)
{
  return logged (next, OP_ZERO, NULL, count, offset, flags, err);
}

static int
pl_trim (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
         uint32_t flags, int *err)
{
  return logged (next, OP_TRIM, NULL, count, offset, flags, err);
}

static int
pl_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  pthread_mutex_lock (&lock);
  if (cut_at && ++flushes == cut_at)
    kill (getpid (), SIGKILL);
  int r = next->flush (next, flags, err);
  if (r == 0 && ftruncate (log_fd, 0) == -1) {
    *err = errno;
    r = -1;
  }
  pthread_mutex_unlock (&lock);
  return r;
}

/* Only what is logged: no fast zero, no cache. */
static int
pl_can_fast_zero (nbdkit_next *next, void *handle)
{
  return 0;
}

static struct nbdkit_filter filter = {
  .name              = "powerloss",
  .longname          = "qcow tests: power-loss log",
  .config            = pl_config,
  .get_ready         = pl_get_ready,
  .unload            = pl_unload,
  .can_fast_zero     = pl_can_fast_zero,
  .pwrite            = pl_pwrite,
  .zero              = pl_zero,
  .trim              = pl_trim,
  .flush             = pl_flush,
};

NBDKIT_REGISTER_FILTER (filter)

/* io.c - the file backend: complete pread/pwrite loops and fdatasync. */
#include <fcntl.h>
#include <unistd.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <stdio.h>

#include "internal.h"

/* ---- fault injection (Debug) ---- */
static struct {
  uint64_t count, nth;          /* nth == 0: not armed */
  int err;
  bool short_write, persistent;
} faults[QCOW_FAULT_NR];
static uint64_t nfaults;

void
qcow_debug_inject (enum qcow_fault_op op, uint64_t nth, int err,
                   bool short_write, bool persistent)
{
  if (op >= QCOW_FAULT_NR)
    return;
  __atomic_store_n (&faults[op].count, 0, __ATOMIC_SEQ_CST);
  faults[op].err = err ? err : EIO;
  faults[op].short_write = short_write;
  faults[op].persistent = persistent;
  __atomic_store_n (&faults[op].nth, nth, __ATOMIC_SEQ_CST);
}

void
qcow_debug_reset (void)
{
  for (int i = 0; i < QCOW_FAULT_NR; i++) {
    __atomic_store_n (&faults[i].nth, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n (&faults[i].count, 0, __ATOMIC_SEQ_CST);
  }
}

uint64_t qcow_debug_count (enum qcow_fault_op op)
{ return op < QCOW_FAULT_NR ? __atomic_load_n (&faults[op].count, __ATOMIC_SEQ_CST) : 0; }
uint64_t qcow_debug_faults (void)
{ return __atomic_load_n (&nfaults, __ATOMIC_SEQ_CST); }

/* 0, or the -errno this call must fail with (*SHORT: write half first). */
static int
fault (enum qcow_fault_op op, bool *short_write)
{
  uint64_t c = __atomic_add_fetch (&faults[op].count, 1, __ATOMIC_SEQ_CST);
  uint64_t nth = __atomic_load_n (&faults[op].nth, __ATOMIC_SEQ_CST);
  if (nth == 0 || c < nth || (c > nth && !faults[op].persistent))
    return 0;
  if (short_write)
    *short_write = faults[op].short_write;
  __atomic_add_fetch (&nfaults, 1, __ATOMIC_SEQ_CST);
  return -faults[op].err;
}

/* QCOW_DEBUG_FAULT="op:nth:errno[:short][:persistent]" */
void
fault_from_env (void)
{
  static const char *ops[] = { "read", "write", "sync", "punch", "truncate" };
  static const struct { const char *name; int e; } errs[] = {
    { "EIO", EIO }, { "ENOSPC", ENOSPC }, { "EDQUOT", EDQUOT }, { "EROFS", EROFS },
    { "EPERM", EPERM }, { "ENOMEM", ENOMEM }, { "EINTR", EINTR },
  };
  const char *env = getenv ("QCOW_DEBUG_FAULT");
  if (!env || !*env)
    return;
  char buf[128], *save = NULL;
  snprintf (buf, sizeof buf, "%s", env);
  char *op = strtok_r (buf, ":", &save), *nth = strtok_r (NULL, ":", &save);
  char *err = strtok_r (NULL, ":", &save), *flag;
  if (!op || !nth)
    return;
  int e = EIO;
  if (err) {
    e = atoi (err);
    for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++)
      if (strcmp (err, errs[i].name) == 0)
        e = errs[i].e;
  }
  bool sw = false, pers = false;
  while ((flag = strtok_r (NULL, ":", &save))) {
    sw |= strcmp (flag, "short") == 0;
    pers |= strcmp (flag, "persistent") == 0;
  }
  for (int i = 0; i < QCOW_FAULT_NR; i++)
    if (strcmp (op, ops[i]) == 0)
      qcow_debug_inject (i, strtoull (nth, NULL, 10), e ? e : EIO, sw, pers);
}

__thread bool qcow_in_background;

/* Injected faults say when they hit the background thread, whose errors
 * reach clients only at the next flush. */
static const char *
where (void)
{
  return qcow_in_background ? " in the background thread" : "";
}

int
io_pread_fd (int fd, const char *file, void *buf, size_t count, uint64_t offset,
             bool zero_past_eof)
{
  uint8_t *p = buf;
  int f = fault (QCOW_FAULT_READ, NULL);
  if (f < 0) {
    qcow_errorf (file, "read at offset %" PRIu64 ": %s (injected)%s", offset, strerror (-f), where ());
    return f;
  }
  while (count > 0) {
    ssize_t r = pread (fd, p, count, (off_t) offset);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      int e = errno;
      qcow_errorf (file, "read at offset %" PRIu64 ": %s", offset, strerror (e));
      return -e;
    }
    if (r == 0) {
      if (zero_past_eof) {
        memset (p, 0, count);
        return 0;
      }
      qcow_errorf (file, "read at offset %" PRIu64 ": unexpected end of file",
                   offset);
      return -EIO;
    }
    p += r; count -= r; offset += r;
  }
  return 0;
}

int
io_pread (struct qcow *q, void *buf, size_t count, uint64_t offset)
{
  return io_pread_fd (q->fd, q->filename, buf, count, offset, true);
}

int
io_pwrite_fd (int fd, const char *file, const void *buf, size_t count,
              uint64_t offset)
{
  const uint8_t *p = buf;
  bool torn = false;
  int f = fault (QCOW_FAULT_WRITE, &torn);
  if (f < 0) {
    if (torn && count > 1 && pwrite (fd, p, count / 2, (off_t) offset) < 0)
      f = -errno;
    qcow_errorf (file, "write at offset %" PRIu64 ": %s (injected)%s", offset, strerror (-f), where ());
    return f;
  }
  while (count > 0) {
    ssize_t r = pwrite (fd, p, count, (off_t) offset);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      int e = errno;
      qcow_errorf (file, "write at offset %" PRIu64 ": %s", offset, strerror (e));
      return -e;
    }
    p += r; count -= r; offset += r;
  }
  return 0;
}

static void
note_extent (struct qcow *q, uint64_t end)
{
  /* Shared by every writer: read before writing, so the cache line is
   * not bounced between CPUs on every request. */
  uint64_t cur = __atomic_load_n (&q->file_size, __ATOMIC_RELAXED);
  while (end > cur &&
         !__atomic_compare_exchange_n (&q->file_size, &cur, end, false,
                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
  if (!__atomic_load_n (&q->data_unsynced, __ATOMIC_RELAXED))
    __atomic_store_n (&q->data_unsynced, true, __ATOMIC_RELAXED);
}

int
io_pwrite (struct qcow *q, const void *buf, size_t count, uint64_t offset)
{
  int r = io_pwrite_fd (q->fd, q->filename, buf, count, offset);
  if (r == 0)
    note_extent (q, offset + count);
  return r;
}

static int
pwritev_fd (struct qcow *q, int fd, const char *file, struct iovec *iov, int iovcnt,
            uint64_t offset)
{
  uint64_t total = 0;
  for (int i = 0; i < iovcnt; i++)
    total += iov[i].iov_len;
  uint64_t off = offset;
  bool torn = false;
  int f = fault (QCOW_FAULT_WRITE, &torn);
  if (f < 0) {
    if (torn && iov[0].iov_len > 1 && pwrite (fd, iov[0].iov_base, iov[0].iov_len / 2, (off_t) off) < 0)
      f = -errno;
    qcow_errorf (file, "write at offset %" PRIu64 ": %s (injected)%s", off, strerror (-f), where ());
    return f;
  }
  while (iovcnt > 0) {
    ssize_t r = pwritev (fd, iov, iovcnt, (off_t) off);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      int e = errno;
      qcow_errorf (file, "write at offset %" PRIu64 ": %s", off, strerror (e));
      return -e;
    }
    off += r;
    while (iovcnt > 0 && (size_t) r >= iov->iov_len) {
      r -= iov->iov_len; iov++; iovcnt--;
    }
    if (iovcnt > 0) {
      iov->iov_base = (uint8_t *) iov->iov_base + r;
      iov->iov_len -= r;
    }
  }
  if (fd == q->fd)
    note_extent (q, offset + total);
  else
    __atomic_store_n (&q->data_unsynced, true, __ATOMIC_RELAXED);
  return 0;
}

int
io_pwritev (struct qcow *q, struct iovec *iov, int iovcnt, uint64_t offset)
{
  return pwritev_fd (q, q->fd, q->filename, iov, iovcnt, offset);
}

/* Guest data: in the image, or in its external data file. */
int
io_data_pread (struct qcow *q, void *buf, size_t count, uint64_t offset)
{
  return io_pread_fd (q->data_fd, q->data_path ? q->data_path : q->filename,
                      buf, count, offset, true);
}

int
io_data_pwrite (struct qcow *q, const void *buf, size_t count, uint64_t offset)
{
  struct iovec iov = { (void *) buf, count };
  return io_data_pwritev (q, &iov, 1, offset);
}

int
io_data_pwritev (struct qcow *q, struct iovec *iov, int iovcnt, uint64_t offset)
{
  return pwritev_fd (q, q->data_fd, q->data_path ? q->data_path : q->filename,
                     iov, iovcnt, offset);
}

int
io_sync (struct qcow *q)
{
  int f = fault (QCOW_FAULT_SYNC, NULL);
  if (f < 0) {
    ERR (q, "fdatasync: %s (injected)%s", strerror (-f), where ());
    return f;
  }
  __atomic_store_n (&q->data_unsynced, false, __ATOMIC_RELAXED);
  if (q->data_fd != q->fd && fdatasync (q->data_fd) == -1) {
    int e = errno;
    __atomic_store_n (&q->data_unsynced, true, __ATOMIC_RELAXED);
    qcow_errorf (q->data_path, "fdatasync: %s", strerror (e));
    return -e;
  }
  if (fdatasync (q->fd) == -1) {
    int e = errno;
    __atomic_store_n (&q->data_unsynced, true, __ATOMIC_RELAXED);
    ERR (q, "fdatasync: %s", strerror (e));
    return -e;
  }
  return 0;
}

/* Give a freed range back to the file system; best effort. */
int
io_punch (struct qcow *q, bool data, uint64_t offset, uint64_t len)
{
  int f = fault (QCOW_FAULT_PUNCH, NULL);
  if (f < 0)
    return f;
  if (fallocate (data ? q->data_fd : q->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 (off_t) offset, (off_t) len) == -1)
    return -errno;
  return 0;
}

int
io_truncate (struct qcow *q, uint64_t size)
{
  int f = fault (QCOW_FAULT_TRUNCATE, NULL);
  if (f == 0 && ftruncate (q->fd, (off_t) size) == -1)
    f = -errno;
  if (f < 0)
    ERR (q, "truncate to %" PRIu64 " bytes: %s", size, strerror (-f));
  return f;
}

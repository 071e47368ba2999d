/* SPDX-License-Identifier: BSD-3-Clause */
/* io.c - the core's I/O on its backends: every read, write, flush, punch
 * and truncate of an image, its data file and its raw backing file goes
 * through here, so that fault injection (the OCaml library's Debug
 * module) works on every backend, failed I/O is reported in one place
 * (naming the file), and the image's known size and "data written since
 * the last sync" flag are kept.  Below it is only the backend
 * (backend.c). */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

/* ---- fault injection (Debug) ---- */
static struct {
  uint64_t count, nth;          /* nth == 0: not armed */
  int err;
  bool short_write, persistent;
} faults[QCOW_FAULT_NR];
static uint64_t nfaults;
/* Nothing is counted until a fault is armed or the counts reset: an
 * atomic increment of a counter shared by every thread would cost each
 * request a cache line moved between CPUs. */
static bool counting;

void
qcow_debug_inject (enum qcow_fault_op op, uint64_t nth, int err,
                   bool short_write, bool persistent)
{
  if (op >= QCOW_FAULT_NR)
    return;
  __atomic_store_n (&counting, true, __ATOMIC_SEQ_CST);
  __atomic_store_n (&faults[op].count, 0, __ATOMIC_SEQ_CST);
  faults[op].err = err ? err : EIO;
  faults[op].short_write = short_write;
  faults[op].persistent = persistent;
  __atomic_store_n (&faults[op].nth, nth, __ATOMIC_SEQ_CST);
}

void
qcow_debug_reset (void)
{
  __atomic_store_n (&counting, true, __ATOMIC_SEQ_CST);
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
  if (!__atomic_load_n (&counting, __ATOMIC_RELAXED))
    return 0;
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

/* What OP on B failed with, in one line naming B's file. */
static int
io_error (struct qcow_backend *b, const char *op, uint64_t offset, int r,
          bool injected)
{
  if (offset == UINT64_MAX)
    qcow_errorf (b->name, "%s: %s%s%s", op, strerror (-r),
                 injected ? " (injected)" : "", where ());
  else
    qcow_errorf (b->name, "%s at offset %" PRIu64 ": %s%s%s", op, offset,
                 strerror (-r), injected ? " (injected)" : "", where ());
  return r;
}

int
io_bpread (struct qcow_backend *b, void *buf, size_t count, uint64_t offset)
{
  int r = fault (QCOW_FAULT_READ, NULL);
  if (r < 0)
    return io_error (b, "read", offset, r, true);
  if ((r = b->ops.pread (b->opaque, buf, count, offset)) < 0)
    return io_error (b, "read", offset, r, false);
  return 0;
}

static int
bpwritev (struct qcow_backend *b, const struct iovec *iov, int iovcnt,
          uint64_t offset)
{
  bool torn = false;
  int r = fault (QCOW_FAULT_WRITE, &torn);
  if (r < 0) {
    if (torn && iov[0].iov_len > 1 && b->ops.pwrite)
      b->ops.pwrite (b->opaque, iov[0].iov_base, iov[0].iov_len / 2, offset);
    return io_error (b, "write", offset, r, true);
  }
  if (b->read_only)
    return io_error (b, "write", offset, -EROFS, false);
  if (b->ops.pwritev && iovcnt <= IOV_MAX_CORE)
    r = b->ops.pwritev (b->opaque, iov, iovcnt, offset);
  else {
    uint64_t off = offset;
    for (int i = 0; i < iovcnt && r == 0; off += iov[i++].iov_len)
      r = b->ops.pwrite (b->opaque, iov[i].iov_base, iov[i].iov_len, off);
  }
  return r < 0 ? io_error (b, "write", offset, r, false) : 0;
}

int
io_bpwrite (struct qcow_backend *b, const void *buf, size_t count, uint64_t offset)
{
  struct iovec iov = { (void *) buf, count };
  return bpwritev (b, &iov, 1, offset);
}

int
io_bflush (struct qcow_backend *b)
{
  int r = fault (QCOW_FAULT_SYNC, NULL);
  if (r < 0)
    return io_error (b, "flush", UINT64_MAX, r, true);
  if (!b->read_only && (r = b->ops.flush (b->opaque)) < 0)
    return io_error (b, "flush", UINT64_MAX, r, false);
  return 0;
}

int
io_bsize (struct qcow_backend *b, uint64_t *size)
{
  int r = b->ops.get_size (b->opaque, size);
  return r < 0 ? io_error (b, "size", UINT64_MAX, r, false) : 0;
}

int
io_pread (struct qcow *q, void *buf, size_t count, uint64_t offset)
{
  return io_bpread (q->img, buf, count, offset);
}

/* A structure that must lie wholly inside the image (a table read at
 * open): its end past the end of the file is an error, not zeros. */
int
io_pread_inside (struct qcow *q, void *buf, size_t count, uint64_t offset)
{
  if (offset > q->file_size || count > q->file_size - offset) {
    ERR (q, "read at offset %" PRIu64 ": unexpected end of file", offset);
    return -EIO;
  }
  return io_bpread (q->img, buf, count, offset);
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
io_pwritev (struct qcow *q, struct iovec *iov, int iovcnt, uint64_t offset)
{
  int r = bpwritev (q->img, iov, iovcnt, offset);
  if (r == 0) {
    uint64_t total = 0;
    for (int i = 0; i < iovcnt; i++)
      total += iov[i].iov_len;
    note_extent (q, offset + total);
  }
  return r;
}

int
io_pwrite (struct qcow *q, const void *buf, size_t count, uint64_t offset)
{
  struct iovec iov = { (void *) buf, count };
  return io_pwritev (q, &iov, 1, offset);
}

int
io_data_pread (struct qcow *q, void *buf, size_t count, uint64_t offset)
{
  return io_bpread (q->data, buf, count, offset);
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
  if (q->data == q->img)
    return io_pwritev (q, iov, iovcnt, offset);
  int r = bpwritev (q->data, iov, iovcnt, offset);
  if (r == 0)
    __atomic_store_n (&q->data_unsynced, true, __ATOMIC_RELAXED);
  return r;
}

/* The data file, then the image: both durable. */
int
io_sync (struct qcow *q)
{
  int r = fault (QCOW_FAULT_SYNC, NULL);
  if (r < 0)
    return io_error (q->img, "flush", UINT64_MAX, r, true);
  __atomic_store_n (&q->data_unsynced, false, __ATOMIC_RELAXED);
  struct qcow_backend *b = q->data;
  r = b->ops.flush ? b->ops.flush (b->opaque) : 0;
  if (r == 0 && q->data != q->img && (b = q->img)->ops.flush)
    r = b->ops.flush (b->opaque);
  if (r < 0) {
    __atomic_store_n (&q->data_unsynced, true, __ATOMIC_RELAXED);
    return io_error (b, "flush", UINT64_MAX, r, false);
  }
  return 0;
}

/* Give a freed range back to the storage; best effort, no message. */
int
io_punch (struct qcow *q, bool data, uint64_t offset, uint64_t len)
{
  struct qcow_backend *b = data ? q->data : q->img;
  int r = fault (QCOW_FAULT_PUNCH, NULL);
  if (r < 0)
    return r;
  return b->ops.discard ? b->ops.discard (b->opaque, offset, len) : -ENOTSUP;
}

int
io_truncate (struct qcow *q, uint64_t size)
{
  struct qcow_backend *b = q->img;
  int r = fault (QCOW_FAULT_TRUNCATE, NULL);
  if (r == 0)
    r = b->ops.truncate ? b->ops.truncate (b->opaque, size) : -ENOTSUP;
  if (r < 0)
    ERR (q, "truncate to %" PRIu64 " bytes: %s%s", size, strerror (-r),
         where ());
  return r;
}

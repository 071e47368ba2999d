/* io.c - the file backend: complete pread/pwrite loops and fdatasync. */
#include <fcntl.h>
#include <unistd.h>
#include <stdlib.h>
#include <sys/uio.h>

#include "internal.h"

int
io_pread_fd (int fd, const char *file, void *buf, size_t count, uint64_t offset,
             bool zero_past_eof)
{
  uint8_t *p = buf;
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
  uint64_t cur = __atomic_load_n (&q->file_size, __ATOMIC_RELAXED);
  while (end > cur &&
         !__atomic_compare_exchange_n (&q->file_size, &cur, end, false,
                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
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

int
io_pwritev (struct qcow *q, struct iovec *iov, int iovcnt, uint64_t offset)
{
  uint64_t total = 0;
  for (int i = 0; i < iovcnt; i++)
    total += iov[i].iov_len;
  uint64_t off = offset;
  while (iovcnt > 0) {
    ssize_t r = pwritev (q->fd, iov, iovcnt, (off_t) off);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      int e = errno;
      ERR (q, "write at offset %" PRIu64 ": %s", off, strerror (e));
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
  note_extent (q, offset + total);
  return 0;
}

int
io_sync (struct qcow *q)
{
  __atomic_store_n (&q->data_unsynced, false, __ATOMIC_RELAXED);
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
io_punch (struct qcow *q, uint64_t offset, uint64_t len)
{
  if (fallocate (q->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 (off_t) offset, (off_t) len) == -1)
    return -errno;
  return 0;
}

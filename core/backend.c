/* SPDX-License-Identifier: BSD-3-Clause */
/* backend.c - the storage under an image: the backend object, and the
 * local file backend.
 *
 * This is the bottom layer: it calls nothing in the core but the message
 * functions (msg.c); fault injection, the messages about failed I/O and
 * the size bookkeeping are io.c's, one level up.  A backend is a set of callbacks (struct qcow_backend_ops, in
 * qcow.h) and the caller's opaque pointer; a local file is one such set,
 * over a file descriptor, which also carries QEMU's image locks (lock.c).
 * Callers' backends have no descriptor and are never locked: locking is
 * for local files only.
 *
 * A backend is not shared between images.  Its callbacks are called
 * without any of the core's locks held on the data path, so they must be
 * thread-safe (pread/pwrite on one descriptor are).
 */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

int
qcow_backend_new (const struct qcow_backend_ops *ops, void *opaque,
                  const char *name, struct qcow_backend **bp)
{
  if (!ops || !ops->pread || !ops->get_size || (ops->pwrite && !ops->flush)) {
    qcow_errorf (name ? name : "backend", "a backend needs pread, get_size "
                 "and, to be written, flush");
    return -EINVAL;
  }
  struct qcow_backend *b = calloc (1, sizeof *b);
  if (!b || !(b->name = strdup (name ? name : "backend"))) {
    free (b);
    qcow_errorf (name ? name : "backend", "out of memory");
    return -ENOMEM;
  }
  b->ops = *ops;
  b->opaque = opaque;
  b->fd = -1;
  b->read_only = ops->pwrite == NULL;
  *bp = b;
  return 0;
}

void
qcow_backend_free (struct qcow_backend *b)
{
  if (!b)
    return;
  if (b->ops.close)
    b->ops.close (b->opaque);
  free (b->name);
  free (b);
}

/* ---- the local file backend ---- */

/* The opaque pointer of a file backend is its descriptor, boxed. */
static int fd_of (void *opaque) { return *(int *) opaque; }

static int
file_pread (void *opaque, void *buf, size_t count, uint64_t offset)
{
  int fd = fd_of (opaque);
  uint8_t *p = buf;
  while (count > 0) {
    ssize_t r = pread (fd, p, count, (off_t) offset);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (r == 0) {               /* past the end of the file: zeros */
      memset (p, 0, count);
      return 0;
    }
    p += r; count -= r; offset += r;
  }
  return 0;
}

static int
file_pwritev (void *opaque, const struct iovec *iov_in, int iovcnt,
              uint64_t offset)
{
  int fd = fd_of (opaque);
  struct iovec v[IOV_MAX_CORE], *iov = v;
  if (iovcnt > IOV_MAX_CORE)
    return -EINVAL;
  memcpy (v, iov_in, iovcnt * sizeof *v);
  while (iovcnt > 0) {
    ssize_t r = pwritev (fd, iov, iovcnt, (off_t) offset);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    offset += r;
    while (iovcnt > 0 && (size_t) r >= iov->iov_len) {
      r -= iov->iov_len; iov++; iovcnt--;
    }
    if (iovcnt > 0) {
      iov->iov_base = (uint8_t *) iov->iov_base + r;
      iov->iov_len -= r;
    }
  }
  return 0;
}

static int
file_pwrite (void *opaque, const void *buf, size_t count, uint64_t offset)
{
  struct iovec iov = { (void *) buf, count };
  return file_pwritev (opaque, &iov, 1, offset);
}

static int
file_flush (void *opaque)
{
  return fdatasync (fd_of (opaque)) == -1 ? -errno : 0;
}

static int
file_get_size (void *opaque, uint64_t *size)
{
  off_t r = lseek (fd_of (opaque), 0, SEEK_END);
  if (r < 0)
    return -errno;
  *size = r;
  return 0;
}

static int
file_discard (void *opaque, uint64_t offset, uint64_t count)
{
  if (fallocate (fd_of (opaque), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 (off_t) offset, (off_t) count) == -1)
    return -errno;
  return 0;
}

static int
file_truncate (void *opaque, uint64_t size)
{
  return ftruncate (fd_of (opaque), (off_t) size) == -1 ? -errno : 0;
}

static void
file_close (void *opaque)
{
  close (fd_of (opaque));
  free (opaque);
}

static const struct qcow_backend_ops file_ops = {
  .pread = file_pread, .get_size = file_get_size, .pwrite = file_pwrite,
  .pwritev = file_pwritev, .flush = file_flush, .discard = file_discard, .truncate = file_truncate,
  .close = file_close,
};
static const struct qcow_backend_ops file_ops_ro = {
  .pread = file_pread, .get_size = file_get_size, .close = file_close,
};

/* Open PATH with FLAGS (O_RDWR, O_RDONLY, plus O_CREAT and friends). */
int
backend_open_file_flags (const char *path, int flags, mode_t mode,
                         struct qcow_backend **bp)
{
  int fd = open (path, flags | O_CLOEXEC, mode);
  if (fd == -1)
    return -errno;
  struct stat st;
  int e = 0;
  if (fstat (fd, &st) == -1)
    e = errno;
  else if (S_ISDIR (st.st_mode))
    e = EISDIR;
  else if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode))
    e = ENODEV;
  if (e) {
    close (fd);
    return -e;
  }
  int *box = malloc (sizeof *box);
  if (!box) {
    close (fd);
    return -ENOMEM;
  }
  *box = fd;
  bool ro = (flags & O_ACCMODE) == O_RDONLY;
  int r = qcow_backend_new (ro ? &file_ops_ro : &file_ops, box, path, bp);
  if (r < 0) {
    file_close (box);
    return r;
  }
  (*bp)->fd = fd;
  (*bp)->dev = st.st_dev;
  (*bp)->ino = st.st_ino;
  /* A block device keeps its size: the image lives inside it. */
  if (S_ISBLK (st.st_mode))
    (*bp)->ops.truncate = NULL;
  return 0;
}

int
qcow_backend_open_file (const char *path, bool read_only, struct qcow_backend **bp)
{
  int r = backend_open_file_flags (path, read_only ? O_RDONLY : O_RDWR, 0, bp);
  if (!read_only && (r == -EACCES || r == -EROFS || r == -EPERM))
    r = backend_open_file_flags (path, O_RDONLY, 0, bp);
  if (r < 0)
    qcow_errorf (path, "%s", r == -ENODEV ? "not a regular file or block device"
                 : strerror (-r));
  return r;
}

/* Move a local file's image locks to TO (lock.c; the same returns as
 * qcow_lock_change).  Other storage has no locks: nothing to do. */
int
backend_lock (struct qcow_backend *b, enum qcow_lock to, char *msg, size_t len)
{
  if (b->fd < 0 || b->lock_state == to)
    return 0;
  int r = qcow_lock_change (b->fd, NULL, b->lock_state, to, msg, len);
  if (r == 0)
    b->lock_state = to;
  return r;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* crashpoint.so - an LD_PRELOAD library that kills its process with
 * SIGKILL at a chosen moment of its file I/O, for crash tests of
 * programs that use the core (qcow-tool).
 *
 *   CRASHPOINT=N   count the calls that change a file (pwrite, pwritev,
 *                  fdatasync, fsync, fallocate, ftruncate); at the Nth,
 *                  kill the process before the call takes effect (0:
 *                  never)
 *   CRASHPOINT_TORN=1  at the Nth call, if it is a write of more than a
 *                  page, write the part up to the first page boundary
 *                  inside it, then die (a write the kernel had only
 *                  partly copied when the process was killed)
 *   CRASHPOINT_COUNT=FILE  at exit, write the number of calls there
 *
 * Built by the test that uses it: cc -shared -fPIC -o crashpoint.so
 * crashpoint.c -ldl.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

static unsigned long calls, at;
static int torn;

static void
report (void)
{
  const char *f = getenv ("CRASHPOINT_COUNT");
  FILE *fp;
  if (f && (fp = fopen (f, "w"))) {
    fprintf (fp, "%lu\n", calls);
    fclose (fp);
  }
}

__attribute__ ((constructor)) static void
init (void)
{
  const char *s = getenv ("CRASHPOINT");
  at = s ? strtoul (s, NULL, 10) : 0;
  torn = getenv ("CRASHPOINT_TORN") != NULL;
  atexit (report);
}

/* Count the call; true if it is the one to die at. */
static int
hit (void)
{
  unsigned long n = __atomic_add_fetch (&calls, 1, __ATOMIC_SEQ_CST);
  return at && n == at;
}

static void
die (void)
{
  kill (getpid (), SIGKILL);
  pause ();
}

#define REAL(name) \
  static __typeof__ (name) *real; \
  if (!real) real = (__typeof__ (name) *) dlsym (RTLD_NEXT, #name)

/* Write the bytes up to the first page boundary after OFF, if the write
 * spans one. */
static void
partial (int fd, const struct iovec *iov, int iovcnt, off_t off)
{
  static __typeof__ (pwrite) *real_pwrite;
  if (!real_pwrite)
    real_pwrite = (__typeof__ (pwrite) *) dlsym (RTLD_NEXT, "pwrite");
  size_t total = 0;
  for (int i = 0; i < iovcnt; i++)
    total += iov[i].iov_len;
  size_t n = 4096 - (off & 4095);
  if (!torn || total <= 4096 || n >= total)
    return;
  for (int i = 0; i < iovcnt && n > 0; i++) {
    size_t k = iov[i].iov_len < n ? iov[i].iov_len : n;
    if (real_pwrite (fd, iov[i].iov_base, k, off) < 0)
      return;
    off += k;
    n -= k;
  }
}

ssize_t
pwrite (int fd, const void *buf, size_t count, off_t off)
{
  REAL (pwrite);
  if (hit ()) {
    struct iovec v = { (void *) buf, count };
    partial (fd, &v, 1, off);
    die ();
  }
  return real (fd, buf, count, off);
}

ssize_t
pwrite64 (int fd, const void *buf, size_t count, off_t off)
{
  return pwrite (fd, buf, count, off);
}

ssize_t
pwritev (int fd, const struct iovec *iov, int iovcnt, off_t off)
{
  REAL (pwritev);
  if (hit ()) {
    partial (fd, iov, iovcnt, off);
    die ();
  }
  return real (fd, iov, iovcnt, off);
}

ssize_t
pwritev64 (int fd, const struct iovec *iov, int iovcnt, off_t off)
{
  return pwritev (fd, iov, iovcnt, off);
}

int
fdatasync (int fd)
{
  REAL (fdatasync);
  if (hit ())
    die ();
  return real (fd);
}

int
fsync (int fd)
{
  REAL (fsync);
  if (hit ())
    die ();
  return real (fd);
}

int
fallocate (int fd, int mode, off_t off, off_t len)
{
  REAL (fallocate);
  if (hit ())
    die ();
  return real (fd, mode, off, len);
}

int
fallocate64 (int fd, int mode, off_t off, off_t len)
{
  return fallocate (fd, mode, off, len);
}

int
ftruncate (int fd, off_t len)
{
  REAL (ftruncate);
  if (hit ())
    die ();
  return real (fd, len);
}

int
ftruncate64 (int fd, off_t len)
{
  return ftruncate (fd, len);
}

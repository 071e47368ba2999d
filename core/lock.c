/* SPDX-License-Identifier: BSD-3-Clause */
/* lock.c - image locking compatible with QEMU (see lock.h for the layout
 * and the states).  Pure functions over a file descriptor; the core
 * reaches them through backend_lock (backend.c), for local files only. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* F_OFD_SETLK, F_OFD_GETLK */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "lock.h"

/* QEMU's block-layer permissions (include/block/block-common.h): bit n
 * is advertised at byte PERM_BASE + n and unshared at SHARED_BASE + n. */
enum {
  PERM_CONSISTENT_READ = 1 << 0,
  PERM_WRITE = 1 << 1,
  PERM_WRITE_UNCHANGED = 1 << 2,
  PERM_RESIZE = 1 << 3,
  PERM_COUNT = 4,
};
static const char *const perm_name[PERM_COUNT] = {
  "consistent read", "write", "write unchanged", "resize",
};
#define PERM_BASE 100           /* RAW_LOCK_PERM_BASE */
#define SHARED_BASE 200         /* RAW_LOCK_SHARED_BASE */

/* A state: the permissions held and the ones not shared. */
struct perms {
  unsigned held, unshared;
};

/* qcow2 on a file, as QEMU 7.2 sets it up: the format driver needs
 * consistent read, plus write and resize when writable (it grows the
 * file), shares write-unchanged, and never shares write or resize (two
 * writers of one qcow2 image would corrupt its metadata).  An external
 * data file holds the same permissions but unshares resize only. */
static const struct perms state_perms[] = {
  [QCOW_LOCK_NONE] = { 0, 0 },
  [QCOW_LOCK_READ] = {
    PERM_CONSISTENT_READ, PERM_WRITE | PERM_RESIZE },
  [QCOW_LOCK_WRITE] = {
    PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, PERM_WRITE | PERM_RESIZE },
  [QCOW_LOCK_DATA_READ] = {
    PERM_CONSISTENT_READ, PERM_RESIZE },
  [QCOW_LOCK_DATA_WRITE] = {
    PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, PERM_RESIZE },
};
#define NR_STATES (sizeof state_perms / sizeof state_perms[0])

static void __attribute__ ((format (printf, 4, 5)))
message (char *errbuf, size_t errlen, const char *filename, const char *fmt, ...)
{
  if (!errbuf || errlen == 0)
    return;
  int n = filename ? snprintf (errbuf, errlen, "%s: ", filename) : 0;
  if (n < 0 || (size_t) n >= errlen)
    return;
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (errbuf + n, errlen - n, fmt, ap);
  va_end (ap);
}

/* Set (F_RDLCK) or drop (F_UNLCK) an OFD lock on LEN bytes at START. */
static int
set_lock (int fd, off_t start, off_t len, short type)
{
  struct flock fl = {
    .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len,
  };
  int r;
  do
    r = fcntl (fd, F_OFD_SETLK, &fl);
  while (r == -1 && errno == EINTR);
  return r == -1 ? -errno : 0;
}

/* 0 if nobody else has locked BYTE, -EAGAIN if somebody has. */
static int
test_lock (int fd, off_t byte)
{
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };
  if (fcntl (fd, F_OFD_GETLK, &fl) == -1)
    return -errno;
  return fl.l_type == F_UNLCK ? 0 : -EAGAIN;
}

/* Read-lock the bytes of P (those already held are locked again, which
 * is a no-op). */
static int
lock_bytes (int fd, const struct perms *p, off_t *failed)
{
  for (int i = 0; i < PERM_COUNT; i++) {
    for (int shared = 0; shared <= 1; shared++) {
      unsigned set = shared ? p->unshared : p->held;
      off_t byte = (shared ? SHARED_BASE : PERM_BASE) + i;
      int r;
      if ((set & (1u << i)) && (r = set_lock (fd, byte, 1, F_RDLCK)) < 0) {
        *failed = byte;
        return r;
      }
    }
  }
  return 0;
}

/* Unlock the bytes of the FROM state that the TO state does not have. */
static void
unlock_bytes (int fd, const struct perms *from, const struct perms *to)
{
  for (int i = 0; i < PERM_COUNT; i++) {
    unsigned bit = 1u << i;
    if ((from->held & bit) && !(to->held & bit))
      set_lock (fd, PERM_BASE + i, 1, F_UNLCK);
    if ((from->unshared & bit) && !(to->unshared & bit))
      set_lock (fd, SHARED_BASE + i, 1, F_UNLCK);
  }
}

/* Whether P can be held next to everybody else's locks (QEMU's
 * raw_check_lock_bytes, with the same wording). */
static int
check_conflicts (int fd, const struct perms *p, const char *filename,
                 char *errbuf, size_t errlen)
{
  static const char hint[] =
    "Is another process using the image (QEMU or another nbdkit)?";
  for (int shared = 0; shared <= 1; shared++) {
    for (int i = 0; i < PERM_COUNT; i++) {
      /* Held: nobody may have unshared it.  Unshared: nobody may hold it. */
      unsigned set = shared ? p->unshared : p->held;
      off_t byte = (shared ? PERM_BASE : SHARED_BASE) + i;
      if (!(set & (1u << i)))
        continue;
      int r = test_lock (fd, byte);
      if (r == -EAGAIN)
        message (errbuf, errlen, filename, "Failed to get %s\"%s\" lock: %s",
                 shared ? "shared " : "", perm_name[i], hint);
      else if (r < 0)
        message (errbuf, errlen, filename, "testing lock byte %d: %s",
                 (int) byte, strerror (-r));
      if (r < 0)
        return r;
    }
  }
  return 0;
}

int
qcow_lock_change (int fd, const char *filename,
                  enum qcow_lock from_state, enum qcow_lock to_state,
                  char *errbuf, size_t errlen)
{
  if ((unsigned) from_state >= NR_STATES || (unsigned) to_state >= NR_STATES) {
    message (errbuf, errlen, filename, "invalid lock state");
    return -EINVAL;
  }
  const struct perms *from = &state_perms[from_state];
  const struct perms *to = &state_perms[to_state];
  if (!(to->held & ~from->held) && !(to->unshared & ~from->unshared)) {
    /* Only giving up permissions cannot conflict (QEMU does not check). */
    unlock_bytes (fd, from, to);
    return 0;
  }
  struct perms both = {
    from->held | to->held, from->unshared | to->unshared
  };
  off_t byte = 0;
  int r = lock_bytes (fd, &both, &byte);
  if (r == -EINVAL && byte == PERM_BASE) {
    /* The first call: the kernel has no OFD locks (before Linux 3.15). */
    message (errbuf, errlen, filename,
             "not locked: the kernel does not support OFD locks");
    return 1;
  }
  if (r == -ENOLCK || r == -EOPNOTSUPP || r == -ENOSYS) {
    unlock_bytes (fd, &both, from);
    message (errbuf, errlen, filename,
             "not locked: the file system does not support locks (%s)",
             strerror (-r));
    return 1;
  }
  if (r < 0)
    message (errbuf, errlen, filename, "Failed to lock byte %d: %s",
             (int) byte, r == -EAGAIN || r == -EACCES
             ? "Is another process using the image?" : strerror (-r));
  else
    r = check_conflicts (fd, to, filename, errbuf, errlen);
  unlock_bytes (fd, &both, r < 0 ? from : to);
  return r;
}

int
qcow_lock_image (int fd, const char *filename, bool write,
                 char *errbuf, size_t errlen)
{
  return qcow_lock_change (fd, filename, QCOW_LOCK_NONE,
                           write ? QCOW_LOCK_WRITE : QCOW_LOCK_READ,
                           errbuf, errlen);
}

int
qcow_lock_upgrade (int fd, const char *filename, char *errbuf, size_t errlen)
{
  return qcow_lock_change (fd, filename, QCOW_LOCK_READ, QCOW_LOCK_WRITE,
                           errbuf, errlen);
}

void
qcow_unlock_image (int fd)
{
  static const struct perms all = { (1u << PERM_COUNT) - 1, (1u << PERM_COUNT) - 1 };
  unlock_bytes (fd, &all, &state_perms[QCOW_LOCK_NONE]);
}

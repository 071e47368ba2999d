/* SPDX-License-Identifier: BSD-3-Clause */
/* lock.h - image locking compatible with QEMU (internal to the core).
 *
 * QEMU's file driver (block/file-posix.c) advertises, with open file
 * description (OFD) read locks on single bytes of the image file, which
 * block-layer permissions a process holds and which it refuses to share:
 *
 *   byte 100 + n   "I hold permission n"
 *   byte 200 + n   "nobody else may hold permission n"
 *
 *   n = 0 consistent read, 1 write, 2 write unchanged, 3 resize
 *
 * A process taking permission n first read-locks byte 100 + n, then fails
 * if anybody else holds a lock on byte 200 + n; unsharing n read-locks
 * byte 200 + n and fails if anybody else holds byte 100 + n.  (Taking the
 * locks before testing means two racing openers cannot both win.)  Only
 * read locks are ever set; a conflict is found with F_OFD_GETLK for a
 * write lock, which ignores the caller's own open file description.
 *
 * The states below are exactly what QEMU 7.2 holds (checked in
 * /proc/locks against qemu-io, qemu-io -r and qemu-nbd):
 *
 *   qcow2 image read-write (qemu-io, qemu-nbd, a VM):  100 101 103  201 203
 *   qcow2 image read-only (qemu-io -r), backing file:  100          201 203
 *   external data file of a read-write image:          100 101 103      203
 *   external data file of a read-only image:           100              203
 *
 * so QEMU's tools and these functions see each other exactly as two QEMU
 * processes would: a qcow2 writer excludes every other user that does not
 * force sharing (qemu-img info -U, qemu-io -r -U); a reader excludes
 * writers only.
 *
 * OFD locks belong to the open file description: they survive fork (nbdkit
 * forking into the background), are not lost when another descriptor of
 * the same file is closed, and conflict between two descriptions opened by
 * the same process.  They are released when the last descriptor referring
 * to the description is closed.
 *
 * Messages: on failure ERRBUF receives one line, prefixed with "FILENAME: "
 * if FILENAME is not NULL (the core passes NULL: ERR() adds the prefix).
 */
#ifndef QCOW_LOCK_H
#define QCOW_LOCK_H

#include <stdbool.h>
#include <stddef.h>

/* What a process holds on one file. */
enum qcow_lock {
  QCOW_LOCK_NONE,
  QCOW_LOCK_READ,               /* qcow2 image read-only; backing files */
  QCOW_LOCK_WRITE,              /* qcow2 image read-write */
  QCOW_LOCK_DATA_READ,          /* external data file, image read-only */
  QCOW_LOCK_DATA_WRITE,         /* external data file, image read-write */
};

/* Move FD from state FROM (what this description holds now) to state TO:
 * lock what TO adds, fail if another process holds a conflicting lock,
 * then drop what TO does not need (QEMU's prepare / commit / abort).
 * FD may be read-only even for a write state: only read locks are set.
 *
 * Returns 0 when FD is in state TO; 1 when locking is not available for
 * this file (no OFD locks in the kernel, or the file system refuses
 * locks): FD is left in state FROM, ERRBUF says why, and the caller
 * should carry on unlocked (as QEMU's default locking=auto does);
 * -EAGAIN when another process holds a conflicting lock; another -errno
 * if fcntl failed.  On failure FD is left in state FROM. */
int qcow_lock_change (int fd, const char *filename,
                      enum qcow_lock from, enum qcow_lock to,
                      char *errbuf, size_t errlen);

/* Lock a qcow2 image right after open, as QEMU's qcow2 driver locks an
 * image it opens read-write (WRITE) or read-only: qcow_lock_change from
 * QCOW_LOCK_NONE to QCOW_LOCK_WRITE or QCOW_LOCK_READ. */
int qcow_lock_image (int fd, const char *filename, bool write,
                     char *errbuf, size_t errlen);

/* Turn the read-only locks of an image into the read-write ones, as QEMU
 * does when it reopens a read-only image read-write: qcow_lock_change
 * from QCOW_LOCK_READ to QCOW_LOCK_WRITE.  Fails (-EAGAIN) if another
 * process holds, or refuses to share, the write or resize permission,
 * and then leaves the read-only locks in place.  Calling it again once it
 * has succeeded is harmless. */
int qcow_lock_upgrade (int fd, const char *filename,
                       char *errbuf, size_t errlen);

/* Drop every lock these functions took on FD, whatever its state (close()
 * does too, once no other descriptor refers to the same description). */
void qcow_unlock_image (int fd);

#endif /* QCOW_LOCK_H */

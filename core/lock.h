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
 * These functions hold exactly what QEMU 7.2 holds on a qcow2 image:
 *
 *   read-write (qemu-io, qemu-nbd, a VM):   bytes 100 101 103  201 203
 *   read-only (qemu-io -r, a backing file): bytes 100          201 203
 *
 * so QEMU's tools and these functions see each other exactly as two QEMU
 * processes would: a writer excludes every other user that does not force
 * sharing (qemu-img info -U, qemu-io -U); a reader excludes writers only.
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

/* Check for conflicts and lock FD the way QEMU's qcow2 driver locks an
 * image it opens read-write (WRITE) or read-only.  Call it right after
 * open, before reading the header.  FD may be read-only even for WRITE
 * (only read locks are taken).
 *
 * Returns 0 when locked; 1 when locking is not available for this file
 * (no OFD locks in the kernel, or the file system refuses locks): nothing
 * is locked, ERRBUF says why, and the caller should carry on (as QEMU's
 * default locking=auto does); -EAGAIN when another process holds a
 * conflicting lock; another -errno if fcntl failed.  On failure nothing
 * stays locked. */
int qcow_lock_image (int fd, const char *filename, bool write,
                     char *errbuf, size_t errlen);

/* Turn the read-only locks taken by qcow_lock_image (WRITE false) into the
 * read-write ones, as QEMU does when a read-only node is reopened
 * read-write.  Fails (-EAGAIN) if another process holds or has unshared
 * the write or resize permission, and then leaves the read-only locks in
 * place.  Same return values as qcow_lock_image; calling it again once it
 * has succeeded is harmless. */
int qcow_lock_upgrade (int fd, const char *filename,
                       char *errbuf, size_t errlen);

/* Drop every lock these functions took on FD (close() does too, once no
 * other descriptor refers to the same open file description). */
void qcow_unlock_image (int fd);

#endif /* QCOW_LOCK_H */

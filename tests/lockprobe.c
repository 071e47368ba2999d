/* SPDX-License-Identifier: BSD-3-Clause */
/* lockprobe - hold an image the way the core locks it, to try QEMU's tools
 * against it.
 *
 *   lockprobe ro|rw|data-ro|data-rw FILE
 *
 * Opens FILE (read-write for rw, read-only for ro), locks it as a qcow2
 * image (qcow_lock_image) or as the external data file of one
 * (qcow_lock_change), and prints "locked MODE" (or "not locked: WHY" when
 * the file cannot be locked at all).  Then it obeys commands, one per line
 * on stdin, answering each with one line on stdout:
 *
 *   upgrade    read-only to read-write (qcow_lock_upgrade for an image):
 *              "upgraded" or "failed: MESSAGE"
 *   downgrade  read-write to read-only (qcow_lock_change): "downgraded"
 *   unlock     qcow_unlock_image: "unlocked"
 *
 * and at the end of stdin sleeps, holding the file, until it is killed.
 * If the first locking fails it prints the message on stderr and exits
 * with status 1 (status 2 for usage and open errors).
 *
 * Build without the rest of the core:
 *   gcc -Wall -Wextra -Werror -Icore -o lockprobe tests/lockprobe.c core/lock.c
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "lock.h"

int
main (int argc, char **argv)
{
  static const char *const modes[] = { "ro", "rw", "data-ro", "data-rw" };
  int mode = -1;
  for (int i = 0; argc == 3 && i < 4; i++)
    if (strcmp (argv[1], modes[i]) == 0)
      mode = i;
  if (mode == -1) {
    fprintf (stderr, "usage: lockprobe ro|rw|data-ro|data-rw FILE\n");
    return 2;
  }
  bool write = mode & 1, data = mode & 2;
  const char *file = argv[2];
  int fd = open (file, (write ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd == -1) {
    fprintf (stderr, "lockprobe: %s: %s\n", file, strerror (errno));
    return 2;
  }

  char msg[512];
  int r;
  if (data)
    r = qcow_lock_change (fd, file, QCOW_LOCK_NONE,
                          write ? QCOW_LOCK_DATA_WRITE : QCOW_LOCK_DATA_READ,
                          msg, sizeof msg);
  else
    r = qcow_lock_image (fd, file, write, msg, sizeof msg);
  if (r < 0) {
    fprintf (stderr, "%s\n", msg);
    return 1;
  }
  if (r > 0)
    printf ("%s\n", msg);
  else
    printf ("locked %s\n", argv[1]);
  fflush (stdout);

  char line[64];
  while (fgets (line, sizeof line, stdin)) {
    line[strcspn (line, "\n")] = '\0';
    if (strcmp (line, "upgrade") == 0) {
      if (data)
        r = qcow_lock_change (fd, file, QCOW_LOCK_DATA_READ,
                              QCOW_LOCK_DATA_WRITE, msg, sizeof msg);
      else
        r = qcow_lock_upgrade (fd, file, msg, sizeof msg);
      if (r < 0)
        printf ("failed: %s\n", msg);
      else
        printf ("upgraded\n");
    }
    else if (strcmp (line, "downgrade") == 0) {
      enum qcow_lock ro = data ? QCOW_LOCK_DATA_READ : QCOW_LOCK_READ;
      enum qcow_lock rw = data ? QCOW_LOCK_DATA_WRITE : QCOW_LOCK_WRITE;
      r = qcow_lock_change (fd, file, rw, ro, msg, sizeof msg);
      if (r < 0)
        printf ("failed: %s\n", msg);
      else
        printf ("downgraded\n");
    }
    else if (strcmp (line, "unlock") == 0) {
      qcow_unlock_image (fd);
      printf ("unlocked\n");
    }
    else
      printf ("unknown command: %s\n", line);
    fflush (stdout);
  }
  for (;;)
    pause ();
}

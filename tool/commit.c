/* SPDX-License-Identifier: BSD-3-Clause */
/* commit.c - qcow-tool commit: write an overlay's data into its backing
 * file and empty it, as qemu-img commit does (qcow_commit).
 *
 *   qcow-tool commit [-d] [-p|--progress] FILE
 *
 * -d keeps the overlay's data (qemu-img commit -d); without it the
 * emptied overlay is compacted, so its file shrinks.  The backing file may
 * be qcow2 or raw; it grows to the overlay's size if smaller.  Both files
 * are locked for writing: if QEMU or nbdkit has either open, nothing is
 * changed.
 */
#include <getopt.h>
#include <stdio.h>
#include <unistd.h>

#include "qcow.h"
#include "tool.h"

int
cmd_commit (int argc, char **argv)
{
  static const struct option opts[] = {
    { "progress", no_argument, NULL, 'p' },
    { NULL, 0, NULL, 0 },
  };
  bool keep = false, progress = false;
  int c;
  while ((c = getopt_long (argc, argv, "dp", opts, NULL)) != -1) {
    switch (c) {
    case 'd': keep = true; break;
    case 'p': progress = true; break;
    default: return 1;
    }
  }
  if (argc - optind != 1)
    return usage_error ("commit", "expected FILE");
  const char *file = argv[optind];

  struct qcow *q = open_image (file, true, false, NULL);
  if (!q)
    return 1;
  int last = -1;
  bool bar = progress && isatty (2);
  int r = qcow_commit (q, keep, bar ? progress_bar : NULL, &last);
  /* An emptied image holds little: give the file's space back too. */
  struct qcow_compact_result res;
  if (r == 0 && !keep)
    r = qcow_compact (q, NULL, NULL, &res);
  if (r < 0 && bar && last >= 0)
    fputc ('\n', stderr);
  if (qcow_disconnect (q) < 0 || r < 0)
    return 1;
  printf ("Image committed.\n");
  return flush_stdout ();
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* qcow-example - a tour of the qcow2 library (qcow.h, -lqcow).
 *
 *   cc qcow-example.c $(pkg-config --cflags --libs qcow) -o qcow-example
 *   ./qcow-example test.qcow2
 *
 * Creates a 64 MiB image at FILE (replacing it), writes to it, reads the
 * data back, discards part of it, compacts the file with a progress
 * callback, disconnects and checks the image.  Every step is verified;
 * the exit status is 0 if all went as expected, 1 otherwise.  The image
 * is left behind: qemu-img check FILE agrees that it is clean.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qcow.h>

#define MiB (UINT64_C (1) << 20)
#define DISK_SIZE (64 * MiB)
#define CHUNK (4 * MiB)

static int failures;

/* Report a failed expectation and carry on (so one run shows them all). */
#define EXPECT(cond, ...)                                               \
  do {                                                                  \
    if (!(cond)) {                                                      \
      fprintf (stderr, "qcow-example: FAIL: " __VA_ARGS__);             \
      fputc ('\n', stderr);                                             \
      failures++;                                                       \
    }                                                                   \
  } while (0)

/* The byte written at guest offset OFF: recognisable, never zero. */
static uint8_t
pattern (uint64_t off)
{
  return (uint8_t) (1 + (off * 7 + (off >> 16)) % 251);
}

static void
fill (uint8_t *buf, size_t len, uint64_t off)
{
  for (size_t i = 0; i < len; i++)
    buf[i] = pattern (off + i);
}

/* Does the guest range [OFF, OFF+LEN) read back as the pattern (or as
 * zeros, with ZEROS)? */
static bool
verify (struct qcow *q, uint64_t off, size_t len, bool zeros)
{
  uint8_t *buf = malloc (len);
  bool ok = buf != NULL && qcow_read (q, buf, len, off) == 0;
  for (size_t i = 0; ok && i < len; i++)
    ok = buf[i] == (zeros ? 0 : pattern (off + i));
  free (buf);
  return ok;
}

static int
write_pattern (struct qcow *q, uint64_t off, size_t len)
{
  uint8_t *buf = malloc (len);
  if (buf == NULL)
    return -1;
  fill (buf, len, off);
  int r = qcow_write (q, buf, len, off, 0);
  free (buf);
  return r;
}

/* Compaction progress: percentages never go backwards. */
struct progress {
  int calls, last;
};

static void
on_progress (int percent, void *opaque)
{
  struct progress *p = opaque;
  if (percent < p->last || percent > 100)
    fprintf (stderr, "qcow-example: progress went from %d%% to %d%%\n",
             p->last, percent);
  else
    p->last = percent;
  p->calls++;
  printf ("  compacting: %d%%\n", percent);
}

int
main (int argc, char **argv)
{
  if (argc != 2) {
    fprintf (stderr, "usage: qcow-example FILE\n");
    return 1;
  }
  const char *file = argv[1];
  printf ("libqcow %s\n", QCOW_LIB_VERSION);

  /* Create: a 64 MiB image with the defaults (v3, 64 KiB clusters). */
  struct qcow_create_opts opts;
  qcow_create_opts_default (&opts);
  opts.size = DISK_SIZE;
  if (qcow_create (file, &opts, true) < 0)
    return 1;                   /* the library has printed why */

  /* Connect (open) it read-write. */
  struct qcow_config cfg;
  struct qcow *q;
  qcow_config_default (&cfg);
  if (qcow_connect (file, &cfg, &q) < 0)
    return 1;
  struct qcow_info info;
  qcow_get_info (q, &info);
  printf ("created %s: %" PRIu64 " bytes, %" PRIu32 " byte clusters\n",
          file, info.size, info.cluster_size);
  EXPECT (info.size == DISK_SIZE, "virtual size %" PRIu64, info.size);
  EXPECT (info.read_write, "opened read-only");

  /* Write: three 4 MiB chunks at 0, 8 and 56 MiB, and a few bytes at an
   * odd offset.  A fresh image reads as zeros everywhere else. */
  const uint64_t chunks[] = { 0, 8 * MiB, 56 * MiB };
  for (size_t i = 0; i < 3; i++)
    EXPECT (write_pattern (q, chunks[i], CHUNK) == 0,
            "write at %" PRIu64, chunks[i]);
  EXPECT (write_pattern (q, 20 * MiB + 12345, 1000) == 0, "small write");
  EXPECT (qcow_flush (q) == 0, "flush");

  /* Read: the data back, and zeros where nothing was written. */
  for (size_t i = 0; i < 3; i++)
    EXPECT (verify (q, chunks[i], CHUNK, false),
            "data at %" PRIu64 " differs", chunks[i]);
  EXPECT (verify (q, 20 * MiB + 12345, 1000, false), "small write differs");
  EXPECT (verify (q, 4 * MiB, 4 * MiB, true), "unwritten range not zero");
  uint64_t allocated;
  EXPECT (qcow_allocated_bytes (q, &allocated) == 0 &&
          allocated >= 3 * CHUNK, "allocated %" PRIu64, allocated);
  printf ("wrote and read back %" PRIu64 " bytes\n", 3 * CHUNK + 1000);

  /* Discard the first two chunks: they read as zeros again, and their
   * clusters become free space inside the file. */
  for (size_t i = 0; i < 2; i++)
    EXPECT (qcow_discard (q, CHUNK, chunks[i], 0) == 0,
            "discard at %" PRIu64, chunks[i]);
  EXPECT (qcow_flush (q) == 0, "flush");
  for (size_t i = 0; i < 2; i++)
    EXPECT (verify (q, chunks[i], CHUNK, true),
            "discarded range at %" PRIu64 " not zero", chunks[i]);
  EXPECT (verify (q, chunks[2], CHUNK, false), "kept chunk differs");
  uint64_t after_discard;
  EXPECT (qcow_allocated_bytes (q, &after_discard) == 0 &&
          after_discard <= allocated - 2 * CHUNK,
          "allocated after discard %" PRIu64, after_discard);
  printf ("discarded %" PRIu64 " bytes\n", 2 * CHUNK);

  /* Compact: the last chunk moves down into the holes and the file is
   * truncated.  The data must not change. */
  struct progress progress = { 0, 0 };
  struct qcow_compact_result res;
  EXPECT (qcow_compact (q, on_progress, &progress, &res) == 0, "compact");
  printf ("compacted: %" PRIu64 " sectors copied, file %" PRIu64
          " -> %" PRIu64 " sectors\n", res.copied, res.old_size, res.new_size);
  EXPECT (progress.calls > 0 && progress.last == 100,
          "progress: %d calls, last %d%%", progress.calls, progress.last);
  EXPECT (res.copied > 0, "nothing was moved");
  EXPECT (res.new_size < res.old_size, "the file did not shrink");
  EXPECT (verify (q, chunks[2], CHUNK, false), "data differs after compact");
  EXPECT (verify (q, 20 * MiB + 12345, 1000, false),
          "small write differs after compact");
  EXPECT (verify (q, 0, 8 * MiB, true), "zeros differ after compact");

  /* Disconnect: flush, mark the image clean, close. */
  EXPECT (qcow_disconnect (q) == 0, "disconnect");

  /* Check: recount every reference in the closed file. */
  struct qcow_check_result check;
  EXPECT (qcow_check_file (file, &check, NULL, NULL) == 0,
          "check could not run: %s", check.reason);
  EXPECT (check.verdict == QCOW_CHECK_CLEAN,
          "check: verdict %d, %" PRIu64 " corruptions, %" PRIu64 " leaks",
          (int) check.verdict, check.corruptions, check.leaks);
  printf ("check: %s, %" PRIu64 " of %" PRIu64 " guest clusters allocated\n",
          check.verdict == QCOW_CHECK_CLEAN ? "clean" : "NOT CLEAN",
          check.allocated_clusters, check.total_clusters);

  if (failures) {
    fprintf (stderr, "qcow-example: %d failures\n", failures);
    return 1;
  }
  printf ("all done\n");
  return 0;
}

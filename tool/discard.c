/* SPDX-License-Identifier: BSD-3-Clause */
/* discard.c - qcow-tool discard: give back the clusters that read as
 * zeros (the OCaml qcow-tool's discard).
 *
 *   qcow-tool discard [--json] [--compact] [-p|--progress] FILE
 *
 * Every cluster the image itself stores (data, compressed, or zero
 * clusters that keep their space) is read; those that read as all zeros
 * are discarded, so the image reads the same and the space is freed
 * (and punched out of the file).  With a backing file the discarded
 * clusters get the zero flag, so the backing file does not show through
 * (a version 2 image has no zero flag: nothing can be discarded there).
 * --compact then moves clusters down and truncates the file, as
 * qcow-tool compact does.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow.h"
#include "tool.h"

/* What the image stores of the cluster at OFF (N bytes): anything at all
 * (*STORED), and only zero clusters (*ZERO) that keep their space. */
static int
cluster_state (struct qcow *q, uint64_t off, uint64_t n, bool *stored, bool *zero)
{
  *stored = false;
  *zero = true;
  for (uint64_t o = off; o < off + n;) {
    uint64_t len, host;
    unsigned f;
    if (qcow_map_layer (q, o, off + n - o, &len, &f, &host) < 0)
      return -1;
    *stored |= (f & (QCOW_LAYER_DATA | QCOW_LAYER_OFFSET)) != 0;
    *zero &= (f & QCOW_LAYER_ZERO) != 0;
    o += len;
  }
  return 0;
}

int
cmd_discard (int argc, char **argv)
{
  enum { OPT_COMPACT = 256 };
  static const struct option opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "compact", no_argument, NULL, OPT_COMPACT },
    { "progress", no_argument, NULL, 'p' },
    { NULL, 0, NULL, 0 },
  };
  bool json = false, compact = false, progress = false;
  int c;
  while ((c = getopt_long (argc, argv, "p", opts, NULL)) != -1) {
    switch (c) {
    case 'j': json = true; break;
    case OPT_COMPACT: compact = true; break;
    case 'p': progress = true; break;
    default: return 1;
    }
  }
  if (argc - optind != 1)
    return usage_error ("discard", "expected FILE");
  const char *file = argv[optind];

  struct qcow *q = open_image (file, true, false, NULL);
  if (!q)
    return 1;
  struct qcow_info info;
  struct qcow_header h;
  qcow_get_info (q, &info);
  qcow_get_header (q, &h);
  int r = qcow_lock_write (q);
  bool v2_backing = h.version < 3 && h.backing_file[0];
  const uint64_t cs = info.cluster_size;
  uint64_t discarded = 0, examined = 0;
  uint8_t *buf = malloc (cs);
  struct progress pr;
  progress_start (&pr, progress && r == 0, info.size);
  if (!buf)
    r = -1;
  /* Runs of zero clusters are discarded together: [zstart, zend). */
  uint64_t zstart = 0, zend = 0;
  for (uint64_t off = 0; r == 0 && !v2_backing && off < info.size;) {
    uint64_t len, host;
    unsigned f;
    if ((r = qcow_map_layer (q, off, info.size - off, &len, &f, &host)) < 0)
      break;
    if (!(f & (QCOW_LAYER_DATA | QCOW_LAYER_OFFSET))) {
      off += len;               /* nothing stored here */
      continue;
    }
    uint64_t gc = off / cs;
    for (; r == 0 && gc * cs < off + len; gc++) {
      uint64_t n = info.size - gc * cs < cs ? info.size - gc * cs : cs;
      bool stored = true, zero = (f & QCOW_LAYER_ZERO) != 0;
      /* A cluster wholly in the run maps as the run does; one across
       * its edges is looked at piece by piece. */
      if ((gc * cs < off || gc * cs + n > off + len) &&
          (r = cluster_state (q, gc * cs, n, &stored, &zero)) < 0)
        break;
      if (!stored)
        continue;
      if (!zero) {
        if ((r = qcow_read (q, buf, n, gc * cs)) < 0)
          break;
        zero = is_zero (buf, n);
      }
      examined++;
      if (!zero)
        continue;
      if (zend != gc * cs) {
        if (zend > zstart && (r = qcow_discard (q, zend - zstart, zstart, 0)) < 0)
          break;
        zstart = gc * cs;
      }
      zend = gc * cs + n;
      discarded++;
    }
    off = gc * cs;
    progress_update (&pr, off);
  }
  if (r == 0 && zend > zstart)
    r = qcow_discard (q, zend - zstart, zstart, 0);
  if (r == 0)
    r = qcow_flush (q);
  progress_end (&pr);
  struct qcow_compact_result cres = { 0 };
  if (r == 0 && compact)
    r = qcow_compact (q, NULL, NULL, &cres);
  free (buf);
  if (qcow_disconnect (q) < 0 || r < 0)
    return 1;
  if (v2_backing)
    fail ("%s: a version 2 image with a backing file has no zero flag: "
          "nothing can be discarded", file);
  if (json) {
    printf ("{ \"filename\": ");
    json_string (stdout, file);
    printf (", \"clusters-examined\": %" PRIu64 ", \"clusters-discarded\": %"
            PRIu64 ", \"bytes-discarded\": %" PRIu64, examined, discarded,
            discarded * cs);
    if (compact)
      printf (", \"file-size-before\": %" PRIu64 ", \"file-size-after\": %" PRIu64,
              cres.old_size * 512, cres.new_size * 512);
    printf (" }\n");
  }
  else {
    printf ("examined: %" PRIu64 " clusters\ndiscarded: %" PRIu64
            " clusters (%" PRIu64 " bytes)\n", examined, discarded, discarded * cs);
    if (compact)
      printf ("file size: %" PRIu64 " -> %" PRIu64 " bytes\n",
              cres.old_size * 512, cres.new_size * 512);
  }
  return flush_stdout ();
}

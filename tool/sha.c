/* SPDX-License-Identifier: BSD-3-Clause */
/* sha.c - qcow-tool sha: the SHA-256 of the virtual disk (what
 * `qemu-img convert -O raw FILE - | sha256sum` gives), without writing
 * it anywhere.
 *
 *   qcow-tool sha [--json] [-l SNAPSHOT] [-U] [-p|--progress] FILE
 *
 * Runs the image maps as zeros (unallocated, zero clusters, holes of the
 * backing chain) are not read: zeros are hashed from memory.  Data is
 * read (and decompressed) by one worker per CPU while the main thread
 * hashes in order (pipeline.c), with the CPU's SHA instructions where it
 * has them.  Output: "DIGEST  FILE", as sha256sum prints it.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow.h"
#include "tool.h"

#define CHUNK (4u << 20)

struct sha {
  struct qcow *q;
  uint64_t size, pos;
  struct sha256 ctx;
  struct progress pr;
};

static const uint8_t zeros[1 << 16];

static int
next (void *opaque, struct job *j)
{
  struct sha *s = opaque;
  if (s->pos >= s->size)
    return 0;
  uint64_t len;
  unsigned flags;
  if (qcow_map (s->q, s->pos, s->size - s->pos, &len, &flags) < 0)
    return -1;
  j->start = s->pos;
  j->zero = flags & QCOW_EXTENT_ZERO;
  j->len = j->zero || len < CHUNK ? len : CHUNK;
  s->pos += j->len;
  return 0;
}

static int
work (void *opaque, struct job *j)
{
  struct sha *s = opaque;
  return qcow_read (s->q, j->in, j->len, j->start) < 0 ? -1 : 0;
}

static int
done (void *opaque, struct job *j)
{
  struct sha *s = opaque;
  if (!j->zero)
    sha256_update (&s->ctx, j->in, j->len);
  else
    for (uint64_t n = 0; n < j->len; ) {
      uint64_t k = j->len - n < sizeof zeros ? j->len - n : sizeof zeros;
      sha256_update (&s->ctx, zeros, k);
      n += k;
      if ((n & ((1u << 28) - 1)) == 0)
        progress_update (&s->pr, j->start + n);
    }
  progress_update (&s->pr, j->start + j->len);
  return 0;
}

int
cmd_sha (int argc, char **argv)
{
  static const struct option opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "snapshot", required_argument, NULL, 'l' },
    { "force-share", no_argument, NULL, 'U' },
    { "progress", no_argument, NULL, 'p' },
    { NULL, 0, NULL, 0 },
  };
  bool json = false, force_share = false, progress = false;
  const char *snapshot = NULL;
  int c;
  while ((c = getopt_long (argc, argv, "l:Up", opts, NULL)) != -1) {
    switch (c) {
    case 'j': json = true; break;
    case 'l': snapshot = optarg; break;
    case 'U': force_share = true; break;
    case 'p': progress = true; break;
    default: return 1;
    }
  }
  if (argc - optind != 1)
    return usage_error ("sha", "expected FILE");
  const char *file = argv[optind];

  struct sha s;
  memset (&s, 0, sizeof s);
  if (!(s.q = open_image (file, false, force_share, snapshot)))
    return 1;
  struct qcow_info info;
  qcow_get_info (s.q, &info);
  s.size = info.size;
  sha256_init (&s.ctx);
  progress_start (&s.pr, progress, s.size);
  int r = pipeline_run (&s, CHUNK, CHUNK, false, next, work, done);
  if (r == 0)
    progress_end (&s.pr);
  qcow_disconnect (s.q);
  if (r < 0)
    return 1;
  uint8_t d[32];
  char hex[65];
  sha256_final (&s.ctx, d);
  for (int i = 0; i < 32; i++)
    snprintf (hex + 2 * i, 3, "%02x", d[i]);
  if (json) {
    printf ("{ \"filename\": ");
    json_string (stdout, file);
    printf (", \"virtual-size\": %" PRIu64 ", \"sha256\": \"%s\" }\n", s.size, hex);
  }
  else {
    printf ("%s  ", hex);
    text_string (stdout, file);
    putchar ('\n');
  }
  return flush_stdout ();
}

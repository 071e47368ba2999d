/* SPDX-License-Identifier: BSD-3-Clause */
/* map.c - qcow-tool map: the layout of a virtual disk, in qemu-img map's
 * two output formats, so that scripts can switch.
 *
 *   qcow-tool map [--output=human|json | --json] [--start-offset=OFF]
 *                 [--max-length=LEN] [-l SNAPSHOT] [-U] FILE
 *
 * For every run of the disk: the layer of the backing chain it comes
 * from (depth 0 is FILE), whether that layer has it (present), whether it
 * reads as zeros or as data, and where it lies in which file.  The walk
 * is QEMU's (qemu-img.c get_block_status, with the block layer's rules):
 * a run unallocated in a layer goes to its backing file, unless it lies
 * past the end of the backing file (then zeros, at this depth) or there
 * is none (zeros, not present); a raw backing file is present everywhere,
 * data where the file has data and zeros in its holes.  Adjacent runs
 * that agree in everything (and whose offsets follow on) are merged.
 *
 * File names are shown as QEMU shows them: a backing file's name from
 * the header, relative to the directory of the image naming it.
 *
 * QEMU looks deeper into an image it takes for metadata-preallocated:
 * one with more clusters in use than the file has blocks allocated (by
 * a ninth, qcow2_detect_metadata_preallocation); there data clusters
 * that are holes in the file read as zeros (the block layer's RECURSE).
 * So does this; an image written sparsely (the plugin leaves the unwritten
 * rest of a new cluster a hole) can look preallocated that way too.
 *
 * The human format lists only the runs holding data; like qemu-img it
 * fails (exit 1) on a compressed cluster, which has no offset.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow.h"
#include "tool.h"

#define MAX_LAYERS 16

struct layer {
  struct qcow *q;               /* a qcow2 layer, or */
  int fd;                       /* a raw one (-1 otherwise) */
  uint64_t size;
  char *name;                   /* as QEMU would show it */
  char *data_name;              /* an external data file's, or NULL */
  int data_fd;                  /* where its data lies, if preallocated */
};

struct entry {
  uint64_t start, length, offset;
  int depth;
  bool present, zero, data, has_offset;
  const char *filename;         /* NULL: none */
};

/* QEMU's path_combine: NAME relative to the directory of BASE. */
static char *
path_combine (const char *base, const char *name)
{
  const char *slash = strrchr (base, '/');
  char *p;
  if (name[0] == '/' || !slash)
    return strdup (name);
  if (asprintf (&p, "%.*s%s", (int) (slash - base + 1), base, name) < 0)
    return NULL;
  return p;
}

/* Is layer Y metadata-preallocated as QEMU sees it?  Then open the file
 * holding its data in Y->data_fd. */
static int
detect_prealloc (struct layer *y)
{
  struct stat st;
  struct qcow_info info;
  uint64_t used;
  qcow_get_info (y->q, &info);
  if (stat (qcow_filename (y->q), &st) == -1) {
    fail ("%s: %s", qcow_filename (y->q), strerror (errno));
    return -1;
  }
  uint64_t real = (uint64_t) st.st_blocks * 512 / info.cluster_size;
  uint64_t threshold = real * 10 / 9 > real + 2 ? real * 10 / 9 : real + 2;
  uint64_t end = ((uint64_t) st.st_size + info.cluster_size - 1) / info.cluster_size;
  if (qcow_used_clusters (y->q, end, threshold, &used) < 0)
    return -1;
  if (used < threshold)
    return 0;
  const char *data = y->data_name ? y->data_name : qcow_filename (y->q);
  y->data_fd = open (data, O_RDONLY | O_CLOEXEC);
  if (y->data_fd == -1) {
    fail ("%s: %s", data, strerror (errno));
    return -1;
  }
  return 0;
}

/* Open the chain below L[0] (whose q is open): fills L[1..], returns the
 * number of layers, or -1. */
static int
open_chain (struct layer *l, const char *file)
{
  int n = 1;
  struct qcow_header h;
  if (!(l[0].name = strdup (file)))
    return -1;
  for (int i = 0; i < MAX_LAYERS - 1; i++) {
    const char *path, *fmt;
    struct qcow *next;
    qcow_get_header (l[i].q, &h);
    if (h.data_file[0] && (h.incompatible_features & QCOW_INCOMPAT_DATA_FILE))
      l[i].data_name = path_combine (l[i].name, h.data_file);
    if (detect_prealloc (&l[i]) < 0)
      return -1;
    if (!qcow_backing_info (l[i].q, &path, &fmt, &next))
      break;
    struct layer *b = &l[i + 1];
    memset (b, 0, sizeof *b);
    b->fd = b->data_fd = -1;
    b->name = path_combine (l[i].name, h.backing_file);
    n++;
    if (next) {
      struct qcow_info info;
      b->q = next;
      qcow_get_info (next, &info);
      b->size = info.size;
      continue;
    }
    b->fd = open (path, O_RDONLY | O_CLOEXEC);
    off_t end = b->fd >= 0 ? lseek (b->fd, 0, SEEK_END) : -1;
    if (end < 0) {
      fail ("%s: %s", path, strerror (errno));
      return -1;
    }
    b->size = end;
    break;
  }
  return n;
}

/* A preallocated layer's data run E: what the file holding it says at
 * its offset (block/io.c, BDRV_BLOCK_RECURSE): holes read as zeros, the
 * run is cut where the file changes, and past the end of the file, or in
 * a hole reaching it, the whole run reads as zeros. */
static void
file_status (int fd, struct entry *e)
{
  off_t size = lseek (fd, 0, SEEK_END);
  if (size < 0)
    return;                     /* errors only lose the extra information */
  uint64_t off = e->offset, len = e->length;
  if (off >= (uint64_t) size) {
    e->zero = true;
    return;
  }
  if (len > (uint64_t) size - off)
    len = size - off;
  off_t data = lseek (fd, off, SEEK_DATA);
  if (data == -1 && errno != ENXIO)
    return;
  if (data == -1 || (uint64_t) data > off) {      /* a hole */
    uint64_t n = data == -1 ? (uint64_t) size - off : (uint64_t) data - off;
    e->zero = true;
    if (n < len)
      e->length = n;            /* else it reaches the end: the whole run */
    return;
  }
  off_t hole = lseek (fd, off, SEEK_HOLE);
  if (hole > (off_t) off && (uint64_t) hole - off < len)
    len = hole - off;
  e->length = len;
}

/* The status of the run at OFFSET (at most BYTES): QEMU's
 * get_block_status over the chain. */
static int
block_status (struct layer *l, int n, uint64_t offset, uint64_t bytes, struct entry *e)
{
  memset (e, 0, sizeof *e);
  e->start = offset;
  for (int d = 0; d < n; d++) {
    struct layer *y = &l[d];
    if (offset >= y->size) {      /* (a layer shorter than the one above) */
      e->depth = d;
      e->zero = true;
      e->length = bytes;
      return 0;
    }
    if (bytes > y->size - offset)
      bytes = y->size - offset;
    e->depth = d;
    if (y->fd >= 0) {             /* raw: data or holes, all present */
      off_t data = lseek (y->fd, offset, SEEK_DATA), hole;
      e->present = e->has_offset = true;
      e->offset = offset;
      e->filename = y->name;
      if (data == -1 && errno != ENXIO) {
        e->data = true;           /* no SEEK_DATA: all data */
      }
      else if (data == -1 || (uint64_t) data > offset) {
        e->zero = true;
        if (data != -1 && (uint64_t) data - offset < bytes)
          bytes = data - offset;
      }
      else {
        e->data = true;
        hole = lseek (y->fd, offset, SEEK_HOLE);
        if (hole > (off_t) offset && (uint64_t) hole - offset < bytes)
          bytes = hole - offset;
      }
      e->length = bytes;
      return 0;
    }
    uint64_t len, host;
    unsigned f;
    if (qcow_map_layer (y->q, offset, bytes, &len, &f, &host) < 0)
      return -1;
    bytes = len;
    e->length = len;
    if (f & QCOW_LAYER_OFFSET) {
      e->has_offset = true;
      e->offset = host;
      e->filename = y->data_name ? y->data_name : y->name;
    }
    else {
      e->has_offset = false;
      e->filename = NULL;
    }
    if (f & (QCOW_LAYER_DATA | QCOW_LAYER_ZERO)) {
      e->present = true;
      e->data = f & QCOW_LAYER_DATA;
      e->zero = f & QCOW_LAYER_ZERO;
      if (y->data_fd >= 0 && e->data && !e->zero && e->has_offset)
        file_status (y->data_fd, e);
      return 0;
    }
    /* Unallocated here: zeros if there is no backing file, or if the run
     * starts past its end; else ask the backing file. */
    if (d + 1 == n || offset >= l[d + 1].size) {
      e->zero = true;
      return 0;
    }
  }
  e->zero = true;                 /* (not reached: the chain ends above) */
  return 0;
}

static bool
mergeable (const struct entry *a, const struct entry *b)
{
  if (a->length == 0 || a->zero != b->zero || a->data != b->data ||
      a->depth != b->depth || a->present != b->present ||
      (a->filename != NULL) != (b->filename != NULL) ||
      a->has_offset != b->has_offset)
    return false;
  if (a->filename && strcmp (a->filename, b->filename) != 0)
    return false;
  return !a->has_offset || a->offset + a->length == b->offset;
}

/* Print E (qemu-img.c dump_map_entry); NEXT may be changed (human). */
static int
dump (bool json, const char *file, struct entry *e, struct entry *next)
{
  if (json) {
    printf ("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %d,"
            " \"present\": %s, \"zero\": %s, \"data\": %s", e->start, e->length,
            e->depth, e->present ? "true" : "false", e->zero ? "true" : "false",
            e->data ? "true" : "false");
    if (e->has_offset)
      printf (", \"offset\": %" PRIu64, e->offset);
    putchar ('}');
    if (next)
      puts (",");
    return 0;
  }
  if (e->data && !e->has_offset) {
    fflush (stdout);
    fail ("%s: File contains external, encrypted or compressed clusters.", file);
    return -1;
  }
  if (e->data && !e->zero)
    printf ("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start,
            e->length, e->has_offset ? e->offset : 0, e->filename ? e->filename : "");
  /* The human format does not tell zeros from holes: merge more. */
  if (next && (!next->data || next->zero)) {
    next->data = false;
    next->zero = true;
  }
  return 0;
}

int
cmd_map (int argc, char **argv)
{
  enum { OPT_OUTPUT = 256, OPT_JSON, OPT_START, OPT_MAX };
  static const struct option opts[] = {
    { "output", required_argument, NULL, OPT_OUTPUT },
    { "json", no_argument, NULL, OPT_JSON },
    { "start-offset", required_argument, NULL, OPT_START },
    { "max-length", required_argument, NULL, OPT_MAX },
    { "snapshot", required_argument, NULL, 'l' },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
  };
  bool json = false, force_share = false;
  uint64_t start = 0, max = UINT64_MAX;
  const char *snapshot = NULL;
  int c;
  while ((c = getopt_long (argc, argv, "l:U", opts, NULL)) != -1) {
    switch (c) {
    case OPT_OUTPUT:
      if (strcmp (optarg, "json") == 0)
        json = true;
      else if (strcmp (optarg, "human") == 0)
        json = false;
      else
        return usage_error ("map", "--output=%s: expected human or json", optarg);
      break;
    case OPT_JSON: json = true; break;
    case OPT_START:
      if (!parse_size (optarg, &start))
        return usage_error ("map", "--start-offset=%s: not a size", optarg);
      break;
    case OPT_MAX:
      if (!parse_size (optarg, &max))
        return usage_error ("map", "--max-length=%s: not a size", optarg);
      break;
    case 'l': snapshot = optarg; break;
    case 'U': force_share = true; break;
    default: return 1;
    }
  }
  if (argc - optind != 1)
    return usage_error ("map", "expected FILE");
  const char *file = argv[optind];

  struct layer l[MAX_LAYERS];
  memset (l, 0, sizeof l);
  for (int i = 0; i < MAX_LAYERS; i++)
    l[i].fd = l[i].data_fd = -1;
  if (!(l[0].q = open_image (file, false, force_share, snapshot)))
    return 1;
  struct qcow_info info;
  qcow_get_info (l[0].q, &info);
  l[0].size = info.size;
  int n = open_chain (l, file), r = n < 0 ? -1 : 0;

  uint64_t end = start > info.size ? info.size : start;
  end = max > info.size - end ? info.size : end + max;
  struct entry curr = { .start = start }, next;
  if (r == 0 && json)
    putchar ('[');
  else if (r == 0)
    printf ("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  for (uint64_t off = start; r == 0 && off < end; off += next.length) {
    uint64_t bytes = end - off < (1u << 30) ? end - off : 1u << 30;
    if ((r = block_status (l, n, off, bytes, &next)) < 0)
      break;
    if (next.length == 0) {
      fail ("%s: no progress mapping offset %" PRIu64, file, off);
      r = -1;
      break;
    }
    if (mergeable (&curr, &next)) {
      curr.length += next.length;
      continue;
    }
    if (curr.length > 0 && (r = dump (json, file, &curr, &next)) < 0)
      break;
    curr = next;
  }
  if (r == 0)
    r = dump (json, file, &curr, NULL);
  if (r == 0 && json)
    puts ("]");

  for (int i = 0; i < MAX_LAYERS; i++) {
    if (l[i].fd >= 0)
      close (l[i].fd);
    if (l[i].data_fd >= 0)
      close (l[i].data_fd);
    free (l[i].name);
    free (l[i].data_name);
  }
  qcow_disconnect (l[0].q);
  if (r == 0 && flush_stdout ())
    return 1;
  return r < 0 ? 1 : 0;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* convert.c - qcow-tool convert: copy a virtual disk into a new image.
 *
 *   qcow-tool convert [-f qcow2|raw] [-O qcow2|raw] [-c]
 *                     [--compression zlib|zstd] [-o OPTIONS]
 *                     [-l SNAPSHOT] [-p|--progress] SRC DST
 *
 * The source is a qcow2 image (any variant the core reads; its backing
 * chain is flattened, or one of its internal snapshots is read with -l)
 * or a raw file.  The destination is a new qcow2 image, where clusters
 * that read as zeros stay unallocated, or a raw file, sparse.  With -c
 * every cluster is compressed as QEMU does (qcow_compress).
 *
 * The work is a pipeline (pipeline.c).  The main thread cuts the disk
 * into jobs of up to a megabyte, aligned to the destination's allocation
 * unit, skipping ranges the source maps as zeros without reading them;
 * worker threads (one per CPU) read each job from the source, find its
 * zero units and compress the rest; the main thread writes the jobs in
 * order, so the output is laid out as the guest disk is and is the same
 * on every run.
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

#define QCOW_MAGIC "QFI\xfb"
#define RAW_UNIT 4096           /* zero detection for raw output */
#define CHUNK (1u << 20)        /* a job, at most (at least one unit) */

/* ---- the source ---- */
struct source {
  const char *name;
  struct qcow *q;               /* a qcow2 image, or */
  int fd;                       /* a raw file */
  uint64_t size;
};

static int
source_open (struct source *s, const char *file, const char *fmt,
             const char *snapshot)
{
  s->name = file;
  s->q = NULL;
  s->fd = open (file, O_RDONLY | O_CLOEXEC);
  if (s->fd == -1) {
    fail ("%s: %s", file, strerror (errno));
    return -1;
  }
  bool qcow2;
  if (fmt)
    qcow2 = strcmp (fmt, "qcow2") == 0;
  else {
    char magic[4] = { 0 };
    qcow2 = pread (s->fd, magic, 4, 0) == 4 && memcmp (magic, QCOW_MAGIC, 4) == 0;
  }
  if (!qcow2) {
    off_t end = lseek (s->fd, 0, SEEK_END);
    if (end < 0) {
      fail ("%s: %s", file, strerror (errno));
      return -1;
    }
    if (snapshot) {
      fail ("%s: a raw file has no snapshots", file);
      return -1;
    }
    s->size = end;
    return 0;
  }
  close (s->fd);
  s->fd = -1;
  if (!(s->q = open_image (file, false, false, snapshot)))
    return -1;
  struct qcow_info info;
  qcow_get_info (s->q, &info);
  s->size = info.size;
  return 0;
}

static void
source_close (struct source *s)
{
  if (s->q)
    qcow_disconnect (s->q);
  if (s->fd >= 0)
    close (s->fd);
}

/* The run at OFF (at most MAX bytes): *LEN bytes that read as zeros
 * (*ZERO) or may hold data. */
static int
source_extent (struct source *s, uint64_t off, uint64_t max, uint64_t *len, bool *zero)
{
  if (s->q) {
    unsigned flags;
    if (qcow_map (s->q, off, max, len, &flags) < 0)
      return -1;
    *zero = flags & QCOW_EXTENT_ZERO;
    return 0;
  }
  off_t data = lseek (s->fd, off, SEEK_DATA);
  if (data == -1 && errno == ENXIO)
    data = s->size;             /* a hole to the end */
  else if (data == -1) {        /* no SEEK_DATA here: all data */
    *len = max;
    *zero = false;
    return 0;
  }
  if ((uint64_t) data > off) {
    *zero = true;
    *len = (uint64_t) data - off;
  }
  else {
    off_t hole = lseek (s->fd, off, SEEK_HOLE);
    *zero = false;
    *len = hole == -1 || (uint64_t) hole <= off ? max : (uint64_t) hole - off;
  }
  if (*len > max)
    *len = max;
  return 0;
}

static int
source_read (struct source *s, void *buf, uint64_t len, uint64_t off)
{
  if (s->q)
    return qcow_read (s->q, buf, len, off) < 0 ? -1 : 0;
  uint8_t *p = buf;
  while (len > 0) {
    ssize_t r = pread (s->fd, p, len, off);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      fail ("%s: read at offset %" PRIu64 ": %s", s->name, off,
            r < 0 ? strerror (errno) : "unexpected end of file");
      return -1;
    }
    p += r; off += r; len -= r;
  }
  return 0;
}

/* ---- the conversion ---- */
struct convert {
  struct source src;
  struct qcow *dq;              /* destination: qcow2, or */
  int dfd;                      /* raw */
  const char *dname;
  bool compress;
  uint64_t unit;                /* allocation unit of the destination */
  uint64_t size;
  uint64_t pos;                 /* where the next job starts looking */
  struct progress pr;
};

/* The pipeline's chunk: CHUNK, or a cluster of the output if larger. */
static uint64_t
chunk_of (const struct convert *c)
{
  return CHUNK > c->unit ? CHUNK : c->unit;
}

/* The next job: up to a chunk, ending on a chunk boundary, starting at a
 * unit; whole units the source maps as zeros are skipped unread. */
static int
next_job (void *opaque, struct job *j)
{
  struct convert *c = opaque;
  uint64_t chunk = chunk_of (c);
  while (c->pos < c->size) {
    uint64_t l;
    bool zero;
    if (source_extent (&c->src, c->pos, c->size - c->pos, &l, &zero) < 0)
      return -1;
    if (zero && l > 0) {
      uint64_t e = c->pos + l;
      if (e >= c->size) {
        c->pos = c->size;
        break;
      }
      e -= e % c->unit;
      if (e > c->pos) {
        c->pos = e;
        continue;
      }
    }
    j->start = c->pos;
    j->len = chunk - c->pos % chunk;
    if (j->len > c->size - c->pos)
      j->len = c->size - c->pos;
    c->pos += j->len;
    return 0;
  }
  return 0;
}

/* Read a job and prepare each unit: CLEN 0 zeros, > 0 compressed into
 * OUT at the unit's place, < 0 stored as it is (a worker). */
static int
work (void *opaque, struct job *j)
{
  struct convert *c = opaque;
  uint64_t off = j->start, end = j->start + j->len;
  while (off < end) {
    uint64_t len;
    bool zero;
    if (source_extent (&c->src, off, end - off, &len, &zero) < 0)
      return -1;
    if (len == 0)
      len = end - off;
    if (zero)
      memset (j->in + (off - j->start), 0, len);
    else if (source_read (&c->src, j->in + (off - j->start), len, off) < 0)
      return -1;
    off += len;
  }
  uint64_t n = (j->len + c->unit - 1) / c->unit;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t ulen = j->len - i * c->unit < c->unit ? j->len - i * c->unit : c->unit;
    uint8_t *p = j->in + i * c->unit;
    if (is_zero (p, ulen))
      j->clen[i] = 0;
    else if (!c->compress)
      j->clen[i] = -1;
    else {
      if (ulen < c->unit)       /* the last cluster, cut short: padded */
        memset (p + ulen, 0, c->unit - ulen);
      int64_t r = qcow_compress (c->dq, p, j->out + i * c->unit);
      if (r < 0)
        return -1;
      j->clen[i] = r > 0 ? r : -1;
    }
  }
  return 0;
}

/* Write out a prepared job (the main thread, in order). */
static int
done (void *opaque, struct job *j)
{
  struct convert *c = opaque;
  uint64_t n = (j->len + c->unit - 1) / c->unit;
  for (uint64_t i = 0; i < n;) {
    if (j->clen[i] == 0) {
      i++;
      continue;
    }
    uint64_t off = j->start + i * c->unit;
    if (j->clen[i] > 0) {
      if (qcow_write_compressed_data (c->dq, off / c->unit, j->out + i * c->unit,
                                      j->clen[i]) < 0)
        return -1;
      i++;
      continue;
    }
    uint64_t k = i + 1;         /* a run of units stored as they are */
    while (k < n && j->clen[k] < 0)
      k++;
    uint64_t len = (k - i) * c->unit;
    if (off + len > j->start + j->len)
      len = j->start + j->len - off;
    const uint8_t *p = j->in + i * c->unit;
    if (c->dq) {
      if (qcow_write (c->dq, p, len, off, 0) < 0)
        return -1;
    }
    else {
      for (uint64_t w = 0; w < len;) {
        ssize_t r = pwrite (c->dfd, p + w, len - w, off + w);
        if (r < 0 && errno == EINTR)
          continue;
        if (r < 0) {
          fail ("%s: write at offset %" PRIu64 ": %s", c->dname, off + w,
                strerror (errno));
          return -1;
        }
        w += r;
      }
    }
    i = k;
  }
  progress_update (&c->pr, j->start + j->len);
  return 0;
}

static int
run (struct convert *c, bool progress)
{
  uint64_t chunk = chunk_of (c);
  progress_start (&c->pr, progress, c->size);
  int r = pipeline_run (c, chunk, c->unit, c->compress, next_job, work, done);
  if (r == 0)
    progress_end (&c->pr);
  else if (c->pr.on)
    fputc ('\n', stderr);
  return r;
}

/* ---- options ---- */

/* -o KEY=VALUE,... (qemu-img's names; '-' and '_' alike). */
static int
parse_create_options (char *s, struct qcow_create_opts *o, bool *lazy_given,
                      bool *ctype_given)
{
  char *save = NULL;
  for (char *kv = strtok_r (s, ",", &save); kv; kv = strtok_r (NULL, ",", &save)) {
    char *v = strchr (kv, '=');
    if (!v)
      return usage_error ("convert", "-o %s: expected KEY=VALUE", kv);
    *v++ = '\0';
    for (char *p = kv; *p; p++)
      if (*p == '-')
        *p = '_';
    uint64_t n;
    if (strcmp (kv, "cluster_size") == 0) {
      if (!parse_size (v, &n) || n < 512 || n > (2u << 20) || (n & (n - 1)))
        return usage_error ("convert", "-o cluster_size=%s: must be a power of "
                            "two from 512 to 2M", v);
      o->cluster_bits = __builtin_ctzll (n);
    }
    else if (strcmp (kv, "lazy_refcounts") == 0) {
      if (strcmp (v, "on") != 0 && strcmp (v, "off") != 0)
        return usage_error ("convert", "-o lazy_refcounts=%s: expected on or off", v);
      o->lazy_refcounts = strcmp (v, "on") == 0;
      *lazy_given = true;
    }
    else if (strcmp (kv, "refcount_bits") == 0) {
      char *end;
      unsigned long b = strtoul (v, &end, 10);
      if (*end || b == 0 || b > 64 || (b & (b - 1)))
        return usage_error ("convert", "-o refcount_bits=%s: must be a power "
                            "of two from 1 to 64", v);
      o->refcount_order = __builtin_ctzl (b);
    }
    else if (strcmp (kv, "compat") == 0) {
      if (strcmp (v, "0.10") == 0 || strcmp (v, "v2") == 0)
        o->version = 2;
      else if (strcmp (v, "1.1") == 0 || strcmp (v, "v3") == 0)
        o->version = 3;
      else
        return usage_error ("convert", "-o compat=%s: expected 0.10, 1.1, v2 or v3", v);
    }
    else if (strcmp (kv, "compression_type") == 0) {
      if (strcmp (v, "zlib") != 0 && strcmp (v, "zstd") != 0)
        return usage_error ("convert", "-o compression_type=%s: expected zlib or zstd", v);
      o->compression_type = strcmp (v, "zstd") == 0;
      *ctype_given = true;
    }
    else
      return usage_error ("convert", "-o %s: unknown option (cluster_size, "
                          "lazy_refcounts, refcount_bits, compat, "
                          "compression_type)", kv);
  }
  return 0;
}

int
cmd_convert (int argc, char **argv)
{
  enum { OPT_COMPRESSION = 256 };
  static const struct option opts[] = {
    { "compression", required_argument, NULL, OPT_COMPRESSION },
    { "progress", no_argument, NULL, 'p' },
    { "snapshot", required_argument, NULL, 'l' },
    { NULL, 0, NULL, 0 },
  };
  const char *in_fmt = NULL, *out_fmt = "qcow2", *compression = NULL, *snapshot = NULL;
  bool compress = false, progress = false, lazy_given = false, ctype_given = false;
  struct qcow_create_opts o;
  qcow_create_opts_default (&o);
  int ch;
  while ((ch = getopt_long (argc, argv, "f:O:co:l:p", opts, NULL)) != -1) {
    switch (ch) {
    case 'f': in_fmt = optarg; break;
    case 'O': out_fmt = optarg; break;
    case 'c': compress = true; break;
    case 'l': snapshot = optarg; break;
    case 'p': progress = true; break;
    case OPT_COMPRESSION: compression = optarg; break;
    case 'o':
      if (parse_create_options (optarg, &o, &lazy_given, &ctype_given))
        return 1;
      break;
    default:
      return 1;
    }
  }
  if (argc - optind != 2)
    return usage_error ("convert", "expected SRC DST");
  const char *src = argv[optind], *dst = argv[optind + 1];
  if (in_fmt && strcmp (in_fmt, "qcow2") != 0 && strcmp (in_fmt, "raw") != 0)
    return usage_error ("convert", "-f %s: expected qcow2 or raw", in_fmt);
  if (strcmp (out_fmt, "qcow2") != 0 && strcmp (out_fmt, "raw") != 0)
    return usage_error ("convert", "-O %s: expected qcow2 or raw", out_fmt);
  bool raw_out = strcmp (out_fmt, "raw") == 0;
  if (compression) {
    if (strcmp (compression, "zlib") != 0 && strcmp (compression, "zstd") != 0)
      return usage_error ("convert", "--compression %s: expected zlib or zstd", compression);
    if (ctype_given && o.compression_type != (strcmp (compression, "zstd") == 0))
      return usage_error ("convert", "--compression and -o compression_type disagree");
    o.compression_type = strcmp (compression, "zstd") == 0;
  }
  if (raw_out && (compress || compression))
    return usage_error ("convert", "compression needs qcow2 output (-O qcow2)");
  if (o.version == 2) {
    if (lazy_given && o.lazy_refcounts)
      return usage_error ("convert", "lazy refcounts need compat=1.1 (v3)");
    o.lazy_refcounts = false;
    if (o.compression_type)
      return usage_error ("convert", "zstd compression needs compat=1.1 (v3)");
    if (o.refcount_order != 4)
      return usage_error ("convert", "refcount widths other than 16 bits need compat=1.1 (v3)");
  }

  struct convert c = { .dfd = -1, .dname = dst, .compress = compress };
  if (source_open (&c.src, src, in_fmt, snapshot) < 0) {
    source_close (&c.src);
    return 1;
  }
  c.size = c.src.size;
  struct stat sst, dst_st;
  bool existed = stat (dst, &dst_st) == 0;
  if (existed && stat (src, &sst) == 0 && sst.st_dev == dst_st.st_dev &&
      sst.st_ino == dst_st.st_ino) {
    fail ("%s: the destination is the source", dst);
    source_close (&c.src);
    return 1;
  }

  int r = 0;
  if (raw_out) {
    c.unit = RAW_UNIT;
    c.dfd = open (dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (c.dfd == -1 || ftruncate (c.dfd, 0) == -1 || ftruncate (c.dfd, c.size) == -1) {
      fail ("%s: %s", dst, strerror (errno));
      r = -1;
    }
  }
  else {
    struct qcow_config cfg;
    qcow_config_default (&cfg);
    o.size = c.size;
    c.unit = (uint64_t) 1 << o.cluster_bits;
    if (qcow_create (dst, &o, true) < 0 || qcow_connect (dst, &cfg, &c.dq) < 0 ||
        qcow_lock_write (c.dq) < 0)
      r = -1;
  }
  if (r == 0)
    r = run (&c, progress);
  if (c.dq && qcow_disconnect (c.dq) < 0)
    r = -1;
  if (c.dfd >= 0 && ((r == 0 && fdatasync (c.dfd) == -1) || close (c.dfd) == -1) && r == 0) {
    fail ("%s: %s", dst, strerror (errno));
    r = -1;
  }
  source_close (&c.src);
  if (r < 0 && !existed)
    unlink (dst);               /* no half-made file left behind */
  return r < 0 ? 1 : 0;
}

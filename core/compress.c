/* SPDX-License-Identifier: BSD-3-Clause */
/* compress.c - compressed clusters (zlib deflate and zstd): reading them,
 * writing them, and freeing every host cluster one occupies.
 *
 * A descriptor (format.c decodes it) gives a byte offset and a sector
 * count; the data may share host clusters with other compressed clusters
 * and run past the end of the file for the last one.  Decompression
 * contexts are kept per thread; reading takes no lock (callers hold
 * io_lock shared, so the clusters cannot be freed meanwhile).
 *
 * Writing follows QEMU (block/qcow2.c, qcow2_co_pwritev_compressed_task,
 * and qcow2_alloc_bytes): a cluster is compressed with the image's type
 * (zlib: raw deflate, default level, 4 KiB window, memLevel 9; zstd: its
 * default level, streamed) into at most cluster_size - 1 bytes, or stored
 * uncompressed.  Compressed data is packed at byte granularity: it goes
 * on where the previous compressed cluster ended (q->cfill), into the
 * next host cluster too if that is the next one the allocator hands out,
 * else into a new cluster (the rest of the old one is left unused).
 * Every host cluster the data touches gets one more reference, so a
 * cluster holding parts of three compressed clusters has a refcount of
 * three.  The descriptor holds the host offset and the number of 512-byte
 * sectors the data spans, minus one.  q->cfill is reset when the cluster
 * it points into is freed (rc_free) or the refcounts are rebuilt.
 * Compression runs with no lock held (per-thread contexts); the byte
 * allocation and the L2 update take q->lock, the data write does not
 * (the guest cluster is marked in flight meanwhile, as rw.c does). */
#include <stdlib.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "internal.h"

/* Host byte range [*off, *off + *len) of compressed descriptor ENT. */
void
compressed_extent (struct qcow *q, uint64_t ent, uint64_t *off, uint64_t *len)
{
  fmt_compressed_extent (q->cluster_bits, ent, off, len);
}

/* Compression and decompression contexts are reused per thread (creating
 * a zstd context for every cluster costs more than compressing or
 * decompressing it); each is made on first use. */
static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;
struct codec_ctx {
  z_stream inflate, deflate;
  bool inflate_ready, deflate_ready;
  ZSTD_DCtx *dzstd;
  ZSTD_CCtx *czstd;
};

static void
ctx_free (void *p)
{
  struct codec_ctx *c = p;
  if (c->inflate_ready)
    inflateEnd (&c->inflate);
  if (c->deflate_ready)
    deflateEnd (&c->deflate);
  ZSTD_freeDCtx (c->dzstd);
  ZSTD_freeCCtx (c->czstd);
  free (c);
}

static void ctx_key_init (void) { pthread_key_create (&ctx_key, ctx_free); }

static struct codec_ctx *
ctx_get (void)
{
  pthread_once (&ctx_once, ctx_key_init);
  struct codec_ctx *c = pthread_getspecific (ctx_key);
  if (!c && (c = calloc (1, sizeof *c)) != NULL)
    pthread_setspecific (ctx_key, c);
  return c;
}

static int
inflate_zlib (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  struct codec_ctx *c = ctx_get ();
  if (!c)
    return -1;
  z_stream *zs = &c->inflate;
  if (!c->inflate_ready) {
    memset (zs, 0, sizeof *zs);
    if (inflateInit2 (zs, -12) != Z_OK)
      return -1;
    c->inflate_ready = true;
  }
  else if (inflateReset (zs) != Z_OK)
    return -1;
  zs->next_in = (Bytef *) in;
  zs->avail_in = inlen;
  zs->next_out = out;
  zs->avail_out = outlen;
  int r = inflate (zs, Z_FINISH);
  return (r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && zs->avail_out == 0 ? 0 : -1;
}

static int
inflate_zstd (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  struct codec_ctx *c = ctx_get ();
  if (!c || (!c->dzstd && !(c->dzstd = ZSTD_createDCtx ())))
    return -1;
  ZSTD_DCtx *d = c->dzstd;
  ZSTD_DCtx_reset (d, ZSTD_reset_session_only);
  ZSTD_inBuffer ib = { in, inlen, 0 };
  ZSTD_outBuffer ob = { out, outlen, 0 };
  int ret = -1;
  /* The data may be followed by padding or another cluster's data: stop
   * as soon as the output cluster is full. */
  while (ob.pos < ob.size) {
    size_t r = ZSTD_decompressStream (d, &ob, &ib);
    if (ZSTD_isError (r))
      break;
    if (ob.pos == ob.size) {
      ret = 0;
      break;
    }
    if (r == 0 || ib.pos == ib.size)
      break;                      /* frame ended short, or input exhausted */
  }
  return ret;
}

/* Decompress the cluster described by ENT into OUT (cluster_size). */
int
compressed_read (struct qcow *q, uint64_t ent, uint8_t *out)
{
  uint64_t off, len;
  compressed_extent (q, ent, &off, &len);
  if (off < q->cluster_size || off >= q->file_size) {
    return qcow_corrupt (q, "L2 table", UINT64_MAX, "compressed cluster at 0x%"
                         PRIx64 " lies %s", off, off < q->cluster_size
                         ? "inside the header" : "beyond the end of the file");
  }
  if (len > q->file_size - off)
    len = q->file_size - off;   /* the last one may end early */
  uint8_t *in = malloc (len);
  if (!in)
    return -ENOMEM;
  int r = io_pread (q, in, len, off);
  if (r == 0) {
    int z = q->h.compression_type == COMPRESSION_ZSTD
      ? inflate_zstd (in, len, out, q->cluster_size)
      : inflate_zlib (in, len, out, q->cluster_size);
    if (z < 0) {
      r = qcow_corrupt (q, "compressed cluster", off, "%s data does not "
                        "decompress to a cluster", q->h.compression_type ==
                        COMPRESSION_ZSTD ? "zstd" : "zlib");
    }
  }
  free (in);
  return r;
}

/* ---- compressing and writing ---- */

/* Deflate IN into at most OUTLEN bytes: the length, 0 if it does not fit,
 * -1 on error. */
static int64_t
deflate_zlib (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  struct codec_ctx *c = ctx_get ();
  if (!c)
    return -1;
  z_stream *zs = &c->deflate;
  if (!c->deflate_ready) {
    memset (zs, 0, sizeof *zs);
    if (deflateInit2 (zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                      Z_DEFAULT_STRATEGY) != Z_OK)
      return -1;
    c->deflate_ready = true;
  }
  else if (deflateReset (zs) != Z_OK)
    return -1;
  zs->next_in = (Bytef *) in;
  zs->avail_in = inlen;
  zs->next_out = out;
  zs->avail_out = outlen;
  int r = deflate (zs, Z_FINISH);
  if (r == Z_STREAM_END)
    return outlen - zs->avail_out;
  return r == Z_OK || r == Z_BUF_ERROR ? 0 : -1;
}

static int64_t
deflate_zstd (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  struct codec_ctx *c = ctx_get ();
  if (!c || (!c->czstd && !(c->czstd = ZSTD_createCCtx ())))
    return -1;
  ZSTD_CCtx_reset (c->czstd, ZSTD_reset_session_only);
  ZSTD_inBuffer ib = { in, inlen, 0 };
  ZSTD_outBuffer ob = { out, outlen, 0 };
  size_t r = ZSTD_compressStream2 (c->czstd, &ob, &ib, ZSTD_e_end);
  if (ZSTD_isError (r))
    return ZSTD_getErrorCode (r) == ZSTD_error_dstSize_tooSmall ? 0 : -1;
  return r == 0 ? (int64_t) ob.pos : 0;     /* r > 0: more to flush */
}

int64_t
qcow_compress (struct qcow *q, const void *in, void *out)
{
  int64_t n = q->h.compression_type == COMPRESSION_ZSTD
    ? deflate_zstd (in, q->cluster_size, out, q->cluster_size - 1)
    : deflate_zlib (in, q->cluster_size, out, q->cluster_size - 1);
  if (n < 0) {
    ERR (q, "%s compression failed", q->h.compression_type == COMPRESSION_ZSTD ? "zstd" : "zlib");
    return -EIO;
  }
  return n;
}

/* Reserve LEN bytes (< cluster_size) for compressed data: *OFF gets the
 * host offset; each host cluster touched has one more reference.  With
 * q->lock held. */
static int
alloc_bytes (struct qcow *q, uint64_t len, uint64_t *off)
{
  const uint64_t cs = q->cluster_size;
  uint64_t at = q->cfill, rc = 0, c, got;
  bool fresh;
  int r;
  if (at && ((r = rc_get (q, at >> q->cluster_bits, &rc)) < 0))
    return r;
  if (rc == 0 || rc >= q->refcount_max)
    at = 0;                     /* nothing to go on with */
  if (at && cs - (at & (cs - 1)) >= len) {
    if ((r = rc_set (q, at >> q->cluster_bits, rc + 1)) < 0)
      return r;
  }
  else {
    if ((r = rc_alloc (q, 1, &c, &got, &fresh)) < 0)
      return r;
    if (at && c == (at >> q->cluster_bits) + 1) {
      /* Straddles the end of the current cluster into the new one. */
      if ((r = rc_set (q, at >> q->cluster_bits, rc + 1)) < 0) {
        rc_free (q, c, 1);
        return r;
      }
    }
    else
      at = c << q->cluster_bits;
  }
  *off = at;
  q->cfill = (at + len) & (cs - 1) ? at + len : 0;
  return 0;
}

/* Give back what alloc_bytes reserved at OFF (the write failed). */
static void
unalloc_bytes (struct qcow *q, uint64_t off, uint64_t len)
{
  for (uint64_t c = off >> q->cluster_bits; c <= (off + len - 1) >> q->cluster_bits; c++)
    rc_free (q, c, 1);
  q->cfill = 0;
}

int
qcow_write_compressed_data (struct qcow *q, uint64_t gc, const void *data, size_t len)
{
  const uint64_t cs = q->cluster_size;
  int r = check_write_range (q, 1, gc << q->cluster_bits);
  if (r < 0)
    return r;
  if (len == 0 || len >= cs) {
    ERR (q, "compressed data of %zu bytes for a %" PRIu64 "-byte cluster", len, cs);
    return -EINVAL;
  }
  if (q->data_path) {
    ERR (q, "compressed clusters are not possible with an external data file");
    return -ENOTSUP;
  }
  stat_add (q, STAT_WRITES, 1);
  io_lock_shared (q);
  pthread_mutex_lock (&q->lock);
  struct cmap m;
  struct centry *e;
  uint64_t off = 0;
  if ((r = begin_modify (q)) < 0)
    goto out;
  for (;;) {
    if ((r = l2_lookup (q, gc, &m)) < 0)
      goto out;
    if (!inflight_find (q, gc))
      break;
    pthread_cond_wait (&q->alloc_cond, &q->lock);
  }
  /* The L2 table (unshared) before the data, as for any allocation. */
  if ((r = l2_get_slice (q, gc, true, &e)) < 0 ||
      (r = alloc_bytes (q, len, &off)) < 0)
    goto out;
  struct inflight f = { .first = gc, .count = 1, .next = q->inflight };
  q->inflight = &f;
  pthread_mutex_unlock (&q->lock);
  r = io_pwrite (q, data, len, off);
  pthread_mutex_lock (&q->lock);
  if (r == 0) {
    r = l2_set_with_bitmap (q, gc, ENTRY_COMPRESSED |
                            fmt_compressed_desc (q->cluster_bits, off, len), 0);
  }
  if (r == 0) {
    /* The old contents go once the new link is durable. */
    if (m.kind == C_COMPRESSED)
      compressed_defer_free (q, m.host);
    else if ((m.kind == C_DATA || m.kind == C_ZERO_ALLOC || m.kind == C_SUBCL) && m.host)
      rc_defer_free (q, m.host >> q->cluster_bits);
  }
  else
    unalloc_bytes (q, off, len);
  inflight_remove (q, &f);
 out:
  pthread_mutex_unlock (&q->lock);
  io_unlock_shared (q);
  return r == -ENOTSUP ? -EIO : r;
}

int
qcow_write_compressed (struct qcow *q, const void *buf, uint64_t gc)
{
  const uint64_t cs = q->cluster_size;
  int r = check_write_range (q, 1, gc << q->cluster_bits);
  if (r < 0)
    return r;
  uint64_t valid = q->h.size - (gc << q->cluster_bits);
  if (valid > cs)
    valid = cs;
  uint8_t *in = (uint8_t *) buf, *out = malloc (cs), *padded = NULL;
  if (!out)
    return -ENOMEM;
  if (valid < cs) {             /* a last cluster cut short: zero padded */
    if (!(padded = calloc (1, cs))) {
      free (out);
      return -ENOMEM;
    }
    memcpy (padded, buf, valid);
    in = padded;
  }
  int64_t n = qcow_compress (q, in, out);
  if (n > 0)
    r = qcow_write_compressed_data (q, gc, out, n);
  else if (n == 0)
    r = qcow_write (q, in, valid, gc << q->cluster_bits, 0);
  else
    r = n;
  free (out);
  free (padded);
  return r;
}

/* Defer freeing every host cluster a compressed cluster touches. */
void
compressed_defer_free (struct qcow *q, uint64_t ent)
{
  uint64_t off, len;
  compressed_extent (q, ent, &off, &len);
  for (uint64_t c = off >> q->cluster_bits; c <= (off + len - 1) >> q->cluster_bits; c++)
    rc_defer_free (q, c);
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* compress.c - compressed clusters (zlib deflate and zstd): reading them,
 * and freeing every host cluster one occupies.
 *
 * A descriptor (format.c decodes it) gives a byte offset and a sector
 * count; the data may share host clusters with other compressed clusters
 * and run past the end of the file for the last one.  Decompression
 * contexts are kept per thread; nothing here takes a lock (callers hold
 * io_lock shared, so the clusters cannot be freed meanwhile). */
#include <stdlib.h>
#include <zlib.h>
#include <zstd.h>

#include "internal.h"

/* Host byte range [*off, *off + *len) of compressed descriptor ENT. */
void
compressed_extent (struct qcow *q, uint64_t ent, uint64_t *off, uint64_t *len)
{
  fmt_compressed_extent (q->cluster_bits, ent, off, len);
}

/* Decompression contexts are reused per thread (creating a zstd context
 * for every cluster costs more than decompressing it). */
static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;
struct dctx {
  z_stream z;
  bool z_ready;
  ZSTD_DCtx *zstd;
};

static void
dctx_free (void *p)
{
  struct dctx *c = p;
  if (c->z_ready)
    inflateEnd (&c->z);
  ZSTD_freeDCtx (c->zstd);
  free (c);
}

static void ctx_key_init (void) { pthread_key_create (&ctx_key, dctx_free); }

static struct dctx *
dctx_get (void)
{
  pthread_once (&ctx_once, ctx_key_init);
  struct dctx *c = pthread_getspecific (ctx_key);
  if (!c && (c = calloc (1, sizeof *c)) != NULL)
    pthread_setspecific (ctx_key, c);
  return c;
}

static int
inflate_zlib (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  struct dctx *c = dctx_get ();
  if (!c)
    return -1;
  z_stream *zs = &c->z;
  if (!c->z_ready) {
    memset (zs, 0, sizeof *zs);
    if (inflateInit2 (zs, -12) != Z_OK)
      return -1;
    c->z_ready = true;
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
  struct dctx *c = dctx_get ();
  if (!c || (!c->zstd && !(c->zstd = ZSTD_createDCtx ())))
    return -1;
  ZSTD_DCtx *d = c->zstd;
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

/* Defer freeing every host cluster a compressed cluster touches. */
void
compressed_defer_free (struct qcow *q, uint64_t ent)
{
  uint64_t off, len;
  compressed_extent (q, ent, &off, &len);
  for (uint64_t c = off >> q->cluster_bits; c <= (off + len - 1) >> q->cluster_bits; c++)
    rc_defer_free (q, c);
}

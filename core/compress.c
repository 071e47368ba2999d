/* compress.c - compressed clusters (zlib deflate and zstd): descriptors,
 * reading, and the host range a compressed cluster occupies. */
#include <stdlib.h>
#include <zlib.h>
#include <zstd.h>

#include "internal.h"

/* Host byte range [*off, *off + *len) of compressed descriptor ENT. */
void
compressed_extent (struct qcow *q, uint64_t ent, uint64_t *off, uint64_t *len)
{
  unsigned x = 62 - (q->cluster_bits - 8);
  uint64_t nsect = ((ent >> x) & ((1ULL << (q->cluster_bits - 8)) - 1)) + 1;
  *off = ent & ((1ULL << x) - 1);
  *len = nsect * 512 - (*off & 511);
}

static int
inflate_zlib (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  z_stream s;
  memset (&s, 0, sizeof s);
  if (inflateInit2 (&s, -12) != Z_OK)
    return -1;
  s.next_in = (Bytef *) in;
  s.avail_in = inlen;
  s.next_out = out;
  s.avail_out = outlen;
  int r = inflate (&s, Z_FINISH);
  bool ok = (r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && s.avail_out == 0;
  inflateEnd (&s);
  return ok ? 0 : -1;
}

static int
inflate_zstd (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  ZSTD_DCtx *d = ZSTD_createDCtx ();
  if (!d)
    return -1;
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
  ZSTD_freeDCtx (d);
  return ret;
}

/* Decompress the cluster described by ENT into OUT (cluster_size). */
int
compressed_read (struct qcow *q, uint64_t ent, uint8_t *out)
{
  uint64_t off, len;
  compressed_extent (q, ent, &off, &len);
  if (off < q->cluster_size || off >= q->file_size) {
    ERR (q, "compressed cluster at 0x%" PRIx64 " lies %s", off,
         off < q->cluster_size ? "inside the header" : "beyond the end of the file");
    return -EIO;
  }
  if (len > q->file_size - off)
    len = q->file_size - off;   /* the last one may end early */
  uint8_t *in = malloc (len);
  if (!in)
    return -ENOMEM;
  int r = io_pread (q, in, len, off);
  if (r == 0) {
    int z = q->h.compression_type == 1
      ? inflate_zstd (in, len, out, q->cluster_size)
      : inflate_zlib (in, len, out, q->cluster_size);
    if (z < 0) {
      ERR (q, "compressed cluster at 0x%" PRIx64 " is corrupt (%s)", off,
           q->h.compression_type == 1 ? "zstd" : "zlib");
      r = -EIO;
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

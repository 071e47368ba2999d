/* SPDX-License-Identifier: BSD-3-Clause */
/* header.c - the live image's header: parse and validate it (refusing,
 * with the file and the field named, anything that could lead outside
 * the file or into other metadata), write fields of it back, build the
 * header of a new image.  The bytes are format.c's business; the policy
 * (what is refused) is this file's.  q->h is changed only under q->lock
 * or before the image is shared; every header write is of whole fields
 * from the cluster bits on, in one write (so atomic on a sector). */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

static bool
overlaps (uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
  return a < b + blen && b < a + alen;
}

/* Parse BUF (the first cluster, or the whole file if smaller; zero padded
 * to at least 4096 bytes) into q->h and derived fields, validating every
 * field against FILE_SIZE and sane limits. */
int
header_parse (struct qcow *q, const uint8_t *buf, uint64_t file_size)
{
  struct qcow_header *h = &q->h;

  if (file_size < 4 || rd32 (buf) != QCOW_MAGIC) {
    ERR (q, "not a qcow2 image (bad magic)");
    return -EINVAL;
  }
  if (file_size < QCOW_V2_HEADER_LEN) {
    ERR (q, "file is truncated (%" PRIu64 " bytes): no room for the header",
         file_size);
    return -EINVAL;
  }
  uint64_t backing_off;
  uint32_t backing_len;
  fmt_header_decode (buf, h, &backing_off, &backing_len);
  if (h->version != 2 && h->version != 3) {
    ERR (q, "unsupported qcow2 version %" PRIu32 " (only 2 and 3)", h->version);
    return -ENOTSUP;
  }

  if (h->cluster_bits < QCOW_MIN_CLUSTER_BITS ||
      h->cluster_bits > QCOW_MAX_CLUSTER_BITS) {
    ERR (q, "cluster_bits %" PRIu32 " out of range (%d..%d)",
         h->cluster_bits, QCOW_MIN_CLUSTER_BITS, QCOW_MAX_CLUSTER_BITS);
    return -EINVAL;
  }
  const uint64_t cs = 1ULL << h->cluster_bits;
  if (h->version == 3) {
    if (file_size < QCOW_V3_MIN_HEADER_LEN) {
      ERR (q, "file is truncated (%" PRIu64 " bytes): no room for the "
           "version 3 header", file_size);
      return -EINVAL;
    }
    if (h->header_length < QCOW_V3_MIN_HEADER_LEN || h->header_length % 8 != 0 ||
        h->header_length > cs) {
      ERR (q, "header_length %" PRIu32 " is invalid (must be a multiple of 8 "
           "between 104 and the cluster size)", h->header_length);
      return -EINVAL;
    }
  }
  if (file_size < h->header_length) {
    ERR (q, "file is truncated: shorter than its header");
    return -EINVAL;
  }
  if (h->refcount_order > QCOW_MAX_REFCOUNT_ORDER) {
    ERR (q, "refcount_order %" PRIu32 " is invalid (at most 6)", h->refcount_order);
    return -EINVAL;
  }

  /* Header extensions: walk them all, bounded by the first cluster. */
  const uint8_t *ftable = NULL;
  uint32_t ftable_len = 0;
  bool have_crypt_ext = false;
  uint64_t end = cs < file_size ? cs : file_size;
  if (backing_off && backing_off < end)
    end = backing_off;
  struct fmt_ext x;
  int more;
  for (uint64_t off = h->header_length;
       (more = fmt_ext_next (buf, &off, end, &x)) != 0;) {
    if (more < 0) {
      ERR (q, "header extension 0x%08" PRIx32 " at offset %" PRIu64
           " (length %" PRIu32 ") runs past the end of the header",
           x.type, x.off - 8, x.len);
      return -EINVAL;
    }
    const uint8_t *data = buf + x.off;
    uint32_t len = x.len;
    switch (x.type) {
    case EXT_BACKING_FORMAT:
      snprintf (h->backing_format, sizeof h->backing_format, "%.*s",
                (int) (len < sizeof h->backing_format ? len : sizeof h->backing_format - 1),
                (const char *) data);
      break;
    case EXT_FEATURE_TABLE:
      ftable = data; ftable_len = len;
      break;
    case EXT_DATA_FILE:
      snprintf (h->data_file, sizeof h->data_file, "%.*s",
                (int) (len < sizeof h->data_file ? len : sizeof h->data_file - 1),
                (const char *) data);
      break;
    case EXT_ENCRYPTION:
      have_crypt_ext = true;
      break;
    default:                    /* bitmaps and unknown: left as they are */
      break;
    }
  }

  /* Features. */
  uint64_t unknown = h->incompatible_features & ~KNOWN_INCOMPAT;
  if (unknown) {
    int bit = __builtin_ctzll (unknown);
    char nbuf[64];
    const char *name = fmt_feature_table_name (ftable, ftable_len, 0, bit, nbuf, sizeof nbuf);
    ERR (q, "unsupported incompatible feature bit %d%s%s%s", bit,
         name ? " (" : "", name ? name : "", name ? ")" : "");
    return -ENOTSUP;
  }
  if (h->crypt_method != 0 || have_crypt_ext) {
    ERR (q, "encrypted images are not supported (encryption method %s)",
         h->crypt_method == 1 ? "AES" : h->crypt_method == 2 ? "LUKS" : "unknown");
    return -ENOTSUP;
  }
  if (!(h->incompatible_features & QCOW_INCOMPAT_DATA_FILE)) {
    h->data_file[0] = '\0';    /* a name without the feature is ignored */
    if (h->autoclear_features & QCOW_AUTOCLEAR_DATA_RAW) {
      ERR (q, "raw external data bit set without an external data file");
      return -EINVAL;
    }
  }
  else if (h->nb_snapshots) {
    ERR (q, "an image with an external data file cannot have snapshots");
    return -EINVAL;
  }
  if ((h->incompatible_features & QCOW_INCOMPAT_EXTL2) &&
      h->cluster_bits < EXTL2_MIN_CLUSTER_BITS) {
    ERR (q, "extended L2 entries need clusters of at least 16 KiB");
    return -EINVAL;
  }
  if ((h->incompatible_features & QCOW_INCOMPAT_EXTL2) &&
      (h->incompatible_features & QCOW_INCOMPAT_DATA_FILE)) {
    ERR (q, "extended L2 entries with an external data file are not supported");
    return -ENOTSUP;
  }
  if (h->incompatible_features & QCOW_INCOMPAT_COMPRESSION) {
    if (h->header_length <= HDR_COMPRESSION_TYPE ||
        h->compression_type != COMPRESSION_ZSTD) {
      ERR (q, "compression type bit is set but compression_type is %u",
           h->compression_type);
      return -EINVAL;
    }
  }
  else if (h->compression_type != 0) {
    ERR (q, "compression_type %u without the compression type feature bit",
         h->compression_type);
    return -EINVAL;
  }
  if (backing_off != 0) {
    if (backing_len == 0 || backing_len > QCOW_MAX_BACKING_NAME || backing_off > cs ||
        backing_len > cs - backing_off || backing_off + backing_len > file_size) {
      ERR (q, "backing file name (offset %" PRIu64 ", length %" PRIu32
           ") lies outside the header cluster", backing_off, backing_len);
      return -EINVAL;
    }
    snprintf (h->backing_file, sizeof h->backing_file, "%.*s",
              (int) backing_len, (const char *) buf + backing_off);
    if (strlen (h->backing_file) != backing_len) {
      ERR (q, "backing file name contains a NUL byte");
      return -EINVAL;
    }
  }

  /* Sizes and tables. */
  q->cluster_bits = h->cluster_bits;
  q->cluster_size = cs;
  q->extl2 = h->incompatible_features & QCOW_INCOMPAT_EXTL2;
  q->l2_esh = q->extl2 ? 4 : 3;
  q->l2_bits = h->cluster_bits - q->l2_esh;
  q->sc_bits = q->extl2 ? h->cluster_bits - 5 : h->cluster_bits;
  q->rb_bits = h->cluster_bits + 3 - h->refcount_order;
  q->refcount_max = fmt_refcount_max (h->refcount_order);

  if (h->size > QCOW_MAX_VIRTUAL_SIZE) {
    ERR (q, "virtual size %" PRIu64 " is too large", h->size);
    return -EINVAL;
  }
  uint64_t l2_cover = cs << q->l2_bits;        /* bytes one L2 table maps */
  uint64_t l1_needed = div_round_up (h->size, l2_cover);
  if (h->l1_size > QCOW_MAX_L1_BYTES / 8) {
    ERR (q, "L1 table size %" PRIu32 " is too large (limit %u entries)",
         h->l1_size, QCOW_MAX_L1_BYTES / 8);
    return -EINVAL;
  }
  if (h->l1_size < l1_needed) {
    ERR (q, "L1 table (%" PRIu32 " entries) is too small for the virtual size "
         "%" PRIu64 " (needs %" PRIu64 ")", h->l1_size, h->size, l1_needed);
    return -EINVAL;
  }
  uint64_t l1_bytes = (uint64_t) h->l1_size * 8;
  if (h->l1_size > 0) {
    if (h->l1_table_offset % cs != 0) {
      ERR (q, "L1 table offset 0x%" PRIx64 " is not aligned to a cluster",
           h->l1_table_offset);
      return -EINVAL;
    }
    if (h->l1_table_offset < cs) {
      ERR (q, "L1 table overlaps the header");
      return -EINVAL;
    }
    if (h->l1_table_offset > file_size || l1_bytes > file_size - h->l1_table_offset) {
      ERR (q, "L1 table (offset 0x%" PRIx64 ", %" PRIu64 " bytes) lies beyond "
           "the end of the file", h->l1_table_offset, l1_bytes);
      return -EINVAL;
    }
  }
  uint64_t rct_bytes = (uint64_t) h->refcount_table_clusters << h->cluster_bits;
  if (h->refcount_table_clusters == 0) {
    ERR (q, "refcount table is empty (refcount_table_clusters is 0)");
    return -EINVAL;
  }
  if (rct_bytes > QCOW_MAX_RCT_BYTES) {
    ERR (q, "refcount table (%" PRIu32 " clusters) is too large",
         h->refcount_table_clusters);
    return -EINVAL;
  }
  if (h->refcount_table_offset % cs != 0) {
    ERR (q, "refcount table offset 0x%" PRIx64 " is not aligned to a cluster",
         h->refcount_table_offset);
    return -EINVAL;
  }
  if (h->refcount_table_offset < cs) {
    ERR (q, "refcount table overlaps the header");
    return -EINVAL;
  }
  if (h->refcount_table_offset > file_size ||
      rct_bytes > file_size - h->refcount_table_offset) {
    ERR (q, "refcount table (offset 0x%" PRIx64 ", %" PRIu64 " bytes) lies "
         "beyond the end of the file", h->refcount_table_offset, rct_bytes);
    return -EINVAL;
  }
  if (h->l1_size > 0 &&
      overlaps (h->l1_table_offset, l1_bytes, h->refcount_table_offset, rct_bytes)) {
    ERR (q, "L1 table and refcount table overlap");
    return -EINVAL;
  }
  return 0;
}

/* Write header bytes [off, off+len) from q->h: fields from the cluster
 * bits on (the backing file name's place is never rewritten). */
int
header_write_fields (struct qcow *q, unsigned off, unsigned len)
{
  uint8_t buf[QCOW_V3_HEADER_LEN];
  unsigned end = q->h.version == 2 ? QCOW_V2_HEADER_LEN : QCOW_V3_MIN_HEADER_LEN;
  assert (off >= HDR_CLUSTER_BITS && off + len <= end);
  fmt_header_encode (buf, &q->h, 0, 0);
  return io_pwrite (q, buf + off, len, off);
}

int
header_set_incompat (struct qcow *q, uint64_t incompat)
{
  q->h.incompatible_features = incompat;
  int r = header_write_fields (q, HDR_INCOMPAT, 8);
  if (r == 0)
    r = io_sync (q);
  return r;
}

/* Build the first cluster of a new image into BUF; returns its length. */
size_t
header_build (uint8_t *buf, size_t bufsize, const struct qcow_create_opts *o,
              uint64_t l1_offset, uint32_t l1_size)
{
  struct qcow_header h = {
    .version = o->version, .cluster_bits = o->cluster_bits, .size = o->size,
    .l1_size = l1_size, .l1_table_offset = l1_offset,
    /* the refcount table's place is filled in by the caller */
  };
  memset (buf, 0, bufsize);
  size_t off = QCOW_V2_HEADER_LEN;
  if (o->version == 3) {
    h.compatible_features = o->lazy_refcounts ? QCOW_COMPAT_LAZY_REFCOUNTS : 0;
    h.refcount_order = o->refcount_order;
    h.header_length = QCOW_V3_HEADER_LEN;
    if (o->compression_type == COMPRESSION_ZSTD) {
      h.incompatible_features = QCOW_INCOMPAT_COMPRESSION;
      h.compression_type = 1;
    }
    off = QCOW_V3_HEADER_LEN;
    /* Feature name table, as QEMU writes it, if it fits. */
    size_t n = bufsize > off + 16 ? fmt_feature_table_encode (buf + off + 8, bufsize - off - 16) : 0;
    if (n) {
      wr32 (buf + off, EXT_FEATURE_TABLE);
      wr32 (buf + off + 4, n);
      off += 8 + n;
    }
  }
  fmt_header_encode (buf, &h, 0, 0);
  off += 8;                     /* end marker (zeros) */
  return off;
}

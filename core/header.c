/* header.c - parse and validate the header and its extensions; write
 * header fields; build the header of a new image. */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

/* Names of the features we know, for messages. */
static const struct { int type, bit; const char *name; } known_features[] = {
  { 0, 0, "dirty bit" },
  { 0, 1, "corrupt bit" },
  { 0, 2, "external data file" },
  { 0, 3, "compression type" },
  { 0, 4, "extended L2 entries" },
  { 1, 0, "lazy refcounts" },
  { 2, 0, "bitmaps" },
  { 2, 1, "raw external data" },
};

/* The image's own feature table, kept for naming unknown bits. */
static const char *
image_feature_name (const uint8_t *table, uint32_t len, int type, int bit,
                    char *buf, size_t bufsize)
{
  for (uint32_t i = 0; i + 48 <= len; i += 48)
    if (table[i] == type && table[i + 1] == bit) {
      snprintf (buf, bufsize, "%.46s", (const char *) &table[i + 2]);
      return buf;
    }
  return NULL;
}

const char *
qcow_feature_name (int type, int bit)
{
  for (size_t i = 0; i < sizeof known_features / sizeof known_features[0]; i++)
    if (known_features[i].type == type && known_features[i].bit == bit)
      return known_features[i].name;
  return NULL;
}

static bool
overlaps (uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
  return a < b + blen && b < a + alen;
}

/* The header's fields as BUF holds them (at least 104 bytes), not
 * validated: the version 3 fields only for version 3 (version 2 gets its
 * implied refcount order and header length); the backing file name's
 * offset and length go to *BACKING_OFF and *BACKING_LEN.  Shared by
 * header_parse and the tolerant reading of qcow_check_file. */
void
header_read_fields (const uint8_t *buf, struct qcow_header *h,
                    uint64_t *backing_off, uint32_t *backing_len)
{
  memset (h, 0, sizeof *h);
  h->version = rd32 (buf + 4);
  *backing_off = rd64 (buf + 8);
  *backing_len = rd32 (buf + 16);
  h->cluster_bits = rd32 (buf + 20);
  h->size = rd64 (buf + 24);
  h->crypt_method = rd32 (buf + 32);
  h->l1_size = rd32 (buf + 36);
  h->l1_table_offset = rd64 (buf + 40);
  h->refcount_table_offset = rd64 (buf + 48);
  h->refcount_table_clusters = rd32 (buf + 56);
  h->nb_snapshots = rd32 (buf + 60);
  h->snapshots_offset = rd64 (buf + 64);
  if (h->version == 3) {
    h->incompatible_features = rd64 (buf + 72);
    h->compatible_features = rd64 (buf + 80);
    h->autoclear_features = rd64 (buf + 88);
    h->refcount_order = rd32 (buf + 96);
    h->header_length = rd32 (buf + 100);
  }
  else {
    h->refcount_order = 4;
    h->header_length = QCOW_V2_HEADER_LEN;
  }
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
  header_read_fields (buf, h, &backing_off, &backing_len);
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
    if (file_size < 104) {
      ERR (q, "file is truncated (%" PRIu64 " bytes): no room for the "
           "version 3 header", file_size);
      return -EINVAL;
    }
    if (h->header_length < 104 || h->header_length % 8 != 0 ||
        h->header_length > cs) {
      ERR (q, "header_length %" PRIu32 " is invalid (must be a multiple of 8 "
           "between 104 and the cluster size)", h->header_length);
      return -EINVAL;
    }
    if (h->header_length > 104)
      h->compression_type = buf[104];
  }
  if (file_size < h->header_length) {
    ERR (q, "file is truncated: shorter than its header");
    return -EINVAL;
  }
  if (h->refcount_order > 6) {
    ERR (q, "refcount_order %" PRIu32 " is invalid (at most 6)", h->refcount_order);
    return -EINVAL;
  }

  /* Header extensions: walk them all, bounded by the first cluster. */
  const uint8_t *ftable = NULL;
  uint32_t ftable_len = 0;
  bool have_data_file_ext = false, have_crypt_ext = false;
  uint64_t end = cs < file_size ? cs : file_size;
  if (backing_off && backing_off < end)
    end = backing_off;
  for (uint64_t off = h->header_length;;) {
    if (off + 8 > end)
      break;                    /* no end marker before the limit: tolerated */
    uint32_t type = rd32 (buf + off), len = rd32 (buf + off + 4);
    if (type == EXT_END)
      break;
    if (len > end - off - 8) {
      ERR (q, "header extension 0x%08" PRIx32 " at offset %" PRIu64
           " (length %" PRIu32 ") runs past the end of the header",
           type, off, len);
      return -EINVAL;
    }
    const uint8_t *data = buf + off + 8;
    switch (type) {
    case EXT_BACKING_FORMAT:
      snprintf (h->backing_format, sizeof h->backing_format, "%.*s",
                (int) (len < sizeof h->backing_format ? len : sizeof h->backing_format - 1),
                (const char *) data);
      break;
    case EXT_FEATURE_TABLE:
      ftable = data; ftable_len = len;
      break;
    case EXT_DATA_FILE:
      have_data_file_ext = true;
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
    off += 8 + ((len + 7ULL) & ~7ULL);
  }

  /* Features. */
  uint64_t unknown = h->incompatible_features & ~KNOWN_INCOMPAT;
  if (unknown) {
    int bit = __builtin_ctzll (unknown);
    char nbuf[64];
    const char *name = image_feature_name (ftable, ftable_len, 0, bit, nbuf, sizeof nbuf);
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
  (void) have_data_file_ext;
  if ((h->incompatible_features & QCOW_INCOMPAT_EXTL2) && h->cluster_bits < 14) {
    ERR (q, "extended L2 entries need clusters of at least 16 KiB");
    return -EINVAL;
  }
  if ((h->incompatible_features & QCOW_INCOMPAT_EXTL2) &&
      (h->incompatible_features & QCOW_INCOMPAT_DATA_FILE)) {
    ERR (q, "extended L2 entries with an external data file are not supported");
    return -ENOTSUP;
  }
  if (h->incompatible_features & QCOW_INCOMPAT_COMPRESSION) {
    if (h->header_length <= 104 || h->compression_type != 1) {
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
    if (backing_len == 0 || backing_len > 1023 || backing_off > cs ||
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
  q->refcount_max = h->refcount_order == 6 ? UINT64_MAX
    : (1ULL << (1u << h->refcount_order)) - 1;

  if (h->size > (1ULL << 62)) {
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

/* Write header bytes [off, off+len) from q->h. */
int
header_write_fields (struct qcow *q, unsigned off, unsigned len)
{
  uint8_t buf[QCOW_V3_HEADER_LEN];
  const struct qcow_header *h = &q->h;
  memset (buf, 0, sizeof buf);
  wr32 (buf, QCOW_MAGIC);
  wr32 (buf + 4, h->version);
  wr32 (buf + 20, h->cluster_bits);
  wr64 (buf + 24, h->size);
  wr32 (buf + 36, h->l1_size);
  wr64 (buf + 40, h->l1_table_offset);
  wr64 (buf + 48, h->refcount_table_offset);
  wr32 (buf + 56, h->refcount_table_clusters);
  wr32 (buf + 60, h->nb_snapshots);
  wr64 (buf + 64, h->snapshots_offset);
  wr64 (buf + 72, h->incompatible_features);
  wr64 (buf + 80, h->compatible_features);
  wr64 (buf + 88, h->autoclear_features);
  wr32 (buf + 96, h->refcount_order);
  wr32 (buf + 100, h->header_length);
  if (off + len > (h->version == 2 ? QCOW_V2_HEADER_LEN : 104) || off < 20) {
    ERR (q, "internal error: header write of [%u, %u)", off, off + len);
    return -EINVAL;
  }
  return io_pwrite (q, buf + off, len, off);
}

int
header_set_incompat (struct qcow *q, uint64_t incompat)
{
  q->h.incompatible_features = incompat;
  int r = header_write_fields (q, 72, 8);
  if (r == 0)
    r = io_sync (q);
  return r;
}

/* Build the first cluster of a new image into BUF; returns its length. */
size_t
header_build (uint8_t *buf, size_t bufsize, const struct qcow_create_opts *o,
              uint64_t l1_offset, uint32_t l1_size)
{
  memset (buf, 0, bufsize);
  wr32 (buf, QCOW_MAGIC);
  wr32 (buf + 4, o->version);
  wr32 (buf + 20, o->cluster_bits);
  wr64 (buf + 24, o->size);
  wr32 (buf + 36, l1_size);
  wr64 (buf + 40, l1_offset);
  /* refcount table fields (48, 56) are filled in by the caller */
  size_t off = QCOW_V2_HEADER_LEN;
  if (o->version == 3) {
    wr64 (buf + 80, o->lazy_refcounts ? QCOW_COMPAT_LAZY_REFCOUNTS : 0);
    wr32 (buf + 96, o->refcount_order);
    wr32 (buf + 100, QCOW_V3_HEADER_LEN);
    off = QCOW_V3_HEADER_LEN;
    /* Feature name table, as QEMU writes it, if it fits. */
    size_t n = sizeof known_features / sizeof known_features[0];
    if (off + 8 + n * 48 + 8 <= bufsize) {
      wr32 (buf + off, EXT_FEATURE_TABLE);
      wr32 (buf + off + 4, n * 48);
      for (size_t i = 0; i < n; i++) {
        uint8_t *e = buf + off + 8 + i * 48;
        e[0] = known_features[i].type;
        e[1] = known_features[i].bit;
        memcpy (e + 2, known_features[i].name, strlen (known_features[i].name));
      }
      off += 8 + n * 48;
    }
  }
  off += 8;                     /* end marker (zeros) */
  return off;
}

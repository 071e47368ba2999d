/* SPDX-License-Identifier: BSD-3-Clause */
/* format.h - the on-disk structures of qcow2, decoded and encoded in one
 * place (docs/interop/qcow2.txt in QEMU's tree is the specification).
 *
 * Everything here works on a buffer and the image's geometry: no I/O, no
 * state, no validation against the file (the callers decide what to
 * trust: the live image refuses, check reports).  The live core
 * (header.c, cluster.c, refcount.c, compress.c, snapshot.c) and
 * check/repair (check.c, repair.c) both read the format through here. */
#ifndef QCOW_FORMAT_H
#define QCOW_FORMAT_H

#include <endian.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "qcow.h"

/* ---- big-endian fields ---- */
static inline uint64_t rd64 (const void *p) { uint64_t v; memcpy (&v, p, 8); return be64toh (v); }
static inline uint32_t rd32 (const void *p) { uint32_t v; memcpy (&v, p, 4); return be32toh (v); }
static inline uint16_t rd16 (const void *p) { uint16_t v; memcpy (&v, p, 2); return be16toh (v); }
static inline void wr64 (void *p, uint64_t v) { v = htobe64 (v); memcpy (p, &v, 8); }
static inline void wr32 (void *p, uint32_t v) { v = htobe32 (v); memcpy (p, &v, 4); }
static inline void wr16 (void *p, uint16_t v) { v = htobe16 (v); memcpy (p, &v, 2); }

/* ---- the header ---- */
#define QCOW_MAGIC 0x514649fbU            /* "QFI\xfb" */
#define QCOW_V2_HEADER_LEN 72
#define QCOW_V3_MIN_HEADER_LEN 104        /* without compression_type */
#define QCOW_V3_HEADER_LEN 112            /* what we write */
#define QCOW_MIN_CLUSTER_BITS 9
#define QCOW_MAX_CLUSTER_BITS 21
#define QCOW_MAX_REFCOUNT_ORDER 6
#define QCOW_MAX_L1_BYTES (32u << 20)     /* QEMU's limit */
#define QCOW_MAX_RCT_BYTES (8u << 20)     /* QEMU's limit */
#define QCOW_MAX_HOST_OFFSET (1ULL << 56) /* L2 entries hold bits 9..55 */
#define QCOW_MAX_VIRTUAL_SIZE (1ULL << 62)
#define QCOW_MAX_BACKING_NAME 1023

/* Byte offsets of the header's fields. */
enum {
  HDR_MAGIC = 0, HDR_VERSION = 4, HDR_BACKING_OFFSET = 8,
  HDR_BACKING_SIZE = 16, HDR_CLUSTER_BITS = 20, HDR_SIZE = 24,
  HDR_CRYPT_METHOD = 32, HDR_L1_SIZE = 36, HDR_L1_OFFSET = 40,
  HDR_RCT_OFFSET = 48, HDR_RCT_CLUSTERS = 56, HDR_NB_SNAPSHOTS = 60,
  HDR_SNAPSHOTS_OFFSET = 64,
  /* version 3 */
  HDR_INCOMPAT = 72, HDR_COMPAT = 80, HDR_AUTOCLEAR = 88,
  HDR_REFCOUNT_ORDER = 96, HDR_HEADER_LENGTH = 100,
  HDR_COMPRESSION_TYPE = 104,
};

#define KNOWN_INCOMPAT (QCOW_INCOMPAT_DIRTY | QCOW_INCOMPAT_CORRUPT | \
                        QCOW_INCOMPAT_DATA_FILE | QCOW_INCOMPAT_COMPRESSION | \
                        QCOW_INCOMPAT_EXTL2)
#define COMPRESSION_ZLIB 0
#define COMPRESSION_ZSTD 1

/* The fixed fields of BUF (at least 112 bytes), not validated: version 3
 * fields only for version 3 (version 2 gets its implied refcount order
 * and header length); compression_type only if the header is long enough
 * to hold it.  The backing file name's place goes to *BACKING_OFF and
 * *BACKING_LEN. */
void fmt_header_decode (const uint8_t *buf, struct qcow_header *h,
                        uint64_t *backing_off, uint32_t *backing_len);
/* The fixed fields of H into BUF (QCOW_V3_HEADER_LEN bytes); the backing
 * file name's place as given. */
void fmt_header_encode (uint8_t *buf, const struct qcow_header *h,
                        uint64_t backing_off, uint32_t backing_len);

/* Header extensions. */
#define EXT_END            0x00000000U
#define EXT_BACKING_FORMAT 0xe2792acaU
#define EXT_FEATURE_TABLE  0x6803f857U
#define EXT_BITMAPS        0x23852875U
#define EXT_ENCRYPTION     0x0537be77U
#define EXT_DATA_FILE      0x44415441U
struct fmt_ext {
  uint32_t type, len;
  uint64_t off;            /* of its data in the header cluster */
};
/* The extension at *OFF, before END (the end of the header cluster or
 * the start of the backing file name), into *X; *OFF moves past it.
 * Returns 1 for an extension, 0 at the end marker or when no room is left
 * for another, -1 if its length runs past END (checked for the end
 * marker too, as QEMU does). */
int fmt_ext_next (const uint8_t *buf, uint64_t *off, uint64_t end,
                  struct fmt_ext *x);

/* The feature name table extension: 48-byte entries (type, bit, name). */
#define FEATURE_ENTRY_LEN 48
#define FEATURE_NAME_LEN 46
/* The name TABLE (LEN bytes) gives feature TYPE/BIT, into BUF; or NULL. */
const char *fmt_feature_table_name (const uint8_t *table, uint32_t len,
                                    int type, int bit, char *buf, size_t size);
/* The feature name table we write: its length, and it into BUF. */
size_t fmt_feature_table_encode (uint8_t *buf, size_t size);

/* The bitmaps extension (24 bytes used) and bitmap directory entries. */
struct fmt_bitmaps_ext {
  uint32_t nb_bitmaps;
  uint64_t dir_size, dir_offset;
};
#define BITMAPS_EXT_LEN 24
void fmt_bitmaps_ext_decode (const uint8_t *data, struct fmt_bitmaps_ext *x);
#define BITMAP_DIR_ENTRY_LEN 24          /* without the name and extra */
struct fmt_bitmap_entry {
  uint64_t table_offset;
  uint32_t table_size;
  uint64_t len;            /* of the whole entry, padded to 8 */
};
/* The entry at D (AVAIL bytes left), or -1 if it is truncated. */
int fmt_bitmap_entry_decode (const uint8_t *d, uint64_t avail,
                             struct fmt_bitmap_entry *e);
#define BITMAP_OFFSET_MASK 0x00fffffffffffe00ULL

/* ---- L1 and L2 table entries ---- */
#define ENTRY_COPIED      (1ULL << 63)
#define ENTRY_COMPRESSED  (1ULL << 62)
#define ENTRY_ZERO        1ULL
#define L1_OFFSET_MASK    0x00fffffffffffe00ULL
#define L1_RESERVED_MASK  0x7f000000000001ffULL
#define L2_OFFSET_MASK    0x00fffffffffffe00ULL
#define L2_RESERVED_MASK  0x3f000000000001feULL
#define RCT_OFFSET_MASK   0xfffffffffffffe00ULL
/* Extended L2 entries: a second word, 32 "allocated" bits (low) and 32
 * "reads as zero" bits (high), one pair per subcluster. */
#define EXTL2_SUBCLUSTERS 32
#define EXTL2_ALLOC_MASK  0x00000000ffffffffULL
#define EXTL2_ZERO_MASK   0xffffffff00000000ULL
#define EXTL2_MIN_CLUSTER_BITS 14

/* Where the compressed data of descriptor ENT lies in the file (bytes;
 * it may run past the end of the file for the last one). */
void fmt_compressed_extent (unsigned cluster_bits, uint64_t ent,
                            uint64_t *off, uint64_t *len);
/* The descriptor (without ENTRY_COMPRESSED) of LEN bytes of compressed
 * data at OFF: the inverse of fmt_compressed_extent. */
uint64_t fmt_compressed_desc (unsigned cluster_bits, uint64_t off, uint64_t len);

/* ---- refcount blocks: entries of 2^ORDER bits ---- */
uint64_t fmt_refcount_get (unsigned order, const uint8_t *block, uint64_t i);
void fmt_refcount_set (unsigned order, uint8_t *block, uint64_t i, uint64_t v);
static inline uint64_t
fmt_refcount_max (unsigned order)
{
  return order == 6 ? UINT64_MAX : (1ULL << (1u << order)) - 1;
}

/* ---- the snapshot table ---- */
#define MAX_SNAPSHOTS 65536                 /* QEMU's limits */
#define MAX_SNAPSHOT_TABLE (64u << 20)
#define MAX_SNAPSHOT_EXTRA 1024
#define SNAPSHOT_ENTRY_LEN 40               /* without extra, id and name */
#define SNAPSHOT_EXTRA_V3 16                /* version 3 needs this much */
struct fmt_snapshot {
  uint64_t l1_offset;
  uint32_t l1_size;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t vm_state_size;  /* the 64-bit one when extra data has it */
  uint32_t extra_len;
  bool has_disk_size;
  uint64_t disk_size;      /* extra data, when it holds it */
  bool has_icount;
  uint64_t icount;
  const uint8_t *id, *name;/* inside the buffer, not terminated */
  uint16_t id_len, name_len;
  uint64_t len;            /* of the whole entry, padded to 8 */
};
/* The entry at E (AVAIL bytes left).  Returns 0, or -1 if it does not
 * fit in AVAIL, -2 if its extra data is longer than MAX_SNAPSHOT_EXTRA. */
int fmt_snapshot_decode (const uint8_t *e, uint64_t avail,
                         struct fmt_snapshot *s);
/* S (id, name, extra_len >= 24 for version 3) into E, which has room for
 * fmt_snapshot_len (S); the padding is zeroed.  Returns the length. */
uint64_t fmt_snapshot_len (const struct fmt_snapshot *s);
uint64_t fmt_snapshot_encode (uint8_t *e, const struct fmt_snapshot *s);

#endif /* QCOW_FORMAT_H */

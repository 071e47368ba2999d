/* SPDX-License-Identifier: BSD-3-Clause */
/* format.c - encode and decode the on-disk structures (format.h).
 *
 * Pure functions over buffers: what a field means is decided here once;
 * whether a value is acceptable is the caller's business (the live image
 * refuses what it cannot trust, check reports it). */
#include <stdio.h>

#include "format.h"

void
fmt_header_decode (const uint8_t *buf, struct qcow_header *h,
                   uint64_t *backing_off, uint32_t *backing_len)
{
  memset (h, 0, sizeof *h);
  h->version = rd32 (buf + HDR_VERSION);
  *backing_off = rd64 (buf + HDR_BACKING_OFFSET);
  *backing_len = rd32 (buf + HDR_BACKING_SIZE);
  h->cluster_bits = rd32 (buf + HDR_CLUSTER_BITS);
  h->size = rd64 (buf + HDR_SIZE);
  h->crypt_method = rd32 (buf + HDR_CRYPT_METHOD);
  h->l1_size = rd32 (buf + HDR_L1_SIZE);
  h->l1_table_offset = rd64 (buf + HDR_L1_OFFSET);
  h->refcount_table_offset = rd64 (buf + HDR_RCT_OFFSET);
  h->refcount_table_clusters = rd32 (buf + HDR_RCT_CLUSTERS);
  h->nb_snapshots = rd32 (buf + HDR_NB_SNAPSHOTS);
  h->snapshots_offset = rd64 (buf + HDR_SNAPSHOTS_OFFSET);
  if (h->version == 3) {
    h->incompatible_features = rd64 (buf + HDR_INCOMPAT);
    h->compatible_features = rd64 (buf + HDR_COMPAT);
    h->autoclear_features = rd64 (buf + HDR_AUTOCLEAR);
    h->refcount_order = rd32 (buf + HDR_REFCOUNT_ORDER);
    h->header_length = rd32 (buf + HDR_HEADER_LENGTH);
    if (h->header_length > HDR_COMPRESSION_TYPE)
      h->compression_type = buf[HDR_COMPRESSION_TYPE];
  }
  else {
    h->refcount_order = 4;
    h->header_length = QCOW_V2_HEADER_LEN;
  }
}

void
fmt_header_encode (uint8_t *buf, const struct qcow_header *h,
                   uint64_t backing_off, uint32_t backing_len)
{
  memset (buf, 0, QCOW_V3_HEADER_LEN);
  wr32 (buf + HDR_MAGIC, QCOW_MAGIC);
  wr32 (buf + HDR_VERSION, h->version);
  wr64 (buf + HDR_BACKING_OFFSET, backing_off);
  wr32 (buf + HDR_BACKING_SIZE, backing_len);
  wr32 (buf + HDR_CLUSTER_BITS, h->cluster_bits);
  wr64 (buf + HDR_SIZE, h->size);
  wr32 (buf + HDR_CRYPT_METHOD, h->crypt_method);
  wr32 (buf + HDR_L1_SIZE, h->l1_size);
  wr64 (buf + HDR_L1_OFFSET, h->l1_table_offset);
  wr64 (buf + HDR_RCT_OFFSET, h->refcount_table_offset);
  wr32 (buf + HDR_RCT_CLUSTERS, h->refcount_table_clusters);
  wr32 (buf + HDR_NB_SNAPSHOTS, h->nb_snapshots);
  wr64 (buf + HDR_SNAPSHOTS_OFFSET, h->snapshots_offset);
  if (h->version < 3)
    return;
  wr64 (buf + HDR_INCOMPAT, h->incompatible_features);
  wr64 (buf + HDR_COMPAT, h->compatible_features);
  wr64 (buf + HDR_AUTOCLEAR, h->autoclear_features);
  wr32 (buf + HDR_REFCOUNT_ORDER, h->refcount_order);
  wr32 (buf + HDR_HEADER_LENGTH, h->header_length);
  if (h->header_length > HDR_COMPRESSION_TYPE)
    buf[HDR_COMPRESSION_TYPE] = h->compression_type;
}

int
fmt_ext_next (const uint8_t *buf, uint64_t *off, uint64_t end,
              struct fmt_ext *x)
{
  if (*off + 8 > end)
    return 0;                   /* no room for another: tolerated */
  x->type = rd32 (buf + *off);
  x->len = rd32 (buf + *off + 4);
  x->off = *off + 8;
  if (x->len > end - *off - 8)
    return -1;
  if (x->type == EXT_END)
    return 0;
  *off += 8 + ((x->len + 7ULL) & ~7ULL);
  return 1;
}

/* The features we know, as the feature name table names them. */
static const struct { uint8_t type, bit; const char *name; } known_features[] = {
  { 0, 0, "dirty bit" },
  { 0, 1, "corrupt bit" },
  { 0, 2, "external data file" },
  { 0, 3, "compression type" },
  { 0, 4, "extended L2 entries" },
  { 1, 0, "lazy refcounts" },
  { 2, 0, "bitmaps" },
  { 2, 1, "raw external data" },
};
#define NKNOWN (sizeof known_features / sizeof known_features[0])

const char *
qcow_feature_name (int type, int bit)
{
  for (size_t i = 0; i < NKNOWN; i++)
    if (known_features[i].type == type && known_features[i].bit == bit)
      return known_features[i].name;
  return NULL;
}

const char *
fmt_feature_table_name (const uint8_t *table, uint32_t len, int type, int bit,
                        char *buf, size_t size)
{
  for (uint32_t i = 0; table && i + FEATURE_ENTRY_LEN <= len; i += FEATURE_ENTRY_LEN)
    if (table[i] == type && table[i + 1] == bit) {
      snprintf (buf, size, "%.*s", FEATURE_NAME_LEN, (const char *) &table[i + 2]);
      return buf;
    }
  return NULL;
}

size_t
fmt_feature_table_encode (uint8_t *buf, size_t size)
{
  size_t len = NKNOWN * FEATURE_ENTRY_LEN;
  if (len > size)
    return 0;
  memset (buf, 0, len);
  for (size_t i = 0; i < NKNOWN; i++) {
    uint8_t *e = buf + i * FEATURE_ENTRY_LEN;
    e[0] = known_features[i].type;
    e[1] = known_features[i].bit;
    memcpy (e + 2, known_features[i].name, strlen (known_features[i].name));
  }
  return len;
}

void
fmt_bitmaps_ext_decode (const uint8_t *data, struct fmt_bitmaps_ext *x)
{
  x->nb_bitmaps = rd32 (data);
  /* 4 reserved bytes */
  x->dir_size = rd64 (data + 8);
  x->dir_offset = rd64 (data + 16);
}

int
fmt_bitmap_entry_decode (const uint8_t *d, uint64_t avail,
                         struct fmt_bitmap_entry *e)
{
  if (avail < BITMAP_DIR_ENTRY_LEN)
    return -1;
  uint64_t name_len = rd16 (d + 18), extra_len = rd32 (d + 20);
  uint64_t len = BITMAP_DIR_ENTRY_LEN + extra_len + name_len;
  if (len > avail)
    return -1;
  e->table_offset = rd64 (d);
  e->table_size = rd32 (d + 8);
  e->len = (len + 7) & ~7ULL;
  return 0;
}

/* A compressed descriptor: the host offset in the low X bits, the number
 * of additional 512-byte sectors above them (x = 62 - (cluster_bits - 8)). */
void
fmt_compressed_extent (unsigned cluster_bits, uint64_t ent,
                       uint64_t *off, uint64_t *len)
{
  unsigned x = 62 - (cluster_bits - 8);
  uint64_t nsect = ((ent >> x) & ((1ULL << (cluster_bits - 8)) - 1)) + 1;
  *off = ent & ((1ULL << x) - 1);
  *len = nsect * 512 - (*off & 511);
}

uint64_t
fmt_compressed_desc (unsigned cluster_bits, uint64_t off, uint64_t len)
{
  unsigned x = 62 - (cluster_bits - 8);
  uint64_t nsect = ((off + len - 1) >> 9) - (off >> 9);  /* additional sectors */
  return off | nsect << x;
}

uint64_t
fmt_refcount_get (unsigned order, const uint8_t *d, uint64_t i)
{
  switch (order) {
  case 0: case 1: case 2: {
    unsigned bits = 1u << order;
    uint64_t bit = i * bits;
    return (d[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
  }
  case 3: return d[i];
  case 4: return rd16 (d + 2 * i);
  case 5: return rd32 (d + 4 * i);
  default: return rd64 (d + 8 * i);
  }
}

void
fmt_refcount_set (unsigned order, uint8_t *d, uint64_t i, uint64_t v)
{
  switch (order) {
  case 0: case 1: case 2: {
    unsigned bits = 1u << order;
    uint64_t bit = i * bits;
    uint8_t mask = ((1u << bits) - 1) << (bit % 8);
    d[bit / 8] = (d[bit / 8] & ~mask) | ((v << (bit % 8)) & mask);
    break;
  }
  case 3: d[i] = v; break;
  case 4: wr16 (d + 2 * i, v); break;
  case 5: wr32 (d + 4 * i, v); break;
  default: wr64 (d + 8 * i, v); break;
  }
}

/* Snapshot table entries:
 *    0  l1_table_offset     8  l1_size     12  id_str_size  14  name_size
 *   16  date_sec           20  date_nsec   24  vm_clock_nsec
 *   32  vm_state_size      36  extra_data_size
 *   40  extra data: vm_state_size_large (8), disk_size (8), icount (8)
 *   then the id, the name, padding to 8 bytes. */
enum { SN_L1_OFFSET = 0, SN_L1_SIZE = 8, SN_ID_LEN = 12, SN_NAME_LEN = 14,
       SN_DATE_SEC = 16, SN_DATE_NSEC = 20, SN_VM_CLOCK = 24,
       SN_VM_STATE_SIZE = 32, SN_EXTRA_LEN = 36,
       SN_X_VM_STATE = 0, SN_X_DISK_SIZE = 8, SN_X_ICOUNT = 16 };

int
fmt_snapshot_decode (const uint8_t *e, uint64_t avail, struct fmt_snapshot *s)
{
  memset (s, 0, sizeof *s);
  if (avail < SNAPSHOT_ENTRY_LEN)
    return -1;
  s->l1_offset = rd64 (e + SN_L1_OFFSET);
  s->l1_size = rd32 (e + SN_L1_SIZE);
  s->id_len = rd16 (e + SN_ID_LEN);
  s->name_len = rd16 (e + SN_NAME_LEN);
  s->date_sec = rd32 (e + SN_DATE_SEC);
  s->date_nsec = rd32 (e + SN_DATE_NSEC);
  s->vm_clock_nsec = rd64 (e + SN_VM_CLOCK);
  s->vm_state_size = rd32 (e + SN_VM_STATE_SIZE);
  s->extra_len = rd32 (e + SN_EXTRA_LEN);
  if (s->extra_len > MAX_SNAPSHOT_EXTRA)
    return -2;
  uint64_t len = SNAPSHOT_ENTRY_LEN + (uint64_t) s->extra_len + s->id_len + s->name_len;
  if (len > avail)
    return -1;
  const uint8_t *x = e + SNAPSHOT_ENTRY_LEN;
  if (s->extra_len >= SN_X_VM_STATE + 8)
    s->vm_state_size = rd64 (x + SN_X_VM_STATE);
  if (s->extra_len >= SN_X_DISK_SIZE + 8) {
    s->has_disk_size = true;
    s->disk_size = rd64 (x + SN_X_DISK_SIZE);
  }
  if (s->extra_len >= SN_X_ICOUNT + 8) {
    s->has_icount = true;
    s->icount = rd64 (x + SN_X_ICOUNT);
  }
  s->id = x + s->extra_len;
  s->name = s->id + s->id_len;
  s->len = (len + 7) & ~7ULL;
  return 0;
}

uint64_t
fmt_snapshot_len (const struct fmt_snapshot *s)
{
  return (SNAPSHOT_ENTRY_LEN + (uint64_t) s->extra_len + s->id_len +
          s->name_len + 7) & ~7ULL;
}

uint64_t
fmt_snapshot_encode (uint8_t *e, const struct fmt_snapshot *s)
{
  uint64_t len = fmt_snapshot_len (s);
  memset (e, 0, len);
  wr64 (e + SN_L1_OFFSET, s->l1_offset);
  wr32 (e + SN_L1_SIZE, s->l1_size);
  wr16 (e + SN_ID_LEN, s->id_len);
  wr16 (e + SN_NAME_LEN, s->name_len);
  wr32 (e + SN_DATE_SEC, s->date_sec);
  wr32 (e + SN_DATE_NSEC, s->date_nsec);
  wr64 (e + SN_VM_CLOCK, s->vm_clock_nsec);
  wr32 (e + SN_VM_STATE_SIZE, s->vm_state_size > UINT32_MAX ? 0 : s->vm_state_size);
  wr32 (e + SN_EXTRA_LEN, s->extra_len);
  uint8_t *x = e + SNAPSHOT_ENTRY_LEN;
  if (s->extra_len >= SN_X_VM_STATE + 8)
    wr64 (x + SN_X_VM_STATE, s->vm_state_size);
  if (s->extra_len >= SN_X_DISK_SIZE + 8)
    wr64 (x + SN_X_DISK_SIZE, s->disk_size);
  if (s->extra_len >= SN_X_ICOUNT + 8)
    wr64 (x + SN_X_ICOUNT, s->has_icount ? s->icount : UINT64_MAX);
  memcpy (x + s->extra_len, s->id, s->id_len);
  memcpy (x + s->extra_len + s->id_len, s->name, s->name_len);
  return len;
}

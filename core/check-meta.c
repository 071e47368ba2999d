/* SPDX-License-Identifier: BSD-3-Clause */
/* check-meta.c - the check's reading of the structures around the tables:
 * the header and its extensions (tolerantly: only what leaves nothing to
 * walk stops the check), the snapshot table and each snapshot's tables,
 * and the persistent bitmaps.  The walk itself is check.c's. */
#include <stdio.h>
#include <stdlib.h>

#include "walk.h"

/* ---- snapshots and bitmaps ---- */

void
walk_snapshots (struct walk *w)
{
  const struct qcow_header *h = &w->h;
  const uint64_t cs = w->cs;
  if (h->nb_snapshots == 0)
    return;
  if (h->snapshots_offset >= w->file_size) {
    PROBLEM (w, QCOW_PROBLEM_OUTSIDE_FILE, "snapshot table", 64,
             h->snapshots_offset, "ERROR snapshot table (%" PRIu32
             " snapshots at 0x%" PRIx64 ") is outside the file",
             h->nb_snapshots, h->snapshots_offset);
    if (w->plan)
      refuse (w, "the snapshot table is damaged");
    return;
  }
  uint64_t avail = w->file_size - h->snapshots_offset;
  if (avail > MAX_SNAPSHOT_TABLE)
    avail = MAX_SNAPSHOT_TABLE;
  uint8_t *t = malloc (avail);
  if (!t) {
    w->err = -ENOMEM;
    fail (w->res, "out of memory for the snapshot table");
    return;
  }
  if (rd (w, t, avail, h->snapshots_offset) < 0)
    goto out;
  uint64_t off = 0;
  for (uint32_t i = 0; i < h->nb_snapshots; i++) {
    struct fmt_snapshot e;
    int d = fmt_snapshot_decode (t + off, off < avail ? avail - off : 0, &e);
    if (d == 0 && h->version >= 3 && e.extra_len < SNAPSHOT_EXTRA_V3) {
      /* Version 3 needs the large VM state size and the disk size. */
      PROBLEM (w, QCOW_PROBLEM_INVALID, "snapshot table",
               h->snapshots_offset + off, h->snapshots_offset,
               "ERROR snapshot table entry %" PRIu32 " is incomplete (%"
               PRIu32 " bytes of extra data)", i, e.extra_len);
      if (w->plan)
        refuse (w, "the snapshot table is incomplete");
    }
    if (d < 0) {
      /* Without the table the snapshots' clusters cannot be counted
       * (QEMU gives up here too). */
      w->err = -EINVAL;
      fail (w->res, "snapshot table entry %" PRIu32 " at 0x%" PRIx64
            " is truncated or malformed", i, h->snapshots_offset + off);
      goto out;
    }
    off += e.len;
  }
  ref_range (w, h->snapshots_offset, off, R_SNAPTABLE, 64, true);

  off = 0;
  for (uint32_t i = 0; i < h->nb_snapshots && !w->err; i++) {
    struct fmt_snapshot e;
    uint64_t src = h->snapshots_offset + off;
    fmt_snapshot_decode (t + off, avail - off, &e);   /* (checked above) */
    uint64_t l1off = e.l1_offset;
    uint32_t l1_size = e.l1_size;
    off += e.len;
    if (l1_size == 0)
      continue;
    if (l1_size > QCOW_MAX_L1_BYTES / 8 || l1off % cs) {
      PROBLEM (w, l1off % cs ? QCOW_PROBLEM_MISALIGNED : QCOW_PROBLEM_INVALID,
               "snapshot L1 table", src, l1off,
               "ERROR snapshot %" PRIu32 ": L1 table at 0x%" PRIx64 " (%"
               PRIu32 " entries) is %s", i, l1off, l1_size,
               l1off % cs ? "not cluster aligned" : "too large");
      if (w->plan)
        refuse (w, "snapshot %" PRIu32 "'s L1 table is damaged", i);
      continue;
    }
    w->snap = true;
    /* One that overlaps something else is not followed: its entries are
     * counted already, or are not entries. */
    if (ref_range (w, l1off, (uint64_t) l1_size * 8, R_SNAP_L1, src, true) > 0)
      walk_l1 (w, l1off, l1_size, false);
    w->snap = false;
  }
 out:
  free (t);
}

void
walk_bitmaps (struct walk *w)
{
  const uint64_t cs = w->cs;
  if (!w->bm_ext || !(w->h.autoclear_features & QCOW_AUTOCLEAR_BITMAPS))
    return;                     /* absent, or inconsistent and ignored */
  w->res->bitmaps_checked = true;
  uint64_t dsize = w->bm.dir_size, doff = w->bm.dir_offset;
  if (w->bm.nb_bitmaps == 0)
    return;
  if (dsize > MAX_BITMAP_DIR || doff % cs) {
    PROBLEM (w, QCOW_PROBLEM_INVALID, "bitmap directory", w->bm_ext + 16, doff,
             "ERROR bitmap directory at 0x%" PRIx64 " (%" PRIu64 " bytes) is "
             "%s", doff, dsize, doff % cs ? "not cluster aligned" : "too large");
    return;
  }
  if (ref_range (w, doff, dsize, R_BITMAP_DIR, w->bm_ext + 16, true) <= 0)
    return;
  uint8_t *d = malloc (dsize ? dsize : 1);
  uint64_t *tab = NULL;
  if (!d) {
    w->err = -ENOMEM;
    fail (w->res, "out of memory for the bitmap directory");
    return;
  }
  if (rd (w, d, dsize, doff) < 0)
    goto out;
  uint64_t off = 0;
  for (uint32_t i = 0; i < w->bm.nb_bitmaps && !w->err; i++) {
    uint64_t src = doff + off;
    struct fmt_bitmap_entry be;
    if (fmt_bitmap_entry_decode (d + off, dsize - off, &be) < 0) {
      PROBLEM (w, QCOW_PROBLEM_INVALID, "bitmap directory", src, doff,
               "ERROR bitmap directory entry %" PRIu32 " is truncated", i);
      break;
    }
    uint64_t toff = be.table_offset;
    uint32_t tsize = be.table_size;
    off += be.len;
    if (off > dsize)
      off = dsize;
    if (tsize > MAX_BITMAP_TABLE || toff % cs) {
      PROBLEM (w, QCOW_PROBLEM_INVALID, "bitmap table", src, toff,
               "ERROR bitmap %" PRIu32 ": table at 0x%" PRIx64 " (%" PRIu32
               " entries) is %s", i, toff, tsize,
               toff % cs ? "not cluster aligned" : "too large");
      continue;
    }
    if (ref_range (w, toff, (uint64_t) tsize * 8, R_BITMAP_TABLE, src, true) <= 0)
      continue;                 /* outside, or overlapping: not followed */
    free (tab);
    if (!(tab = malloc ((uint64_t) (tsize ? tsize : 1) * 8))) {
      w->err = -ENOMEM;
      fail (w->res, "out of memory for a bitmap table");
      break;
    }
    if (rd (w, tab, (uint64_t) tsize * 8, toff) < 0)
      break;
    for (uint32_t j = 0; j < tsize; j++) {
      uint64_t e = be64toh (tab[j]), boff = e & BITMAP_OFFSET_MASK;
      if (!boff)
        continue;
      if (boff % cs)
        PROBLEM (w, QCOW_PROBLEM_MISALIGNED, "bitmap data cluster",
                 toff + 8ULL * j, boff, "ERROR bitmap %" PRIu32 ": data "
                 "cluster 0x%" PRIx64 " is not cluster aligned", i, boff);
      else
        ref_range (w, boff, cs, R_BITMAP_DATA, toff + 8ULL * j, true);
    }
  }
 out:
  free (tab);
  free (d);
}

/* ---- the header ---- */

/* Parse the header from W->b: fills W's geometry.  Refuses (with the
 * reason in W->res) only what makes the tables unreadable. */
int
parse_header (struct walk *w)
{
  struct qcow_check_result *res = w->res;
  struct qcow_header *h = &w->h;
  uint64_t size;
  int e = w->b->ops.get_size (w->b->opaque, &size);
  if (e < 0) {
    fail (res, "size: %s", strerror (-e));
    return e;
  }
  w->file_size = res->file_size = size;

  uint8_t *buf = calloc (1, 1u << QCOW_MAX_CLUSTER_BITS);
  int r = -EINVAL;
  if (!buf) {
    fail (res, "out of memory");
    return -ENOMEM;
  }
  if (rd (w, buf, 4096, 0) < 0) {
    r = w->err;
    goto out;
  }
  if (w->file_size < QCOW_V2_HEADER_LEN || rd32 (buf) != QCOW_MAGIC) {
    fail (res, "not a qcow2 image (%s)", rd32 (buf) != QCOW_MAGIC
          ? "bad magic" : "truncated header");
    goto out;
  }
  uint64_t backing_off;
  uint32_t backing_len;
  fmt_header_decode (buf, h, &backing_off, &backing_len);
  if (h->version != 2 && h->version != 3) {
    fail (res, "unsupported qcow2 version %" PRIu32, h->version);
    r = -ENOTSUP;
    goto out;
  }
  if (h->cluster_bits < QCOW_MIN_CLUSTER_BITS || h->cluster_bits > QCOW_MAX_CLUSTER_BITS) {
    fail (res, "cluster_bits %" PRIu32 " out of range (%d..%d)",
          h->cluster_bits, QCOW_MIN_CLUSTER_BITS, QCOW_MAX_CLUSTER_BITS);
    goto out;
  }
  const uint64_t cs = 1ULL << h->cluster_bits;
  if (cs > 4096 && rd (w, buf, cs, 0) < 0) {
    r = w->err;
    goto out;
  }
  if (h->version == 3) {
    if (h->header_length < QCOW_V3_MIN_HEADER_LEN || h->header_length > cs ||
        h->header_length > w->file_size) {
      fail (res, "header_length %" PRIu32 " is invalid", h->header_length);
      goto out;
    }
  }
  if (h->refcount_order > QCOW_MAX_REFCOUNT_ORDER) {
    fail (res, "refcount_order %" PRIu32 " is invalid", h->refcount_order);
    goto out;
  }

  /* Extensions, inside the header cluster. */
  bool crypt_ext = false;
  uint64_t end = cs;             /* zero padded past the end of the file */
  if (backing_off && backing_off < end)
    end = backing_off;
  struct fmt_ext x;
  int more;
  for (uint64_t off = h->header_length;
       (more = fmt_ext_next (buf, &off, end, &x)) != 0;) {
    if (more < 0) {
      fail (res, "header extension 0x%08" PRIx32 " at offset %" PRIu64
            " runs past the end of the header cluster", x.type, x.off - 8);
      goto out;
    }
    if (x.type == EXT_ENCRYPTION)
      crypt_ext = true;
    else if (x.type == EXT_BITMAPS && x.len >= BITMAPS_EXT_LEN) {
      w->bm_ext = x.off;
      fmt_bitmaps_ext_decode (buf + x.off, &w->bm);
    }
  }

  uint64_t incompat = h->incompatible_features;
  if (incompat & ~KNOWN_INCOMPAT) {
    fail (res, "unsupported incompatible feature bit %d",
          __builtin_ctzll (incompat & ~KNOWN_INCOMPAT));
    r = -ENOTSUP;
    goto out;
  }
  if (h->crypt_method || crypt_ext) {
    fail (res, "encrypted images are not supported");
    r = -ENOTSUP;
    goto out;
  }
  w->data_file = incompat & QCOW_INCOMPAT_DATA_FILE;   /* a name alone is ignored, as QEMU does */
  w->extl2 = incompat & QCOW_INCOMPAT_EXTL2;
  if (w->extl2 && h->cluster_bits < EXTL2_MIN_CLUSTER_BITS) {
    fail (res, "extended L2 entries need clusters of at least 16 KiB");
    goto out;
  }
  if ((incompat & QCOW_INCOMPAT_COMPRESSION)
      ? (h->header_length <= HDR_COMPRESSION_TYPE || h->compression_type != COMPRESSION_ZSTD)
      : h->compression_type != 0) {
    fail (res, "compression_type %u does not match the feature bits",
          h->compression_type);
    goto out;
  }
  /* What QEMU refuses too (so both say "could not check"). */
  if ((h->autoclear_features & QCOW_AUTOCLEAR_DATA_RAW) && !w->data_file) {
    fail (res, "raw external data bit set without an external data file");
    goto out;
  }
  if (backing_off > cs || (backing_off && (backing_len > QCOW_MAX_BACKING_NAME ||
                                          backing_len > cs - backing_off))) {
    fail (res, "backing file name (offset %" PRIu64 ", length %" PRIu32
          ") is invalid", backing_off, backing_len);
    goto out;
  }
  if (h->nb_snapshots > MAX_SNAPSHOTS || h->snapshots_offset % cs ||
      h->snapshots_offset > INT64_MAX - MAX_SNAPSHOT_TABLE) {
    fail (res, "snapshot table (%" PRIu32 " snapshots at offset 0x%" PRIx64
          ") is invalid", h->nb_snapshots, h->snapshots_offset);
    goto out;
  }
  res->marked_corrupt = incompat & QCOW_INCOMPAT_CORRUPT;
  res->dirty = incompat & QCOW_INCOMPAT_DIRTY;

  /* Geometry and the two tables the walk starts from. */
  w->cluster_bits = h->cluster_bits;
  w->cs = cs;
  w->esh = w->extl2 ? 4 : 3;
  w->l2_entries = cs >> w->esh;
  w->rb_bits = h->cluster_bits + 3 - h->refcount_order;
  w->refcount_max = fmt_refcount_max (h->refcount_order);
  res->cluster_size = cs;
  if (h->size > QCOW_MAX_VIRTUAL_SIZE) {
    fail (res, "virtual size %" PRIu64 " is too large", h->size);
    goto out;
  }
  res->total_clusters = div_round_up (h->size, cs);
  uint64_t l1_needed = div_round_up (h->size, cs * w->l2_entries);
  if (h->l1_size > QCOW_MAX_L1_BYTES / 8 || h->l1_size < l1_needed) {
    fail (res, "L1 table size %" PRIu32 " is invalid (the virtual "
          "size needs %" PRIu64 ")", h->l1_size, l1_needed);
    goto out;
  }
  /* (Tables past the end of a truncated file read as zeros, as in QEMU:
   * the walk reports them outside the file.) */
  if (h->l1_size && (h->l1_table_offset % cs ||
                     h->l1_table_offset > INT64_MAX - (uint64_t) h->l1_size * 8)) {
    fail (res, "L1 table offset 0x%" PRIx64 " is invalid", h->l1_table_offset);
    goto out;
  }
  uint64_t rct_bytes = (uint64_t) h->refcount_table_clusters << h->cluster_bits;
  if (rct_bytes > QCOW_MAX_RCT_BYTES ||
      h->refcount_table_offset % cs ||
      h->refcount_table_offset > INT64_MAX - rct_bytes) {
    fail (res, "refcount table (offset 0x%" PRIx64 ", %" PRIu32
          " clusters) is %s", h->refcount_table_offset,
          h->refcount_table_clusters,
          rct_bytes > QCOW_MAX_RCT_BYTES ? "too large" : "invalid");
    goto out;
  }
  w->rct_entries = rct_bytes / 8;
  w->nclusters = div_round_up (w->file_size, cs);
  res->file_clusters = w->nclusters;
  if (w->nclusters > MAX_CLUSTERS) {
    fail (res, "the file has too many clusters to check (%" PRIu64 ")",
          w->nclusters);
    r = -EFBIG;
    goto out;
  }
  r = 0;
 out:
  free (buf);
  return r;
}


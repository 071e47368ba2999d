/* SPDX-License-Identifier: BSD-3-Clause */
/* check.c - integrity check of qcow2 images (API in qcow.h): walking,
 * counting, reporting.
 *
 * The check
 * ---------
 * The file is opened read-only (with QEMU's reader lock) and parsed
 * tolerantly.  Only what QEMU also refuses, or what leaves nothing to
 * walk, stops the check as "could not check" with the reason: bad magic,
 * version, cluster size, header length or extensions, unknown
 * incompatible features, encryption, an invalid backing file name, an L1
 * table of the wrong size or misaligned, a refcount table too
 * large or misaligned, a snapshot table offset that is misaligned or a
 * snapshot table that cannot be parsed.  Tables past the end of a
 * truncated file read as zeros (as in QEMU) and are reported.
 *
 * One walk counts the references to every host cluster of the file, in
 * this order: the header cluster, the refcount table and each refcount
 * block, the active L1 table, each L2 table and each data or compressed
 * cluster it maps (every host cluster a compressed cluster touches counts
 * once), the snapshot table, each snapshot's L1 table and the tables and
 * clusters below it, and the persistent bitmaps (directory, tables, data)
 * when the bitmaps autoclear bit says they are valid.  Memory: a 32-bit
 * count, the stored refcount and the first referrer for each cluster of
 * the file (16 bytes per cluster), so bounded by the file size; work is
 * bounded by the file size times the number of snapshots (an L2 table is
 * followed at most once per snapshot, plus twice from the active table).
 *
 * Each reference is checked on the way: outside the file, misaligned,
 * reserved bits set.  A second reference to a cluster conflicts with the
 * first when either claims the cluster for itself (metadata, or an entry
 * with the COPIED flag, which promises a refcount of 1) or when the two
 * are different kinds of thing (an L2 table and a data cluster): two data
 * references are a DUPLICATE, anything else an OVERLAP.  Clusters that
 * legitimately have several references (shared with snapshots, compressed
 * clusters sharing a host cluster) do not conflict.  Then the counts are
 * compared with the stored refcounts (fewer stored = corruption, more =
 * leak, as qemu-img check), and the COPIED flags of the active tables are
 * checked against the stored refcounts (as qemu-img check).
 *
 * The repair (repair.c) plans its fixes during walks of this file.
 */
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "walk.h"

const char *const ref_name[R_NR] = {
  [R_NONE] = "nothing", [R_HEADER] = "the header", [R_L1] = "L1 table",
  [R_L2] = "L2 table", [R_DATA] = "data cluster",
  [R_COMPRESSED] = "compressed cluster", [R_RCT] = "refcount table",
  [R_REFBLOCK] = "refcount block", [R_SNAPTABLE] = "snapshot table",
  [R_SNAP_L1] = "snapshot L1 table", [R_BITMAP_DIR] = "bitmap directory",
  [R_BITMAP_TABLE] = "bitmap table", [R_BITMAP_DATA] = "bitmap data cluster",
};

const char *
qcow_problem_name (enum qcow_problem kind)
{
  static const char *const names[QCOW_PROBLEM_NR] = {
    "outside-file", "duplicate", "overlap", "misaligned", "reserved-bits",
    "copied-flag", "refcount", "leak", "invalid",
  };
  return kind < QCOW_PROBLEM_NR ? names[kind] : NULL;
}

/* ---- reporting ---- */

void
report (struct walk *w, struct qcow_check_problem *p, const char *fmt, ...)
{
  char msg[512];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  p->message = msg;
  w->res->problems[p->kind]++;
  if (p->corruption)
    w->res->corruptions++;
  else
    w->res->leaks++;
  if (w->cb && !w->plan)
    w->cb (p, w->opaque);
}



void
fail (struct qcow_check_result *res, const char *fmt, ...)
{
  if (res->verdict == QCOW_CHECK_FAILED)
    return;
  res->verdict = QCOW_CHECK_FAILED;
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (res->reason, sizeof res->reason, fmt, ap);
  va_end (ap);
}

/* ---- reading ---- */


/* Read [OFF, OFF+LEN), zeros past the end of the file, with the fixes of
 * earlier planning rounds applied. */
int
rd (struct walk *w, void *buf, uint64_t len, uint64_t off)
{
  uint8_t *p = buf;
  int r = w->b->ops.pread (w->b->opaque, p, len, off);
  if (r < 0) {
    w->err = r;
    fail (w->res, "read error at offset %" PRIu64 ": %s", off, strerror (-r));
    return r;
  }
  if (w->overlay && w->overlay->n) {
    const struct fixes *o = w->overlay;
    for (size_t i = fixes_find (o, off); i < o->n && o->v[i].off + 8 <= off + len; i++)
      wr64 (p + (o->v[i].off - off), o->v[i].val);
  }
  return 0;
}







/* ---- counting ---- */

/* Count one reference from SRC to cluster C (inside the file).  Returns
 * false if it conflicts with an earlier reference. */
static bool
add_ref (struct walk *w, uint64_t c, enum ref k, uint64_t src, bool excl)
{
  excl = excl || is_fixed (k);
  if (w->count[c] < RC_UNKNOWN - 1)
    w->count[c]++;
  if (w->count[c] == 1) {
    w->owner[c] = own (src, k, excl, w->snap);
    return true;
  }
  uint64_t o = w->owner[c];
  enum ref pk = OWN_KIND (o);
  if (!OWN_EXCL (o) && !excl && pk == k)
    return true;
  uint64_t dst = c << w->cluster_bits;
  struct qcow_check_problem p = {
    .corruption = true, .what = ref_name[k], .src = src, .dst = dst,
    .what2 = ref_name[pk], .src2 = OWN_SRC (o),
  };
  if (pk == R_DATA && k == R_DATA) {
    p.kind = QCOW_PROBLEM_DUPLICATE;
    report (w, &p, "ERROR cluster %" PRIu64 " (0x%" PRIx64 "): data cluster "
            "referenced twice, from 0x%" PRIx64 " and from 0x%" PRIx64,
            c, dst, OWN_SRC (o), src);
  }
  else {
    p.kind = QCOW_PROBLEM_OVERLAP;
    report (w, &p, "ERROR cluster %" PRIu64 " (0x%" PRIx64 ") is %s "
            "(referenced from 0x%" PRIx64 ") and also %s (referenced from 0x%"
            PRIx64 ")", c, dst, ref_name[pk], OWN_SRC (o), ref_name[k], src);
  }
  if (w->plan)
    resolve (w, o, own (src, k, excl, w->snap), c);
  return false;
}

/* Count a reference from SRC to the bytes [OFF, OFF+LEN).  Returns 1 if
 * counted, 0 if counted but conflicting, -1 if outside the file (not
 * counted; in planning the entry at SRC is unlinked). */
int
ref_range (struct walk *w, uint64_t off, uint64_t len, enum ref k,
           uint64_t src, bool excl)
{
  if (len == 0)
    return 1;
  uint64_t end = off + len;
  if (end < off || (end - 1) >> w->cluster_bits >= w->nclusters) {
    PROBLEM (w, QCOW_PROBLEM_OUTSIDE_FILE, ref_name[k], src, off,
             "ERROR %s at 0x%" PRIx64 " (%" PRIu64 " bytes, referenced from "
             "0x%" PRIx64 ") lies outside the file (%" PRIu64 " bytes)",
             ref_name[k], off, len, src, w->file_size);
    if (w->plan)
      clear_entry (w, src, k, w->snap);
    return -1;
  }
  int ok = 1;
  for (uint64_t c = off >> w->cluster_bits; c <= (end - 1) >> w->cluster_bits; c++)
    if (!add_ref (w, c, k, src, excl))
      ok = 0;
  return ok;
}


/* ---- the L2 and L1 tables ---- */

static void
walk_l2 (struct walk *w, uint64_t l2off, bool active)
{
  const uint64_t cs = w->cs;
  if (rd (w, w->buf, cs, l2off) < 0)
    return;
  for (uint64_t j = 0; j < w->l2_entries; j++) {
    const uint8_t *pe = w->buf + (j << w->esh);
    uint64_t src = l2off + (j << w->esh);
    uint64_t e = rd64 (pe), bm = w->extl2 ? rd64 (pe + 8) : 0;

    if (e & ENTRY_COMPRESSED) {
      if (active) {
        w->res->allocated_clusters++;
        w->res->compressed_clusters++;
      }
      if (w->data_file || (w->extl2 && bm)) {
        PROBLEM (w, QCOW_PROBLEM_INVALID, "compressed cluster", src, 0,
                 "ERROR L2 entry at 0x%" PRIx64 ": %s", src, w->data_file
                 ? "compressed cluster in an image with an external data file"
                 : "compressed cluster with a subcluster bitmap");
        if (w->plan)
          clear_entry (w, src, R_COMPRESSED, w->snap);
        continue;
      }
      uint64_t coff, clen;
      fmt_compressed_extent (w->cluster_bits, e & ~ENTRY_COPIED, &coff, &clen);
      ref_range (w, coff, clen, R_COMPRESSED, src, false);
      continue;
    }

    uint64_t off = e & L2_OFFSET_MASK, reserved = e & L2_RESERVED_MASK;
    if (w->extl2 && ((bm >> 32) & bm & EXTL2_ALLOC_MASK)) {
      PROBLEM (w, QCOW_PROBLEM_INVALID, "L2 table", src, off,
               "ERROR L2 entry at 0x%" PRIx64 ": subclusters both allocated "
               "and zero (bitmap 0x%016" PRIx64 ")", src, bm);
      if (w->plan)
        refuse (w, "invalid subcluster bitmap at 0x%" PRIx64, src + 8);
    }
    if (reserved) {
      PROBLEM (w, QCOW_PROBLEM_RESERVED, "L2 table", src, off,
               "ERROR L2 entry at 0x%" PRIx64 " has reserved bits set: "
               "0x%016" PRIx64, src, e);
    }
    if (!off) {
      if (w->extl2 && (bm & EXTL2_ALLOC_MASK)) {
        PROBLEM (w, QCOW_PROBLEM_INVALID, "L2 table", src, 0,
                 "ERROR L2 entry at 0x%" PRIx64 ": allocated subclusters "
                 "without a host cluster", src);
        if (w->plan)
          refuse (w, "invalid subcluster bitmap at 0x%" PRIx64, src + 8);
      }
      if (w->plan && reserved)
        add_fix (w, src, e & ~reserved, FIX_RESERVED);
      continue;
    }
    if (active)
      w->res->allocated_clusters++;
    bool misaligned = off & (cs - 1);
    if (misaligned)
      PROBLEM (w, QCOW_PROBLEM_MISALIGNED, "data cluster", src, off,
               "ERROR offset=%" PRIx64 ": Data cluster is not properly "
               "aligned; L2 entry at 0x%" PRIx64 " corrupted", off, src);
    if (w->data_file) {         /* data lives in the other file */
      if (w->plan && misaligned)
        clear_entry (w, src, R_DATA, w->snap);
      else if (w->plan && reserved)
        add_fix (w, src, e & ~reserved, FIX_RESERVED);
      continue;
    }
    int r = ref_range (w, off & ~(cs - 1), cs, R_DATA, src,
                       active && (e & ENTRY_COPIED));
    if (w->plan && r >= 0) {
      if (misaligned)
        add_doubt (w, src, e, R_DATA);
      else if (reserved)
        add_fix (w, src, e & ~reserved, FIX_RESERVED);
    }
  }
}

/* An L2 table is walked once per reference (each one counts the
 * clusters below it), but no image made by a sane writer refers to one
 * table more often than from the active L1 table and every snapshot's
 * (twice from one table after a repair of duplicates): beyond that the
 * work is bounded and the image reported. */
static bool
walk_again (struct walk *w, uint64_t c, uint64_t src)
{
  uint64_t limit = 2 + (uint64_t) w->h.nb_snapshots;
  if (w->count[c] <= limit)
    return true;
  if (w->count[c] == limit + 1) {
    PROBLEM (w, QCOW_PROBLEM_INVALID, "L2 table", src, c << w->cluster_bits,
             "ERROR L2 table at 0x%" PRIx64 " is referenced more than %"
             PRIu64 " times; not followed any more", c << w->cluster_bits,
             limit);
    if (w->plan)
      refuse (w, "an L2 table is referenced too many times");
  }
  return false;
}

void
walk_l1 (struct walk *w, uint64_t l1off, uint32_t l1_size, bool active)
{
  const uint64_t cs = w->cs;
  uint64_t *l1 = malloc ((uint64_t) (l1_size ? l1_size : 1) * 8);
  if (!l1) {
    w->err = -ENOMEM;
    fail (w->res, "out of memory for an L1 table of %" PRIu32
          " entries", l1_size);
    return;
  }
  if (rd (w, l1, (uint64_t) l1_size * 8, l1off) < 0)
    goto out;
  for (uint32_t i = 0; i < l1_size && !w->err; i++) {
    uint64_t src = l1off + 8ULL * i, e = be64toh (l1[i]);
    uint64_t off = e & L1_OFFSET_MASK, reserved = e & L1_RESERVED_MASK;
    if (reserved)
      PROBLEM (w, QCOW_PROBLEM_RESERVED, "L1 table", src, off,
               "ERROR L1 entry at 0x%" PRIx64 " (index %" PRIu32 ") has "
               "reserved bits set: 0x%016" PRIx64, src, i, e);
    if (!off) {
      /* Unallocated; QEMU's check counts such an entry with flags as an
       * L2 table in the header. */
      if (e & ENTRY_COPIED)
        PROBLEM (w, QCOW_PROBLEM_COPIED, "L2 table", src, 0,
                 "ERROR L1 entry at 0x%" PRIx64 " (index %" PRIu32 ") has "
                 "the COPIED flag but no L2 table", src, i);
      if (w->plan && e) {
        add_fix (w, src, 0, FIX_RESERVED);
        w->l1_fixed = true;
      }
      continue;
    }
    bool misaligned = off & (cs - 1);
    if (misaligned)
      PROBLEM (w, QCOW_PROBLEM_MISALIGNED, "L2 table", src, off,
               "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; "
               "L1 entry at 0x%" PRIx64 " (index %" PRIu32 ") corrupted",
               off, src, i);
    uint64_t aoff = off & ~(cs - 1);
    int r = ref_range (w, aoff, cs, R_L2, src, active && (e & ENTRY_COPIED));
    if (r < 0)
      continue;
    if (w->plan) {
      if (misaligned) {
        add_doubt (w, src, e, R_L2);
        continue;               /* walked once the entry is decided */
      }
      if (reserved) {
        if (w->snap)
          clear_entry (w, src, R_L2, true);
        else {
          add_fix (w, src, e & ~reserved, FIX_RESERVED);
          w->l1_fixed = true;
        }
        continue;
      }
      if (w->last_cleared == src)
        continue;               /* being unlinked: not followed */
      if (active)
        w->active_l2[(aoff >> w->cluster_bits) / 8] |=
          1u << ((aoff >> w->cluster_bits) % 8);
    }
    if (!walk_again (w, aoff >> w->cluster_bits, src))
      continue;
    walk_l2 (w, aoff, active);
  }
 out:
  free (l1);
}

/* ---- refcounts ---- */

/* Read the refcount table and blocks into w->stored and count their
 * clusters.  Planning counts only the table (the rebuild replaces the
 * blocks), and unlinks the blocks that qcow_connect would refuse:
 * misaligned, outside the file, in the header, the L1 or refcount table. */
static void
walk_refcounts (struct walk *w)
{
  const uint64_t cs = w->cs, rct_off = w->h.refcount_table_offset;
  const uint64_t per_block = 1ULL << w->rb_bits;
  uint64_t *rct = malloc (w->rct_entries ? w->rct_entries * 8 : 8);
  uint8_t *seen = calloc (w->nclusters / 8 + 1, 1);
  if (!rct || !seen) {
    free (seen);
    w->err = -ENOMEM;
    fail (w->res, "out of memory for the refcount table");
    return;
  }
  ref_range (w, rct_off, w->rct_entries * 8, R_RCT, 48, true);
  if (rd (w, rct, w->rct_entries * 8, rct_off) < 0)
    goto out;
  for (uint64_t i = 0; i < w->rct_entries && !w->err; i++) {
    uint64_t e = be64toh (rct[i]), src = rct_off + 8 * i;
    uint64_t first = i * per_block;
    if (e == 0)
      continue;                 /* all free (already 0) */
    bool bad = false;
    if (e & (cs - 1)) {
      PROBLEM (w, QCOW_PROBLEM_MISALIGNED, "refcount block", src, e,
               "ERROR refcount block %" PRIu64 " is not cluster aligned; "
               "refcount table entry corrupted (0x%016" PRIx64 ")", i, e);
      bad = true;
    }
    else if (e >> w->cluster_bits >= w->nclusters) {
      PROBLEM (w, QCOW_PROBLEM_OUTSIDE_FILE, "refcount block", src, e,
               "ERROR refcount block %" PRIu64 " at 0x%" PRIx64 " is outside "
               "the file", i, e);
      bad = true;
    }
    else {
      /* A block seen before (or overlapping anything else) is not read:
       * its content is not that block's refcounts. */
      uint64_t c = e >> w->cluster_bits;
      bad = w->count[c] > 0 || (seen[c / 8] & (1u << (c % 8)));
      seen[c / 8] |= 1u << (c % 8);
      if (!w->plan)
        add_ref (w, c, R_REFBLOCK, src, true);
      else if (c == 0 || in_rct (&w->h, e) || in_active_l1 (&w->h, e) ||
               (w->h.l1_size && e < w->h.l1_table_offset &&
                e + cs > w->h.l1_table_offset))
        add_fix (w, src, 0, FIX_CLEAR);
    }
    if (bad && w->plan && (e & (cs - 1) || e >> w->cluster_bits >= w->nclusters))
      add_fix (w, src, 0, FIX_CLEAR);
    if (first >= w->nclusters)
      continue;                 /* describes clusters past the end only */
    if (!bad && rd (w, w->buf, cs, e) < 0)
      break;
    for (uint64_t j = 0; j < per_block && first + j < w->nclusters; j++) {
      uint64_t v = bad ? RC_UNKNOWN
        : fmt_refcount_get (w->h.refcount_order, w->buf, j);
      w->stored[first + j] = v >= RC_UNKNOWN && !bad ? RC_UNKNOWN - 1 : v;
    }
  }
 out:
  free (seen);
  free (rct);
}

/* Counts against stored refcounts (check) or against the refcount width
 * (planning), and the cluster statistics. */
static void
compare_refcounts (struct walk *w)
{
  struct qcow_check_result *res = w->res;
  uint64_t limit = w->refcount_max < UINT16_MAX ? w->refcount_max : UINT16_MAX;
  uint64_t highest = 0;
  bool any = false;
  for (uint64_t c = 0; c < w->nclusters; c++) {
    uint64_t n = w->count[c], s = w->stored[c];
    if (n) {
      res->used_clusters++;
      if (n > w->refcount_max) {
        PROBLEM (w, QCOW_PROBLEM_INVALID, "cluster", 0, c << w->cluster_bits,
                 "ERROR cluster %" PRIu64 " has %" PRIu64 " references, more "
                 "than %" PRIu32 "-bit refcounts can count", c, n,
                 1u << w->h.refcount_order);
      }
      if (w->plan && n > limit)
        refuse (w, "cluster %" PRIu64 " would need a refcount of %" PRIu64
                ", more than this image's refcounts can hold", c, n);
    }
    if (n || (s && s != RC_UNKNOWN)) {
      highest = c;
      any = true;
    }
    if (w->plan || s == RC_UNKNOWN || s == n)
      continue;
    struct qcow_check_problem p = {
      .kind = s < n ? QCOW_PROBLEM_REFCOUNT : QCOW_PROBLEM_LEAK,
      .corruption = s < n, .what = "cluster", .dst = c << w->cluster_bits,
      .refcount = s, .references = n,
    };
    report (w, &p, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%"
            PRIu64, s < n ? "ERROR" : "Leaked", c, s, n);
  }
  res->free_clusters = w->nclusters - res->used_clusters;
  res->used_bytes = res->used_clusters * w->cs;
  res->free_bytes = res->free_clusters * w->cs;
  res->image_end_offset = any ? (highest + 1) * w->cs : 0;
}

/* COPIED flags of the active tables: against the stored refcounts
 * (check, as qemu-img), or set from the recounted ones (planning). */
void
copied_pass (struct walk *w)
{
  const uint64_t cs = w->cs, l1off = w->h.l1_table_offset;
  const uint32_t n = w->h.l1_size;
  uint64_t *l1 = malloc ((uint64_t) (n ? n : 1) * 8);
  if (!l1) {
    w->err = -ENOMEM;
    fail (w->res, "out of memory");
    return;
  }
  if (rd (w, l1, (uint64_t) n * 8, l1off) < 0)
    goto out;
  for (uint32_t i = 0; i < n && !w->err; i++) {
    uint64_t src = l1off + 8ULL * i, e = be64toh (l1[i]);
    uint64_t off = e & L1_OFFSET_MASK, c = off >> w->cluster_bits;
    if (!off || (off & (cs - 1)) || c >= w->nclusters)
      continue;
    uint64_t rc = w->plan ? w->count[c] : w->stored[c];
    if (rc != RC_UNKNOWN && (rc == 1) != ((e & ENTRY_COPIED) != 0)) {
      struct qcow_check_problem p = {
        .kind = QCOW_PROBLEM_COPIED, .corruption = true, .what = "L2 table",
        .src = src, .dst = off, .refcount = rc, .references = w->count[c],
      };
      report (w, &p, "ERROR OFLAG_COPIED L2 cluster: l1_index=%" PRIu32
              " l1_entry=%" PRIx64 " refcount=%" PRIu64, i, e, rc);
      if (w->plan)
        add_fix (w, src, e ^ ENTRY_COPIED, FIX_COPIED);
    }
    if (w->count[c] > 2 + (uint64_t) w->h.nb_snapshots)
      continue;                 /* reported by the walk */
    if (rd (w, w->buf, cs, off) < 0)
      break;
    for (uint64_t j = 0; j < w->l2_entries; j++) {
      uint64_t s2 = off + (j << w->esh), e2 = rd64 (w->buf + (j << w->esh));
      if (e2 & ENTRY_COMPRESSED) {
        if (e2 & ENTRY_COPIED) {
          PROBLEM (w, QCOW_PROBLEM_COPIED, "compressed cluster", s2, 0,
                   "ERROR: L2 entry at 0x%" PRIx64 ": copied flag must never "
                   "be set for compressed clusters", s2);
          if (w->plan)
            add_fix (w, s2, e2 & ~ENTRY_COPIED, FIX_COPIED);
        }
        continue;
      }
      uint64_t d = e2 & L2_OFFSET_MASK, dc = d >> w->cluster_bits;
      if (!d || (d & (cs - 1)) || (!w->data_file && dc >= w->nclusters))
        continue;
      uint64_t rc2 = w->data_file ? 1 : w->plan ? w->count[dc] : w->stored[dc];
      if (rc2 == RC_UNKNOWN || (rc2 == 1) == ((e2 & ENTRY_COPIED) != 0))
        continue;
      struct qcow_check_problem p = {
        .kind = QCOW_PROBLEM_COPIED, .corruption = true,
        .what = "data cluster", .src = s2, .dst = d, .refcount = rc2,
        .references = w->data_file ? 1 : w->count[dc],
      };
      report (w, &p, "ERROR OFLAG_COPIED data cluster: l2_entry=%" PRIx64
              " refcount=%" PRIu64, e2, rc2);
      if (w->plan)
        add_fix (w, s2, e2 ^ ENTRY_COPIED, FIX_COPIED);
    }
  }
 out:
  free (l1);
}

/* ---- one walk ---- */

void
walk_free (struct walk *w)
{
  free (w->count);
  free (w->stored);
  free (w->owner);
  free (w->buf);
  free (w->fx.v);
  free (w->doubts);
  free (w->active_l2);
}

/* Walk the image open on FD (check, or one planning round). */
int
walk_image (struct walk *w)
{
  struct qcow_check_result *res = w->res;
  int r = parse_header (w);
  if (r < 0)
    return r;
  uint64_t n = w->nclusters ? w->nclusters : 1;
  w->count = calloc (n, sizeof *w->count);
  w->stored = calloc (n, sizeof *w->stored);
  w->owner = calloc (n, sizeof *w->owner);
  w->buf = malloc (w->cs);
  w->active_l2 = calloc (n / 8 + 1, 1);
  if (!w->count || !w->stored || !w->owner || !w->buf || !w->active_l2) {
    fail (res, "out of memory for %" PRIu64 " clusters", n);
    return -ENOMEM;
  }

  if (w->nclusters)
    add_ref (w, 0, R_HEADER, 0, true);
  walk_refcounts (w);
  if (!w->err && w->h.l1_size)
    ref_range (w, w->h.l1_table_offset, (uint64_t) w->h.l1_size * 8, R_L1, 40, true);
  if (!w->err)
    walk_l1 (w, w->h.l1_table_offset, w->h.l1_size, true);
  if (!w->err)
    walk_snapshots (w);
  if (!w->err && !w->plan)
    walk_bitmaps (w);
  if (!w->err)
    compare_refcounts (w);
  if (!w->err && !w->plan)
    copied_pass (w);
  if (w->err)
    return w->err;

  res->verdict = res->corruptions ? QCOW_CHECK_CORRUPT
    : res->leaks ? QCOW_CHECK_LEAKS : QCOW_CHECK_CLEAN;
  return 0;
}

/* Check the image on B (which must not change meanwhile). */
int
check_image (struct qcow_backend *b, struct qcow_check_result *res,
             qcow_check_cb cb, void *opaque)
{
  memset (res, 0, sizeof *res);
  struct walk w = { .b = b, .res = res, .cb = cb, .opaque = opaque };
  int r = walk_image (&w);
  walk_free (&w);
  return r;
}

int
qcow_check (struct qcow *q, struct qcow_check_result *res, qcow_check_cb cb,
            void *opaque)
{
  io_lock_exclusive (q);
  pthread_mutex_lock (&q->lock);
  int r = q->read_only ? 0 : metadata_sync (q);
  if (r == 0 && !q->read_only)
    r = io_sync (q);
  if (r == 0)
    r = check_image (q->img, res, cb, opaque);
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);
  return r;
}

int
qcow_check_file (const char *path, struct qcow_check_result *res,
                 qcow_check_cb cb, void *opaque)
{
  memset (res, 0, sizeof *res);
  struct qcow_backend *b;
  int r = backend_open_file_flags (path, O_RDONLY, 0, &b);
  if (r < 0) {
    fail (res, "%s", r == -ENODEV ? "not a regular file or block device"
          : strerror (-r));
    return r;
  }
  char lockmsg[256] = "";
  if ((r = backend_lock (b, QCOW_LOCK_READ, lockmsg, sizeof lockmsg)) < 0) {
    fail (res, "%s", lockmsg);
    qcow_backend_free (b);
    return r;
  }
  r = check_image (b, res, cb, opaque);
  qcow_backend_free (b);
  return r;
}

int
qcow_check_backend (struct qcow_backend *b, struct qcow_check_result *res,
                    qcow_check_cb cb, void *opaque)
{
  return check_image (b, res, cb, opaque);
}


/* SPDX-License-Identifier: BSD-3-Clause */
/* repair.c - repairing an image (qemu-img check -r all): the planner that
 * decides, during walks of the image (check.c), which table entries to
 * fix, and the driver that writes the fixes and rebuilds the refcounts.
 *
 * Rebuilding the refcount structure from the tables (the core's
 * qcow_rebuild_refcount_table) fixes leaks, wrong refcounts and damaged
 * refcount blocks, but it trusts the L1/L2 entries, and qcow_connect
 * refuses tables that point outside the file or into other metadata.  So
 * the entries that cannot be trusted are fixed first, directly in the
 * file, under QEMU's writer lock.  A planner walks the image repeatedly
 * through an in-memory overlay of the fixes decided so far, until a walk
 * decides nothing new; nothing is written before the whole plan is known
 * to work, otherwise the file is left as it was and the reason returned.
 * Then the fixes are written (the original entries kept), the image is
 * opened with qcow_connect and its refcounts rebuilt; if that fails before
 * the new refcount structure is in place, the original entries are
 * written back.  The rules (qemu-img check -r all does the refcounts, the
 * COPIED flags and unlinking misaligned zero clusters; the others go
 * further where it only reports):
 *
 *  - an L2 entry that points outside the file, or into the header or
 *    another metadata structure, is unlinked: it becomes a zero cluster
 *    (v3; v2 has no zero flag, so unallocated), the data is lost anyway;
 *  - an L1 entry that points outside the file, or whose L2 table would
 *    overlap the header, an L1 table, the refcount table or the snapshot
 *    table, is cleared;
 *  - a misaligned entry is realigned to the cluster it points into when
 *    that cluster is allocated (refcount >= 1) and nothing else refers to
 *    it (a damaged entry, the table or data intact), else it is unlinked;
 *  - reserved bits are cleared;
 *  - two data references to one cluster (or two L1 entries sharing an L2
 *    table) are kept: the cluster gets refcount 2 and the COPIED flags are
 *    cleared, so the next write to either copies it (what qemu-img does);
 *  - COPIED flags in the active tables are set exactly where the
 *    recounted refcount is 1; compressed entries never have it;
 *  - refcount table entries that are misaligned, outside the file or in
 *    the header, L1 or refcount table are cleared (the rebuild replaces
 *    every block); other conflicts with refcount blocks or bitmaps need no
 *    fix: the core drops persistent bitmaps (clears their autoclear bit)
 *    on its first write;
 *  - the corrupt bit is cleared.
 * Refused (the file is unchanged): damage inside snapshot tables (delete
 * the snapshot first), two metadata structures overlapping each other, a
 * data cluster shared with a compressed cluster, invalid subcluster
 * bitmaps, refcounts that would overflow the refcount width, and images
 * qcow_connect refuses for other reasons (a missing backing file, ...).
 */
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "walk.h"

/* ---- planning (called by the walk) ---- */

void
refuse (struct walk *w, const char *fmt, ...)
{
  if (w->refuse)
    return;
  w->refuse = true;
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (w->why, sizeof w->why, fmt, ap);
  va_end (ap);
}

/* The index of the first fix at or after OFF in sorted F. */
size_t
fixes_find (const struct fixes *f, uint64_t off)
{
  size_t lo = 0, hi = f->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (f->v[mid].off < off)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

void
add_fix (struct walk *w, uint64_t off, uint64_t val, enum fix_tag tag)
{
  if (w->fx.n == MAX_FIXES) {
    refuse (w, "too many damaged entries");
    return;
  }
  struct fix *v = grow_array (w->fx.v, w->fx.n, &w->fx.cap, sizeof *v, 64);
  if (!v) {
    refuse (w, "out of memory");
    return;
  }
  w->fx.v = v;
  w->fx.v[w->fx.n] = (struct fix) { off, val, tag, w->fx.n };
  w->fx.n++;
  if (tag == FIX_CLEAR)
    w->last_cleared = off;
}



/* Unlink the entry at SRC that refers to a K. */
void
clear_entry (struct walk *w, uint64_t src, enum ref k, bool snap)
{
  if (snap) {
    refuse (w, "a damaged %s reference at 0x%" PRIx64 " in a snapshot's "
            "tables: delete the snapshot (qemu-img snapshot -d) first",
            ref_name[k], src);
    return;
  }
  switch (k) {
  case R_L2:
    add_fix (w, src, 0, FIX_CLEAR);
    w->l1_fixed = true;
    break;
  case R_DATA:
  case R_COMPRESSED:
    if (w->extl2) {
      add_fix (w, src, 0, FIX_CLEAR);
      add_fix (w, src + 8, EXTL2_ZERO_MASK, FIX_AUX);
    }
    else
      add_fix (w, src, w->h.version >= 3 ? ENTRY_ZERO : 0, FIX_CLEAR);
    break;
  default:
    if (!is_loser (k))
      refuse (w, "the %s referenced from 0x%" PRIx64 " is damaged",
              ref_name[k], src);
    break;
  }
}

/* Two references to one cluster conflict: decide which one goes. */
void
resolve (struct walk *w, uint64_t o1, uint64_t o2, uint64_t cluster)
{
  enum ref k1 = OWN_KIND (o1), k2 = OWN_KIND (o2);
  if (is_loser (k1) || is_loser (k2))
    return;
  if (k1 == k2 && (k1 == R_DATA || k1 == R_L2))
    return;                     /* shared: refcount 2, COPIED cleared */
  if (is_datalike (k1) && is_datalike (k2)) {
    refuse (w, "host cluster %" PRIu64 " is both a data cluster and part of "
            "a compressed cluster", cluster);
    return;
  }
  /* Metadata wins over data, and fixed structures over L2 tables. */
  if (is_datalike (k1) || (k1 == R_L2 && !is_datalike (k2)))
    clear_entry (w, OWN_SRC (o1), k1, OWN_SNAP (o1));
  else if (is_datalike (k2) || k2 == R_L2)
    clear_entry (w, OWN_SRC (o2), k2, OWN_SNAP (o2));
  else
    refuse (w, "host cluster %" PRIu64 " is both %s and %s", cluster,
            ref_name[k1], ref_name[k2]);
}

void
add_doubt (struct walk *w, uint64_t src, uint64_t ent, enum ref k)
{
  if (w->snap) {
    clear_entry (w, src, k, true);
    return;
  }
  struct doubt *d = grow_array (w->doubts, w->ndoubts, &w->doubtcap, sizeof *d, 16);
  if (!d) {
    refuse (w, "out of memory");
    return;
  }
  w->doubts = d;
  w->doubts[w->ndoubts++] = (struct doubt) { src, ent, k };
}

/* ---- repair ---- */

/* Order: by offset, then the strongest tag, then the latest. */
static int
fix_cmp (const void *a, const void *b)
{
  const struct fix *x = a, *y = b;
  if (x->off != y->off)
    return x->off < y->off ? -1 : 1;
  if (x->tag != y->tag)
    return x->tag < y->tag ? -1 : 1;
  return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Merge a round's fixes into PLAN (sorted, one per offset): a later round
 * saw the earlier fixes, so its decision replaces theirs. */
static int
fixes_merge (struct fixes *plan, struct fixes *round)
{
  if (round->n)
    qsort (round->v, round->n, sizeof *round->v, fix_cmp);
  for (size_t i = 0; i < round->n; i++) {
    if (i + 1 < round->n && round->v[i + 1].off == round->v[i].off)
      continue;                 /* the next one is stronger or later */
    const struct fix *f = &round->v[i];
    size_t k = fixes_find (plan, f->off);
    if (k < plan->n && plan->v[k].off == f->off) {
      plan->v[k].val = f->val;
      if (f->tag != FIX_COPIED)
        plan->v[k].tag = f->tag;
      continue;
    }
    struct fix *v = grow_array (plan->v, plan->n, &plan->cap, sizeof *v, 64);
    if (!v)
      return -ENOMEM;
    plan->v = v;
    memmove (&plan->v[k + 1], &plan->v[k], (plan->n - k) * sizeof *plan->v);
    plan->v[k] = *f;
    plan->n++;
  }
  return 0;
}

/* Decide the misaligned entries of this round: realign into a cluster
 * that is allocated and referred to by nothing else, else unlink (an
 * unlink decided for the same entry this round wins anyway). */
static void
decide_doubts (struct walk *w)
{
  for (size_t i = 0; i < w->ndoubts; i++) {
    const struct doubt *d = &w->doubts[i];
    uint64_t mask = d->k == R_L2 ? L1_OFFSET_MASK : L2_OFFSET_MASK;
    uint64_t aoff = d->ent & mask & ~(w->cs - 1), c = aoff >> w->cluster_bits;
    if (c > 0 && c < w->nclusters && w->count[c] == 1 &&
        w->stored[c] != RC_UNKNOWN && w->stored[c] >= 1) {
      uint64_t keep = d->ent & (ENTRY_COPIED | (d->k == R_DATA ? ENTRY_ZERO : 0));
      add_fix (w, d->src, keep | aoff, FIX_REALIGN);
      if (d->k == R_L2)
        w->l1_fixed = true;
    }
    else
      clear_entry (w, d->src, d->k, false);
  }
}

/* One planning round over the image open on FD with the fixes of PLAN
 * applied.  Returns 1 if it added fixes to PLAN (walk again), 0 when the
 * plan is complete, -errno with the reason in WHY. */
static int
plan_round (struct qcow_backend *b, struct fixes *plan, char *why,
            size_t whylen)
{
  struct qcow_check_result scratch;
  memset (&scratch, 0, sizeof scratch);
  struct walk w = { .b = b, .res = &scratch, .plan = true,
                    .overlay = plan };
  int r = walk_image (&w);
  if (r < 0) {
    snprintf (why, whylen, "%s", scratch.reason);
    goto out;
  }
  decide_doubts (&w);
  bool more = w.fx.n > 0;
  if (!more) {
    /* Complete: every fix must lie in a table the repaired image uses;
     * then the COPIED flags follow the final counts. */
    for (size_t i = 0; i < plan->n; i++) {
      uint64_t off = plan->v[i].off, c = off >> w.cluster_bits;
      assert (in_active_l1 (&w.h, off) || in_rct (&w.h, off) ||
              (c < w.nclusters && (w.active_l2[c / 8] & (1u << (c % 8)))));
    }
    if (!w.refuse)
      copied_pass (&w);
  }
  else if (w.l1_fixed) {
    /* A changed L1 entry changes which L2 tables are walked: keep only
     * the L1 and refcount table fixes, and walk again. */
    size_t k = 0;
    for (size_t i = 0; i < w.fx.n; i++)
      if (in_active_l1 (&w.h, w.fx.v[i].off) || in_rct (&w.h, w.fx.v[i].off))
        w.fx.v[k++] = w.fx.v[i];
    w.fx.n = k;
  }
  if (w.err) {
    r = w.err;
    snprintf (why, whylen, "%s", scratch.reason);
  }
  else if (w.refuse) {
    r = -EINVAL;
    snprintf (why, whylen, "%s", w.why);
  }
  else if ((r = fixes_merge (plan, &w.fx)) < 0)
    snprintf (why, whylen, "out of memory");
  else
    r = more;
 out:
  walk_free (&w);
  return r;
}

/* Plan every fix for the image open on FD. */
static int
plan_repair (struct qcow_backend *b, struct fixes *plan,
             char *why, size_t whylen)
{
  for (int round = 0; round < MAX_ROUNDS; round++) {
    int r = plan_round (b, plan, why, whylen);
    if (r <= 0)
      return r;
  }
  snprintf (why, whylen, "the repair does not converge");
  return -EINVAL;
}

/* Write each fix's value (or, with UNDO, its saved original). */
static int
write_fixes (struct qcow_backend *b, const struct fixes *plan,
             const uint64_t *orig, bool undo)
{
  for (size_t i = 0; i < plan->n; i++) {
    uint8_t be[8];
    wr64 (be, undo ? orig[i] : plan->v[i].val);
    int r = b->ops.pwrite (b->opaque, be, 8, plan->v[i].off);
    if (r < 0)
      return r;
  }
  return b->ops.flush (b->opaque);
}

/* Open PATH read-write into *BP and lock it as QEMU's writers do. */
static int
open_locked (const char *path, struct qcow_backend **bp, char *why, size_t whylen)
{
  int r = backend_open_file_flags (path, O_RDWR, 0, bp);
  if (r < 0) {
    snprintf (why, whylen, "%s", strerror (-r));
    return r;
  }
  if ((r = backend_lock (*bp, QCOW_LOCK_WRITE, why, whylen)) < 0)
    qcow_backend_free (*bp);
  return r;
}

/* Put the saved entries back (the repair could not be completed). */
static void
rollback (const char *path, const struct fixes *plan, const uint64_t *orig,
          struct qcow_repair_result *res)
{
  char why[256];
  struct qcow_backend *b;
  int r = open_locked (path, &b, why, sizeof why);
  if (r == 0) {
    r = write_fixes (b, plan, orig, true);
    qcow_backend_free (b);
  }
  if (r == 0)
    res->repaired = false;
  else
    snprintf (res->reason + strlen (res->reason),
              sizeof res->reason - strlen (res->reason),
              "; restoring the damaged entries failed too: %s", strerror (-r));
}

int
qcow_repair_file (const char *path, struct qcow_repair_result *res)
{
  memset (res, 0, sizeof *res);
  int r = qcow_check_file (path, &res->before, NULL, NULL);
  res->after = res->before;
  if (r < 0) {
    snprintf (res->reason, sizeof res->reason, "cannot check the image: %.200s",
              res->before.reason);
    return r;
  }
  if (res->before.verdict == QCOW_CHECK_CLEAN && !res->before.marked_corrupt)
    return 0;

  /* Plan under a writer's lock, and write the entry fixes (and the
   * cleared corrupt bit) with their original values saved. */
  char why[256] = "";
  struct fixes plan = { 0 };
  uint64_t *orig = NULL;
  struct qcow_backend *b = NULL;
  if ((r = open_locked (path, &b, why, sizeof why)) < 0) {
    b = NULL;
    goto refused;
  }
  if ((r = plan_repair (b, &plan, why, sizeof why)) < 0)
    goto refused;
  uint64_t incompat;
  uint8_t be[8];
  uint64_t size = 0;
  /* (The backend reads zeros past the end of the file: an entry there
   * would be "fixed" by growing the file.) */
  if (b->ops.get_size (b->opaque, &size) < 0 || size < HDR_INCOMPAT + 8 ||
      b->ops.pread (b->opaque, be, 8, HDR_INCOMPAT) < 0) {
    r = -EIO;
    snprintf (why, sizeof why, "cannot read the header");
    goto refused;
  }
  incompat = rd64 (be);
  if (res->before.marked_corrupt) {
    struct fixes hdr = { &(struct fix) { HDR_INCOMPAT, incompat & ~QCOW_INCOMPAT_CORRUPT,
                                         FIX_AUX, 0 }, 1, 1 };
    if ((r = fixes_merge (&plan, &hdr)) < 0) {
      snprintf (why, sizeof why, "out of memory");
      goto refused;
    }
    res->corrupt_bit_cleared = true;
  }
  if (!(orig = malloc ((plan.n ? plan.n : 1) * sizeof *orig))) {
    r = -ENOMEM;
    snprintf (why, sizeof why, "out of memory");
    goto refused;
  }
  for (size_t i = 0; i < plan.n; i++) {
    if (plan.v[i].off > size - 8 ||
        b->ops.pread (b->opaque, be, 8, plan.v[i].off) < 0) {
      r = -EIO;
      snprintf (why, sizeof why, "cannot read the entry at 0x%" PRIx64,
                plan.v[i].off);
      goto refused;
    }
    orig[i] = rd64 (be);
    switch (plan.v[i].tag) {
    case FIX_CLEAR: res->entries_cleared++; break;
    case FIX_REALIGN: res->entries_realigned++; break;
    case FIX_RESERVED: res->reserved_cleared++; break;
    case FIX_COPIED: res->copied_fixed++; break;
    case FIX_AUX: break;
    }
  }
  if (plan.n) {
    res->repaired = true;
    if ((r = write_fixes (b, &plan, orig, false)) < 0) {
      snprintf (res->reason, sizeof res->reason, "writing the fixes failed: %s",
                strerror (-r));
      qcow_backend_free (b);
      b = NULL;
      rollback (path, &plan, orig, res);
      goto out;
    }
  }
  qcow_backend_free (b);
  b = NULL;

  /* Recount the refcounts from the fixed tables. */
  if (res->before.verdict != QCOW_CHECK_CLEAN) {
    struct qcow_config cfg;
    struct qcow *q;
    qcow_config_default (&cfg);
    cfg.read_only = false;
    res->bitmaps_dropped = res->before.bitmaps_checked;
    if ((r = qcow_connect (path, &cfg, &q)) < 0) {
      snprintf (res->reason, sizeof res->reason, "cannot repair: the image "
                "cannot be opened for writing (%s)", strerror (-r));
      rollback (path, &plan, orig, res);
      goto out;
    }
    struct qcow_header h0;
    qcow_get_header (q, &h0);
    r = qcow_rebuild_refcount_table (q);
    struct qcow_header h1;
    qcow_get_header (q, &h1);
    int r2 = qcow_disconnect (q);
    if (r == 0)
      r = r2;
    if (h1.refcount_table_offset != h0.refcount_table_offset) {
      res->refcounts_rebuilt = true;
      res->repaired = true;
    }
    if (r < 0) {
      snprintf (res->reason, sizeof res->reason, "rebuilding the refcounts "
                "failed: %s", strerror (-r));
      if (!res->refcounts_rebuilt)
        rollback (path, &plan, orig, res);
      goto out;
    }
  }

  r = qcow_check_file (path, &res->after, NULL, NULL);
  if (r == 0 && res->after.verdict != QCOW_CHECK_CLEAN) {
    snprintf (res->reason, sizeof res->reason, "the image still has %" PRIu64
              " errors and %" PRIu64 " leaked clusters after the repair",
              res->after.corruptions, res->after.leaks);
    r = -EIO;
  }
  else if (r < 0)
    snprintf (res->reason, sizeof res->reason, "cannot check the repaired "
              "image: %.200s", res->after.reason);
  free (plan.v);
  free (orig);
  return r;

 refused:
  snprintf (res->reason, sizeof res->reason, "cannot repair: %.230s", why);
  qcow_backend_free (b);
  res->entries_cleared = res->entries_realigned = 0;
  res->reserved_cleared = res->copied_fixed = 0;
  res->corrupt_bit_cleared = false;
 out:
  free (plan.v);
  free (orig);
  if (res->repaired)
    qcow_check_file (path, &res->after, NULL, NULL);
  return r < 0 ? r : -EIO;
}

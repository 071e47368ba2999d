/* SPDX-License-Identifier: BSD-3-Clause */
/* snapshot-txn.c - creating, applying and deleting internal snapshots as
 * QEMU does (qemu-img snapshot), crash-safely.
 *
 * Refcounts, as QEMU keeps them: every L1 table (the active one and each
 * snapshot's) that reaches a cluster counts once for it, so an L2 table
 * shared by two L1 tables has refcount 2, and so has every data cluster
 * it maps.  The COPIED flag (refcount exactly 1) is exact in the active
 * tables only; in tables only snapshots reach it means nothing.  Between
 * snapshot operations the active layer copies what it shares before
 * writing it (cluster.c, rw.c); the snapshots' own tables are never
 * written.
 *
 * Create, apply and delete are each one transaction (txn_commit).  The
 * new state is built in clusters the old state does not use:
 *   - the new active L1 table, pointing to the L2 tables it keeps, and to
 *     copies of those whose COPIED flags would have to change;
 *   - the new snapshot table;
 *   - a new refcount structure (blocks and table) counting every
 *     reference of the new state, recounted from all the L1 tables;
 * all of it is made durable, then one write of header bytes 24..71
 * (virtual size, L1 table, refcount table, snapshot table: all in the
 * first sector) switches to it, and is made durable.  Before that write
 * the file is the old image plus unused clusters; after it, the new
 * image, whose only garbage is the old structures, now free (their
 * space is punched afterwards).  So a crash at any moment leaves either
 * image, each consistent: QEMU's in-place order (refcounts, then COPIED
 * flags, then the table) has moments where qemu-img check reports
 * errors; this one does not, at the cost of a recount (every L2 table is
 * read once) and of copying the active L2 tables whose flags change.
 * create gives the old active L1 table to the snapshot as it is (QEMU
 * copies it: the same thing on disk), and the active layer gets copies
 * of its L2 tables with COPIED cleared.
 *
 * Locks: compact_lock, flush_lock, io_lock (exclusive) and q->lock, in
 * that order, are held throughout, after a full flush and with the
 * background thread idle: nothing else changes the image meanwhile.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

/* ---- the transaction ---- */

struct l2ref {                  /* an L2 table and how many L1 entries
                                   (active and snapshots') point to it */
  uint64_t off;
  uint32_t n;
};

struct txn {
  /* The new state, filled by the operation. */
  uint64_t *l1;                 /* the new active L1 table, host-endian, its
                                   entries pointing at existing L2 tables */
  uint32_t l1_size;
  uint64_t size;                /* the new virtual size */
  struct snapshot *snap;        /* the new snapshot list (owned) */
  uint32_t nsnap;
  /* Worked out by txn_commit. */
  uint16_t *counts;             /* the new refcount of each host cluster */
  uint64_t ncounts;
  uint64_t old_end;             /* clusters at or past this are unused */
  uint64_t limit;               /* no cluster at or past this (storage) */
  uint64_t hint;                /* the allocator's next candidate */
  struct l2ref *refs;
  size_t nrefs, refs_cap;
  bool *copy;                   /* per active L1 entry: copy its table */
};

static void
txn_free (struct txn *t)
{
  free (t->l1);
  for (uint32_t i = 0; i < t->nsnap; i++)
    snapshot_clear (&t->snap[i]);
  free (t->snap);
  free (t->counts);
  free (t->refs);
  free (t->copy);
}

/* A deep copy of snapshot S into D. */
static int
snapshot_copy (const struct snapshot *s, struct snapshot *d)
{
  *d = *s;
  d->id = strdup (s->id);
  d->name = strdup (s->name);
  d->extra = malloc (s->extra_len ? s->extra_len : 1);
  if (!d->id || !d->name || !d->extra) {
    snapshot_clear (d);
    return -ENOMEM;
  }
  memcpy (d->extra, s->extra, s->extra_len);
  return 0;
}

/* The new list: the current one without entry SKIP (-1: none), with room
 * for EXTRA more. */
static int
txn_copy_list (struct qcow *q, struct txn *t, int skip, uint32_t extra)
{
  t->snap = calloc (q->nsnap + extra + 1, sizeof *t->snap);
  if (!t->snap)
    return -ENOMEM;
  for (uint32_t i = 0; i < q->nsnap; i++)
    if ((int) i != skip && snapshot_copy (&q->snap[i], &t->snap[t->nsnap++]) < 0)
      return -ENOMEM;
  return 0;
}

/* TIMES more references to clusters [C, C+N). */
static int
count (struct qcow *q, struct txn *t, uint64_t c, uint64_t n, uint32_t times)
{
  for (uint64_t i = c; i < c + n; i++) {
    if (i >= t->ncounts) {
      /* Only on storage of fixed size, where the count ends after the
       * last cluster the refcounts use: a cluster in use past it has no
       * refcount. */
      return qcow_corrupt (q, "refcount table", UINT64_MAX,
                           "cluster 0x%" PRIx64 " is in use but has no "
                           "refcount (see qcow-tool check)",
                           i << q->cluster_bits);
    }
    if (t->counts[i] > UINT16_MAX - times) {
      ERR (q, "cluster 0x%" PRIx64 " would have more than %u references",
           i << q->cluster_bits, UINT16_MAX);
      return -ERANGE;
    }
    t->counts[i] += times;
  }
  return 0;
}

/* Is OFF a cluster the tables may point to? */
static bool
valid_cluster (struct qcow *q, uint64_t off)
{
  return off % q->cluster_size == 0 && off >= q->cluster_size && off < q->file_size;
}

static int
add_ref (struct qcow *q, struct txn *t, uint64_t l1e, const char *whose, uint64_t idx)
{
  uint64_t off = l1e & L1_OFFSET_MASK;
  if (!off)
    return 0;
  if (!valid_cluster (q, off)) {
    ERR (q, "%s: L1 entry %" PRIu64 " points to an L2 table at 0x%" PRIx64
         " that is misaligned or outside the file", whose, idx, off);
    return -EINVAL;
  }
  struct l2ref *v = grow_array (t->refs, t->nrefs, &t->refs_cap, sizeof *v, 1024);
  if (!v)
    return -ENOMEM;
  t->refs = v;
  t->refs[t->nrefs++] = (struct l2ref) { off, 1 };
  return 0;
}

static int
cmp_ref (const void *a, const void *b)
{
  const struct l2ref *x = a, *y = b;
  return x->off < y->off ? -1 : x->off > y->off;
}

/* Count the data clusters every L2 table maps, once per L1 entry that
 * points to it, validating every entry. */
static int
count_data (struct qcow *q, struct txn *t, uint8_t *buf)
{
  int r;
  if (t->nrefs)
    qsort (t->refs, t->nrefs, sizeof *t->refs, cmp_ref);
  size_t k = 0;                 /* merge duplicates */
  for (size_t i = 0; i < t->nrefs; i++) {
    if (k > 0 && t->refs[k - 1].off == t->refs[i].off)
      t->refs[k - 1].n++;
    else
      t->refs[k++] = t->refs[i];
  }
  t->nrefs = k;
  for (size_t i = 0; i < t->nrefs; i++) {
    const struct l2ref *ref = &t->refs[i];
    if ((r = io_pread (q, buf, q->cluster_size, ref->off)) < 0)
      return r;
    for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++) {
      uint64_t ent = rd64 (L2E (q, buf, j));
      if (ent & ENTRY_COMPRESSED) {
        uint64_t off, len;
        compressed_extent (q, ent, &off, &len);
        if (off < q->cluster_size || off >= q->file_size) {
          ERR (q, "L2 table at 0x%" PRIx64 ": compressed cluster at 0x%" PRIx64
               " lies outside the file", ref->off, off);
          return -EINVAL;
        }
        if (len > q->file_size - off)
          len = q->file_size - off;
        uint64_t c0 = off >> q->cluster_bits, c1 = (off + len - 1) >> q->cluster_bits;
        if ((r = count (q, t, c0, c1 - c0 + 1, ref->n)) < 0)
          return r;
        continue;
      }
      uint64_t host = ent & L2_OFFSET_MASK;
      if (!host)
        continue;
      if (!valid_cluster (q, host)) {
        ERR (q, "L2 table at 0x%" PRIx64 ": entry %" PRIu64 " points to 0x%" PRIx64
             ", misaligned or outside the file", ref->off, j, host);
        return -EINVAL;
      }
      if ((r = count (q, t, host >> q->cluster_bits, 1, ref->n)) < 0)
        return r;
    }
  }
  return 0;
}

/* Set the COPIED flags of the L2 table in BUF as the new refcounts say.
 * True if anything changed. */
static bool
fix_flags (struct qcow *q, struct txn *t, uint8_t *buf)
{
  bool changed = false;
  for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++) {
    uint8_t *p = L2E (q, buf, j);
    uint64_t ent = rd64 (p), host = ent & L2_OFFSET_MASK, want;
    if (ent & ENTRY_COMPRESSED)
      want = ent & ~ENTRY_COPIED;
    else if (!host)
      continue;                 /* unallocated, or zeros with no cluster */
    else
      want = t->counts[host >> q->cluster_bits] == 1 ? ent | ENTRY_COPIED : ent & ~ENTRY_COPIED;
    if (want != ent) {
      wr64 (p, want);
      changed = true;
    }
  }
  return changed;
}

/* N contiguous clusters that neither state uses (the old refcounts are
 * zero, the new count too); they count once from now on. */
static int
shadow_alloc (struct qcow *q, struct txn *t, uint64_t n, uint64_t *first)
{
  uint64_t run = 0, start = 0;
  for (uint64_t c = t->hint;; c++) {
    uint64_t rc = 0;
    int r;
    if (c >= t->limit || c >= t->ncounts) {
      ERR (q, "no space left for the snapshot's tables (%" PRIu64 " clusters)", n);
      return -ENOSPC;
    }
    if (t->counts[c] == 0 && c < t->old_end && (r = rc_get (q, c, &rc)) < 0)
      return r;
    if (t->counts[c] || rc) {
      run = 0;
      continue;
    }
    if (run++ == 0)
      start = c;
    if (run == n) {
      *first = start;
      t->hint = start + n;
      return count (q, t, start, n, 1);
    }
  }
}

/* Where the old state ends: past the end of the file (growable storage),
 * or past the last cluster in use and the refcount structure (storage of
 * a fixed size, which the structure must fit in). */
static int
old_state_end (struct qcow *q, uint64_t *end)
{
  const uint64_t nfile = div_round_up (q->file_size, q->cluster_size);
  uint64_t e = 0;
  if (!q->fixed_size) {
    *end = nfile > q->frontier ? nfile : q->frontier;
    return 0;
  }
  for (uint64_t c = 0; c < nfile; c++) {
    uint64_t rc, idx = c >> q->rb_bits;
    if (idx >= q->rct_entries)
      break;
    if (q->rct[idx] == 0) {
      c |= (1ULL << q->rb_bits) - 1;
      continue;
    }
    int r = rc_get (q, c, &rc);
    if (r < 0)
      return r;
    if (rc)
      e = c + 1;
  }
  uint64_t rct_end = (q->h.refcount_table_offset >> q->cluster_bits) + q->h.refcount_table_clusters;
  if (rct_end > e)
    e = rct_end;
  for (uint64_t i = 0; i < q->rct_entries; i++) {
    uint64_t c = q->rct[i] >> q->cluster_bits;
    if (c && c + 1 > e)
      e = c + 1;
  }
  *end = e;
  return 0;
}

/* Punch [C, C+N) out of the file (best effort). */
static void
punch_runs_of (struct qcow *q, const uint64_t *c, size_t n)
{
  for (size_t i = 0, j; i < n; i = j) {
    for (j = i + 1; j < n && c[j] == c[j - 1] + 1; j++)
      ;
    uint64_t len = (j - i) << q->cluster_bits;
    if (io_punch (q, false, c[i] << q->cluster_bits, len) == 0)
      __atomic_add_fetch (&q->stats.bytes_punched, len, __ATOMIC_RELAXED);
  }
}

/* Make T the image's state (see the top of the file).  With every lock
 * held, the image flushed.  T's arrays pass to Q on success. */
static int
txn_commit (struct qcow *q, struct txn *t)
{
  const uint64_t cs = q->cluster_size;
  const uint64_t l1_clusters = t->l1_size ? div_round_up ((uint64_t) t->l1_size * 8, cs) : 1;
  /* The table: entries padded to 8 bytes, but QEMU counts its clusters
   * without the padding after the last one.  Should that padding reach
   * into one more cluster, the last entry gets 8 bytes more of (zero)
   * extra data, so that QEMU and this core count the same clusters. */
  uint64_t table_len = 0, last_off = 0, exact = 0;
  uint32_t last_pad = 0;
  for (uint32_t i = 0; i < t->nsnap; i++) {
    last_off = table_len;
    table_len += snapshot_entry_encode (&t->snap[i], 0, NULL, &exact);
  }
  if (t->nsnap && div_round_up (table_len, cs) > div_round_up (last_off + exact, cs)) {
    last_pad = 8;
    table_len = last_off + snapshot_entry_encode (&t->snap[t->nsnap - 1], last_pad, NULL, NULL);
  }
  if (table_len > MAX_SNAPSHOT_TABLE) {
    ERR (q, "the snapshot table would exceed %u bytes", MAX_SNAPSHOT_TABLE);
    return -EFBIG;
  }
  const uint64_t table_clusters = div_round_up (table_len, cs);
  uint8_t *buf = malloc (cs), *l1buf = NULL, *tbuf = NULL;
  uint64_t *punch = NULL, npunch = 0, *newrct = NULL;
  uint64_t old_file_size = q->file_size;
  bool wrote = false;
  int r = -ENOMEM;
  if (!buf || !(t->copy = calloc (t->l1_size + 1, 1)))
    goto out;

  /* 1. The new counts: sized for the old state and everything new. */
  if ((r = old_state_end (q, &t->old_end)) < 0)
    goto out;
  t->limit = q->fixed_size ? div_round_up (q->file_size, cs) : UINT64_MAX;
  t->ncounts = t->old_end + l1_clusters + t->l1_size + table_clusters + 2;
  if (!(t->counts = calloc (t->ncounts, sizeof *t->counts)))
    goto out;
  t->hint = 1;
  if ((r = count (q, t, 0, 1, 1)) < 0)             /* the header */
    goto out;

  /* 2. Data: once per L1 entry reaching it, through every L1 table;
   * the snapshots' L2 tables once per L1 entry. */
  char whose[300];
  for (uint32_t i = 0; i < t->nsnap; i++) {
    const struct snapshot *s = &t->snap[i];
    uint64_t n = (uint64_t) s->l1_size * 8;
    uint64_t *sl1 = malloc (n ? n : 8);
    if (!sl1) {
      r = -ENOMEM;
      goto out;
    }
    snprintf (whose, sizeof whose, "snapshot %s", s->id);
    r = io_pread (q, sl1, n, s->l1_offset);
    for (uint32_t j = 0; r == 0 && j < s->l1_size; j++) {
      uint64_t off = be64toh (sl1[j]) & L1_OFFSET_MASK;
      r = add_ref (q, t, be64toh (sl1[j]), whose, j);
      if (r == 0 && off)        /* the snapshot's L2 table, as it is */
        r = count (q, t, off >> q->cluster_bits, 1, 1);
    }
    free (sl1);
    if (r == 0 && s->l1_size)
      r = count (q, t, s->l1_offset >> q->cluster_bits,
                 div_round_up (n, cs), 1);
    if (r < 0)
      goto out;
  }
  for (uint32_t j = 0; j < t->l1_size; j++)
    if ((r = add_ref (q, t, t->l1[j], "the active layer", j)) < 0)
      goto out;
  if ((r = count_data (q, t, buf)) < 0)
    goto out;

  /* 3. L2 tables (the snapshots' were counted in step 2): the active
   * layer keeps a table whose COPIED flags are right, else gets a copy. */
  for (uint32_t j = 0; j < t->l1_size; j++) {
    uint64_t off = t->l1[j] & L1_OFFSET_MASK;
    if (!off)
      continue;
    if ((r = io_pread (q, buf, cs, off)) < 0)
      goto out;
    t->copy[j] = fix_flags (q, t, buf);
    if (!t->copy[j] && (r = count (q, t, off >> q->cluster_bits, 1, 1)) < 0)
      goto out;
  }

  /* Refcounts must fit the width before anything is written. */
  for (uint64_t c = 0; c < t->ncounts; c++)
    if (t->counts[c] > q->refcount_max) {
      ERR (q, "cluster 0x%" PRIx64 " would need a refcount of %u, more than "
           "%u-bit refcounts can hold", c << q->cluster_bits, t->counts[c],
           1u << q->h.refcount_order);
      r = -ERANGE;
      goto out;
    }

  /* 4. Write the new tables where nothing is.  This begins the changes
   * (the write locks, the dirty bit of lazy refcounts; a dirty image has
   * its refcounts rebuilt first, so the old state may end further on). */
  if ((r = begin_modify (q)) < 0)
    goto out;
  wrote = true;
  uint64_t end2;
  if ((r = old_state_end (q, &end2)) < 0)
    goto out;
  if (end2 > t->old_end) {
    uint64_t more = end2 - t->old_end;
    uint16_t *c2 = realloc (t->counts, (t->ncounts + more) * sizeof *c2);
    if (!c2) {
      r = -ENOMEM;
      goto out;
    }
    memset (c2 + t->ncounts, 0, more * sizeof *c2);
    t->counts = c2;
    t->ncounts += more;
    t->old_end = end2;
  }
  for (uint32_t j = 0; j < t->l1_size; j++) {
    uint64_t off = t->l1[j] & L1_OFFSET_MASK, c;
    if (!off)
      continue;
    if (!t->copy[j]) {
      t->l1[j] = off | (t->counts[off >> q->cluster_bits] == 1 ? ENTRY_COPIED : 0);
      continue;
    }
    if ((r = shadow_alloc (q, t, 1, &c)) < 0 ||
        (r = io_pread (q, buf, cs, off)) < 0)
      goto out;
    fix_flags (q, t, buf);
    if ((r = io_pwrite (q, buf, cs, c << q->cluster_bits)) < 0)
      goto out;
    t->l1[j] = (c << q->cluster_bits) | ENTRY_COPIED;
  }
  uint64_t l1c, tc = 0;
  if ((r = shadow_alloc (q, t, l1_clusters, &l1c)) < 0)
    goto out;
  if (!(l1buf = calloc (l1_clusters, cs)) || (table_len && !(tbuf = calloc (table_clusters, cs)))) {
    r = -ENOMEM;
    goto out;
  }
  for (uint32_t j = 0; j < t->l1_size; j++)
    wr64 (l1buf + 8 * j, t->l1[j]);
  if ((r = io_pwrite (q, l1buf, l1_clusters * cs, l1c << q->cluster_bits)) < 0)
    goto out;
  if (table_len) {
    if ((r = shadow_alloc (q, t, table_clusters, &tc)) < 0)
      goto out;
    uint64_t off = 0;
    for (uint32_t i = 0; i < t->nsnap; i++)
      off += snapshot_entry_encode (&t->snap[i], i + 1 == t->nsnap ? last_pad : 0, tbuf + off, NULL);
    if ((r = io_pwrite (q, tbuf, table_len, tc << q->cluster_bits)) < 0)
      goto out;
  }

  /* The clusters the old state uses and the new one does not: punched
   * once the switch is durable. */
  if (!(punch = malloc ((t->old_end + 1) * sizeof *punch))) {
    r = -ENOMEM;
    goto out;
  }
  for (uint64_t c = 1; c < t->old_end && c < t->ncounts; c++) {
    uint64_t rc;
    if (t->counts[c])
      continue;
    if ((r = rc_get (q, c, &rc)) < 0)
      goto out;
    if (rc)
      punch[npunch++] = c;
  }

  /* 5. The refcount structure, after everything else. */
  uint64_t E = t->old_end, rct_off, new_end;
  uint32_t rct_clusters;
  for (uint64_t c = t->ncounts; c > E; c--)
    if (t->counts[c - 1]) {
      E = c;
      break;
    }
  if ((r = rc_write_structure (q->img, q->cluster_bits, q->h.refcount_order,
                               t->counts, E, t->limit, &rct_off, &rct_clusters,
                               &new_end)) < 0 ||
      (r = io_sync (q)) < 0)
    goto out;
  uint64_t entries = (uint64_t) rct_clusters * cs / 8;
  if (!(newrct = malloc (entries * 8)) ||
      (r = io_pread (q, newrct, entries * 8, rct_off)) < 0 ||
      (r = cache_resize_slots (&q->refblock_cache, entries)) < 0 ||
      (r = cache_resize_slots (&q->l2_cache, l2_slots (q, t->l1_size))) < 0) {
    r = r < 0 ? r : -ENOMEM;
    goto out;
  }
  for (uint64_t i = 0; i < entries; i++)
    newrct[i] = be64toh (newrct[i]);

  /* 6. The switch: one write, in the first sector. */
  struct qcow_header old = q->h;
  q->h.size = t->size;
  q->h.l1_size = t->l1_size;
  q->h.l1_table_offset = l1c << q->cluster_bits;
  q->h.refcount_table_offset = rct_off;
  q->h.refcount_table_clusters = rct_clusters;
  q->h.nb_snapshots = t->nsnap;
  q->h.snapshots_offset = t->nsnap ? tc << q->cluster_bits : 0;
  if ((r = header_write_fields (q, HDR_SIZE, HDR_INCOMPAT - HDR_SIZE)) < 0 || (r = io_sync (q)) < 0) {
    /* Unknown whether it reached the disk: put the old fields back. */
    q->h = old;
    if (header_write_fields (q, HDR_SIZE, HDR_INCOMPAT - HDR_SIZE) < 0 || io_sync (q) < 0) {
      ERR (q, "the header may be half switched: the image is now read-only; "
           "reopen it");
      q->read_only = true;
    }
    goto out;
  }

  /* 7. The new state in memory. */
  free (q->l1);
  q->l1 = t->l1;
  t->l1 = NULL;
  q->l1_dirty_lo = q->l1_dirty_hi = 0;
  cache_drop_all (&q->l2_cache);
  cache_drop_all (&q->refblock_cache);
  free (q->rct);
  q->rct = newrct;
  newrct = NULL;
  q->rct_entries = entries;
  q->rct_dirty = false;
  snapshots_free (q);
  q->snap = t->snap;
  q->nsnap = t->nsnap;
  t->snap = NULL;
  t->nsnap = 0;
  q->snap_table_len = table_len;
  q->free_hint = 1;
  if (new_end << q->cluster_bits > q->file_size)
    q->file_size = new_end << q->cluster_bits;      /* (written behind io_pwrite) */
  if (new_end > q->frontier)
    q->frontier = new_end;
  if (t->hint > q->frontier)
    q->frontier = t->hint;
  q->cfill = 0;
  q->npending = 0;
  if (q->cfg.discard)
    punch_runs_of (q, punch, npunch);
  r = 0;
 out:
  if (r < 0 && wrote && !q->fixed_size && !q->read_only && q->file_size > old_file_size &&
      q->h.refcount_table_offset >> q->cluster_bits < div_round_up (old_file_size, cs)) {
    /* Nothing points past the old end: drop what was written there. */
    if (io_truncate (q, old_file_size) == 0)
      q->file_size = old_file_size;
  }
  free (buf);
  free (l1buf);
  free (tbuf);
  free (punch);
  free (newrct);
  return r;
}

/* Take every lock, with everything flushed and the background thread
 * done punching what it was given: then nothing but us changes the
 * image.  (Waiting for the punching happens with no lock of ours held:
 * the thread may want compact_lock first.) */
static int
txn_lock (struct qcow *q)
{
  int r = 0;
  for (;;) {
    if (q->modified && (r = flush_all (q)) < 0)
      break;
    pthread_mutex_lock (&q->lock);
    while (q->punch_head || q->punch_busy)
      pthread_cond_wait (&q->punch_cond, &q->lock);
    pthread_mutex_unlock (&q->lock);
    pthread_mutex_lock (&q->compact_lock);
    pthread_mutex_lock (&q->flush_lock);
    io_lock_exclusive (q);
    pthread_mutex_lock (&q->lock);
    if (!q->punch_head && !q->punch_busy)
      break;
    /* Another flush queued more meanwhile: again. */
    pthread_mutex_unlock (&q->lock);
    io_unlock_exclusive (q);
    pthread_mutex_unlock (&q->flush_lock);
    pthread_mutex_unlock (&q->compact_lock);
  }
  if (r < 0) {                  /* (the flush failed: take them anyway) */
    pthread_mutex_lock (&q->compact_lock);
    pthread_mutex_lock (&q->flush_lock);
    io_lock_exclusive (q);
    pthread_mutex_lock (&q->lock);
    return r;
  }
  if (q->modified && (r = metadata_sync (q)) == 0 && (r = io_sync (q)) == 0)
    r = rc_apply_deferred (q);
  return r;
}

static void
txn_unlock (struct qcow *q)
{
  pthread_mutex_unlock (&q->lock);
  io_unlock_exclusive (q);
  pthread_mutex_unlock (&q->flush_lock);
  pthread_mutex_unlock (&q->compact_lock);
}

/* ---- the operations ---- */

/* The new active L1 table: the current one. */
static int
txn_same_l1 (struct qcow *q, struct txn *t)
{
  t->size = q->h.size;
  t->l1_size = q->h.l1_size;
  if (!(t->l1 = malloc ((t->l1_size + 1) * 8)))
    return -ENOMEM;
  memcpy (t->l1, q->l1, (uint64_t) t->l1_size * 8);
  return 0;
}

/* create: the list plus a snapshot named NAME of the active layer, which
 * takes the current L1 table as it is on disk. */
static int
prepare_create (struct qcow *q, struct txn *t, const char *name)
{
  for (uint32_t i = 0; i < q->nsnap; i++)
    if (strcmp (q->snap[i].name, name) == 0 || strcmp (q->snap[i].id, name) == 0) {
      ERR (q, "a snapshot %s '%s' exists already (ID %s)",
           strcmp (q->snap[i].name, name) == 0 ? "named" : "with the ID", name, q->snap[i].id);
      return -EEXIST;
    }
  if (q->nsnap >= MAX_SNAPSHOTS) {
    ERR (q, "the image has %d snapshots: no more are possible", MAX_SNAPSHOTS);
    return -EFBIG;
  }
  int r = txn_copy_list (q, t, -1, 1);
  if (r < 0)
    return r;
  unsigned long id = 0;           /* the next ID, as QEMU picks it */
  for (uint32_t i = 0; i < q->nsnap; i++) {
    unsigned long v = strtoul (q->snap[i].id, NULL, 10);
    if (v > id)
      id = v;
  }
  struct timespec now;
  clock_gettime (CLOCK_REALTIME, &now);
  struct snapshot *s = &t->snap[t->nsnap];
  char idbuf[32];
  snprintf (idbuf, sizeof idbuf, "%lu", id + 1);
  *s = (struct snapshot) {
    .l1_offset = q->h.l1_table_offset, .l1_size = q->h.l1_size,
    .date_sec = now.tv_sec, .date_nsec = now.tv_nsec / 1000 * 1000,
    .disk_size = q->h.size, .has_disk_size = true, .icount = 0,
  };
  if (!(s->id = strdup (idbuf)) || !(s->name = strdup (name))) {
    snapshot_clear (s);
    return -ENOMEM;
  }
  t->nsnap++;
  return txn_same_l1 (q, t);
}

/* apply: the list unchanged; the active L1 table and size snapshot S's. */
static int
prepare_apply (struct qcow *q, struct txn *t, const struct snapshot *s)
{
  uint64_t need = div_round_up (s->disk_size, q->cluster_size << q->l2_bits);
  if (s->disk_size > (1ULL << 62) || need > QCOW_MAX_L1_BYTES / 8) {
    ERR (q, "snapshot %s: its disk size %" PRIu64 " is invalid", s->id, s->disk_size);
    return -EINVAL;
  }
  t->size = s->disk_size;
  t->l1_size = s->l1_size > need ? s->l1_size : need;
  if (!(t->l1 = calloc (t->l1_size + 1, 8)))
    return -ENOMEM;
  int r = io_pread (q, t->l1, (uint64_t) s->l1_size * 8, s->l1_offset);
  if (r < 0)
    return r;
  for (uint32_t j = 0; j < s->l1_size; j++)
    t->l1[j] = be64toh (t->l1[j]) & ~ENTRY_COPIED;
  return txn_copy_list (q, t, -1, 0);
}

enum op { OP_CREATE, OP_APPLY, OP_DELETE };

/* The three operations: ARG is the new snapshot's name, or the ID or
 * name of the one to apply or delete. */
static int
snapshot_op (struct qcow *q, enum op op, const char *arg)
{
  static const char *const done[] = { "created", "applied", "deleted" };
  if (q->read_only) {
    ERR (q, "image is open read-only");
    return -EROFS;
  }
  if (q->data_path) {
    ERR (q, "an image with an external data file cannot have snapshots");
    return -ENOTSUP;
  }
  size_t len = strlen (arg);
  if (op == OP_CREATE && (len == 0 || len > SNAPSHOT_MAX_NAME)) {
    ERR (q, "snapshot name of %zu bytes: it must have 1 to %d", len, SNAPSHOT_MAX_NAME);
    return len ? -ENAMETOOLONG : -EINVAL;
  }
  struct txn t = { 0 };
  char what[SNAPSHOT_MAX_NAME + 80];
  int i = -1, r = txn_lock (q);
  if (r == 0 && op != OP_CREATE && (i = snapshot_find (q, arg)) < 0) {
    ERR (q, "no snapshot '%s'", arg);
    r = -ENOENT;
  }
  if (r == 0) {
    snprintf (what, sizeof what, "%s '%s'", i >= 0 ? q->snap[i].id : "", arg);
    r = op == OP_CREATE ? prepare_create (q, &t, arg)
      : op == OP_APPLY ? prepare_apply (q, &t, &q->snap[i])
      : (r = txn_copy_list (q, &t, i, 0)) < 0 ? r : txn_same_l1 (q, &t);
  }
  if (r == 0)
    r = txn_commit (q, &t);
  if (r == 0)
    qcow_debugf ("%s: snapshot %s %s", q->filename, what, done[op]);
  txn_unlock (q);
  txn_free (&t);
  return r;
}

int qcow_snapshot_create (struct qcow *q, const char *name)
{ return snapshot_op (q, OP_CREATE, name); }
int qcow_snapshot_apply (struct qcow *q, const char *id_or_name)
{ return snapshot_op (q, OP_APPLY, id_or_name); }
int qcow_snapshot_delete (struct qcow *q, const char *id_or_name)
{ return snapshot_op (q, OP_DELETE, id_or_name); }

int
qcow_snapshot_find (struct qcow *q, const char *id_or_name)
{
  int i = snapshot_find (q, id_or_name);
  return i < 0 ? -ENOENT : i;
}


/* SPDX-License-Identifier: BSD-3-Clause */
/* snapshot.c - internal snapshots: the snapshot table (decode, encode),
 * reading it at open, finding a snapshot, opening one read-only (the
 * plugin's snapshot=), and the queries.  The table is read at open and
 * changed only by the operations (snapshot-txn.c).
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

#define EXTRA_LEN 24       /* vm_state_size_large, disk_size, icount */

/* ---- snapshot table entries: format.c's codec, plus what QEMU keeps ---- */

void
snapshot_clear (struct snapshot *s)
{
  free (s->id);
  free (s->name);
  free (s->extra);
  memset (s, 0, sizeof *s);
}

/* Decode the entry at P, AVAIL bytes of the table being left from P.
 * Returns its length padded to 8 (the next entry starts there), or 0
 * with *WHY saying what is wrong with it. */
static size_t
snapshot_entry_decode (const uint8_t *p, uint64_t avail, struct snapshot *s,
                       const char **why)
{
  struct fmt_snapshot e;
  memset (s, 0, sizeof *s);
  int d = fmt_snapshot_decode (p, avail, &e);
  if (d == -2) {
    *why = "has too much extra data";
    return 0;
  }
  if (d < 0) {
    *why = avail < SNAPSHOT_ENTRY_LEN ? "is truncated (the table ends in it)"
      : "runs past the end of the file (its extra data, ID or name are "
        "longer than what is left)";
    return 0;
  }
  s->l1_offset = e.l1_offset;
  s->l1_size = e.l1_size;
  s->date_sec = e.date_sec;
  s->date_nsec = e.date_nsec;
  s->vm_clock_nsec = e.vm_clock_nsec;
  s->vm_state_size = e.vm_state_size;
  s->disk_size = e.disk_size;
  s->has_disk_size = e.has_disk_size;
  s->icount = e.has_icount ? e.icount : UINT64_MAX;
  s->extra_len = e.extra_len;
  s->extra = malloc (e.extra_len ? e.extra_len : 1);
  s->id = strndup ((const char *) e.id, e.id_len);
  s->name = strndup ((const char *) e.name, e.name_len);
  if (!s->extra || !s->id || !s->name) {
    snapshot_clear (s);
    *why = "cannot be read: out of memory";
    return 0;
  }
  memcpy (s->extra, p + SNAPSHOT_ENTRY_LEN, e.extra_len);
  return e.len;
}

/* S as QEMU writes an entry: the 32-bit VM state size only if it fits,
 * at least the 24 bytes of extra data it knows (and PAD more), extra
 * data beyond those kept as it was read.  Into E (NULL: only the
 * length); returns the length padded to 8, *EXACT without the padding. */
uint64_t
snapshot_entry_encode (const struct snapshot *s, uint32_t pad, uint8_t *e, uint64_t *exact)
{
  struct fmt_snapshot f = {
    .l1_offset = s->l1_offset, .l1_size = s->l1_size,
    .date_sec = s->date_sec, .date_nsec = s->date_nsec,
    .vm_clock_nsec = s->vm_clock_nsec, .vm_state_size = s->vm_state_size,
    .extra_len = (s->extra_len > EXTRA_LEN ? s->extra_len : EXTRA_LEN) + pad,
    .has_disk_size = true, .disk_size = s->disk_size,
    .has_icount = true, .icount = s->icount,
    .id = (const uint8_t *) s->id, .id_len = strlen (s->id),
    .name = (const uint8_t *) s->name, .name_len = strlen (s->name),
  };
  if (exact)
    *exact = SNAPSHOT_ENTRY_LEN + (uint64_t) f.extra_len + f.id_len + f.name_len;
  if (!e)
    return fmt_snapshot_len (&f);
  uint64_t n = fmt_snapshot_encode (e, &f);
  if (s->extra_len > EXTRA_LEN)
    memcpy (e + SNAPSHOT_ENTRY_LEN + EXTRA_LEN, s->extra + EXTRA_LEN,
            s->extra_len - EXTRA_LEN);
  return n;
}

void
snapshots_free (struct qcow *q)
{
  for (uint32_t i = 0; i < q->nsnap; i++)
    snapshot_clear (&q->snap[i]);
  free (q->snap);
  q->snap = NULL;
  q->nsnap = 0;
}

int
snapshots_load (struct qcow *q)
{
  const struct qcow_header *h = &q->h;
  if (h->nb_snapshots == 0)
    return 0;
  if (h->nb_snapshots > MAX_SNAPSHOTS) {
    ERR (q, "too many snapshots (%" PRIu32 ")", h->nb_snapshots);
    return -EINVAL;
  }
  if (h->snapshots_offset % q->cluster_size != 0 || h->snapshots_offset < q->cluster_size ||
      h->snapshots_offset >= q->file_size) {
    ERR (q, "snapshot table offset 0x%" PRIx64 " is %s", h->snapshots_offset,
         h->snapshots_offset % q->cluster_size ? "misaligned"
         : h->snapshots_offset < q->cluster_size ? "inside the header"
         : "beyond the end of the file");
    return -EINVAL;
  }
  uint64_t avail = q->file_size - h->snapshots_offset;
  if (avail > MAX_SNAPSHOT_TABLE)
    avail = MAX_SNAPSHOT_TABLE;
  uint8_t *buf = malloc (avail);
  q->snap = calloc (h->nb_snapshots, sizeof *q->snap);
  int r = -ENOMEM;
  if (!buf || !q->snap)
    goto out;
  if ((r = io_pread (q, buf, avail, h->snapshots_offset)) < 0)
    goto out;
  uint64_t off = 0;
  r = -EINVAL;
  for (uint32_t i = 0; i < h->nb_snapshots; i++) {
    struct snapshot *s = &q->snap[i];
    const char *why = NULL;
    size_t len = off < avail ? snapshot_entry_decode (buf + off, avail - off, s, &why) : 0;
    if (len == 0) {
      ERR (q, "snapshot table entry %" PRIu32 " %s", i,
           why ? why : "lies beyond the end of the file (the table is truncated)");
      goto out;
    }
    q->nsnap = i + 1;
    if (!s->has_disk_size)
      s->disk_size = h->size;     /* QEMU's assumption, written back so */
    uint64_t l1_bytes = (uint64_t) s->l1_size * 8;
    if (s->l1_size > QCOW_MAX_L1_BYTES / 8 || s->l1_offset % q->cluster_size != 0 ||
        (s->l1_size && (s->l1_offset < q->cluster_size || s->l1_offset > q->file_size ||
                        l1_bytes > q->file_size - s->l1_offset))) {
      ERR (q, "snapshot %s: L1 table (offset 0x%" PRIx64 ", %" PRIu32
           " entries) is invalid or outside the file", s->id, s->l1_offset, s->l1_size);
      goto out;
    }
    off += len;
  }
  q->snap_table_len = off;
  r = 0;
 out:
  free (buf);
  return r;
}

/* The snapshot whose ID is NAME, else the first whose name is NAME (as
 * QEMU looks them up), or -1. */
int
snapshot_find (struct qcow *q, const char *name)
{
  for (uint32_t i = 0; i < q->nsnap; i++)
    if (strcmp (q->snap[i].id, name) == 0)
      return i;
  for (uint32_t i = 0; i < q->nsnap; i++)
    if (strcmp (q->snap[i].name, name) == 0)
      return i;
  return -1;
}

/* cfg.snapshot: show that snapshot instead of the active layer, read-only
 * (qemu-nbd -l, qemu-img convert -l).  Its L1 table replaces the active
 * one in memory, padded with unallocated entries to cover the virtual
 * size, which stays the image's current one as QEMU keeps it
 * (bdrv_snapshot_load_tmp); the rest of the core reads through it as
 * usual.  Called by connect, after snapshots_load. */
int
snapshot_select (struct qcow *q)
{
  if (!q->cfg.snapshot)
    return 0;
  int i = snapshot_find (q, q->cfg.snapshot);
  if (i < 0) {
    ERR (q, "no snapshot '%s' (qcow-tool snapshot -l lists them)", q->cfg.snapshot);
    return -ENOENT;
  }
  const struct snapshot *s = &q->snap[i];
  uint32_t n = s->l1_size > q->h.l1_size ? s->l1_size : q->h.l1_size;
  uint64_t *l1 = calloc (n ? n : 1, 8);
  if (!l1)
    return -ENOMEM;
  int r = io_pread (q, l1, (uint64_t) s->l1_size * 8, s->l1_offset);
  for (uint32_t j = 0; r == 0 && j < s->l1_size; j++) {
    l1[j] = be64toh (l1[j]);
    uint64_t off = l1[j] & L1_OFFSET_MASK;
    if (off && (off % q->cluster_size || off < q->cluster_size || off >= q->file_size)) {
      ERR (q, "snapshot %s: L1 entry %" PRIu32 " points to an L2 table at 0x%"
           PRIx64 " %s", s->id, j, off, off % q->cluster_size ? "that is misaligned"
           : off < q->cluster_size ? "inside the header" : "beyond the end of the file");
      r = -EINVAL;
    }
  }
  if (r == 0)
    r = cache_resize_slots (&q->l2_cache, l2_slots (q, n));
  if (r < 0) {
    free (l1);
    return r;
  }
  free (q->l1);
  q->l1 = l1;
  q->h.l1_size = n;
  q->read_only = true;
  qcow_debugf ("%s: serving snapshot %s (%s), read-only", q->filename, s->id, s->name);
  return 0;
}

int
qcow_snapshot_count (struct qcow *q)
{
  return q->nsnap;
}

int
qcow_get_snapshot (struct qcow *q, int i, struct qcow_snapshot_info *info)
{
  if (i < 0 || (uint32_t) i >= q->nsnap)
    return -EINVAL;
  const struct snapshot *s = &q->snap[i];
  info->id = s->id;
  info->name = s->name;
  info->date_sec = s->date_sec;
  info->date_nsec = s->date_nsec;
  info->vm_clock_nsec = s->vm_clock_nsec;
  info->vm_state_size = s->vm_state_size;
  info->disk_size = s->has_disk_size ? s->disk_size : q->h.size;
  info->l1_size = s->l1_size;
  info->icount = s->icount;
  return 0;
}


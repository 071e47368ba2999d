/* SPDX-License-Identifier: BSD-3-Clause */
/* snapshot.c - internal snapshots: read and validate the snapshot table
 * (entries decoded by format.c).  The active layer reads and writes
 * correctly next to them: clusters and L2 tables they share are copied
 * before being written (cluster.c, rw.c); their own tables are never
 * modified.  The table is read at open and constant after. */
#include <stdlib.h>

#include "internal.h"

void
snapshots_free (struct qcow *q)
{
  for (uint32_t i = 0; i < q->nsnap; i++) {
    free (q->snap[i].id);
    free (q->snap[i].name);
  }
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
    struct fmt_snapshot e;
    int d = fmt_snapshot_decode (buf + off, off < avail ? avail - off : 0, &e);
    if (d == -2) {
      ERR (q, "snapshot %" PRIu32 " has too much extra data (%" PRIu32 " bytes)",
           i, e.extra_len);
      goto out;
    }
    if (d < 0) {
      ERR (q, off + SNAPSHOT_ENTRY_LEN > avail
           ? "snapshot table is truncated at snapshot %" PRIu32
           : "snapshot %" PRIu32 " runs past the end of the snapshot table", i);
      goto out;
    }
    struct snapshot *s = &q->snap[i];
    s->l1_offset = e.l1_offset;
    s->l1_size = e.l1_size;
    s->date_sec = e.date_sec;
    s->date_nsec = e.date_nsec;
    s->vm_clock_nsec = e.vm_clock_nsec;
    s->vm_state_size = e.vm_state_size;
    s->disk_size = e.disk_size;
    s->has_disk_size = e.has_disk_size;
    s->id = strndup ((const char *) e.id, e.id_len);
    s->name = strndup ((const char *) e.name, e.name_len);
    q->nsnap = i + 1;
    if (!s->id || !s->name) {
      r = -ENOMEM;
      goto out;
    }
    uint64_t l1_bytes = (uint64_t) s->l1_size * 8;
    if (s->l1_size > QCOW_MAX_L1_BYTES / 8 || s->l1_offset % q->cluster_size != 0 ||
        (s->l1_size && (s->l1_offset < q->cluster_size || s->l1_offset > q->file_size ||
                        l1_bytes > q->file_size - s->l1_offset))) {
      ERR (q, "snapshot %s: L1 table (offset 0x%" PRIx64 ", %" PRIu32
           " entries) is invalid or outside the file", s->id, s->l1_offset, s->l1_size);
      goto out;
    }
    off += e.len;
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
 * (qemu-nbd -l).  Its L1 table replaces the active one in memory; the
 * rest of the core reads through it as usual.  Called by connect, after
 * snapshots_load. */
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
  uint64_t size = s->has_disk_size ? s->disk_size : q->h.size;
  uint64_t need = div_round_up (size, q->cluster_size << q->l2_bits);
  if (s->l1_size < need || size > (1ULL << 62)) {
    ERR (q, "snapshot %s: L1 table of %" PRIu32 " entries cannot map its disk "
         "size %" PRIu64, s->id, s->l1_size, size);
    return -EINVAL;
  }
  uint64_t *l1 = malloc (s->l1_size ? (uint64_t) s->l1_size * 8 : 8);
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
    r = cache_resize_slots (&q->l2_cache, s->l1_size);
  if (r < 0) {
    free (l1);
    return r;
  }
  free (q->l1);
  q->l1 = l1;
  q->h.l1_size = s->l1_size;
  q->h.size = size;
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
  return 0;
}

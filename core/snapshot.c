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

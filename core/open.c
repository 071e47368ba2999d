/* SPDX-License-Identifier: BSD-3-Clause */
/* open.c - opening and closing an image: connect (with its backing chain,
 * external data file and snapshots), the image locks, the first change
 * (begin_modify), disconnect, and the queries on an open image.
 *
 * qcow_connect validates everything it will later trust (header, L1 and
 * refcount tables, every table pointer) before it returns, and writes
 * nothing: the first write-type request calls begin_modify, which takes
 * the write locks, repairs a dirty image and sets the dirty bit (lazy
 * refcounts).  The fields set here are constant once the image is shared,
 * except those guarded by q->lock (see struct qcow). */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* ---- connect / disconnect ---- */
static void
qcow_free (struct qcow *q)
{
  stop_background (q);
  backing_close (q);
  snapshots_free (q);
  cache_free (&q->l2_cache);
  cache_free (&q->refblock_cache);
  if (q->data != q->img)
    qcow_backend_free (q->data);
  qcow_backend_free (q->img);
  pthread_mutex_destroy (&q->lock);
  pthread_cond_destroy (&q->alloc_cond);
  io_lock_destroy (q);
  pthread_mutex_destroy (&q->compact_lock);
  pthread_mutex_destroy (&q->flush_lock);
  pthread_cond_destroy (&q->bg_cond);
  pthread_cond_destroy (&q->punch_cond);
  free (q->l1);
  free (q->rct);
  free (q->pending_free);
  free (q->zero_cluster);
  free (q->map.buf);
  free (q);
}

static int
read_table (struct qcow *q, uint64_t **tp, uint64_t n, uint64_t offset)
{
  uint64_t *t = malloc (n ? n * 8 : 8);
  if (!t) {
    ERR (q, "out of memory for a table of %" PRIu64 " entries", n);
    return -ENOMEM;
  }
  int r = io_pread_inside (q, t, n * 8, offset);
  if (r < 0) {
    free (t);
    return r;
  }
  for (uint64_t i = 0; i < n; i++)
    t[i] = be64toh (t[i]);
  *tp = t;
  return 0;
}

/* Every L2 table and refcount block the tables point to must lie inside
 * the file, aligned, clear of the header, the L1 table and the refcount
 * table: a file truncated or damaged there is refused at open. */
static int
check_tables (struct qcow *q)
{
  const uint64_t cs = q->cluster_size;
  uint64_t l1a = q->h.l1_table_offset, l1b = l1a + (uint64_t) q->h.l1_size * 8;
  uint64_t rta = q->h.refcount_table_offset, rtb = rta + q->rct_entries * 8;
  for (int t = 0; t < 2; t++) {
    const uint64_t *tab = t ? q->rct : q->l1;
    uint64_t n = t ? q->rct_entries : q->h.l1_size;
    const char *what = t ? "refcount block" : "L2 table";
    for (uint64_t i = 0; i < n; i++) {
      uint64_t off = tab[i] & (t ? RCT_OFFSET_MASK : L1_OFFSET_MASK);
      if (!off)
        continue;
      const char *why = off % cs ? "is misaligned"
        : off < cs ? "overlaps the header"
        : off >= q->file_size ? "lies beyond the end of the file (truncated?)"
        : (off < l1b && off + cs > l1a) ? "overlaps the L1 table"
        : (off < rtb && off + cs > rta) ? "overlaps the refcount table"
        : NULL;
      if (why) {
        ERR (q, "%s %" PRIu64 " at 0x%" PRIx64 " %s", what, i, off, why);
        return -EINVAL;
      }
    }
  }
  return 0;
}

int
qcow_connect (const char *path, const struct qcow_config *cfg, struct qcow **qp)
{
  struct qcow_backend *b;
  int r = qcow_backend_open_file (path, cfg && (cfg->read_only || cfg->snapshot), &b);
  return r < 0 ? r : qcow_connect_backend (b, cfg, qp);
}

int
qcow_connect_backend (struct qcow_backend *b, const struct qcow_config *cfg,
                      struct qcow **qp)
{
  static pthread_once_t env_once = PTHREAD_ONCE_INIT;
  pthread_once (&env_once, fault_from_env);
  struct chain chain = { .depth = 0, .dev[0] = b->dev, .ino[0] = b->ino };
  return connect_chain (b, cfg, &chain, qp);
}

/* Open the image on B (ours from now on); CHAIN: the images above it. */
int
connect_chain (struct qcow_backend *b, const struct qcow_config *cfg,
               struct chain *chain, struct qcow **qp)
{
  struct qcow *q = aligned_alloc (_Alignof (struct qcow), sizeof *q);
  if (q)
    memset (q, 0, sizeof *q);
  if (!q) {
    qcow_errorf (b->name, "out of memory");
    qcow_backend_free (b);
    return -ENOMEM;
  }
  q->img = q->data = b;
  q->filename = b->name;
  pthread_mutex_init (&q->lock, NULL);
  pthread_cond_init (&q->alloc_cond, NULL);
  pthread_mutex_init (&q->compact_lock, NULL);
  pthread_mutex_init (&q->flush_lock, NULL);
  pthread_cond_init (&q->bg_cond, NULL);
  pthread_cond_init (&q->punch_cond, NULL);
  q->punch_tail = &q->punch_head;
  io_lock_init (q);
  if (cfg)
    q->cfg = *cfg;
  else
    qcow_config_default (&q->cfg);
  q->read_only = q->cfg.read_only || b->read_only;
  q->map_keep = q->read_only;
  q->map.idx = UINT64_MAX;
  q->fixed_size = b->ops.truncate == NULL;

  /* Read-only locks until the first change (or qcow_lock_write): taken
   * before the header is read, so no QEMU writer is changing it. */
  int r;
  uint64_t size;
  if ((r = lock_change (q, q->img, QCOW_LOCK_READ)) < 0 ||
      (r = io_bsize (q->img, &size)) < 0)
    goto fail;
  q->file_size = size;

  /* The header cluster: at most 2 MiB, zero padded past the end. */
  uint8_t *buf = calloc (1, 1u << QCOW_MAX_CLUSTER_BITS);
  if (!buf) { r = -ENOMEM; goto fail; }
  r = io_pread (q, buf, 4096, 0);
  if (r == 0) {
    uint32_t cb = rd32 (buf + 20);
    if (rd32 (buf) == QCOW_MAGIC && cb > 12 && cb <= QCOW_MAX_CLUSTER_BITS)
      r = io_pread (q, buf, 1u << cb, 0);
  }
  if (r == 0)
    r = header_parse (q, buf, q->file_size);
  free (buf);
  if (r < 0)
    goto fail;

  if (q->h.incompatible_features & QCOW_INCOMPAT_CORRUPT) {
    q->corrupt = true;
    q->read_only = true;
  }
  if ((r = read_table (q, &q->l1, q->h.l1_size, q->h.l1_table_offset)) < 0)
    goto fail;
  q->rct_entries = (uint64_t) q->h.refcount_table_clusters * q->cluster_size / 8;
  if ((r = read_table (q, &q->rct, q->rct_entries, q->h.refcount_table_offset)) < 0)
    goto fail;

  if ((r = check_tables (q)) < 0)
    goto fail;

  if ((r = caches_setup (q, metadata_sync)) < 0)
    goto fail;
  q->frontier = div_round_up (q->file_size, q->cluster_size);
  q->free_hint = 1;
  if (!(q->zero_cluster = calloc (1, q->cluster_size))) {
    r = -ENOMEM;
    goto fail;
  }
  if ((r = snapshots_load (q)) < 0 || (r = snapshot_select (q)) < 0 ||
      (r = data_file_open (q)) < 0 ||
      (r = backing_open (q, chain)) < 0)
    goto fail;
  *qp = q;
  return 0;
 fail:
  qcow_free (q);
  return r;
}

/* ---- locking (lock.h) ---- */

/* Move B (the image, its data file or a raw backing file) to lock
 * state TO. */
int
lock_change (struct qcow *q, struct qcow_backend *b, enum qcow_lock to)
{
  if (!q->cfg.locking)
    return 0;
  char msg[256];
  int r = backend_lock (b, to, msg, sizeof msg);
  if (r > 0) {
    /* No locks here (old kernel, file system without locks): like
     * QEMU's locking=auto, carry on without them. */
    qcow_debugf ("%s%s%s: %s", q->filename, b != q->img ? ": " : "",
                 b != q->img ? b->name : "", msg);
    q->cfg.locking = false;
    return 0;
  }
  if (r < 0) {
    if (b != q->img)
      ERR (q, "%s: %s", b->name, msg);
    else
      ERR (q, "%s", msg);
  }
  return r;
}

/* The write locks, on the image and its external data file.  Called with
 * q->lock held, or before the image is shared. */
int
lock_write (struct qcow *q)
{
  int r;
  if (q->read_only || q->img->lock_state == QCOW_LOCK_WRITE)
    return 0;
  if ((r = lock_change (q, q->img, QCOW_LOCK_WRITE)) < 0)
    return r;
  if (q->data != q->img &&
      (r = lock_change (q, q->data, QCOW_LOCK_DATA_WRITE)) < 0)
    lock_change (q, q->img, QCOW_LOCK_READ);
  return r;
}

int
qcow_lock_write (struct qcow *q)
{
  pthread_mutex_lock (&q->lock);
  int r = lock_write (q);
  pthread_mutex_unlock (&q->lock);
  return r;
}

/* Storage of a fixed size that reads as zeros past some point: new
 * clusters from there on need no zeros written (the frontier moves down
 * to it).  Every cluster in use stays below the frontier, so that a
 * cluster freed and reused later is never taken for one that reads as
 * zeros.  Once, before the first change (after any rebuild, when the
 * refcounts can be trusted). */
static int
find_zero_tail (struct qcow *q)
{
  struct qcow_backend *b = q->img;
  uint64_t zeros_from, used_end;
  int r;
  if (!q->fixed_size || !b->ops.zero_tail ||
      b->ops.zero_tail (b->opaque, &zeros_from) < 0 || zeros_from >= q->file_size)
    return 0;
  if ((r = rc_used_end (q, &used_end)) < 0)
    return r;
  uint64_t c = div_round_up (zeros_from, q->cluster_size);
  if (c < used_end)
    c = used_end;
  if (c < q->frontier) {
    qcow_debugf ("%s: the storage reads as zeros from cluster %" PRIu64,
                 q->filename, c);
    q->frontier = c;
  }
  return 0;
}

/* Before the first change: repair a dirty image, clear autoclear bits we
 * do not maintain, and with lazy refcounts set the dirty bit. */
int
begin_modify (struct qcow *q)
{
  int r;
  if (q->modified)
    return 0;
  if (q->read_only) {
    if (q->corrupt)
      ERR (q, "image is marked corrupt: refusing to write (repair it with "
           "qemu-img check -r all)");
    return -EROFS;
  }
  if ((r = lock_write (q)) < 0)
    return r;
  bool lazy = q->h.version >= 3 && (q->h.compatible_features & QCOW_COMPAT_LAZY_REFCOUNTS);
  /* Autoclear bits first: the rebuild does not count what they describe
   * (bitmaps), which must not be left claiming to be consistent. */
  uint64_t keep_bits = q->data_raw ? QCOW_AUTOCLEAR_DATA_RAW : 0;
  if (q->h.autoclear_features & ~keep_bits) {
    q->h.autoclear_features &= keep_bits;
    if ((r = header_write_fields (q, HDR_AUTOCLEAR, 8)) < 0 || (r = io_sync (q)) < 0)
      return r;
  }
  if (q->h.incompatible_features & QCOW_INCOMPAT_DIRTY) {
    qcow_debugf ("%s: image is dirty: rebuilding refcounts", q->filename);
    if ((r = rc_rebuild (q)) < 0)
      return r;
    if (!lazy &&
        (r = header_set_incompat (q, q->h.incompatible_features & ~QCOW_INCOMPAT_DIRTY)) < 0)
      return r;
    q->dirty_bit_set = lazy;
  }
  if ((r = find_zero_tail (q)) < 0)
    return r;
  if (lazy && !q->dirty_bit_set) {
    if ((r = header_set_incompat (q, q->h.incompatible_features | QCOW_INCOMPAT_DIRTY)) < 0)
      return r;
    q->dirty_bit_set = true;
  }
  __atomic_store_n (&q->modified, true, __ATOMIC_RELEASE);   /* rw.c */
  return 0;
}

int
qcow_disconnect (struct qcow *q)
{
  int r = 0;
  stop_background (q);
  if (q->modified) {
    r = flush_all (q);
    pthread_mutex_lock (&q->lock);
    if (r == 0)
      r = metadata_sync (q);    /* refcounts changed by the frees */
    if (r == 0)
      r = io_sync (q);
    if (r == 0 && q->dirty_bit_set)
      r = header_set_incompat (q, q->h.incompatible_features & ~QCOW_INCOMPAT_DIRTY);
    pthread_mutex_unlock (&q->lock);
  }
  qcow_free (q);
  return r;
}

/* ---- queries ---- */
void
qcow_get_info (struct qcow *q, struct qcow_info *info)
{
  pthread_mutex_lock (&q->lock);
  info->size = q->h.size;
  info->cluster_size = q->cluster_size;
  info->read_write = !q->read_only;
  pthread_mutex_unlock (&q->lock);
}

void
qcow_get_header (struct qcow *q, struct qcow_header *h)
{
  pthread_mutex_lock (&q->lock);
  *h = q->h;
  pthread_mutex_unlock (&q->lock);
}

void qcow_to_config (struct qcow *q, struct qcow_config *cfg) { *cfg = q->cfg; }
const char *qcow_filename (struct qcow *q) { return q->filename; }

void
qcow_get_stats (struct qcow *q, struct qcow_stats *st)
{
  pthread_mutex_lock (&q->lock);
  *st = q->stats;
  pthread_mutex_unlock (&q->lock);
  stats_sum (q, st);
}

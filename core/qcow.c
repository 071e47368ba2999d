/* qcow.c - the public API: open/close, read, write, flush, resize, map. */
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* ---- messages ---- */
static void default_error (const char *msg) { fprintf (stderr, "qcow: %s\n", msg); }
static qcow_msg_fn error_fn = default_error, debug_fn = NULL;

void qcow_set_error_handler (qcow_msg_fn fn) { error_fn = fn ? fn : default_error; }
void qcow_set_debug_handler (qcow_msg_fn fn) { debug_fn = fn; }

void
qcow_errorf (const char *file, const char *fmt, ...)
{
  char msg[1024];
  int n = snprintf (msg, sizeof msg, "%s: ", file);
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (msg + n, sizeof msg - n, fmt, ap);
  va_end (ap);
  error_fn (msg);
}

void
qcow_debugf (const char *fmt, ...)
{
  if (!debug_fn)
    return;
  char msg[1024];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  debug_fn (msg);
}

/* ---- defaults ---- */
void
qcow_config_default (struct qcow_config *cfg)
{
  memset (cfg, 0, sizeof *cfg);
  cfg->discard = true;
  cfg->locking = true;
}

void
qcow_create_opts_default (struct qcow_create_opts *o)
{
  memset (o, 0, sizeof *o);
  o->cluster_bits = 16;
  o->refcount_order = 4;
  o->version = 3;
  o->lazy_refcounts = true;
}

/* ---- create ---- */
int
qcow_create (const char *path, const struct qcow_create_opts *o, bool overwrite)
{
  if (o->cluster_bits < QCOW_MIN_CLUSTER_BITS || o->cluster_bits > QCOW_MAX_CLUSTER_BITS) {
    qcow_errorf (path, "cluster size must be a power of two between 512 and 2M");
    return -EINVAL;
  }
  if (o->version != 2 && o->version != 3) {
    qcow_errorf (path, "version must be 2 or 3");
    return -EINVAL;
  }
  if (o->refcount_order > 6 || (o->version == 2 && o->refcount_order != 4)) {
    qcow_errorf (path, "refcount width must be 1..64 bits (16 for version 2)");
    return -EINVAL;
  }
  if (o->version == 2 && o->lazy_refcounts) {
    qcow_errorf (path, "lazy refcounts need version 3 (compat=1.1)");
    return -EINVAL;
  }
  const uint64_t cs = 1ULL << o->cluster_bits;
  struct qcow_create_opts opts = *o;
  opts.size = (o->size + 511) & ~511ULL;
  uint64_t l1_size = div_round_up (opts.size, cs << (o->cluster_bits - 3));
  if (opts.size > (1ULL << 62) || l1_size > QCOW_MAX_L1_BYTES / 8) {
    qcow_errorf (path, "virtual size %" PRIu64 " is too large for %" PRIu64
                 "-byte clusters", o->size, cs);
    return -EFBIG;
  }
  uint64_t l1_clusters = div_round_up (l1_size * 8, cs);
  if (l1_clusters == 0)
    l1_clusters = 1;

  /* No O_TRUNC: an image in use is refused before it is truncated. */
  int fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC | (overwrite ? 0 : O_EXCL), 0644);
  if (fd == -1) {
    int e = errno;
    qcow_errorf (path, "%s", e == EEXIST ? "file exists" : strerror (e));
    return -e;
  }
  char lockmsg[256];
  int r = qcow_lock_image (fd, NULL, true, lockmsg, sizeof lockmsg);
  if (r < 0) {
    qcow_errorf (path, "%s", lockmsg);
    close (fd);
    return r;
  }
  r = -ENOMEM;
  uint8_t *hdr = calloc (1, cs);
  uint16_t *counts = calloc (1 + l1_clusters, sizeof *counts);
  if (!hdr || !counts)
    goto out;
  if (overwrite && ftruncate (fd, 0) == -1) {
    r = -errno;
    qcow_errorf (path, "truncate: %s", strerror (errno));
    goto out;
  }
  header_build (hdr, cs, &opts, cs, l1_size);
  for (uint64_t i = 0; i < 1 + l1_clusters; i++)
    counts[i] = 1;
  uint64_t rct_off, end;
  uint32_t rct_clusters;
  r = rc_write_structure (fd, path, o->cluster_bits, opts.refcount_order,
                          counts, 1 + l1_clusters, &rct_off, &rct_clusters, &end);
  if (r < 0)
    goto out;
  wr64 (hdr + 48, rct_off);
  wr32 (hdr + 56, rct_clusters);
  /* The L1 table: zeros (written so the file covers it). */
  uint8_t *zero = calloc (l1_clusters, cs);
  if (!zero) { r = -ENOMEM; goto out; }
  r = io_pwrite_fd (fd, path, zero, l1_clusters * cs, cs);
  free (zero);
  if (r < 0)
    goto out;
  if ((r = io_pwrite_fd (fd, path, hdr, cs, 0)) < 0)
    goto out;
  if (ftruncate (fd, end * cs) == -1 || fsync (fd) == -1) {
    r = -errno;
    qcow_errorf (path, "%s", strerror (errno));
    goto out;
  }
  r = 0;
 out:
  free (hdr);
  free (counts);
  if (close (fd) == -1 && r == 0) {
    r = -errno;
    qcow_errorf (path, "close: %s", strerror (errno));
  }
  return r;
}

/* ---- connect / disconnect ---- */
static void
stop_background (struct qcow *q)
{
  if (!q->bg_running)
    return;
  pthread_mutex_lock (&q->lock);
  q->bg_stop = true;
  pthread_cond_broadcast (&q->bg_cond);
  pthread_mutex_unlock (&q->lock);
  pthread_join (q->bg_thread, NULL);
  q->bg_running = false;
}

static void
qcow_free (struct qcow *q)
{
  stop_background (q);
  backing_close (q);
  snapshots_free (q);
  cache_free (&q->l2c);
  cache_free (&q->rbc);
  if (q->fd >= 0)
    close (q->fd);
  pthread_mutex_destroy (&q->lock);
  pthread_cond_destroy (&q->alloc_cond);
  pthread_rwlock_destroy (&q->io_lock);
  pthread_mutex_destroy (&q->compact_lock);
  pthread_mutex_destroy (&q->flush_lock);
  pthread_cond_destroy (&q->bg_cond);
  pthread_cond_destroy (&q->punch_cond);
  free (q->l1);
  free (q->rct);
  free (q->pending_free);
  free (q->zero_cluster);
  free (q->filename);
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
  int r = io_pread_fd (q->fd, q->filename, t, n * 8, offset, false);
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
  static pthread_once_t env_once = PTHREAD_ONCE_INIT;
  pthread_once (&env_once, fault_from_env);
  struct chain chain = { .depth = 0 };
  struct stat st;
  if (stat (path, &st) == 0) {
    chain.dev[0] = st.st_dev;
    chain.ino[0] = st.st_ino;
  }
  return connect_chain (path, cfg, &chain, qp);
}

int
connect_chain (const char *path, const struct qcow_config *cfg,
               struct chain *chain, struct qcow **qp)
{
  struct qcow *q = calloc (1, sizeof *q);
  if (!q || !(q->filename = strdup (path))) {
    free (q);
    qcow_errorf (path, "out of memory");
    return -ENOMEM;
  }
  q->fd = q->backing_fd = q->data_fd = -1;
  pthread_mutex_init (&q->lock, NULL);
  pthread_cond_init (&q->alloc_cond, NULL);
  pthread_mutex_init (&q->compact_lock, NULL);
  pthread_mutex_init (&q->flush_lock, NULL);
  pthread_cond_init (&q->bg_cond, NULL);
  pthread_cond_init (&q->punch_cond, NULL);
  q->punch_tail = &q->punch_head;
  pthread_rwlockattr_t attr;
  pthread_rwlockattr_init (&attr);
  pthread_rwlockattr_setkind_np (&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&q->io_lock, &attr);
  pthread_rwlockattr_destroy (&attr);
  if (cfg)
    q->cfg = *cfg;
  else
    qcow_config_default (&q->cfg);
  q->read_only = q->cfg.read_only;

  int r;
  q->fd = open (path, (q->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (q->fd == -1 && !q->read_only && (errno == EACCES || errno == EROFS || errno == EPERM)) {
    q->read_only = true;
    q->fd = open (path, O_RDONLY | O_CLOEXEC);
  }
  if (q->fd == -1) {
    r = -errno;
    ERR (q, "%s", strerror (errno));
    goto fail;
  }
  struct stat st;
  if (fstat (q->fd, &st) == -1) {
    r = -errno;
    ERR (q, "stat: %s", strerror (errno));
    goto fail;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    ERR (q, "not a regular file or block device");
    r = -EINVAL;
    goto fail;
  }
  /* Read-only locks until the first change (or qcow_lock_write): taken
   * before the header is read, so no QEMU writer is changing it. */
  if ((r = lock_change (q, q->fd, NULL, &q->lock_state, QCOW_LOCK_READ)) < 0)
    goto fail;
  off_t size = lseek (q->fd, 0, SEEK_END);
  if (size < 0) {
    r = -errno;
    ERR (q, "seek: %s", strerror (errno));
    goto fail;
  }
  q->file_size = size;

  /* The header cluster: at most 2 MiB, zero padded past the end. */
  uint8_t *buf = calloc (1, 1u << QCOW_MAX_CLUSTER_BITS);
  if (!buf) { r = -ENOMEM; goto fail; }
  r = io_pread_fd (q->fd, q->filename, buf, 4096, 0, true);
  if (r == 0) {
    uint32_t cb = rd32 (buf + 20);
    if (rd32 (buf) == QCOW_MAGIC && cb > 12 && cb <= QCOW_MAX_CLUSTER_BITS)
      r = io_pread_fd (q->fd, q->filename, buf, 1u << cb, 0, true);
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

  /* Caches: enough L2 tables to map the whole image, up to 32 MiB. */
  uint64_t budget = q->cfg.cache_size ? q->cfg.cache_size : 32u << 20;
  uint64_t l2max = budget / q->cluster_size;
  if (l2max > q->h.l1_size) l2max = q->h.l1_size;
  uint64_t rbmax = budget / 4 / q->cluster_size;
  if (rbmax > q->rct_entries) rbmax = q->rct_entries;
  cache_init (&q->l2c, "L2 table", l2max < 16 ? 16 : l2max);
  cache_init (&q->rbc, "refcount block", rbmax < 16 ? 16 : rbmax);
  if ((r = cache_resize_slots (&q->l2c, q->h.l1_size)) < 0 ||
      (r = cache_resize_slots (&q->rbc, q->rct_entries)) < 0)
    goto fail;
  q->frontier = div_round_up (q->file_size, q->cluster_size);
  q->free_hint = 1;
  if (!(q->zero_cluster = calloc (1, q->cluster_size))) {
    r = -ENOMEM;
    goto fail;
  }
  if ((r = snapshots_load (q)) < 0 || (r = data_file_open (q)) < 0 ||
      (r = backing_open (q, chain)) < 0)
    goto fail;
  *qp = q;
  return 0;
 fail:
  qcow_free (q);
  return r;
}

/* ---- locking (lock.h) ---- */

/* Move FD (the image, or the file WHAT) from lock state *STATE to TO. */
int
lock_change (struct qcow *q, int fd, const char *what,
             enum qcow_lock *state, enum qcow_lock to)
{
  if (!q->cfg.locking || *state == to)
    return 0;
  char msg[256];
  int r = qcow_lock_change (fd, NULL, *state, to, msg, sizeof msg);
  if (r > 0) {
    /* No locks here (old kernel, file system without locks): like
     * QEMU's locking=auto, carry on without them. */
    qcow_debugf ("%s%s%s: %s", q->filename, what ? ": " : "", what ? what : "", msg);
    q->cfg.locking = false;
    return 0;
  }
  if (r < 0) {
    if (what)
      ERR (q, "%s: %s", what, msg);
    else
      ERR (q, "%s", msg);
    return r;
  }
  *state = to;
  return 0;
}

/* The write locks, on the image and its external data file.  Called with
 * q->lock held, or before the image is shared. */
int
lock_write (struct qcow *q)
{
  int r;
  if (q->read_only || q->lock_state == QCOW_LOCK_WRITE)
    return 0;
  if ((r = lock_change (q, q->fd, NULL, &q->lock_state, QCOW_LOCK_WRITE)) < 0)
    return r;
  if (q->data_fd != q->fd &&
      (r = lock_change (q, q->data_fd, q->data_path, &q->data_lock_state,
                        QCOW_LOCK_DATA_WRITE)) < 0)
    lock_change (q, q->fd, NULL, &q->lock_state, QCOW_LOCK_READ);
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
    if ((r = header_write_fields (q, 88, 8)) < 0 || (r = io_sync (q)) < 0)
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
  if (lazy && !q->dirty_bit_set) {
    if ((r = header_set_incompat (q, q->h.incompatible_features | QCOW_INCOMPAT_DIRTY)) < 0)
      return r;
    q->dirty_bit_set = true;
  }
  q->modified = true;
  return 0;
}

/* Hand F over to the background thread, if it runs and this is not it
 * (compaction, in that thread, needs its frees done before it goes on).
 * False if the caller must punch and finish F itself. */
static bool
punch_in_background (struct qcow *q, struct freeing *f)
{
  struct punch_job *j;
  if (!q->bg_running || !q->cfg.discard ||
      pthread_equal (pthread_self (), q->bg_thread) || !(j = malloc (sizeof *j)))
    return false;
  j->f = *f;
  j->next = NULL;
  pthread_mutex_lock (&q->lock);
  bool ok = !q->bg_stop;
  if (ok) {
    *q->punch_tail = j;
    q->punch_tail = &j->next;
    pthread_cond_broadcast (&q->bg_cond);
  }
  pthread_mutex_unlock (&q->lock);
  if (!ok)
    free (j);
  return ok;
}

/* Bytes punched at a time before the clusters are given back: a writer
 * that needs a new cluster while the file would otherwise grow waits for
 * one such part (a few milliseconds), see wait_for_punching. */
#define PUNCH_PART (8u << 20)

/* Apply F (from rc_deferred_take): punch its clusters a part at a time
 * with q->lock dropped, giving each part back once it is punched, then
 * drop the rest of its references.  With q->lock held; frees F's
 * arrays.  On failure the references not dropped leak (no harm). */
static int
apply_freeing (struct qcow *q, struct freeing *f)
{
  size_t part = PUNCH_PART >> q->cluster_bits, i = 0, ci = 0;
  if (part == 0)
    part = 1;
  int r = rc_deferred_plan (q, f);
  q->punch_busy = true;
  while (r == 0 && i < f->npunch) {
    size_t k = f->npunch - i > part ? i + part : f->npunch;
    pthread_mutex_unlock (&q->lock);
    rc_deferred_punch_part (q, f, i, k);
    pthread_mutex_lock (&q->lock);
    r = rc_deferred_drop (q, f, &ci, f->punch[k - 1]);
    q->punch_gen++;
    pthread_cond_broadcast (&q->punch_cond);
    i = k;
  }
  if (r == 0)                   /* the references to unpunched clusters */
    r = rc_deferred_drop (q, f, &ci, UINT64_MAX);
  free (f->c);
  free (f->punch);
  f->c = f->punch = NULL;
  q->punch_busy = false;
  q->punch_gen++;
  pthread_cond_broadcast (&q->punch_cond);
  return r;
}

/* Apply every queued job.  With q->lock held (dropped while punching). */
static void
punch_queued (struct qcow *q)
{
  struct punch_job *j;
  while ((j = q->punch_head) != NULL) {
    if (!(q->punch_head = j->next))
      q->punch_tail = &q->punch_head;
    int r = apply_freeing (q, &j->f);
    if (r < 0) {
      ERR (q, "background: dropping references after punching holes "
           "failed: %s", strerror (-r));
      if (!q->bg_error)
        q->bg_error = r;
    }
    free (j);
  }
}

/* Metadata out, deferred frees applied, everything durable. */
int
flush_all (struct qcow *q)
{
  int r;
  pthread_mutex_lock (&q->flush_lock);
  /* Most of the cost of a flush is the data: sync it before taking the
   * image lock, so that other requests are not held up by it; the syncs
   * metadata_sync does under the lock then have little left to do. */
  if (__atomic_load_n (&q->data_unsynced, __ATOMIC_RELAXED) &&
      (r = io_sync (q)) < 0) {
    pthread_mutex_unlock (&q->flush_lock);
    return r;
  }
  pthread_mutex_lock (&q->lock);
  r = metadata_sync (q);
  size_t durable = q->npending;
  pthread_mutex_unlock (&q->lock);
  if (r == 0)
    r = io_sync (q);
  if (r == 0 && durable > 0) {
    /* The removals are durable: let the space be reused once no request
     * that looked up an old mapping is still in flight. */
    struct freeing f;
    pthread_rwlock_wrlock (&q->io_lock);
    pthread_mutex_lock (&q->lock);
    r = rc_deferred_take (q, durable, &f);
    pthread_mutex_unlock (&q->lock);
    pthread_rwlock_unlock (&q->io_lock);
    /* Hole punching is slow (the kernel frees the blocks, drops cached
     * pages, may discard on the device: about a second for 4 GiB on
     * ext4): it is done with no lock held, while the clusters are still
     * counted so nothing can reuse them, and, where the background
     * thread runs, by that thread, so that the flush (a client's, which
     * asked only for durability) does not wait for it. */
    if (r < 0) {
      free (f.c);
      free (f.punch);
    }
    else if (f.n == 0 || !punch_in_background (q, &f)) {
      pthread_mutex_lock (&q->lock);
      r = apply_freeing (q, &f);
      pthread_mutex_unlock (&q->lock);
    }
  }
  pthread_mutex_unlock (&q->flush_lock);
  if (r == 0 && !qcow_in_background) {
    /* An error of the background thread (it leaked clusters at worst)
     * is reported by the next flush: never swallowed. */
    pthread_mutex_lock (&q->lock);
    r = q->bg_error;
    q->bg_error = 0;
    pthread_mutex_unlock (&q->lock);
  }
  if (r == 0 && q->cfg.runtime_asserts) {
    /* The invariant behind crash safety: what is on disk is consistent
     * (leaks allowed) after every flush. */
    struct qcow_check_result cr;
    r = qcow_check (q, &cr, NULL, NULL);
    if (r == 0 && cr.verdict != QCOW_CHECK_CLEAN && cr.verdict != QCOW_CHECK_LEAKS) {
      ERR (q, "runtime assertion failed after a flush: %s (%" PRIu64
           " corruptions)", cr.verdict == QCOW_CHECK_FAILED ? cr.reason
           : "image is inconsistent", cr.corruptions);
      r = -EIO;
    }
  }
  return r;
}

int
qcow_flush (struct qcow *q)
{
  __atomic_add_fetch (&q->stats.flushes, 1, __ATOMIC_RELAXED);
  if (q->read_only || !q->modified)
    return 0;
  return flush_all (q);
}

/* The background thread: punches the holes of flushed frees, and, once
 * compact_after_unmaps bytes were freed (or are waiting to be), compacts.
 * On stop it punches what is queued before it ends. */
static void *
bg_main (void *arg)
{
  struct qcow *q = arg;
  qcow_in_background = true;
  pthread_mutex_lock (&q->lock);
  while (!q->bg_stop || q->punch_head) {
    if (!q->punch_head && !q->bg_stop) {
      struct timespec ts;
      clock_gettime (CLOCK_REALTIME, &ts);
      ts.tv_sec += 1;
      pthread_cond_timedwait (&q->bg_cond, &q->lock, &ts);
    }
    punch_queued (q);
    if (!q->cfg.compact_after_unmaps)
      continue;
    uint64_t freed = (q->stats.freed - q->bg_freed_mark + q->npending) * q->cluster_size;
    if (q->bg_stop || freed < q->cfg.compact_after_unmaps)
      continue;
    pthread_mutex_unlock (&q->lock);
    struct qcow_compact_result res;
    int r = qcow_compact (q, NULL, NULL, &res);
    pthread_mutex_lock (&q->lock);
    q->bg_freed_mark = q->stats.freed;
    q->stats.compactions++;
    qcow_debugf ("%s: background compaction: %s, %" PRIu64 " references "
                 "updated, file %" PRIu64 " -> %" PRIu64 " bytes", q->filename,
                 r == 0 ? "done" : "failed", res.refs_updated,
                 res.old_size * 512, res.new_size * 512);
  }
  pthread_mutex_unlock (&q->lock);
  return NULL;
}

int
qcow_start_background (struct qcow *q)
{
  if (q->read_only || (!q->cfg.discard && q->cfg.compact_after_unmaps == 0) ||
      q->bg_running)
    return 0;
  int e = pthread_create (&q->bg_thread, NULL, bg_main, q);
  if (e) {
    ERR (q, "cannot start the background thread: %s", strerror (e));
    return -e;
  }
  q->bg_running = true;
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
}

/* The same, for a request that changes the image. */
int
check_write_range (struct qcow *q, size_t count, uint64_t offset)
{
  int r = check_range (q, count, offset);
  if (r == 0 && q->read_only) {
    ERR (q, "image is open read-only");
    r = -EROFS;
  }
  return r;
}

int
check_range (struct qcow *q, size_t count, uint64_t offset)
{
  if (offset > q->h.size || count > q->h.size - offset) {
    ERR (q, "request [%" PRIu64 ", +%zu) is beyond the virtual size %" PRIu64,
         offset, count, q->h.size);
    return -EINVAL;
  }
  return 0;
}

/* Clusters that read alike: zeros, the backing file, data, compressed. */
enum rclass { R_ZERO, R_BACKING, R_DATA, R_COMPRESSED, R_SUBCL };
static enum rclass
read_class (struct qcow *q, enum ckind k)
{
  switch (k) {
  case C_UNALLOC: return q->backing_path ? R_BACKING : R_ZERO;
  case C_DATA: return R_DATA;
  case C_COMPRESSED: return R_COMPRESSED;
  case C_SUBCL: return R_SUBCL;
  default: return R_ZERO;
  }
}

/* ---- read ---- */
int
qcow_read (struct qcow *q, void *buf, size_t count, uint64_t offset)
{
  int r = check_range (q, count, offset);
  if (r < 0)
    return r;
  __atomic_add_fetch (&q->stats.reads, 1, __ATOMIC_RELAXED);
  uint8_t *p = buf;
  const uint64_t cs = q->cluster_size;
  pthread_rwlock_rdlock (&q->io_lock);
  while (count > 0) {
    uint64_t gc = offset >> q->cluster_bits, in = offset & (cs - 1);
    uint64_t len = cs - in < count ? cs - in : count;
    struct cmap m, m2;
    pthread_mutex_lock (&q->lock);
    r = l2_lookup (q, gc, &m);
    /* Extend over clusters of the same kind (contiguous for data). */
    while (r == 0 && len < count) {
      r = l2_lookup (q, gc + div_round_up (in + len, cs), &m2);
      if (r < 0)
        break;
      enum rclass c = read_class (q, m.kind);
      bool same = c == read_class (q, m2.kind) &&
        (c == R_ZERO || c == R_BACKING ||
         (c == R_DATA && m2.host == m.host + ((in + len) & ~(cs - 1))));
      if (!same)
        break;
      len += cs < count - len ? cs : count - len;
    }
    pthread_mutex_unlock (&q->lock);
    if (r < 0)
      break;
    if (m.kind == C_DATA)
      r = io_dpread (q, p, len, m.host + in);
    else if (m.kind == C_SUBCL)
      r = sc_read (q, p, len, offset, &m);
    else if (m.kind == C_COMPRESSED && len == cs)
      r = compressed_read (q, m.host, p);   /* straight into the buffer */
    else if (m.kind == C_COMPRESSED) {
      uint8_t *c = malloc (cs);
      r = c ? compressed_read (q, m.host, c) : -ENOMEM;
      if (r == 0)
        memcpy (p, c + in, len);
      free (c);
    }
    else if (read_class (q, m.kind) == R_BACKING)
      r = backing_read (q, p, len, offset);
    else
      memset (p, 0, len);
    if (r < 0)
      break;
    p += len; offset += len; count -= len;
  }
  pthread_rwlock_unlock (&q->io_lock);
  return r == -ENOTSUP ? -EIO : r;
}

/* ---- write ---- */
struct inflight *
inflight_find (struct qcow *q, uint64_t gc)
{
  for (struct inflight *f = q->inflight; f; f = f->next)
    if (gc >= f->first && gc < f->first + f->count)
      return f;
  return NULL;
}

void
inflight_remove (struct qcow *q, struct inflight *f)
{
  for (struct inflight **pp = &q->inflight; *pp; pp = &(*pp)->next)
    if (*pp == f) {
      *pp = f->next;
      break;
    }
  pthread_cond_broadcast (&q->alloc_cond);
}

/* Write into clusters that need allocation, starting at guest cluster GC.
 * Called with q->lock held; returns with it held.  *DONE gets the bytes
 * written. */
static int
write_alloc (struct qcow *q, const uint8_t *p, uint64_t count, uint64_t offset,
             const struct cmap *m, uint64_t *done)
{
  const uint64_t cs = q->cluster_size;
  uint64_t gc = offset >> q->cluster_bits, in = offset & (cs - 1);
  uint64_t host, n = 1, first;
  bool fresh = false, reuse = m->kind == C_ZERO_ALLOC && m->copied;
  /* Where the rest of the new cluster comes from. */
  bool from_backing = m->kind == C_UNALLOC && q->backing_path;
  bool whole_base = m->kind == C_COMPRESSED || m->kind == C_DATA;   /* COW */
  int r;

  /* The L2 table must exist (and not be shared) before the data is
   * written. */
  struct centry *e;
  if ((r = l2_get_table (q, gc >> q->l2_bits, true, &e)) < 0)
    return r;
  if (reuse)
    host = m->host;
  else {
    if (m->kind == C_UNALLOC || m->kind == C_ZERO) {
      /* Following clusters of the same kind (same L2 table) join in. */
      uint64_t want = div_round_up (in + count, cs);
      uint64_t table_left = (1ULL << q->l2_bits) - (gc & ((1ULL << q->l2_bits) - 1));
      if (want > table_left) want = table_left;
      while (n < want) {
        struct cmap m2;
        if ((r = l2_lookup (q, gc + n, &m2)) < 0)
          return r;
        if (m2.kind != m->kind || inflight_find (q, gc + n))
          break;
        n++;
      }
    }
    if (q->data_path) {                     /* fixed place, not counted; */
      first = gc;                           /* it may hold trimmed data */
      fresh = false;
    }
    else if ((r = rc_alloc (q, n, &first, &n, &fresh)) < 0)
      return r;
    host = first << q->cluster_bits;
  }
  struct inflight f = { .first = gc, .count = n, .next = q->inflight };
  q->inflight = &f;
  pthread_mutex_unlock (&q->lock);

  uint64_t len = n * cs - in < count ? n * cs - in : count;
  uint64_t tail = n * cs - in - len;
  if (whole_base) {
    /* Copy on write: old content (decompressed or shared), merged. */
    uint8_t *c = malloc (cs);
    if (!c)
      r = -ENOMEM;
    else if (m->kind == C_COMPRESSED)
      r = compressed_read (q, m->host, c);
    else
      r = io_dpread (q, c, cs, m->host);
    if (r == 0) {
      memcpy (c + in, p, len);
      r = io_dpwrite (q, c, cs, host);
    }
    free (c);
  }
  else if (fresh && !from_backing)
    r = io_dpwrite (q, p, len, host + in);   /* the rest already reads zero */
  else {
    uint8_t *head = q->zero_cluster, *tl = q->zero_cluster;
    if (from_backing) {
      head = in ? malloc (in) : NULL;
      tl = tail ? malloc (tail) : NULL;
      if ((in && !head) || (tail && !tl))
        r = -ENOMEM;
      if (r == 0 && in)
        r = backing_read (q, head, in, gc * cs);
      if (r == 0 && tail)
        r = backing_read (q, tl, tail, offset + len);
    }
    if (r == 0) {
      struct iovec iov[3];
      int k = 0;
      if (in) iov[k++] = (struct iovec) { head, in };
      iov[k++] = (struct iovec) { (void *) p, len };
      if (tail) iov[k++] = (struct iovec) { tl, tail };
      r = io_dpwritev (q, iov, k, host);
    }
    if (from_backing) {
      free (head);
      free (tl);
    }
  }

  pthread_mutex_lock (&q->lock);
  if (r == 0) {
    for (uint64_t i = 0; i < n && r == 0; i++)
      r = l2_set2 (q, gc + i, (host + i * cs) | ENTRY_COPIED, 0xffffffffULL);
    /* Our old reference goes once the new link is durable. */
    if (r == 0 && m->kind == C_COMPRESSED)
      compressed_defer_free (q, m->host);
    else if (r == 0 && !q->data_path &&
             (m->kind == C_DATA || (m->kind == C_ZERO_ALLOC && !reuse)))
      rc_defer_free (q, m->host >> q->cluster_bits);
  }
  else if (!reuse && !q->data_path)
    rc_free (q, host >> q->cluster_bits, n);   /* never referenced */
  inflight_remove (q, &f);
  *done = len;
  return r;
}

/* A write needs a new cluster, none is known to be free below the end
 * of the file, and the background thread is punching the holes of freed
 * clusters: rather than grow the file, wait (q->lock dropped) until it
 * gives back its current part of them.  True if it waited. */
static bool
wait_for_punching (struct qcow *q)
{
  if (!q->punch_busy || q->free_hint < q->frontier ||
      pthread_equal (pthread_self (), q->bg_thread))
    return false;
  uint64_t gen = q->punch_gen;
  while (q->punch_busy && q->punch_gen == gen)
    pthread_cond_wait (&q->punch_cond, &q->lock);
  return true;
}

int
qcow_write (struct qcow *q, const void *buf, size_t count, uint64_t offset,
            unsigned flags)
{
  int r = check_write_range (q, count, offset);
  if (r < 0)
    return r;
  __atomic_add_fetch (&q->stats.writes, 1, __ATOMIC_RELAXED);
  const uint8_t *p = buf;
  const uint64_t cs = q->cluster_size;
  pthread_rwlock_rdlock (&q->io_lock);
  pthread_mutex_lock (&q->lock);
  r = begin_modify (q);
  while (r == 0 && count > 0) {
    uint64_t gc = offset >> q->cluster_bits, in = offset & (cs - 1);
    uint64_t len = cs - in < count ? cs - in : count;
    struct cmap m, m2;
    if ((r = l2_lookup (q, gc, &m)) < 0)
      break;
    if (inflight_find (q, gc)) {
      /* Being allocated or moved: look again once that is done. */
      pthread_cond_wait (&q->alloc_cond, &q->lock);
      continue;
    }
    if (m.kind == C_DATA && !m.copied) {
      uint64_t rc;
      if ((r = rc_get (q, m.host >> q->cluster_bits, &rc)) < 0)
        break;
      if (rc == 1) {            /* not shared after all: mark it so */
        if ((r = l2_set (q, gc, m.host | ENTRY_COPIED)) < 0)
          break;
        m.copied = true;
      }
    }
    if (m.kind == C_SUBCL)
      r = sc_write (q, p, len, offset, &m);
    else if (m.kind == C_DATA && m.copied) {
      /* In place: extend over contiguous allocated clusters. */
      while (len < count) {
        if ((r = l2_lookup (q, gc + div_round_up (in + len, cs), &m2)) < 0)
          break;
        if (m2.kind != C_DATA || !m2.copied ||
            m2.host != m.host + ((in + len) & ~(cs - 1)) ||
            inflight_find (q, gc + div_round_up (in + len, cs)))
          break;
        len += cs < count - len ? cs : count - len;
      }
      if (r < 0)
        break;
      pthread_mutex_unlock (&q->lock);
      r = io_dpwrite (q, p, len, m.host + in);
      pthread_mutex_lock (&q->lock);
    }
    else if (wait_for_punching (q))
      continue;                 /* look again */
    else
      r = write_alloc (q, p, count, offset, &m, &len);
    if (r < 0)
      break;
    p += len; offset += len; count -= len;
  }
  pthread_mutex_unlock (&q->lock);
  pthread_rwlock_unlock (&q->io_lock);
  if (r == 0 && (flags & QCOW_FUA))
    r = flush_all (q);
  return r == -ENOTSUP ? -EIO : r;
}

/* ---- map ---- */
static unsigned
kind_flags (enum ckind k)
{
  switch (k) {
  case C_UNALLOC: case C_ZERO: return QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
  case C_ZERO_ALLOC: return QCOW_EXTENT_ZERO;
  default: return 0;
  }
}

static int
map_locked (struct qcow *q, uint64_t offset, uint64_t count, uint64_t *lenp,
            unsigned *flagsp)
{
  const uint64_t cs = q->cluster_size;
  uint64_t len = 0;
  unsigned flags = 0;
  while (len < count) {
    uint64_t off = offset + len, gc = off >> q->cluster_bits;
    uint64_t idx = gc >> q->l2_bits;
    unsigned f;
    uint64_t step;
    bool unalloc;
    if (!(q->l1[idx] & L1_OFFSET_MASK) && !cache_peek (&q->l2c, idx)) {
      unalloc = true;
      f = QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
      step = ((idx + 1) << (q->l2_bits + q->cluster_bits)) - off;
    }
    else {
      struct cmap m;
      int r = l2_lookup (q, gc, &m);
      if (r < 0)
        return r;
      unalloc = m.kind == C_UNALLOC;
      f = kind_flags (m.kind);
      step = cs - (off & (cs - 1));
      if (m.kind == C_SUBCL)
        sc_map (q, &m, off, count - len, &step, &f, &unalloc);
    }
    if (unalloc && q->backing_path) {       /* what shows through */
      int r = backing_map (q, off, step < count - len ? step : count - len, &step, &f);
      if (r < 0)
        return r;
    }
    if (len == 0)
      flags = f;
    else if (f != flags)
      break;
    len += step < count - len ? step : count - len;
  }
  *lenp = len;
  *flagsp = flags;
  return 0;
}

int
qcow_map (struct qcow *q, uint64_t offset, uint64_t count, uint64_t *len,
          unsigned *flags)
{
  int r = check_range (q, count, offset);
  if (r < 0)
    return r;
  pthread_mutex_lock (&q->lock);
  r = map_locked (q, offset, count, len, flags);
  pthread_mutex_unlock (&q->lock);
  return r;
}

static int64_t
seek_flags (struct qcow *q, uint64_t from, unsigned mask, bool want_set)
{
  while (from < q->h.size) {
    uint64_t len;
    unsigned flags;
    int r = qcow_map (q, from, q->h.size - from, &len, &flags);
    if (r < 0)
      return r;
    if (((flags & mask) != 0) == want_set)
      return from;
    from += len;
  }
  return q->h.size;
}

int64_t qcow_seek_mapped (struct qcow *q, uint64_t from)
{ return seek_flags (q, from, QCOW_EXTENT_HOLE, false); }
int64_t qcow_seek_unmapped (struct qcow *q, uint64_t from)
{ return seek_flags (q, from, QCOW_EXTENT_ZERO, true); }

int
qcow_allocated_bytes (struct qcow *q, uint64_t *bytes)
{
  uint64_t n = 0;
  int r = 0;
  pthread_mutex_lock (&q->lock);
  for (uint64_t i = 0; i < q->h.l1_size && r == 0; i++) {
    struct centry *e;
    if ((r = l2_get_table (q, i, false, &e)) < 0 || !e)
      continue;
    for (uint64_t j = 0; j < (1ULL << q->l2_bits); j++) {
      uint64_t ent = rd64 (L2E (q, e->data, j));
      if (ent & ENTRY_COMPRESSED ||
          ((ent & L2_OFFSET_MASK) && !(q->h.version >= 3 && (ent & ENTRY_ZERO))))
        n++;
    }
  }
  pthread_mutex_unlock (&q->lock);
  *bytes = n * q->cluster_size;
  return r;
}

/* ---- resize and rebuild ---- */
static int
grow_l1 (struct qcow *q, uint64_t entries)
{
  const uint64_t cs = q->cluster_size;
  uint64_t nclusters = div_round_up (entries * 8, cs), first;
  int r;
  if (entries * 8 > QCOW_MAX_L1_BYTES) {
    ERR (q, "new size needs an L1 table larger than %u bytes", QCOW_MAX_L1_BYTES);
    return -EFBIG;
  }
  if ((r = metadata_sync (q)) < 0)             /* L2 tables before the new L1 */
    return r;
  if ((r = rc_alloc_contiguous (q, nclusters, &first)) < 0)
    return r;
  uint64_t *l1 = calloc (nclusters * cs / 8, 8);
  if (!l1)
    return -ENOMEM;
  memcpy (l1, q->l1, (uint64_t) q->h.l1_size * 8);
  uint64_t *buf = calloc (nclusters * cs / 8, 8);
  if (!buf) { free (l1); return -ENOMEM; }
  for (uint64_t i = 0; i < q->h.l1_size; i++)
    buf[i] = htobe64 (l1[i]);
  r = io_pwrite (q, buf, nclusters * cs, first << q->cluster_bits);
  free (buf);
  if (r < 0 || (r = metadata_sync (q)) < 0 || (r = io_sync (q)) < 0 ||
      (r = cache_resize_slots (&q->l2c, entries)) < 0) {
    free (l1);
    return r;
  }
  uint64_t old_off = q->h.l1_table_offset, old_n = q->h.l1_size;
  free (q->l1);
  q->l1 = l1;
  q->h.l1_size = entries;
  q->h.l1_table_offset = first << q->cluster_bits;
  q->l1_dirty_lo = q->l1_dirty_hi = 0;
  if ((r = header_write_fields (q, 24, 24)) < 0 || (r = io_sync (q)) < 0)
    return r;
  if (old_n)
    for (uint64_t i = 0; i < div_round_up (old_n * 8, cs); i++)
      rc_defer_free (q, (old_off >> q->cluster_bits) + i);
  return 0;
}

/* Unlink everything at or past guest cluster FROM. */
static int
discard_tail (struct qcow *q, uint64_t from)
{
  int r;
  for (uint64_t idx = from >> q->l2_bits; idx < q->h.l1_size; idx++) {
    struct centry *e;
    if ((r = l2_get_table (q, idx, false, &e)) < 0)
      return r;
    if (!e)
      continue;
    if ((r = l2_get_table (q, idx, true, &e)) < 0)
      return r;
    uint64_t j0 = idx == (from >> q->l2_bits) ? from & ((1ULL << q->l2_bits) - 1) : 0;
    for (uint64_t j = j0; j < (1ULL << q->l2_bits); j++) {
      uint8_t *ep = L2E (q, e->data, j);
      uint64_t ent = rd64 (ep);
      if (q->extl2 && rd64 (ep + 8)) {
        wr64 (ep + 8, 0);
        cache_mark_dirty (&q->l2c, e);
      }
      if (ent & ENTRY_COMPRESSED)
        compressed_defer_free (q, ent);
      else if (ent & L2_OFFSET_MASK)
        rc_defer_free (q, ((ent & L2_OFFSET_MASK) >> q->cluster_bits) |
                          (q->data_path ? DEFER_DATA_FILE : 0));
      if (ent) {
        wr64 (ep, 0);
        cache_mark_dirty (&q->l2c, e);
      }
    }
    if (j0 == 0) {                /* the whole table goes */
      uint64_t off = q->l1[idx] & L1_OFFSET_MASK;
      if ((r = metadata_sync (q)) < 0)
        return r;
      cache_drop (&q->l2c, idx);
      q->l1[idx] = 0;
      mark_l1_dirty (q, idx);
      rc_defer_free (q, off >> q->cluster_bits);
    }
  }
  return 0;
}

int
qcow_resize (struct qcow *q, uint64_t new_size, bool ignore_data_loss)
{
  int r;
  new_size = (new_size + 511) & ~511ULL;
  if (q->read_only) {
    ERR (q, "image is open read-only");
    return -EROFS;
  }
  if (new_size > (1ULL << 62)) {
    ERR (q, "new size %" PRIu64 " is too large", new_size);
    return -EFBIG;
  }
  if (new_size < q->h.size && q->nsnap) {
    ERR (q, "cannot shrink an image that has internal snapshots");
    return -ENOTSUP;
  }
  if (new_size < q->h.size && !ignore_data_loss) {
    ERR (q, "shrinking from %" PRIu64 " to %" PRIu64 " bytes would lose data "
         "(use --ignore-data-loss)", q->h.size, new_size);
    return -EINVAL;
  }
  pthread_rwlock_wrlock (&q->io_lock);
  pthread_mutex_lock (&q->lock);
  r = begin_modify (q);
  const uint64_t cs = q->cluster_size;
  if (r == 0 && new_size < q->h.size) {
    /* Zero the tail of a partial last cluster, then unlink the rest. */
    uint64_t in = new_size & (cs - 1);
    if (in) {
      struct cmap m;
      if ((r = l2_lookup (q, new_size >> q->cluster_bits, &m)) == 0 &&
          (m.kind == C_DATA || (m.kind == C_SUBCL && m.host)))
        r = io_dpwrite (q, q->zero_cluster, cs - in, m.host + in);
    }
    if (r == 0)
      r = discard_tail (q, div_round_up (new_size, cs));
  }
  uint64_t entries = div_round_up (new_size, cs << q->l2_bits);
  if (r == 0 && entries > q->h.l1_size)
    r = grow_l1 (q, entries);
  if (r == 0 && (r = metadata_sync (q)) == 0 && (r = io_sync (q)) == 0) {
    q->h.size = new_size;
    if ((r = header_write_fields (q, 24, 8)) == 0)
      r = io_sync (q);
  }
  if (r == 0)
    r = rc_apply_deferred (q);
  pthread_mutex_unlock (&q->lock);
  pthread_rwlock_unlock (&q->io_lock);
  return r;
}

int
qcow_rebuild_refcount_table (struct qcow *q)
{
  int r;
  if (q->read_only) {
    ERR (q, "image is open read-only");
    return -EROFS;
  }
  pthread_rwlock_wrlock (&q->io_lock);
  pthread_mutex_lock (&q->lock);
  /* Rebuild before anything else changes the file (begin_modify would
   * set the dirty bit, clear autoclear bits), so that an image whose
   * references cannot be trusted is left exactly as it was. */
  off_t size = lseek (q->fd, 0, SEEK_END);
  r = lock_write (q);
  if (r == 0 && (r = metadata_sync (q)) == 0 && (r = io_sync (q)) == 0)
    r = rc_rebuild (q);
  if (r < 0 && size >= 0 && lseek (q->fd, 0, SEEK_END) > size && !q->modified) {
    io_truncate (q, size);            /* drop a half-written structure */
    q->file_size = size;
  }
  if (r == 0 && (q->h.incompatible_features & QCOW_INCOMPAT_DIRTY) && !q->modified)
    r = header_set_incompat (q, q->h.incompatible_features & ~QCOW_INCOMPAT_DIRTY);
  if (r == 0)
    r = begin_modify (q);
  pthread_mutex_unlock (&q->lock);
  pthread_rwlock_unlock (&q->io_lock);
  return r;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* internal.h - shared by the core's files; not part of the public API. */
#ifndef QCOW_INTERNAL_H
#define QCOW_INTERNAL_H

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <endian.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <inttypes.h>
#include <time.h>

#include "qcow.h"
#include "format.h"
#include "lock.h"

#define DEFER_DATA_FILE   (1ULL << 63)  /* deferred: punch in the data file */

static inline uint64_t div_round_up (uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

/* Seconds on the monotonic clock (timings and deadlines). */
static inline double
monotonic_seconds (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Store a table word whole (lock-free readers: cache.c). */
static inline void
wr64_whole (void *p, uint64_t v)
{
  __atomic_store_n ((uint64_t *) p, htobe64 (v), __ATOMIC_RELEASE);
}

/* The Jth entry of an L2 table (extended entries are 16 bytes: the
 * descriptor, then the subcluster bitmap). */
#define L2E(q, table, j) ((uint8_t *) (table) + ((uint64_t) (j) << (q)->l2_esh))
/* The byte offset of guest cluster GC's entry inside its L2 cache entry
 * (a whole table, or a slice of one: cache.c). */
#define L2E_OFF(q, gc) (((gc) & ((1ULL << (q)->sl_bits) - 1)) << (q)->l2_esh)

/* ---- cache.c: metadata table cache (L2 tables, refcount blocks) ---- */
struct centry {
  uint64_t key;            /* L1 index or refcount table index */
  uint64_t offset;         /* host offset of the table cluster */
  uint8_t *data;           /* one cluster, big-endian as on disk; the
                              same buffer for the entry's lifetime */
  bool dirty;
  bool referenced;         /* used by the lock-free path since it was
                              last at the cold end of the LRU list */
  unsigned seq;            /* odd while key and data change (cache.c) */
  struct centry *prev, *next;   /* LRU list, most recent first; next
                                   links the spare list */
};
struct cache {
  const char *what;        /* "L2 table" / "refcount block" */
  int (*writeback) (struct qcow *q);   /* every dirty table, in order */
  size_t esize;            /* bytes per entry */
  struct centry **slot;    /* by key */
  uint64_t nslots;
  size_t count, max;
  size_t ndirty;
  struct centry lru;       /* sentinel */
  struct centry *spare;    /* dropped entries, kept for reuse */
};

/* ---- counters updated on every request: per thread shards (no cache
 * line shared between CPUs), summed by qcow_get_stats ---- */
enum stat_counter { STAT_READS, STAT_WRITES, STAT_NR };
#define STAT_SHARDS 64           /* nbdkit runs 16 threads a connection */
struct stat_shard {
  uint64_t v[STAT_NR];
  unsigned readers;        /* io_lock holders counted here (iolock.c) */
} __attribute__ ((aligned (64)));

/* ---- backend.c: the storage under an image (qcow.h) ---- */
#define IOV_MAX_CORE 8     /* pieces of one pwritev, at most */
struct qcow_backend {
  struct qcow_backend_ops ops;
  void *opaque;
  char *name;              /* for messages; its directory resolves
                              relative backing file names */
  bool read_only;          /* no pwrite */
  int fd;                  /* a local file's descriptor (locks), else -1 */
  dev_t dev;               /* a local file: its identity (chain loops) */
  ino_t ino;
  enum qcow_lock lock_state;   /* what fd holds (lock.h) */
};

/* ---- the image ---- */
struct inflight {          /* a guest cluster range being allocated */
  uint64_t first, count;   /* guest cluster numbers */
  struct inflight *next;
};

struct move_mark {         /* a guest cluster compaction is copying, while */
  uint64_t gc;             /* writes to it go on (compact.c) */
  bool written;            /* one reached the old place: the move is off */
};

struct chain {               /* the images above one being opened */
  int depth;
  dev_t dev[16];
  ino_t ino[16];
};

struct snapshot {            /* one entry of the snapshot table */
  uint64_t l1_offset;
  uint32_t l1_size;
  char *id, *name;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec, vm_state_size, disk_size;
  uint64_t icount;         /* UINT64_MAX: not recorded */
  bool has_disk_size;
  uint8_t *extra;          /* its extra data as read (what we do not know
                              of it is written back as it was) */
  uint32_t extra_len;
};

/* One open image, shared by every thread that uses it.
 *
 * Locks, always taken in this order (a thread holding one may take only
 * those after it):
 *
 *   compact_lock   one compaction at a time (qcow_compact, the whole run)
 *   flush_lock     one flush_all at a time
 *   io_lock        (iolock.c) shared by every request that does data I/O
 *                  from a mapping it looked up (read, write, zero, trim);
 *                  exclusive for whatever frees host clusters for reuse
 *                  or moves them (applying deferred frees, compaction's
 *                  switch, resize, check), so nothing in flight sees its
 *                  clusters reused
 *   lock           mutex: the metadata (header copy, L1, refcount table,
 *                  caches, allocator, in-flight list, deferred frees,
 *                  background thread state); never held across data I/O
 *                  on the request path; its conditions are alloc_cond
 *                  (an allocation finished), punch_cond (punched space
 *                  given back) and bg_cond (work for the thread)
 *
 * The fields above "lock" are set at open and constant after (but
 * cfg.locking, dropped under lock where a file cannot be locked); data_unsynced
 * and file_size are updated atomically; stats are counted with atomics or
 * under lock. */
struct qcow {
  char *filename;          /* the image's name in messages (img->name) */
  struct qcow_backend *img;/* the storage holding the image */
  bool fixed_size;         /* it cannot grow: clusters come from below
                              file_size, or -ENOSPC */
  bool read_only;          /* never write */
  bool corrupt;            /* header corrupt bit: forced read-only */
  struct qcow_config cfg;

  /* internal snapshots (never modified) */
  struct snapshot *snap;
  uint32_t nsnap;
  uint64_t snap_table_len;

  /* external data file (guest data at host offset = guest offset, not
   * refcounted); data == img when there is none */
  struct qcow_backend *data;
  char *data_path;
  bool data_raw;           /* autoclear bit 1: it is a valid raw image */

  /* backing file */
  struct qcow *backing;    /* qcow2 backing image, or */
  struct qcow_backend *backing_raw;   /* raw backing file, or NULL */
  char *backing_path;      /* NULL: no backing file */
  char backing_fmt[8];
  uint64_t backing_size;

  /* header (host-endian) */
  struct qcow_header h;
  unsigned cluster_bits;
  uint64_t cluster_size;
  unsigned l2_bits;        /* log2 entries per L2 table */
  unsigned l2_esh;         /* log2 bytes per L2 entry: 3, or 4 (extended) */
  unsigned sl_bits;        /* log2 L2 entries per L2 cache entry (slice):
                              l2_bits, or fewer (cache.c: caches_setup) */
  bool extl2;              /* extended L2 entries: 32 subclusters each */
  unsigned sc_bits;        /* log2 subcluster size */
  unsigned rb_bits;        /* log2 entries per refcount block */
  uint64_t refcount_max;

  pthread_mutex_t lock;    /* guards everything below (see above) */
  pthread_cond_t alloc_cond;
  struct {                 /* shared by data I/O; exclusive to free space */
    bool writer;           /* iolock.c */
    pthread_mutex_t m;
    pthread_cond_t cond;
  } io_lock;
  pthread_mutex_t compact_lock;  /* one compaction at a time */
  bool compacting;         /* qcow_compact runs: it may mark clusters in
                              flight (with io_lock exclusive), so rw.c's
                              lock-free overwrite is off */
  pthread_mutex_t flush_lock;    /* one flush_all at a time */
  /* + 1 by each flush_all as it writes the metadata (meta_gen), and that
   * number once it is durable (durable_gen): what was in memory when
   * meta_gen was G is on disk once durable_gen > G. */
  uint64_t meta_gen, durable_gen;
  pthread_t bg_thread;     /* background hole punching and compaction */
  bool bg_running, bg_stop;
  bool bg_compacting;      /* it is compacting (wants io_lock exclusively) */
  pthread_cond_t bg_cond;
  uint64_t bg_freed_mark;  /* stats.freed at the last compaction */
  /* Frees taken by flush_all whose holes the background thread punches
   * (their clusters stay counted, so unusable, until it has). */
  struct punch_job *punch_head, **punch_tail;
  bool punch_busy;         /* the thread is punching (lock dropped) */
  uint64_t punch_gen;      /* + 1 each time it gave clusters back */
  pthread_cond_t punch_cond;     /* signalled then */
  int bg_error;            /* its first error, for the next flush to return */

  uint64_t *l1;            /* active L1, host-endian; l1_size entries */
  uint64_t l1_dirty_lo, l1_dirty_hi;   /* dirty index range [lo, hi) */
  uint64_t *rct;           /* refcount table, host-endian */
  uint64_t rct_entries;
  bool rct_dirty;
  /* The refcount table moved in memory; the header does not point to it
   * on disk yet (metadata_sync finishes the move before anything else). */
  bool rct_switch_pending;
  uint64_t rct_old_off;
  uint32_t rct_old_clusters;
  struct cache l2_cache, refblock_cache;

  uint64_t file_size;      /* bytes known to exist (max written end) */
  uint64_t frontier;       /* first host cluster never handed out and past
                              the original end of file (or of what the
                              fixed-size storage holds): reads as zeros */
  uint64_t free_hint;      /* no free cluster below this one */
  uint64_t cfill;          /* compressed writes: the next free byte in the
                              host cluster being filled, 0 = none */
  struct inflight *inflight;
  struct move_mark *moving;/* sorted by gc: compaction's current batch */
  size_t nmoving;
  /* Links (L2 entries made to point at data) counted by note_link, and
   * how many of them an fdatasync is known to cover (sync_links): the
   * ordered write-back syncs before writing L2 tables only if some link
   * is not covered, not on every write of data in place. */
  uint64_t link_seq, link_synced;
  uint64_t *pending_free;  /* host clusters to decrement once unlinked */
  size_t npending, pending_cap;

  bool modified;           /* begin_modify() has run */
  bool dirty_bit_set;      /* we set the header's dirty bit */
  bool data_unsynced;      /* data written since the last fdatasync */
  uint8_t *zero_cluster;   /* cluster_size zero bytes */
  struct map_scan {        /* L2 slices read by map.c (q->lock) */
    uint64_t idx, at;      /* table IDX, at AT in the file: */
    uint64_t lo, hi;       /* its slices LO..HI-1 are in BUF */
    uint8_t *buf;          /* a cluster */
  } map;
  bool map_keep;           /* read-only from the start: MAP stays valid
                              from one call to the next */

  struct qcow_stats stats;  /* except what the shards count */
  struct stat_shard shard[STAT_SHARDS];
};

/* This thread's stat shard (assigned round robin on first use). */
unsigned stat_shard_index (void);
static inline void
stat_add (struct qcow *q, enum stat_counter k, uint64_t n)
{
  __atomic_fetch_add (&q->shard[stat_shard_index ()].v[k], n, __ATOMIC_RELAXED);
}
void stats_sum (struct qcow *q, struct qcow_stats *st);

/* ---- iolock.c ---- */
void io_lock_init (struct qcow *q);
void io_lock_destroy (struct qcow *q);
void io_lock_shared (struct qcow *q);
void io_unlock_shared (struct qcow *q);
void io_lock_exclusive (struct qcow *q);
int io_lock_exclusive_until (struct qcow *q, const struct timespec *deadline);
void io_unlock_exclusive (struct qcow *q);

/* ---- msg.c ---- */
void qcow_errorf (const char *file, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
void qcow_debugf (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
#define ERR(q, ...) qcow_errorf ((q)->filename, __VA_ARGS__)
/* Damaged metadata in TABLE ("L2 table", ...) at host OFFSET (UINT64_MAX:
 * none): reported as such; returns -EIO for the request to fail with. */
int qcow_corrupt (struct qcow *q, const char *table, uint64_t offset,
                  const char *fmt, ...) __attribute__ ((format (printf, 4, 5)));

/* V (N elements of SIZE bytes used, *CAP allocated) with room for one
 * more: the same array, or a bigger one (the first holds FIRST), or NULL
 * (V untouched) if memory ran out. */
static inline void *
grow_array (void *v, size_t n, size_t *cap, size_t size, size_t first)
{
  if (n < *cap)
    return v;
  size_t c = *cap ? *cap * 2 : first;
  void *p = realloc (v, c * size);
  if (p)
    *cap = c;
  return p;
}

/* ---- io.c: the core's I/O on backends (messages, fault injection) ---- */
extern __thread bool qcow_in_background;   /* set in the background thread */
/* On any backend B: reads give zeros past its end. */
int io_bpread (struct qcow_backend *b, void *buf, size_t count, uint64_t offset);
int io_bpwrite (struct qcow_backend *b, const void *buf, size_t count, uint64_t offset);
int io_bflush (struct qcow_backend *b);
int io_bsize (struct qcow_backend *b, uint64_t *size);
/* On the image's storage. */
int io_pread (struct qcow *q, void *buf, size_t count, uint64_t offset);
int io_pread_inside (struct qcow *q, void *buf, size_t count, uint64_t offset);
int io_pwrite (struct qcow *q, const void *buf, size_t count, uint64_t offset);
int io_pwritev (struct qcow *q, struct iovec *iov, int iovcnt, uint64_t offset);
int io_sync (struct qcow *q);
int io_punch (struct qcow *q, bool data, uint64_t offset, uint64_t len);
int io_truncate (struct qcow *q, uint64_t size);
/* Guest data: in the image, or in its external data file. */
int io_data_pread (struct qcow *q, void *buf, size_t count, uint64_t offset);
int io_data_pwrite (struct qcow *q, const void *buf, size_t count, uint64_t offset);
int io_data_pwritev (struct qcow *q, struct iovec *iov, int iovcnt, uint64_t offset);
void fault_from_env (void);

/* ---- backend.c ---- */
int backend_open_file_flags (const char *path, int flags, mode_t mode,
                             struct qcow_backend **bp);
int backend_lock (struct qcow_backend *b, enum qcow_lock to, char *msg, size_t len);

/* ---- header.c ---- */
int header_parse (struct qcow *q, const uint8_t *buf, uint64_t file_size);
int header_write_fields (struct qcow *q, unsigned off, unsigned len);
int header_set_incompat (struct qcow *q, uint64_t incompat);
size_t header_build (uint8_t *buf, size_t bufsize, const struct qcow_create_opts *o,
                     uint64_t l1_offset, uint32_t l1_size);

/* ---- cache.c ---- */
#define QCOW_DEFAULT_L2_CACHE (32u << 20)   /* QEMU's default maximum */
int caches_setup (struct qcow *q, int (*writeback) (struct qcow *q));
/* L2 cache slots for an L1 table of N entries; also the key of table
 * N's first slice (l2_slots (q, 1): slices per table). */
static inline uint64_t l2_slots (struct qcow *q, uint64_t n)
{ return n << (q->l2_bits - q->sl_bits); }
int cache_resize_slots (struct cache *c, uint64_t nslots);
void cache_free (struct cache *c);
/* Find KEY (loading it from OFFSET on a miss, or zero-filling if FRESH). */
int cache_get (struct qcow *q, struct cache *c, uint64_t key, uint64_t offset,
               bool fresh, struct centry **ep);
struct centry *cache_peek (struct cache *c, uint64_t key);
bool cache_read_word (struct cache *c, uint64_t key, size_t off, uint64_t *v);
void cache_mark_dirty (struct cache *c, struct centry *e);
int cache_write_dirty (struct qcow *q, struct cache *c);
void cache_drop (struct cache *c, uint64_t key);
void cache_drop_all (struct cache *c);

/* ---- refcount.c ---- */
int rc_get (struct qcow *q, uint64_t cluster, uint64_t *rc);
int rc_set (struct qcow *q, uint64_t cluster, uint64_t rc);
int rc_alloc (struct qcow *q, uint64_t n, uint64_t *first, uint64_t *got, bool *fresh);
int rc_free (struct qcow *q, uint64_t cluster, uint64_t n);
int rc_used_end (struct qcow *q, uint64_t *end);
int rc_alloc_contiguous (struct qcow *q, uint64_t n, uint64_t *first);
void rc_defer_free (struct qcow *q, uint64_t cluster);
int rc_apply_deferred (struct qcow *q);
struct freeing {           /* deferred frees being applied (flush_all) */
  uint64_t *c; size_t n;   /* image clusters losing a reference, sorted */
  uint64_t *punch; size_t npunch;   /* those to punch out of the file */
};
struct punch_job {
  struct freeing f;
  struct punch_job *next;
};
int rc_deferred_take (struct qcow *q, size_t n, struct freeing *f);
int rc_deferred_plan (struct qcow *q, struct freeing *f);
void rc_deferred_punch (struct qcow *q, struct freeing *f);
void rc_deferred_punch_part (struct qcow *q, struct freeing *f, size_t i, size_t k);
int rc_deferred_drop (struct qcow *q, struct freeing *f, size_t *i, uint64_t last);
int rc_deferred_finish (struct qcow *q, struct freeing *f);
int rct_commit_switch (struct qcow *q);
int rc_write_structure (struct qcow_backend *b, unsigned cluster_bits,
                        unsigned refcount_order, const uint16_t *counts,
                        uint64_t nclusters, uint64_t limit, uint64_t *rct_offset,
                        uint32_t *rct_clusters, uint64_t *new_end);

/* ---- rebuild.c ---- */
int rc_rebuild (struct qcow *q);

/* ---- cluster.c ---- */
enum ckind { C_UNALLOC, C_ZERO, C_ZERO_ALLOC, C_DATA, C_COMPRESSED,
             C_SUBCL /* extended L2: see host (maybe 0) and bitmap */ };
struct cmap {
  enum ckind kind;
  uint64_t host;           /* host offset of the cluster (C_DATA, C_ZERO_ALLOC,
                              C_SUBCL), or the descriptor (C_COMPRESSED) */
  bool copied;             /* refcount known to be 1 */
  uint64_t bitmap;         /* C_SUBCL: subcluster allocation/zero bits */
};
int l2_lookup (struct qcow *q, uint64_t gcluster, struct cmap *m);
bool l2_fast_lookup (struct qcow *q, uint64_t gcluster, struct cmap *m);
int l2_decode (struct qcow *q, uint64_t gcluster, const struct centry *e, struct cmap *m);
int l2_decode_at (struct qcow *q, uint64_t gcluster, const uint8_t *ep, uint64_t at,
                  struct cmap *m);
/* GC's L2 slice (the cache entry holding its entry), NULL in *EP if no
 * table is allocated and !ALLOC; with ALLOC the table is created if
 * needed, and made unshared. */
int l2_get_slice (struct qcow *q, uint64_t gcluster, bool alloc, struct centry **ep);
/* Index of GC's entry in its slice; clusters per slice. */
static inline uint64_t l2_slice_index (struct qcow *q, uint64_t gc)
{ return gc & ((1ULL << q->sl_bits) - 1); }
/* The whole L2 table IDX as it is now (the file, with the cached slices
 * over it) into BUF (one cluster); zeros if not allocated. */
int l2_read_table (struct qcow *q, uint64_t idx, uint8_t *buf);
/* Slices FIRST..FIRST+N-1 of table IDX, as they are now, at their place
 * in the table-sized BUF. */
int l2_read_slices (struct qcow *q, uint64_t idx, uint64_t first, uint64_t n,
                    uint8_t *buf);
/* Write table IDX whole at host offset TO and make the cache point there
 * (the caller then points L1 at it). */
int l2_move_table (struct qcow *q, uint64_t idx, uint64_t to);
/* Forget every cached slice of table IDX (its changes are written). */
void l2_drop_table (struct qcow *q, uint64_t idx);
int l2_set (struct qcow *q, uint64_t gcluster, uint64_t entry);
void l2_set_in (struct qcow *q, struct centry *e, uint64_t gcluster, uint64_t entry);
int l2_set_with_bitmap (struct qcow *q, uint64_t gcluster, uint64_t entry, uint64_t bitmap);
int l2_set_synced (struct qcow *q, uint64_t gcluster, uint64_t entry);
void mark_l1_dirty (struct qcow *q, uint64_t idx);
int write_rct (struct qcow *q);
int metadata_sync (struct qcow *q);
int sync_links (struct qcow *q);
/* An L2 entry now points at data that may have been written since the
 * last sync (l2_set and l2_set_with_bitmap call it for every entry with a
 * host offset).  With q->lock held. */
static inline void
note_link (struct qcow *q)
{
  __atomic_add_fetch (&q->link_seq, 1, __ATOMIC_SEQ_CST);
}

/* ---- subcluster.c ---- */
int sc_read (struct qcow *q, uint8_t *p, uint64_t len, uint64_t offset,
             const struct cmap *m);
void sc_map (struct qcow *q, const struct cmap *m, uint64_t offset, uint64_t max,
             uint64_t *len, unsigned *flags, bool *show_backing);
bool sc_reads_zero (struct qcow *q, const struct cmap *m, uint64_t offset);
int sc_write (struct qcow *q, const uint8_t *p, uint64_t len, uint64_t offset,
              struct cmap *m);
int sc_clear (struct qcow *q, uint64_t gc, uint64_t mask, bool trim, bool unlink,
              bool *must_write);
uint64_t sc_units (struct qcow *q, uint64_t gc, uint64_t from, uint64_t to);

/* ---- compress.c ---- */
void compressed_extent (struct qcow *q, uint64_t ent, uint64_t *off, uint64_t *len);
int compressed_read (struct qcow *q, uint64_t ent, uint8_t *out);
void compressed_defer_free (struct qcow *q, uint64_t ent);

/* ---- backing.c ---- */
int backing_open (struct qcow *q, struct chain *chain);
int data_file_open (struct qcow *q);
void backing_close (struct qcow *q);
int backing_read (struct qcow *q, void *buf, uint64_t count, uint64_t offset);
int backing_map (struct qcow *q, uint64_t offset, uint64_t count, uint64_t *len,
                 unsigned *flags);

/* ---- snapshot.c ---- */
void snapshot_clear (struct snapshot *s);
/* S as a table entry into E (NULL: only the length), PAD more bytes of
 * extra data; *EXACT (if not NULL) gets the unpadded length. */
uint64_t snapshot_entry_encode (const struct snapshot *s, uint32_t pad,
                                uint8_t *e, uint64_t *exact);
#define SNAPSHOT_MAX_NAME 255              /* QEMUSnapshotInfo.name */
int snapshots_load (struct qcow *q);
void snapshots_free (struct qcow *q);
int snapshot_find (struct qcow *q, const char *id_or_name);
int snapshot_select (struct qcow *q);

/* ---- open.c ---- */
int connect_chain (struct qcow_backend *b, const struct qcow_config *cfg,
                   struct chain *chain, struct qcow **qp);
int lock_change (struct qcow *q, struct qcow_backend *b, enum qcow_lock to);
int lock_write (struct qcow *q);
int begin_modify (struct qcow *q);

/* ---- rw.c ---- */
int check_range (struct qcow *q, size_t count, uint64_t offset);
int check_write_range (struct qcow *q, size_t count, uint64_t offset);
struct inflight *inflight_find (struct qcow *q, uint64_t gc);
void inflight_remove (struct qcow *q, struct inflight *f);

/* ---- flush.c ---- */
int flush_all (struct qcow *q);
void stop_background (struct qcow *q);
void punch_queued (struct qcow *q);
int apply_freeing (struct qcow *q, struct freeing *f);

/* ---- compact.c ---- */
void compact_note_write (struct qcow *q, uint64_t first, uint64_t last);
/* A request is about to write guest clusters [FIRST, LAST] in place (or
 * change their mapping): a move of one of them in progress is called off.
 * With q->lock held. */
static inline void
note_write (struct qcow *q, uint64_t first, uint64_t last)
{
  if (q->nmoving)
    compact_note_write (q, first, last);
}

/* ---- check.c ---- */
int check_image (struct qcow_backend *b, struct qcow_check_result *res,
                 qcow_check_cb cb, void *opaque);

#endif /* QCOW_INTERNAL_H */

/* SPDX-License-Identifier: BSD-3-Clause */
/* qcow.h - the qcow2 core library: the whole public interface.
 *
 * No nbdkit dependency.  Thread-safe: one struct qcow may be used by any
 * number of threads at once (reads and writes proceed in parallel; only
 * metadata updates take the image's lock).
 *
 * Conventions: functions returning int return 0 (or a non-negative value)
 * on success and -errno on failure.  On failure a one-line message of the
 * form "FILE: what is wrong" has been passed to the error handler.
 *
 * The interface follows the OCaml `qcow` library: create, connect,
 * disconnect, get_info, read, write, resize, discard, seek_mapped,
 * seek_unmapped, rebuild_refcount_table, flush, header, to_config,
 * get_stats.
 */
#ifndef QCOW_H
#define QCOW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define QCOW_LIB_VERSION "0.1.0"

/* What the library exports: it is built with -fvisibility=hidden, so
 * only the functions declared here are visible outside it. */
#if defined __GNUC__ && !defined QCOW_API
#define QCOW_API __attribute__ ((visibility ("default")))
#elif !defined QCOW_API
#define QCOW_API
#endif

struct qcow;

/* Messages.  The handlers are process-wide; the defaults print to stderr
 * (errors) and nothing (debug). */
typedef void (*qcow_msg_fn) (const char *msg);
QCOW_API void qcow_set_error_handler (qcow_msg_fn fn);
QCOW_API void qcow_set_debug_handler (qcow_msg_fn fn);

/* Behaviour as seen from this client; does not affect the format
 * (the OCaml library's Config.t). */
struct qcow_config {
  bool read_only;          /* open O_RDONLY; the file is never modified */
  bool discard;            /* honour discard (trim); default true */
  uint64_t cache_size;     /* metadata cache in bytes; 0 = default */
  uint64_t compact_after_unmaps; /* compact in the background once this many
                              bytes were freed; 0 = never */
  uint64_t keep_erased;    /* bytes of free space compaction leaves at the end */
  bool no_backing;         /* refuse images that name a backing file */
  const char *backing_file;    /* override the header's backing file */
  const char *backing_format;  /* override its format: "qcow2" or "raw" */
  const char *data_file;       /* override the external data file name */
  const char *base_dir;        /* where relative backing and data file names
                                  resolve: NULL for the image's directory */
  bool runtime_asserts;    /* check the whole image after every flush */
  bool locking;            /* lock the files as QEMU does; default true */
  uint64_t compact_rate;   /* background compaction moves at most this many
                              bytes a second; 0 = no limit (default 64 MiB);
                              qcow_compact called directly is never paced */
  const char *snapshot;    /* serve this internal snapshot (its ID, else
                              its name), read-only; NULL: the active layer */
};
#define QCOW_DEFAULT_COMPACT_RATE (64ULL << 20)
QCOW_API void qcow_config_default (struct qcow_config *cfg);

/* Block backends: the storage an image lives in (the OCaml library's
 * BLOCK; the library is its functor Make (B : BLOCK)).  A local file is
 * one backend (qcow_backend_open_file); a caller may provide any other
 * with these callbacks, e.g. the nbdkit filter passes the plugin below it.
 * Each returns 0 or -errno and prints nothing: the core adds the message
 * (naming the backend), fault injection and statistics on top.  They may
 * be called from several threads at once.
 *
 * Storage without truncate has a fixed size: the image lives inside it
 * (as QEMU keeps qcow2 on a block device), free clusters are found by the
 * refcounts anywhere below the size, and a write that needs a cluster
 * when none is left fails with -ENOSPC. */
struct qcow_backend_ops {
  /* Required.  A read past the end of the storage gives zeros. */
  int (*pread) (void *opaque, void *buf, size_t count, uint64_t offset);
  int (*get_size) (void *opaque, uint64_t *size);
  /* Required to write (NULL: the storage is read-only). */
  int (*pwrite) (void *opaque, const void *buf, size_t count, uint64_t offset);
  int (*flush) (void *opaque);
  /* Optional (NULL: not available). */
  int (*pwritev) (void *opaque, const struct iovec *iov, int iovcnt,
                  uint64_t offset);        /* at most 8 pieces */
  int (*discard) (void *opaque, uint64_t offset, uint64_t count);
                           /* give the space back; the range may then read
                              as anything */
  int (*truncate) (void *opaque, uint64_t size);   /* grow or shrink */
  int (*zero_tail) (void *opaque, uint64_t *offset);
                           /* *OFFSET: the storage reads as zeros from
                              there to its end (fixed-size storage: new
                              clusters there need no zeros written) */
  void (*close) (void *opaque);        /* when the backend is freed */
};
struct qcow_backend;

/* A backend over OPS and OPAQUE; NAME (copied) names it in messages and
 * is where relative backing file names are resolved from (its directory;
 * the current directory if it has none). */
QCOW_API int qcow_backend_new (const struct qcow_backend_ops *ops, void *opaque,
                               const char *name, struct qcow_backend **bp);
/* The local file (or block device) PATH, opened read-write or, with
 * READ_ONLY or when the file cannot be written, read-only.  Its image
 * locks (qcow_config.locking) are taken by qcow_connect_backend. */
QCOW_API int qcow_backend_open_file (const char *path, bool read_only,
                                     struct qcow_backend **bp);
/* Close it (calls ops->close).  Not for one handed to an image. */
QCOW_API void qcow_backend_free (struct qcow_backend *b);

/* On-disk choices for a new image. */
struct qcow_create_opts {
  uint64_t size;           /* virtual size in bytes */
  unsigned cluster_bits;   /* 9..21; default 16 (64 KiB) */
  unsigned refcount_order; /* 0..6; default 4 (16 bit refcounts) */
  unsigned version;        /* 2 or 3; default 3 */
  bool lazy_refcounts;     /* default true (v3 only) */
  unsigned compression_type;   /* 0 zlib (default), 1 zstd (v3 only) */
};
QCOW_API void qcow_create_opts_default (struct qcow_create_opts *opts);

/* Create a new image at PATH.  Fails with -EEXIST if PATH exists unless
 * OVERWRITE. */
QCOW_API int qcow_create (const char *path, const struct qcow_create_opts *opts,
                 bool overwrite);

/* Create a new image on backend B (which stays the caller's): its first
 * bytes become the image; the rest of fixed-size storage is free space. */
QCOW_API int qcow_create_backend (struct qcow_backend *b,
                                  const struct qcow_create_opts *opts);

/* Open and validate an image.  Nothing is written to the file until the
 * first write-type request (so a read-only user never modifies it). */
QCOW_API int qcow_connect (const char *path, const struct qcow_config *cfg,
                  struct qcow **qp);
/* The same on backend B, which the image owns from then on (it is freed
 * with the image, or at once if this fails). */
QCOW_API int qcow_connect_backend (struct qcow_backend *b,
                                   const struct qcow_config *cfg,
                                   struct qcow **qp);

/* Flush, mark the image clean and close it.  Frees Q even on error. */
QCOW_API int qcow_disconnect (struct qcow *q);

struct qcow_info {
  uint64_t size;           /* virtual size in bytes */
  uint32_t cluster_size;
  bool read_write;         /* false if opened read-only or image is corrupt */
};
QCOW_API void qcow_get_info (struct qcow *q, struct qcow_info *info);

/* A snapshot of the header as it is now. */
#define QCOW_INCOMPAT_DIRTY       (1ULL << 0)
#define QCOW_INCOMPAT_CORRUPT     (1ULL << 1)
#define QCOW_INCOMPAT_DATA_FILE   (1ULL << 2)
#define QCOW_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW_INCOMPAT_EXTL2       (1ULL << 4)
#define QCOW_COMPAT_LAZY_REFCOUNTS (1ULL << 0)
#define QCOW_AUTOCLEAR_BITMAPS    (1ULL << 0)
#define QCOW_AUTOCLEAR_DATA_RAW   (1ULL << 1)
struct qcow_header {
  uint32_t version;
  uint64_t size;
  uint32_t cluster_bits;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_table_offset;
  uint64_t refcount_table_offset;
  uint32_t refcount_table_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompatible_features;
  uint64_t compatible_features;
  uint64_t autoclear_features;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;
  char backing_file[1024];     /* "" if none */
  char backing_format[64];     /* "" if not recorded */
  char data_file[1024];        /* external data file name, "" if none */
};
QCOW_API void qcow_get_header (struct qcow *q, struct qcow_header *h);
/* Name of a feature bit (TYPE 0 incompatible, 1 compatible, 2 autoclear),
 * or NULL if unknown. */
QCOW_API const char *qcow_feature_name (int type, int bit);
QCOW_API void qcow_to_config (struct qcow *q, struct qcow_config *cfg);
QCOW_API const char *qcow_filename (struct qcow *q);
/* The backing file: returns 1 and sets its resolved *PATH, *FORMAT
 * ("qcow2" or "raw") and *NEXT (the opened qcow2 backing image, NULL for
 * raw), or returns 0 if there is none. */
QCOW_API int qcow_backing_info (struct qcow *q, const char **path, const char **format,
                       struct qcow **next);

/* Internal snapshots, as QEMU makes them (qemu-img snapshot): listed,
 * created, applied and deleted.  The active layer is what is read and
 * written (cfg.snapshot opens a snapshot read-only instead). */
struct qcow_snapshot_info {
  const char *id, *name;       /* valid until the list changes */
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec, vm_state_size, disk_size;
  uint32_t l1_size;
  uint64_t icount;             /* UINT64_MAX if not recorded */
};
QCOW_API int qcow_snapshot_count (struct qcow *q);
QCOW_API int qcow_get_snapshot (struct qcow *q, int i, struct qcow_snapshot_info *info);
/* The index of the snapshot whose ID is ID_OR_NAME, else of the first one
 * named so (QEMU's lookup), or -ENOENT (no message). */
QCOW_API int qcow_snapshot_find (struct qcow *q, const char *id_or_name);
/* Create a snapshot of the active layer named NAME (1 to 255 bytes, not
 * the name or ID of another snapshot), with the next free numeric ID;
 * apply (revert the active layer, and the virtual size, to) a snapshot;
 * delete one.  Each is one atomic switch: the new L1 table, L2 tables
 * and refcount structure are written to free space and made durable,
 * then one header write moves to them, so after a crash at any moment
 * the image is either as it was or as it is after the operation, and
 * consistent (qemu-img check finds no errors).  Space the old state used
 * is freed (punched) afterwards.  Return 0, or -errno with a message
 * (-ENOENT: no such snapshot; -EEXIST: name taken; -ENAMETOOLONG;
 * -ERANGE: the refcount width cannot count the references; -EAGAIN: the
 * image is in use).  Wait for requests in flight. */
QCOW_API int qcow_snapshot_create (struct qcow *q, const char *name);
QCOW_API int qcow_snapshot_apply (struct qcow *q, const char *id_or_name);
QCOW_API int qcow_snapshot_delete (struct qcow *q, const char *id_or_name);

/* Byte-granular I/O: any offset and count inside the virtual size. */
#define QCOW_FUA 1u            /* write: durable before returning */
QCOW_API int qcow_read (struct qcow *q, void *buf, size_t count, uint64_t offset);
QCOW_API int qcow_write (struct qcow *q, const void *buf, size_t count,
                uint64_t offset, unsigned flags);

/* Space.  Discard (trim) unlinks the clusters wholly inside the range and
 * gives their space back once the unlink is durable; partial clusters are
 * left alone (the OCaml library's `discard`).  Zero makes the range read
 * as zeros: metadata only for whole clusters (the zero flag, or unlinking
 * them with QCOW_MAY_TRIM), writes only for partial edges.  Neither
 * syncs unless QCOW_FUA. */
#define QCOW_MAY_TRIM  2u      /* zero: the clusters may be deallocated */
#define QCOW_FAST_ZERO 4u      /* zero: fail with -ENOTSUP rather than write */
QCOW_API int qcow_discard (struct qcow *q, uint64_t count, uint64_t offset,
                  unsigned flags);
QCOW_API int qcow_zero (struct qcow *q, uint64_t count, uint64_t offset,
               unsigned flags);

/* Compaction (the OCaml library's compact): move clusters from the end
 * of the file into holes nearer the start and truncate the file.  Safe
 * while clients do I/O; sizes in 512-byte sectors, as the OCaml API. */
struct qcow_compact_result {
  uint64_t copied;         /* sectors copied */
  uint64_t refs_updated;   /* cluster references updated */
  uint64_t old_size;       /* file size before, in sectors */
  uint64_t new_size;       /* file size after, in sectors */
};
typedef void (*qcow_progress_fn) (int percent, void *opaque);
QCOW_API int qcow_compact (struct qcow *q, qcow_progress_fn progress, void *opaque,
                  struct qcow_compact_result *res);
/* Commit (qemu-img commit): write the runs this image stores itself
 * (qemu-img map's depth 0) into its backing file, qcow2 or raw, grown to
 * the virtual size if smaller, and make that durable; then, unless KEEP,
 * empty this image so that it reads through to the backing file.  The
 * backing file is reopened read-write and locked (-EAGAIN with a message
 * if another process uses it: nothing is changed then) and stays so
 * until Q is closed.  Not while other requests use Q. */
QCOW_API int qcow_commit (struct qcow *q, bool keep, qcow_progress_fn progress,
                          void *opaque);
/* Start the background thread (stopped by qcow_disconnect): it punches
 * the holes of clusters freed by a flush (with cfg.discard; without the
 * thread the flush punches them itself) and compacts once
 * compact_after_unmaps bytes were freed.  Start it after any fork. */
QCOW_API int qcow_start_background (struct qcow *q);

/* QEMU-compatible image locking (with cfg.locking).  qcow_connect takes
 * the locks of a read-only user, which QEMU's readers share; the first
 * change takes the write locks, and so does this call, for a user that
 * knows it will write (the plugin: a client opened read-write).  Returns
 * 0, or -EAGAIN (message sent) if another process (QEMU, nbdkit) has the
 * image open.  No-op for a read-only image or without locking. */
QCOW_API int qcow_lock_write (struct qcow *q);

/* Make every completed write durable, metadata included. */
QCOW_API int qcow_flush (struct qcow *q);

/* Change the virtual size.  Shrinking fails with -EINVAL unless
 * IGNORE_DATA_LOSS, in which case the clusters past the end are freed. */
QCOW_API int qcow_resize (struct qcow *q, uint64_t new_size, bool ignore_data_loss);

/* Recompute every refcount from the L1/L2 references and write a fresh
 * refcount structure (used automatically for images opened dirty). */
QCOW_API int qcow_rebuild_refcount_table (struct qcow *q);

/* Mapping (block status).  Describes the run starting at OFFSET (at most
 * COUNT bytes): *LEN gets its length, *FLAGS a combination of these. */
#define QCOW_EXTENT_HOLE 1u    /* nothing allocated: reads as zeros */
#define QCOW_EXTENT_ZERO 2u    /* reads as zeros */
QCOW_API int qcow_map (struct qcow *q, uint64_t offset, uint64_t count,
              uint64_t *len, unsigned *flags);
/* The same for the whole range: FN is called for each run in order
 * (OFFSET, LEN, FLAGS), with the image's lock held (it must not call
 * back into the library), until the range is covered or FN returns
 * nonzero.  Returns 0, or -errno.  Cheaper than a qcow_map per run: each
 * L2 table is looked at once. */
typedef int (*qcow_extent_fn) (uint64_t offset, uint64_t len, unsigned flags,
                               void *opaque);
QCOW_API int qcow_map_all (struct qcow *q, uint64_t offset, uint64_t count,
                           qcow_extent_fn fn, void *opaque);
/* The mapping of this image alone, not its backing file (what qemu-img
 * map reports for one layer).  Describes the run starting at OFFSET (at
 * most COUNT bytes): *LEN gets its length, *FLAGS a combination of these,
 * and with QCOW_LAYER_OFFSET *HOST the offset in the image file (or its
 * external data file) where the run starts, contiguous over the run.
 * Neither DATA nor ZERO: unallocated here (the backing file shows). */
#define QCOW_LAYER_DATA       1u   /* data stored in this image */
#define QCOW_LAYER_ZERO       2u   /* reads as zeros, said by this image */
#define QCOW_LAYER_OFFSET     4u   /* *HOST is valid */
#define QCOW_LAYER_COMPRESSED 8u   /* compressed cluster (no offset) */
QCOW_API int qcow_map_layer (struct qcow *q, uint64_t offset, uint64_t count,
                             uint64_t *len, unsigned *flags, uint64_t *host);
/* The next offset >= FROM that may hold data / that is a hole; the virtual
 * size if there is none. */
QCOW_API int64_t qcow_seek_mapped (struct qcow *q, uint64_t from);
QCOW_API int64_t qcow_seek_unmapped (struct qcow *q, uint64_t from);

/* Runtime statistics (the OCaml library's Stats.t). */
struct qcow_stats {
  uint64_t reads, writes, flushes;
  uint64_t clusters_allocated;     /* data and table clusters allocated */
  uint64_t l2_cache_hits, l2_cache_misses;
  uint64_t metadata_writes;        /* metadata clusters written back */
  uint64_t discarded;              /* clusters unlinked by discard */
  uint64_t erased;                 /* clusters zeroed by write-zeroes */
  uint64_t freed;                  /* host clusters whose refcount hit 0 */
  uint64_t bytes_punched;          /* given back with FALLOC_FL_PUNCH_HOLE */
  uint64_t compacted;              /* clusters moved by compaction */
  uint64_t compactions;            /* compaction runs */
};
QCOW_API void qcow_get_stats (struct qcow *q, struct qcow_stats *st);

/* How many of the first N host clusters are in use (refcount above
 * zero), counting no further than LIMIT. */
QCOW_API int qcow_used_clusters (struct qcow *q, uint64_t n, uint64_t limit,
                                 uint64_t *count);

/* Bytes of guest data allocated (clusters mapped in L2 tables). */
QCOW_API int qcow_allocated_bytes (struct qcow *q, uint64_t *bytes);

/* Compressed clusters, written as QEMU writes them (qemu-img convert -c):
 * the image's compression type (zlib: raw deflate with a 4 KiB window;
 * zstd), the data packed into host clusters at byte granularity, every
 * host cluster it touches counted once more.
 *
 * qcow_compress compresses one cluster (cluster_size bytes at IN) into
 * OUT (room for cluster_size bytes) and returns the compressed length,
 * or 0 if that is not smaller than a cluster (then store it as it is);
 * it touches nothing in Q, so callers may compress on many threads and
 * write the results in order.  qcow_write_compressed_data stores LEN such
 * bytes (0 < LEN < cluster_size) as guest cluster GC, freeing what GC
 * held.  qcow_write_compressed does both (writing BUF uncompressed when
 * it does not compress); for a last cluster that the virtual size cuts
 * short, what BUF holds past the end is taken as zeros.  Not possible
 * with an external data file (-ENOTSUP). */
QCOW_API int64_t qcow_compress (struct qcow *q, const void *in, void *out);
QCOW_API int qcow_write_compressed_data (struct qcow *q, uint64_t gc,
                                         const void *data, size_t len);
QCOW_API int qcow_write_compressed (struct qcow *q, const void *buf, uint64_t gc);

/* Integrity check and repair of qcow2 images.
 *
 * The OCaml qcow library's `check' and `rebuild_refcount_table', with the
 * findings of `qemu-img check' and the repairs of `qemu-img check -r all'.
 *
 * qcow_check_file opens the file read-only by itself, never modifies it,
 * and copes with images that qcow_connect refuses: it recounts every
 * reference to every host cluster (header, L1/L2 tables, data and
 * compressed clusters, refcount table and blocks, snapshot table and the
 * snapshots' tables, bitmaps) and compares with the stored refcounts.
 */
enum qcow_check_verdict {
  QCOW_CHECK_CLEAN = 0,
  QCOW_CHECK_FAILED = 1,        /* could not check: see reason */
  QCOW_CHECK_CORRUPT = 2,       /* at least one corruption */
  QCOW_CHECK_LEAKS = 3,         /* leaked clusters only */
};

enum qcow_problem {
  QCOW_PROBLEM_OUTSIDE_FILE,    /* a reference past the end of the file
                                   (OCaml: Reference_outside_file) */
  QCOW_PROBLEM_DUPLICATE,       /* two references to a data cluster that
                                   claims a refcount of 1 (COPIED)
                                   (OCaml: Duplicate_reference) */
  QCOW_PROBLEM_OVERLAP,         /* a metadata structure shares a cluster
                                   with another reference or the header */
  QCOW_PROBLEM_MISALIGNED,      /* an offset that must be cluster aligned */
  QCOW_PROBLEM_RESERVED,        /* reserved bits set in a table entry */
  QCOW_PROBLEM_COPIED,          /* COPIED flag disagrees with the refcount */
  QCOW_PROBLEM_REFCOUNT,        /* stored refcount below the references */
  QCOW_PROBLEM_LEAK,            /* stored refcount above the references */
  QCOW_PROBLEM_INVALID,         /* a structure that is malformed */
  QCOW_PROBLEM_NR
};
/* "outside-file", "duplicate", ... (for JSON), or NULL. */
QCOW_API const char *qcow_problem_name (enum qcow_problem kind);

struct qcow_check_problem {
  enum qcow_problem kind;
  bool corruption;              /* false only for a leaked cluster */
  const char *what;             /* what is referred to: "L2 table", ... */
  uint64_t src;                 /* host offset of the referring entry or
                                   field (0: the structure itself) */
  uint64_t dst;                 /* host offset referred to */
  const char *what2;            /* DUPLICATE, OVERLAP: the other reference */
  uint64_t src2;                /* (NULL / 0 otherwise) */
  uint64_t refcount, references;/* REFCOUNT, LEAK, COPIED */
  const char *message;          /* one line, in the style of qemu-img */
};
typedef void (*qcow_check_cb) (const struct qcow_check_problem *p,
                               void *opaque);

struct qcow_check_result {
  enum qcow_check_verdict verdict;
  char reason[256];             /* QCOW_CHECK_FAILED: why */
  uint64_t corruptions;         /* problems other than leaks */
  uint64_t leaks;               /* leaked clusters */
  uint64_t problems[QCOW_PROBLEM_NR];   /* by kind */
  bool marked_corrupt, dirty;   /* header bits */
  bool bitmaps_checked;         /* persistent bitmaps present and counted */
  uint32_t cluster_size;
  uint64_t file_size;
  /* Host clusters of the file (the last one may be partial): used ones
   * are referenced, free ones are not (OCaml's check_result, which counts
   * sectors; here clusters and bytes). */
  uint64_t file_clusters, used_clusters, free_clusters;
  uint64_t used_bytes, free_bytes;
  uint64_t image_end_offset;    /* end of the last cluster in use */
  /* Guest clusters of the active layer (qemu-img check's statistics). */
  uint64_t total_clusters, allocated_clusters, compressed_clusters;
};

/* Check the image at PATH.  CB (may be NULL) is called for every problem
 * as it is found.  Returns 0 when the check ran (RES->verdict says how
 * it went), or -errno when the image could not be checked (RES->verdict
 * is QCOW_CHECK_FAILED and RES->reason says why). */
QCOW_API int qcow_check_backend (struct qcow_backend *b,
                                 struct qcow_check_result *res,
                                 qcow_check_cb cb, void *opaque);
QCOW_API int qcow_check_file (const char *path, struct qcow_check_result *res,
                     qcow_check_cb cb, void *opaque);

struct qcow_repair_result {
  struct qcow_check_result before, after;
  char reason[256];             /* failure: why (the file is unchanged
                                   unless AFTER says otherwise) */
  bool repaired;                /* something was written */
  uint64_t entries_cleared;     /* table entries unlinked (they pointed
                                   outside the file or into metadata) */
  uint64_t entries_realigned;   /* misaligned entries realigned */
  uint64_t reserved_cleared;    /* entries whose reserved bits were cleared */
  uint64_t copied_fixed;        /* entries whose COPIED flag was corrected */
  bool refcounts_rebuilt;
  bool corrupt_bit_cleared;
  bool bitmaps_dropped;         /* persistent bitmaps made inconsistent */
};

/* Repair the image at PATH (qemu-img check -r all): fix the table entries
 * that cannot be trusted, then rebuild the refcount structure.  Returns 0
 * when the image is clean afterwards (RES->after), or -errno with
 * RES->reason; an image that cannot be repaired is left unchanged. */
QCOW_API int qcow_repair_file (const char *path, struct qcow_repair_result *res);

/* The same check on an open image, through its own file descriptor (no
 * new locks): all metadata is written back first, and requests wait
 * while it runs. */
QCOW_API int qcow_check (struct qcow *q, struct qcow_check_result *res,
                qcow_check_cb cb, void *opaque);

/* Debug: fault injection at the I/O layer (the OCaml library's Debug
 * module).  Process-wide.  Arm OP so that its NTH call from now (1-based)
 * fails with ERR; with SHORT a write first writes half its bytes (a torn
 * write); with PERSISTENT every later call fails too (a dead disk).  The
 * environment variable QCOW_DEBUG_FAULT="op:nth:errno[:short][:persistent]"
 * (op = read|write|sync|punch|truncate, errno a number or EIO/ENOSPC/...)
 * arms it when an image is opened. */
enum qcow_fault_op {
  QCOW_FAULT_READ, QCOW_FAULT_WRITE, QCOW_FAULT_SYNC, QCOW_FAULT_PUNCH,
  QCOW_FAULT_TRUNCATE, QCOW_FAULT_NR
};
QCOW_API void qcow_debug_inject (enum qcow_fault_op op, uint64_t nth, int err,
                        bool short_write, bool persistent);
QCOW_API void qcow_debug_reset (void);
/* Calls of OP since the last inject/reset, and faults injected in all.
 * Calls are counted only once inject or reset has been called. */
QCOW_API uint64_t qcow_debug_count (enum qcow_fault_op op);
QCOW_API uint64_t qcow_debug_faults (void);

#endif /* QCOW_H */

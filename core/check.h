/* check.h - integrity check and repair of qcow2 images.
 *
 * The OCaml qcow library's `check' and `rebuild_refcount_table', with the
 * findings of `qemu-img check' and the repairs of `qemu-img check -r all'.
 * (Public API; to be merged into qcow.h.)
 *
 * qcow_check_file opens the file read-only by itself, never modifies it,
 * and copes with images that qcow_connect refuses: it recounts every
 * reference to every host cluster (header, L1/L2 tables, data and
 * compressed clusters, refcount table and blocks, snapshot table and the
 * snapshots' tables, bitmaps) and compares with the stored refcounts.
 */
#ifndef QCOW_CHECK_H
#define QCOW_CHECK_H

#include <stdbool.h>
#include <stdint.h>

#include "qcow.h"

/* The verdict.  The values are qemu-img check's exit statuses. */
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
const char *qcow_problem_name (enum qcow_problem kind);

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
int qcow_check_file (const char *path, struct qcow_check_result *res,
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
int qcow_repair_file (const char *path, struct qcow_repair_result *res);

#endif /* QCOW_CHECK_H */

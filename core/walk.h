/* SPDX-License-Identifier: BSD-3-Clause */
/* walk.h - one walk over an image's references, shared by the check
 * (check.c: walking, counting, reporting) and the repair planner
 * (repair.c: deciding and writing fixes).  Internal to those two. */
#ifndef QCOW_WALK_H
#define QCOW_WALK_H

#include "internal.h"

#define MAX_BITMAP_DIR (64u << 20)
#define MAX_BITMAP_TABLE (1u << 27)        /* entries, QEMU's limit */
#define MAX_CLUSTERS (1ULL << 27)          /* 2 GiB of bookkeeping */
#define MAX_ROUNDS 16
#define RC_UNKNOWN UINT32_MAX              /* stored refcount unreadable */

/* What a reference refers to. */
enum ref {
  R_NONE, R_HEADER, R_L1, R_L2, R_DATA, R_COMPRESSED, R_RCT, R_REFBLOCK,
  R_SNAPTABLE, R_SNAP_L1, R_BITMAP_DIR, R_BITMAP_TABLE, R_BITMAP_DATA, R_NR
};
extern const char *const ref_name[R_NR];

/* Structures that can never share their clusters. */
static inline bool
is_fixed (enum ref k)
{
  return k != R_L2 && k != R_DATA && k != R_COMPRESSED;
}

/* Replaced or dropped by the repair, so never worth fixing anything for
 * (the refcount table itself is not: it is anchored in the header, and
 * the core refuses tables that overlap it). */
static inline bool
is_loser (enum ref k)
{
  return k == R_REFBLOCK || k == R_BITMAP_DIR || k == R_BITMAP_TABLE ||
    k == R_BITMAP_DATA;
}

static inline bool
is_datalike (enum ref k)
{
  return k == R_DATA || k == R_COMPRESSED;
}

/* The first reference to a cluster: where from, to what, whether it
 * claims the cluster for itself, whether from a snapshot's tables. */
static inline uint64_t
own (uint64_t src, enum ref k, bool excl, bool snap)
{
  return src << 6 | (uint64_t) snap << 5 | (uint64_t) excl << 4 | k;
}
#define OWN_KIND(o) ((enum ref) ((o) & 15))
#define OWN_EXCL(o) ((bool) (((o) >> 4) & 1))
#define OWN_SNAP(o) ((bool) (((o) >> 5) & 1))
#define OWN_SRC(o)  ((o) >> 6)

/* One planned change of an 8-byte table entry. */
enum fix_tag { FIX_COPIED, FIX_RESERVED, FIX_REALIGN, FIX_CLEAR, FIX_AUX };
struct fix {
  uint64_t off, val;
  enum fix_tag tag;             /* within a round the strongest tag wins */
  size_t seq;
};
#define MAX_FIXES (1u << 22)
struct fixes {
  struct fix *v;
  size_t n, cap;
};

/* A misaligned entry: realigned or cleared once all counts are known. */
struct doubt {
  uint64_t src, ent;
  enum ref k;                   /* R_L2 (an L1 entry) or R_DATA */
};

struct walk {
  struct qcow_backend *b;   /* the image (read through its callbacks) */
  uint64_t file_size;
  struct qcow_header h;
  unsigned cluster_bits, esh, rb_bits;
  uint64_t cs, l2_entries, rct_entries, refcount_max;
  bool extl2, data_file;
  uint64_t bm_ext;              /* file offset of the bitmaps extension data */
  struct fmt_bitmaps_ext bm;

  uint64_t nclusters;
  uint32_t *count;              /* references found */
  uint32_t *stored;             /* refcount on disk, RC_UNKNOWN */
  uint64_t *owner;              /* first reference, own() */
  uint8_t *buf;                 /* one cluster */
  int err;                      /* an I/O error: could not check */

  struct qcow_check_result *res;
  qcow_check_cb cb;
  void *opaque;
  bool snap;                    /* walking a snapshot's tables */

  /* Repair planning. */
  bool plan;
  const struct fixes *overlay;  /* fixes of earlier rounds */
  struct fixes fx;              /* this round's */
  struct doubt *doubts;
  size_t ndoubts, doubtcap;
  bool l1_fixed;                /* an active L1 entry changes this round */
  uint64_t last_cleared;        /* the last entry unlinked */
  uint8_t *active_l2;           /* bit per cluster: an active L2 table */
  bool refuse;
  char why[256];
};

static inline bool
in_active_l1 (const struct qcow_header *h, uint64_t off)
{
  return off >= h->l1_table_offset &&
    off < h->l1_table_offset + (uint64_t) h->l1_size * 8;
}

static inline bool
in_rct (const struct qcow_header *h, uint64_t off)
{
  return off >= h->refcount_table_offset &&
    off < h->refcount_table_offset +
    ((uint64_t) h->refcount_table_clusters << h->cluster_bits);
}

/* ---- check.c ---- */
void fail (struct qcow_check_result *res, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
void report (struct walk *w, struct qcow_check_problem *p, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));
/* A simple problem about one entry at SRC referring to DST. */
#define PROBLEM(w, kind_, what_, src_, dst_, ...) do {                  \
    struct qcow_check_problem p_ = {                                    \
      .kind = (kind_), .corruption = true, .what = (what_),             \
      .src = (src_), .dst = (dst_) };                                   \
    report ((w), &p_, __VA_ARGS__);                                     \
  } while (0)
int rd (struct walk *w, void *buf, uint64_t len, uint64_t off);
int ref_range (struct walk *w, uint64_t off, uint64_t len, enum ref k,
               uint64_t src, bool excl);
void walk_l1 (struct walk *w, uint64_t l1off, uint32_t l1_size, bool active);
int walk_image (struct walk *w);
void copied_pass (struct walk *w);
void walk_free (struct walk *w);

/* ---- check-meta.c ---- */
int parse_header (struct walk *w);
void walk_snapshots (struct walk *w);
void walk_bitmaps (struct walk *w);

/* ---- repair.c: planning, called by the walk when w->plan ---- */
void refuse (struct walk *w, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
size_t fixes_find (const struct fixes *f, uint64_t off);
void add_fix (struct walk *w, uint64_t off, uint64_t val, enum fix_tag tag);
void clear_entry (struct walk *w, uint64_t src, enum ref k, bool snap);
void resolve (struct walk *w, uint64_t o1, uint64_t o2, uint64_t cluster);
void add_doubt (struct walk *w, uint64_t src, uint64_t ent, enum ref k);

#endif /* QCOW_WALK_H */

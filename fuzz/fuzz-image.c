/* SPDX-License-Identifier: BSD-3-Clause */
/* fuzz-image.c - fuzz the core with hostile images and the requests made
 * on them.
 *
 * The input is the image file, byte for byte (so fuzz/corpus/ holds plain
 * qcow2 files), and also the script: its last 64 bytes (or all of it, if
 * shorter; missing bytes read as 0) choose how the image is opened and
 * what is done with it:
 *
 *   byte 0   bit 0 read-only; bits 1-2 backing file: refused, a raw file,
 *            a qcow2 file, or the image itself (a loop); bit 3 rebuild the
 *            refcounts first; bit 4 compact at the end; bit 5 arm a fault;
 *            bit 6 small metadata cache; bit 7 discard=false
 *   byte 1   the fault: op (low 3 bits, mod 5), bit 3 short (torn) write,
 *            bit 4 persistent, bit 5 ENOSPC instead of EIO
 *   byte 2   the fault: the nth call fails (1..256)
 *   byte 3   bit 0: check the open image (qcow_check) before closing it
 *   then up to 8 requests of 7 bytes: opcode, offset (4 bytes: a fraction
 *   of the virtual size), length (2 bytes: 1..65536).  The opcode's low 4
 *   bits pick the request (read, write, trim, zero, map, seek, flush,
 *   queries, resize, compact, rebuild), bits 4-5 where it lands (anywhere,
 *   cluster aligned, at the end, past the end), bits 6-7 its flags.
 *   Opcodes 11 (snapshot create, or with flags apply or delete) and 12
 *   (a compressed write) exercise the snapshot transaction and the
 *   compressed cluster packing.
 *
 * Whatever the image, the core must not crash, leak, hang or trip a
 * sanitizer.  An image that qcow_check_file finds clean must still be
 * clean (leaks allowed) after a read-write session without faults: seen
 * by qcow_check on the open image, and by qcow_check_file once it was
 * closed without error.  With QCOW_FUZZ_STRICT=1 it must also read back what a
 * successful write just wrote (unless a fault was injected); off by
 * default, since a damaged image may legitimately alias clusters.
 */
#include "common.h"

#define TAIL 64
#define MAX_IO 65536u

static char img[512], data_file[512], raw_backing[512], qcow_backing[512];
static uint8_t wbuf[MAX_IO], rbuf[MAX_IO];
static int strict;

/* Backing files the image may be given instead of the one it names. */
static void
setup (void)
{
  static int done;
  if (done)
    return;
  done = 1;
  fuzz_init_messages ();
  strict = getenv ("QCOW_FUZZ_STRICT") != NULL;
  fuzz_path (img, sizeof img, "image.qcow2");
  fuzz_path (data_file, sizeof data_file, "data.raw");
  fuzz_path (raw_backing, sizeof raw_backing, "backing.raw");
  fuzz_path (qcow_backing, sizeof qcow_backing, "backing.qcow2");

  static uint8_t pat[128 * 1024];
  for (size_t i = 0; i < sizeof pat; i++)
    pat[i] = (uint8_t) (i * 7 + 1);
  fuzz_write_file (raw_backing, pat, sizeof pat);

  struct qcow_create_opts o;
  qcow_create_opts_default (&o);
  o.size = 1 << 20;
  o.cluster_bits = 9;
  struct qcow *q;
  if (qcow_create (qcow_backing, &o, true) < 0 ||
      qcow_connect (qcow_backing, NULL, &q) < 0)
    abort ();
  for (uint64_t off = 0; off < o.size; off += 96 * 1024)
    if (qcow_write (q, pat, 4096, off, 0) < 0)
      abort ();
  if (qcow_disconnect (q) < 0)
    abort ();
}

struct script {
  const uint8_t *p;
  size_t n;
};

static uint64_t
take (struct script *s, int bytes)
{
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) {
    v = v << 8 | (s->n ? *s->p : 0);
    if (s->n) {
      s->p++;
      s->n--;
    }
  }
  return v;
}

static void progress (int percent, void *opaque) { (void) percent; (void) opaque; }

/* Where a request lands: [*off, *off + *len) from the script. */
static void
place (struct qcow *q, unsigned mode, uint32_t frac, uint32_t len16,
       uint64_t *off, size_t *len)
{
  struct qcow_info info;
  qcow_get_info (q, &info);
  uint64_t size = info.size;
  uint64_t o = (uint64_t) (((unsigned __int128) size * frac) >> 32);
  size_t l = len16 + 1;
  switch (mode) {
  case 1:                       /* cluster aligned */
    o &= ~(uint64_t) (info.cluster_size - 1);
    break;
  case 2:                       /* the last bytes */
    o = size > l ? size - l : 0;
    break;
  case 3:                       /* crossing or past the end: must fail */
    o = size - (frac & 0xfff) + (frac >> 31 ? 0x10000 : 0);
    break;
  }
  if (mode != 3 && o + l > size)
    l = size - o;
  *off = o;
  *len = l;
}

static void
fill (uint8_t *buf, size_t len, uint64_t off, uint8_t seed)
{
  for (size_t i = 0; i < len; i++)
    buf[i] = (uint8_t) (seed + (off + i) * 31);
}

static void
request (struct qcow *q, struct script *s, bool faulty)
{
  unsigned op = take (s, 1);
  uint32_t frac = take (s, 4);
  uint32_t len16 = take (s, 2);
  uint64_t off;
  size_t len;
  place (q, op >> 4 & 3, frac, len16, &off, &len);
  unsigned flags = op >> 6;
  uint64_t mlen;
  unsigned mflags;

  switch (op & 15) {
  case 1:                       /* write */
    fill (wbuf, len, off, (uint8_t) frac);
    if (qcow_write (q, wbuf, len, off, flags & 1 ? QCOW_FUA : 0) == 0 &&
        strict && !faulty) {
      if (qcow_read (q, rbuf, len, off) < 0 || memcmp (wbuf, rbuf, len) != 0) {
        fprintf (stderr, "fuzz-image: read-back mismatch at %" PRIu64 "+%zu\n",
                 off, len);
        abort ();
      }
    }
    break;
  case 2:
    qcow_discard (q, len, off, flags & 1 ? QCOW_FUA : 0);
    break;
  case 3:
    qcow_zero (q, len, off, (flags & 1 ? QCOW_FUA : 0) |
               (flags & 2 ? QCOW_MAY_TRIM : 0) |
               (frac & 1 ? QCOW_FAST_ZERO : 0));
    break;
  case 4:                       /* block status over the range */
    for (int i = 0; i < 64 && len > 0; i++) {
      if (qcow_map (q, off, len, &mlen, &mflags) < 0 || mlen == 0 || mlen > len)
        break;
      off += mlen;
      len -= mlen;
    }
    break;
  case 5:
    qcow_seek_mapped (q, off);
    qcow_seek_unmapped (q, off);
    break;
  case 6:
    qcow_flush (q);
    break;
  case 7: {                     /* every query */
    uint64_t bytes;
    struct qcow_stats st;
    struct qcow_header h;
    struct qcow_config cfg;
    struct qcow_snapshot_info si;
    const char *path, *fmt;
    struct qcow *next;
    qcow_allocated_bytes (q, &bytes);
    qcow_get_stats (q, &st);
    qcow_get_header (q, &h);
    qcow_to_config (q, &cfg);
    int n = qcow_snapshot_count (q);
    for (int i = 0; i < n && i < 64; i++)
      qcow_get_snapshot (q, i, &si);
    qcow_get_snapshot (q, n, &si);
    qcow_backing_info (q, &path, &fmt, &next);
    for (int t = 0; t < 3; t++)
      for (int b = 0; b < 64; b++)
        qcow_feature_name (t, b);
    break;
  }
  case 8: {                     /* resize: 0 to 2x, at most 64 MiB more */
    struct qcow_info info;
    qcow_get_info (q, &info);
    uint64_t n = (uint64_t) (((unsigned __int128) info.size * (frac >> 16)) >> 15);
    if (n > info.size + (64 << 20))
      n = info.size + (64 << 20);
    qcow_resize (q, n & ~511ULL, flags & 1);
    break;
  }
  case 9: {
    struct qcow_compact_result res;
    qcow_compact (q, progress, NULL, &res);
    break;
  }
  case 10:
    qcow_rebuild_refcount_table (q);
    break;
  case 11: {                    /* snapshots: create, apply, delete */
    char name[16];
    snprintf (name, sizeof name, "f%u", (unsigned) (frac % 1000));
    int n = qcow_snapshot_count (q);
    struct qcow_snapshot_info si;
    if (flags == 0 || n <= 0)
      qcow_snapshot_create (q, name);
    else if (qcow_get_snapshot (q, frac % n, &si) == 0) {
      snprintf (name, sizeof name, "%.15s", si.id);
      if (flags == 1)
        qcow_snapshot_apply (q, name);
      else
        qcow_snapshot_delete (q, name);
    }
    break;
  }
  case 12: {                    /* a compressed write of a whole cluster */
    struct qcow_info info;
    qcow_get_info (q, &info);
    if (info.cluster_size <= MAX_IO) {
      fill (wbuf, info.cluster_size, off, (uint8_t) (frac & 3));   /* compressible */
      qcow_write_compressed (q, wbuf, off / info.cluster_size);
    }
    break;
  }
  default:                      /* read */
    qcow_read (q, rbuf, len, off);
    break;
  }
}

static void
corrupted (const char *when, const struct qcow_check_result *cr)
{
  fprintf (stderr, "fuzz-image: a clean image is corrupt %s (%" PRIu64
           " corruptions%s%s)\n", when, cr->corruptions,
           cr->reason[0] ? ": " : "", cr->reason);
  abort ();
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  if (size > FUZZ_MAX_INPUT)
    return 0;
  setup ();
  fuzz_write_file (img, data, size);
  fuzz_write_file (data_file, NULL, 0);

  struct script s = { size > TAIL ? data + size - TAIL : data,
                      size > TAIL ? TAIL : size };
  unsigned ctl = take (&s, 1);
  unsigned fop = take (&s, 1);
  unsigned fnth = take (&s, 1) + 1;
  unsigned ctl2 = take (&s, 1);

  struct qcow_config cfg;
  qcow_config_default (&cfg);
  cfg.read_only = ctl & 1;
  cfg.data_file = data_file;            /* never the header's name */
  switch (ctl >> 1 & 3) {
  case 0: cfg.no_backing = true; break;
  case 1: cfg.backing_file = raw_backing; cfg.backing_format = "raw"; break;
  case 2: cfg.backing_file = qcow_backing; cfg.backing_format = "qcow2"; break;
  case 3: cfg.backing_file = img; cfg.backing_format = "qcow2"; break;
  }
  if (ctl & 0x40)
    cfg.cache_size = 4096;
  cfg.discard = !(ctl & 0x80);

  bool faulty = ctl & 0x20;
  if (faulty)
    qcow_debug_inject ((enum qcow_fault_op) ((fop & 7) % QCOW_FAULT_NR), fnth,
                       fop & 0x20 ? ENOSPC : EIO, fop & 8, fop & 0x10);

  struct qcow_check_result cr;
  bool was_clean = !cfg.read_only && !faulty &&
                   qcow_check_file (img, &cr, NULL, NULL) == 0 &&
                   cr.verdict == QCOW_CHECK_CLEAN;

  struct qcow *q;
  if (qcow_connect (img, &cfg, &q) == 0) {
    if (ctl & 8)
      qcow_rebuild_refcount_table (q);
    for (int i = 0; i < 8 && s.n > 0; i++)
      request (q, &s, faulty);
    if (ctl & 0x10) {
      struct qcow_compact_result res;
      qcow_compact (q, progress, NULL, &res);
    }
    if (ctl2 & 1 && qcow_check (q, &cr, NULL, NULL) == 0 && was_clean &&
        cr.verdict == QCOW_CHECK_CORRUPT)
      corrupted ("in a session", &cr);
    int closed = qcow_disconnect (q);
    if (was_clean && closed == 0 &&
        (qcow_check_file (img, &cr, NULL, NULL) < 0 ||
         cr.verdict == QCOW_CHECK_CORRUPT))
      corrupted ("after a session", &cr);

    /* Reopen what was written, read-only, and read from it. */
    if (!cfg.read_only && !faulty) {
      cfg.read_only = true;
      if (qcow_connect (img, &cfg, &q) == 0) {
        struct qcow_info info;
        qcow_get_info (q, &info);
        qcow_read (q, rbuf, info.size < MAX_IO ? info.size : MAX_IO, 0);
        qcow_disconnect (q);
      }
    }
  }
  qcow_debug_reset ();
  return 0;
}

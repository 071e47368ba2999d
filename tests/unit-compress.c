/* SPDX-License-Identifier: BSD-3-Clause */
/* unit-compress.c - compressed writes (qcow_write_compressed and the
 * byte-granular packing behind it), judged by QEMU.
 *
 * For each image format (cluster sizes 512 B to 2 MiB, refcount widths 1
 * to 64 bits, version 2, zstd, extended L2 entries, a backing file), four
 * threads write at once, each into its own guest clusters (so the final
 * contents are known): compressed writes of compressible and of random
 * (incompressible) clusters, over unallocated, data and compressed
 * clusters, mixed with ordinary writes and trims.  Then:
 *   - every cluster reads back as the model says, before and after reopening;
 *   - qemu-img check finds the image clean (no leaks: overwritten compressed
 *     clusters gave their references back) and qemu-img compare finds it
 *     equal to the model written as a raw file;
 *   - qemu-img map shows compressed clusters (no offset) where they were
 *     written last, so they really are compressed in QEMU's format.
 *
 * UNIT_SEED=N repeats a run.  Exit status 0 if everything passed.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "qcow.h"

#define NTHREADS 4

static char tmpdir[] = "/tmp/unit-compress.XXXXXX";
static uint64_t seed;
static int failures;

#define CHECK(cond, ...) do { if (!(cond)) { failures++; \
      printf ("  FAIL line %d: ", __LINE__); printf (__VA_ARGS__); \
      printf ("\n"); fflush (stdout); } } while (0)

static uint64_t
rnd (uint64_t *s)
{
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static void on_error (const char *msg) { printf ("  library error: %s\n", msg); }

/* Run a shell command (qemu-img) without the sanitizer preload; its
 * output goes to OUT (NULL: discarded).  Returns its exit status. */
static int
shell (char *out, size_t outlen, const char *fmt, ...)
{
  char cmd[2048];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (cmd, sizeof cmd, fmt, ap);
  va_end (ap);
  char full[2200];
  snprintf (full, sizeof full, "env -u LD_PRELOAD sh -c '%s' 2>&1", cmd);
  FILE *p = popen (full, "r");
  if (!p)
    return -1;
  size_t n = 0;
  char buf[4096];
  size_t r;
  while ((r = fread (buf, 1, sizeof buf, p)) > 0)
    if (out && n + r < outlen) {
      memcpy (out + n, buf, r);
      n += r;
    }
  if (out)
    out[n] = '\0';
  int st = pclose (p);
  return WIFEXITED (st) ? WEXITSTATUS (st) : 128;
}

struct format {
  const char *name;
  const char *qemu_opts;        /* for qemu-img create -o */
  unsigned cluster_bits;
  bool backing;
};

struct job {
  struct qcow *q;
  uint8_t *model;               /* the whole disk */
  uint8_t *last_compressed;     /* per cluster: last write was compressed */
  uint64_t size, cs, nclusters;
  unsigned id;
  uint64_t rng;
  int ops;
};

/* A cluster's worth of data: compressible (a few repeated words) or
 * random. */
static void
fill (uint64_t *rng, uint8_t *p, uint64_t len, bool compressible)
{
  uint64_t w = rnd (rng);
  for (uint64_t i = 0; i < len; i += 8) {
    uint64_t v = compressible ? (i % 64 < 8 ? rnd (rng) & 0xff : w) : rnd (rng);
    memcpy (p + i, &v, len - i < 8 ? len - i : 8);
  }
}

static void *
writer (void *arg)
{
  struct job *j = arg;
  uint8_t *buf = malloc (j->cs), *rd = malloc (j->cs);
  for (int op = 0; op < j->ops; op++) {
    /* This thread's clusters: those with index % NTHREADS == id. */
    uint64_t gc = rnd (&j->rng) % (j->nclusters / NTHREADS) * NTHREADS + j->id;
    if (gc >= j->nclusters)
      continue;
    uint64_t off = gc * j->cs, len = j->size - off < j->cs ? j->size - off : j->cs;
    unsigned what = rnd (&j->rng) % 10;
    if (what < 6) {             /* compressed write */
      fill (&j->rng, buf, j->cs, what < 5);
      int r = qcow_write_compressed (j->q, buf, gc);
      CHECK (r == 0, "thread %u: compressed write of cluster %" PRIu64 ": %d", j->id, gc, r);
      memcpy (j->model + off, buf, len);
      j->last_compressed[gc] = what < 5;
    }
    else if (what < 8) {        /* ordinary write of part of a cluster */
      uint64_t a = rnd (&j->rng) % len, b = a + 1 + rnd (&j->rng) % (len - a);
      fill (&j->rng, buf, b - a, false);
      int r = qcow_write (j->q, buf, b - a, off + a, 0);
      CHECK (r == 0, "thread %u: write: %d", j->id, r);
      memcpy (j->model + off + a, buf, b - a);
      j->last_compressed[gc] = 0;
    }
    else if (what < 9) {        /* trim: reads as zeros (or the backing) */
      int r = qcow_zero (j->q, len, off, QCOW_MAY_TRIM);
      CHECK (r == 0, "thread %u: zero: %d", j->id, r);
      memset (j->model + off, 0, len);
      j->last_compressed[gc] = 0;
    }
    else {                      /* read back */
      int r = qcow_read (j->q, rd, len, off);
      CHECK (r == 0 && memcmp (rd, j->model + off, len) == 0,
             "thread %u: cluster %" PRIu64 " reads wrong (%d)", j->id, gc, r);
    }
    if (op % 97 == 0)
      qcow_flush (j->q);
  }
  free (buf);
  free (rd);
  return NULL;
}

static void
test_format (const struct format *f)
{
  char img[512], base[512], raw[512], out[65536];
  snprintf (img, sizeof img, "%s/%s.qcow2", tmpdir, f->name);
  snprintf (base, sizeof base, "%s/%s-base.raw", tmpdir, f->name);
  snprintf (raw, sizeof raw, "%s/%s.raw", tmpdir, f->name);
  const uint64_t cs = 1ULL << f->cluster_bits;
  uint64_t size = 512 * cs + cs / 2 + 512;   /* a last cluster cut short */
  if (size > 24ULL << 20)
    size = (16ULL << 20) + cs / 2;
  uint8_t *model = calloc (1, size);
  uint64_t rng = seed ^ (uint64_t) f->cluster_bits * 7919;
  for (const char *p = f->name; *p; p++)
    rng = rng * 131 + (unsigned char) *p;
  printf ("%s\n", f->name);
  fflush (stdout);

  if (f->backing) {             /* the backing file: random data */
    FILE *fp = fopen (base, "w");
    for (uint64_t i = 0; i < size; i += 8) {
      uint64_t v = rnd (&rng);
      fwrite (&v, 1, size - i < 8 ? size - i : 8, fp);
    }
    fclose (fp);
    fp = fopen (base, "r");
    CHECK (fread (model, 1, size, fp) == size, "reading back %s", base);
    fclose (fp);
  }
  int st = shell (out, sizeof out, "qemu-img create -q -f qcow2 -o %s%s%s %s %" PRIu64,
                  f->qemu_opts, f->backing ? ",backing_fmt=raw,backing_file=" : "",
                  f->backing ? base : "", img, size);
  CHECK (st == 0, "qemu-img create: %s", out);

  struct qcow_config cfg;
  qcow_config_default (&cfg);
  struct qcow *q;
  CHECK (qcow_connect (img, &cfg, &q) == 0, "connect %s", img);
  struct qcow_info info;
  qcow_get_info (q, &info);
  uint64_t nclusters = (size + cs - 1) / cs;
  uint8_t *lastc = calloc (nclusters, 1);
  struct job jobs[NTHREADS];
  pthread_t th[NTHREADS];
  for (unsigned i = 0; i < NTHREADS; i++) {
    jobs[i] = (struct job) { q, model, lastc, size, cs, nclusters, i, rnd (&rng), f->cluster_bits > 16 ? 60 : 300 };
    pthread_create (&th[i], NULL, writer, &jobs[i]);
  }
  for (unsigned i = 0; i < NTHREADS; i++)
    pthread_join (th[i], NULL);
  CHECK (qcow_disconnect (q) == 0, "disconnect");

  /* Reopen read-only: every cluster as the model says. */
  cfg.read_only = true;
  CHECK (qcow_connect (img, &cfg, &q) == 0, "reconnect %s", img);
  uint8_t *buf = malloc (size);
  CHECK (qcow_read (q, buf, size, 0) == 0 && memcmp (buf, model, size) == 0,
         "%s reads differently from the model after reopening", img);
  qcow_disconnect (q);
  free (buf);

  FILE *fp = fopen (raw, "w");
  CHECK (fp && fwrite (model, 1, size, fp) == size && fclose (fp) == 0, "write %s", raw);
  st = shell (out, sizeof out, "qemu-img check -f qcow2 %s", img);
  CHECK (st == 0, "qemu-img check %s exits %d:\n%s", img, st, out);
  st = shell (out, sizeof out, "qemu-img compare -f qcow2 -F raw %s %s", img, raw);
  CHECK (st == 0, "qemu-img compare %s with the model: %s", img, out);

  /* Where the last write was a compressible compressed write, QEMU must
   * see a compressed cluster: data without an offset. */
  char *map = malloc (1 << 22);
  st = shell (map, 1 << 22, "qemu-img map -f qcow2 --output=json %s", img);
  CHECK (st == 0, "qemu-img map %s", img);
  uint64_t seen = 0, expected = 0;
  for (uint64_t gc = 0; gc < nclusters; gc++)
    expected += lastc[gc];
  for (char *p = map; (p = strstr (p, "{ \"start\": ")); p++) {
    uint64_t start, length;
    if (sscanf (p, "{ \"start\": %" SCNu64 ", \"length\": %" SCNu64, &start, &length) != 2)
      continue;
    char *e = strchr (p, '}');
    bool data = e && memmem (p, e - p, "\"data\": true", 12);
    bool offset = e && memmem (p, e - p, "\"offset\"", 8);
    bool depth0 = e && memmem (p, e - p, "\"depth\": 0", 10);
    if (data && !offset && depth0)
      for (uint64_t gc = start / cs; gc < (start + length + cs - 1) / cs; gc++) {
        seen++;
        CHECK (lastc[gc], "cluster %" PRIu64 " is compressed but should not be", gc);
      }
  }
  CHECK (seen == expected, "%" PRIu64 " compressed clusters in qemu-img map, "
         "%" PRIu64 " expected", seen, expected);
  free (map);
  free (lastc);
  free (model);
  unlink (img);
  unlink (raw);
  unlink (base);
}

int
main (int argc, char **argv)
{
  const char *env = getenv ("UNIT_SEED");
  seed = env ? strtoull (env, NULL, 10) : (uint64_t) time (NULL) ^ (uint64_t) getpid () << 16;
  printf ("seed: %" PRIu64 " (rerun with UNIT_SEED=%" PRIu64 ")\n", seed, seed);
  if (system ("command -v qemu-img >/dev/null") != 0) {
    printf ("SKIP: qemu-img is not installed\n");
    return 77;
  }
  if (!mkdtemp (tmpdir)) {
    perror ("mkdtemp");
    return 1;
  }
  qcow_set_error_handler (on_error);
  static const struct format formats[] = {
    { "c512-rc16", "cluster_size=512", 9, false },
    { "c4k-rc1", "cluster_size=4096,refcount_bits=1", 12, false },
    { "c4k-rc2", "cluster_size=4096,refcount_bits=2", 12, false },
    { "c64k-rc16", "cluster_size=65536", 16, false },
    { "c64k-rc64-zstd", "cluster_size=65536,refcount_bits=64,compression_type=zstd", 16, false },
    { "c64k-v2", "cluster_size=65536,compat=0.10", 16, false },
    { "c64k-extl2", "cluster_size=65536,extended_l2=on", 16, false },
    { "c64k-backing", "cluster_size=65536", 16, true },
    { "c2M-rc8", "cluster_size=2M,refcount_bits=8", 21, false },
  };
  for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++)
    if (argc < 2 || strcmp (argv[1], formats[i].name) == 0)
      test_format (&formats[i]);
  rmdir (tmpdir);
  if (failures)
    printf ("%d failures (seed %" PRIu64 ")\n", failures, seed);
  return failures ? 1 : 0;
}

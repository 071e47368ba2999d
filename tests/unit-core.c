/* SPDX-License-Identifier: BSD-3-Clause */
/* unit-core.c - unit tests of the qcow core library (no server).
 *
 * Uses only core/qcow.h.  Every image written here is judged by QEMU:
 * `qemu-img check` must find it clean and `qemu-img compare` must find it
 * identical to a raw file written from the in-memory model.
 *
 *   tests/unit-core [SUBTEST...]      run all sub-tests, or only these
 *
 * UNIT_SEED=N repeats a run (the seed is printed at the start and on
 * failure).  Exit status 0 if every sub-test passed, 1 otherwise.
 */

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "qcow.h"

extern char **environ;

#define KiB ((uint64_t) 1024)
#define MiB (1024 * KiB)

/* Functions, not macros: arguments are often random draws. */
static inline uint64_t MIN (uint64_t a, uint64_t b) { return a < b ? a : b; }
static inline uint64_t MAX (uint64_t a, uint64_t b) { return a > b ? a : b; }

/* ------------------------------------------------------------------------
 * Test bookkeeping.
 */

static char tmpdir[] = "/tmp/unit-core.XXXXXX";
static uint64_t seed;
static const char *current;     /* name of the running sub-test */
static unsigned failed_checks;  /* in the running sub-test */

#define CHECK(cond, ...) check_ (!!(cond), __LINE__, __VA_ARGS__)

static bool __attribute__ ((format (printf, 3, 4)))
check_ (bool ok, int line, const char *fmt, ...)
{
  va_list ap;

  if (ok)
    return true;
  if (__atomic_add_fetch (&failed_checks, 1, __ATOMIC_RELAXED) > 20)
    return false;
  fprintf (stdout, "  FAIL [%s] line %d: ", current, line);
  va_start (ap, fmt);
  vfprintf (stdout, fmt, ap);
  va_end (ap);
  fputc ('\n', stdout);
  fflush (stdout);
  return false;
}

/* Messages from the library: unexpected ones are printed, expected ones
 * (between expect_error calls) only recorded for assertions. */
static pthread_mutex_t msg_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_error[1024];
static unsigned nr_errors;
static bool errors_expected;

static void
on_error (const char *msg)
{
  pthread_mutex_lock (&msg_lock);
  snprintf (last_error, sizeof last_error, "%s", msg);
  nr_errors++;
  if (!errors_expected)
    printf ("  library error: %s\n", msg);
  pthread_mutex_unlock (&msg_lock);
}

static void
expect_error (bool on)
{
  pthread_mutex_lock (&msg_lock);
  errors_expected = on;
  last_error[0] = '\0';
  nr_errors = 0;
  pthread_mutex_unlock (&msg_lock);
}

/* After a call failed: it must have reported a message naming FILE. */
static void
check_message (const char *file, const char *what)
{
  CHECK (nr_errors > 0, "%s: failed without an error message", what);
  CHECK (strstr (last_error, file) != NULL,
         "%s: message \"%s\" does not name %s", what, last_error, file);
}

/* ------------------------------------------------------------------------
 * Random numbers (splitmix64), one stream per sub-test.
 */

struct rng { uint64_t s; };

static uint64_t
rnd (struct rng *r)
{
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static uint64_t
rnd_below (struct rng *r, uint64_t n)
{
  return n ? rnd (r) % n : 0;
}

static void
rnd_fill (struct rng *r, void *buf, size_t len)
{
  unsigned char *p = buf;
  while (len > 0) {
    uint64_t v = rnd (r);
    size_t n = MIN (len, sizeof v);
    memcpy (p, &v, n);
    p += n;
    len -= n;
  }
}

static struct rng
rng_for (const char *name)
{
  struct rng r = { seed };
  for (const char *p = name; *p; p++)
    r.s = r.s * 131 + (unsigned char) *p;
  return r;
}

/* ------------------------------------------------------------------------
 * Files and commands.
 */

static const char *
path_in_tmp (const char *name)
{
  static char bufs[4][256];
  static unsigned i;
  char *p = bufs[i++ % 4];
  snprintf (p, sizeof bufs[0], "%s/%s", tmpdir, name);
  return p;
}

/* The environment for child processes: without LD_PRELOAD (sanitizer
 * runtimes are for the code under test, not for qemu-img). */
static char **
child_env (void)
{
  static char **env;
  size_t n = 0, j = 0;

  if (env)
    return env;
  while (environ[n])
    n++;
  env = calloc (n + 1, sizeof *env);
  for (size_t i = 0; i < n; i++)
    if (strncmp (environ[i], "LD_PRELOAD=", 11) != 0)
      env[j++] = environ[i];
  return env;
}

/* Run ARGV (NULL-terminated), collecting stdout+stderr into *OUT (if not
 * NULL; caller frees).  Returns the exit status, 128+signal, or -1.  The
 * command and its output are printed if it does not exit 0. */
static int
run (char **out, const char *const *argv)
{
  posix_spawn_file_actions_t fa;
  int pfd[2], status;
  pid_t pid;
  char *buf = NULL;
  size_t len = 0, cap = 0;
  ssize_t r;

  if (pipe (pfd) == -1)
    return -1;
  posix_spawn_file_actions_init (&fa);
  posix_spawn_file_actions_adddup2 (&fa, pfd[1], 1);
  posix_spawn_file_actions_adddup2 (&fa, pfd[1], 2);
  posix_spawn_file_actions_addclose (&fa, pfd[0]);
  posix_spawn_file_actions_addclose (&fa, pfd[1]);
  errno = posix_spawnp (&pid, argv[0], &fa, NULL, (char *const *) argv,
                        child_env ());
  posix_spawn_file_actions_destroy (&fa);
  close (pfd[1]);
  if (errno != 0) {
    printf ("  cannot run %s: %m\n", argv[0]);
    close (pfd[0]);
    return -1;
  }
  for (;;) {
    if (len + 4096 + 1 > cap) {
      cap = 2 * cap + 8192;
      buf = realloc (buf, cap);
    }
    r = read (pfd[0], buf + len, cap - len - 1);
    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    len += r;
  }
  buf[len] = '\0';
  close (pfd[0]);
  while (waitpid (pid, &status, 0) == -1)
    if (errno != EINTR)
      return -1;
  status = WIFEXITED (status) ? WEXITSTATUS (status) : 128 + WTERMSIG (status);
  if (status != 0) {
    printf ("  $");
    for (size_t i = 0; argv[i]; i++)
      printf (" %s", argv[i]);
    printf ("  => exit status %d\n%s", status, buf);
  }
  if (out)
    *out = buf;
  else
    free (buf);
  return status;
}

static int
remove_one (const char *path, const struct stat *st, int flag, struct FTW *f)
{
  (void) st, (void) flag, (void) f;
  return remove (path);
}

static bool
file_exists (const char *path)
{
  struct stat st;
  return stat (path, &st) == 0;
}

/* ------------------------------------------------------------------------
 * The model: the guest disk as a few windows of data (zeros elsewhere),
 * plus which guest clusters have ever been written.
 */

#define MAX_WINDOWS 8

struct window {
  uint64_t base, len;
  unsigned char *data;
};

struct model {
  uint64_t size;
  unsigned cluster_bits;
  uint64_t cluster_size;
  unsigned nwin;
  struct window win[MAX_WINDOWS];
  unsigned char *touched;       /* one byte per guest cluster */
  uint64_t nclusters;
};

static void
model_init (struct model *m, uint64_t size, unsigned cluster_bits)
{
  memset (m, 0, sizeof *m);
  m->size = size;
  m->cluster_bits = cluster_bits;
  m->cluster_size = 1ULL << cluster_bits;
  m->nclusters = (size + m->cluster_size - 1) >> cluster_bits;
  m->touched = calloc (m->nclusters ? m->nclusters : 1, 1);
}

static void
model_free (struct model *m)
{
  for (unsigned i = 0; i < m->nwin; i++)
    free (m->win[i].data);
  free (m->touched);
  memset (m, 0, sizeof *m);
}

static struct window *
model_window (struct model *m, uint64_t base, uint64_t len)
{
  struct window *w = &m->win[m->nwin++];
  w->base = base;
  w->len = len;
  w->data = calloc (len, 1);
  return w;
}

/* Store data (must lie inside one window) without marking clusters. */
static void
model_store (struct model *m, const void *buf, size_t len, uint64_t off)
{
  for (unsigned i = 0; i < m->nwin; i++) {
    struct window *w = &m->win[i];
    if (off >= w->base && off + len <= w->base + w->len) {
      memcpy (w->data + (off - w->base), buf, len);
      return;
    }
  }
  fprintf (stderr, "unit-core: model_store outside the windows\n");
  abort ();
}

static void
model_mark (struct model *m, uint64_t off, size_t len)
{
  if (len > 0)
    memset (m->touched + (off >> m->cluster_bits), 1,
            ((off + len - 1) >> m->cluster_bits) - (off >> m->cluster_bits) + 1);
}

static void
model_read (const struct model *m, void *buf, size_t len, uint64_t off)
{
  memset (buf, 0, len);
  for (unsigned i = 0; i < m->nwin; i++) {
    const struct window *w = &m->win[i];
    uint64_t lo = MAX (off, w->base), hi = MIN (off + len, w->base + w->len);
    if (lo < hi)
      memcpy ((char *) buf + (lo - off), w->data + (lo - w->base), hi - lo);
  }
}

static uint64_t
model_touched_bytes (const struct model *m)
{
  uint64_t n = 0;
  for (uint64_t c = 0; c < m->nclusters; c++)
    n += m->touched[c];
  return n << m->cluster_bits;
}

/* Change the virtual size: what lies past a new, smaller end is lost. */
static void
model_resize (struct model *m, uint64_t size)
{
  uint64_t n = (size + m->cluster_size - 1) >> m->cluster_bits;

  for (unsigned i = 0; i < m->nwin; i++) {
    struct window *w = &m->win[i];
    if (w->base >= size)
      w->len = 0;
    else if (w->base + w->len > size)
      w->len = size - w->base;
  }
  if (n < m->nclusters) {
    /* A cluster cut in two by the new end stays allocated; the tail past
     * the end is lost, so it reads as zeros if the disk grows again. */
    m->nclusters = n;
  }
  else if (n > m->nclusters) {
    m->touched = realloc (m->touched, n);
    memset (m->touched + m->nclusters, 0, n - m->nclusters);
    m->nclusters = n;
  }
  m->size = size;
}

/* Write the model as a raw file (for qemu-img compare). */
static bool
model_write_raw (const struct model *m, const char *path)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  bool ok = fd >= 0 && ftruncate (fd, m->size) == 0;

  for (unsigned i = 0; ok && i < m->nwin; i++) {
    const struct window *w = &m->win[i];
    ok = pwrite (fd, w->data, w->len, w->base) == (ssize_t) w->len;
  }
  if (fd >= 0)
    close (fd);
  return CHECK (ok, "writing raw model %s: %m", path);
}

/* ------------------------------------------------------------------------
 * Image operations checked against the model.
 */

/* CACHE_SIZE: the metadata cache (0: the default). */
static struct qcow *
open_image_cache (const char *path, bool read_only, uint64_t cache_size)
{
  struct qcow_config cfg;
  struct qcow *q = NULL;
  int r;

  qcow_config_default (&cfg);
  cfg.read_only = read_only;
  cfg.cache_size = cache_size;
  r = qcow_connect (path, &cfg, &q);
  if (!CHECK (r == 0 && q != NULL, "qcow_connect %s (%s): %s", path,
              read_only ? "read-only" : "read-write", strerror (-r)))
    return NULL;
  return q;
}

static struct qcow *
open_image (const char *path, bool read_only)
{
  return open_image_cache (path, read_only, 0);
}

static bool
close_image (struct qcow *q)
{
  int r = qcow_disconnect (q);
  return CHECK (r == 0, "qcow_disconnect: %s", strerror (-r));
}

static bool
create_image (const char *path, const struct qcow_create_opts *opts)
{
  int r = qcow_create (path, opts, true);
  return CHECK (r == 0, "qcow_create %s (cluster_bits %u, refcount_order %u, "
                "version %u): %s", path, opts->cluster_bits,
                opts->refcount_order, opts->version, strerror (-r));
}

/* Read [OFF, OFF+LEN) and compare it with the model. */
static bool
check_read (struct qcow *q, const struct model *m, uint64_t off, size_t len)
{
  unsigned char *got = malloc (len), *want = malloc (len);
  int r = qcow_read (q, got, len, off);
  bool ok = CHECK (r == 0, "qcow_read (%zu bytes at %" PRIu64 "): %s",
                   len, off, strerror (-r));

  if (ok) {
    model_read (m, want, len, off);
    if (memcmp (got, want, len) != 0) {
      size_t i = 0;
      while (got[i] == want[i])
        i++;
      ok = CHECK (false, "read of %zu bytes at %" PRIu64 " differs at byte %"
                  PRIu64 " (cluster %" PRIu64 "): got 0x%02x, want 0x%02x",
                  len, off, off + i, (off + i) >> m->cluster_bits,
                  got[i], want[i]);
    }
  }
  free (got);
  free (want);
  return ok;
}

/* Write LEN random bytes at OFF (inside one window), in image and model. */
static bool
write_random (struct qcow *q, struct model *m, struct rng *r,
              uint64_t off, size_t len)
{
  unsigned char *buf = malloc (len);
  int ret;

  rnd_fill (r, buf, len);
  ret = qcow_write (q, buf, len, off, rnd_below (r, 16) == 0 ? QCOW_FUA : 0);
  if (ret == 0) {
    model_store (m, buf, len, off);
    model_mark (m, off, len);
  }
  free (buf);
  return CHECK (ret == 0, "qcow_write (%zu bytes at %" PRIu64 "): %s",
                len, off, strerror (-ret));
}

/* One random write inside a random window, of a random kind: tiny and
 * unaligned, sector-aligned, whole clusters, across a cluster boundary,
 * or large and unaligned; then read back around it. */
static bool
random_write (struct qcow *q, struct model *m, struct rng *r)
{
  const struct window *w = &m->win[rnd_below (r, m->nwin)];
  const uint64_t cs = m->cluster_size, end = w->base + w->len;
  uint64_t off, len;

  switch (rnd_below (r, 5)) {
  case 0:
    len = 1 + rnd_below (r, 100);
    off = w->base + rnd_below (r, w->len);
    break;
  case 1:
    len = 512 * (1 + rnd_below (r, 8));
    off = (w->base + rnd_below (r, w->len)) & ~511ULL;
    break;
  case 2:
    len = cs * (1 + rnd_below (r, 2));
    off = (w->base + rnd_below (r, w->len)) & ~(cs - 1);
    break;
  case 3:
    off = ((w->base + rnd_below (r, w->len)) & ~(cs - 1)) - rnd_below (r, 300);
    len = 1 + rnd_below (r, 600);
    break;
  default:
    len = 1 + rnd_below (r, MIN (2 * cs + 4096, 300 * KiB));
    off = w->base + rnd_below (r, w->len);
    break;
  }
  /* Clip to the window. */
  if (off < w->base || off >= end)
    off = w->base;
  len = MIN (len, end - off);

  if (!write_random (q, m, r, off, len))
    return false;
  {
    uint64_t lo = off - MIN (off, rnd_below (r, 4096));
    uint64_t hi = MIN (m->size, off + len + rnd_below (r, 4096));
    return check_read (q, m, lo, hi - lo);
  }
}

static bool
random_writes (struct qcow *q, struct model *m, struct rng *r, unsigned n)
{
  for (unsigned i = 0; i < n; i++) {
    if (!random_write (q, m, r))
      return false;
    if (rnd_below (r, 50) == 0) {
      int ret = qcow_flush (q);
      if (!CHECK (ret == 0, "qcow_flush: %s", strerror (-ret)))
        return false;
    }
  }
  return true;
}

/* Read every window (and a little around it) in random-sized pieces, and
 * random ranges anywhere. */
static bool
verify_all (struct qcow *q, const struct model *m, struct rng *r)
{
  for (unsigned i = 0; i < m->nwin; i++) {
    const struct window *w = &m->win[i];
    uint64_t off = w->base - MIN (w->base, 1000);
    uint64_t end = MIN (m->size, w->base + w->len + 1000);
    while (off < end) {
      uint64_t len = MIN (end - off, 1 + rnd_below (r, 1 * MiB));
      if (!check_read (q, m, off, len))
        return false;
      off += len;
    }
  }
  for (unsigned i = 0; i < 20; i++) {
    uint64_t off = rnd_below (r, m->size);
    uint64_t len = MIN (m->size - off, 1 + rnd_below (r, 64 * KiB));
    if (!check_read (q, m, off, len))
      return false;
  }
  return true;
}

/* Block status must agree with the clusters written: holes exactly where
 * nothing was ever written.  Also checks qcow_allocated_bytes. */
static bool
check_map (struct qcow *q, const struct model *m)
{
  uint64_t off = 0, bytes = 0;
  unsigned iterations = 0;
  int r;

  while (off < m->size) {
    uint64_t len = 0;
    unsigned flags = 0;

    r = qcow_map (q, off, MIN (m->size - off, 1ULL << 30), &len, &flags);
    if (!CHECK (r >= 0, "qcow_map at %" PRIu64 ": %s", off, strerror (-r)) ||
        !CHECK (len > 0 && len <= m->size - off,
                "qcow_map at %" PRIu64 ": length %" PRIu64, off, len) ||
        !CHECK (++iterations < 4000000, "qcow_map does not advance"))
      return false;
    for (uint64_t c = off >> m->cluster_bits;
         c <= (off + len - 1) >> m->cluster_bits; c++) {
      bool hole = flags & QCOW_EXTENT_HOLE;
      if (!CHECK (hole != m->touched[c],
                  "qcow_map extent [%" PRIu64 ", +%" PRIu64 ") flags %u: "
                  "guest cluster %" PRIu64 " was %s written", off, len, flags,
                  c, m->touched[c] ? "" : "never"))
        return false;
    }
    off += len;
  }
  r = qcow_allocated_bytes (q, &bytes);
  return CHECK (r == 0 && bytes == model_touched_bytes (m),
                "qcow_allocated_bytes: %d, %" PRIu64 " bytes, want %" PRIu64,
                r, bytes, model_touched_bytes (m));
}

/* Expected results of seek_mapped/seek_unmapped, at cluster granularity. */
static uint64_t
expect_seek (const struct model *m, uint64_t from, bool mapped)
{
  uint64_t c = from >> m->cluster_bits;

  if (m->touched[c] == mapped)
    return from;
  while (c < m->nclusters && m->touched[c] != mapped)
    c++;
  return MIN (m->size, c << m->cluster_bits);
}

static bool
check_seek (struct qcow *q, const struct model *m, struct rng *r)
{
  uint64_t froms[4 * MAX_WINDOWS + 24];
  unsigned n = 0;

  froms[n++] = 0;
  froms[n++] = m->size - 1;
  for (unsigned i = 0; i < m->nwin; i++) {
    const struct window *w = &m->win[i];
    froms[n++] = w->base ? w->base - 1 : 0;
    froms[n++] = w->base;
    froms[n++] = w->base + w->len / 2;
    froms[n++] = MIN (m->size - 1, w->base + w->len);
  }
  while (n < sizeof froms / sizeof froms[0])
    froms[n++] = rnd_below (r, m->size);

  for (unsigned i = 0; i < n; i++) {
    int64_t got_m = qcow_seek_mapped (q, froms[i]);
    int64_t got_u = qcow_seek_unmapped (q, froms[i]);
    uint64_t want_m = expect_seek (m, froms[i], true);
    uint64_t want_u = expect_seek (m, froms[i], false);
    if (!CHECK (got_m == (int64_t) want_m,
                "qcow_seek_mapped (%" PRIu64 ") = %" PRId64 ", want %" PRIu64,
                froms[i], got_m, want_m) ||
        !CHECK (got_u == (int64_t) want_u,
                "qcow_seek_unmapped (%" PRIu64 ") = %" PRId64 ", want %" PRIu64,
                froms[i], got_u, want_u))
      return false;
  }
  return true;
}

/* QEMU's verdict: `qemu-img check` clean and `qemu-img compare` equal to
 * the model. */
static bool
qemu_agrees (const char *path, const struct model *m)
{
  const char *raw = path_in_tmp ("model.raw");
  const char *check[] = { "qemu-img", "check", "-q", "-f", "qcow2", path, NULL };
  const char *cmp[] = { "qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw",
                        path, raw, NULL };
  bool ok;

  ok = CHECK (run (NULL, check) == 0, "qemu-img check %s is not clean", path);
  if (model_write_raw (m, raw))
    ok &= CHECK (run (NULL, cmp) == 0, "qemu-img compare: %s differs from "
                 "the model", path);
  unlink (raw);
  return ok;
}

/* `qemu-img info --output=json` must contain each of the strings. */
static bool
qemu_info_has (const char *path, const char *const *want)
{
  const char *argv[] = { "qemu-img", "info", "-f", "qcow2", "--output=json",
                         path, NULL };
  char *out = NULL;
  bool ok = CHECK (run (&out, argv) == 0, "qemu-img info %s failed", path);

  for (; ok && *want; want++)
    ok = CHECK (strstr (out, *want) != NULL,
                "qemu-img info %s lacks %s:\n%s", path, *want, out);
  free (out);
  return ok;
}

static bool
same_mtime (const struct stat *a, const struct stat *b)
{
  return a->st_size == b->st_size && a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
         a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* ------------------------------------------------------------------------
 * Sub-test: the format matrix.
 */

struct format {
  unsigned cluster_bits, refcount_order, version;
  bool lazy;
};

/* Windows for a disk with these clusters: one at 0, four straddling L2
 * table boundaries (unaligned), one ending at the (unaligned) end of the
 * disk.  Initialises the model with the virtual size that gives. */
static void
layout_windows (struct model *m, unsigned cluster_bits, struct rng *r)
{
  const uint64_t cs = 1ULL << cluster_bits;
  const uint64_t l2_span = cs * (cs / 8);
  const uint64_t wlen = MAX (3 * cs, 96 * KiB) + 777;
  uint64_t bases[6], next, size;

  bases[0] = 0;
  next = wlen;
  for (unsigned i = 1; i < 5; i++) {
    uint64_t boundary = (next + wlen + l2_span - 1) / l2_span * l2_span;
    bases[i] = boundary - wlen / 2 - rnd_below (r, 512);
    next = bases[i] + wlen + 1;
  }
  size = (next + wlen + 2 * cs + 3 * 512) & ~511ULL;
  if (size % cs == 0 && cs > 512)
    size -= 512;                /* an end that is not on a cluster boundary */
  bases[5] = size - wlen;

  model_init (m, size, cluster_bits);
  for (unsigned i = 0; i < 6; i++)
    model_window (m, bases[i], wlen);
}

static void
test_format (const struct format *f)
{
  char name[64];
  struct rng r;
  struct model m;
  struct qcow_create_opts opts;
  struct qcow_header h;
  struct qcow_info info;
  struct qcow *q;
  struct stat st1, st2;
  const char *path;
  char want_cs[64], want_bits[64], want_compat[64], want_lazy[64];
  const char *outer = current;
  unsigned failed_before = failed_checks;

  snprintf (name, sizeof name, "format-c%u-r%u-v%u%s", f->cluster_bits,
            f->refcount_order, f->version, f->lazy ? "-lazy" : "");
  current = name;
  path = path_in_tmp ("format.qcow2");
  r = rng_for (name);
  layout_windows (&m, f->cluster_bits, &r);

  qcow_create_opts_default (&opts);
  opts.size = m.size;
  opts.cluster_bits = f->cluster_bits;
  opts.refcount_order = f->refcount_order;
  opts.version = f->version;
  opts.lazy_refcounts = f->lazy;
  if (!create_image (path, &opts))
    goto out;

  /* Write half, read everything back, close. */
  if ((q = open_image (path, false)) == NULL)
    goto out;
  qcow_get_info (q, &info);
  CHECK (info.size == m.size && info.cluster_size == m.cluster_size &&
         info.read_write, "qcow_get_info: size %" PRIu64 " cluster %" PRIu32
         " rw %d", info.size, info.cluster_size, info.read_write);
  if (!random_writes (q, &m, &r, 100) || !verify_all (q, &m, &r)) {
    qcow_disconnect (q);
    goto out;
  }
  if (!close_image (q))
    goto out;

  /* Read-only: same data, same header, file untouched. */
  stat (path, &st1);
  if ((q = open_image (path, true)) == NULL)
    goto out;
  qcow_get_info (q, &info);
  CHECK (!info.read_write, "read-only connection reports read_write");
  qcow_get_header (q, &h);
  CHECK (h.version == f->version && h.cluster_bits == f->cluster_bits &&
         h.refcount_order == f->refcount_order && h.size == m.size,
         "header: version %u cluster_bits %u refcount_order %u size %" PRIu64,
         h.version, h.cluster_bits, h.refcount_order, h.size);
  CHECK ((h.incompatible_features & QCOW_INCOMPAT_DIRTY) == 0,
         "dirty bit set after a clean disconnect");
  CHECK (!!(h.compatible_features & QCOW_COMPAT_LAZY_REFCOUNTS) ==
         (f->version == 3 && f->lazy), "lazy refcounts bit: features 0x%"
         PRIx64, h.compatible_features);
  verify_all (q, &m, &r);
  expect_error (true);
  {
    char byte = 1;
    int ret = qcow_write (q, &byte, 1, 0, 0);
    CHECK (ret < 0, "write on a read-only connection succeeded");
  }
  expect_error (false);
  close_image (q);
  stat (path, &st2);
  CHECK (same_mtime (&st1, &st2), "read-only connection modified the file");

  /* Reopen read-write and write the other half. */
  if ((q = open_image (path, false)) == NULL)
    goto out;
  if (random_writes (q, &m, &r, 100) && verify_all (q, &m, &r) &&
      check_map (q, &m))
    check_seek (q, &m, &r);
  if (!close_image (q))
    goto out;

  /* QEMU's opinion. */
  qemu_agrees (path, &m);
  snprintf (want_cs, sizeof want_cs, "\"cluster-size\": %" PRIu64,
            m.cluster_size);
  snprintf (want_bits, sizeof want_bits, "\"refcount-bits\": %u",
            1u << f->refcount_order);
  snprintf (want_compat, sizeof want_compat, "\"compat\": \"%s\"",
            f->version == 2 ? "0.10" : "1.1");
  snprintf (want_lazy, sizeof want_lazy, "\"lazy-refcounts\": %s",
            f->lazy ? "true" : "false");
  {
    /* (Version 2 has no lazy refcounts field.) */
    const char *want[] = { want_cs, want_bits, want_compat,
                           f->version == 3 ? want_lazy : NULL, NULL };
    qemu_info_has (path, want);
  }

  /* And once more through the library after QEMU has looked at it, then
   * with the smallest metadata cache (for clusters over 4 KiB, 4 KiB
   * slices of the L2 tables, evicted all the time). */
  if ((q = open_image (path, true)) != NULL) {
    verify_all (q, &m, &r);
    close_image (q);
  }
  if ((q = open_image_cache (path, true, 1)) != NULL) {
    if (verify_all (q, &m, &r) && check_map (q, &m))
      check_seek (q, &m, &r);
    close_image (q);
  }
 out:
  unlink (path);
  model_free (&m);
  printf ("  %s: %s\n", name, failed_checks == failed_before ? "ok" : "FAILED");
  current = outer;
}

static void
test_formats (void)
{
  static const struct format v2[] = {
    { 9, 4, 2, false }, { 12, 4, 2, false }, { 16, 4, 2, false },
    { 21, 4, 2, false },
  };
  struct format f;

  /* Every cluster size (refcount width and laziness varying along). */
  for (unsigned cb = 9; cb <= 21; cb++) {
    f = (struct format) { cb, (cb - 9) % 7, 3, cb % 2 == 0 };
    test_format (&f);
  }
  /* Every refcount width, with small and default clusters. */
  for (unsigned order = 0; order <= 6; order++) {
    f = (struct format) { 12, order, 3, order % 2 == 1 };
    test_format (&f);
    f = (struct format) { 16, order, 3, order % 2 == 0 };
    test_format (&f);
  }
  /* Version 2 (16 bit refcounts only). */
  for (size_t i = 0; i < sizeof v2 / sizeof v2[0]; i++)
    test_format (&v2[i]);
}

/* ------------------------------------------------------------------------
 * Sub-test: creation rules.
 */

static void
test_create (void)
{
  const char *path = path_in_tmp ("create.qcow2");
  const char *junk = "not a qcow2 image\n";
  struct qcow_create_opts opts;
  struct qcow *q;
  char buf[64];
  int fd, r;

  /* An existing file is not replaced unless asked. */
  fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  CHECK (fd >= 0 && write (fd, junk, strlen (junk)) == (ssize_t) strlen (junk),
         "writing %s", path);
  close (fd);
  qcow_create_opts_default (&opts);
  opts.size = 4 * MiB;
  expect_error (true);
  r = qcow_create (path, &opts, false);
  CHECK (r == -EEXIST, "qcow_create on an existing file: %d, want -EEXIST", r);
  check_message (path, "qcow_create on an existing file");
  expect_error (false);
  fd = open (path, O_RDONLY);
  memset (buf, 0, sizeof buf);
  CHECK (fd >= 0 && read (fd, buf, sizeof buf) == (ssize_t) strlen (junk) &&
         strcmp (buf, junk) == 0, "a refused qcow_create changed the file");
  close (fd);

  /* With overwrite it becomes a fresh, empty image. */
  r = qcow_create (path, &opts, true);
  CHECK (r == 0, "qcow_create with overwrite: %s", strerror (-r));
  if (r == 0 && (q = open_image (path, true)) != NULL) {
    struct model m;
    struct rng rng = rng_for ("create");
    struct qcow_info info;
    qcow_get_info (q, &info);
    CHECK (info.size == 4 * MiB && info.cluster_size == 64 * KiB,
           "default image: size %" PRIu64 ", cluster size %" PRIu32,
           info.size, info.cluster_size);
    model_init (&m, 4 * MiB, 16);
    verify_all (q, &m, &rng);
    check_map (q, &m);
    close_image (q);
    qemu_agrees (path, &m);
    model_free (&m);
  }
  unlink (path);

  /* Invalid options are refused and leave nothing behind. */
  {
    static const struct { unsigned cb, order, version; } bad[] = {
      { 8, 4, 3 }, { 22, 4, 3 }, { 16, 7, 3 }, { 16, 4, 1 }, { 16, 4, 4 },
      { 16, 0, 2 }, { 16, 6, 2 },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
      qcow_create_opts_default (&opts);
      opts.size = 4 * MiB;
      opts.cluster_bits = bad[i].cb;
      opts.refcount_order = bad[i].order;
      opts.version = bad[i].version;
      expect_error (true);
      r = qcow_create (path, &opts, false);
      expect_error (false);
      CHECK (r < 0, "qcow_create with cluster_bits %u, refcount_order %u, "
             "version %u succeeded", bad[i].cb, bad[i].order, bad[i].version);
      CHECK (r >= 0 || !file_exists (path), "failed qcow_create left %s", path);
      unlink (path);
    }
  }

  /* A file that does not exist cannot be opened. */
  {
    struct qcow_config cfg;
    q = NULL;
    qcow_config_default (&cfg);
    expect_error (true);
    r = qcow_connect (path, &cfg, &q);
    CHECK (r == -ENOENT, "qcow_connect on a missing file: %d", r);
    check_message (path, "qcow_connect on a missing file");
    expect_error (false);
  }
}

/* ------------------------------------------------------------------------
 * Sub-test: requests outside the virtual size fail cleanly.
 */

static void
test_bounds (void)
{
  const char *path = path_in_tmp ("bounds.qcow2");
  const uint64_t size = 1 * MiB + 512;
  struct qcow_create_opts opts;
  struct qcow *q;
  struct model m;
  struct rng r = rng_for ("bounds");
  char buf[4096];
  static const struct { uint64_t off; size_t len; } outside[] = {
    { 1 * MiB + 512, 1 }, { 1 * MiB + 511, 2 }, { 1 * MiB, 4096 },
    { 2 * MiB, 512 }, { UINT64_MAX - 10, 100 }, { UINT64_MAX, 1 },
    { 1ULL << 63, 512 },
  };

  qcow_create_opts_default (&opts);
  opts.size = size;
  if (!create_image (path, &opts) || (q = open_image (path, false)) == NULL)
    goto out;
  model_init (&m, size, 16);
  model_window (&m, 0, size);
  /* The last bytes are ordinary. */
  write_random (q, &m, &r, size - 100, 100);
  check_read (q, &m, size - 4096, 4096);

  expect_error (true);
  for (size_t i = 0; i < sizeof outside / sizeof outside[0]; i++) {
    int ret;
    memset (buf, 0xa5, sizeof buf);
    ret = qcow_read (q, buf, outside[i].len, outside[i].off);
    CHECK (ret < 0, "qcow_read (%zu bytes at %" PRIu64 ") past the end: %d",
           outside[i].len, outside[i].off, ret);
    ret = qcow_write (q, buf, outside[i].len, outside[i].off, 0);
    CHECK (ret < 0, "qcow_write (%zu bytes at %" PRIu64 ") past the end: %d",
           outside[i].len, outside[i].off, ret);
    CHECK (ret == -EINVAL || ret == -ENOSPC || ret == -EIO,
           "write past the end: unexpected error %d", ret);
  }
  expect_error (false);
  /* Nothing was written by the refused writes. */
  check_read (q, &m, 0, size);
  check_map (q, &m);
  close_image (q);
  qemu_agrees (path, &m);
  model_free (&m);
 out:
  unlink (path);
}

/* ------------------------------------------------------------------------
 * Sub-test: resize.
 */

static void
test_resize (void)
{
  const char *path = path_in_tmp ("resize.qcow2");
  struct qcow_create_opts opts;
  struct qcow_info info;
  struct qcow *q;
  struct model m;
  struct rng r = rng_for ("resize");
  uint64_t size = 10 * MiB + 1536, big = 64 * MiB + 512, small = 3 * MiB + 512;
  int ret;

  qcow_create_opts_default (&opts);
  opts.size = size;
  opts.cluster_bits = 16;
  if (!create_image (path, &opts) || (q = open_image (path, false)) == NULL)
    goto out;
  model_init (&m, size, 16);
  model_window (&m, 0, big);    /* the window covers the grown disk */
  /* Data at the start, middle and up to the old end. */
  write_random (q, &m, &r, 1000, 300 * KiB);
  write_random (q, &m, &r, 5 * MiB - 77, 200 * KiB);
  write_random (q, &m, &r, 3 * MiB - 1000, 20000); /* across the cut below */
  write_random (q, &m, &r, size - 70000, 70000);

  /* Grow: old data kept, new area reads as zeros, can be written. */
  ret = qcow_resize (q, big, false);
  CHECK (ret == 0, "qcow_resize grow: %s", strerror (-ret));
  model_resize (&m, big);
  qcow_get_info (q, &info);
  CHECK (info.size == big, "size after growing: %" PRIu64, info.size);
  check_read (q, &m, 0, big);
  check_map (q, &m);
  write_random (q, &m, &r, big - 5000, 5000);
  write_random (q, &m, &r, 40 * MiB + 3, 100 * KiB);
  close_image (q);
  qemu_agrees (path, &m);
  {
    const char *want[] = { "\"virtual-size\": 67109376", NULL };
    qemu_info_has (path, want);
  }

  /* Shrink: refused without ignore_data_loss, then allowed. */
  if ((q = open_image (path, false)) == NULL)
    goto out_model;
  check_read (q, &m, 0, big);
  expect_error (true);
  ret = qcow_resize (q, small, false);
  CHECK (ret == -EINVAL, "shrink without ignore_data_loss: %d, want -EINVAL",
         ret);
  check_message (path, "shrink without ignore_data_loss");
  expect_error (false);
  qcow_get_info (q, &info);
  CHECK (info.size == big, "size after refused shrink: %" PRIu64, info.size);
  check_read (q, &m, 0, big);

  ret = qcow_resize (q, small, true);
  CHECK (ret == 0, "shrink with ignore_data_loss: %s", strerror (-ret));
  model_resize (&m, small);
  qcow_get_info (q, &info);
  CHECK (info.size == small, "size after shrinking: %" PRIu64, info.size);
  check_read (q, &m, 0, small);
  expect_error (true);
  {
    char c;
    CHECK (qcow_read (q, &c, 1, small) < 0, "read past the new end worked");
  }
  expect_error (false);
  close_image (q);
  {
    const char *want[] = { "\"virtual-size\": 3146240", NULL };
    qemu_info_has (path, want);
  }
  /* Freed clusters are not leaked: qemu-img check must be clean. */
  qemu_agrees (path, &m);

  /* Growing again: what was cut off must not reappear. */
  if ((q = open_image (path, false)) == NULL)
    goto out_model;
  ret = qcow_resize (q, size, false);
  CHECK (ret == 0, "qcow_resize grow after shrink: %s", strerror (-ret));
  model_resize (&m, size);
  check_read (q, &m, 0, size);
  close_image (q);
  qemu_agrees (path, &m);
 out_model:
  model_free (&m);
 out:
  unlink (path);
}

/* ------------------------------------------------------------------------
 * Sub-test: the refcount structure grows (several refcount blocks, a
 * refcount table of several clusters).
 */

static void
test_refcount_growth_one (unsigned order, bool lazy, uint64_t size,
                          unsigned min_table_clusters)
{
  const char *path = path_in_tmp ("growth.qcow2");
  struct qcow_create_opts opts;
  struct qcow_header h;
  struct qcow *q;
  struct model m;
  struct rng r = rng_for ("refcount-growth");
  uint64_t off = 0;

  printf ("  512-byte clusters, %u-bit refcounts, %s, %" PRIu64 " MiB\n",
          1u << order, lazy ? "lazy" : "not lazy", size / MiB);
  qcow_create_opts_default (&opts);
  opts.size = size;
  opts.cluster_bits = 9;
  opts.refcount_order = order;
  opts.lazy_refcounts = lazy;
  if (!create_image (path, &opts) || (q = open_image (path, false)) == NULL)
    goto out;
  model_init (&m, size, 9);
  model_window (&m, 0, size);
  /* Fill the disk with unaligned writes of random lengths. */
  while (off < size) {
    uint64_t len = MIN (size - off, 1 + rnd_below (&r, 6000));
    if (!write_random (q, &m, &r, off, len))
      break;
    off += len;
  }
  check_read (q, &m, 0, size);
  qcow_get_header (q, &h);
  CHECK (h.refcount_table_clusters >= min_table_clusters,
         "refcount table has %u clusters, want at least %u",
         h.refcount_table_clusters, min_table_clusters);
  close_image (q);
  qemu_agrees (path, &m);
  if ((q = open_image (path, true)) != NULL) {
    check_read (q, &m, 0, size);
    close_image (q);
  }
  model_free (&m);
 out:
  unlink (path);
}

static void
test_refcount_growth (void)
{
  /* 1-bit refcounts: a block covers 4096 clusters (2 MiB); 8 MiB of data
   * plus tables needs at least 5 blocks. */
  test_refcount_growth_one (0, true, 8 * MiB, 1);
  /* 64-bit refcounts: a block covers 64 clusters (32 KiB) and a table
   * cluster 64 blocks (2 MiB), so 4 MiB of data needs >= 3 table clusters. */
  test_refcount_growth_one (6, false, 4 * MiB, 3);
}

/* ------------------------------------------------------------------------
 * Sub-test: parallel writers.
 */

struct par {
  struct qcow *q;
  struct model *m;
  pthread_barrier_t *barrier;
  unsigned id, nthreads;
  uint64_t region, region_len;  /* phase 2 region */
  bool ok;
};

#define PAR_THREADS 4

static void *
par_thread (void *arg)
{
  struct par *p = arg;
  const uint64_t cs = p->m->cluster_size;
  char name[32];
  struct rng r;
  unsigned char *buf = malloc (cs), *back = malloc (cs);

  snprintf (name, sizeof name, "parallel-%u", p->id);
  r = rng_for (name);
  p->ok = true;

  /* Phase 1: random writes into this thread's own clusters (every
   * nthreads-th cluster of the first half), sharing L2 tables. */
  pthread_barrier_wait (p->barrier);
  for (unsigned i = 0; p->ok && i < 400; i++) {
    uint64_t nc = p->region / cs / p->nthreads;
    uint64_t c = rnd_below (&r, nc) * p->nthreads + p->id;
    uint64_t start = rnd_below (&r, cs), len = 1 + rnd_below (&r, cs - start);
    int ret;
    rnd_fill (&r, buf, len);
    ret = qcow_write (p->q, buf, len, c * cs + start, 0);
    p->ok = CHECK (ret == 0, "thread %u: qcow_write: %s", p->id,
                   strerror (-ret));
    if (!p->ok)
      break;
    model_store (p->m, buf, len, c * cs + start);
    model_mark (p->m, c * cs + start, len); /* only this thread's cluster */
    ret = qcow_read (p->q, back, len, c * cs + start);
    p->ok = CHECK (ret == 0 && memcmp (buf, back, len) == 0,
                   "thread %u: read-back of cluster %" PRIu64 " differs",
                   p->id, c);
  }

  /* Phase 2: every thread writes its own slice of the same fresh clusters
   * at the same time; no slice may be lost to another's allocation. */
  pthread_barrier_wait (p->barrier);
  for (uint64_t i = 0; p->ok && i < p->region_len / cs; i++) {
    uint64_t c = p->id % 2 ? p->region_len / cs - 1 - i : i;
    uint64_t slice = cs / p->nthreads;
    uint64_t off = p->region + c * cs + p->id * slice;
    int ret;
    rnd_fill (&r, buf, slice);
    ret = qcow_write (p->q, buf, slice, off, 0);
    p->ok = CHECK (ret == 0, "thread %u: qcow_write: %s", p->id,
                   strerror (-ret));
    if (p->ok)
      model_store (p->m, buf, slice, off);
  }
  free (buf);
  free (back);
  return NULL;
}

static void
test_parallel (void)
{
  const char *path = path_in_tmp ("parallel.qcow2");
  const uint64_t size = 32 * MiB;
  struct qcow_create_opts opts;
  struct qcow *q;
  struct model m;
  struct rng r = rng_for ("parallel");
  pthread_barrier_t barrier;
  pthread_t th[PAR_THREADS];
  struct par p[PAR_THREADS];

  qcow_create_opts_default (&opts);
  opts.size = size;
  opts.cluster_bits = 12;
  if (!create_image (path, &opts) || (q = open_image (path, false)) == NULL)
    goto out;
  model_init (&m, size, 12);
  model_window (&m, 0, size);
  model_mark (&m, 16 * MiB, 16 * MiB); /* phase 2 writes all of it */
  pthread_barrier_init (&barrier, NULL, PAR_THREADS);
  for (unsigned i = 0; i < PAR_THREADS; i++) {
    p[i] = (struct par) { q, &m, &barrier, i, PAR_THREADS,
                          16 * MiB, 16 * MiB, false };
    pthread_create (&th[i], NULL, par_thread, &p[i]);
  }
  for (unsigned i = 0; i < PAR_THREADS; i++)
    pthread_join (th[i], NULL);
  pthread_barrier_destroy (&barrier);

  for (unsigned i = 0; i < PAR_THREADS; i++)
    if (!CHECK (p[i].ok, "thread %u failed", i))
      goto out_close;
  verify_all (q, &m, &r);
  check_map (q, &m);
 out_close:
  close_image (q);
  qemu_agrees (path, &m);
  model_free (&m);
 out:
  unlink (path);
}

/* Threads reading, overwriting, trimming and flushing their own clusters,
 * scattered over a disk whose L2 tables are many times the metadata
 * cache (4 KiB slices, evicted and reused all the time): the lock-free
 * lookups of the read and overwrite path must never see a slice being
 * reused, nor write where a trimmed cluster's space was handed out again. */
#define EVICT_CLUSTERS 48          /* per thread */

struct evict {
  struct qcow *q;
  unsigned id, nthreads;
  uint64_t nclusters;
  bool ok;
};

static void *
evict_thread (void *arg)
{
  struct evict *p = arg;
  const uint64_t cs = 64 * KiB;
  char name[32];
  uint64_t c[EVICT_CLUSTERS];
  unsigned char *want = calloc (EVICT_CLUSTERS, cs), *buf = malloc (cs);
  struct rng r;

  snprintf (name, sizeof name, "evict-%u", p->id);
  r = rng_for (name);
  p->ok = want && buf;
  for (unsigned i = 0; i < EVICT_CLUSTERS; i++)   /* distinct, this thread's */
    c[i] = (rnd_below (&r, p->nclusters / p->nthreads / EVICT_CLUSTERS) *
            EVICT_CLUSTERS + i) * p->nthreads + p->id;
  for (unsigned op = 0; p->ok && op < 3000; op++) {
    unsigned i = rnd_below (&r, EVICT_CLUSTERS);
    uint64_t start = rnd_below (&r, cs), len = 1 + rnd_below (&r, cs - start);
    unsigned char *w = want + i * cs;
    unsigned kind = rnd_below (&r, 20);
    int ret;
    if (kind < 8) {                       /* write */
      rnd_fill (&r, buf, len);
      ret = qcow_write (p->q, buf, len, c[i] * cs + start, 0);
      if (ret == 0)
        memcpy (w + start, buf, len);
    }
    else if (kind < 18) {                 /* read */
      ret = qcow_read (p->q, buf, len, c[i] * cs + start);
      if (ret == 0)
        p->ok = CHECK (memcmp (buf, w + start, len) == 0, "thread %u: "
                       "cluster %" PRIu64 " [%" PRIu64 ", +%" PRIu64 ") "
                       "differs (op %u)", p->id, c[i], start, len, op);
    }
    else if (kind == 18) {                /* trim the whole cluster */
      ret = qcow_discard (p->q, cs, c[i] * cs, 0);
      if (ret == 0)
        memset (w, 0, cs);
    }
    else
      ret = qcow_flush (p->q);
    if (p->ok)
      p->ok = CHECK (ret == 0, "thread %u: op %u: %s", p->id, op, strerror (-ret));
  }
  for (unsigned i = 0; p->ok && i < EVICT_CLUSTERS; i++) {
    int ret = qcow_read (p->q, buf, cs, c[i] * cs);
    p->ok = CHECK (ret == 0 && memcmp (buf, want + i * cs, cs) == 0,
                   "thread %u: cluster %" PRIu64 " differs at the end", p->id, c[i]);
  }
  free (want);
  free (buf);
  return NULL;
}

static void
test_parallel_evict (void)
{
  const char *path = path_in_tmp ("evict.qcow2");
  struct qcow_create_opts opts;
  struct qcow *q;
  pthread_t th[PAR_THREADS];
  struct evict p[PAR_THREADS];
  struct qcow_stats st;

  qcow_create_opts_default (&opts);
  opts.size = 4096 * MiB;                  /* 128 slices of 4 KiB */
  opts.cluster_bits = 16;
  if (!create_image (path, &opts) ||
      (q = open_image_cache (path, false, 1)) == NULL)
    goto out;
  for (unsigned i = 0; i < PAR_THREADS; i++) {
    p[i] = (struct evict) { q, i, PAR_THREADS, opts.size >> 16, false };
    pthread_create (&th[i], NULL, evict_thread, &p[i]);
  }
  for (unsigned i = 0; i < PAR_THREADS; i++)
    pthread_join (th[i], NULL);
  for (unsigned i = 0; i < PAR_THREADS; i++)
    CHECK (p[i].ok, "thread %u failed", i);
  qcow_get_stats (q, &st);
  CHECK (st.l2_cache_misses > 1000, "only %" PRIu64 " L2 cache misses: the "
         "cache was not small", st.l2_cache_misses);
  if (close_image (q)) {
    const char *check[] = { "qemu-img", "check", "-q", "-f", "qcow2", path, NULL };
    CHECK (run (NULL, check) == 0, "qemu-img check %s is not clean", path);
  }
 out:
  unlink (path);
}

/* ------------------------------------------------------------------------
 * Main.
 */

static const struct {
  const char *name;
  void (*fn) (void);
} tests[] = {
  { "create", test_create },
  { "bounds", test_bounds },
  { "formats", test_formats },
  { "resize", test_resize },
  { "refcount-growth", test_refcount_growth },
  { "parallel", test_parallel },
  { "parallel-evict", test_parallel_evict },
};

static bool
selected (const char *name, int argc, char **argv)
{
  if (argc <= 1)
    return true;
  for (int i = 1; i < argc; i++)
    if (strcmp (argv[i], name) == 0)
      return true;
  return false;
}

int
main (int argc, char **argv)
{
  const char *s = getenv ("UNIT_SEED");
  unsigned failed = 0, passed = 0;

  setvbuf (stdout, NULL, _IOLBF, 0);
  seed = s && *s ? strtoull (s, NULL, 0)
                 : (uint64_t) time (NULL) ^ ((uint64_t) getpid () << 32);
  printf ("unit-core: seed %" PRIu64 " (UNIT_SEED=%" PRIu64 " repeats it)\n",
          seed, seed);
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    return 1;
  }
  qcow_set_error_handler (on_error);

  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    time_t t0 = time (NULL);
    if (!selected (tests[i].name, argc, argv))
      continue;
    current = tests[i].name;
    failed_checks = 0;
    printf ("--- %s\n", current);
    tests[i].fn ();
    printf ("%s %s (%lds)\n", failed_checks ? "FAIL" : "PASS", current,
            (long) (time (NULL) - t0));
    if (failed_checks)
      failed++;
    else
      passed++;
  }

  nftw (tmpdir, remove_one, 16, FTW_DEPTH | FTW_PHYS);
  printf ("unit-core: %u passed, %u failed", passed, failed);
  if (failed)
    printf (" (seed %" PRIu64 ")", seed);
  printf ("\n");
  return failed ? 1 : 0;
}

/* nbdkit-qcow-plugin: the nbdkit shim.  It only translates: parameters to
 * the core's config, callbacks to core calls, -errno to nbdkit errors. */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow.h"

/* Every connection uses the one shared image, so handles go unused. */
#define UNUSED __attribute__ ((unused))

/* -D qcow.verbose=1: core debug messages; -D qcow.stats=1: stats at exit */
NBDKIT_DLL_PUBLIC int qcow_debug_verbose = 0;
NBDKIT_DLL_PUBLIC int qcow_debug_stats = 0;

static char *filename;                  /* file= */
static int create_mode;                 /* 0, 1 = create=true, 2 = create=force */
static int64_t create_size = -1;        /* size= */
static int64_t cluster_size = 65536;    /* cluster-size= */
static int lazy_refcounts = 1;          /* lazy-refcounts= */
static char *backing_file;             /* backing-file= */
static bool check_on_connect;           /* check-on-connect= */
static struct qcow_config config;
static struct qcow *image;              /* one image shared by every connection */

static void error_handler (const char *msg) { nbdkit_error ("%s", msg); }
static void debug_handler (const char *msg)
{
  if (qcow_debug_verbose)
    nbdkit_debug ("%s", msg);
}

static void
plugin_load (void)
{
  qcow_config_default (&config);
  qcow_set_error_handler (error_handler);
  qcow_set_debug_handler (debug_handler);
}

static void
print_stats (void)
{
  struct qcow_stats st;
  qcow_get_stats (image, &st);
  nbdkit_debug ("stats: reads=%" PRIu64 " writes=%" PRIu64 " flushes=%" PRIu64
                " clusters_allocated=%" PRIu64 " discarded=%" PRIu64
                " erased=%" PRIu64 " freed=%" PRIu64 " bytes_punched=%" PRIu64
                " l2_cache_hits=%" PRIu64 " l2_cache_misses=%" PRIu64
                " metadata_writes=%" PRIu64 " compacted=%" PRIu64
                " compactions=%" PRIu64,
                st.reads, st.writes, st.flushes, st.clusters_allocated,
                st.discarded, st.erased, st.freed, st.bytes_punched,
                st.l2_cache_hits, st.l2_cache_misses, st.metadata_writes,
                st.compacted, st.compactions);
}

static void
plugin_unload (void)
{
  if (image && qcow_debug_stats)
    print_stats ();
  if (image)
    qcow_disconnect (image);
  image = NULL;
  free (filename);
  free (backing_file);
}

static int
plugin_config (const char *key, const char *value)
{
  int b;
  if (strcmp (key, "file") == 0) {
    free (filename);
    filename = NULL;
    if (access (value, F_OK) == 0)
      filename = nbdkit_realpath (value);
    else if (value[0] == '/')         /* create=true: need not exist yet */
      filename = strdup (value);
    else {
      char *cwd = get_current_dir_name ();
      if (cwd && asprintf (&filename, "%s/%s", cwd, value) == -1)
        filename = NULL;
      free (cwd);
    }
    if (!filename) {
      nbdkit_error ("%s: %m", value);
      return -1;
    }
  }
  else if (strcmp (key, "create") == 0) {
    if (strcmp (value, "force") == 0)
      create_mode = 2;
    else if ((b = nbdkit_parse_bool (value)) == -1)
      return -1;
    else
      create_mode = b;
  }
  else if (strcmp (key, "size") == 0) {
    if ((create_size = nbdkit_parse_size (value)) == -1)
      return -1;
  }
  else if (strcmp (key, "cluster-size") == 0) {
    cluster_size = nbdkit_parse_size (value);
    if (cluster_size == -1)
      return -1;
    if (cluster_size < 512 || cluster_size > 2 * 1024 * 1024 ||
        (cluster_size & (cluster_size - 1)) != 0) {
      nbdkit_error ("cluster-size must be a power of 2 between 512 and 2M");
      return -1;
    }
  }
  else if (strcmp (key, "lazy-refcounts") == 0) {
    if ((lazy_refcounts = nbdkit_parse_bool (value)) == -1)
      return -1;
  }
  else if (strcmp (key, "compact-after-unmaps") == 0) {
    int64_t v = nbdkit_parse_size (value);
    if (v == -1)
      return -1;
    config.compact_after_unmaps = v;
  }
  else if (strcmp (key, "keep-erased") == 0) {
    int64_t v = nbdkit_parse_size (value);
    if (v == -1)
      return -1;
    config.keep_erased = v;
  }
  else if (strcmp (key, "backing") == 0) {
    if ((b = nbdkit_parse_bool (value)) == -1)
      return -1;
    config.no_backing = !b;
  }
  else if (strcmp (key, "backing-file") == 0) {
    free (backing_file);
    if (!(backing_file = nbdkit_realpath (value)))
      return -1;
    config.backing_file = backing_file;
  }
  else if (strcmp (key, "backing-format") == 0) {
    if (strcmp (value, "qcow2") != 0 && strcmp (value, "raw") != 0) {
      nbdkit_error ("backing-format must be qcow2 or raw");
      return -1;
    }
    config.backing_format = strcmp (value, "raw") == 0 ? "raw" : "qcow2";
  }
  else if (strcmp (key, "check-on-connect") == 0) {
    if ((b = nbdkit_parse_bool (value)) == -1)
      return -1;
    check_on_connect = b;
  }
  else if (strcmp (key, "runtime-asserts") == 0) {
    if ((b = nbdkit_parse_bool (value)) == -1)
      return -1;
    config.runtime_asserts = b;
  }
  else if (strcmp (key, "locking") == 0) {
    if ((b = nbdkit_parse_bool (value)) == -1)
      return -1;
    config.locking = b;
  }
  else if (strcmp (key, "discard") == 0) {
    if ((b = nbdkit_parse_bool (value)) == -1)
      return -1;
    config.discard = b;
  }
  else {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  return 0;
}

static int
plugin_config_complete (void)
{
  if (!filename) {
    nbdkit_error ("you must supply the file=<FILENAME> parameter");
    return -1;
  }
  if (create_mode) {
    if (create_size < 0) {
      nbdkit_error ("create=%s needs size=SIZE", create_mode == 2 ? "force" : "true");
      return -1;
    }
    struct qcow_create_opts o;
    qcow_create_opts_default (&o);
    o.size = create_size;
    o.cluster_bits = __builtin_ctzll (cluster_size);
    o.lazy_refcounts = lazy_refcounts;
    int r = qcow_create (filename, &o, create_mode == 2);
    if (r == -EEXIST)
      nbdkit_error ("%s: use create=force to overwrite it", filename);
    if (r < 0)
      return -1;
    char *real = nbdkit_realpath (filename);
    if (!real)
      return -1;
    free (filename);
    filename = real;
  }
  else if (create_size >= 0) {
    nbdkit_error ("size= is only used with create=true");
    return -1;
  }
  return 0;
}

#define plugin_config_help \
  "[file=]<FILENAME>     (required) The qcow2 image to serve.\n" \
  "create=true|force     Create the image first (force: overwrite).\n" \
  "size=<SIZE>           Virtual size of the new image (with create=).\n" \
  "cluster-size=<SIZE>   Cluster size of the new image (default 64K).\n" \
  "lazy-refcounts=BOOL   Lazy refcounts in the new image (default true).\n" \
  "discard=BOOL          Honour trim requests (default true).\n" \
  "locking=false         Do not lock the image as QEMU does.\n" \
  "check-on-connect=true Check the image at start-up; refuse it if corrupt.\n" \
  "runtime-asserts=true  Check the whole image after every flush (slow).\n" \
  "backing=false         Refuse images that name a backing file.\n" \
  "backing-file=<PATH>   Use this backing file instead of the header's.\n" \
  "backing-format=qcow2|raw  Its format (unrecorded formats open as raw).\n" \
  "compact-after-unmaps=<SIZE>  Compact in the background once SIZE was freed.\n" \
  "keep-erased=<SIZE>    Free space compaction keeps at the end of the file."

/* Was nbdkit started with -r?  Plugins are not told before the first
 * connection, but the image is opened (and locked, QEMU-style) before it,
 * so look at nbdkit's own command line.  Short options that take an
 * argument, and long ones that take it in the next word, are skipped. */
static bool
started_readonly (void)
{
  static const char *long_with_arg[] = {
    "--debug", "--exportname", "--filter", "--group", "--ipaddr", "--log",
    "--mask-handshake", "--pidfile", "--port", "--run", "--selinux-label",
    "--threads", "--tls", "--tls-certificates", "--tls-psk", "--unix",
    "--user", NULL
  };
  char buf[65536];
  FILE *fp = fopen ("/proc/self/cmdline", "r");
  if (!fp)
    return false;
  size_t n = fread (buf, 1, sizeof buf - 1, fp);
  fclose (fp);
  buf[n] = '\0';
  bool ro = false, skip = false;
  for (size_t i = 0; i < n; i += strlen (buf + i) + 1) {
    const char *a = buf + i;
    if (i == 0 || skip) {               /* argv[0], or an option's argument */
      skip = false;
      continue;
    }
    if (strcmp (a, "--") == 0)
      break;
    if (strcmp (a, "--readonly") == 0 || strcmp (a, "--read-only") == 0)
      ro = true;
    else if (a[0] == '-' && a[1] == '-') {
      for (size_t k = 0; long_with_arg[k]; k++)
        if (strcmp (a, long_with_arg[k]) == 0)
          skip = true;
    }
    else if (a[0] == '-' && a[1]) {
      for (const char *c = a + 1; *c; c++) {
        if (*c == 'r')
          ro = true;
        if (strchr ("DegiPptUu", *c)) { /* takes an argument */
          skip = c[1] == '\0';
          break;
        }
      }
    }
  }
  return ro;
}

/* Open and validate the image before the first client: a bad image stops
 * nbdkit at start-up.  With -r it is opened read-only; otherwise writable
 * if the file allows, and nothing is written until a client writes. */
static int
plugin_get_ready (void)
{
  config.read_only = started_readonly ();
  if (qcow_connect (filename, &config, &image) < 0)
    return -1;
  /* Serving read-write: hold QEMU's write locks from now on, so QEMU's
   * tools see the image as in use (the first client would take them
   * anyway). */
  if (!config.read_only && qcow_lock_write (image) < 0)
    return -1;
  if (check_on_connect) {
    struct qcow_check_result cr;
    if (qcow_check (image, &cr, NULL, NULL) < 0)
      return -1;
    /* A dirty image's refcounts are stale by design (lazy refcounts):
     * they are rebuilt before the first write, so only the other kinds
     * of problem count against it. */
    uint64_t bad = cr.corruptions;
    uint64_t stale = cr.problems[QCOW_PROBLEM_REFCOUNT] + cr.problems[QCOW_PROBLEM_COPIED];
    if (cr.dirty)
      bad = bad > stale ? bad - stale : 0;
    if (bad > 0 || cr.verdict == QCOW_CHECK_FAILED) {
      nbdkit_error ("%s: check-on-connect: %s (%" PRIu64 " corruptions, %"
                    PRIu64 " leaked clusters); repair it with qcow-tool repair",
                    filename, cr.verdict == QCOW_CHECK_FAILED ? cr.reason
                    : "image is corrupt", cr.corruptions, cr.leaks);
      return -1;
    }
    nbdkit_debug ("%s: check-on-connect: %s, %" PRIu64 " leaked clusters",
                  filename, cr.verdict == QCOW_CHECK_CLEAN ? "clean" : "leaks only",
                  cr.leaks);
  }
  struct qcow_info info;
  qcow_get_info (image, &info);
  struct qcow_header h;
  qcow_get_header (image, &h);
  if (h.incompatible_features & QCOW_INCOMPAT_CORRUPT)
    nbdkit_error ("%s: image is marked corrupt: serving it read-only", filename);
  nbdkit_debug ("%s: qcow2 v%u, %" PRIu64 " bytes, %u-byte clusters, %s",
                filename, h.version, info.size, info.cluster_size,
                info.read_write ? "read-write" : "read-only");
  return 0;
}

/* Threads must start after nbdkit forks into the background. */
static int
plugin_after_fork (void)
{
  return qcow_start_background (image) < 0 ? -1 : 0;
}

static void
plugin_dump_plugin (void)
{
  printf ("qcow_version=%s\n", QCOW_LIB_VERSION);
  printf ("qcow_formats=qcow2-v2,qcow2-v3\n");
  printf ("qcow_cluster_sizes=512-2M\n");
  printf ("qcow_refcount_bits=1,2,4,8,16,32,64\n");
  printf ("qcow_features=lazy-refcounts,dirty-bit,corrupt-bit,zero-clusters,"
          "extents,fua,multi-conn,trim,zero,fast-zero,compaction,compressed,backing,snapshots,extended-l2,data-file,check,create,locking\n");
}

/* The write locks were taken at start-up unless nbdkit runs with -r
 * (taking them is idempotent). */
static void *
plugin_open (int readonly)
{
  if (!readonly && qcow_lock_write (image) < 0)
    return NULL;
  return image;                 /* the shared image is the handle */
}

static int64_t
plugin_get_size (void *handle UNUSED)
{
  struct qcow_info info;
  qcow_get_info (image, &info);
  return info.size;
}

static int
plugin_can_write (void *handle UNUSED)
{
  struct qcow_info info;
  qcow_get_info (image, &info);
  return info.read_write;
}

static int plugin_can_multi_conn (void *handle UNUSED) { return 1; }
static int plugin_can_flush (void *handle UNUSED) { return 1; }
static int plugin_can_fua (void *handle UNUSED) { return NBDKIT_FUA_NATIVE; }
static int plugin_can_extents (void *handle UNUSED) { return 1; }
static int plugin_can_trim (void *handle UNUSED) { return 1; }
static int plugin_can_zero (void *handle UNUSED) { return 1; }
static int plugin_can_fast_zero (void *handle UNUSED) { return 1; }

/* Core errors are -errno; the message has already gone to nbdkit_error. */
static int
ret (int r)
{
  if (r >= 0)
    return 0;
  nbdkit_set_error (-r);
  return -1;
}

static int
plugin_pread (void *handle UNUSED, void *buf, uint32_t count, uint64_t offset,
            uint32_t flags UNUSED)
{
  return ret (qcow_read (image, buf, count, offset));
}

static int
plugin_pwrite (void *handle UNUSED, const void *buf, uint32_t count, uint64_t offset,
             uint32_t flags)
{
  return ret (qcow_write (image, buf, count, offset,
                          flags & NBDKIT_FLAG_FUA ? QCOW_FUA : 0));
}

static int
plugin_trim (void *handle UNUSED, uint32_t count, uint64_t offset, uint32_t flags)
{
  return ret (qcow_discard (image, count, offset,
                            flags & NBDKIT_FLAG_FUA ? QCOW_FUA : 0));
}

static int
plugin_zero (void *handle UNUSED, uint32_t count, uint64_t offset,
              uint32_t flags)
{
  unsigned f = (flags & NBDKIT_FLAG_FUA ? QCOW_FUA : 0) |
               (flags & NBDKIT_FLAG_MAY_TRIM ? QCOW_MAY_TRIM : 0) |
               (flags & NBDKIT_FLAG_FAST_ZERO ? QCOW_FAST_ZERO : 0);
  return ret (qcow_zero (image, count, offset, f));
}

static int
plugin_flush (void *handle UNUSED, uint32_t flags UNUSED)
{
  return ret (qcow_flush (image));
}

static int
plugin_extents (void *handle UNUSED, uint32_t count, uint64_t offset, uint32_t flags,
              struct nbdkit_extents *extents)
{
  uint64_t end = offset + count;
  while (offset < end) {
    uint64_t len;
    unsigned f;
    int r = qcow_map (image, offset, end - offset, &len, &f);
    if (r < 0)
      return ret (r);
    uint32_t type = (f & QCOW_EXTENT_HOLE ? NBDKIT_EXTENT_HOLE : 0) |
                    (f & QCOW_EXTENT_ZERO ? NBDKIT_EXTENT_ZERO : 0);
    if (nbdkit_add_extent (extents, offset, len, type) == -1)
      return -1;
    offset += len;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name              = "qcow",
  .longname          = "nbdkit qcow2 plugin",
  .version           = QCOW_LIB_VERSION,
  .description       = "Serve a qcow2 disk image read-write",
  .load              = plugin_load,
  .unload            = plugin_unload,
  .config            = plugin_config,
  .config_complete   = plugin_config_complete,
  .config_help       = plugin_config_help,
  .magic_config_key  = "file",
  .get_ready         = plugin_get_ready,
  .after_fork        = plugin_after_fork,
  .dump_plugin       = plugin_dump_plugin,
  .open              = plugin_open,
  .get_size          = plugin_get_size,
  .can_write         = plugin_can_write,
  .can_multi_conn    = plugin_can_multi_conn,
  .can_flush         = plugin_can_flush,
  .can_fua           = plugin_can_fua,
  .can_extents       = plugin_can_extents,
  .can_trim          = plugin_can_trim,
  .can_zero          = plugin_can_zero,
  .can_fast_zero     = plugin_can_fast_zero,
  .pread             = plugin_pread,
  .pwrite            = plugin_pwrite,
  .flush             = plugin_flush,
  .trim              = plugin_trim,
  .zero              = plugin_zero,
  .extents           = plugin_extents,
  .errno_is_preserved = 0,
};

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
NBDKIT_REGISTER_PLUGIN (plugin)

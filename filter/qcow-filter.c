/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qcow-filter: the plugin below holds a qcow2 image; clients see
 * its virtual disk.  Like the plugin shim, it only translates: the
 * plugin's data becomes a block backend of the core (qcow.h), requests
 * become core calls, -errno becomes nbdkit errors.
 *
 * One image state is shared by every connection: the filter opens one
 * shared context to the plugin in .after_fork (nbdkit_next_context_open
 * with shared=1), validates the image there, and never opens a context
 * per connection (callbacks get next == NULL and use the shared one).
 * The plugin's storage has a fixed size: the image lives inside it, as
 * QEMU keeps qcow2 on a block device.
 *
 * The core calls the plugin from client threads and from its background
 * thread at once.  Where nbdkit's thread model (the strictest of the
 * plugin's and the filters') is not PARALLEL, those calls are serialized
 * here, since the shared context is not one connection's. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "qcow.h"
#include "params.h"
#include "shim.h"

/* -D qcow.verbose=1: core debug messages; -D qcow.stats=1: stats at exit */
NBDKIT_DLL_PUBLIC int qcow_debug_verbose = 0;
NBDKIT_DLL_PUBLIC int qcow_debug_stats = 0;

static struct params params;            /* qcow-* */
static char *image_name;                /* the plugin's file=, absolute */
static int nfile;                       /* how many file= went by */
static char *start_dir;                 /* the directory nbdkit started in */
static nbdkit_backend *backend_early;   /* from .config_complete */
static bool validated;                  /* the image passed in .get_ready */
static struct qcow *image;              /* shared by every connection */

/* The shared context to the plugin, and what it can do. */
static nbdkit_next *plugin;
static uint64_t plugin_size;
static bool plugin_can_flush, plugin_can_trim, plugin_can_fast_zero;
static bool plugin_can_extents;
static bool serialize;                  /* thread model is not PARALLEL */
static pthread_mutex_t plugin_lock = PTHREAD_MUTEX_INITIALIZER;

/* Requests to the plugin are split at this size (what NBD servers such
 * as qemu-nbd accept at most). */
#define CHUNK (32u << 20)

static void error_handler (const char *msg) { nbdkit_error ("%s", msg); }
static void debug_handler (const char *msg)
{
  if (qcow_debug_verbose)
    nbdkit_debug ("%s", msg);
}

static void
filter_load (void)
{
  params_init (&params);
  qcow_set_error_handler (error_handler);
  qcow_set_debug_handler (debug_handler);
}

static void
filter_unload (void)
{
  params_free (&params);
  free (image_name);
  free (start_dir);
}

/* qcow-KEY is ours; everything else goes to the plugin.  The file
 * plugin's file= is noted on its way: the image's name in messages, and
 * where relative backing file names resolve, as QEMU resolves them (not
 * when several go by, as with the split plugin: which one holds the
 * header is the plugin's business). */
static int
filter_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
               const char *key, const char *value)
{
  if (strncmp (key, "qcow-", 5) == 0) {
    int r = params_config (&params, key + 5, value);
    if (r == 0)
      nbdkit_error ("unknown parameter '%s'", key);
    return r == 1 ? 0 : -1;
  }
  if (strcmp (key, "file") == 0 && nfile++ == 0 &&
      !(image_name = nbdkit_absolute_path (value)))
    return -1;
  return next (nxdata, key, value);
}

static int
filter_config_complete (nbdkit_next_config_complete *next,
                        nbdkit_backend *nxdata)
{
  static int instances;
  if (++instances > 1) {
    nbdkit_error ("the qcow filter can be used only once in a chain");
    return -1;
  }
  if (params_config_complete (&params, "qcow-") < 0)
    return -1;
  if (nfile > 1) {
    free (image_name);
    image_name = NULL;
  }
  backend_early = nxdata;
  /* nbdkit may change directory when it forks into the background. */
  if (!image_name && !(start_dir = get_current_dir_name ())) {
    nbdkit_error ("getcwd: %m");
    return -1;
  }
  params.config.base_dir = image_name ? NULL : start_dir;
  return next (nxdata);
}

#define filter_config_help \
  PARAMS_HELP ("qcow-")

/* ---- the plugin as the core's block backend ---- */

static void lock_plugin (void) { if (serialize) pthread_mutex_lock (&plugin_lock); }
static void unlock_plugin (void) { if (serialize) pthread_mutex_unlock (&plugin_lock); }

/* -errno of a failed call to the plugin. */
static int
failed (int err)
{
  return -(err ? err : EIO);
}

static int
next_pread (void *opaque, void *buf, size_t count, uint64_t offset)
{
  uint8_t *p = buf;
  /* Past the end of the storage reads as zeros (the core's contract). */
  uint64_t avail = offset < plugin_size ? plugin_size - offset : 0;
  if (count > avail) {
    memset (p + avail, 0, count - avail);
    count = avail;
  }
  while (count > 0) {
    uint32_t n = count > CHUNK ? CHUNK : count;
    int err = 0, r;
    lock_plugin ();
    r = plugin->pread (plugin, p, n, offset, 0, &err);
    unlock_plugin ();
    if (r == -1)
      return failed (err);
    p += n; offset += n; count -= n;
  }
  return 0;
}

static int
next_pwrite (void *opaque, const void *buf, size_t count, uint64_t offset)
{
  const uint8_t *p = buf;
  if (offset > plugin_size || count > plugin_size - offset)
    return -ENOSPC;
  while (count > 0) {
    uint32_t n = count > CHUNK ? CHUNK : count;
    int err = 0, r;
    lock_plugin ();
    r = plugin->pwrite (plugin, p, n, offset, 0, &err);
    unlock_plugin ();
    if (r == -1)
      return failed (err);
    p += n; offset += n; count -= n;
  }
  return 0;
}

static int
next_flush (void *opaque)
{
  if (!plugin_can_flush)
    return 0;
  int err = 0, r;
  lock_plugin ();
  r = plugin->flush (plugin, 0, &err);
  unlock_plugin ();
  return r == -1 ? failed (err) : 0;
}

static int
next_get_size (void *opaque, uint64_t *size)
{
  *size = plugin_size;
  return 0;
}

/* Freed space goes down with the plugin's trim, or its zero where that
 * is fast and may trim. */
static int
next_discard (void *opaque, uint64_t offset, uint64_t count)
{
  while (count > 0) {
    uint32_t n = count > (1u << 30) ? 1u << 30 : count;
    int err = 0, r;
    lock_plugin ();
    if (plugin_can_trim)
      r = plugin->trim (plugin, n, offset, 0, &err);
    else
      r = plugin->zero (plugin, n, offset,
                        NBDKIT_FLAG_MAY_TRIM | NBDKIT_FLAG_FAST_ZERO, &err);
    unlock_plugin ();
    if (r == -1)
      return failed (err);
    offset += n; count -= n;
  }
  return 0;
}

/* Where the plugin's data reads as zeros to its end: the image's new
 * clusters there need no zeros written (qcow_backend_ops.zero_tail; only
 * for a plugin with extents). */
static int
next_zero_tail (void *opaque, uint64_t *start)
{
  uint64_t off = 0, data_end = 0;
  while (off < plugin_size) {
    uint32_t n = plugin_size - off > (1u << 30) ? 1u << 30 : plugin_size - off;
    int err = 0;
    lock_plugin ();
    struct nbdkit_extents *x = nbdkit_extents_full (plugin, n, off, 0, &err);
    unlock_plugin ();
    if (!x)
      return failed (err);
    for (size_t i = 0; i < nbdkit_extents_count (x); i++) {
      struct nbdkit_extent e = nbdkit_get_extent (x, i);
      if (!(e.type & NBDKIT_EXTENT_ZERO))
        data_end = e.offset + e.length;
    }
    nbdkit_extents_free (x);
    off += n;
  }
  *start = data_end;
  return 0;
}

/* Open a shared context; fill in what the plugin can do.  -1 with
 * plugin still NULL if the context cannot be opened at all. */
static int
open_plugin (nbdkit_backend *backend)
{
  int r;
  nbdkit_next *n = nbdkit_next_context_open (backend, params.config.read_only, "", 1);
  if (!n)
    return -1;
  if (n->prepare (n) == -1) {
    n->finalize (n);
    nbdkit_next_context_close (n);
    return -1;
  }
  plugin = n;
  int64_t size = plugin->get_size (plugin);
  if (size == -1)
    return -1;
  plugin_size = size;
  if ((r = plugin->can_write (plugin)) == -1)
    return -1;
  if (r == 0)
    params.config.read_only = true;
  if (!params.config.read_only) {
    int flush = plugin->can_flush (plugin), trim = plugin->can_trim (plugin);
    int fast_zero = plugin->can_fast_zero (plugin);
    if (flush == -1 || trim == -1 || fast_zero == -1)
      return -1;
    plugin_can_flush = flush;
    plugin_can_trim = trim;
    plugin_can_fast_zero = fast_zero && plugin->can_zero (plugin) > 0;
    plugin_can_extents = plugin->can_extents (plugin) == 1;
  }
  return 0;
}

static void
close_plugin (void)
{
  if (plugin) {
    plugin->finalize (plugin);
    nbdkit_next_context_close (plugin);
    plugin = NULL;
  }
}

static const char *
name (void)
{
  return image_name ? image_name : "qcow filter: the plugin's data";
}

/* Does the plugin's data start with a qcow2 header? */
static int
holds_qcow2 (bool *yes)
{
  uint8_t magic[4];
  int r = next_pread (NULL, magic, sizeof magic, 0);
  if (r < 0) {
    nbdkit_error ("%s: read: %s", name (), strerror (-r));
    return -1;
  }
  *yes = memcmp (magic, "QFI\xfb", 4) == 0;
  return 0;
}

/* Open the image on the plugin's data, FIRST: create it if asked, and
 * run the start-up checks. */
static int
open_image (bool first)
{
  struct qcow_backend_ops ops = {
    .pread = next_pread, .get_size = next_get_size,
  };
  struct qcow_backend *b;
  if (!params.config.read_only) {
    ops.pwrite = next_pwrite;
    ops.flush = next_flush;
    if (plugin_can_trim || plugin_can_fast_zero)
      ops.discard = next_discard;
    if (plugin_can_extents)
      ops.zero_tail = next_zero_tail;
  }
  if (qcow_backend_new (&ops, NULL, name (), &b) < 0)
    return -1;
  if (first && params.create_mode) {
    bool exists;
    if (params.config.read_only) {
      nbdkit_error ("%s: qcow-create: the plugin's data is read-only", name ());
      goto fail;
    }
    if (holds_qcow2 (&exists) < 0)
      goto fail;
    if (exists && params.create_mode != 2) {
      nbdkit_error ("%s: qcow-create=true: the plugin's data already holds a "
                    "qcow2 image (use qcow-create=force to overwrite it)", name ());
      goto fail;
    }
    struct qcow_create_opts o;
    params_create_opts (&params, &o);
    if (qcow_create_backend (b, &o) < 0)
      goto fail;
  }
  if (qcow_connect_backend (b, &params.config, &image) < 0)
    return -1;
  if (first)
    return params_ready (&params, image, name ());
  return params.config.read_only ? 0 : qcow_lock_write (image) < 0 ? -1 : 0;
 fail:
  qcow_backend_free (b);
  return -1;
}

static void
close_image (void)
{
  if (image) {
    if (qcow_debug_stats)
      shim_print_stats (image);
    qcow_disconnect (image);
    image = NULL;
  }
  close_plugin ();
}

/* Validate (or create) the image before nbdkit forks into the background,
 * so that a bad image stops nbdkit with exit status 1 in every mode: a
 * context opened now, with the backend .config_complete saw, is closed
 * again before the fork (the threads of plugins such as nbd do not
 * survive it).  A plugin that cannot be opened this early (nbd with
 * shared=true) is checked in .after_fork instead. */
static int
filter_get_ready (int thread_model)
{
  serialize = thread_model != NBDKIT_THREAD_MODEL_PARALLEL;
  /* A snapshot is served read-only (qemu-nbd -l). */
  params.config.read_only = params_started_readonly () || params.config.snapshot;
  if (open_plugin (backend_early) < 0) {
    if (plugin) {
      close_plugin ();
      return -1;
    }
    nbdkit_debug ("qcow: the plugin cannot be opened before the fork: the "
                  "image is checked once nbdkit serves");
    return 0;
  }
  int r = open_image (true);
  close_image ();
  validated = r == 0;
  return r;
}

/* The image for good: one shared context to the plugin for all
 * connections, and the core's background thread. */
static int
filter_after_fork (nbdkit_backend *backend)
{
  if (open_plugin (backend) < 0) {
    if (!plugin)
      nbdkit_error ("%s: cannot open the plugin below the qcow filter", name ());
    return -1;
  }
  if (open_image (!validated) < 0)
    return -1;
  return qcow_start_background (image) < 0 ? -1 : 0;
}

/* The image is closed (flushed, marked clean) before the plugin. */
static void
filter_cleanup (nbdkit_backend *backend)
{
  close_image ();
}

/* ---- connections: every one uses the shared image ---- */

static void *
filter_open (nbdkit_next_open *next, nbdkit_context *nxdata, int readonly,
             const char *exportname, int is_tls)
{
  if (!readonly && qcow_lock_write (image) < 0)
    return NULL;
  return image;
}

static int64_t
filter_get_size (nbdkit_next *next, void *handle)
{
  struct qcow_info info;
  qcow_get_info (image, &info);
  return info.size;
}

static const char *
filter_export_description (nbdkit_next *next, void *handle)
{
  return NULL;
}

static int
filter_block_size (nbdkit_next *next, void *handle, uint32_t *minimum,
                   uint32_t *preferred, uint32_t *maximum)
{
  *minimum = *preferred = *maximum = 0;         /* no constraints */
  return 0;
}

static int
filter_can_write (nbdkit_next *next, void *handle)
{
  struct qcow_info info;
  qcow_get_info (image, &info);
  return info.read_write;
}

static int filter_is_rotational (nbdkit_next *n, void *h) { return 0; }
static int filter_can_flush (nbdkit_next *n, void *h) { return 1; }
static int filter_can_trim (nbdkit_next *n, void *h) { return 1; }
static int filter_can_zero (nbdkit_next *n, void *h) { return NBDKIT_ZERO_NATIVE; }
static int filter_can_fast_zero (nbdkit_next *n, void *h) { return 1; }
static int filter_can_extents (nbdkit_next *n, void *h) { return 1; }
static int filter_can_fua (nbdkit_next *n, void *h) { return NBDKIT_FUA_NATIVE; }
static int filter_can_multi_conn (nbdkit_next *n, void *h) { return 1; }
static int filter_can_cache (nbdkit_next *n, void *h) { return NBDKIT_CACHE_NONE; }

/* Core errors are -errno; the message has already gone to nbdkit_error. */
static int
ret (int r, int *err)
{
  if (r >= 0)
    return 0;
  *err = -r;
  return -1;
}

static int
filter_pread (nbdkit_next *next, void *handle, void *buf, uint32_t count,
              uint64_t offset, uint32_t flags, int *err)
{
  return ret (qcow_read (image, buf, count, offset), err);
}

static int
filter_pwrite (nbdkit_next *next, void *handle, const void *buf,
               uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  return ret (qcow_write (image, buf, count, offset, shim_flags (flags)), err);
}

static int
filter_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  return ret (qcow_flush (image), err);
}

static int
filter_trim (nbdkit_next *next, void *handle, uint32_t count,
             uint64_t offset, uint32_t flags, int *err)
{
  return ret (qcow_discard (image, count, offset, shim_flags (flags)), err);
}

static int
filter_zero (nbdkit_next *next, void *handle, uint32_t count,
             uint64_t offset, uint32_t flags, int *err)
{
  return ret (qcow_zero (image, count, offset, shim_flags (flags)), err);
}

static int
filter_extents (nbdkit_next *next, void *handle, uint32_t count,
                uint64_t offset, uint32_t flags,
                struct nbdkit_extents *extents, int *err)
{
  return ret (shim_extents (image, count, offset, flags, extents), err);
}

static struct nbdkit_filter filter = {
  .name               = "qcow",
  .longname           = "nbdkit qcow2 filter",
  .description        = "Serve a qcow2 image held by any plugin, read-write",
  .load               = filter_load,
  .unload             = filter_unload,
  .config             = filter_config,
  .config_complete    = filter_config_complete,
  .config_help        = filter_config_help,
  .get_ready          = filter_get_ready,
  .after_fork         = filter_after_fork,
  .cleanup            = filter_cleanup,
  .open               = filter_open,
  .get_size           = filter_get_size,
  .export_description = filter_export_description,
  .block_size         = filter_block_size,
  .can_write          = filter_can_write,
  .can_flush          = filter_can_flush,
  .is_rotational      = filter_is_rotational,
  .can_trim           = filter_can_trim,
  .can_zero           = filter_can_zero,
  .can_fast_zero      = filter_can_fast_zero,
  .can_extents        = filter_can_extents,
  .can_fua            = filter_can_fua,
  .can_multi_conn     = filter_can_multi_conn,
  .can_cache          = filter_can_cache,
  .pread              = filter_pread,
  .pwrite             = filter_pwrite,
  .flush              = filter_flush,
  .trim               = filter_trim,
  .zero               = filter_zero,
  .extents            = filter_extents,
};

NBDKIT_REGISTER_FILTER (filter)

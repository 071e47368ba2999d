/* SPDX-License-Identifier: BSD-3-Clause */
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
#include "params.h"
#include "shim.h"

/* Every connection uses the one shared image, so handles go unused. */
#define UNUSED __attribute__ ((unused))

/* -D qcow.verbose=1: core debug messages; -D qcow.stats=1: stats at exit */
NBDKIT_DLL_PUBLIC int qcow_debug_verbose = 0;
NBDKIT_DLL_PUBLIC int qcow_debug_stats = 0;

static char *filename;                  /* file= */
static struct params params;
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
  params_init (&params);
  qcow_set_error_handler (error_handler);
  qcow_set_debug_handler (debug_handler);
}

static void
plugin_unload (void)
{
  if (image && qcow_debug_stats)
    shim_print_stats (image);
  if (image)
    qcow_disconnect (image);
  image = NULL;
  free (filename);
  params_free (&params);
}

static int
plugin_config (const char *key, const char *value)
{
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
    return 0;
  }
  int r = params_config (&params, key, value);
  if (r == 0)
    nbdkit_error ("unknown parameter '%s'", key);
  return r == 1 ? 0 : -1;
}

static int
plugin_config_complete (void)
{
  if (!filename) {
    nbdkit_error ("you must supply the file=<FILENAME> parameter");
    return -1;
  }
  if (params_config_complete (&params, "") < 0)
    return -1;
  if (params.create_mode) {
    struct qcow_create_opts o;
    params_create_opts (&params, &o);
    int r = qcow_create (filename, &o, params.create_mode == 2);
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
  return 0;
}

#define plugin_config_help \
  "[file=]<FILENAME>     (required) The qcow2 image to serve.\n" \
  PARAMS_HELP ("")

/* Open and validate the image before the first client: a bad image stops
 * nbdkit at start-up.  With -r it is opened read-only; otherwise writable
 * if the file allows, and nothing is written until a client writes. */
static int
plugin_get_ready (void)
{
  /* A snapshot is served read-only (qemu-nbd -l). */
  params.config.read_only = params_started_readonly () || params.config.snapshot;
  if (qcow_connect (filename, &params.config, &image) < 0)
    return -1;
  return params_ready (&params, image, filename);
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
  return ret (qcow_write (image, buf, count, offset, shim_flags (flags)));
}

static int
plugin_trim (void *handle UNUSED, uint32_t count, uint64_t offset, uint32_t flags)
{
  return ret (qcow_discard (image, count, offset, shim_flags (flags)));
}

static int
plugin_zero (void *handle UNUSED, uint32_t count, uint64_t offset,
             uint32_t flags)
{
  return ret (qcow_zero (image, count, offset, shim_flags (flags)));
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
  return ret (shim_extents (image, count, offset, flags, extents));
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

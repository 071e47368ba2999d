/* SPDX-License-Identifier: BSD-3-Clause */
/* bench/floor.c - an nbdkit plugin that does no work, for the benchmark's
 * "nbdkit floor" column: what nbdkit 1.32 itself costs for a request.
 *
 *   nbdkit bench/floor.so size=SIZE [extent=BYTES]
 *
 * The disk reads as zeros.  Block status alternates, from offset 0,
 * EXTENT bytes of data and EXTENT bytes of hole (the bench's fragmented
 * image, where every other 64 KiB cluster is allocated); without extent=
 * everything is one hole.  Write-zeroes, trim and flush do nothing. */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>
#include <stdint.h>
#include <string.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static int64_t size = -1;
static int64_t extent = 0;

static int
floor_config (const char *key, const char *value)
{
  int64_t *p = strcmp (key, "size") == 0 ? &size
             : strcmp (key, "extent") == 0 ? &extent : NULL;
  if (!p) {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  return (*p = nbdkit_parse_size (value)) < 0 ? -1 : 0;
}

static int
floor_config_complete (void)
{
  if (size < 0) {
    nbdkit_error ("size= is required");
    return -1;
  }
  return 0;
}

static void *
floor_open (int readonly)
{
  (void) readonly;
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
floor_get_size (void *h)
{
  (void) h;
  return size;
}

static int
floor_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) offset; (void) flags;
  memset (buf, 0, count);
  return 0;
}

static int
floor_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) buf; (void) count; (void) offset; (void) flags;
  return 0;
}

static int
floor_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) count; (void) offset; (void) flags;
  return 0;
}

static int
floor_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) h; (void) count; (void) offset; (void) flags;
  return 0;
}

static int
floor_flush (void *h, uint32_t flags)
{
  (void) h; (void) flags;
  return 0;
}

static int
floor_can (void *h)
{
  (void) h;
  return 1;
}

static int
floor_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
               struct nbdkit_extents *ex)
{
  (void) h; (void) flags;
  if (extent <= 0)
    return nbdkit_add_extent (ex, offset, count, NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
  uint64_t end = offset + count;
  for (uint64_t at = offset - offset % extent; at < end; at += extent) {
    uint32_t type = (at / extent) % 2 ? NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0;
    if (nbdkit_add_extent (ex, at, extent, type) == -1)
      return -1;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name              = "floor",
  .config            = floor_config,
  .config_complete   = floor_config_complete,
  .open              = floor_open,
  .get_size          = floor_get_size,
  .pread             = floor_pread,
  .pwrite            = floor_pwrite,
  .zero              = floor_zero,
  .trim              = floor_trim,
  .flush             = floor_flush,
  .can_write         = floor_can,
  .can_flush         = floor_can,
  .can_trim          = floor_can,
  .can_extents       = floor_can,
  .can_zero          = floor_can,
  .can_fast_zero     = floor_can,
  .extents           = floor_extents,
};

NBDKIT_REGISTER_PLUGIN (plugin)

/* SPDX-License-Identifier: BSD-3-Clause */
/* backing.c - backing files: a qcow2 or raw image that shows through
 * wherever the top image is unallocated, through chains of any depth up
 * to a fixed limit.  Backing files are opened read-only and never
 * written.  The format comes from the backing-format header extension (or
 * the backing-format= override); a file whose format is not recorded is
 * opened as raw, never probed: a guest could otherwise plant a qcow2
 * header in its raw disk and make us open host files. */
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define MAX_CHAIN 16

/* NAME, a file named by Q's header, resolved as QEMU does: a relative
 * name against the directory of the image (the current directory if the
 * image's name has none), or against cfg.base_dir.  Returns NULL when out of memory. */
static char *
resolve_name (struct qcow *q, const char *name)
{
  char *path = NULL, *dir;
  if (name[0] == '/')
    return strdup (name);
  if (q->cfg.base_dir)
    return asprintf (&path, "%s/%s", q->cfg.base_dir, name) == -1 ? NULL : path;
  if ((dir = strdup (q->filename)) &&
      asprintf (&path, "%s/%s", dirname (dir), name) == -1)
    path = NULL;
  free (dir);
  return path;
}

/* Open the local file PATH (read-only unless WRITE) into *BP, with the
 * lock state TO.  WHAT names it in messages. */
static int
open_local (struct qcow *q, const char *what, const char *path, bool write,
            enum qcow_lock to, struct qcow_backend **bp)
{
  int r = backend_open_file_flags (path, write ? O_RDWR : O_RDONLY, 0, bp);
  if (r < 0) {
    ERR (q, "%s %s: %s", what, path, r == -ENODEV ?
         "not a regular file or block device" : strerror (-r));
    return r;
  }
  return lock_change (q, *bp, to);
}

/* Open the backing file named by Q's header (or by the overrides in
 * Q's config).  CHAIN holds the (dev, ino) of every image above. */
int
backing_open (struct qcow *q, struct chain *chain)
{
  const char *name = q->cfg.backing_file ? q->cfg.backing_file : q->h.backing_file;
  const char *fmt = q->cfg.backing_format ? q->cfg.backing_format : q->h.backing_format;
  int r;

  if (!q->cfg.backing_file && q->h.backing_file[0] == '\0')
    return 0;
  if (q->cfg.no_backing) {
    ERR (q, "image has a backing file (%s) and backing=false", name);
    return -EPERM;
  }
  if (chain->depth + 1 >= MAX_CHAIN) {
    ERR (q, "backing chain is deeper than %d images", MAX_CHAIN);
    return -ELOOP;
  }
  if (strchr (name, ':') && !strchr (name, '/')) {
    ERR (q, "backing file '%s' names a protocol: not supported", name);
    return -ENOTSUP;
  }
  bool raw;
  if (fmt[0] == '\0' || strcmp (fmt, "raw") == 0)
    raw = true;
  else if (strcmp (fmt, "qcow2") == 0)
    raw = false;
  else {
    ERR (q, "backing file format '%s' is not supported (only qcow2 and raw)", fmt);
    return -ENOTSUP;
  }

  /* Relative names resolve against the image's directory, as QEMU does. */
  char *path = q->cfg.backing_file ? strdup (name) : resolve_name (q, name);
  if (!path)
    return -ENOMEM;
  q->backing_path = path;
  snprintf (q->backing_fmt, sizeof q->backing_fmt, "%s", raw ? "raw" : "qcow2");

  struct stat st;
  if (stat (path, &st) == -1) {
    r = -errno;
    ERR (q, "backing file %s: %s", path, strerror (errno));
    return r;
  }
  for (int i = 0; i <= chain->depth; i++)
    if (chain->dev[i] == st.st_dev && chain->ino[i] == st.st_ino) {
      ERR (q, "backing chain loops back to %s", path);
      return -ELOOP;
    }

  if (raw) {
    if ((r = open_local (q, "backing file", path, false, QCOW_LOCK_READ,
                         &q->backing_raw)) < 0)
      return r;
    return io_bsize (q->backing_raw, &q->backing_size);
  }
  struct qcow_config cfg;
  qcow_config_default (&cfg);
  cfg.read_only = true;
  cfg.cache_size = q->cfg.cache_size;
  cfg.locking = q->cfg.locking;
  chain->depth++;
  chain->dev[chain->depth] = st.st_dev;
  chain->ino[chain->depth] = st.st_ino;
  struct qcow_backend *b;
  if ((r = backend_open_file_flags (path, O_RDONLY, 0, &b)) < 0) {
    ERR (q, "backing file %s: %s", path, strerror (-r));
    chain->depth--;
    return r;
  }
  r = connect_chain (b, &cfg, chain, &q->backing);
  chain->depth--;
  if (r < 0)
    return r;
  q->backing_size = q->backing->h.size;
  return 0;
}

void
backing_close (struct qcow *q)
{
  if (q->data != q->img)
    qcow_backend_free (q->data);
  q->data = q->img;
  free (q->data_path);
  q->data_path = NULL;
  if (q->backing)
    qcow_disconnect (q->backing);
  qcow_backend_free (q->backing_raw);
  q->backing = NULL;
  q->backing_raw = NULL;
  free (q->backing_path);
  q->backing_path = NULL;
}

/* What the backing chain shows at [offset, offset+count): zeros past its
 * end. */
int
backing_read (struct qcow *q, void *buf, uint64_t count, uint64_t offset)
{
  uint64_t avail = offset < q->backing_size ? q->backing_size - offset : 0;
  uint64_t n = count < avail ? count : avail;
  int r = 0;
  if (n > 0)
    r = q->backing ? qcow_read (q->backing, buf, n, offset)
                   : io_bpread (q->backing_raw, buf, n, offset);
  if (r == 0 && n < count)
    memset ((uint8_t *) buf + n, 0, count - n);
  return r;
}

/* Block status of the backing chain at OFFSET. */
int
backing_map (struct qcow *q, uint64_t offset, uint64_t count, uint64_t *len,
             unsigned *flags)
{
  if (offset >= q->backing_size) {
    *len = count;
    *flags = QCOW_EXTENT_HOLE | QCOW_EXTENT_ZERO;
    return 0;
  }
  if (count > q->backing_size - offset)
    count = q->backing_size - offset;
  if (q->backing)
    return qcow_map (q->backing, offset, count, len, flags);
  *len = count;                 /* raw: all data */
  *flags = 0;
  return 0;
}

int
qcow_backing_info (struct qcow *q, const char **path, const char **format,
                   struct qcow **next)
{
  *path = q->backing_path;
  *format = q->backing_path ? q->backing_fmt : NULL;
  *next = q->backing;
  return q->backing_path != NULL;
}

/* Open the external data file (incompatible feature bit 2): named by the
 * header extension (relative to the image's directory) or the
 * data_file override. */
int
data_file_open (struct qcow *q)
{
  q->data = q->img;
  if (!(q->h.incompatible_features & QCOW_INCOMPAT_DATA_FILE))
    return 0;
  const char *name = q->cfg.data_file ? q->cfg.data_file : q->h.data_file;
  if (!name[0]) {
    ERR (q, "image uses an external data file but does not name it");
    return -EINVAL;
  }
  q->data_raw = q->h.autoclear_features & QCOW_AUTOCLEAR_DATA_RAW;
  if (q->data_raw && q->h.backing_file[0]) {
    ERR (q, "a raw external data file cannot be combined with a backing file");
    return -EINVAL;
  }
  q->data_path = q->cfg.data_file ? strdup (name) : resolve_name (q, name);
  if (!q->data_path)
    return -ENOMEM;
  return open_local (q, "external data file", q->data_path, !q->read_only,
                     QCOW_LOCK_DATA_READ, &q->data);
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* util.c - small helpers shared by the subcommands: zero detection and
 * the progress bar. */
#include <string.h>
#include <unistd.h>

#include "qcow.h"
#include "tool.h"

/* True if LEN bytes at BUF are all zero (memcmp of the buffer against
 * itself shifted by a word: glibc's vectorised compare does the work). */
bool
is_zero (const void *buf, size_t len)
{
  const unsigned char *p = buf;
  if (len < 16) {
    for (size_t i = 0; i < len; i++)
      if (p[i])
        return false;
    return true;
  }
  static const unsigned char z[16];
  return memcmp (p, z, 16) == 0 && memcmp (p, p + 16, len - 16) == 0;
}

void
progress_start (struct progress *p, bool wanted, uint64_t total)
{
  p->on = wanted && isatty (2);
  p->last = -1;
  p->total = total;
  progress_update (p, 0);
}

void
progress_update (struct progress *p, uint64_t done)
{
  if (!p->on)
    return;
  int percent = p->total ? (int) (done * 100 / p->total) : 100;
  if (percent > 100)
    percent = 100;
  if (percent != p->last && percent < 100)
    progress_bar (percent, &p->last);
}

void
progress_end (struct progress *p)
{
  if (p->on)
    progress_bar (100, &p->last);
  p->on = false;
}

struct qcow *
open_image (const char *file, bool write, bool force_share, const char *snapshot)
{
  struct qcow_config cfg;
  struct qcow *q;
  qcow_config_default (&cfg);
  cfg.read_only = !write;
  cfg.locking = !force_share;
  cfg.snapshot = snapshot;
  if (qcow_connect (file, &cfg, &q) < 0)
    return NULL;
  struct qcow_info info;
  qcow_get_info (q, &info);
  if (write && !info.read_write) {
    struct qcow_header h;
    qcow_get_header (q, &h);
    fail ("%s: %s", file, h.incompatible_features & QCOW_INCOMPAT_CORRUPT
          ? "image is marked corrupt: repair it first" : "cannot open the file for writing");
    qcow_disconnect (q);
    return NULL;
  }
  return q;
}

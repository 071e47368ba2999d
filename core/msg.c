/* SPDX-License-Identifier: BSD-3-Clause */
/* msg.c - the library's messages: one error handler and one debug handler
 * for the whole process (qcow_set_error_handler, qcow_set_debug_handler).
 * Every error the core reports goes through qcow_errorf as one line,
 * "FILE: what is wrong"; nothing else in the core prints.  Damaged
 * metadata found while serving is reported by qcow_corrupt, always the
 * same way (the file, the table, the offset), and fails the request with
 * EIO; what can never happen whatever the image holds is an assert(). */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

static void default_error (const char *msg) { fprintf (stderr, "qcow: %s\n", msg); }
static qcow_msg_fn error_fn = default_error, debug_fn = NULL;

void qcow_set_error_handler (qcow_msg_fn fn) { error_fn = fn ? fn : default_error; }
void qcow_set_debug_handler (qcow_msg_fn fn) { debug_fn = fn; }

void
qcow_errorf (const char *file, const char *fmt, ...)
{
  char msg[1024];
  int n = snprintf (msg, sizeof msg, "%s: ", file);
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (msg + n, sizeof msg - n, fmt, ap);
  va_end (ap);
  error_fn (msg);
}

void
qcow_debugf (const char *fmt, ...)
{
  if (!debug_fn)
    return;
  char msg[1024];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  debug_fn (msg);
}

int
qcow_corrupt (struct qcow *q, const char *table, uint64_t offset,
              const char *fmt, ...)
{
  char detail[512];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (detail, sizeof detail, fmt, ap);
  va_end (ap);
  if (offset == UINT64_MAX)
    qcow_errorf (q->filename, "corrupt image: %s: %s", table, detail);
  else
    qcow_errorf (q->filename, "corrupt image: %s at 0x%" PRIx64 ": %s",
                 table, offset, detail);
  return -EIO;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* tool.h - what the files of qcow-tool share.
 *
 * qcow-tool.c holds the dispatch table, the messages and the small
 * helpers below; each larger subcommand lives in its own file (convert.c,
 * map.c, sha.c, discard.c, commit.c, snapshot.c) and uses only the public
 * core API (core/qcow.h) and these helpers.
 *
 * Exit status of every subcommand: 0 success, 1 failure (a one-line
 * message "qcow-tool: FILE: problem" on stderr, nothing changed when a
 * command refuses before it starts); check and repair exit as qemu-img
 * check does (0, 2, 3, 1).
 */
#ifndef QCOW_TOOL_H
#define QCOW_TOOL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define PROG "qcow-tool"

/* qcow-tool.c (fail is tool_fail in the binary: the core library has
 * a fail of its own) */
#define fail tool_fail
void fail (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
int usage_error (const char *cmd, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
bool parse_size (const char *s, uint64_t *out);
const char *human_size (uint64_t n, char *buf, size_t len);
void json_string (FILE *fp, const char *s);
void text_string (FILE *fp, const char *s);
void progress_bar (int percent, void *opaque);    /* opaque: int *last, -1 */
int flush_stdout (void);

/* The subcommands in their own files: argv[0] is the program name. */
int cmd_convert (int argc, char **argv);
int cmd_map (int argc, char **argv);
int cmd_sha (int argc, char **argv);
int cmd_discard (int argc, char **argv);
int cmd_commit (int argc, char **argv);
int cmd_snapshot (int argc, char **argv);

/* pipeline.c: the ordered pipeline of convert and sha.  NEXT (main
 * thread) describes the next job (start, len, zero; len 0: no more);
 * WORK (a worker thread, not for zero jobs) prepares it; DONE (main
 * thread, in order) finishes it.  IN and OUT (if WANT_OUT) hold CHUNK
 * bytes, CLEN CHUNK / UNIT + 1 entries.  Returns 0, or -1 when a
 * callback failed (it printed why). */
struct job {
  uint64_t start, len;
  bool zero;
  uint8_t *in, *out;
  int64_t *clen;
};
typedef int (*job_fn) (void *opaque, struct job *j);
int pipeline_run (void *opaque, size_t chunk, size_t unit, bool want_out,
                  job_fn next, job_fn work, job_fn done);

/* util.c: a progress bar on standard error, drawn only when it is a
 * terminal and the user asked for it; safe to call often. */
struct progress {
  bool on;
  int last;                 /* percent last drawn */
  uint64_t total;
};
void progress_start (struct progress *p, bool wanted, uint64_t total);
void progress_update (struct progress *p, uint64_t done);
void progress_end (struct progress *p);

/* sha256.c: SHA-256 (with the x86 SHA extensions where the CPU has them). */
struct sha256 {
  uint32_t h[8];
  uint64_t len;             /* bytes hashed */
  uint8_t buf[64];
  unsigned nbuf;
};
void sha256_init (struct sha256 *s);
void sha256_update (struct sha256 *s, const void *data, size_t len);
void sha256_final (struct sha256 *s, uint8_t digest[32]);

/* util.c */
bool is_zero (const void *buf, size_t len);
/* Open FILE for a subcommand: read-only (a reader's locks, none with
 * FORCE_SHARE) or for writing (refused with a message if the file or the
 * image cannot be written); SNAPSHOT: that snapshot, read-only.  NULL
 * after a message. */
struct qcow;
struct qcow *open_image (const char *file, bool write, bool force_share,
                         const char *snapshot);

#endif /* QCOW_TOOL_H */

/* SPDX-License-Identifier: BSD-3-Clause */
/* params.h - what the nbdkit plugin and the nbdkit filter share: their
 * parameters (the filter's are the plugin's with a "qcow-" prefix),
 * creating an image, and the checks made before the first client. */
#ifndef QCOW_PARAMS_H
#define QCOW_PARAMS_H

#include <stdbool.h>
#include <stdint.h>

#include "qcow.h"

struct params {
  int create_mode;              /* 0; 1 = create=true; 2 = create=force */
  int64_t create_size;          /* size=, or -1 */
  int64_t cluster_size;         /* cluster-size= of a new image */
  int lazy_refcounts;           /* lazy-refcounts= of a new image */
  bool check_on_connect;        /* check-on-connect= */
  char *backing_file;           /* backing-file= (absolute) */
  char *data_file;              /* data-file= (absolute) */
  char *snapshot;               /* snapshot= (served read-only) */
  struct qcow_config config;    /* everything else */
};

void params_init (struct params *p);
void params_free (struct params *p);

/* KEY=VALUE, KEY without the filter's prefix.  Returns 1 if it was one
 * of ours, 0 if it is not (the caller decides), -1 on error (reported). */
int params_config (struct params *p, const char *key, const char *value);

/* After the last key: refuse combinations that make no sense.  PREFIX
 * ("" or "qcow-") names the keys in messages. */
int params_config_complete (struct params *p, const char *prefix);

/* The on-disk options of an image to create. */
void params_create_opts (const struct params *p, struct qcow_create_opts *o);

/* Was nbdkit started with -r (nbdkit tells plugins and filters only at
 * the first connection, later than the image must be opened)? */
bool params_started_readonly (void);

/* Q was just opened for serving, as NAME: take the write locks if it is
 * writable, run check-on-connect, say what is served.  -1 if it must not
 * be served (reported). */
int params_ready (const struct params *p, struct qcow *q, const char *name);

/* The parameters, for .config_help, each key preceded by P ("" or
 * "qcow-"); the columns are aligned for the plugin. */
#define PARAMS_HELP(P) \
  P "create=true|force     Create the image first (force: overwrite).\n" \
  P "size=<SIZE>           Virtual size of the new image (with create=).\n" \
  P "cluster-size=<SIZE>   Cluster size of the new image (default 64K).\n" \
  P "lazy-refcounts=BOOL   Lazy refcounts in the new image (default true).\n" \
  P "discard=BOOL          Honour trim requests (default true).\n" \
  P "locking=false         Do not lock the image as QEMU does.\n" \
  P "check-on-connect=true Check the image at start-up; refuse it if corrupt.\n" \
  P "runtime-asserts=true  Check the whole image after every flush (slow).\n" \
  P "backing=false         Refuse images that name a backing file.\n" \
  P "backing-file=<PATH>   Use this backing file instead of the header's.\n" \
  P "backing-format=qcow2|raw  Its format (unrecorded formats open as raw).\n" \
  P "data-file=<PATH>      Use this external data file instead of the header's.\n" \
  P "snapshot=<ID|NAME>    Serve this internal snapshot, read-only.\n" \
  P "compact-after-unmaps=<SIZE>  Compact in the background once SIZE was freed.\n" \
  P "compact-rate=<SIZE>   Bytes it moves a second at most (default 64M; 0: no limit).\n" \
  P "keep-erased=<SIZE>    Free space compaction keeps at the end of the file.\n" \
  P "cache-size=<SIZE>     Metadata cache (L2 tables and refcount blocks);\n" \
  P "                      default: enough L2 for the whole image, up to 32M."

#endif /* QCOW_PARAMS_H */

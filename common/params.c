/* SPDX-License-Identifier: BSD-3-Clause */
/* params.c - the parameters of the plugin and of the filter, creating an
 * image, and the checks before the first client (params.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>      /* only nbdkit's common functions */

#include "params.h"

void
params_init (struct params *p)
{
  memset (p, 0, sizeof *p);
  p->create_size = -1;
  p->cluster_size = 65536;
  p->lazy_refcounts = 1;
  qcow_config_default (&p->config);
}

void
params_free (struct params *p)
{
  free (p->backing_file);
  free (p->data_file);
  free (p->snapshot);
  p->backing_file = p->data_file = p->snapshot = NULL;
}

/* A boolean parameter into *OUT. */
static int
parse_bool (const char *value, bool *out)
{
  int b = nbdkit_parse_bool (value);
  if (b == -1)
    return -1;
  *out = b;
  return 1;
}

/* A size parameter into *OUT. */
static int
parse_size (const char *value, uint64_t *out)
{
  int64_t v = nbdkit_parse_size (value);
  if (v == -1)
    return -1;
  *out = v;
  return 1;
}

/* An existing file named by a parameter, made absolute into *OUT. */
static int
parse_path (const char *value, char **out)
{
  char *path = nbdkit_realpath (value);
  if (!path)
    return -1;
  free (*out);
  *out = path;
  return 1;
}

int
params_config (struct params *p, const char *key, const char *value)
{
  struct qcow_config *c = &p->config;
  bool b;
  int r;
  if (strcmp (key, "create") == 0) {
    if (strcmp (value, "force") == 0)
      p->create_mode = 2;
    else if (parse_bool (value, &b) == -1)
      return -1;
    else
      p->create_mode = b;
    return 1;
  }
  if (strcmp (key, "size") == 0)
    return (p->create_size = nbdkit_parse_size (value)) == -1 ? -1 : 1;
  if (strcmp (key, "cluster-size") == 0) {
    p->cluster_size = nbdkit_parse_size (value);
    if (p->cluster_size == -1)
      return -1;
    if (p->cluster_size < 512 || p->cluster_size > 2 * 1024 * 1024 ||
        (p->cluster_size & (p->cluster_size - 1)) != 0) {
      nbdkit_error ("%s must be a power of 2 between 512 and 2M", key);
      return -1;
    }
    return 1;
  }
  if (strcmp (key, "lazy-refcounts") == 0)
    return (p->lazy_refcounts = nbdkit_parse_bool (value)) == -1 ? -1 : 1;
  if (strcmp (key, "compact-after-unmaps") == 0)
    return parse_size (value, &c->compact_after_unmaps);
  if (strcmp (key, "compact-rate") == 0)
    return parse_size (value, &c->compact_rate);
  if (strcmp (key, "keep-erased") == 0)
    return parse_size (value, &c->keep_erased);
  if (strcmp (key, "cache-size") == 0) {
    if ((r = parse_size (value, &c->cache_size)) == 1 && c->cache_size == 0) {
      nbdkit_error ("%s must be more than 0", key);
      return -1;
    }
    return r;
  }
  if (strcmp (key, "backing") == 0) {
    if ((r = parse_bool (value, &b)) == 1)
      c->no_backing = !b;
    return r;
  }
  if (strcmp (key, "backing-file") == 0) {
    if ((r = parse_path (value, &p->backing_file)) == 1)
      c->backing_file = p->backing_file;
    return r;
  }
  if (strcmp (key, "backing-format") == 0) {
    if (strcmp (value, "qcow2") != 0 && strcmp (value, "raw") != 0) {
      nbdkit_error ("%s must be qcow2 or raw", key);
      return -1;
    }
    c->backing_format = strcmp (value, "raw") == 0 ? "raw" : "qcow2";
    return 1;
  }
  if (strcmp (key, "data-file") == 0) {
    if ((r = parse_path (value, &p->data_file)) == 1)
      c->data_file = p->data_file;
    return r;
  }
  if (strcmp (key, "snapshot") == 0) {
    free (p->snapshot);
    if (!(p->snapshot = strdup (value))) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    c->snapshot = p->snapshot;
    return 1;
  }
  if (strcmp (key, "check-on-connect") == 0)
    return parse_bool (value, &p->check_on_connect);
  if (strcmp (key, "runtime-asserts") == 0)
    return parse_bool (value, &c->runtime_asserts);
  if (strcmp (key, "locking") == 0)
    return parse_bool (value, &c->locking);
  if (strcmp (key, "discard") == 0)
    return parse_bool (value, &c->discard);
  return 0;
}

int
params_config_complete (struct params *p, const char *prefix)
{
  if (p->create_mode && p->create_size < 0) {
    nbdkit_error ("%screate=%s needs %ssize=SIZE", prefix,
                  p->create_mode == 2 ? "force" : "true", prefix);
    return -1;
  }
  if (!p->create_mode && p->create_size >= 0) {
    nbdkit_error ("%ssize= is only used with %screate=true", prefix, prefix);
    return -1;
  }
  if (p->create_mode && p->snapshot) {
    nbdkit_error ("%ssnapshot= serves a snapshot of an existing image: not "
                  "with %screate=", prefix, prefix);
    return -1;
  }
  return 0;
}

void
params_create_opts (const struct params *p, struct qcow_create_opts *o)
{
  qcow_create_opts_default (o);
  o->size = p->create_size;
  o->cluster_bits = __builtin_ctzll (p->cluster_size);
  o->lazy_refcounts = p->lazy_refcounts;
}

/* Was nbdkit started with -r?  Plugins are not told before the first
 * connection, but the image is opened (and locked, QEMU-style) before it,
 * so look at nbdkit's own command line.  Short options that take an
 * argument, and long ones that take it in the next word, are skipped. */
bool
params_started_readonly (void)
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

int
params_ready (const struct params *p, struct qcow *q, const char *name)
{
  /* Serving read-write: hold QEMU's write locks from now on, so QEMU's
   * tools see the image as in use (the first client would take them
   * anyway). */
  if (!p->config.read_only && qcow_lock_write (q) < 0)
    return -1;
  if (p->check_on_connect) {
    struct qcow_check_result cr;
    if (qcow_check (q, &cr, NULL, NULL) < 0)
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
                    name, cr.verdict == QCOW_CHECK_FAILED ? cr.reason
                    : "image is corrupt", cr.corruptions, cr.leaks);
      return -1;
    }
    nbdkit_debug ("%s: check-on-connect: %s, %" PRIu64 " leaked clusters",
                  name, cr.verdict == QCOW_CHECK_CLEAN ? "clean" : "leaks only",
                  cr.leaks);
  }
  struct qcow_info info;
  qcow_get_info (q, &info);
  struct qcow_header h;
  qcow_get_header (q, &h);
  if (h.incompatible_features & QCOW_INCOMPAT_CORRUPT)
    nbdkit_error ("%s: image is marked corrupt: serving it read-only", name);
  nbdkit_debug ("%s: qcow2 v%u, %" PRIu64 " bytes, %u-byte clusters, %s",
                name, h.version, info.size, info.cluster_size,
                info.read_write ? "read-write" : "read-only");
  return 0;
}

/* SPDX-License-Identifier: BSD-3-Clause */
/* fuzz/common.h - shared by the fuzz targets (fuzz/fuzz-*.c).
 *
 * Each target defines LLVMFuzzerTestOneInput.  Built by `make fuzz` with
 * clang -fsanitize=fuzzer; built with -DFUZZ_STANDALONE (any compiler) it
 * gets the main() below instead, which runs every file named on the
 * command line (directories: every file in them) through the target once,
 * as tests/test-fuzz-regress.sh does with fuzz/regress/ and fuzz/corpus/.
 *
 * Files: one private directory per process under $TMPDIR (default /tmp;
 * fuzz/run points it at a tmpfs), holding the image under test and the
 * files the image may use.  Safety: a fuzzed header may name any path as
 * its backing file or external data file, and the image may be opened
 * read-write by root, so the targets always override both names with
 * files in this directory (or refuse backing files): a header's own names
 * are never opened.
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow.h"

#define FUZZ_MAX_INPUT (1u << 20)       /* larger inputs are ignored */

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static char fuzz_dir[256];

static void
fuzz_cleanup (void)
{
  DIR *d = opendir (fuzz_dir);
  if (!d)
    return;
  struct dirent *e;
  while ((e = readdir (d)))
    if (e->d_name[0] != '.') {
      char p[512];
      snprintf (p, sizeof p, "%s/%s", fuzz_dir, e->d_name);
      unlink (p);
    }
  closedir (d);
  rmdir (fuzz_dir);
}

/* Set BUF to the path of NAME in this process's private directory
 * (created on the first call, removed at exit). */
static void
fuzz_path (char *buf, size_t len, const char *name)
{
  if (!fuzz_dir[0]) {
    const char *tmp = getenv ("TMPDIR");
    snprintf (fuzz_dir, sizeof fuzz_dir, "%s/qcow-fuzz.XXXXXX",
              tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp (fuzz_dir)) {
      perror (fuzz_dir);
      abort ();
    }
    atexit (fuzz_cleanup);
  }
  snprintf (buf, len, "%s/%s", fuzz_dir, name);
}

/* Replace the file at PATH by SIZE bytes of DATA. */
static void
fuzz_write_file (const char *path, const void *data, size_t size)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd == -1) {
    perror (path);
    abort ();
  }
  const uint8_t *p = data;
  while (size > 0) {
    ssize_t r = write (fd, p, size);
    if (r <= 0) {
      perror (path);
      abort ();
    }
    p += r;
    size -= r;
  }
  close (fd);
}

static void fuzz_quiet (const char *msg) { (void) msg; }

/* Silence the core's messages (QCOW_FUZZ_VERBOSE=1 keeps them) and make
 * sure no fault is armed from the environment. */
static void
fuzz_init_messages (void)
{
  static int done;
  if (done)
    return;
  done = 1;
  unsetenv ("QCOW_DEBUG_FAULT");
  if (!getenv ("QCOW_FUZZ_VERBOSE"))
    qcow_set_error_handler (fuzz_quiet);
}

#ifdef FUZZ_STANDALONE
/* Run one file through the target; directories are walked one level. */
static int
fuzz_run_file (const char *path)
{
  struct stat st;
  if (stat (path, &st) == -1) {
    perror (path);
    return 1;
  }
  if (S_ISDIR (st.st_mode)) {
    DIR *d = opendir (path);
    if (!d) {
      perror (path);
      return 1;
    }
    int r = 0;
    struct dirent *e;
    while ((e = readdir (d)))
      if (e->d_name[0] != '.') {
        char p[4096];
        snprintf (p, sizeof p, "%s/%s", path, e->d_name);
        r |= fuzz_run_file (p);
      }
    closedir (d);
    return r;
  }
  FILE *f = fopen (path, "rb");
  if (!f) {
    perror (path);
    return 1;
  }
  uint8_t *buf = malloc (st.st_size ? st.st_size : 1);
  size_t n = buf ? fread (buf, 1, st.st_size, f) : 0;
  fclose (f);
  if (!buf || n != (size_t) st.st_size) {
    fprintf (stderr, "%s: cannot read\n", path);
    free (buf);
    return 1;
  }
  fprintf (stderr, "running %s (%zu bytes)\n", path, n);
  LLVMFuzzerTestOneInput (buf, n);
  free (buf);
  return 0;
}

int
main (int argc, char **argv)
{
  int r = 0;
  if (argc < 2) {
    fprintf (stderr, "usage: %s FILE|DIR...\n", argv[0]);
    return 2;
  }
  for (int i = 1; i < argc; i++)
    r |= fuzz_run_file (argv[i]);
  return r;
}
#endif

#endif /* FUZZ_COMMON_H */

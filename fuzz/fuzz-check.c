/* SPDX-License-Identifier: BSD-3-Clause */
/* fuzz-check.c - fuzz the integrity check and the repair with hostile
 * images (the same corpus as fuzz-image: the input is the image file).
 *
 * qcow_check_file runs on the bytes as they are (it only reads).  Then
 * qcow_repair_file runs on them, after the header's backing file name and
 * external data file bit are removed: the repair opens the image with
 * qcow_connect, which would otherwise open whatever files a fuzzed header
 * names (and the data file read-write).  Asserted, beyond not crashing,
 * leaking or hanging:
 *   - the verdict agrees with the counts (clean: no corruption and no
 *     leak; leaks: leaks only; corrupt: some corruption), and every
 *     problem reported has a known kind, a name and a message;
 *   - checking the same bytes twice gives the same result;
 *   - a repair that succeeds leaves an image that checks clean, and one
 *     that writes nothing leaves the file byte for byte as it was.
 */
#include "common.h"

static char img[512];
static uint8_t *copy;

static void
problem (const struct qcow_check_problem *p, void *opaque)
{
  uint64_t *n = opaque;
  if (p->kind >= QCOW_PROBLEM_NR || !qcow_problem_name (p->kind) ||
      !p->message || !p->what) {
    fprintf (stderr, "fuzz-check: malformed problem report (kind %d)\n", p->kind);
    abort ();
  }
  (*n)++;
}

static void
check_verdict (const struct qcow_check_result *res, int r, const char *when)
{
  bool ok;
  if (r < 0)
    ok = res->verdict == QCOW_CHECK_FAILED && res->reason[0];
  else
    switch (res->verdict) {
    case QCOW_CHECK_CLEAN: ok = res->corruptions == 0 && res->leaks == 0; break;
    case QCOW_CHECK_LEAKS: ok = res->corruptions == 0 && res->leaks > 0; break;
    case QCOW_CHECK_CORRUPT: ok = res->corruptions > 0; break;
    default: ok = false; break;
    }
  if (!ok) {
    fprintf (stderr, "fuzz-check: %s: returned %d with verdict %d, %" PRIu64
             " corruptions, %" PRIu64 " leaks, reason '%s'\n", when, r,
             res->verdict, res->corruptions, res->leaks, res->reason);
    abort ();
  }
}

/* Header fields (docs/interop/qcow2.txt): 8 backing_file_offset (8),
 * 16 backing_file_size (4), 72 incompatible_features (8, v3 only). */
static void
no_external_files (uint8_t *p, size_t size)
{
  if (size >= 20)
    memset (p + 8, 0, 12);
  if (size >= 80)
    p[79] &= ~(uint8_t) QCOW_INCOMPAT_DATA_FILE;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  if (size > FUZZ_MAX_INPUT)
    return 0;
  fuzz_init_messages ();
  if (!img[0]) {
    fuzz_path (img, sizeof img, "image.qcow2");
    copy = malloc (FUZZ_MAX_INPUT);
    if (!copy)
      abort ();
  }
  fuzz_write_file (img, data, size);

  struct qcow_check_result a, b;
  uint64_t na = 0, nb = 0;
  int ra = qcow_check_file (img, &a, problem, &na);
  check_verdict (&a, ra, "check");
  int rb = qcow_check_file (img, &b, problem, &nb);
  if (ra != rb || a.verdict != b.verdict || a.corruptions != b.corruptions ||
      a.leaks != b.leaks || na != nb) {
    fprintf (stderr, "fuzz-check: two checks of the same bytes disagree\n");
    abort ();
  }

  memcpy (copy, data, size);
  no_external_files (copy, size);
  fuzz_write_file (img, copy, size);
  struct qcow_repair_result rr;
  int r = qcow_repair_file (img, &rr);
  if (r == 0) {
    check_verdict (&rr.after, 0, "after repair");
    if (rr.after.verdict != QCOW_CHECK_CLEAN) {
      fprintf (stderr, "fuzz-check: repair succeeded but the image is not clean\n");
      abort ();
    }
  }
  if (!rr.repaired) {
    FILE *f = fopen (img, "rb");
    uint8_t *now = malloc (size + 1);
    size_t n = f && now ? fread (now, 1, size + 1, f) : 0;
    if (f)
      fclose (f);
    if (n != size || memcmp (now, copy, size) != 0) {
      fprintf (stderr, "fuzz-check: the repair changed the file but says it "
               "repaired nothing (returned %d: %s)\n", r, rr.reason);
      abort ();
    }
    free (now);
  }
  return 0;
}

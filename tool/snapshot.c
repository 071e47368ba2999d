/* SPDX-License-Identifier: BSD-3-Clause */
/* snapshot.c - qcow-tool snapshot: list, create, apply and delete
 * internal snapshots, as qemu-img snapshot does.
 *
 *   qcow-tool snapshot -l [--json] [-U] FILE
 *   qcow-tool snapshot -c NAME FILE
 *   qcow-tool snapshot -a ID|NAME FILE
 *   qcow-tool snapshot -d ID|NAME FILE
 *
 * -l prints qemu-img snapshot -l's table (nothing when there are no
 * snapshots), or with --json an array with the fields of qemu-img info's
 * "snapshots".  -a and -d look a snapshot up by its ID first, then by
 * its name, as QEMU does.  The image is locked: a writer (-c, -a, -d)
 * fails while anyone else has it open, a reader (-l) while anyone writes
 * it (-U: take no lock).  Each change is atomic and crash-safe (the core
 * switches to the new state with one header write).
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcow.h"
#include "tool.h"

static void
list_text (struct qcow *q)
{
  int n = qcow_snapshot_count (q);
  if (n <= 0)
    return;
  printf ("Snapshot list:\n");
  printf ("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
  for (int i = 0; i < n; i++) {
    struct qcow_snapshot_info s;
    if (qcow_get_snapshot (q, i, &s) < 0)
      continue;
    char date[32] = "", clock[64], icount[32] = "", size[32];
    time_t t = s.date_sec;
    struct tm tm;
    if (localtime_r (&t, &tm))
      strftime (date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
    uint64_t secs = s.vm_clock_nsec / 1000000000;
    snprintf (clock, sizeof clock, "%02d:%02d:%02d.%03d", (int) (secs / 3600),
              (int) ((secs / 60) % 60), (int) (secs % 60),
              (int) ((s.vm_clock_nsec / 1000000) % 1000));
    if (s.icount != UINT64_MAX)
      snprintf (icount, sizeof icount, "%" PRId64, (int64_t) s.icount);
    human_size (s.vm_state_size, size, sizeof size);
    /* IDs and names come from the image: shown escaped. */
    char *id = NULL, *name = NULL;
    size_t idl = 0, namel = 0;
    FILE *f = open_memstream (&id, &idl);
    text_string (f, s.id);
    fclose (f);
    f = open_memstream (&name, &namel);
    text_string (f, s.name);
    fclose (f);
    printf ("%-9s %-16s %8s%20s%13s%11s\n", id, name, size, date, clock, icount);
    free (id);
    free (name);
  }
}

static void
list_json (struct qcow *q)
{
  int n = qcow_snapshot_count (q);
  printf ("[");
  for (int i = 0; i < n; i++) {
    struct qcow_snapshot_info s;
    if (qcow_get_snapshot (q, i, &s) < 0)
      continue;
    printf ("%s\n  { \"id\": ", i ? "," : "");
    json_string (stdout, s.id);
    printf (", \"name\": ");
    json_string (stdout, s.name);
    printf (", \"date-sec\": %" PRIu32 ", \"date-nsec\": %" PRIu32
            ", \"vm-clock-sec\": %" PRIu64 ", \"vm-clock-nsec\": %" PRIu64
            ", \"vm-state-size\": %" PRIu64 ", \"disk-size\": %" PRIu64,
            s.date_sec, s.date_nsec, s.vm_clock_nsec / 1000000000,
            s.vm_clock_nsec % 1000000000, s.vm_state_size, s.disk_size);
    if (s.icount != UINT64_MAX)
      printf (", \"icount\": %" PRIu64, s.icount);
    printf (" }");
  }
  printf ("%s]\n", n > 0 ? "\n" : "");
}

int
cmd_snapshot (int argc, char **argv)
{
  static const struct option opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
  };
  char op = 0;
  const char *name = NULL;
  bool json = false, force_share = false;
  int c;
  while ((c = getopt_long (argc, argv, "lc:a:d:U", opts, NULL)) != -1) {
    switch (c) {
    case 'l': case 'c': case 'a': case 'd':
      if (op)
        return usage_error ("snapshot", "give one of -l, -c, -a and -d");
      op = c;
      name = optarg;
      break;
    case 'j': json = true; break;
    case 'U': force_share = true; break;
    default: return 1;
    }
  }
  if (!op)
    return usage_error ("snapshot", "expected -l, -c NAME, -a NAME or -d NAME");
  if (argc - optind != 1)
    return usage_error ("snapshot", "expected FILE");
  if (op != 'l' && (json || force_share))
    return usage_error ("snapshot", "--json and -U go with -l");
  const char *file = argv[optind];

  struct qcow *q = open_image (file, op != 'l', force_share, NULL);
  if (!q)
    return 1;
  int r = 0;
  if (op == 'l' && json)
    list_json (q);
  else if (op == 'l')
    list_text (q);
  else if (op == 'c')
    r = qcow_snapshot_create (q, name);
  else if (op == 'a')
    r = qcow_snapshot_apply (q, name);
  else
    r = qcow_snapshot_delete (q, name);
  if (qcow_disconnect (q) < 0 || r < 0)
    return 1;
  return flush_stdout ();
}

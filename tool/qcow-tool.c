/* SPDX-License-Identifier: BSD-3-Clause */
/* qcow-tool - inspect, create, resize, check and repair qcow2 images.
 *
 * Uses only the public core API (core/qcow.h).  Each
 * subcommand is one function in the dispatch table at the bottom; every
 * error is a single line "qcow-tool: FILE: problem" on stderr and exit
 * status 1.  check and repair exit as qemu-img check does: 0 clean,
 * 2 corrupt, 3 leaked clusters only, 1 could not check.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow.h"
#include "tool.h"

/* ---- messages ---- */

void __attribute__ ((format (printf, 1, 2)))
fail (const char *fmt, ...)
{
  va_list ap;

  fputs (PROG ": ", stderr);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fputc ('\n', stderr);
}

/* Core messages already start with the file name. */
static void
core_error (const char *msg)
{
  fprintf (stderr, PROG ": %s\n", msg);
}

/* A usage error in subcommand CMD: one line, exit status 1. */
int __attribute__ ((format (printf, 2, 3)))
usage_error (const char *cmd, const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, PROG ": %s: ", cmd);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, " (see '" PROG " %s --help')\n", cmd);
  return 1;
}

/* ---- sizes ---- */

/* Parse a size the way qemu-img does: decimal digits, an optional
 * fraction, and an optional suffix b/B (bytes) or k/K, M, G, T, P, E
 * (powers of 1024, either case).  A fraction needs a unit other than
 * bytes; the result is rounded to the nearest byte.  Returns false on
 * syntax error or overflow. */
bool
parse_size (const char *s, uint64_t *out)
{
  static const char units[] = "bkmgtpe";
  uint64_t whole = 0, frac = 0, frac_scale = 1;
  const char *p = s;
  bool has_frac = false;

  if (*p < '0' || *p > '9')
    return false;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (whole > (UINT64_MAX - 9) / 10)
      return false;
    whole = whole * 10 + (uint64_t) (*p - '0');
  }
  if (*p == '.') {
    has_frac = true;
    p++;
    if (*p < '0' || *p > '9')
      return false;
    for (; *p >= '0' && *p <= '9'; p++) {
      if (frac_scale < UINT64_C (1000000000)) {   /* 9 digits is plenty */
        frac = frac * 10 + (uint64_t) (*p - '0');
        frac_scale *= 10;
      }
    }
  }

  unsigned shift = 0;
  if (*p != '\0') {
    const char *u = strchr (units, *p | 0x20);
    if (u == NULL || p[1] != '\0')
      return false;
    shift = 10 * (unsigned) (u - units);
  }
  if (has_frac && shift == 0)
    return false;

  if (shift > 0 && whole > (UINT64_MAX >> shift))
    return false;
  uint64_t v = whole << shift;
  /* extra = round (frac * 2^shift / frac_scale), by binary long division
   * (frac < frac_scale <= 10^9, so nothing overflows). */
  uint64_t extra = 0, rem = frac;
  for (unsigned i = 0; i < shift; i++) {
    rem <<= 1;
    extra <<= 1;
    if (rem >= frac_scale) {
      rem -= frac_scale;
      extra |= 1;
    }
  }
  if (2 * rem >= frac_scale)
    extra++;
  if (v > UINT64_MAX - extra)
    return false;
  *out = v + extra;
  return true;
}

/* "1 GiB", "1.5 MiB", "512 B": three significant digits, as qemu-img. */
const char *
human_size (uint64_t n, char *buf, size_t len)
{
  static const char *const suffix[] =
    { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
  double v = (double) n;
  size_t i = 0;

  while (v >= 1000 && i + 1 < sizeof suffix / sizeof suffix[0]) {
    v /= 1024;
    i++;
  }
  snprintf (buf, len, "%.3g %s", v, suffix[i]);
  return buf;
}

/* ---- feature bits (docs/interop/qcow2.txt, header bytes 72..95) ---- */

/* In the order (and with the numbers) qcow_feature_name uses. */
enum feature_kind { INCOMPATIBLE, COMPATIBLE, AUTOCLEAR, NR_FEATURE_KINDS };

static const char *const feature_kind_name[NR_FEATURE_KINDS] = {
  "incompatible", "compatible", "autoclear",
};

static uint64_t
feature_bits (const struct qcow_header *h, enum feature_kind k)
{
  switch (k) {
  case INCOMPATIBLE: return h->incompatible_features;
  case COMPATIBLE:   return h->compatible_features;
  case AUTOCLEAR:    return h->autoclear_features;
  default:           return 0;
  }
}

/* The core's name of feature BIT of kind K, or "bit N" in BUF if it
 * has none. */
static const char *
feature_name (enum feature_kind k, unsigned bit, char *buf, size_t len)
{
  const char *name = qcow_feature_name ((int) k, (int) bit);

  if (name != NULL)
    return name;
  snprintf (buf, len, "bit %u", bit);
  return buf;
}

static const char *
compression_name (unsigned t, char *buf, size_t len)
{
  switch (t) {
  case 0: return "zlib";
  case 1: return "zstd";
  default: snprintf (buf, len, "unknown (%u)", t); return buf;
  }
}

static const char *
encryption_name (unsigned m, char *buf, size_t len)
{
  switch (m) {
  case 0: return "none";
  case 1: return "aes";
  case 2: return "luks";
  default: snprintf (buf, len, "unknown (%u)", m); return buf;
  }
}

/* ---- JSON output ---- */

/* Write S as a JSON string.  Valid UTF-8 passes through; control
 * characters are escaped; bytes that are not valid UTF-8 (a backing
 * file name may hold anything) become U+FFFD so the output stays valid
 * JSON. */
void
json_string (FILE *fp, const char *s)
{
  const unsigned char *p = (const unsigned char *) s;

  fputc ('"', fp);
  while (*p) {
    unsigned c = *p;
    if (c == '"' || c == '\\')
      fprintf (fp, "\\%c", c);
    else if (c < 0x20)
      fprintf (fp, "\\u%04x", c);
    else if (c < 0x80)
      fputc ((int) c, fp);
    else {
      /* Length of a well-formed UTF-8 sequence starting here, or 0. */
      size_t n = 0;
      uint32_t cp = 0, min = 0;
      if (c >= 0xc2 && c <= 0xdf)      { n = 2; cp = c & 0x1f; min = 0x80; }
      else if (c >= 0xe0 && c <= 0xef) { n = 3; cp = c & 0x0f; min = 0x800; }
      else if (c >= 0xf0 && c <= 0xf4) { n = 4; cp = c & 0x07; min = 0x10000; }
      for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80) { n = 0; break; }
        cp = (cp << 6) | (p[i] & 0x3f);
      }
      if (n > 0 && (cp < min || cp > 0x10ffff ||
                    (cp >= 0xd800 && cp <= 0xdfff)))
        n = 0;
      if (n == 0) {
        fputs ("\\ufffd", fp);
        p++;
        continue;
      }
      fwrite (p, 1, n, fp);
      p += n;
      continue;
    }
    p++;
  }
  fputc ('"', fp);
}

/* Write S for a terminal: control characters (a backing file name may
 * hold anything) are shown as \xNN. */
void
text_string (FILE *fp, const char *s)
{
  for (const unsigned char *p = (const unsigned char *) s; *p; p++) {
    if (*p < 0x20 || *p == 0x7f || *p == '\\')
      fprintf (fp, "\\x%02x", *p);
    else
      fputc (*p, fp);
  }
}

/* ---- info ---- */

#define MAX_CHAIN 16
#define MAX_SNAPS_SHOWN 1000
struct image_facts {
  const char *file;
  struct qcow_header h;
  uint64_t allocated;       /* guest bytes mapped */
  struct stat st;
  int nchain;               /* the backing chain, resolved */
  char *chain[MAX_CHAIN];
  const char *chain_fmt[MAX_CHAIN];
  int nsnap;                /* the snapshots */
  struct { char *id, *name; uint64_t vm_state_size, disk_size; uint32_t date; } snap[MAX_SNAPS_SHOWN];
};

/* Gather what only an open image knows: the chain and the snapshots. */
static void
gather_open_facts (struct qcow *q, struct image_facts *f)
{
  const char *path, *fmt;
  struct qcow *next;
  for (struct qcow *cur = q; cur && f->nchain < MAX_CHAIN &&
         qcow_backing_info (cur, &path, &fmt, &next); cur = next) {
    f->chain[f->nchain] = strdup (path);
    f->chain_fmt[f->nchain++] = strcmp (fmt, "raw") == 0 ? "raw" : "qcow2";
  }
  int n = qcow_snapshot_count (q);
  for (int i = 0; i < n && f->nsnap < MAX_SNAPS_SHOWN; i++) {
    struct qcow_snapshot_info si;
    if (qcow_get_snapshot (q, i, &si) < 0)
      continue;
    f->snap[f->nsnap].id = strdup (si.id);
    f->snap[f->nsnap].name = strdup (si.name);
    f->snap[f->nsnap].vm_state_size = si.vm_state_size;
    f->snap[f->nsnap].disk_size = si.disk_size;
    f->snap[f->nsnap++].date = si.date_sec;
  }
}

static void
free_facts (struct image_facts *f)
{
  for (int i = 0; i < f->nchain; i++)
    free (f->chain[i]);
  for (int i = 0; i < f->nsnap; i++) {
    free (f->snap[i].id);
    free (f->snap[i].name);
  }
}

static void
print_features_text (const struct qcow_header *h, enum feature_kind k)
{
  uint64_t bits = feature_bits (h, k);
  char buf[16];

  printf ("%s features:", feature_kind_name[k]);
  if (bits == 0)
    printf (" none");
  for (unsigned bit = 0; bit < 64; bit++)
    if (bits & (UINT64_C (1) << bit))
      printf (" %s%s", feature_name (k, bit, buf, sizeof buf),
              (bits >> bit) > 1 ? "," : "");
  putchar ('\n');
}

static void
print_info_text (const struct image_facts *f)
{
  const struct qcow_header *h = &f->h;
  char hb[32], nb[32];

  printf ("image: ");
  text_string (stdout, f->file);
  putchar ('\n');
  printf ("format: qcow2 version %" PRIu32 " (compat %s)\n",
          h->version, h->version >= 3 ? "1.1" : "0.10");
  printf ("virtual size: %s (%" PRIu64 " bytes)\n",
          human_size (h->size, hb, sizeof hb), h->size);
  printf ("cluster size: %" PRIu64 "\n", UINT64_C (1) << h->cluster_bits);
  printf ("refcount bits: %u\n", 1u << h->refcount_order);
  for (enum feature_kind k = 0; k < NR_FEATURE_KINDS; k++)
    print_features_text (h, k);
  printf ("dirty: %s\n",
          h->incompatible_features & QCOW_INCOMPAT_DIRTY ? "yes" : "no");
  printf ("corrupt: %s\n",
          h->incompatible_features & QCOW_INCOMPAT_CORRUPT ? "yes" : "no");
  if (h->version >= 3)
    printf ("compression type: %s\n",
            compression_name (h->compression_type, nb, sizeof nb));
  printf ("encryption: %s\n",
          encryption_name (h->crypt_method, nb, sizeof nb));
  printf ("L1 table: %" PRIu32 " entries at offset 0x%" PRIx64 "\n",
          h->l1_size, h->l1_table_offset);
  printf ("refcount table: %" PRIu32 " cluster%s at offset 0x%" PRIx64 "\n",
          h->refcount_table_clusters,
          h->refcount_table_clusters == 1 ? "" : "s",
          h->refcount_table_offset);
  printf ("snapshots: %" PRIu32 "\n", h->nb_snapshots);
  if (h->backing_file[0] != '\0') {
    printf ("backing file: ");
    text_string (stdout, h->backing_file);
    printf ("\nbacking file format: ");
    text_string (stdout, h->backing_format[0] != '\0' ? h->backing_format
                                                       : "(not recorded: opened as raw)");
    putchar ('\n');
    printf ("backing chain:\n");
    for (int i = 0; i < f->nchain; i++) {
      printf ("  %d: ", i + 1);
      text_string (stdout, f->chain[i]);
      printf (" (%s)\n", f->chain_fmt[i]);
    }
  }
  if (f->nsnap) {
    printf ("snapshot list:\n  %-10s %-20s %12s %12s %s\n", "ID", "TAG",
            "VM SIZE", "DISK SIZE", "DATE (s since epoch)");
    for (int i = 0; i < f->nsnap; i++) {
      printf ("  ");                /* names come from the image: escaped */
      text_string (stdout, f->snap[i].id);
      printf (" ");
      text_string (stdout, f->snap[i].name);
      printf (" %12" PRIu64 " %12" PRIu64 " %" PRIu32 "\n",
              f->snap[i].vm_state_size, f->snap[i].disk_size, f->snap[i].date);
    }
  }
  printf ("allocated: %s (%" PRIu64 " bytes)\n",
          human_size (f->allocated, hb, sizeof hb), f->allocated);
  printf ("file size: %s (%" PRIu64 " bytes)\n",
          human_size ((uint64_t) f->st.st_size, hb, sizeof hb),
          (uint64_t) f->st.st_size);
  printf ("disk usage: %s (%" PRIu64 " bytes)\n",
          human_size ((uint64_t) f->st.st_blocks * 512, hb, sizeof hb),
          (uint64_t) f->st.st_blocks * 512);
}

static void
print_features_json (const struct qcow_header *h, enum feature_kind k)
{
  uint64_t bits = feature_bits (h, k);
  char buf[16];
  bool first = true;

  printf ("  \"%s-features\": [", feature_kind_name[k]);
  for (unsigned bit = 0; bit < 64; bit++)
    if (bits & (UINT64_C (1) << bit)) {
      printf ("%s", first ? "" : ", ");
      json_string (stdout, feature_name (k, bit, buf, sizeof buf));
      first = false;
    }
  printf ("],\n");
}

static void
print_info_json (const struct image_facts *f)
{
  const struct qcow_header *h = &f->h;
  char nb[32];

  printf ("{\n  \"filename\": ");
  json_string (stdout, f->file);
  printf (",\n  \"format\": \"qcow2\",\n");
  printf ("  \"version\": %" PRIu32 ",\n", h->version);
  printf ("  \"compat\": \"%s\",\n", h->version >= 3 ? "1.1" : "0.10");
  printf ("  \"virtual-size\": %" PRIu64 ",\n", h->size);
  printf ("  \"cluster-size\": %" PRIu64 ",\n", UINT64_C (1) << h->cluster_bits);
  printf ("  \"refcount-bits\": %u,\n", 1u << h->refcount_order);
  for (enum feature_kind k = 0; k < NR_FEATURE_KINDS; k++)
    print_features_json (h, k);
  printf ("  \"dirty\": %s,\n",
          h->incompatible_features & QCOW_INCOMPAT_DIRTY ? "true" : "false");
  printf ("  \"corrupt\": %s,\n",
          h->incompatible_features & QCOW_INCOMPAT_CORRUPT ? "true" : "false");
  if (h->version >= 3) {
    printf ("  \"compression-type\": ");
    json_string (stdout, compression_name (h->compression_type, nb, sizeof nb));
    printf (",\n");
  }
  printf ("  \"encryption\": ");
  json_string (stdout, encryption_name (h->crypt_method, nb, sizeof nb));
  printf (",\n");
  printf ("  \"l1-size\": %" PRIu32 ",\n", h->l1_size);
  printf ("  \"l1-table-offset\": %" PRIu64 ",\n", h->l1_table_offset);
  printf ("  \"refcount-table-offset\": %" PRIu64 ",\n",
          h->refcount_table_offset);
  printf ("  \"refcount-table-clusters\": %" PRIu32 ",\n",
          h->refcount_table_clusters);
  printf ("  \"snapshots\": %" PRIu32 ",\n", h->nb_snapshots);
  if (h->backing_file[0] != '\0') {
    printf ("  \"backing-filename\": ");
    json_string (stdout, h->backing_file);
    printf (",\n");
    if (h->backing_format[0] != '\0') {
      printf ("  \"backing-filename-format\": ");
      json_string (stdout, h->backing_format);
      printf (",\n");
    }
  }
  printf ("  \"backing-chain\": [");
  for (int i = 0; i < f->nchain; i++) {
    printf ("%s{ \"filename\": ", i ? ", " : "");
    json_string (stdout, f->chain[i]);
    printf (", \"format\": \"%s\" }", f->chain_fmt[i]);
  }
  printf ("],\n  \"snapshot-list\": [");
  for (int i = 0; i < f->nsnap; i++) {
    printf ("%s{ \"id\": ", i ? ", " : "");
    json_string (stdout, f->snap[i].id);
    printf (", \"name\": ");
    json_string (stdout, f->snap[i].name);
    printf (", \"vm-state-size\": %" PRIu64 ", \"disk-size\": %" PRIu64
            ", \"date-sec\": %" PRIu32 " }", f->snap[i].vm_state_size,
            f->snap[i].disk_size, f->snap[i].date);
  }
  printf ("],\n");
  printf ("  \"allocated-bytes\": %" PRIu64 ",\n", f->allocated);
  printf ("  \"file-size\": %" PRIu64 ",\n", (uint64_t) f->st.st_size);
  printf ("  \"disk-usage\": %" PRIu64 "\n", (uint64_t) f->st.st_blocks * 512);
  printf ("}\n");
}

static int
cmd_info (int argc, char **argv)
{
  static const struct option opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
  };
  bool json = false, force_share = false;
  int c;

  while ((c = getopt_long (argc, argv, "U", opts, NULL)) != -1) {
    if (c == 'j')
      json = true;
    else if (c == 'U')
      force_share = true;           /* like qemu-img -U: take no locks */
    else
      return 1;
  }
  if (argc - optind != 1)
    return usage_error ("info", "expected FILE");

  struct image_facts f = { .file = argv[optind] };
  struct qcow *q = open_image (f.file, false, force_share, NULL);
  if (!q)
    return 1;
  qcow_get_header (q, &f.h);
  gather_open_facts (q, &f);
  int r = qcow_allocated_bytes (q, &f.allocated);
  if (r == 0 && stat (f.file, &f.st) == -1) {
    fail ("%s: %s", f.file, strerror (errno));
    r = -1;
  }
  if (qcow_disconnect (q) < 0 || r < 0)
    return 1;

  if (json)
    print_info_json (&f);
  else
    print_info_text (&f);
  free_facts (&f);
  return flush_stdout ();
}

/* ---- create ---- */

static int
cmd_create (int argc, char **argv)
{
  enum { OPT_CLUSTER = 256, OPT_LAZY, OPT_REFBITS, OPT_COMPAT, OPT_FORCE };
  static const struct option opts[] = {
    { "cluster-size",   required_argument, NULL, OPT_CLUSTER },
    { "lazy-refcounts", required_argument, NULL, OPT_LAZY },
    { "refcount-bits",  required_argument, NULL, OPT_REFBITS },
    { "compat",         required_argument, NULL, OPT_COMPAT },
    { "force",          no_argument,       NULL, OPT_FORCE },
    { NULL, 0, NULL, 0 },
  };
  struct qcow_create_opts o;
  bool force = false, lazy_given = false;
  uint64_t v;
  int c;

  qcow_create_opts_default (&o);
  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case OPT_CLUSTER:
      if (!parse_size (optarg, &v) || v < 512 || v > (2u << 20) ||
          (v & (v - 1)) != 0)
        return usage_error ("create", "--cluster-size=%s: must be a power "
                            "of two from 512 to 2M", optarg);
      o.cluster_bits = (unsigned) __builtin_ctzll (v);
      break;
    case OPT_LAZY:
      if (strcmp (optarg, "on") == 0)
        o.lazy_refcounts = true;
      else if (strcmp (optarg, "off") == 0)
        o.lazy_refcounts = false;
      else
        return usage_error ("create", "--lazy-refcounts=%s: expected on "
                            "or off", optarg);
      lazy_given = true;
      break;
    case OPT_REFBITS: {
      char *end;
      errno = 0;
      unsigned long n = strtoul (optarg, &end, 10);
      if (errno || end == optarg || *end || n == 0 || n > 64 ||
          (n & (n - 1)) != 0)
        return usage_error ("create", "--refcount-bits=%s: must be a power "
                            "of two from 1 to 64", optarg);
      o.refcount_order = (unsigned) __builtin_ctzl (n);
      break;
    }
    case OPT_COMPAT:
      if (strcmp (optarg, "0.10") == 0 || strcmp (optarg, "v2") == 0)
        o.version = 2;
      else if (strcmp (optarg, "1.1") == 0 || strcmp (optarg, "v3") == 0)
        o.version = 3;
      else
        return usage_error ("create", "--compat=%s: expected 0.10, 1.1, "
                            "v2 or v3", optarg);
      break;
    case OPT_FORCE:
      force = true;
      break;
    default:
      return 1;
    }
  }
  if (argc - optind != 2)
    return usage_error ("create", "expected FILE SIZE");
  const char *file = argv[optind];
  const char *size = argv[optind + 1];
  if (!parse_size (size, &o.size))
    return usage_error ("create", "%s: invalid size", size);

  if (o.version == 2) {
    if (lazy_given && o.lazy_refcounts) {
      fail ("%s: lazy refcounts need --compat=1.1 (v3)", file);
      return 1;
    }
    o.lazy_refcounts = false;
    if (o.refcount_order != 4) {
      fail ("%s: refcount widths other than 16 bits need --compat=1.1 (v3)",
            file);
      return 1;
    }
  }

  /* The core refuses too (atomically); this is for a message that
   * names our option. */
  struct stat st;
  if (!force && lstat (file, &st) == 0) {
    fail ("%s: file exists (use --force to overwrite it)", file);
    return 1;
  }

  return qcow_create (file, &o, force) < 0 ? 1 : 0;
}

/* ---- resize ---- */

/* qemu-img style: a size argument like "-1G" looks like an option to
 * getopt.  Take it out of ARGV first (shifting the rest down) and return
 * it, or NULL if there is none.  Anything after "--" is left alone. */
static char *
take_negative_size (int *argc, char **argv)
{
  for (int i = 1; i < *argc; i++) {
    if (strcmp (argv[i], "--") == 0)
      break;
    if (argv[i][0] == '-' && argv[i][1] >= '0' && argv[i][1] <= '9') {
      char *s = argv[i];
      memmove (&argv[i], &argv[i + 1], (size_t) (*argc - i) * sizeof *argv);
      (*argc)--;
      return s;
    }
  }
  return NULL;
}

static int
cmd_resize (int argc, char **argv)
{
  enum { OPT_IGNORE = 256 };
  static const struct option opts[] = {
    { "ignore-data-loss", no_argument, NULL, OPT_IGNORE },
    { NULL, 0, NULL, 0 },
  };
  bool ignore_data_loss = false;
  char *neg = take_negative_size (&argc, argv);
  int c;

  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    if (c == OPT_IGNORE)
      ignore_data_loss = true;
    else
      return 1;
  }
  if (argc - optind != (neg ? 1 : 2))
    return usage_error ("resize", "expected FILE SIZE");
  const char *file = argv[optind];
  const char *size = neg ? neg : argv[optind + 1];

  int sign = 0;
  uint64_t amount;
  if (size[0] == '+' || size[0] == '-')
    sign = size[0] == '+' ? 1 : -1;
  if (!parse_size (size + (sign != 0), &amount))
    return usage_error ("resize", "%s: invalid size", size);

  struct qcow_config cfg;
  struct qcow *q;
  qcow_config_default (&cfg);
  if (qcow_connect (file, &cfg, &q) < 0)
    return 1;

  struct qcow_info info;
  struct qcow_header h;
  qcow_get_info (q, &info);
  qcow_get_header (q, &h);
  uint64_t new_size = amount;
  int r = 0;
  /* The core falls back to read-only for a file we may not write. */
  if (!info.read_write) {
    if (h.incompatible_features & QCOW_INCOMPAT_CORRUPT)
      fail ("%s: image is marked corrupt: repair it with "
            "'qemu-img check -r all' first", file);
    else
      fail ("%s: cannot open the file for writing", file);
    r = -1;
  }
  else if (sign > 0 && amount > UINT64_MAX - info.size) {
    fail ("%s: size %s is too large", file, size);
    r = -1;
  }
  else if (sign > 0)
    new_size = info.size + amount;
  else if (sign < 0 && amount > info.size) {
    fail ("%s: cannot shrink by %s: the image is only %" PRIu64 " bytes",
          file, size + 1, info.size);
    r = -1;
  }
  else if (sign < 0)
    new_size = info.size - amount;

  if (r == 0 && new_size < info.size && !ignore_data_loss) {
    fail ("%s: shrinking from %" PRIu64 " to %" PRIu64 " bytes discards the "
          "data past the new end; use --ignore-data-loss", file,
          info.size, new_size);
    r = -1;
  }
  if (r == 0 && new_size != info.size)
    r = qcow_resize (q, new_size, ignore_data_loss);
  if (qcow_disconnect (q) < 0 || r < 0)
    return 1;
  return 0;
}

/* ---- compact ---- */

void
progress_bar (int percent, void *opaque)
{
  int *last = opaque;
  if (percent == *last)
    return;
  *last = percent;
  int filled = percent / 2;
  fprintf (stderr, "\r[%-50.*s] %3d%%", filled,
           "##################################################", percent);
  if (percent >= 100)
    fputc ('\n', stderr);
  fflush (stderr);
}

static int
cmd_compact (int argc, char **argv)
{
  enum { OPT_PROGRESS = 256, OPT_JSON };
  static const struct option opts[] = {
    { "progress", no_argument, NULL, OPT_PROGRESS },
    { "json", no_argument, NULL, OPT_JSON },
    { NULL, 0, NULL, 0 },
  };
  bool progress = false, json = false;
  int c;
  while ((c = getopt_long (argc, argv, "p", opts, NULL)) != -1) {
    if (c == OPT_PROGRESS || c == 'p')
      progress = true;
    else if (c == OPT_JSON)
      json = true;
    else
      return 1;
  }
  if (argc - optind != 1)
    return usage_error ("compact", "expected FILE");
  const char *file = argv[optind];
  struct qcow_config cfg;
  struct qcow *q;
  qcow_config_default (&cfg);
  if (qcow_connect (file, &cfg, &q) < 0)
    return 1;
  struct qcow_compact_result res;
  /* The bar only on a terminal. */
  int last = -1;
  int r = qcow_compact (q, progress && isatty (2) ? progress_bar : NULL, &last, &res);
  if (qcow_disconnect (q) < 0 || r < 0)
    return 1;
  if (json)
    printf ("{ \"copied\": %" PRIu64 ", \"refs_updated\": %" PRIu64
            ", \"old_size\": %" PRIu64 ", \"new_size\": %" PRIu64 " }\n",
            res.copied, res.refs_updated, res.old_size, res.new_size);
  else
    printf ("copied: %" PRIu64 " sectors\nrefs_updated: %" PRIu64
            "\nold_size: %" PRIu64 " sectors (%" PRIu64 " bytes)\n"
            "new_size: %" PRIu64 " sectors (%" PRIu64 " bytes)\n",
            res.copied, res.refs_updated, res.old_size, res.old_size * 512,
            res.new_size, res.new_size * 512);
  return 0;
}

/* ---- check and repair ---- */

/* Problems kept for --json (the human output prints them as they come). */
#define MAX_JSON_PROBLEMS 10000
struct problem_list {
  struct qcow_check_problem *v;
  size_t n, cap;
  bool truncated;
};

static char *
xstrdup_or_null (const char *s)
{
  return s ? strdup (s) : NULL;
}

static void
print_problem (const struct qcow_check_problem *p, void *opaque)
{
  (void) opaque;
  printf ("%s\n", p->message);
}

static void
collect_problem (const struct qcow_check_problem *p, void *opaque)
{
  struct problem_list *l = opaque;
  if (l->n == MAX_JSON_PROBLEMS) {
    l->truncated = true;
    return;
  }
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    struct qcow_check_problem *v = realloc (l->v, cap * sizeof *v);
    if (!v) {
      l->truncated = true;
      return;
    }
    l->v = v;
    l->cap = cap;
  }
  struct qcow_check_problem *c = &l->v[l->n++];
  *c = *p;                      /* the strings are only valid in the call */
  c->what = xstrdup_or_null (p->what);
  c->what2 = xstrdup_or_null (p->what2);
  c->message = xstrdup_or_null (p->message);
}

static void
free_problems (struct problem_list *l)
{
  for (size_t i = 0; i < l->n; i++) {
    free ((char *) l->v[i].what);
    free ((char *) l->v[i].what2);
    free ((char *) l->v[i].message);
  }
  free (l->v);
}

static const char *
verdict_name (enum qcow_check_verdict v)
{
  switch (v) {
  case QCOW_CHECK_CLEAN: return "clean";
  case QCOW_CHECK_LEAKS: return "leaks";
  case QCOW_CHECK_CORRUPT: return "corrupt";
  default: return "failed";
  }
}

static double
percent (uint64_t part, uint64_t whole)
{
  return whole ? 100.0 * (double) part / (double) whole : 0.0;
}

/* The summary after the problems, worded like qemu-img check's. */
static void
print_check_text (const struct qcow_check_result *r)
{
  if (r->corruptions == 0 && r->leaks == 0)
    printf ("No errors were found on the image.\n");
  if (r->corruptions)
    printf ("\n%" PRIu64 " errors were found on the image.\n"
            "Data may be corrupted, or further writes to the image may "
            "corrupt it.\n", r->corruptions);
  if (r->leaks)
    printf ("\n%" PRIu64 " leaked clusters were found on the image.\n"
            "This means waste of disk space, but no harm to data.\n",
            r->leaks);
  if (r->marked_corrupt)
    printf ("The image is marked corrupt ('" PROG " repair' clears the "
            "mark).\n");
  if (r->dirty)
    printf ("The image is marked dirty (lazy refcounts): its next writer "
            "rebuilds the refcounts.\n");
  printf ("%" PRIu64 "/%" PRIu64 " = %.2f%% allocated, %.2f%% compressed "
          "clusters\n", r->allocated_clusters, r->total_clusters,
          percent (r->allocated_clusters, r->total_clusters),
          percent (r->compressed_clusters, r->allocated_clusters));
  printf ("File: %" PRIu64 " clusters of %" PRIu32 " bytes: %" PRIu64
          " used (%" PRIu64 " bytes), %" PRIu64 " free (%" PRIu64
          " bytes)\n", r->file_clusters, r->cluster_size, r->used_clusters,
          r->used_bytes, r->free_clusters, r->free_bytes);
  printf ("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

static void
print_check_json (const char *file, const struct qcow_check_result *r,
                  const struct problem_list *l)
{
  printf ("{\n  \"filename\": ");
  json_string (stdout, file);
  printf (",\n  \"verdict\": \"%s\",\n", verdict_name (r->verdict));
  if (r->verdict == QCOW_CHECK_FAILED) {
    printf ("  \"reason\": ");
    json_string (stdout, r->reason);
    printf ("\n}\n");
    return;
  }
  printf ("  \"corruptions\": %" PRIu64 ",\n", r->corruptions);
  printf ("  \"leaks\": %" PRIu64 ",\n", r->leaks);
  printf ("  \"problem-counts\": {");
  for (int k = 0; k < QCOW_PROBLEM_NR; k++)
    printf ("%s\"%s\": %" PRIu64, k ? ", " : " ", qcow_problem_name (k),
            r->problems[k]);
  printf (" },\n");
  printf ("  \"marked-corrupt\": %s,\n", r->marked_corrupt ? "true" : "false");
  printf ("  \"dirty\": %s,\n", r->dirty ? "true" : "false");
  printf ("  \"bitmaps-checked\": %s,\n", r->bitmaps_checked ? "true" : "false");
  printf ("  \"cluster-size\": %" PRIu32 ",\n", r->cluster_size);
  printf ("  \"file-size\": %" PRIu64 ",\n", r->file_size);
  printf ("  \"file-clusters\": %" PRIu64 ",\n", r->file_clusters);
  printf ("  \"used-clusters\": %" PRIu64 ",\n", r->used_clusters);
  printf ("  \"free-clusters\": %" PRIu64 ",\n", r->free_clusters);
  printf ("  \"used-bytes\": %" PRIu64 ",\n", r->used_bytes);
  printf ("  \"free-bytes\": %" PRIu64 ",\n", r->free_bytes);
  printf ("  \"image-end-offset\": %" PRIu64 ",\n", r->image_end_offset);
  printf ("  \"total-clusters\": %" PRIu64 ",\n", r->total_clusters);
  printf ("  \"allocated-clusters\": %" PRIu64 ",\n", r->allocated_clusters);
  printf ("  \"compressed-clusters\": %" PRIu64 ",\n", r->compressed_clusters);
  printf ("  \"problems\": [");
  for (size_t i = 0; i < l->n; i++) {
    const struct qcow_check_problem *p = &l->v[i];
    printf ("%s\n    { \"kind\": \"%s\", \"corruption\": %s, \"what\": ",
            i ? "," : "", qcow_problem_name (p->kind),
            p->corruption ? "true" : "false");
    json_string (stdout, p->what ? p->what : "");
    printf (", \"src\": %" PRIu64 ", \"dst\": %" PRIu64, p->src, p->dst);
    if (p->what2) {
      printf (", \"what2\": ");
      json_string (stdout, p->what2);
      printf (", \"src2\": %" PRIu64, p->src2);
    }
    if (p->kind == QCOW_PROBLEM_REFCOUNT || p->kind == QCOW_PROBLEM_LEAK ||
        p->kind == QCOW_PROBLEM_COPIED)
      printf (", \"refcount\": %" PRIu64 ", \"references\": %" PRIu64,
              p->refcount, p->references);
    printf (", \"message\": ");
    json_string (stdout, p->message ? p->message : "");
    printf (" }");
  }
  printf ("%s],\n", l->n ? "\n  " : "");
  printf ("  \"problems-truncated\": %s\n}\n", l->truncated ? "true" : "false");
}

int
flush_stdout (void)
{
  if (fflush (stdout) == EOF || ferror (stdout)) {
    fail ("standard output: %s", strerror (errno));
    return 1;
  }
  return 0;
}

static int
cmd_check (int argc, char **argv)
{
  static const struct option opts[] = {
    { "json", no_argument, NULL, 'j' },
    { NULL, 0, NULL, 0 },
  };
  bool json = false;
  int c;
  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    if (c == 'j')
      json = true;
    else
      return 1;
  }
  if (argc - optind != 1)
    return usage_error ("check", "expected FILE");
  const char *file = argv[optind];

  struct qcow_check_result res;
  struct problem_list list = { 0 };
  qcow_check_file (file, &res, json ? collect_problem : print_problem,
                   json ? (void *) &list : NULL);
  if (json)
    print_check_json (file, &res, &list);
  else if (res.verdict == QCOW_CHECK_FAILED)
    fail ("%s: could not check: %s", file, res.reason);
  else
    print_check_text (&res);
  free_problems (&list);
  if (flush_stdout ())
    return 1;
  return res.verdict;
}

static int
cmd_repair (int argc, char **argv)
{
  if (argc != 2)
    return usage_error ("repair", "expected FILE");
  const char *file = argv[1];

  /* List the problems first (the repair checks again by itself). */
  struct qcow_check_result pre;
  if (qcow_check_file (file, &pre, print_problem, NULL) < 0) {
    fail ("%s: could not check: %s", file, pre.reason);
    return 1;
  }
  if (pre.verdict == QCOW_CHECK_CLEAN && !pre.marked_corrupt) {
    print_check_text (&pre);
    return flush_stdout ();
  }
  struct qcow_repair_result rr;
  int r = qcow_repair_file (file, &rr);
  if (rr.repaired) {
    printf ("\nThe following inconsistencies were found and repaired:\n\n"
            "    %" PRIu64 " leaked clusters\n    %" PRIu64 " corruptions\n\n",
            rr.before.leaks, rr.before.corruptions);
    if (rr.entries_cleared)
      printf ("    %" PRIu64 " table entries unlinked (they pointed outside "
              "the file or into metadata)\n", rr.entries_cleared);
    if (rr.entries_realigned)
      printf ("    %" PRIu64 " misaligned entries realigned\n",
              rr.entries_realigned);
    if (rr.reserved_cleared)
      printf ("    %" PRIu64 " entries with reserved bits cleared\n",
              rr.reserved_cleared);
    if (rr.copied_fixed)
      printf ("    %" PRIu64 " COPIED flags corrected\n", rr.copied_fixed);
    if (rr.refcounts_rebuilt)
      printf ("    refcount structure rebuilt\n");
    if (rr.corrupt_bit_cleared)
      printf ("    corrupt bit cleared\n");
    if (rr.bitmaps_dropped)
      printf ("    persistent bitmaps dropped (marked inconsistent)\n");
    printf ("\nDouble checking the fixed image now...\n");
  }
  if (r < 0) {
    fflush (stdout);
    fail ("%s: %s", file, rr.reason);
    if (!rr.repaired)
      printf ("The image was not changed.\n");
  }
  if (rr.after.verdict != QCOW_CHECK_FAILED)
    print_check_text (&rr.after);
  if (flush_stdout ())
    return 1;
  return rr.after.verdict;
}

/* ---- dispatch and help ---- */

/* One entry per subcommand: adding a subcommand is adding its entry here
 * (and its section in qcow-tool.pod).  'qcow-tool --help' lists NAME,
 * ARGS and SUMMARY; 'qcow-tool NAME --help' prints ARGS, SUMMARY and
 * DETAILS (what it does, then its options, one per line).  main answers
 * --help itself, so RUN never sees it. */
struct command {
  const char *name;
  int (*run) (int argc, char **argv);   /* argv[0] is the program name;
                                           returns the exit status */
  const char *args;                     /* lines after the first are
                                           indented when printed */
  const char *summary;
  const char *details;
};

static const struct command commands[] = {
  { "info", cmd_info, "FILE [--json] [-U|--force-share]",
    "print the image header, features and space use (read-only)",
    "Prints the version, virtual size, cluster size, refcount width, feature\n"
    "bits, dirty and corrupt flags, compression type, encryption, table\n"
    "locations, snapshots, backing chain, allocated bytes and file size.\n"
    "Opens the image read-only.\n"
    "\n"
    "Options:\n"
    "  --json               print the same as one JSON object\n"
    "  -U, --force-share    take no lock, like qemu-img info -U (works while\n"
    "                       the image is served read-write)\n" },
  { "create", cmd_create,
    "FILE SIZE [--cluster-size=SIZE] [--lazy-refcounts=on|off]\n"
    "[--refcount-bits=N] [--compat=0.10|1.1|v2|v3] [--force]",
    "create a new empty image (--force overwrites an existing FILE)",
    "Creates a new empty image of SIZE bytes (virtual size), unless told\n"
    "otherwise version 3 with 64 KiB clusters, 16 bit refcounts and lazy\n"
    "refcounts.  An existing FILE is refused without --force.\n"
    "\n"
    "Options:\n"
    "  --cluster-size=SIZE       a power of two from 512 to 2M (default 64k)\n"
    "  --lazy-refcounts=on|off   default on (version 3 only)\n"
    "  --refcount-bits=N         a power of two from 1 to 64 (default 16;\n"
    "                            version 2 allows only 16)\n"
    "  --compat=0.10|1.1|v2|v3   qcow2 version 2 (0.10) or 3 (1.1, default)\n"
    "  --force                   overwrite an existing FILE\n" },
  { "resize", cmd_resize, "FILE [+|-]SIZE [--ignore-data-loss]",
    "change the virtual size; shrinking needs --ignore-data-loss",
    "Changes the virtual size to SIZE; +SIZE and -SIZE are relative to the\n"
    "current size, as with qemu-img resize.  Shrinking discards the data\n"
    "past the new end; an image with internal snapshots cannot be shrunk.\n"
    "\n"
    "Options:\n"
    "  --ignore-data-loss   allow shrinking\n" },
  { "compact", cmd_compact, "FILE [--progress] [--json]",
    "move clusters into free space and truncate the file",
    "Moves clusters from the end of the file into free space nearer the\n"
    "start, truncates the file, and prints the sectors copied, the\n"
    "references updated and the file size before and after.\n"
    "\n"
    "Options:\n"
    "  -p, --progress   draw a progress bar on standard error (a terminal)\n"
    "  --json           print the result as one JSON object\n" },
  { "map", cmd_map,
    "FILE [--output=human|json] [--json] [--start-offset=OFFSET]\n"
    "[--max-length=LENGTH] [-l SNAPSHOT] [-U]",
    "print where each run of the disk comes from, as qemu-img map",
    "Prints the layout of the virtual disk as qemu-img map does, in the\n"
    "same two formats and byte for byte the same: for every run, the layer\n"
    "of the backing chain it comes from (depth), whether that layer has it\n"
    "(present), whether it reads as zeros or data, and its offset in which\n"
    "file.  The human format lists the runs holding data only, and fails\n"
    "(exit 1) on compressed clusters, which have no offset, as qemu-img's\n"
    "does.  Opens the image read-only.\n"
    "\n"
    "Options:\n"
    "  --output=human|json      the format (default human)\n"
    "  --json                   the same as --output=json\n"
    "  --start-offset=OFFSET    start there (default 0)\n"
    "  --max-length=LENGTH      map at most LENGTH bytes\n"
    "  -l, --snapshot=ID|NAME   map this internal snapshot\n"
    "  -U, --force-share        take no lock, like qemu-img -U\n" },
  { "sha", cmd_sha, "FILE [--json] [-l SNAPSHOT] [-U] [-p|--progress]",
    "print the SHA-256 of the virtual disk (holes are not read)",
    "Prints the SHA-256 of the virtual disk, as sha256sum prints it\n"
    "(\"DIGEST  FILE\"): the digest of what qemu-img convert -O raw would\n"
    "write.  Ranges that read as zeros are hashed without being read; data\n"
    "is read on every CPU.  Opens the image read-only.\n"
    "\n"
    "Options:\n"
    "  --json                   print one JSON object (filename,\n"
    "                           virtual-size, sha256)\n"
    "  -l, --snapshot=ID|NAME   hash this internal snapshot\n"
    "  -U, --force-share        take no lock, like qemu-img -U\n"
    "  -p, --progress           draw a progress bar on standard error (a\n"
    "                           terminal)\n" },
  { "discard", cmd_discard, "FILE [--json] [--compact] [-p|--progress]",
    "unallocate the clusters that read as zeros (--compact: then compact)",
    "Reads every cluster the image stores itself and discards those that\n"
    "read as all zeros, so the image reads the same and takes less space.\n"
    "Over a backing file the discarded clusters get the zero flag (a\n"
    "version 2 image has none: nothing is discarded there).  Prints the\n"
    "clusters examined and discarded.\n"
    "\n"
    "Options:\n"
    "  --json           print the result as one JSON object\n"
    "  --compact        compact afterwards, as qcow-tool compact\n"
    "  -p, --progress   draw a progress bar on standard error (a terminal)\n" },
  { "commit", cmd_commit, "FILE [-d] [-p|--progress]",
    "write the image's data into its backing file and empty it, as\n"
    "      qemu-img commit",
    "Writes the data FILE holds itself into its backing file (qcow2 or raw;\n"
    "grown to FILE's size if smaller), makes it durable there, then empties\n"
    "and compacts FILE, so that it reads through to the backing file, as\n"
    "qemu-img commit does.  Both files are locked for writing: if anything\n"
    "else has either open, nothing is changed.\n"
    "\n"
    "Options:\n"
    "  -d               keep FILE's data (qemu-img commit -d)\n"
    "  -p, --progress   draw a progress bar on standard error (a terminal)\n" },
  { "snapshot", cmd_snapshot,
    "-l [--json] [-U] FILE | -c NAME FILE | -a ID|NAME FILE\n"
    "| -d ID|NAME FILE",
    "list, create, apply (revert to) or delete internal snapshots, as\n"
    "      qemu-img snapshot",
    "Lists (-l), creates (-c), applies (-a: reverts the disk, and its size,\n"
    "to the snapshot) or deletes (-d) internal snapshots, as qemu-img\n"
    "snapshot does and in QEMU's format.  -l prints what qemu-img snapshot\n"
    "-l prints (nothing when there are none).  -a and -d find a snapshot by\n"
    "its ID, else by its name.  A new snapshot gets the next free numeric\n"
    "ID; its name (1 to 255 bytes) must not be another snapshot's name or\n"
    "ID.  Each change is one atomic switch: a crash at any moment leaves\n"
    "the image as it was or as it is after, and consistent.\n"
    "\n"
    "Options:\n"
    "  -l                  list the snapshots (the image is opened read-only)\n"
    "  -c NAME             create a snapshot of the disk as it is now\n"
    "  -a ID|NAME          apply the snapshot: the disk becomes what it was\n"
    "  -d ID|NAME          delete the snapshot\n"
    "  --json              with -l: a JSON array, with the fields of qemu-img\n"
    "                      info's snapshot list\n"
    "  -U, --force-share   with -l: take no lock\n" },
  { "convert", cmd_convert,
    "[-f qcow2|raw] [-O qcow2|raw] [-c] [--compression zlib|zstd]\n"
    "[-o OPTIONS] [-l SNAPSHOT] [-p|--progress] SRC DST",
    "copy a virtual disk into a new qcow2 image (-c: compressed) or raw file",
    "Copies the virtual disk of SRC (a qcow2 image, its backing chain\n"
    "flattened, or a raw file) into DST: a new qcow2 image, where clusters\n"
    "that read as zeros stay unallocated, or a sparse raw file.  With -c\n"
    "every cluster is compressed as qemu-img convert -c does, on every CPU,\n"
    "the writes in guest order.  An existing DST is overwritten (unless it\n"
    "is in use); a DST that did not exist is removed if the conversion fails.\n"
    "\n"
    "Options:\n"
    "  -f qcow2|raw              the format of SRC (default: qcow2 if it\n"
    "                            starts with the qcow2 magic, else raw)\n"
    "  -O qcow2|raw              the format of DST (default qcow2)\n"
    "  -c                        compress every cluster (qcow2 only)\n"
    "  --compression zlib|zstd   the compression type (default zlib; zstd\n"
    "                            needs compat=1.1)\n"
    "  -o KEY=VALUE,...          the new image's cluster_size,\n"
    "                            lazy_refcounts, refcount_bits, compat,\n"
    "                            compression_type (as qemu-img create -o)\n"
    "  -l, --snapshot=ID|NAME    read this internal snapshot of SRC\n"
    "  -p, --progress            draw a progress bar on standard error (a\n"
    "                            terminal)\n" },
  { "check", cmd_check, "FILE [--json]",
    "check the image's integrity (read-only); exit status as qemu-img\n"
    "      check: 0 clean, 2 corrupt, 3 leaked clusters only, 1 could not check",
    "Recounts every reference to every host cluster and compares with the\n"
    "stored refcounts and COPIED flags, as qemu-img check does; prints each\n"
    "problem and a summary.  The file is never modified.  Exit status 0:\n"
    "clean, 2: corrupt, 3: leaked clusters only, 1: could not check.\n"
    "\n"
    "Options:\n"
    "  --json   print the verdict, the counts and the problems as one JSON\n"
    "           object\n" },
  { "repair", cmd_repair, "FILE",
    "fix damaged table entries and rebuild the refcounts (qemu-img\n"
    "      check -r all); leaves the file unchanged if it cannot repair it",
    "Repairs the image as qemu-img check -r all does: unlinks table entries\n"
    "that point outside the file or into metadata, realigns misaligned\n"
    "ones, clears reserved bits, corrects COPIED flags, rebuilds the\n"
    "refcount structure and clears the corrupt bit.  Every fix is planned\n"
    "before anything is written; an image that cannot be repaired is left\n"
    "unchanged.  Exit status as check, for the image after the repair.\n" },
};
#define NR_COMMANDS (sizeof commands / sizeof commands[0])

/* Print ARGS, indenting its continuation lines by INDENT columns. */
static void
print_args (FILE *fp, const char *args, int indent)
{
  for (const char *p = args; *p; p++) {
    fputc (*p, fp);
    if (*p == '\n')
      fprintf (fp, "%*s", indent, "");
  }
}

static void
usage (FILE *fp)
{
  fprintf (fp, "Usage: " PROG " COMMAND [ARGS...]\n"
           "       " PROG " COMMAND --help\n\nCommands:\n");
  for (size_t i = 0; i < NR_COMMANDS; i++) {
    int indent = fprintf (fp, "  %s ", commands[i].name);
    print_args (fp, commands[i].args, indent);
    fprintf (fp, "\n      %s\n", commands[i].summary);
  }
  fprintf (fp,
           "\n"
           "SIZE is a number of bytes, optionally with a suffix k, M, G, T, P\n"
           "or E (powers of 1024), like qemu-img: 512, 64k, 1.5G.\n"
           "\n"
           "  " PROG " COMMAND --help   the command's options\n"
           "  " PROG " --help           print this help\n"
           "  " PROG " --version        print the version\n"
           "\n"
           "See qcow-tool(1) for the whole manual.\n");
}

static void
command_usage (const struct command *cmd)
{
  int indent = printf ("Usage: " PROG " %s ", cmd->name);
  print_args (stdout, cmd->args, indent);
  printf ("\n\n%s", cmd->details);
}

/* Does the subcommand's ARGV (argv[0] its name) ask for help?  Only
 * options before a "--" count. */
static bool
wants_help (int argc, char **argv)
{
  for (int i = 1; i < argc; i++) {
    if (strcmp (argv[i], "--") == 0)
      return false;
    if (strcmp (argv[i], "--help") == 0 || strcmp (argv[i], "-h") == 0)
      return true;
  }
  return false;
}

int
main (int argc, char **argv)
{
  qcow_set_error_handler (core_error);

  if (argc < 2) {
    usage (stderr);
    return 1;
  }
  if (strcmp (argv[1], "--help") == 0 || strcmp (argv[1], "-h") == 0) {
    usage (stdout);
    return flush_stdout ();
  }
  if (strcmp (argv[1], "--version") == 0 || strcmp (argv[1], "-V") == 0) {
    printf (PROG " %s\n", QCOW_LIB_VERSION);
    return flush_stdout ();
  }
  for (size_t i = 0; i < NR_COMMANDS; i++)
    if (strcmp (argv[1], commands[i].name) == 0) {
      if (wants_help (argc - 1, argv + 1)) {
        command_usage (&commands[i]);
        return flush_stdout ();
      }
      /* Hand the subcommand its own argv, with its name as argv[0], and
       * let getopt print "qcow-tool: unrecognized option" itself. */
      argv[1] = (char *) PROG;
      return commands[i].run (argc - 1, argv + 1);
    }
  fail ("unknown command '%s' (see '" PROG " --help')", argv[1]);
  return 1;
}

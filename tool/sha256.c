/* SPDX-License-Identifier: BSD-3-Clause */
/* sha256.c - SHA-256 (FIPS 180-4), for `qcow-tool sha`.
 *
 * Two block functions: portable C, and one using the x86 SHA extensions
 * (sha256rnds2, sha256msg1/2), chosen once by CPUID.  A virtual disk is
 * mostly zeros that must be hashed all the same, so the speed of the
 * block function is the speed of the command.  QCOW_TOOL_SHA_PORTABLE=1
 * in the environment forces the portable one (for the tests).
 */
#include <stdlib.h>
#include <string.h>

#include "tool.h"

static const uint32_t K[64] = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
  0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
  0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
  0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
  0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
  0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
  0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
  0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
  0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static inline uint32_t ror (uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }

static void
blocks_c (uint32_t st[8], const uint8_t *p, size_t n)
{
  for (; n > 0; n--, p += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
      w[i] = (uint32_t) p[4 * i] << 24 | (uint32_t) p[4 * i + 1] << 16 |
             (uint32_t) p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
      uint32_t s0 = ror (w[i - 15], 7) ^ ror (w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = ror (w[i - 2], 17) ^ ror (w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3];
    uint32_t e = st[4], f = st[5], g = st[6], h = st[7];
    for (int i = 0; i < 64; i++) {
      uint32_t t1 = h + (ror (e, 6) ^ ror (e, 11) ^ ror (e, 25)) +
                    ((e & f) ^ (~e & g)) + K[i] + w[i];
      uint32_t t2 = (ror (a, 2) ^ ror (a, 13) ^ ror (a, 22)) +
                    ((a & b) ^ (a & c) ^ (b & c));
      h = g; g = f; f = e; e = d + t1;
      d = c; c = b; b = a; a = t1 + t2;
    }
    st[0] += a; st[1] += b; st[2] += c; st[3] += d;
    st[4] += e; st[5] += f; st[6] += g; st[7] += h;
  }
}

#if defined __x86_64__
#include <cpuid.h>
#include <immintrin.h>

/* Sixteen groups of four rounds; message words W[16..63] are made four
 * at a time, sha256msg1 three groups ahead and sha256msg2 one ahead. */
__attribute__ ((target ("sha,sse4.1,ssse3")))
static void
blocks_ni (uint32_t st[8], const uint8_t *p, size_t n)
{
  const __m128i bswap = _mm_set_epi64x (0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i tmp = _mm_loadu_si128 ((const __m128i *) &st[0]);
  __m128i s1 = _mm_loadu_si128 ((const __m128i *) &st[4]);
  tmp = _mm_shuffle_epi32 (tmp, 0xb1);          /* CDAB */
  s1 = _mm_shuffle_epi32 (s1, 0x1b);            /* EFGH */
  __m128i s0 = _mm_alignr_epi8 (tmp, s1, 8);    /* ABEF */
  s1 = _mm_blend_epi16 (s1, tmp, 0xf0);         /* CDGH */

  for (; n > 0; n--, p += 64) {
    __m128i save0 = s0, save1 = s1, m[4], msg;
    for (int g = 0; g < 16; g++) {
      if (g < 4)
        m[g] = _mm_shuffle_epi8 (_mm_loadu_si128 ((const __m128i *) (p + 16 * g)), bswap);
      msg = _mm_add_epi32 (m[g & 3], _mm_loadu_si128 ((const __m128i *) &K[4 * g]));
      s1 = _mm_sha256rnds2_epu32 (s1, s0, msg);
      if (g >= 3 && g < 15) {
        tmp = _mm_alignr_epi8 (m[g & 3], m[(g - 1) & 3], 4);
        m[(g + 1) & 3] = _mm_sha256msg2_epu32 (_mm_add_epi32 (m[(g + 1) & 3], tmp), m[g & 3]);
      }
      msg = _mm_shuffle_epi32 (msg, 0x0e);
      s0 = _mm_sha256rnds2_epu32 (s0, s1, msg);
      if (g >= 1 && g < 13)
        m[(g - 1) & 3] = _mm_sha256msg1_epu32 (m[(g - 1) & 3], m[g & 3]);
    }
    s0 = _mm_add_epi32 (s0, save0);
    s1 = _mm_add_epi32 (s1, save1);
  }

  tmp = _mm_shuffle_epi32 (s0, 0x1b);           /* FEBA */
  s1 = _mm_shuffle_epi32 (s1, 0xb1);            /* DCHG */
  s0 = _mm_blend_epi16 (tmp, s1, 0xf0);         /* DCBA */
  s1 = _mm_alignr_epi8 (s1, tmp, 8);            /* HGFE */
  _mm_storeu_si128 ((__m128i *) &st[0], s0);
  _mm_storeu_si128 ((__m128i *) &st[4], s1);
}

static bool
have_sha_ni (void)
{
  unsigned a, b, c, d;
  if (!__get_cpuid (1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3))
    return false;
  return __get_cpuid_count (7, 0, &a, &b, &c, &d) && (b & (1u << 29));
}
#endif

static void (*blocks) (uint32_t st[8], const uint8_t *p, size_t n);

void
sha256_init (struct sha256 *s)
{
  static const uint32_t iv[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
  };
  if (!blocks) {
    blocks = blocks_c;
#if defined __x86_64__
    if (have_sha_ni () && !getenv ("QCOW_TOOL_SHA_PORTABLE"))
      blocks = blocks_ni;
#endif
  }
  memcpy (s->h, iv, sizeof iv);
  s->len = 0;
  s->nbuf = 0;
}

void
sha256_update (struct sha256 *s, const void *data, size_t len)
{
  const uint8_t *p = data;
  s->len += len;
  if (s->nbuf) {
    size_t n = 64 - s->nbuf < len ? 64 - s->nbuf : len;
    memcpy (s->buf + s->nbuf, p, n);
    s->nbuf += n;
    p += n;
    len -= n;
    if (s->nbuf < 64)
      return;
    blocks (s->h, s->buf, 1);
    s->nbuf = 0;
  }
  if (len >= 64) {
    blocks (s->h, p, len / 64);
    p += len & ~(size_t) 63;
    len &= 63;
  }
  memcpy (s->buf, p, len);
  s->nbuf = len;
}

void
sha256_final (struct sha256 *s, uint8_t digest[32])
{
  uint64_t bits = s->len * 8;
  uint8_t pad[72] = { 0x80 };
  size_t n = s->nbuf < 56 ? 56 - s->nbuf : 120 - s->nbuf;
  for (int i = 0; i < 8; i++)
    pad[n + i] = bits >> (56 - 8 * i);
  sha256_update (s, pad, n + 8);
  for (int i = 0; i < 8; i++) {
    digest[4 * i] = s->h[i] >> 24;
    digest[4 * i + 1] = s->h[i] >> 16;
    digest[4 * i + 2] = s->h[i] >> 8;
    digest[4 * i + 3] = s->h[i];
  }
}

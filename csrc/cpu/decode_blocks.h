// Building blocks of the CPU forward pass for a few query rows against many keys (a decoding
// step: the query heads of one K/V head, one or a few new tokens each).
//
// With so few rows, the general path's GEMM tiles are mostly empty and packing Kᵀ costs more than
// the product; here K and V are read in place, row after row, as they lie in memory (each
// kernel prefetching the rows a few KiB ahead, see prefetch_rows_l1), and four query rows share
// each vector:
//
// * scores: lane (r, c) of a 16-lane vector holds query row r's partial dot product over the
//   dimensions d = c mod 4. A key's 4 values k[4i..4i+3], broadcast to the four rows, meet the
//   rows' q[4i..4i+3] in one FMA, so a key costs D / 4 FMAs for 4 rows and every lane is used;
//   four keys' vectors are then reduced together ((c0 + c2) + (c1 + c3) by unpacks), giving each
//   row four scores.
// * values: o[r] += p[r][j] v[j] with v[j] read in place, the 4 rows' accumulators in registers.
//
// Each score and each output element is one fixed chain of operations, the same in the AVX-512
// and the AVX2 versions (an AVX2 register holds two rows of the quad; every shuffle used acts
// within 128-bit lanes), so the two give identical bits, as the general path's kernels do.
#pragma once

#include <cstring>

#include "blocks.h"

namespace fastattn {
namespace cpu {

constexpr int kQuadRows = 4;  // query rows per vector of the scores kernel

// A quad's query rows packed for decode_scores: vector i (16 floats) holds, at lane r * 4 + c,
// scale * q_r[4 i + c] (rows past `rows` zero). D must be a multiple of 4.
template <typename src_t>
inline void pack_query_quad(const src_t* const rows_q[kQuadRows], int rows, int64_t cs, int D, float scale,
                            float* dst) {
  for (int i = 0; i < D / 4; ++i)
    for (int r = 0; r < kQuadRows; ++r)
      for (int c = 0; c < 4; ++c)
        dst[i * 16 + r * 4 + c] = r < rows ? load_as<float>(rows_q[r] + (4 * i + c) * cs) * scale : 0.0f;
}

#if FASTATTN_X86
// Four consecutive values of a key row as floats (bf16 widened exactly: each becomes the high half
// of a float), in both 128-bit halves of an AVX2 register (one per pair of the quad's rows):
// a broadcast load, then for bf16 one in-lane interleave with zeros. Widening once and then
// inserting the half again would cost a second shuffle per 2 FMAs, which on AVX2-only cores (FMA
// and shuffles sharing ports) is what limits the bf16 scores kernel.
FASTATTN_AVX2 inline __m256 load4x2_as_float_avx2(const float* p) {
  return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
}
FASTATTN_AVX2 inline __m256 load4x2_as_float_avx2(const c10::BFloat16* p) {
  int64_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), _mm256_set1_epi64x(bits)));
}

// Eight consecutive bf16 values of a key row as two groups of four, each as load4x2_as_float_avx2
// gives it: one 16-byte broadcast load and two in-lane interleaves with zeros. Half the loads of
// two 8-byte broadcasts, and the K stream from memory is faster with fewer, wider loads (2-core
// Zen 3, one thread reading 4 rows side by side with the 4 KiB prefetch: 5.2-8.7 GB/s by 8-byte
// loads, 7.0-10.2 by 16-byte ones); the bf16 decode step, cold K/V: 1.02-1.05x faster.
FASTATTN_AVX2 inline void load8x2_as_float_pair_avx2(const c10::BFloat16* p, __m256& first, __m256& second) {
  const __m256i bits = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  first = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), bits));
  second = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), bits));
}

// The same four values in all four 128-bit lanes of an AVX-512 register (one per row of the quad):
// float, a broadcast load; bf16, a 64-bit broadcast load and one in-lane interleave with zeros
// (AVX512BW). Widening to 128 bits and then broadcasting took two shuffles per FMA, and on Intel
// cores the shuffle port is one of the two 512-bit FMA ports: the bf16 scores ran at half speed.
FASTATTN_AVX512 inline __m512 load4x4_as_float_avx512(const float* p) {
  return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
}
FASTATTN_AVX512 inline __m512 load4x4_as_float_avx512(const c10::BFloat16* p) {
  int64_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), _mm512_set1_epi64(bits)));
}

// Four keys' partial sums (lane r * 4 + c of each) to their scores: lane r * 4 + t is key t's
// score for row r, ((c0 + c2) + (c1 + c3)). Within 128-bit lanes: the same for AVX2 and AVX-512.
FASTATTN_AVX2 inline __m256 reduce_quad_keys_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))),
                       _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))));
}

FASTATTN_AVX512 inline __m512 reduce_quad_keys_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
}

// Row r's four scores (128-bit lane r of sq) to s + r * lds. The lane index is an immediate of the
// instruction: spelled out, not a loop (an unoptimised build would not unroll it).
FASTATTN_AVX512 inline void store_quad_scores_avx512(__m512 sq, float* s, int64_t lds) {
  static_assert(kQuadRows == 4, "one 128-bit lane per row");
  _mm_storeu_ps(s, _mm512_extractf32x4_ps(sq, 0));
  _mm_storeu_ps(s + lds, _mm512_extractf32x4_ps(sq, 1));
  _mm_storeu_ps(s + 2 * lds, _mm512_extractf32x4_ps(sq, 2));
  _mm_storeu_ps(s + 3 * lds, _mm512_extractf32x4_ps(sq, 3));
}

// s[r * lds + j] = q_r . k_j for the rows of `quads` quads and keys j < n (key j's row at k + j * ks, unit
// stride along d; quad g's vectors at qq + g * kQuadRows * D, its scores at s + g * kQuadRows * lds). Keys are
// taken four at a time, every quad in turn: the four rows stay in L1 for all of them, and K streams from
// memory at the pace of the whole computation. Quad after quad over the whole block left the memory idle
// during the later quads while the first one waited on it: this order is 1.09x faster at 4 quads in float
// with cold K/V on the 2-core Zen 3 (bf16, more compute per byte: within the noise). A last group of fewer keys
// re-reads key n - 1 and writes its extra scores at j < round_up(n, 4), which lds must allow for. Rows
// j < avail of k may be read (avail >= n, or 0): the kernel prefetches those ahead of the ones it uses
// (0: none).
template <typename src_t>
FASTATTN_AVX2 void decode_scores_avx2(const float* qq, int quads, const src_t* k, int64_t ks, int n, int D, float* s,
                                      int64_t lds, int avail = 0) {
  const int ahead = prefetch_distance_rows<src_t>(D);
  for (int j = 0; j < n; j += 4) {
    prefetch_rows_l1(k, ks, j + ahead, j + ahead + 4, avail, D);
    const src_t* kr[4];
    for (int t = 0; t < 4; ++t) kr[t] = k + std::min(j + t, n - 1) * ks;
    for (int g = 0; g < quads; ++g) {
      const float* qg = qq + static_cast<int64_t>(g) * kQuadRows * D;
      float* sg = s + static_cast<int64_t>(g) * kQuadRows * lds + j;
      __m256 acc[4][2];  // [key][rows 0-1, rows 2-3]
      for (int t = 0; t < 4; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
      int i = 0;
      if constexpr (std::is_same_v<src_t, c10::BFloat16>) {  // two groups of 4 per load; same FMA chains
        for (; i + 2 <= D / 4; i += 2) {
          const __m256 qa01 = _mm256_loadu_ps(qg + i * 16), qa23 = _mm256_loadu_ps(qg + i * 16 + 8);
          const __m256 qb01 = _mm256_loadu_ps(qg + i * 16 + 16), qb23 = _mm256_loadu_ps(qg + i * 16 + 24);
#pragma GCC unroll 4
          for (int t = 0; t < 4; ++t) {
            __m256 ka, kb;
            load8x2_as_float_pair_avx2(kr[t] + 4 * i, ka, kb);
            acc[t][0] = _mm256_fmadd_ps(ka, qa01, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(ka, qa23, acc[t][1]);
            acc[t][0] = _mm256_fmadd_ps(kb, qb01, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(kb, qb23, acc[t][1]);
          }
        }
      }
      for (; i < D / 4; ++i) {
        const __m256 q01 = _mm256_loadu_ps(qg + i * 16), q23 = _mm256_loadu_ps(qg + i * 16 + 8);
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) {
          const __m256 kk = load4x2_as_float_avx2(kr[t] + 4 * i);
          acc[t][0] = _mm256_fmadd_ps(kk, q01, acc[t][0]);
          acc[t][1] = _mm256_fmadd_ps(kk, q23, acc[t][1]);
        }
      }
      const __m256 s01 = reduce_quad_keys_avx2(acc[0][0], acc[1][0], acc[2][0], acc[3][0]);
      const __m256 s23 = reduce_quad_keys_avx2(acc[0][1], acc[1][1], acc[2][1], acc[3][1]);
      _mm_storeu_ps(sg, _mm256_castps256_ps128(s01));
      _mm_storeu_ps(sg + lds, _mm256_extractf128_ps(s01, 1));
      _mm_storeu_ps(sg + 2 * lds, _mm256_castps256_ps128(s23));
      _mm_storeu_ps(sg + 3 * lds, _mm256_extractf128_ps(s23, 1));
    }
  }
}

// The same, 8 keys at a time for one quad (eight independent FMA chains) (_one); for kQuads quads
// at once (their vectors kQuadRows * D apart in qq, their scores kQuadRows * lds apart in s), 4
// keys at a time, each key's broadcast serving every quad.
template <typename src_t>
FASTATTN_AVX512 void decode_scores_avx512_one(const float* qq, const src_t* k, int64_t ks, int n, int D, float* s,
                                              int64_t lds, int avail) {
  const int ahead = prefetch_distance_rows<src_t>(D);
  for (int j = 0; j < n; j += 8) {
    prefetch_rows_l1(k, ks, j + ahead, j + ahead + 8, avail, D);
    const src_t* kr[8];
    for (int t = 0; t < 8; ++t) kr[t] = k + std::min(j + t, n - 1) * ks;
    __m512 acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = _mm512_setzero_ps();
    for (int i = 0; i < D / 4; ++i) {
      const __m512 q = _mm512_loadu_ps(qq + i * 16);
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) acc[t] = _mm512_fmadd_ps(load4x4_as_float_avx512(kr[t] + 4 * i), q, acc[t]);
    }
    for (int g = 0; g < 2 && j + 4 * g < n; ++g) {
      const __m512 sq = reduce_quad_keys_avx512(acc[4 * g], acc[4 * g + 1], acc[4 * g + 2], acc[4 * g + 3]);
      store_quad_scores_avx512(sq, s + j + 4 * g, lds);
    }
  }
}

template <int kQuads, typename src_t>
FASTATTN_AVX512 void decode_scores_avx512(const float* qq, const src_t* k, int64_t ks, int n, int D, float* s,
                                          int64_t lds, int avail) {
  static_assert(kQuads >= 2 && kQuads <= 4, "one quad takes decode_scores_avx512_one");
  constexpr int kKeys = 4;
  const int ahead = prefetch_distance_rows<src_t>(D);
  for (int j = 0; j < n; j += kKeys) {
    prefetch_rows_l1(k, ks, j + ahead, j + ahead + kKeys, avail, D);
    const src_t* kr[kKeys];
    for (int t = 0; t < kKeys; ++t) kr[t] = k + std::min(j + t, n - 1) * ks;
    __m512 acc[kQuads][kKeys];
    for (int g = 0; g < kQuads; ++g)
      for (int t = 0; t < kKeys; ++t) acc[g][t] = _mm512_setzero_ps();
    for (int i = 0; i < D / 4; ++i) {
      __m512 q[kQuads];
      for (int g = 0; g < kQuads; ++g) q[g] = _mm512_loadu_ps(qq + static_cast<int64_t>(g) * kQuadRows * D + i * 16);
#pragma GCC unroll 8
      for (int t = 0; t < kKeys; ++t) {
        const __m512 kk = load4x4_as_float_avx512(kr[t] + 4 * i);
        for (int g = 0; g < kQuads; ++g) acc[g][t] = _mm512_fmadd_ps(kk, q[g], acc[g][t]);
      }
    }
    for (int g = 0; g < kQuads; ++g)
      for (int t0 = 0; t0 < kKeys && j + t0 < n; t0 += 4) {
        const __m512 sq = reduce_quad_keys_avx512(acc[g][t0], acc[g][t0 + 1], acc[g][t0 + 2], acc[g][t0 + 3]);
        float* sg = s + static_cast<int64_t>(g) * kQuadRows * lds + j + t0;
        store_quad_scores_avx512(sq, sg, lds);
      }
  }
}

// decode_scores_avx512 over `quads` quads, up to 4 at once; the first call prefetches.
template <typename src_t>
FASTATTN_AVX512 void decode_scores_avx512(const float* qq, int quads, const src_t* k, int64_t ks, int n, int D,
                                          float* s, int64_t lds, int avail = 0) {
  for (int g = 0; g < quads; g += 4) {
    const float* qg = qq + static_cast<int64_t>(g) * kQuadRows * D;
    float* sg = s + static_cast<int64_t>(g) * kQuadRows * lds;
    const int pf = g == 0 ? avail : 0;
    switch (std::min(4, quads - g)) {
      case 1: decode_scores_avx512_one(qg, k, ks, n, D, sg, lds, pf); break;
      case 2: decode_scores_avx512<2>(qg, k, ks, n, D, sg, lds, pf); break;
      case 3: decode_scores_avx512<3>(qg, k, ks, n, D, sg, lds, pf); break;
      default: decode_scores_avx512<4>(qg, k, ks, n, D, sg, lds, pf); break;
    }
  }
}

// bf16 V on AVX2: 16 columns at a time are widened as even and odd columns (a shift and a mask of
// the 8 dwords, each holding two bf16) instead of two halves (two widening shuffles and two
// shifts): half the conversion work, which competes with the FMAs for ports on AVX2-only cores.
// The output rows then stay in that order for the whole task (the "strip layout": each whole
// group of 16 columns holds its 8 even columns, then its 8 odd ones; a last group of 8 is in
// order), and decode_values_to_natural_avx2 puts them back once at the end. Permuting in and
// out per chunk instead took 32 shuffles per 64 FMAs with one quad's 2 KiB chunks (the bf16
// decode step, cold K/V, 2-core Zen 3: 1.01-1.03x slower). Each element's FMA chain is the same.
FASTATTN_AVX2 inline void decode_values_to_natural_avx2(float* o, int rows, int Dv) {
  for (int r = 0; r < rows; ++r)
    for (int d0 = 0; d0 + 16 <= Dv; d0 += 16) {
      float* x = o + static_cast<int64_t>(r) * Dv + d0;
      const __m256 even = _mm256_loadu_ps(x), odd = _mm256_loadu_ps(x + 8);
      // columns (0-3 | 8-11) and (4-7 | 12-15), then their 128-bit halves into order
      const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
      _mm256_storeu_ps(x, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(x + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
}

// One strip of the values kernel: columns [0, kCols) of o and of v's rows (8, 16 or, for float V,
// 24: 12 accumulators, so that the FMA chains, one per accumulator and 4 cycles long, leave the
// two FMA pipes some slack), keys [j0, j1). kPrefetch: the strip that asks for V's rows `ahead`
// of the ones it reads.
template <int kCols, bool kPrefetch, typename src_t>
FASTATTN_AVX2 inline void decode_values_strip_avx2(const float* p, int64_t ldp, const src_t* v, int64_t vs, int j0,
                                                   int j1, int Dv, float* o, int ahead, int avail) {
  static_assert(kCols == 8 || kCols == 16 || (kCols == 24 && std::is_same_v<src_t, float>),
                "one to three registers per row");
  if constexpr (kCols == 16 && std::is_same_v<src_t, c10::BFloat16>) {
    __m256 even[kQuadRows], odd[kQuadRows];  // o in the strip layout
    for (int r = 0; r < kQuadRows; ++r) {
      even[r] = _mm256_loadu_ps(o + r * Dv);
      odd[r] = _mm256_loadu_ps(o + r * Dv + 8);
    }
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int j = j0; j < j1; ++j) {
      if constexpr (kPrefetch) prefetch_rows_l1(v, vs, j + ahead, j + ahead + 1, avail, Dv);
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j * vs));
      const __m256 ve = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
      const __m256 vo = _mm256_castsi256_ps(_mm256_and_si256(bits, high));
#pragma GCC unroll 4
      for (int r = 0; r < kQuadRows; ++r) {
        const __m256 pr = _mm256_broadcast_ss(p + r * ldp + j);
        even[r] = _mm256_fmadd_ps(pr, ve, even[r]);
        odd[r] = _mm256_fmadd_ps(pr, vo, odd[r]);
      }
    }
    for (int r = 0; r < kQuadRows; ++r) {
      _mm256_storeu_ps(o + r * Dv, even[r]);
      _mm256_storeu_ps(o + r * Dv + 8, odd[r]);
    }
  } else {
    constexpr int kRegs = kCols / 8;
    __m256 acc[kQuadRows][kRegs];
    for (int r = 0; r < kQuadRows; ++r)
      for (int x = 0; x < kRegs; ++x) acc[r][x] = _mm256_loadu_ps(o + r * Dv + 8 * x);
    for (int j = j0; j < j1; ++j) {
      if constexpr (kPrefetch) prefetch_rows_l1(v, vs, j + ahead, j + ahead + 1, avail, Dv);
      __m256 vv[kRegs];
      for (int x = 0; x < kRegs; ++x) vv[x] = load8_as_float_avx2(v + j * vs + 8 * x);
#pragma GCC unroll 4
      for (int r = 0; r < kQuadRows; ++r) {
        const __m256 pr = _mm256_broadcast_ss(p + r * ldp + j);
        for (int x = 0; x < kRegs; ++x) acc[r][x] = _mm256_fmadd_ps(pr, vv[x], acc[r][x]);
      }
    }
    for (int r = 0; r < kQuadRows; ++r)
      for (int x = 0; x < kRegs; ++x) _mm256_storeu_ps(o + r * Dv + 8 * x, acc[r][x]);
  }
}

// The strip at column d0; the first one (d0 == 0) prefetches, when avail allows.
template <int kCols, typename src_t>
FASTATTN_AVX2 inline void decode_values_strip_at_avx2(const float* p, int64_t ldp, const src_t* v, int64_t vs, int j0,
                                                      int j1, int Dv, float* o, int d0, int ahead, int avail) {
  if (d0 == 0)
    decode_values_strip_avx2<kCols, true>(p, ldp, v, vs, j0, j1, Dv, o, ahead, avail);
  else
    decode_values_strip_avx2<kCols, false>(p, ldp, v + d0, vs, j0, j1, Dv, o + d0, ahead, avail);
}

// V rows are taken by chunks, each read by every strip (and every quad) of the values kernel while it
// is in L1: the whole block's float V (64 rows of 512 B at D=128) is all of a 32 KiB L1, so strips after
// the first found their rows in L2. With one quad (a decoding step of few query heads per K/V head:
// memory-bound), chunks of 2 KiB: the first strip, which reads V from memory, then runs at the pace of
// all of them, and the rows it prefetches arrive while the others work (cold K/V on the 2-core Zen 3,
// chunks of 8 KiB before: 1.03-1.10x faster in float, 1.09-1.13x in bf16). With several quads
// (compute-bound), 8 KiB of float V, or the whole block of bf16 V (chosen when its strips paid a permute
// in and out per chunk; since they keep the strip layout, bf16 with 2-8 quads measured 0.94-1.13x with
// 2 KiB chunks and 0.99-1.02x with 8 KiB ones: within this host's noise, so left as it was).
constexpr int kValuesChunkBytesOneQuad = 2048;
constexpr int kValuesChunkBytesFloat = 8192;
// Columns of the AVX2 values kernel's wide strips (float V: 3 registers per row, bf16 V: 2); a
// row's last 8 or 16 columns take a narrower strip.
constexpr int kValuesStripColsFloat = 24;
constexpr int kValuesStripColsBf16 = 16;
// Columns of the AVX-512 values kernel's strips (4 registers per row, float or bf16 V; a bf16 strip
// of this width takes the even/odd kernel); a row's last part takes fewer registers.
constexpr int kValuesStripColsAvx512 = 64;

// o[r * Dv + d] += sum_j p[r * ldp + j] v[j][d] for the rows of `quads` quads (quad g's probabilities at
// p + g * kQuadRows * ldp, its outputs at o + g * kQuadRows * Dv), keys j < n in order (key j's row at
// v + j * vs, unit stride along d), Dv a multiple of 8. Each o element is one chain of FMAs over j (a
// chunk's partial sums go through o, exactly). Every quad takes a chunk in turn while it is in L1.
// avail: as for decode_scores_avx2. For bf16 V, o is in the strip layout (above) before and after.
template <typename src_t>
FASTATTN_AVX2 void decode_values_avx2(const float* p, int quads, int64_t ldp, const src_t* v, int64_t vs, int n,
                                      int Dv, float* o, int avail = 0) {
  const int ahead = prefetch_distance_rows<src_t>(Dv);
  const int row_bytes = Dv * static_cast<int>(sizeof(src_t));
  const int chunk = quads == 1                      ? std::max(1, kValuesChunkBytesOneQuad / row_bytes)
                    : std::is_same_v<src_t, float> ? std::max(1, kValuesChunkBytesFloat / row_bytes)
                                                   : std::max(n, 1);
  constexpr int kWide = std::is_same_v<src_t, float> ? kValuesStripColsFloat : kValuesStripColsBf16;
  for (int j0 = 0; j0 < n; j0 += chunk) {
    const int j1 = std::min(n, j0 + chunk);
    for (int g = 0; g < quads; ++g) {
      const float* pg = p + static_cast<int64_t>(g) * kQuadRows * ldp;
      float* og = o + static_cast<int64_t>(g) * kQuadRows * Dv;
      const int pf = g == 0 ? avail : 0;  // the first quad's first strip prefetches
      // Wide strips, then the row's last 16 or 8 columns (Dv is a multiple of 8)
      for (int d0 = 0; d0 < Dv;) {
        const int left = Dv - d0;
        if (left >= kWide) {
          decode_values_strip_at_avx2<kWide>(pg, ldp, v, vs, j0, j1, Dv, og, d0, ahead, pf);
          d0 += kWide;
        } else if (left >= 16) {
          decode_values_strip_at_avx2<16>(pg, ldp, v, vs, j0, j1, Dv, og, d0, ahead, pf);
          d0 += 16;
        } else {
          decode_values_strip_at_avx2<8>(pg, ldp, v, vs, j0, j1, Dv, og, d0, ahead, pf);
          d0 += 8;
        }
      }
    }
  }
}

// 16 consecutive values as floats, or only the first 8 (the rest zero) when `half`: Dv is a
// multiple of 8, so a row's last part is 16, 8 or nothing.
FASTATTN_AVX512 inline __m512 load16_as_float_avx512(const float* p, bool half) {
  return half ? _mm512_castps256_ps512(_mm256_loadu_ps(p)) : _mm512_loadu_ps(p);
}
FASTATTN_AVX512 inline __m512 load16_as_float_avx512(const c10::BFloat16* p, bool half) {
  const __m256i bits = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                            : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// bf16 V on AVX-512, a strip of kValuesStripColsAvx512 = 64 columns: as in the AVX2 kernel, 32
// columns at a time are widened as even and odd columns (a shift and an and of the 16 dwords, each
// holding two bf16) instead of two widening shuffles and two shifts; the accumulators hold o's
// columns de-interleaved, permuted in and out once per strip. On Intel cores the widening shuffle
// takes a 512-bit FMA port. Each element's FMA chain is unchanged.
FASTATTN_AVX512 inline void decode_values_strip_bf16_avx512(const float* p, int64_t ldp, const c10::BFloat16* v,
                                                              int64_t vs, int n, int Dv, float* o, bool prefetch,
                                                              int ahead, int avail) {
  static_assert(kValuesStripColsAvx512 == 64, "two halves of 32 columns, each two registers");
  // lane i of `even` is column 2i of the 32 (a: columns 0-15, b: 16-31), of `odd` column 2i + 1
  const __m512i even_cols = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_cols = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i low_cols = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i high_cols = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i high_halves = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 even[kQuadRows][2], odd[kQuadRows][2];  // [row][32-column half of the strip]
  for (int r = 0; r < kQuadRows; ++r)
    for (int x = 0; x < 2; ++x) {
      const __m512 a = _mm512_loadu_ps(o + r * Dv + 32 * x), b = _mm512_loadu_ps(o + r * Dv + 32 * x + 16);
      even[r][x] = _mm512_permutex2var_ps(a, even_cols, b);
      odd[r][x] = _mm512_permutex2var_ps(a, odd_cols, b);
    }
  for (int j = 0; j < n; ++j) {
    if (prefetch) prefetch_rows_l1(v, vs, j + ahead, j + ahead + 1, avail, Dv);
    __m512 ve[2], vo[2];
    for (int x = 0; x < 2; ++x) {
      const __m512i bits = _mm512_loadu_si512(v + j * vs + 32 * x);
      ve[x] = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
      vo[x] = _mm512_castsi512_ps(_mm512_and_si512(bits, high_halves));
    }
#pragma GCC unroll 4
    for (int r = 0; r < kQuadRows; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * ldp + j]);
      for (int x = 0; x < 2; ++x) {
        even[r][x] = _mm512_fmadd_ps(pr, ve[x], even[r][x]);
        odd[r][x] = _mm512_fmadd_ps(pr, vo[x], odd[r][x]);
      }
    }
  }
  for (int r = 0; r < kQuadRows; ++r)
    for (int x = 0; x < 2; ++x) {
      _mm512_storeu_ps(o + r * Dv + 32 * x, _mm512_permutex2var_ps(even[r][x], low_cols, odd[r][x]));
      _mm512_storeu_ps(o + r * Dv + 32 * x + 16, _mm512_permutex2var_ps(even[r][x], high_cols, odd[r][x]));
    }
}

// The same, 64 columns (4 registers per row) at a time; a row's last part takes fewer registers.
template <typename src_t>
FASTATTN_AVX512 void decode_values_avx512(const float* p, int64_t ldp, const src_t* v, int64_t vs, int n, int Dv,
                                          float* o, int avail = 0) {
  constexpr int kRegs = kValuesStripColsAvx512 / 16;
  const int ahead = prefetch_distance_rows<src_t>(Dv);
  for (int d0 = 0; d0 < Dv; d0 += 16 * kRegs) {
    const int cols = std::min(16 * kRegs, Dv - d0);  // a multiple of 8
    if constexpr (std::is_same_v<src_t, c10::BFloat16>) {
      if (cols == 16 * kRegs) {
        decode_values_strip_bf16_avx512(p, ldp, v + d0, vs, n, Dv, o + d0, d0 == 0, ahead, avail);
        continue;
      }
    }
    const int regs = (cols + 15) / 16;
    const bool half = cols % 16 != 0;  // the last register holds 8 columns
    const __mmask16 last = half ? __mmask16(0x00FF) : __mmask16(0xFFFF);
    __m512 acc[kQuadRows][kRegs];
    for (int r = 0; r < kQuadRows; ++r)
      for (int x = 0; x < kRegs; ++x)
        acc[r][x] = x < regs ? _mm512_maskz_loadu_ps(x == regs - 1 ? last : __mmask16(0xFFFF), o + r * Dv + d0 + 16 * x)
                             : _mm512_setzero_ps();
    if (regs == kRegs && !half) {
      for (int j = 0; j < n; ++j) {
        if (d0 == 0) prefetch_rows_l1(v, vs, j + ahead, j + ahead + 1, avail, Dv);
        const src_t* vr = v + j * vs + d0;
        __m512 vv[kRegs];
        for (int x = 0; x < kRegs; ++x) vv[x] = load16_as_float_avx512(vr + 16 * x, false);
#pragma GCC unroll 4
        for (int r = 0; r < kQuadRows; ++r) {
          const __m512 pr = _mm512_set1_ps(p[r * ldp + j]);
          for (int x = 0; x < kRegs; ++x) acc[r][x] = _mm512_fmadd_ps(pr, vv[x], acc[r][x]);
        }
      }
    } else {
      for (int j = 0; j < n; ++j) {
        if (d0 == 0) prefetch_rows_l1(v, vs, j + ahead, j + ahead + 1, avail, Dv);
        const src_t* vr = v + j * vs + d0;
        __m512 vv[kRegs];
        for (int x = 0; x < regs; ++x) vv[x] = load16_as_float_avx512(vr + 16 * x, half && x == regs - 1);
        for (int r = 0; r < kQuadRows; ++r) {
          const __m512 pr = _mm512_set1_ps(p[r * ldp + j]);
          for (int x = 0; x < regs; ++x) acc[r][x] = _mm512_fmadd_ps(pr, vv[x], acc[r][x]);
        }
      }
    }
    for (int r = 0; r < kQuadRows; ++r)
      for (int x = 0; x < regs; ++x)
        _mm512_mask_storeu_ps(o + r * Dv + d0 + 16 * x, x == regs - 1 ? last : __mmask16(0xFFFF), acc[r][x]);
  }
}
#endif

}  // namespace cpu
}  // namespace fastattn

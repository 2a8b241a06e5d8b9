// Per-row mask and dropout helpers shared by the CPU forward and backward kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>

#include "../philox.h"
#include "attention_cpu.h"
#include "blocks.h"

namespace fastattn {
namespace cpu {

constexpr int kDropoutKeysPerDraw = 4;  // one Philox4x32 draw gives the words of 4 consecutive keys
constexpr int kDropoutSimdKeys = 32;    // keys of one 8-lane AVX2 Philox call

// bias[c] = additive logit bias of key kb + c for query row (b, h, i), in base-2
// units (float masks are scaled by log2(e); a False in a bool mask gives -inf).
// Returns 1 + the index of the last visible key (0: every key of the segment is masked out),
// so that a caller can trim a block whose tail is hidden (right padding) or skip it.
template <typename acc_t>
int fill_mask_bias(const AttnParams& p, int64_t b, int64_t h, int64_t i, int64_t kb, int n, acc_t* bias) {
  const auto& s = p.mask_strides;
  const int64_t base = b * s.b + h * s.h + i * s.n + kb * s.d;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t log2e = static_cast<acc_t>(1.4426950408889634);
  int visible_end = 0;
  auto fill = [&](auto* m, auto to_bias) {
    for (int c = 0; c < n; ++c) {
      bias[c] = to_bias(m[base + c * s.d]);
      if (bias[c] != kNegInf) visible_end = c + 1;
    }
  };
  switch (p.mask_dtype) {
    case at::kBool:
      fill(static_cast<const bool*>(p.mask), [&](bool v) { return v ? acc_t(0) : kNegInf; });
      break;
    case at::kFloat:
      fill(static_cast<const float*>(p.mask), [&](float v) { return static_cast<acc_t>(v) * log2e; });
      break;
    case at::kDouble:
      fill(static_cast<const double*>(p.mask), [&](double v) { return static_cast<acc_t>(v) * log2e; });
      break;
    case at::kHalf:
      fill(static_cast<const c10::Half*>(p.mask), [&](c10::Half v) { return static_cast<acc_t>(v) * log2e; });
      break;
    case at::kBFloat16:
      fill(static_cast<const c10::BFloat16*>(p.mask), [&](c10::BFloat16 v) { return static_cast<acc_t>(v) * log2e; });
      break;
    default:
      TORCH_CHECK(false, "fastattn: unsupported attn_mask dtype ", p.mask_dtype);
  }
  return visible_end;
}

#if FASTATTN_X86
// Philox4x32-10 of 8 consecutive counters c0 = c0_first + lane (c1, c2, c3 shared), eight
// lanes at a time, returned as the random words of 32 consecutive keys in key order. Bit for
// bit the same as philox4x32_10 in csrc/philox.h (the dropout tests check it against the reference).
FASTATTN_AVX2 inline void philox4x32_10_x8(uint32_t c0_first, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed,
                                           __m256i out[4]) {
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c0_first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1)), x2 = _mm256_set1_epi32(static_cast<int>(c2));
  __m256i x3 = _mm256_set1_epi32(static_cast<int>(c3));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // 32 x 32 -> 64-bit products of all 8 lanes: even lanes directly, odd lanes shifted down.
  auto mulhilo = [](__m256i a, __m256i m, __m256i& hi, __m256i& lo) FASTATTN_AVX2 {
    const __m256i even = _mm256_mul_epu32(a, m);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  };
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(x0, m0, hi0, lo0);
    mulhilo(x2, m1, hi1, lo1);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(k0)));
    x1 = lo1;
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(k1)));
    x3 = lo0;
  }
  // 4 x 8 transpose into key order: key 4 * lane + w is word w of counter lane.
  const __m256i t0 = _mm256_unpacklo_epi32(x0, x1), t1 = _mm256_unpackhi_epi32(x0, x1);
  const __m256i t2 = _mm256_unpacklo_epi32(x2, x3), t3 = _mm256_unpackhi_epi32(x2, x3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // counters 0|4, 1|5
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // counters 2|6, 3|7
  out[0] = _mm256_permute2x128_si256(u0, u1, 0x20);  // keys 0..7
  out[1] = _mm256_permute2x128_si256(u2, u3, 0x20);  // keys 8..15
  out[2] = _mm256_permute2x128_si256(u0, u1, 0x31);  // keys 16..23
  out[3] = _mm256_permute2x128_si256(u2, u3, 0x31);  // keys 24..31
}

// The float, AVX2 part of apply_dropout_keep: keys in steps of 32 (kb a multiple of 4).
// Returns how many keys it did.
FASTATTN_AVX2 inline int apply_dropout_keep_avx2(const AttnParams& p, uint32_t threshold, uint32_t c1, uint32_t c2,
                                                 int64_t kb, int n, float* x) {
  __m256i words[4];
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i thr = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(threshold)), sign);
  const __m256 one = _mm256_set1_ps(1.0f);
  int c = 0;
  for (; c + kDropoutSimdKeys <= n; c += kDropoutSimdKeys) {
    philox4x32_10_x8(static_cast<uint32_t>((kb + c) >> 2), c1, c2, static_cast<uint32_t>(p.offset), p.seed, words);
    for (int g = 0; g < 4; ++g) {
      // unsigned word < threshold (dropped), as a signed compare of sign-flipped values
      const __m256i dropped = _mm256_cmpgt_epi32(thr, _mm256_xor_si256(words[g], sign));
      const __m256 factor = _mm256_andnot_ps(_mm256_castsi256_ps(dropped), one);
      _mm256_storeu_ps(x + c + 8 * g, _mm256_mul_ps(_mm256_loadu_ps(x + c + 8 * g), factor));
    }
  }
  return c;
}
#endif

// x[c] *= keep(segment, row i, key kb + c) for c < n: the dropout keep-mask, 0 or 1
// (a multiply, not an assignment, so that a NaN stays NaN).
template <typename acc_t>
void apply_dropout_keep(const AttnParams& p, uint32_t threshold, int64_t segment, int64_t i, int64_t kb, int n,
                        acc_t* x) {
  const uint32_t c1 = static_cast<uint32_t>(i), c2 = static_cast<uint32_t>(segment);
  const uint32_t c3 = static_cast<uint32_t>(p.offset);
  int c = 0;
#if FASTATTN_X86
  static const bool avx2 = cpu_has_avx2_fma();
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2 && (kb & 3) == 0) c = apply_dropout_keep_avx2(p, threshold, c1, c2, kb, n, x);
  }
#endif
  while (c < n) {
    const int64_t j = kb + c;
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(j >> 2), c1, c2, c3, p.seed);
    for (int w = static_cast<int>(j & 3); w < 4 && c < n; ++w, ++c)
      if (r.w[w] < threshold) x[c] *= acc_t(0);
  }
}

}  // namespace cpu
}  // namespace fastattn

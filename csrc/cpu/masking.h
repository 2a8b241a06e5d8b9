// Per-row helpers shared by the CPU forward and backward kernels: masks, dropout, soft-cap, ALiBi.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>

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
  __m256i x0 =
      _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c0_first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
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

// ---------------------------------------------------------------------------
// Logit variants: soft-capping and ALiBi, row by row.
// ---------------------------------------------------------------------------
#if FASTATTN_X86
// tanh of 8 floats: a [13/6] rational approximation on [-7.9, 7.9] (where tanh is 1 to float
// precision outside), within 4e-7 of tanh everywhere; an exp-based 1 - 2 / (e^2x + 1) loses
// the relative accuracy near 0 that a soft-capped logit needs. NaN stays NaN.
FASTATTN_AVX2 inline __m256 tanh_avx2(__m256 x) {
  const __m256 bound = _mm256_set1_ps(7.90531110763549805f);
  x = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), bound), _mm256_min_ps(bound, x));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-2.76076847742355e-16f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.00018790482477e-13f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-8.60467152213735e-11f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(5.12229709037114e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.48572235717979e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(6.37261928875436e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(4.89352455891786e-03f));
  p = _mm256_mul_ps(p, x);
  __m256 q = _mm256_set1_ps(1.19825839466702e-06f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(1.18534705686654e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(2.26843463243900e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(4.89352518554385e-03f));
  return _mm256_div_ps(p, q);
}

FASTATTN_AVX2 inline void softcap_row_avx2(float* x, int n, float in_scale, float out_scale) {
  const __m256 vi = _mm256_set1_ps(in_scale), vo = _mm256_set1_ps(out_scale);
  int c = 0;
  for (; c + kSimdFloats <= n; c += kSimdFloats)
    _mm256_storeu_ps(x + c, _mm256_mul_ps(vo, tanh_avx2(_mm256_mul_ps(vi, _mm256_loadu_ps(x + c)))));
  for (; c < n; ++c) x[c] = out_scale * std::tanh(in_scale * x[c]);
}
#endif

// x[c] = out_scale * tanh(in_scale * x[c]) for c < n: Gemma 2's soft-cap on a row of logits.
template <typename acc_t>
void softcap_row(acc_t* x, int n, acc_t in_scale, acc_t out_scale) {
#if FASTATTN_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    static const bool avx2 = cpu_has_avx2_fma();
    if (avx2) return softcap_row_avx2(x, n, in_scale, out_scale);
  }
#endif
  for (int c = 0; c < n; ++c) x[c] = out_scale * std::tanh(in_scale * x[c]);
}

// out[c] = (bias ? bias[c] : 0) - slope * |diagonal - c| for c in [lo, hi): the ALiBi bias of
// the keys kb + c of a row whose diagonal is key kb + diagonal (slope in the kernel's base-2 units).
template <typename acc_t>
void alibi_row(acc_t* out, const acc_t* bias, int lo, int hi, acc_t slope, int64_t diagonal) {
  for (int c = lo; c < hi; ++c) {
    const acc_t distance = static_cast<acc_t>(std::abs(diagonal - c));
    out[c] = (bias ? bias[c] : acc_t(0)) - slope * distance;
  }
}

}  // namespace cpu
}  // namespace fastattn

// Per-row mask and dropout helpers shared by the CPU forward and backward kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>

#include "../philox.h"
#include "attention_cpu.h"

namespace fastattn {
namespace cpu {

// bias[c] = additive logit bias of key kb + c for query row (b, h, i), in base-2
// units (float masks are scaled by log2(e); a False in a bool mask gives -inf).
// Returns false when every key of the row segment is masked out (bias all -inf).
template <typename acc_t>
bool fill_mask_bias(const AttnParams& p, int64_t b, int64_t h, int64_t i, int64_t kb, int n, acc_t* bias) {
  const auto& s = p.mask_strides;
  const int64_t base = b * s.b + h * s.h + i * s.n + kb * s.d;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t log2e = static_cast<acc_t>(1.4426950408889634);
  bool any = false;
  auto fill = [&](auto* m, auto to_bias) {
    for (int c = 0; c < n; ++c) {
      bias[c] = to_bias(m[base + c * s.d]);
      any |= bias[c] != kNegInf;
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
  return any;
}

// x[c] *= keep(segment, row i, key kb + c) for c < n: the dropout keep-mask, 0 or 1.
template <typename acc_t>
void apply_dropout_keep(const AttnParams& p, uint32_t threshold, int64_t segment, int64_t i, int64_t kb, int n,
                        acc_t* x) {
  const uint32_t c1 = static_cast<uint32_t>(i), c2 = static_cast<uint32_t>(segment);
  const uint32_t c3 = static_cast<uint32_t>(p.offset);
  int c = 0;
  while (c < n) {
    const int64_t j = kb + c;
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(j >> 2), c1, c2, c3, p.seed);
    for (int w = static_cast<int>(j & 3); w < 4 && c < n; ++w, ++c)
      if (r.w[w] < threshold) x[c] *= acc_t(0);  // multiply: a NaN stays NaN
  }
}

}  // namespace cpu
}  // namespace fastattn

// Shared description of one attention call for the CPU kernels.
//
// Dense and packed (varlen) inputs are both seen as a set of segments
// (batch b, head h), each a (rows x head_dim) matrix with a row stride; so
// the forward and backward kernels are written once for both layouts.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fastattn {
namespace cpu {

// Which (query row, key) pairs of one segment the causal structure and the sliding window let
// through. Row i's diagonal is key d(i) = i + offset (offset 0: top-left aligned, torch's
// is_causal; Nk - Nq: bottom-right, flash-attn's); it sees keys d(i) - left <= j <= d(i) + right
// (-1: unbounded on that side; causal is right = 0), i.e. [key_begin(i), key_end(i)), and key j
// is seen by rows [row_begin(j), row_end(j)). All four are non-decreasing. Both kernels take every
// loop bound from here, so that a block range can never come out negative (a row block above
// the diagonal, a key block past the last query, a block left of the window).
struct VisibleBand {
  int64_t nq, nk;
  int64_t offset;  // d(i) - i
  int64_t left, right;
  int64_t key_begin(int64_t i) const { return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, nk); }
  int64_t key_end(int64_t i) const { return right < 0 ? nk : std::clamp<int64_t>(i + offset + right + 1, 0, nk); }
  int64_t row_begin(int64_t j) const { return right < 0 ? 0 : std::clamp<int64_t>(j - offset - right, 0, nq); }
  int64_t row_end(int64_t j) const { return left < 0 ? nq : std::clamp<int64_t>(j - offset + left + 1, 0, nq); }
  // The keys kb + [lo, hi) of the `width` keys from kb on that rows [i0, i1] see (lo >= hi: none).
  struct Range {
    int lo, hi;
    bool empty() const { return hi <= lo; }
  };
  Range keys_in_block(int64_t i0, int64_t i1, int64_t kb, int width) const {
    return {static_cast<int>(std::clamp<int64_t>(key_begin(i0) - kb, 0, width)),
            static_cast<int>(std::clamp<int64_t>(key_end(i1) - kb, 0, width))};
  }
  Range keys_in_block(int64_t i, int64_t kb, int width) const { return keys_in_block(i, i, kb, width); }
};

struct AttnParams {
  int64_t batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0, head_dim_v = 0;
  // Dense: every sequence has seqlen_q / seqlen_k rows. Varlen: cu_seqlens_* give the
  // sequence bounds (int32 prefix sums) and seqlen_* are the totals.
  int64_t seqlen_q = 0, seqlen_k = 0;
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  // Element strides (batch, head, row, dim) of q, k, v, out, grad_out, grad_*.
  // For varlen tensors (total, H, D) the batch stride is unused.
  struct Strides {
    int64_t b = 0, h = 0, n = 0, d = 1;
  };
  Strides q, k, v, out, grad_out, grad_q, grad_k, grad_v;

  bool causal = false;
  double scale = 1.0;
  double dropout_p = 0.0;
  uint64_t seed = 0;
  uint64_t offset = 0;

  // Variants (fastattn.attention's window_size, alignment, softcap, alibi_slopes, sinks).
  int64_t window_left = -1, window_right = -1;  // -1: unbounded; causal makes the right side 0
  bool bottom_right = false;                    // diagonal d(i) = i + Nk - Nq instead of i
  double softcap = 0.0;                         // > 0: logit = softcap * tanh(logit / softcap)
  const double* alibi_slopes = nullptr;         // (B|1, Hq): logit -= slope * |d(i) - j|
  int64_t alibi_batch_stride = 0;               // 0 for slopes shared by the batch
  const double* sinks = nullptr;                // (Hq,): logit of a zero-value key in every row's softmax

  // Optional attention mask, already broadcast (strides may be 0) to (B, Hq, Nq, Nk).
  const void* mask = nullptr;
  at::ScalarType mask_dtype = at::kBool;
  Strides mask_strides;  // b, h, n (query) and d (key) strides

  bool varlen() const { return cu_seqlens_q != nullptr; }
  int64_t len_q(int64_t b) const { return varlen() ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seqlen_q; }
  int64_t len_k(int64_t b) const { return varlen() ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seqlen_k; }
  // Offset of element (b, h, row 0, dim 0) of a tensor with strides s.
  int64_t base_q(const Strides& s, int64_t b, int64_t h) const {
    return varlen() ? cu_seqlens_q[b] * s.n + h * s.h : b * s.b + h * s.h;
  }
  int64_t base_k(const Strides& s, int64_t b, int64_t h) const {
    return varlen() ? cu_seqlens_k[b] * s.n + h * s.h : b * s.b + h * s.h;
  }
  // Row (b, h, i) in the contiguous per-row buffers (lse, delta, dQ accumulators):
  // dense (B, Hq, Nq), varlen (Hq, total_q), like the lse each layout returns.
  int64_t row_index(int64_t b, int64_t h, int64_t i) const {
    return varlen() ? h * seqlen_q + cu_seqlens_q[b] + i : (b * heads_q + h) * seqlen_q + i;
  }
  VisibleBand band(int64_t b) const {
    return {len_q(b), len_k(b), bottom_right ? len_k(b) - len_q(b) : 0, window_left, causal ? 0 : window_right};
  }
  double alibi_slope(int64_t b, int64_t h) const { return alibi_slopes[b * alibi_batch_stride + h]; }
  int64_t total_rows() const { return varlen() ? heads_q * seqlen_q : batch * heads_q * seqlen_q; }
};

// The block sizes a kernel tiles with, by name: fastattn._C.cpu_tiling() hands them to the
// tests, which sweep every boundary they make (tests/sweep.py).
using Tiling = std::vector<std::pair<std::string, int64_t>>;
Tiling fwd_tiling();
Tiling bwd_tiling();

// out / lse must be allocated by the caller; lse has total_rows() entries.
void flash_fwd_cpu(const AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   at::Tensor& out, at::Tensor& lse);

void flash_bwd_cpu(const AttnParams& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q,
                   at::Tensor& grad_k, at::Tensor& grad_v);

}  // namespace cpu
}  // namespace fastattn

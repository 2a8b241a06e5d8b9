// Plain-C++ description of one attention call, shared by the host code
// (attention_cuda.cpp, compiled by the host compiler) and the kernels (*.cu).
//
// Dense calls:  q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D), any strides with a unit
//               last-dim stride; out is (B, Nq, Hq, D) in memory; lse (B, Hq, Nq).
// Varlen calls: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence b owns rows
//               cu_seqlens_q[b] .. cu_seqlens_q[b+1]; lse (Hq, total_q).
// Both are described by the same strides: "batch" strides are 0 for varlen and
// the sequence start comes from cu_seqlens instead.
#pragma once
#include <cstdint>

namespace fastattn {
namespace cuda {

// Element-type tags, so that host code can name kernels without CUDA headers.
struct Fp16 {};
struct Bf16 {};

struct AttnParams {
  // Tensors (element pointers) and their strides in elements.
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (B, Hq, Nq) or (Hq, total_q), float32
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;  // row stride is 1

  int batch, num_heads_q, num_heads_kv, seqlen_q, seqlen_k, head_dim;

  // Varlen: int32 (batch + 1,) prefix sums on the device, or nullptr for dense calls.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;

  // Key-padding mask: bool (B|1, Nk) as uint8, 1 = may attend; nullptr for none.
  const uint8_t* key_mask;
  int64_t key_mask_batch_stride, key_mask_col_stride;

  // The band of the banded kernels (kBanded): query row i sees keys d(i) - window_left <= j <=
  // d(i) + window_right, d(i) = i + (bottom_right ? seqlen_k - seqlen_q : 0) per sequence; -1 is
  // unbounded on that side. Causal is (-1, 0). The full (non-banded) kernels ignore these.
  int window_left, window_right;
  bool bottom_right;

  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): the kernels work with exp2

  // Logit soft-capping (Gemma 2): softcap > 0 turns the scaled logit x into softcap * tanh(x / softcap),
  // i.e. in the kernels' log2 units softcap_log2 * tanh(s * scale_over_softcap) for the raw s = q . k.
  float softcap, softcap_log2, scale_over_softcap;

  // Dropout (Philox convention of csrc/philox.h). The (seed, offset) pair comes from
  // rng_state_device (read by the kernel: CUDA-graph safe) or, when that is null,
  // from seed/offset filled in on the host.
  bool dropout;
  uint32_t dropout_threshold;  // a word below it drops the element
  float dropout_rescale;       // 1 / (1 - p)
  const int64_t* rng_state_device;
  uint64_t seed, offset;

  // Backward only.
  const void* dout;  // laid out like out (strides o_*)
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  float* delta;  // rowsum(dout * out), laid out like lse

  // GQA/MQA backward: the q heads of a K/V head's group are split over kv_group_splits CTAs
  // (so that small grids still fill the GPU). With more than one, each CTA writes its partial
  // dK and dV in float32 to dkv_partial, (2, splits, Hkv, dkv_partial_rows, D) with rows
  // b * Nk + key (dense) or the packed row (varlen), and flash_bwd_reduce.cu sums them in a
  // fixed order (deterministic) into dk and dv.
  int kv_group_splits;
  float* dkv_partial;
  int64_t dkv_partial_rows;
};

// Keys per CTA of the dK/dV kernel (BwdDkDvConfig::kBlockN): the host sizes the grid with it.
constexpr int kBwdDkDvBlockKeys = 64;

// One instantiation per (direction, head dim, dtype, banded or full), defined in the
// generated files flash_{fwd,bwd}_hdim{D}_{fp16,bf16}_{band,full}.cu. kBanded: keys outside
// each row's band (causal, sliding window; the window_* fields) are skipped and masked.
template <typename T, int kHeadDim, bool kBanded>
void run_flash_fwd(const AttnParams& params, void* stream);
template <typename T, int kHeadDim, bool kBanded>
void run_flash_bwd(const AttnParams& params, void* stream);

// 0 when this build has a kernel image the current device can run, else the
// cudaError_t of asking for one (e.g. no kernel image for an arch that was not built).
int probe_kernel_image();

// dk, dv = the sum over splits of dkv_partial (flash_bwd_reduce.cu); kv_group_splits > 1 only.
template <typename T>
void run_flash_bwd_reduce(const AttnParams& params, void* stream);

// delta = rowsum(dout * out) in float32 (flash_bwd_preprocess.cu).
template <typename T>
void run_flash_bwd_preprocess(const AttnParams& params, void* stream);

}  // namespace cuda
}  // namespace fastattn

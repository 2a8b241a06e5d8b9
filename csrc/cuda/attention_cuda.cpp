// Host side of the CUDA backend: checks every input (messages name the tensor),
// fills AttnParams, picks the kernel instantiation and launches it on the
// current CUDA stream. Registered as the CUDA kernels of the torch.ops.fastattn
// schemas defined in csrc/ops.cpp; importing fastattn._C_cuda registers them.
//
// What the kernels serve (anything else raises, and fastattn/dispatch.py routes it
// elsewhere under backend="auto"):
//   float16 / bfloat16 on sm80+; q/k/v head dims equal and in head_dims();
//   attn_mask: bool key-padding masks broadcastable as (B|1, 1, 1, Nk) only;
//   causal and sliding windows, top-left or bottom-right aligned (the banded kernels), GQA
//   (Hq % Hkv == 0), dropout (Philox, csrc/philox.h), varlen, logit soft-capping. Not yet: ALiBi, sinks.
#include <torch/extension.h>
#include <torch/library.h>
#if defined(FASTATTN_CUDA_EMULATION)
// The host emulation of the device (tests/test_cuda_emulation.py): this file's own code runs
// on CPU tensors, as the kernels' memory, with the emulated GPU of emulation/device_emulation.h.
#include "emulation/device_emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../philox.h"
#include "flash_params.h"

namespace fastattn {
namespace cuda {
namespace {

// Head dims with compiled kernels; setup.py defines FASTATTN_CUDA_HDIM<D> for each.
std::vector<int64_t> supported_head_dims() {
  return {
#ifdef FASTATTN_CUDA_HDIM32
      32,
#endif
#ifdef FASTATTN_CUDA_HDIM64
      64,
#endif
#ifdef FASTATTN_CUDA_HDIM96
      96,
#endif
#ifdef FASTATTN_CUDA_HDIM128
      128,
#endif
  };
}

template <typename Tag, bool kBanded>
bool launch_fwd(const AttnParams& p, void* stream) {
  switch (p.head_dim) {
#ifdef FASTATTN_CUDA_HDIM32
    case 32: run_flash_fwd<Tag, 32, kBanded>(p, stream); return true;
#endif
#ifdef FASTATTN_CUDA_HDIM64
    case 64: run_flash_fwd<Tag, 64, kBanded>(p, stream); return true;
#endif
#ifdef FASTATTN_CUDA_HDIM96
    case 96: run_flash_fwd<Tag, 96, kBanded>(p, stream); return true;
#endif
#ifdef FASTATTN_CUDA_HDIM128
    case 128: run_flash_fwd<Tag, 128, kBanded>(p, stream); return true;
#endif
    default: return false;
  }
}

template <typename Tag, bool kBanded>
bool launch_bwd(const AttnParams& p, void* stream) {
  switch (p.head_dim) {
#ifdef FASTATTN_CUDA_HDIM32
    case 32: run_flash_bwd<Tag, 32, kBanded>(p, stream); return true;
#endif
#ifdef FASTATTN_CUDA_HDIM64
    case 64: run_flash_bwd<Tag, 64, kBanded>(p, stream); return true;
#endif
#ifdef FASTATTN_CUDA_HDIM96
    case 96: run_flash_bwd<Tag, 96, kBanded>(p, stream); return true;
#endif
#ifdef FASTATTN_CUDA_HDIM128
    case 128: run_flash_bwd<Tag, 128, kBanded>(p, stream); return true;
#endif
    default: return false;
  }
}

#if defined(FASTATTN_CUDA_EMULATION)
void* current_stream() { return nullptr; }
// The emulated device's memory is host memory.
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
#else
void* current_stream() { return static_cast<void*>(at::cuda::getCurrentCUDAStream().stream()); }
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

void run_fwd(const AttnParams& p, at::ScalarType dtype, bool banded) {
  const bool ok = dtype == at::kHalf ? (banded ? launch_fwd<Fp16, true>(p, current_stream())
                                               : launch_fwd<Fp16, false>(p, current_stream()))
                                     : (banded ? launch_fwd<Bf16, true>(p, current_stream())
                                               : launch_fwd<Bf16, false>(p, current_stream()));
  TORCH_CHECK(ok, "fastattn cuda: no forward kernel for head dim ", p.head_dim);
}

void run_bwd(const AttnParams& p, at::ScalarType dtype, bool banded) {
  if (dtype == at::kHalf) {
    run_flash_bwd_preprocess<Fp16>(p, current_stream());
  } else {
    run_flash_bwd_preprocess<Bf16>(p, current_stream());
  }
  const bool ok = dtype == at::kHalf ? (banded ? launch_bwd<Fp16, true>(p, current_stream())
                                               : launch_bwd<Fp16, false>(p, current_stream()))
                                     : (banded ? launch_bwd<Bf16, true>(p, current_stream())
                                               : launch_bwd<Bf16, false>(p, current_stream()));
  TORCH_CHECK(ok, "fastattn cuda: no backward kernel for head dim ", p.head_dim);
}

int sm_count() {
#if defined(FASTATTN_CUDA_EMULATION)
  return emu::device().sm_count;
#else
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

// GQA/MQA backward: into how many CTAs each K/V head's query-head group is split (a divisor
// of the group), so that the dK/dV grid has about two CTAs per SM; 1 when the grid is big
// enough already. With more than one, the partial dK/dV go to a float32 workspace that
// flash_bwd_reduce.cu sums in a fixed order.
void set_kv_group_splits(AttnParams& p, int64_t rows, const at::Tensor& like, at::Tensor& workspace) {
  const int group = p.num_heads_q / p.num_heads_kv;
  const int64_t blocks =
      static_cast<int64_t>((p.seqlen_k + kBwdDkDvBlockKeys - 1) / kBwdDkDvBlockKeys) * p.num_heads_kv * p.batch;
  const int64_t wanted = (2 * static_cast<int64_t>(sm_count()) + blocks - 1) / std::max<int64_t>(blocks, 1);
  p.kv_group_splits = 1;
  for (int s = 1; s <= group; ++s) {
    if (group % s == 0 && s <= wanted) p.kv_group_splits = s;
  }
  if (p.kv_group_splits == 1) return;
  workspace = at::empty({2, p.kv_group_splits, p.num_heads_kv, rows, p.head_dim}, like.options().dtype(at::kFloat));
  p.dkv_partial = workspace.data_ptr<float>();
  p.dkv_partial_rows = rows;
}

// ---------------------------------------------------------------------------
// Input checks
// ---------------------------------------------------------------------------
void check_device_and_dtype(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(on_kernel_device(t), "fastattn cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == q.device(), "fastattn cuda: ", name, " is on ", t.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "fastattn cuda: ", name,
                   " must be float16 or bfloat16 (the CUDA kernels' dtypes), got ", t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "fastattn cuda: ", name, " has dtype ", t.scalar_type(),
                   " but q has ", q.scalar_type());
}

void check_arch(const at::Tensor& q) {
#if defined(FASTATTN_CUDA_EMULATION)
  const emu::DeviceModel* prop = &emu::device();
#else
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());
#endif
  TORCH_CHECK(prop->major >= 8, "fastattn cuda: the CUDA kernels need compute capability 8.0+ (Ampere or newer), "
              "got ", prop->major, ".", prop->minor, " on ", q.device());
}

void check_head_dim(int64_t d, int64_t dv) {
  TORCH_CHECK_VALUE(d == dv, "fastattn cuda: the CUDA kernels need v's head dim (", dv, ") equal to q's (", d, ")");
  for (int64_t s : supported_head_dims()) {
    if (s == d) return;
  }
  TORCH_CHECK_VALUE(false, "fastattn cuda: head dim ", d, " has no CUDA kernel; built head dims: ",
                    c10::IntArrayRef(supported_head_dims()));
}

// The kernels read rows with 16-byte cp.async: unit last-dim stride, 16-byte aligned
// base and row/head/batch strides that are multiples of 8 elements. Other layouts are copied.
bool fits_kernel(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = t.size(i) == 1 || t.stride(i) % 8 == 0;
  return ok;
}
at::Tensor kernel_layout(const at::Tensor& t) { return fits_kernel(t) ? t : t.contiguous(); }

// A tensor laid out like `like` (as torch.empty_like, which the fake kernels use)
// and, if that layout does not suit the kernels, a contiguous one to compute into.
struct GradBuffer {
  at::Tensor result, work;
  explicit GradBuffer(const at::Tensor& like) : result(at::empty_like(like)) {
    work = fits_kernel(result) ? result : at::empty(like.sizes(), like.options());
  }
  void finish() {
    if (!work.is_same(result)) result.copy_(work);
  }
};

void set_key_mask(AttnParams& p, const c10::optional<at::Tensor>& attn_mask, const at::Tensor& q, int64_t batch,
                  int64_t seqlen_k) {
  if (!attn_mask.has_value()) return;
  at::Tensor m = *attn_mask;
  TORCH_CHECK_NOT_IMPLEMENTED(m.scalar_type() == at::kBool, "fastattn cuda: attn_mask of dtype ", m.scalar_type(),
                              " is not supported by the CUDA kernels, which take bool key-padding masks only "
                              "(float masks run on backend='triton' or 'reference')");
  TORCH_CHECK_VALUE(m.device() == q.device(), "fastattn cuda: attn_mask is on ", m.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(m.dim() <= 4, "fastattn cuda: attn_mask must have at most 4 dims, got shape ", m.sizes());
  while (m.dim() < 4) m = m.unsqueeze(0);  // (B|1, H|1, Nq|1, Nk|1)
  TORCH_CHECK_NOT_IMPLEMENTED(
      m.size(1) == 1 && m.size(2) == 1,
      "fastattn cuda: attn_mask of shape ", attn_mask->sizes(), " is not a key-padding mask; the CUDA kernels take "
      "bool masks of shape (B|1, 1, 1, Nk) only (other masks run on backend='triton' or 'reference')");
  TORCH_CHECK_VALUE((m.size(0) == 1 || m.size(0) == batch) && (m.size(3) == 1 || m.size(3) == seqlen_k),
                    "fastattn cuda: attn_mask of shape ", attn_mask->sizes(), " does not broadcast to (B, 1, 1, Nk) = (",
                    batch, ", 1, 1, ", seqlen_k, ")");
  p.key_mask = static_cast<const uint8_t*>(m.data_ptr());  // bool is one byte, 0 or 1
  p.key_mask_batch_stride = m.size(0) == 1 ? 0 : m.stride(0);
  p.key_mask_col_stride = m.size(3) == 1 ? 0 : m.stride(3);
}

void set_dropout(AttnParams& p, double dropout_p, const c10::optional<at::Tensor>& rng_state, const at::Tensor& q) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn cuda: dropout_p must be in [0, 1), got ",
                    dropout_p);
  p.dropout = dropout_p > 0.0;
  if (!p.dropout) return;
  TORCH_CHECK_VALUE(rng_state.has_value(), "fastattn cuda: dropout_p > 0 needs rng_state, an int64 (seed, offset) "
                    "tensor");
  const at::Tensor& rs = *rng_state;
  TORCH_CHECK_TYPE(rs.scalar_type() == at::kLong && rs.numel() == 2,
                   "fastattn cuda: rng_state must be an int64 tensor of 2 elements (seed, offset), got ",
                   rs.scalar_type(), " of shape ", rs.sizes());
  p.dropout_threshold = dropout_threshold(dropout_p);
  p.dropout_rescale = static_cast<float>(1.0 / (1.0 - dropout_p));
  if (on_kernel_device(rs)) {
    // Read by the kernels: a CUDA graph replays them with whatever the graph's own
    // generator kernels wrote there, so no host value is baked into the graph.
    TORCH_CHECK_VALUE(rs.device() == q.device(), "fastattn cuda: rng_state is on ", rs.device(), " but q is on ",
                      q.device());
    TORCH_CHECK_VALUE(rs.is_contiguous(), "fastattn cuda: rng_state must be contiguous");
    p.rng_state_device = rs.data_ptr<int64_t>();
  } else {
    const at::Tensor c = rs.contiguous();
    p.seed = static_cast<uint64_t>(c.data_ptr<int64_t>()[0]);
    p.offset = static_cast<uint64_t>(c.data_ptr<int64_t>()[1]);
  }
}

void set_scale(AttnParams& p, double scale) {
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
}

// Shapes of dense q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).
void check_dense_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4, "fastattn cuda: q must be (B, Hq, Nq, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "fastattn cuda: k must be (B, Hkv, Nk, D), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "fastattn cuda: v must be (B, Hkv, Nk, Dv), got shape ", v.sizes());
  check_device_and_dtype(q, "q", q);
  check_device_and_dtype(k, "k", q);
  check_device_and_dtype(v, "v", q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, "fastattn cuda: k must be (B, Hkv, Nk, D) = (", B,
                    ", Hkv, Nk, ", D, "), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == Hkv && v.size(2) == Nk, "fastattn cuda: v must be (B, Hkv, Nk, Dv) = (",
                    B, ", ", Hkv, ", ", Nk, ", Dv), got shape ", v.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "fastattn cuda: q heads (", Hq, ") must be a multiple of k/v heads (",
                    Hkv, ")");
  TORCH_CHECK_VALUE(B <= 65535 && Hq <= 65535, "fastattn cuda: batch and heads must be <= 65535, got B=", B,
                    ", Hq=", Hq);
  check_head_dim(D, v.size(3));
  check_arch(q);
}

void set_dense_qkv(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.num_heads_q = static_cast<int>(q.size(1));
  p.num_heads_kv = static_cast<int>(k.size(1));
  p.seqlen_q = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
}

// The variants of the op schemas (csrc/ops.cpp) that these kernels do not serve yet: dispatch
// sends such calls to Triton; a direct call gets this error rather than a wrong answer.
void check_unserved_variants(const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks) {
  TORCH_CHECK_VALUE(!alibi_slopes.has_value() && !sinks.has_value(),
                    "fastattn cuda: the CUDA kernels do not serve alibi_slopes or sinks yet; use backend='triton' "
                    "or 'auto'");
}

void set_softcap(AttnParams& p, double softcap, double scale) {
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), "fastattn cuda: softcap must be a finite float >= 0 "
                    "(0: no soft-capping), got ", softcap);
  p.softcap = static_cast<float>(softcap);
  p.softcap_log2 = static_cast<float>(softcap * 1.4426950408889634);
  p.scale_over_softcap = softcap > 0.0 ? static_cast<float>(scale / softcap) : 0.f;
}

// Causal, window and alignment as the kernels' band; returns whether the banded kernels run.
bool set_band(AttnParams& p, bool causal, int64_t window_left, int64_t window_right, bool bottom_right) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "fastattn cuda: window_size must be >= -1 on both "
                    "sides (-1: unbounded), got (", window_left, ", ", window_right, ")");
  // Bounds past any sequence length mean the same as unbounded; clamped so that the kernels' arithmetic
  // (flash_common.cuh: Band) fits an int.
  constexpr int64_t kFar = int64_t{1} << 29;
  p.window_left = static_cast<int>(std::min(window_left, kFar));
  p.window_right = causal ? 0 : static_cast<int>(std::min(window_right, kFar));
  p.bottom_right = bottom_right;
  return p.window_left >= 0 || p.window_right >= 0;
}

// ---------------------------------------------------------------------------
// Dense ops
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                            const c10::optional<at::Tensor>& attn_mask, bool causal, double scale,
                                            double dropout_p, const c10::optional<at::Tensor>& rng_state,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks) {
  check_unserved_variants(alibi_slopes, sinks);
  check_dense_qkv(q_in, k_in, v_in);
  const DeviceGuard guard(q_in.device());
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  at::Tensor out = at::empty({B, Nq, Hq, D}, q.options());  // (B, Nq, Hq, D), returned as (B, Hq, Nq, D)
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  AttnParams p{};
  set_dense_qkv(p, q, k, v);
  set_key_mask(p, attn_mask, q, B, Nk);
  set_dropout(p, dropout_p, rng_state, q);
  set_scale(p, scale);
  const bool banded = set_band(p, causal, window_left, window_right, bottom_right);
  set_softcap(p, softcap, scale);
  if (B == 0 || Hq == 0 || Nq == 0) return {out.transpose(1, 2), lse};
  if (Nk == 0) {  // no key: zeros and lse = -inf, as the reference
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out.transpose(1, 2), lse};
  }
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  run_fwd(p, q.scalar_type(), banded);
  return {out.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& attn_mask, bool causal,
    double scale, double dropout_p, const c10::optional<at::Tensor>& rng_state,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const c10::optional<at::Tensor>& alibi_slopes) {
  check_unserved_variants(alibi_slopes, c10::nullopt);
  check_dense_qkv(q_in, k_in, v_in);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3), Nk = k_in.size(2);
  check_device_and_dtype(grad_out_in, "grad_out", q_in);
  check_device_and_dtype(out_in, "out", q_in);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == at::IntArrayRef({B, Hq, Nq, D}),
                    "fastattn cuda: grad_out must be (B, Hq, Nq, Dv) = (", B, ", ", Hq, ", ", Nq, ", ", D,
                    "), got shape ", grad_out_in.sizes());
  TORCH_CHECK_VALUE(out_in.sizes() == at::IntArrayRef({B, Hq, Nq, D}), "fastattn cuda: out must be (B, Hq, Nq, Dv) = (",
                    B, ", ", Hq, ", ", Nq, ", ", D, "), got shape ", out_in.sizes());
  TORCH_CHECK_VALUE(lse_in.sizes() == at::IntArrayRef({B, Hq, Nq}) && lse_in.scalar_type() == at::kFloat &&
                        lse_in.device() == q_in.device(),
                    "fastattn cuda: lse must be a float32 (B, Hq, Nq) = (", B, ", ", Hq, ", ", Nq, ") tensor on ",
                    q_in.device(), ", got ", lse_in.scalar_type(), " of shape ", lse_in.sizes(), " on ", lse_in.device());
  const DeviceGuard guard(q_in.device());
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor dout = kernel_layout(grad_out_in), out = kernel_layout(out_in), lse = lse_in.contiguous();
  GradBuffer dq(q_in), dk(k_in), dv(v_in);
  AttnParams p{};
  set_dense_qkv(p, q, k, v);
  set_key_mask(p, attn_mask, q, B, Nk);
  set_dropout(p, dropout_p, rng_state, q);
  set_scale(p, scale);
  const bool banded = set_band(p, causal, window_left, window_right, bottom_right);
  set_softcap(p, softcap, scale);
  if (B == 0 || Hq == 0 || Nq == 0 || Nk == 0) {  // nothing attends: every gradient is zero
    dq.result.zero_(), dk.result.zero_(), dv.result.zero_();
    return {dq.result, dk.result, dv.result};
  }
  at::Tensor delta = at::empty_like(lse);  // (B, Hq, Nq) float32
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(2);
  p.dout = dout.data_ptr();
  p.do_batch_stride = dout.stride(0), p.do_head_stride = dout.stride(1), p.do_row_stride = dout.stride(2);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  p.delta = delta.data_ptr<float>();
  p.dq = dq.work.data_ptr();
  p.dq_batch_stride = dq.work.stride(0), p.dq_head_stride = dq.work.stride(1), p.dq_row_stride = dq.work.stride(2);
  p.dk = dk.work.data_ptr();
  p.dk_batch_stride = dk.work.stride(0), p.dk_head_stride = dk.work.stride(1), p.dk_row_stride = dk.work.stride(2);
  p.dv = dv.work.data_ptr();
  p.dv_batch_stride = dv.work.stride(0), p.dv_head_stride = dv.work.stride(1), p.dv_row_stride = dv.work.stride(2);
  at::Tensor dkv_partial;  // (2, splits, Hkv, B * Nk, D) float32, GQA/MQA on small grids only
  set_kv_group_splits(p, B * Nk, q, dkv_partial);
  run_bwd(p, q.scalar_type(), banded);
  dq.finish(), dk.finish(), dv.finish();
  return {dq.result, dk.result, dv.result};
}

// ---------------------------------------------------------------------------
// Varlen ops: q (total_q, Hq, D), k/v (total_k, Hkv, D), lse (Hq, total_q)
// ---------------------------------------------------------------------------
void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q, int64_t batch_plus_one) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt && cu.dim() == 1, "fastattn cuda: ", name,
                   " must be a 1-D int32 tensor (batch + 1,), got ", cu.scalar_type(), " of shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == q.device() && cu.is_contiguous(), "fastattn cuda: ", name,
                    " must be a contiguous tensor on ", q.device(), ", got one on ", cu.device());
  TORCH_CHECK_VALUE(cu.numel() == batch_plus_one && batch_plus_one >= 1, "fastattn cuda: cu_seqlens_q and "
                    "cu_seqlens_k must have the same length >= 1, got ", name, " of length ", cu.numel());
}

void check_varlen_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                      const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK_VALUE(q.dim() == 3, "fastattn cuda: q must be (total_q, Hq, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3, "fastattn cuda: k must be (total_k, Hkv, D), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 3, "fastattn cuda: v must be (total_k, Hkv, Dv), got shape ", v.sizes());
  check_device_and_dtype(q, "q", q);
  check_device_and_dtype(k, "k", q);
  check_device_and_dtype(v, "v", q);
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK_VALUE(k.size(2) == D, "fastattn cuda: k must be (total_k, Hkv, D) with D = ", D, ", got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == k.size(0) && v.size(1) == Hkv, "fastattn cuda: v must be (total_k, Hkv, Dv) = (",
                    k.size(0), ", ", Hkv, ", Dv), got shape ", v.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "fastattn cuda: q heads (", Hq, ") must be a multiple of k/v heads (",
                    Hkv, ")");
  check_cu_seqlens(cu_q, "cu_seqlens_q", q, cu_q.numel());
  check_cu_seqlens(cu_k, "cu_seqlens_k", q, cu_q.numel());
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q <= std::numeric_limits<int>::max() &&
                        max_seqlen_k <= std::numeric_limits<int>::max(),
                    "fastattn cuda: max_seqlen_q and max_seqlen_k must be in [0, 2^31), got ", max_seqlen_q, ", ",
                    max_seqlen_k);
  TORCH_CHECK_VALUE(cu_q.numel() - 1 <= 65535 && Hq <= 65535, "fastattn cuda: batch and heads must be <= 65535");
  check_head_dim(D, v.size(2));
  check_arch(q);
}

void set_varlen_qkv(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = 0, p.q_row_stride = q.stride(0), p.q_head_stride = q.stride(1);
  p.k_batch_stride = 0, p.k_row_stride = k.stride(0), p.k_head_stride = k.stride(1);
  p.v_batch_stride = 0, p.v_row_stride = v.stride(0), p.v_head_stride = v.stride(1);
  p.batch = static_cast<int>(cu_q.numel() - 1);
  p.num_heads_q = static_cast<int>(q.size(1));
  p.num_heads_kv = static_cast<int>(k.size(1));
  p.seqlen_q = static_cast<int>(max_seqlen_q);  // grid size; each sequence's length comes from cu_seqlens
  p.seqlen_k = static_cast<int>(max_seqlen_k);
  p.head_dim = static_cast<int>(q.size(2));
  p.cu_seqlens_q = cu_q.data_ptr<int>();
  p.cu_seqlens_k = cu_k.data_ptr<int>();
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                   const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                   int64_t max_seqlen_k, bool causal, double scale, double dropout_p,
                                                   const c10::optional<at::Tensor>& rng_state,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks) {
  check_unserved_variants(alibi_slopes, sinks);
  check_varlen_qkv(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const DeviceGuard guard(q_in.device());
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const int64_t total_q = q.size(0), Hq = q.size(1), D = q.size(2);
  at::Tensor out = at::empty({total_q, Hq, D}, q.options());           // (total_q, Hq, D)
  at::Tensor lse = at::empty({Hq, total_q}, q.options().dtype(at::kFloat));  // (Hq, total_q)
  AttnParams p{};
  set_varlen_qkv(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  set_dropout(p, dropout_p, rng_state, q);
  set_scale(p, scale);
  const bool banded = set_band(p, causal, window_left, window_right, bottom_right);
  set_softcap(p, softcap, scale);
  if (total_q == 0 || Hq == 0 || p.batch == 0 || max_seqlen_q == 0) return {out, lse};
  // Every row gets a CTA; sequences with no key come out as zeros with lse = -inf.
  p.out = out.data_ptr();
  p.o_batch_stride = 0, p.o_row_stride = out.stride(0), p.o_head_stride = out.stride(1);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = 0, p.lse_head_stride = lse.stride(0);
  run_fwd(p, q.scalar_type(), banded);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale, double dropout_p,
    const c10::optional<at::Tensor>& rng_state,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const c10::optional<at::Tensor>& alibi_slopes) {
  check_unserved_variants(alibi_slopes, c10::nullopt);
  check_varlen_qkv(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const int64_t total_q = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  check_device_and_dtype(grad_out_in, "grad_out", q_in);
  check_device_and_dtype(out_in, "out", q_in);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == at::IntArrayRef({total_q, Hq, D}),
                    "fastattn cuda: grad_out must be (total_q, Hq, Dv) = (", total_q, ", ", Hq, ", ", D,
                    "), got shape ", grad_out_in.sizes());
  TORCH_CHECK_VALUE(out_in.sizes() == at::IntArrayRef({total_q, Hq, D}),
                    "fastattn cuda: out must be (total_q, Hq, Dv) = (", total_q, ", ", Hq, ", ", D, "), got shape ",
                    out_in.sizes());
  TORCH_CHECK_VALUE(lse_in.sizes() == at::IntArrayRef({Hq, total_q}) && lse_in.scalar_type() == at::kFloat &&
                        lse_in.device() == q_in.device(),
                    "fastattn cuda: lse must be a float32 (Hq, total_q) = (", Hq, ", ", total_q, ") tensor on ",
                    q_in.device(), ", got ", lse_in.scalar_type(), " of shape ", lse_in.sizes());
  const DeviceGuard guard(q_in.device());
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor dout = kernel_layout(grad_out_in), out = kernel_layout(out_in), lse = lse_in.contiguous();
  GradBuffer dq(q_in), dk(k_in), dv(v_in);
  AttnParams p{};
  set_varlen_qkv(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  set_dropout(p, dropout_p, rng_state, q);
  set_scale(p, scale);
  const bool banded = set_band(p, causal, window_left, window_right, bottom_right);
  set_softcap(p, softcap, scale);
  if (p.batch == 0 || Hq == 0 || max_seqlen_q == 0 || max_seqlen_k == 0) {
    dq.result.zero_(), dk.result.zero_(), dv.result.zero_();
    return {dq.result, dk.result, dv.result};
  }
  // Every row gets a CTA: dq rows of sequences with no key and dk/dv rows of sequences
  // with no query come out as zeros.
  at::Tensor delta = at::empty_like(lse);  // (Hq, total_q) float32
  p.out = out.data_ptr();
  p.o_batch_stride = 0, p.o_row_stride = out.stride(0), p.o_head_stride = out.stride(1);
  p.dout = dout.data_ptr();
  p.do_batch_stride = 0, p.do_row_stride = dout.stride(0), p.do_head_stride = dout.stride(1);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.lse_batch_stride = 0, p.lse_head_stride = lse.stride(0);
  p.delta = delta.data_ptr<float>();
  p.dq = dq.work.data_ptr();
  p.dq_batch_stride = 0, p.dq_row_stride = dq.work.stride(0), p.dq_head_stride = dq.work.stride(1);
  p.dk = dk.work.data_ptr();
  p.dk_batch_stride = 0, p.dk_row_stride = dk.work.stride(0), p.dk_head_stride = dk.work.stride(1);
  p.dv = dv.work.data_ptr();
  p.dv_batch_stride = 0, p.dv_row_stride = dv.work.stride(0), p.dv_head_stride = dv.work.stride(1);
  at::Tensor dkv_partial;  // (2, splits, Hkv, total_k, D) float32, GQA/MQA on small grids only
  set_kv_group_splits(p, k.size(0), q, dkv_partial);
  run_bwd(p, q.scalar_type(), banded);
  dq.finish(), dk.finish(), dv.finish();
  return {dq.result, dk.result, dv.result};
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

#if defined(FASTATTN_CUDA_EMULATION)
namespace fastattn {
namespace cuda {
void register_emulator_checks(pybind11::module& m);  // emulation/emulator_checks.cpp
}  // namespace cuda
}  // namespace fastattn
#else
TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("fwd", &fastattn::cuda::fwd_cuda);
  m.impl("bwd", &fastattn::cuda::bwd_cuda);
  m.impl("varlen_fwd", &fastattn::cuda::varlen_fwd_cuda);
  m.impl("varlen_bwd", &fastattn::cuda::varlen_bwd_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn CUDA kernels (importing this module registers the torch.ops.fastattn CUDA kernels)";
  m.attr("head_dims") = fastattn::cuda::supported_head_dims();
  m.attr("dtypes") = std::vector<std::string>{"float16", "bfloat16"};
  m.attr("min_compute_capability") = std::make_tuple(8, 0);
#ifdef FASTATTN_CUDA_ARCH_LIST
#define FASTATTN_STRINGIFY(...) #__VA_ARGS__
#define FASTATTN_EXPAND_STRINGIFY(...) FASTATTN_STRINGIFY(__VA_ARGS__)
  // TORCH_CUDA_ARCH_LIST of the build, with commas for semicolons (setup.py)
  m.attr("arch_list") = std::string(FASTATTN_EXPAND_STRINGIFY(FASTATTN_CUDA_ARCH_LIST));
#else
  m.attr("arch_list") = std::string("unknown");
#endif
  m.def("kernel_image_problem", [](int64_t device) -> std::string {
    // Empty when the kernels can run on `device`; else why not (e.g. built without its arch or PTX).
    const fastattn::cuda::DeviceGuard guard(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device)));
    const int error = fastattn::cuda::probe_kernel_image();
    if (error == 0) return "";
#if defined(FASTATTN_CUDA_EMULATION)
    return "error " + std::to_string(error);
#else
    (void)cudaGetLastError();  // the probe's error is not sticky; clear it for the next caller
    return cudaGetErrorString(static_cast<cudaError_t>(error));
#endif
  }, "empty when the CUDA kernels can run on this device, else the CUDA error of probing for them");
#if defined(FASTATTN_CUDA_EMULATION)
  // The ops' CUDA kernels as plain functions of CPU tensors, on the emulated device.
  m.def("fwd", &fastattn::cuda::fwd_cuda);
  m.def("bwd", &fastattn::cuda::bwd_cuda);
  m.def("varlen_fwd", &fastattn::cuda::varlen_fwd_cuda);
  m.def("varlen_bwd", &fastattn::cuda::varlen_bwd_cuda);
  m.def("set_device", &fastattn::emu::set_device, "emulate sm80, sm86, sm89, sm90, sm100 or sm120");
  m.def("set_sm_count", [](int n) { fastattn::emu::device().sm_count = n; },
        "the emulated GPU's multiprocessor count (what the backward's GQA split sizes the grid for)");
  fastattn::cuda::register_emulator_checks(m);
  m.def("counters", []() {
    const fastattn::emu::Counters& c = fastattn::emu::counters();
    return std::map<std::string, int64_t>{{"blocks", c.blocks},     {"mma", c.mma},           {"ldmatrix", c.ldmatrix},
                                          {"cp_async", c.cp_async}, {"barriers", c.barriers}, {"shuffles", c.shuffles}};
  });
#endif
}

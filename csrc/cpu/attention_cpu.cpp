// CPU implementations of the fastattn ops: input checks, output allocation,
// and the AttnParams the kernels in flash_fwd_cpu.cpp / flash_bwd_cpu.cpp read.
// The Python layer (fastattn/api.py) validates user input with friendlier
// messages first; the checks here keep direct torch.ops.fastattn.* calls safe.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>

#include "amx_blocks.h"
#include "attention_cpu.h"
#include "blocks.h"

#if FASTATTN_X86 && defined(__linux__) && defined(__GNUC__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, "fastattn: ", __VA_ARGS__)

namespace fastattn {
namespace cpu {

namespace {
// The widest SIMD path allowed: FASTATTN_CPU_SIMD=avx512, =avx2 or =baseline caps it (unset: no cap).
int simd_cap() {
  const char* env = std::getenv("FASTATTN_CPU_SIMD");
  const std::string cap = env ? env : "";
  if (cap == "baseline") return 0;
  if (cap == "avx2") return 1;
  if (cap == "avx512") return 2;
  return 3;
}
}  // namespace

bool cpu_has_avx2_fma() {
#if FASTATTN_X86 && defined(__GNUC__)
  static const bool has = simd_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if FASTATTN_X86 && defined(__GNUC__)
  // __builtin_cpu_supports also checks that the OS saves the 512-bit registers (XCR0).
  // BW: the bf16 decode kernels' 16-bit unpacks (every AVX-512 CPU but the Xeon Phi has it).
  static const bool has = cpu_has_avx2_fma() && simd_cap() >= 2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#if FASTATTN_X86 && defined(__linux__) && defined(__GNUC__)
  static const bool has = [] {
    if (!cpu_has_avx512() || simd_cap() < 3) return false;
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    const bool amx = (d >> 22 & 1u) && (d >> 24 & 1u);  // AMX-BF16, AMX-TILE
    __cpuid_count(7, 1, a, b, c, d);
    const bool avx512_bf16 = a >> 5 & 1u;  // the P rows' conversion to bf16
    // Linux hands the tile registers' state only to a process that asks for it (arch_prctl
    // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; refused by kernels before 5.16 or a hypervisor
    // that does not pass the state through).
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return amx && avx512_bf16 && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
#else
  return false;
#endif
}

namespace {

using Strides = AttnParams::Strides;

Strides strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }
Strides strides3(const at::Tensor& t) { return {0, t.stride(1), t.stride(0), t.stride(2)}; }  // (total, H, D)

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu_float(const at::Tensor& t, const char* name, const at::Tensor& q) {
  CHECK_ARG(t.device().is_cpu(), name, " must be a CPU tensor for the cpu backend, got ", t.device());
  CHECK_ARG(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), " but q has ", q.scalar_type());
  CHECK_ARG(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
}

void set_dropout(AttnParams& p, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = dropout_p;
  if (dropout_p == 0.0) return;
  CHECK_ARG(rng_state.has_value() && rng_state->numel() == 2 && rng_state->scalar_type() == at::kLong,
            "rng_state must be an int64 tensor (seed, offset) when dropout_p > 0");
  const at::Tensor state = rng_state->cpu();
  p.seed = static_cast<uint64_t>(state.data_ptr<int64_t>()[0]);
  p.offset = static_cast<uint64_t>(state.data_ptr<int64_t>()[1]);
}

// The variants' arguments into p. Returns the float64 copies of the slopes and sinks that p
// points into: the caller keeps them alive for the kernel call.
struct VariantTensors {
  at::Tensor alibi_slopes, sinks;
};

VariantTensors set_variants(AttnParams& p, int64_t window_left, int64_t window_right, bool bottom_right,
                            double softcap, const std::optional<at::Tensor>& alibi_slopes,
                            const std::optional<at::Tensor>& sinks) {
  CHECK_ARG(window_left >= -1 && window_right >= -1, "window_size must be a pair of ints >= -1 (-1: unbounded), got (",
            window_left, ", ", window_right, ")");
  CHECK_ARG(softcap >= 0.0 && std::isfinite(softcap), "softcap must be a finite float >= 0, got ", softcap);
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
  p.softcap = softcap;
  VariantTensors kept;
  if (alibi_slopes.has_value()) {
    const at::Tensor& s = *alibi_slopes;
    CHECK_ARG(s.device().is_cpu() && at::isFloatingType(s.scalar_type()),
              "alibi_slopes must be a floating-point CPU tensor, got ", s.scalar_type(), " on ", s.device());
    CHECK_ARG((s.dim() == 1 && s.size(0) == p.heads_q) ||
                  (s.dim() == 2 && s.size(0) == p.batch && s.size(1) == p.heads_q),
              "alibi_slopes must be (Hq,) = (", p.heads_q, ",) or (B, Hq) = (", p.batch, ", ", p.heads_q, "), got ",
              s.sizes());
    kept.alibi_slopes = s.to(at::kDouble).contiguous();
    p.alibi_slopes = kept.alibi_slopes.const_data_ptr<double>();
    p.alibi_batch_stride = s.dim() == 2 ? p.heads_q : 0;
  }
  if (sinks.has_value()) {
    const at::Tensor& s = *sinks;
    CHECK_ARG(s.device().is_cpu() && at::isFloatingType(s.scalar_type()),
              "sinks must be a floating-point CPU tensor, got ", s.scalar_type(), " on ", s.device());
    CHECK_ARG(s.dim() == 1 && s.size(0) == p.heads_q, "sinks must be (Hq,) = (", p.heads_q, ",), got ", s.sizes());
    kept.sinks = s.to(at::kDouble).contiguous();
    p.sinks = kept.sinks.const_data_ptr<double>();
  }
  return kept;
}

// Allocates the gradients (laid out like q, k, v), records every stride, runs the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_bwd(AttnParams& p, Strides (*strides)(const at::Tensor&),
                                                       const at::Tensor& grad_out, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& lse) {
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  p.out = strides(out);
  p.grad_out = strides(grad_out);
  p.grad_q = strides(grad_q);
  p.grad_k = strides(grad_k);
  p.grad_v = strides(grad_v);
  flash_bwd_cpu(p, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

void check_dense(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CHECK_ARG(q.dim() == 4, "q must be 4-D (B, Hq, Nq, D), got shape ", q.sizes());
  CHECK_ARG(k.dim() == 4, "k must be 4-D (B, Hkv, Nk, D), got shape ", k.sizes());
  CHECK_ARG(v.dim() == 4, "v must be 4-D (B, Hkv, Nk, Dv), got shape ", v.sizes());
  check_cpu_float(q, "q", q);
  check_cpu_float(k, "k", q);
  check_cpu_float(v, "v", q);
  CHECK_ARG(k.size(0) == q.size(0) && v.size(0) == q.size(0), "q, k, v batch sizes differ: ", q.size(0), ", ",
            k.size(0), ", ", v.size(0));
  CHECK_ARG(k.size(3) == q.size(3), "k head dim ", k.size(3), " differs from q head dim ", q.size(3));
  CHECK_ARG(v.size(1) == k.size(1) && v.size(2) == k.size(2), "v must be (B, Hkv, Nk, Dv) like k ", k.sizes(),
            ", got ", v.sizes());
  CHECK_ARG(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "q heads (", q.size(1),
            ") must be a multiple of k/v heads (", k.size(1), ")");
}

AttnParams dense_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& attn_mask, bool causal, double scale) {
  AttnParams p;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.head_dim_v = v.size(3);
  p.q = strides4(q);
  p.k = strides4(k);
  p.v = strides4(v);
  p.causal = causal;
  p.scale = scale;
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    CHECK_ARG(m.device().is_cpu(), "attn_mask must be on the CPU like q");
    CHECK_ARG(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
              "attn_mask must be bool or floating point, got ", m.scalar_type());
    CHECK_ARG(m.dim() <= 4, "attn_mask must broadcast to (B, Hq, Nq, Nk), got shape ", m.sizes());
    at::Tensor e;
    try {
      e = m.expand({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k});
    } catch (const c10::Error&) {
      CHECK_ARG(false, "attn_mask of shape ", m.sizes(), " does not broadcast to (B, Hq, Nq, Nk) = (", p.batch, ", ",
                p.heads_q, ", ", p.seqlen_q, ", ", p.seqlen_k, ")");
    }
    p.mask = e.const_data_ptr();
    p.mask_dtype = e.scalar_type();
    p.mask_strides = strides4(e);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& attn_mask, bool causal, double scale,
                                           double dropout_p, const std::optional<at::Tensor>& rng_state,
                                           int64_t window_left, int64_t window_right, bool bottom_right,
                                           double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                           const std::optional<at::Tensor>& sinks) {
  check_dense(q, k, v);
  AttnParams p = dense_params(q, k, v, attn_mask, causal, scale);
  set_dropout(p, dropout_p, rng_state);
  const VariantTensors kept = set_variants(p, window_left, window_right, bottom_right, softcap, alibi_slopes, sinks);
  // Output laid out as (B, Nq, Hq, Dv) and returned as a (B, Hq, Nq, Dv) view, like
  // torch's SDPA: merging heads afterwards (transpose + reshape) needs no copy.
  at::Tensor out = at::empty({p.batch, p.seqlen_q, p.heads_q, p.head_dim_v}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.seqlen_q}, q.options().dtype(lse_dtype(q)));
  p.out = strides4(out);
  if (out.numel() > 0 || lse.numel() > 0) flash_fwd_cpu(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& lse,
                                                       const std::optional<at::Tensor>& attn_mask, bool causal,
                                                       double scale, double dropout_p,
                                                       const std::optional<at::Tensor>& rng_state,
                                                       int64_t window_left, int64_t window_right, bool bottom_right,
                                                       double softcap,
                                                       const std::optional<at::Tensor>& alibi_slopes) {
  check_dense(q, k, v);
  check_cpu_float(out, "out", q);
  check_cpu_float(grad_out, "grad_out", q);
  CHECK_ARG(out.sizes() == grad_out.sizes() && out.dim() == 4 && out.size(0) == q.size(0) &&
                out.size(1) == q.size(1) && out.size(2) == q.size(2) && out.size(3) == v.size(3),
            "out and grad_out must be (B, Hq, Nq, Dv), got ", out.sizes(), " and ", grad_out.sizes());
  CHECK_ARG(lse.scalar_type() == lse_dtype(q) && lse.is_contiguous() &&
                lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
            "lse must be a contiguous (B, Hq, Nq) tensor of dtype ", lse_dtype(q));
  AttnParams p = dense_params(q, k, v, attn_mask, causal, scale);
  set_dropout(p, dropout_p, rng_state);
  const VariantTensors kept = set_variants(p, window_left, window_right, bottom_right, softcap, alibi_slopes, {});
  return run_bwd(p, strides4, grad_out, q, k, v, out, lse);
}

// ----------------------------------------------------------------------------------------------
// Packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv).
// ----------------------------------------------------------------------------------------------
AttnParams varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                         const at::Tensor& cu_k, bool causal, double scale) {
  CHECK_ARG(q.dim() == 3, "q must be 3-D (total_q, Hq, D), got shape ", q.sizes());
  CHECK_ARG(k.dim() == 3, "k must be 3-D (total_k, Hkv, D), got shape ", k.sizes());
  CHECK_ARG(v.dim() == 3, "v must be 3-D (total_k, Hkv, Dv), got shape ", v.sizes());
  check_cpu_float(q, "q", q);
  check_cpu_float(k, "k", q);
  check_cpu_float(v, "v", q);
  CHECK_ARG(k.size(2) == q.size(2), "k head dim ", k.size(2), " differs from q head dim ", q.size(2));
  CHECK_ARG(v.size(0) == k.size(0) && v.size(1) == k.size(1), "v must be (total_k, Hkv, Dv) like k ", k.sizes(),
            ", got ", v.sizes());
  CHECK_ARG(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "q heads (", q.size(1),
            ") must be a multiple of k/v heads (", k.size(1), ")");
  for (const auto& [t, name, total] : {std::tuple{&cu_q, "cu_seqlens_q", q.size(0)},
                                       std::tuple{&cu_k, "cu_seqlens_k", k.size(0)}}) {
    CHECK_ARG(t->scalar_type() == at::kInt && t->dim() == 1 && t->numel() >= 1 && t->device().is_cpu() &&
                  t->is_contiguous(),
              name, " must be a contiguous 1-D int32 CPU tensor of length batch + 1");
    const int32_t* c = t->const_data_ptr<int32_t>();
    CHECK_ARG(c[0] == 0, name, "[0] must be 0, got ", c[0]);
    for (int64_t i = 1; i < t->numel(); ++i)
      CHECK_ARG(c[i] >= c[i - 1], name, " must be non-decreasing, but entry ", i, " (", c[i], ") < entry ", i - 1,
                " (", c[i - 1], ")");
    CHECK_ARG(c[t->numel() - 1] == total, name, "[-1] must equal the number of packed tokens ", total, ", got ",
              c[t->numel() - 1]);
  }
  CHECK_ARG(cu_q.numel() == cu_k.numel(), "cu_seqlens_q and cu_seqlens_k must have the same length");
  AttnParams p;
  p.batch = cu_q.numel() - 1;
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.seqlen_q = q.size(0);  // totals
  p.seqlen_k = k.size(0);
  p.head_dim = q.size(2);
  p.head_dim_v = v.size(2);
  p.cu_seqlens_q = cu_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.const_data_ptr<int32_t>();
  p.q = strides3(q);
  p.k = strides3(k);
  p.v = strides3(v);
  p.causal = causal;
  p.scale = scale;
  return p;
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                  int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                  double scale, double dropout_p,
                                                  const std::optional<at::Tensor>& rng_state, int64_t window_left,
                                                  int64_t window_right, bool bottom_right, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes,
                                                  const std::optional<at::Tensor>& sinks) {
  AttnParams p = varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale);
  set_dropout(p, dropout_p, rng_state);
  const VariantTensors kept = set_variants(p, window_left, window_right, bottom_right, softcap, alibi_slopes, sinks);
  at::Tensor out = at::empty({p.seqlen_q, p.heads_q, p.head_dim_v}, q.options());
  at::Tensor lse = at::empty({p.heads_q, p.seqlen_q}, q.options().dtype(lse_dtype(q)));
  p.out = strides3(out);
  if (out.numel() > 0) flash_fwd_cpu(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, double dropout_p, const std::optional<at::Tensor>& rng_state,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  AttnParams p = varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale);
  set_dropout(p, dropout_p, rng_state);
  const VariantTensors kept = set_variants(p, window_left, window_right, bottom_right, softcap, alibi_slopes, {});
  check_cpu_float(out, "out", q);
  check_cpu_float(grad_out, "grad_out", q);
  CHECK_ARG(out.dim() == 3 && out.sizes() == grad_out.sizes() && out.size(0) == q.size(0) &&
                out.size(1) == q.size(1) && out.size(2) == v.size(2),
            "out and grad_out must be (total_q, Hq, Dv), got ", out.sizes(), " and ", grad_out.sizes());
  CHECK_ARG(lse.scalar_type() == lse_dtype(q) && lse.is_contiguous() &&
                lse.sizes() == at::IntArrayRef({q.size(1), q.size(0)}),
            "lse must be a contiguous (Hq, total_q) tensor of dtype ", lse_dtype(q));
  return run_bwd(p, strides3, grad_out, q, k, v, out, lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
  m.impl("varlen_fwd", &varlen_fwd_cpu);
  m.impl("varlen_bwd", &varlen_bwd_cpu);
}

}  // namespace cpu
}  // namespace fastattn

// Schemas of the fastattn ops (one TORCH_LIBRARY for the whole package) and the
// Python module fastattn._C whose import registers them. Each backend adds its
// kernels with TORCH_LIBRARY_IMPL(fastattn, <device>, m) in its own directory;
// fake (meta) kernels and autograd live in fastattn/_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/attention_cpu.h"
#include "cpu/blocks.h"
#include "cpu/masking.h"

// The attention variants every op takes after rng_state, defaulting to plain attention (the
// same list as _VARIANT_ARGS in fastattn/_ops.py, which gives the Triton ops these schemas too):
// window_size (left, right) with -1 unbounded, the diagonal aligned bottom-right instead of
// top-left, a logit soft-cap, ALiBi slopes (Hq,) or (B, Hq); forwards also take sinks (Hq,)
// (backwards do not need them: the lse they get includes the sink).
#define FASTATTN_VARIANT_ARGS \
  "int window_left=-1, int window_right=-1, bool bottom_right=False, float softcap=0.0, Tensor? alibi_slopes=None"

TORCH_LIBRARY(fastattn, m) {
  // q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv), lse (B, Hq, Nq)
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, float scale, float dropout_p, "
      "Tensor? rng_state, " FASTATTN_VARIANT_ARGS ", Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, bool causal, "
      "float scale, float dropout_p, Tensor? rng_state, " FASTATTN_VARIANT_ARGS
      ") -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) -> out (total_q, Hq, Dv), lse (Hq, total_q)
  m.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, bool causal, float scale, float dropout_p, Tensor? rng_state, " FASTATTN_VARIANT_ARGS
      ", Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, float dropout_p, "
      "Tensor? rng_state, " FASTATTN_VARIANT_ARGS ") -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn C++ kernels (importing this module registers the torch.ops.fastattn CPU kernels)";
  m.def("cpu_simd",
        [] {
          namespace c = fastattn::cpu;
          return c::cpu_has_amx_bf16() ? "amx-bf16+avx512f+avx512bw+avx2+fma+f16c"
               : c::cpu_has_avx512() ? "avx512f+avx512bw+avx2+fma+f16c"
               : c::cpu_has_avx2_fma() ? "avx2+fma+f16c"
                                       : "baseline (no AVX2)";
        },
        "SIMD path the CPU kernels use on this machine");
  m.def(
      "cpu_tiling",
      [] {
        namespace c = fastattn::cpu;
        // micro-kernel tile, SIMD width and the dropout draw widths (masking.h) first, then each kernel's blocks
        c::Tiling t = {{"micro_rows", c::MR}, {"micro_cols", c::NR}, {"micro_cols_avx512", 2 * c::NR},
                       {"simd_floats", c::kSimdFloats},
                       {"dropout_keys_per_draw", c::kDropoutKeysPerDraw}, {"dropout_simd_keys", c::kDropoutSimdKeys}};
        for (const auto& kernel : {c::fwd_tiling(), c::bwd_tiling()})
          t.insert(t.end(), kernel.begin(), kernel.end());
        return t;
      },
      "Block sizes of the CPU kernels as (name, size) pairs: the boundaries tests/sweep.py sweeps");
  // The kernels' float32 -> bf16 / fp16 row stores (the outputs' last step), for the tests.
  auto store_rows = [](const at::Tensor& src, at::ScalarType dtype, const char* name) {
    TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kFloat && src.dim() == 1 && src.is_contiguous(),
                name, ": src must be a contiguous 1-D float32 CPU tensor, got ", src.sizes(), " ", src.scalar_type());
    at::Tensor dst = at::empty({src.numel()}, src.options().dtype(dtype));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "cpu_store_row", [&] {
      const float* s = src.data_ptr<float>();
      scalar_t* d = dst.data_ptr<scalar_t>();
      constexpr int64_t kRow = 1 << 20;  // store_row takes an int count
      for (int64_t i = 0; i < src.numel(); i += kRow)
        fastattn::cpu::store_row(s + i, static_cast<int>(std::min(kRow, src.numel() - i)), d + i, 1);
    });
    return dst;
  };
  m.def(
      "cpu_store_row_bf16", [=](const at::Tensor& src) { return store_rows(src, at::kBFloat16, "cpu_store_row_bf16"); },
      "The kernels' float32 -> bf16 row store (the outputs' last step), for the tests");
  m.def(
      "cpu_store_row_f16", [=](const at::Tensor& src) { return store_rows(src, at::kHalf, "cpu_store_row_f16"); },
      "The kernels' float32 -> fp16 row store (the outputs' last step), for the tests");
#ifdef FASTATTN_SANITIZE
  m.attr("sanitized") = true;  // built with FASTATTN_SANITIZE (ASan/UBSan): for tests only
#else
  m.attr("sanitized") = false;
#endif
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}

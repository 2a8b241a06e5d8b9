// delta = rowsum(dO ∘ O) in float32, the per-row term of dS = P ∘ (dP - delta).
// One warp per (row, q head); O and dO are read in their storage dtype, as the
// forward wrote O.
#include "flash_common.cuh"

namespace fastattn {
namespace cuda {

constexpr int kPreprocessWarps = 4;

template <typename Tag>
__global__ void __launch_bounds__(kPreprocessWarps * kWarpSize) flash_bwd_preprocess_kernel(const AttnParams p) {
  using Tr = ElemTraits<Tag>;
  using T = typename Tr::T;
  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const SeqBounds sb = seq_bounds(p, b);
  const int i = blockIdx.x * kPreprocessWarps + warp;
  if (i >= sb.seqlen_q) return;
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + (sb.q_start + i) * p.o_row_stride +
               h * p.o_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + (sb.q_start + i) * p.do_row_stride +
                  h * p.do_head_stride;
  float acc = 0.f;
  for (int d = lane; d < p.head_dim; d += kWarpSize) acc += Tr::to_float(o[d]) * Tr::to_float(dout[d]);
#pragma unroll
  for (int w = kWarpSize / 2; w > 0; w /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, w);
  if (lane == 0) p.delta[lse_offset(p, sb, b, h) + i] = acc;
}

template <typename Tag>
void run_flash_bwd_preprocess(const AttnParams& params, void* stream) {
  const dim3 grid((params.seqlen_q + kPreprocessWarps - 1) / kPreprocessWarps, params.num_heads_q, params.batch);
  FASTATTN_LAUNCH(flash_bwd_preprocess_kernel<Tag>, grid, kPreprocessWarps * kWarpSize, 0,
                  static_cast<cudaStream_t>(stream), params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int probe_kernel_image() {
  cudaFuncAttributes attributes;
  return static_cast<int>(cudaFuncGetAttributes(&attributes, flash_bwd_preprocess_kernel<Fp16>));
}

template void run_flash_bwd_preprocess<Fp16>(const AttnParams&, void*);
template void run_flash_bwd_preprocess<Bf16>(const AttnParams&, void*);

}  // namespace cuda
}  // namespace fastattn

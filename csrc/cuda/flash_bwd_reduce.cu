// dK, dV of a GQA/MQA backward whose query-head group was split over several CTAs
// (AttnParams::kv_group_splits > 1): the sum of the float32 partials, split 0 first, so the
// result does not depend on which CTA finished first (deterministic, unlike atomics).
#include "flash_common.cuh"

namespace fastattn {
namespace cuda {

constexpr int kReduceThreads = 256;

// One thread per two neighbouring elements of one (row, K/V head) of dK or dV.
template <typename Tag>
__global__ void __launch_bounds__(kReduceThreads) flash_bwd_reduce_kernel(const AttnParams p) {
  using Tr = ElemTraits<Tag>;
  using T = typename Tr::T;
  const int64_t pairs_per_row = p.head_dim / 2;
  const int64_t per_plane = static_cast<int64_t>(p.num_heads_kv) * p.dkv_partial_rows * pairs_per_row;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (index >= 2 * per_plane) return;
  const bool is_dv = index >= per_plane;
  const int64_t within = index - (is_dv ? per_plane : 0);  // (hk, row, pair)
  const int64_t pair = within % pairs_per_row, hk_row = within / pairs_per_row;
  const int64_t row = hk_row % p.dkv_partial_rows, hk = hk_row / p.dkv_partial_rows;
  const int64_t split_stride = static_cast<int64_t>(p.num_heads_kv) * p.dkv_partial_rows * p.head_dim;
  const float* part = p.dkv_partial + (is_dv ? p.kv_group_splits * split_stride : 0) +
                      (hk * p.dkv_partial_rows + row) * p.head_dim + 2 * pair;
  float2 sum = {0.f, 0.f};
  for (int s = 0; s < p.kv_group_splits; ++s) {
    const float2 x = *reinterpret_cast<const float2*>(part + s * split_stride);
    sum.x += x.x;
    sum.y += x.y;
  }
  // rows are b * Nk + key (dense) or packed rows (varlen, batch strides 0)
  const int64_t b = p.cu_seqlens_k != nullptr ? 0 : row / p.seqlen_k;
  const int64_t key = p.cu_seqlens_k != nullptr ? row : row % p.seqlen_k;
  T* out = static_cast<T*>(is_dv ? p.dv : p.dk) +
           (is_dv ? b * p.dv_batch_stride + key * p.dv_row_stride + hk * p.dv_head_stride
                  : b * p.dk_batch_stride + key * p.dk_row_stride + hk * p.dk_head_stride);
  *reinterpret_cast<uint32_t*>(out + 2 * pair) = Tr::pack(sum.x, sum.y);
}

template <typename Tag>
void run_flash_bwd_reduce(const AttnParams& params, void* stream) {
  const int64_t elements = 2 * static_cast<int64_t>(params.num_heads_kv) * params.dkv_partial_rows *
                           (params.head_dim / 2);
  const dim3 grid(static_cast<unsigned>((elements + kReduceThreads - 1) / kReduceThreads));
  FASTATTN_LAUNCH(flash_bwd_reduce_kernel<Tag>, grid, kReduceThreads, 0, static_cast<cudaStream_t>(stream), params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void run_flash_bwd_reduce<Fp16>(const AttnParams&, void*);
template void run_flash_bwd_reduce<Bf16>(const AttnParams&, void*);

}  // namespace cuda
}  // namespace fastattn

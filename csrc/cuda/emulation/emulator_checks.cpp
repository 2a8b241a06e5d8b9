// Small kernels that show the emulator catches what it claims to (tests/test_cuda_emulation.py):
// each misuses one rule, and one multiplies through the kernels' own fragment loaders.
#include <torch/extension.h>

#include "../flash_common.cuh"

namespace fastattn {
namespace cuda {
// (The kernels sit directly in fastattn::cuda, where their `extern __shared__` array is defined.)

struct CheckParams {
  int which;
  const float* in;  // 16-byte aligned source for cp.async
  float* out;
  const void* a;  // (16, 16) row-major half tile
  const void* b;  // (16, 16) row-major half tile
  float* c;       // (16, 16) float result
};

// Each thread issues a cp.async of 16 bytes, then reads its destination before (which 0)
// or after (which 1) the wait.
__global__ void read_before_wait_kernel(const CheckParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int tid = threadIdx.x;
  cp_async_16(smem_addr(s + 4 * tid), p.in + 4 * tid, true);
  cp_async_commit();
  if (p.which == 1) cp_async_wait<0>();
  p.out[tid] = s[4 * tid];
  cp_async_wait<0>();
}

__global__ void fault_kernel(const CheckParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x;
  switch (p.which) {
    case 0:  // part of the block leaves before a barrier the rest waits at
      if (tid < 32) return;
      __syncthreads();
      break;
    case 1: {  // lanes of one warp at different instructions
      if (tid % 2 == 0) {
        __shfl_xor_sync(0xffffffffu, 1.f, 1);
      } else {
        uint32_t r[4];
        ldmatrix_x4(r, smem_addr(smem_raw));
      }
      break;
    }
    case 2: {  // ldmatrix rows past the launch's shared memory (1 KB)
      uint32_t r[4];
      ldmatrix_x4(r, smem_addr(smem_raw + 1024 + 16 * (tid % 32)));
      break;
    }
    case 3:  // cp.async from memory that is no tensor of the call
      cp_async_16(smem_addr(smem_raw + 16 * tid), p.in + 4 * tid + (1 << 20), true);
      cp_async_commit();
      cp_async_wait<0>();
      break;
    default:
      break;
  }
}

// C = A Bᵀ for (16, 16) tiles through load_a_frag / load_b_frags_nk / mma, and
// C = A B through load_b_frags_kn: the loaders of the attention kernels, on one warp.
template <typename Tag>
__global__ void mma_kernel(const CheckParams p) {
  using T = typename ElemTraits<Tag>::T;
  constexpr int kStride = TileLayout<16>::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + 16 * kStride;
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  load_tile_async<16, 16, 32>(sA, static_cast<const T*>(p.a), 16, 0, 16, lane);
  load_tile_async<16, 16, 32>(sB, static_cast<const T*>(p.b), 16, 0, 16, lane);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t a[4], b[4];
  load_a_frag<kStride>(a, sA, 0, 0, lane);
  if (p.which == 0) {
    load_b_frags_nk<kStride>(b, sB, 0, 0, lane);
  } else {
    load_b_frags_kn<kStride>(b, sB, 0, 0, lane);
  }
  float c[2][4] = {};
  ElemTraits<Tag>::mma(c[0], a, b[0], b[1]);
  ElemTraits<Tag>::mma(c[1], a, b[2], b[3]);
  for (int nt = 0; nt < 2; ++nt) {
    p.c[g * 16 + nt * 8 + 2 * t] = c[nt][0];
    p.c[g * 16 + nt * 8 + 2 * t + 1] = c[nt][1];
    p.c[(g + 8) * 16 + nt * 8 + 2 * t] = c[nt][2];
    p.c[(g + 8) * 16 + nt * 8 + 2 * t + 1] = c[nt][3];
  }
}

namespace {

at::Tensor read_before_wait(bool wait) {
  at::Tensor in = at::arange(4 * 64, at::kFloat);
  at::Tensor out = at::empty({64}, at::kFloat);
  emu::clear_buffers();
  emu::register_buffer(in.data_ptr(), in.numel() * 4, "in");
  emu::launch_body(reinterpret_cast<const void*>(&read_before_wait_kernel), dim3(1), dim3(64), 1024, [&]() {
    read_before_wait_kernel(CheckParams{wait ? 1 : 0, in.data_ptr<float>(), out.data_ptr<float>(), nullptr,
                                        nullptr, nullptr});
  });
  return out;
}

void fault(int which) {
  at::Tensor in = at::zeros({4 * 64}, at::kFloat);
  emu::clear_buffers();
  emu::register_buffer(in.data_ptr(), in.numel() * 4, "in");
  emu::launch_body(reinterpret_cast<const void*>(&fault_kernel), dim3(1), dim3(64), 1024, [&]() {
    fault_kernel(CheckParams{which, in.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr});
  });
}

void launch_without_attribute(int smem_bytes) {
  emu::launch_body(reinterpret_cast<const void*>(&fault_kernel), dim3(1), dim3(32), smem_bytes,
                   [&]() { fault_kernel(CheckParams{-1, nullptr, nullptr, nullptr, nullptr, nullptr}); });
}

at::Tensor mma(const at::Tensor& a, const at::Tensor& b, bool b_is_nk) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == a.sizes() && a.is_contiguous() &&
              b.is_contiguous() && a.scalar_type() == b.scalar_type());
  at::Tensor c = at::empty({16, 16}, at::kFloat);
  emu::clear_buffers();
  emu::register_buffer(a.data_ptr(), 512, "a");
  emu::register_buffer(b.data_ptr(), 512, "b");
  const CheckParams p{b_is_nk ? 0 : 1, nullptr, nullptr, a.data_ptr(), b.data_ptr(), c.data_ptr<float>()};
  const int smem = 2 * 16 * TileLayout<16>::kStride * 2;
  if (a.scalar_type() == at::kHalf) {
    emu::launch_body(reinterpret_cast<const void*>(&mma_kernel<Fp16>), dim3(1), dim3(32), smem,
                     [&]() { mma_kernel<Fp16>(p); });
  } else {
    emu::launch_body(reinterpret_cast<const void*>(&mma_kernel<Bf16>), dim3(1), dim3(32), smem,
                     [&]() { mma_kernel<Bf16>(p); });
  }
  return c;
}

}  // namespace

void register_emulator_checks(pybind11::module& m) {
  auto checks = m.def_submodule("checks", "kernels that misuse one emulated rule each");
  checks.def("read_before_wait", &read_before_wait);
  checks.def("fault", &fault, "0: barrier after an exit, 1: divergent warp, 2: ldmatrix past smem, "
                              "3: cp.async outside the call's tensors");
  checks.def("launch_without_attribute", &launch_without_attribute);
  checks.def("mma", &mma, "C = A Bᵀ (b_is_nk) or A B for (16, 16) half tiles through the kernels' loaders");
}

}  // namespace cuda
}  // namespace fastattn

// Host emulation of the CUDA device features the kernels in csrc/cuda/ use, so that
// their own source (kernels, launchers and the host code of attention_cuda.cpp) can be
// compiled by the host compiler and run on the CPU, in CI, without a GPU.
//
// Compiled only with -DFASTATTN_CUDA_EMULATION (tests/test_cuda_emulation.py builds it);
// flash_common.cuh and attention_cuda.cpp include this header instead of the CUDA ones.
//
// What is emulated, and how strictly (each rule below is checked; a violation aborts
// the launch with a message naming the block, thread and instruction):
//   * threads: every thread of a block is a fiber (ucontext) on one OS thread; blocks run
//     one after another. Warp-level instructions are collectives: each lane deposits its
//     operands and waits; the last lane of the warp to arrive computes the result for all.
//     All 32 lanes must reach the same collective (no divergence inside a warp), and every
//     thread of the block must reach every __syncthreads (a thread that exits while others
//     wait at a barrier, or a barrier nobody can complete, is an error).
//   * mma.sync.m16n8k16 (f16/bf16 -> f32): A, B and C fragments are assembled from the
//     lanes by the PTX ISA's fragment tables (written out below, independently of the
//     kernels' own comment), products summed in double and rounded once.
//   * ldmatrix.m8n8.x4 (.trans): lane 8i+r gives row r of matrix i; lane l receives
//     row l/4, columns 2(l%4)..+1 of each matrix (transposed: column l/4, rows 2(l%4)..+1).
//     Addresses must be 16-byte aligned and inside the launch's dynamic shared memory.
//   * cp.async.cg 16 bytes with zero-fill: recorded at issue, performed only when a
//     cp.async.wait_group retires its group (the latest moment the hardware may complete
//     it), so a read before the wait sees the poison, not the data. Sources must be 16-byte
//     aligned and inside a registered buffer (the tensors of the call); dst inside smem.
//   * shared memory: the launch's dynamic size only (accesses past it fail the bounds
//     checks above; under AddressSanitizer the rest of the arena is poisoned too), filled
//     with 0xFF bytes (NaN in fp16, bf16 and fp32) before every block.
//   * cudaFuncSetAttribute(MaxDynamicSharedMemorySize) and the launch check the size
//     against the emulated device's opt-in limit (set_device: sm80, sm86, sm89, sm90...),
//     as the driver does; more than 48 KB without the attribute fails, as on a GPU.
// Not emulated: timing, memory ordering between blocks (the kernels need none), atomics.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
// The running thread's indices; the scheduler sets them before resuming a thread.
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

// ---------------------------------------------------------------------------
// fp16 / bf16 (c10's types convert with round-to-nearest-even, as __float2half_rn)
// ---------------------------------------------------------------------------
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
struct __half2 {
  __half x, y;  // x in the low 16 bits
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "packed pairs must be 32 bits");
inline float __half2float(__half h) { return static_cast<float>(h); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }
inline float2 __half22float2(__half2 h) { return {static_cast<float>(h.x), static_cast<float>(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {static_cast<float>(h.x), static_cast<float>(h.y)}; }

namespace fastattn {
namespace cuda {
struct AttnParams;
// The dynamic shared memory of the running block (the kernels' `extern __shared__` arrays).
extern unsigned char smem_raw[];
using std::max;
using std::min;
}  // namespace cuda

namespace emu {

// The emulated GPU: what the launch checks and check_arch see.
struct DeviceModel {
  std::string name = "sm90";
  int major = 9, minor = 0;
  int max_smem_optin = 232448;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int sm_count = 132;           // multiprocessors
};
DeviceModel& device();
// Sets the emulated device by name: sm80, sm86, sm89, sm90, sm100, sm120.
void set_device(const std::string& name);

// Global memory the kernels may read with cp.async: the tensors of the current call.
void register_buffer(const void* ptr, size_t bytes, const char* name);
void clear_buffers();

// Counters of the last launches (tests print them: how much was exercised).
struct Counters {
  int64_t blocks = 0, mma = 0, ldmatrix = 0, cp_async = 0, barriers = 0, shuffles = 0;
};
Counters& counters();

enum class Mma { kF16, kBf16 };
void mma_m16n8k16(Mma kind, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_offset, bool trans);
void cp_async_16(uint32_t smem_offset, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
void syncthreads();
uint32_t shfl_xor(unsigned mask, uint32_t value, int lane_mask);
uint32_t smem_offset_of(const void* p);

using KernelBody = std::function<void()>;
// Runs `body` once per thread of every block of `grid` (threads.x threads per block).
void launch_body(const void* kernel, dim3 grid, dim3 threads, int smem_bytes, const KernelBody& body);
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);

// Registers, as the only memory cp.async may read, the extent of q, k, v and dout that
// `params` describes (its shapes and strides; varlen: the rows up to cu_seqlens[batch]).
void register_param_buffers(const cuda::AttnParams& params);

template <typename Params>
void launch(void (*kernel)(const Params), dim3 grid, dim3 threads, int smem_bytes, const Params& params) {
  clear_buffers();
  register_param_buffers(params);
  launch_body(reinterpret_cast<const void*>(kernel), grid, threads, smem_bytes, [&]() { kernel(params); });
}

}  // namespace emu
}  // namespace fastattn

inline uint32_t __cvta_generic_to_shared(const void* p) { return fastattn::emu::smem_offset_of(p); }
inline void __syncthreads() { fastattn::emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned mask, float x, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = fastattn::emu::shfl_xor(mask, bits, lane_mask);
  std::memcpy(&x, &bits, 4);
  return x;
}
inline unsigned int __shfl_xor_sync(unsigned mask, unsigned int x, int lane_mask) {
  return fastattn::emu::shfl_xor(mask, x, lane_mask);
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int bytes) {
  return fastattn::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = fastattn::emu::device().max_smem_optin;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
struct cudaFuncAttributes {
  int numRegs = 0;
};
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes*, Kernel) {
  return cudaSuccess;  // the emulation runs every kernel it compiled
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }

#define C10_CUDA_CHECK(expr)                                                                              \
  do {                                                                                                  \
    const cudaError_t fastattn_emu_err = (expr);                                                        \
    TORCH_CHECK(fastattn_emu_err == cudaSuccess, "CUDA error (emulated device ",                       \
                ::fastattn::emu::device().name, "): ", cudaGetErrorString(fastattn_emu_err), " in ", #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

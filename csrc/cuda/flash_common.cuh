// Device building blocks shared by the forward and backward kernels: the
// sm80 PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16), the element-type
// traits, shared-memory tile loads, per-sequence bounds, masking and dropout.
//
// Fragment layouts of mma.sync.m16n8k16 (lane = 4 * g + t, g = lane / 4, t = lane % 4):
//   A (16x16, row-major)  a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   B (16x8, "col")        b0: (k 2t..2t+1, n g)             b1: (k 2t+8..2t+9, n g)
//   C (16x8, float)        c0,c1: (g, 2t..2t+1)             c2,c3: (g+8, 2t..2t+1)
// Two neighbouring C tiles (n 0..7 and 8..15) hold exactly an A fragment of a
// 16x16 block, which is how P and dS go from one product into the next without
// shared memory.
#pragma once
#if defined(FASTATTN_CUDA_EMULATION)
// Host stand-ins for the CUDA types and the warp-level instructions below, so that this
// code also compiles for the CPU and runs there (tests/test_cuda_emulation.py).
#include "emulation/device_emulation.h"
#define FASTATTN_LAUNCH(kernel, grid, threads, smem_bytes, stream, params) \
  ::fastattn::emu::launch(kernel, grid, threads, smem_bytes, params)
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FASTATTN_LAUNCH(kernel, grid, threads, smem_bytes, stream, params) \
  kernel<<<grid, threads, smem_bytes, stream>>>(params)
#endif
#include <cstdint>

#include "../philox.h"
#include "flash_params.h"

namespace fastattn {
namespace cuda {

// The smallest opt-in dynamic shared memory per block among the GPUs the kernels claim
// (sm86, sm89, sm120: 99 KB; sm80 has 163 KB, sm90 227 KB). A configuration within it
// launches everywhere; a larger one only after max_smem_optin() says the GPU has room.
constexpr int kSmallestSmemOptin = 101376;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarpSize = 32;

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------
template <typename Tag>
struct ElemTraits;

template <>
struct ElemTraits<Fp16> {
  using T = __half;
  __device__ __forceinline__ static float to_float(T x) { return __half2float(x); }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits (lower column)
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FASTATTN_CUDA_EMULATION)
    emu::mma_m16n8k16(emu::Mma::kF16, c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

template <>
struct ElemTraits<Bf16> {
  using T = __nv_bfloat16;
  __device__ __forceinline__ static float to_float(T x) { return __bfloat162float(x); }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FASTATTN_CUDA_EMULATION)
    emu::mma_m16n8k16(emu::Mma::kBf16, c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

// ---------------------------------------------------------------------------
// PTX wrappers (sm80+)
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses registers; src_bytes = 0 writes zeros
// (rows past the end of a sequence, so no garbage ever reaches an mma).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
#if defined(FASTATTN_CUDA_EMULATION)
  emu::cp_async_16(dst, src, valid);
#else
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#endif
}
#if defined(FASTATTN_CUDA_EMULATION)
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  emu::cp_async_wait(kPending);
}
#else
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
#endif

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(FASTATTN_CUDA_EMULATION)
  emu::ldmatrix_x4(r, addr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(FASTATTN_CUDA_EMULATION)
  emu::ldmatrix_x4(r, addr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// ---------------------------------------------------------------------------
// Shared-memory tiles: kRows x kHeadDim elements, rows padded by 8 elements
// (16 bytes) so that the 8 row addresses of one ldmatrix fall in 8 different
// 16-byte bank groups (conflict-free for every head dim that is a multiple of 16).
// ---------------------------------------------------------------------------
template <int kHeadDim>
struct TileLayout {
  static constexpr int kStride = kHeadDim + 8;  // elements per smem row
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
};

// Copies rows [row0, row0 + kRows) of a (rows, kHeadDim) slab with row stride
// `row_stride` into smem; rows >= num_rows become zeros.
template <int kRows, int kHeadDim, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int row0, int num_rows,
                                                int tid) {
  using L = TileLayout<kHeadDim>;
  constexpr int kChunks = kRows * L::kChunksPerRow;
#pragma unroll
  for (int c = tid; c < kChunks; c += kThreads) {
    const int r = c / L::kChunksPerRow, col = (c % L::kChunksPerRow) * 8;
    const bool valid = row0 + r < num_rows;
    const T* src = valid ? gmem + (row0 + r) * row_stride + col : gmem;
    cp_async_16(smem_addr(smem + r * L::kStride + col), src, valid);
  }
}

// The key-padding mask of keys n0 .. n0 + kBlockN - 1 into shared memory (1 = visible; keys
// past the end are 0), by plain stores that the __syncthreads before their use makes visible:
// one global read per key and block instead of one per score element.
template <int kBlockN, int kThreads>
__device__ __forceinline__ void load_key_mask_block(uint8_t* smem, const uint8_t* key_mask, int64_t col_stride,
                                                    int n0, int seqlen_k, int tid) {
  for (int c = tid; c < kBlockN; c += kThreads) {
    const int j = n0 + c;
    smem[c] = j < seqlen_k && key_mask[j * col_stride] != 0;
  }
}

// A fragment of the 16x16 block at (row0, col0) of a row-major smem tile.
template <int kStride, typename T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* smem, int row0, int col0, int lane) {
  ldmatrix_x4(a, smem_addr(smem + (row0 + (lane % 16)) * kStride + col0 + (lane / 16) * 8));
}

// B fragments of two neighbouring n-tiles (n0..n0+7 -> b[0],b[1]; n0+8.. -> b[2],b[3])
// for k = col0..col0+15, from a smem tile stored [n][k] (K for Q Kᵀ).
template <int kStride, typename T>
__device__ __forceinline__ void load_b_frags_nk(uint32_t (&b)[4], const T* smem, int n0, int col0, int lane) {
  ldmatrix_x4(b, smem_addr(smem + (n0 + (lane % 8) + (lane / 16) * 8) * kStride + col0 + ((lane / 8) % 2) * 8));
}

// B fragments of two neighbouring n-tiles for k = k0..k0+15 from a smem tile
// stored [k][n] (V for P V): transposed on load.
template <int kStride, typename T>
__device__ __forceinline__ void load_b_frags_kn(uint32_t (&b)[4], const T* smem, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, smem_addr(smem + (k0 + (lane % 16)) * kStride + n0 + (lane / 16) * 8));
}

// ---------------------------------------------------------------------------
// Per-sequence bounds: dense calls use blockIdx.z as the batch index, varlen
// calls read the sequence's rows from cu_seqlens.
// ---------------------------------------------------------------------------
struct SeqBounds {
  int64_t q_start, k_start;  // first packed row (varlen) or 0 (dense)
  int seqlen_q, seqlen_k;
};

__device__ __forceinline__ SeqBounds seq_bounds(const AttnParams& p, int b) {
  SeqBounds s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.k_start = p.cu_seqlens_k[b];
    s.seqlen_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.seqlen_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else {
    s.q_start = 0;
    s.k_start = 0;
    s.seqlen_q = p.seqlen_q;
    s.seqlen_k = p.seqlen_k;
  }
  return s;
}

// The logit of raw score s = q . k in log2 units (the kernels' exp2 domain), soft-capped when
// p.softcap > 0; *tanh_out gets tanh(s * scale / softcap) (0 without soft-capping), whose
// 1 - tanh^2 the backward needs.
__device__ __forceinline__ float logit_log2(const AttnParams& p, float s, float* tanh_out) {
  if (p.softcap > 0.f) {
    const float t = tanhf(s * p.scale_over_softcap);
    *tanh_out = t;
    return p.softcap_log2 * t;
  }
  *tanh_out = 0.f;
  return s * p.scale_log2;
}

// Which keys each query row of a sequence sees in the banded kernels: row i sees key j when
// lo <= j - i < hi, with lo = offset - left and hi = offset + right + 1 (an unbounded side is a
// bound no sequence reaches), offset = seqlen_k - seqlen_q for bottom-right alignment, else 0.
// Causal is left unbounded, right = 0. One difference j - i per element and two integers per
// thread keep the banded kernels within the registers of the causal-only ones they replace.
struct Band {
  static constexpr int kFar = 1 << 30;  // beyond any sequence (the host clamps windows to 2^29)
  int lo, hi;

  __device__ __forceinline__ bool hides(int i, int j) const { return j - i < lo || j - i >= hi; }
  // Whether some pair of rows [first_row, last_row] x keys [first_key, last_key] is outside the band.
  __device__ __forceinline__ bool cuts(int first_row, int last_row, int first_key, int last_key) const {
    return first_key - last_row < lo || last_key - first_row >= hi;
  }
  // The keys that rows first_row..last_row see: [key_begin(first_row), key_end(last_row, Nk)), maybe empty.
  __device__ __forceinline__ int key_begin(int first_row) const { return max(0, first_row + lo); }
  __device__ __forceinline__ int key_end(int last_row, int seqlen_k) const { return min(seqlen_k, last_row + hi); }
  // The rows that see some of keys first_key..last_key: [row_begin(first_key), row_end(last_key, Nq)).
  __device__ __forceinline__ int row_begin(int first_key) const { return max(0, first_key - hi + 1); }
  __device__ __forceinline__ int row_end(int last_key, int seqlen_q) const { return min(seqlen_q, last_key - lo + 1); }
};

__device__ __forceinline__ Band band_of(const AttnParams& p, const SeqBounds& s) {
  const int offset = p.bottom_right ? s.seqlen_k - s.seqlen_q : 0;
  return Band{p.window_left < 0 ? -Band::kFar : offset - p.window_left,
              p.window_right < 0 ? Band::kFar : offset + p.window_right + 1};
}

// Offset of lse/delta row 0 of (sequence b, head h).
__device__ __forceinline__ int64_t lse_offset(const AttnParams& p, const SeqBounds& s, int b, int h) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start;
}

// ---------------------------------------------------------------------------
// Dropout: keep/drop of (query i, key j) in segment b * Hq + h, as csrc/philox.h.
// ---------------------------------------------------------------------------
// s = b * Hq + h in uint32 arithmetic (csrc/philox.h's segment; in int the product of
// batch and heads, each up to 65535, could overflow).
__device__ __forceinline__ uint32_t dropout_segment(const AttnParams& p, int b, int h) {
  return static_cast<uint32_t>(b) * static_cast<uint32_t>(p.num_heads_q) + static_cast<uint32_t>(h);
}

struct DropoutRng {
  uint64_t seed;
  uint32_t offset, segment, threshold;
  __device__ __forceinline__ void init(const AttnParams& p, int b, int h) {
    if (p.rng_state_device != nullptr) {
      seed = static_cast<uint64_t>(p.rng_state_device[0]);
      offset = static_cast<uint32_t>(p.rng_state_device[1]);
    } else {
      seed = p.seed;
      offset = static_cast<uint32_t>(p.offset);
    }
    segment = dropout_segment(p, b, h);
    threshold = p.dropout_threshold;
  }
  // Keep bits of keys j, j + 1 for this lane's rows i0 (keep[0]) and i1 (keep[1]) in the mma
  // C-fragment layout (j = n0 + 8 nt + 2t, j even). The partner lane (lane ^ 1) holds the same
  // rows and keys j ^ 2, the other half of the same two Philox draws (counter j / 4, rows i0
  // and i1): each lane computes one draw and the pair swaps halves, half the Philox work of
  // a draw per (row, key pair). All 32 lanes must call it together (it shuffles).
  __device__ __forceinline__ void keep_rows_shared(int i0, int i1, int j, bool (&keep)[2][2]) const {
    const bool odd = (j & 2) != 0;  // this lane's keys are words 2, 3 of a draw
    const Philox4 w =
        philox4x32_10(static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(odd ? i1 : i0), segment, offset, seed);
    // Even lanes drew row i0 and give the partner words 2, 3; odd lanes drew row i1 and give words 0, 1.
    const uint32_t own0 = odd ? w.w[2] : w.w[0], own1 = odd ? w.w[3] : w.w[1];
    const uint32_t got0 = __shfl_xor_sync(0xffffffffu, odd ? w.w[0] : w.w[2], 1);
    const uint32_t got1 = __shfl_xor_sync(0xffffffffu, odd ? w.w[1] : w.w[3], 1);
    keep[0][0] = (odd ? got0 : own0) >= threshold;
    keep[0][1] = (odd ? got1 : own1) >= threshold;
    keep[1][0] = (odd ? own0 : got0) >= threshold;
    keep[1][1] = (odd ? own1 : got1) >= threshold;
  }
  // Keep bits of this lane's four dK/dV elements in the transposed C-fragment layout: keys
  // j0 and j0 + 8 (j0 = 16 * warp-tile + g), queries i0 and i0 + 1; bit 2r + c of the result
  // for key j0 + 8r, query i0 + c. The four lanes with the same t and g / 4 (lane bits 2 and 3
  // differ, m = g % 4 = j0 % 4) need the same four Philox draws (counters (j0 + 8r) / 4,
  // i0 + c), each taking word m: lane m computes draw m and a 4 x 4 transpose over three
  // shuffles hands every lane its word of the other three. One draw per lane instead of four.
  // All 32 lanes must call it together.
  __device__ __forceinline__ uint32_t keep_keys_shared(int j0, int i0) const {
    const int m = j0 & 3;
    const Philox4 w = philox4x32_10(static_cast<uint32_t>((j0 + 8 * (m >> 1)) >> 2), static_cast<uint32_t>(i0 + (m & 1)),
                                    segment, offset, seed);
    auto word = [&](int index) {  // w.w[index] by selects (a runtime index would go to local memory)
      const uint32_t lo = (index & 1) ? w.w[1] : w.w[0], hi = (index & 1) ? w.w[3] : w.w[2];
      return (index & 2) ? hi : lo;
    };
    uint32_t bits = static_cast<uint32_t>(word(m) >= threshold) << m;  // this lane's own draw, m
#pragma unroll
    for (int k = 1; k < 4; ++k) {  // lane m ^ k sends word m of its draw, m ^ k
      bits |= static_cast<uint32_t>(__shfl_xor_sync(0xffffffffu, word(m ^ k), 4 * k) >= threshold) << (m ^ k);
    }
    return bits;
  }
};

// cudaDevAttrMaxSharedMemoryPerBlockOptin of the current device.
inline int max_smem_optin() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// Reductions over the 4 lanes of a quad (the lanes that share a C-fragment row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace cuda
}  // namespace fastattn

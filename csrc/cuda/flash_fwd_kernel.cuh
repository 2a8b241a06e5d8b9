// Forward attention kernel, FlashAttention-2 style, for sm80+ tensor cores.
//
// One CTA = one block of kBlockM query rows of one (sequence, q head); 4 warps,
// each owning 16 rows. Q is loaded once (into registers as A fragments up to D = 96).
// K blocks of kBlockN keys stream through double-buffered shared memory with cp.async
// (K of block n+1 is in flight while block n is multiplied); V has one buffer, refilled
// for block n+1 as soon as P V of block n is done, so its load overlaps the next S and
// softmax. One V buffer instead of two saves kBlockN rows of shared memory: at D = 128,
// 69,760 B instead of 87,168 B, so two CTAs fit an sm80 SM (164 KB) where one did.
// Per key block:
//   S = Q Kᵀ               (mma.sync m16n8k16, fp32 accumulators)
//   online softmax of S * scale * log2(e) with exp2, running max m and sum l per row
//   O = O * exp2(m_old - m_new) + P V   (P reused from the S accumulators as A fragments)
// Epilogue: O / l (times 1/(1-p) with dropout), lse = (m + log2 l) * ln 2.
#pragma once
#include <cmath>

#include "flash_common.cuh"

namespace fastattn {
namespace cuda {

template <int kHeadDim>
struct FwdConfig {
  static constexpr int kBlockM = 64;  // query rows per CTA (16 per warp)
  static constexpr int kBlockN = 64;  // keys per pipeline stage
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kStride = TileLayout<kHeadDim>::kStride;
  // Q tile + two K tiles + one V tile, then two key-padding mask blocks (bytes)
  static constexpr int kSmemElems = (kBlockM + 3 * kBlockN) * kStride;
  static constexpr int kSmemBytes(int elem_bytes) { return kSmemElems * elem_bytes + 2 * kBlockN; }
};

template <typename Tag, int kHeadDim, bool kBanded>
__global__ void __launch_bounds__(FwdConfig<kHeadDim>::kThreads)
    flash_fwd_kernel(const AttnParams p) {
  using Cfg = FwdConfig<kHeadDim>;
  using Tr = ElemTraits<Tag>;
  using T = typename Tr::T;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kSTiles = kBlockN / 8;   // n-tiles of S per warp
  constexpr int kOTiles = kHeadDim / 8;  // n-tiles of O per warp
  constexpr int kKSteps = kHeadDim / 16;  // k-steps of Q Kᵀ
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kBlockM, kStride)
  T* sK = sQ + kBlockM * kStride;          // 2 x (kBlockN, kStride)
  T* sV = sK + 2 * kBlockN * kStride;      // (kBlockN, kStride)
  uint8_t* sMask = reinterpret_cast<uint8_t*>(sV + kBlockN * kStride);  // 2 x kBlockN

  // Banded (causal): the last query blocks see the most keys, so they are launched first (a short
  // block at the end of the grid, not a long one, is what the GPU's tail waits on).
  const int m_block = kBanded ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane / 4, t = lane % 4;

  const SeqBounds sb = seq_bounds(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= sb.seqlen_q) return;  // varlen: this sequence is shorter than max_seqlen_q
  const int hk = h / (p.num_heads_q / p.num_heads_kv);  // GQA: K/V head of this q head

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + sb.q_start * p.q_row_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + sb.k_start * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + sb.k_start * p.v_row_stride + hk * p.v_head_stride;
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + sb.q_start * p.o_row_stride + h * p.o_head_stride;
  float* lse = p.lse + lse_offset(p, sb, b, h);
  const uint8_t* key_mask = p.key_mask != nullptr ? p.key_mask + b * p.key_mask_batch_stride : nullptr;

  // Banded: only the key blocks that meet the band of rows m0 .. last_row are visited.
  const Band band = band_of(p, sb);
  const int last_row = min(m0 + kBlockM, sb.seqlen_q) - 1;
  const int key_begin = kBanded ? band.key_begin(m0) : 0;
  const int key_end = kBanded ? band.key_end(last_row, sb.seqlen_k) : sb.seqlen_k;
  const int n_first = key_begin / kBlockN;  // first key block
  const int n_stop = key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN : n_first;  // one past the last

  // cp.async groups, in commit order: (Q, K(first)), V(first), then per block n: K(n+1), V(n+1).
  load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q, p.q_row_stride, m0, sb.seqlen_q, tid);
  if (n_stop > n_first) {
    load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k, p.k_row_stride, n_first * kBlockN, sb.seqlen_k, tid);
    if (key_mask != nullptr) {
      load_key_mask_block<kBlockN, Cfg::kThreads>(sMask, key_mask, p.key_mask_col_stride, n_first * kBlockN,
                                                  sb.seqlen_k, tid);
    }
  }
  cp_async_commit();
  if (n_stop > n_first) {
    load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v, p.v_row_stride, n_first * kBlockN, sb.seqlen_k, tid);
  }
  cp_async_commit();
  cp_async_wait<1>();  // Q and K0 (V0 may still be in flight)
  __syncthreads();

  // This warp's 16 query rows as A fragments, all of D: kept in registers up to D = 96; at
  // D = 128 they would be 32 more live registers next to the 64 of O, which spills on sm_80
  // (255 registers), so they are re-read from the Q tile (which stays in shared memory) per key block.
  constexpr bool kQInRegisters = kHeadDim < 128;
  uint32_t q_frag[kQInRegisters ? kKSteps : 1][4];
  if constexpr (kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) load_a_frag<kStride>(q_frag[kk], sQ, warp * 16, kk * 16, lane);
  }

  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // in log2 units (already times scale * log2 e)
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums; reduced over the quad at the end
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};  // positions in the sequence

  DropoutRng rng;
  if (p.dropout) rng.init(p, b, h);

  for (int n = n_first; n < n_stop; ++n) {
    const int buf = (n - n_first) & 1;
    const bool prefetch = n + 1 < n_stop;
    if (prefetch) {  // K (and the mask) of the next block into the other buffer
      load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK + (buf ^ 1) * kBlockN * kStride, k, p.k_row_stride,
                                                        (n + 1) * kBlockN, sb.seqlen_k, tid);
      if (key_mask != nullptr) {
        load_key_mask_block<kBlockN, Cfg::kThreads>(sMask + (buf ^ 1) * kBlockN, key_mask, p.key_mask_col_stride,
                                                    (n + 1) * kBlockN, sb.seqlen_k, tid);
      }
      cp_async_commit();
      cp_async_wait<2>();  // K(n) has landed; V(n) and K(n+1) may still be in flight
    } else {
      cp_async_wait<1>();  // K(n) has landed; V(n) may still be in flight
    }
    __syncthreads();
    const T* cK = sK + buf * kBlockN * kStride;
    const T* cV = sV;
    const uint8_t* cMask = sMask + buf * kBlockN;
    const int n0 = n * kBlockN;

    // S = Q Kᵀ for 16 rows x kBlockN keys per warp.
    float s[kSTiles][4];
#pragma unroll
    for (int i = 0; i < kSTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      if constexpr (!kQInRegisters) load_a_frag<kStride>(q_frag[0], sQ, warp * 16, kk * 16, lane);
      const uint32_t(&qa)[4] = q_frag[kQInRegisters ? kk : 0];
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t bk[4];
        load_b_frags_nk<kStride>(bk, cK, np * 16, kk * 16, lane);
        Tr::mma(s[2 * np], qa, bk[0], bk[1]);
        Tr::mma(s[2 * np + 1], qa, bk[2], bk[3]);
      }
    }

    // Scale (and soft-cap) into log2 units; mask keys past the end, outside the band, or padded.
    const bool need_mask = key_mask != nullptr || n0 + kBlockN > sb.seqlen_k ||
                           (kBanded && band.cuts(m0, m0 + kBlockM - 1, n0, n0 + kBlockN - 1));
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float unused_tanh;
        float x = logit_log2(p, s[nt][e], &unused_tanh);
        if (need_mask) {
          const int j = n0 + nt * 8 + 2 * t + (e & 1), i = rows[e >> 1];
          const bool hidden = j >= sb.seqlen_k || (kBanded && band.hides(i, j)) ||
                              (key_mask != nullptr && !cMask[j - n0]);
          if (hidden) x = -INFINITY;
        }
        s[nt][e] = x;
      }
    }

    // Online softmax: rescale the running output by exp2(m_old - m_new).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      const float m_new = fmaxf(row_max[r], quad_max(mx));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
      const float alpha = exp2f(row_max[r] - m_use);
      row_max[r] = m_new;
      row_sum[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < kOTiles; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt) {
        const float p0 = exp2f(s[nt][2 * r] - m_use), p1 = exp2f(s[nt][2 * r + 1] - m_use);
        row_sum[r] += p0 + p1;  // the normaliser counts dropped weights too
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
      }
    }

    if (p.dropout) {  // zero the dropped weights; 1/(1-p) is applied in the epilogue
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt) {
        bool keep[2][2];
        rng.keep_rows_shared(rows[0], rows[1], n0 + nt * 8 + 2 * t, keep);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (!keep[r][0]) s[nt][2 * r] = 0.f;
          if (!keep[r][1]) s[nt][2 * r + 1] = 0.f;
        }
      }
    }

    // O += P V, P straight from the S accumulators, once V(n) has landed.
    if (prefetch) {
      cp_async_wait<1>();  // all but K(n+1)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {Tr::pack(s[2 * kk][0], s[2 * kk][1]), Tr::pack(s[2 * kk][2], s[2 * kk][3]),
                             Tr::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Tr::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        uint32_t bv[4];
        load_b_frags_kn<kStride>(bv, cV, kk * 16, dp * 16, lane);
        Tr::mma(o[2 * dp], a, bv[0], bv[1]);
        Tr::mma(o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // every warp is done with V(n) and K(n): both buffers may be refilled
    if (prefetch) {
      load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v, p.v_row_stride, (n + 1) * kBlockN, sb.seqlen_k, tid);
      cp_async_commit();
    }
  }

  // Epilogue: normalise, store O (rows past the end are dropped) and lse.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    const float inv = l > 0.f ? (p.dropout ? p.dropout_rescale : 1.f) / l : 0.f;  // empty rows give zeros
    const int i = rows[r];
    if (i < sb.seqlen_q) {
      T* out_row = out + i * p.o_row_stride;
#pragma unroll
      for (int dt = 0; dt < kOTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(out_row + dt * 8 + 2 * t) = Tr::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
      }
      if (t == 0) lse[i] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

template <typename Tag, int kHeadDim, bool kBanded>
void run_flash_fwd(const AttnParams& params, void* stream) {
  using Cfg = FwdConfig<kHeadDim>;
  using T = typename ElemTraits<Tag>::T;
  constexpr int smem_bytes = Cfg::kSmemBytes(static_cast<int>(sizeof(T)));
  static_assert(smem_bytes <= kSmallestSmemOptin, "the forward must fit every sm80+ GPU's shared memory");
  auto kernel = flash_fwd_kernel<Tag, kHeadDim, kBanded>;
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  const dim3 grid((params.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, params.num_heads_q, params.batch);
  FASTATTN_LAUNCH(kernel, grid, Cfg::kThreads, smem_bytes, static_cast<cudaStream_t>(stream), params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fastattn

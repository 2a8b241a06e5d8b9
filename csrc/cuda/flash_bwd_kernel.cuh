// Backward attention kernels for sm80+ tensor cores.
//
// Two kernels, both written like the forward (operands in double-buffered shared
// memory filled by cp.async, products with mma.sync m16n8k16, P and dS passed from
// one product to the next as register fragments). Neither needs atomics, so the
// gradients are deterministic:
//   flash_bwd_dq_kernel    one CTA per (query block, q head): loops over key blocks,
//                          P = exp2(S*scale*log2e - lse*log2e), dP = dO Vᵀ,
//                          dS = P ∘ (dP - delta), dQ += dS K.
//   flash_bwd_dkdv_kernel  one CTA per (key block, kv head): loops over the q heads of
//                          its GQA group and their query blocks, Pᵀ = exp2(K Qᵀ ...),
//                          dV += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ - delta), dK += dSᵀ Q.
// Q Kᵀ and dO Vᵀ are thus computed twice: 7 matrix products per (query block, key block)
// instead of flash-attention's 5, i.e. the backward does 3.5x the forward's matrix FLOPs
// rather than 2.5x (40% more tensor-core work; it also reads Q, dO, K and V twice). What that
// buys: no float atomics. flash-attention accumulates dQ with atomicAdd in fp32 from every key
// block, so its dQ depends on the order the blocks finish in (not bitwise reproducible run to
// run) and it needs a dQ-accumulator buffer and a conversion pass; here each dQ row is summed by
// one CTA in a fixed order and written once, so every gradient is deterministic.
// delta = rowsum(dO ∘ O) comes from flash_bwd_preprocess.cu. With dropout (Z keep
// mask, r = 1/(1-p)): dV uses P∘Z·r, and dP is taken as dO Vᵀ ∘ Z·r.
#pragma once
#include <cmath>

#include "flash_common.cuh"

namespace fastattn {
namespace cuda {

// kBlockN_ = 64 normally; 32 where a GPU's opt-in shared memory is too small for 64
// (D = 128 needs 104,448 B with 64: over the 101,376 B of sm86, sm89 and sm120).
template <int kHeadDim, int kBlockN_ = 64>
struct BwdDqConfig {
  static constexpr int kBlockM = 64;        // query rows per CTA (16 per warp)
  static constexpr int kBlockN = kBlockN_;  // keys per pipeline stage
  static constexpr int kThreads = 4 * kWarpSize;
  static constexpr int kStride = TileLayout<kHeadDim>::kStride;
  // Q + dO tiles + two K tiles + two V tiles, then two key-padding mask blocks (bytes)
  static constexpr int kSmemElems = (2 * kBlockM + 4 * kBlockN) * kStride;
  static constexpr int kSmemBytes(int elem_bytes) { return kSmemElems * elem_bytes + 2 * kBlockN; }
};

template <int kHeadDim>
struct BwdDkDvConfig {
  static constexpr int kBlockN = kBwdDkDvBlockKeys;        // keys per CTA (16 per warp)
  // Queries per stage: fewer at larger D, where dK and dV take 2 * D / 2 accumulator registers
  // per lane. At D = 128, 32 queries sat at 255 registers on sm_80 and spilled 8-16 B; 16 fit
  // in 250 with no spill, for twice the steps (each with its own two barriers).
  static constexpr int kBlockM = kHeadDim <= 64 ? 64 : (kHeadDim <= 96 ? 32 : 16);
  static constexpr int kThreads = 4 * kWarpSize;
  static constexpr int kStride = TileLayout<kHeadDim>::kStride;
  // K + V tiles + two Q tiles + two dO tiles, then 2 x (lse, delta) float rows
  static constexpr int kSmemElems = (2 * kBlockN + 4 * kBlockM) * kStride;
  static constexpr int kSmemBytes(int elem_bytes) { return kSmemElems * elem_bytes + 4 * kBlockM * 4; }
};

// ---------------------------------------------------------------------------
// dQ
// ---------------------------------------------------------------------------
template <typename Tag, int kHeadDim, bool kBanded, int kBlockKeys>
__global__ void __launch_bounds__(BwdDqConfig<kHeadDim, kBlockKeys>::kThreads)
    flash_bwd_dq_kernel(const AttnParams p) {
  using Cfg = BwdDqConfig<kHeadDim, kBlockKeys>;
  using Tr = ElemTraits<Tag>;
  using T = typename Tr::T;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kSTiles = kBlockN / 8, kDTiles = kHeadDim / 8, kKSteps = kHeadDim / 16;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kBlockM, kStride)
  T* sdO = sQ + kBlockM * kStride;         // (kBlockM, kStride)
  T* sK = sdO + kBlockM * kStride;         // 2 x (kBlockN, kStride)
  T* sV = sK + 2 * kBlockN * kStride;      // 2 x (kBlockN, kStride)
  uint8_t* sMask = reinterpret_cast<uint8_t*>(sV + 2 * kBlockN * kStride);  // 2 x kBlockN

  // Banded: longest query blocks first, as in the forward.
  const int m_block = kBanded ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const SeqBounds sb = seq_bounds(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= sb.seqlen_q) return;
  const int hk = h / (p.num_heads_q / p.num_heads_kv);

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + sb.q_start * p.q_row_stride + h * p.q_head_stride;
  const T* dout =
      static_cast<const T*>(p.dout) + b * p.do_batch_stride + sb.q_start * p.do_row_stride + h * p.do_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + sb.k_start * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + sb.k_start * p.v_row_stride + hk * p.v_head_stride;
  T* dq = static_cast<T*>(p.dq) + b * p.dq_batch_stride + sb.q_start * p.dq_row_stride + h * p.dq_head_stride;
  const float* lse = p.lse + lse_offset(p, sb, b, h);
  const float* delta = p.delta + lse_offset(p, sb, b, h);
  const uint8_t* key_mask = p.key_mask != nullptr ? p.key_mask + b * p.key_mask_batch_stride : nullptr;

  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  float row_lse[2], row_delta[2];  // lse in log2 units
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool valid = rows[r] < sb.seqlen_q;
    const float l = valid ? lse[rows[r]] : 0.f;
    // A row that sees no key has lse = -inf and no probability mass: every one of its
    // keys is masked below, +inf just keeps the arithmetic finite.
    row_lse[r] = l == -INFINITY ? INFINITY : l * kLog2e;
    row_delta[r] = valid ? delta[rows[r]] : 0.f;
  }

  // Banded: only the key blocks that meet the band of rows m0 .. last_row (as in the forward).
  const Band band = band_of(p, sb);
  const int last_row = min(m0 + kBlockM, sb.seqlen_q) - 1;
  const int key_begin = kBanded ? band.key_begin(m0) : 0;
  const int key_end = kBanded ? band.key_end(last_row, sb.seqlen_k) : sb.seqlen_k;
  const int n_first = key_begin / kBlockN;
  const int n_stop = key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN : n_first;

  load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q, p.q_row_stride, m0, sb.seqlen_q, tid);
  load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sdO, dout, p.do_row_stride, m0, sb.seqlen_q, tid);
  if (n_stop > n_first) {
    const int first = n_first * kBlockN;
    load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k, p.k_row_stride, first, sb.seqlen_k, tid);
    load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v, p.v_row_stride, first, sb.seqlen_k, tid);
    if (key_mask != nullptr) {
      load_key_mask_block<kBlockN, Cfg::kThreads>(sMask, key_mask, p.key_mask_col_stride, first, sb.seqlen_k, tid);
    }
  }
  cp_async_commit();

  DropoutRng rng;
  if (p.dropout) rng.init(p, b, h);

  float acc[kDTiles][4];  // dQ, 16 rows x D per warp
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int n = n_first; n < n_stop; ++n) {
    const int buf = (n - n_first) & 1;
    if (n + 1 < n_stop) {
      load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK + (buf ^ 1) * kBlockN * kStride, k, p.k_row_stride,
                                                        (n + 1) * kBlockN, sb.seqlen_k, tid);
      load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV + (buf ^ 1) * kBlockN * kStride, v, p.v_row_stride,
                                                        (n + 1) * kBlockN, sb.seqlen_k, tid);
      if (key_mask != nullptr) {
        load_key_mask_block<kBlockN, Cfg::kThreads>(sMask + (buf ^ 1) * kBlockN, key_mask, p.key_mask_col_stride,
                                                    (n + 1) * kBlockN, sb.seqlen_k, tid);
      }
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cK = sK + buf * kBlockN * kStride;
    const T* cV = sV + buf * kBlockN * kStride;
    const uint8_t* cMask = sMask + buf * kBlockN;
    const int n0 = n * kBlockN;

    float s[kSTiles][4], dp[kSTiles][4];
#pragma unroll
    for (int i = 0; i < kSTiles; ++i) {
      s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t aq[4], ado[4];
      load_a_frag<kStride>(aq, sQ, warp * 16, kk * 16, lane);
      load_a_frag<kStride>(ado, sdO, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t bk[4], bv[4];
        load_b_frags_nk<kStride>(bk, cK, np * 16, kk * 16, lane);
        load_b_frags_nk<kStride>(bv, cV, np * 16, kk * 16, lane);
        Tr::mma(s[2 * np], aq, bk[0], bk[1]);  // S = Q Kᵀ
        Tr::mma(s[2 * np + 1], aq, bk[2], bk[3]);
        Tr::mma(dp[2 * np], ado, bv[0], bv[1]);  // dP = dO Vᵀ
        Tr::mma(dp[2 * np + 1], ado, bv[2], bv[3]);
      }
    }

    const bool need_mask = key_mask != nullptr || n0 + kBlockN > sb.seqlen_k ||
                           (kBanded && band.cuts(m0, m0 + kBlockM - 1, n0, n0 + kBlockN - 1));
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt) {
      const int j = n0 + nt * 8 + 2 * t;
      bool keep_rows[2][2] = {{true, true}, {true, true}};
      if (p.dropout) rng.keep_rows_shared(rows[0], rows[1], j, keep_rows);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = rows[r];
        const bool(&keep)[2] = keep_rows[r];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = 2 * r + c;
          bool hidden = false;
          if (need_mask) {
            hidden = j + c >= sb.seqlen_k || (kBanded && band.hides(i, j + c)) ||
                     (key_mask != nullptr && !cMask[j + c - n0]);
          }
          float t = 0.f;  // soft-capping: dS picks up its derivative 1 - tanh^2 (hidden: 0)
          const float prob = hidden ? 0.f : exp2f(logit_log2(p, s[nt][e], &t) - row_lse[r]);
          float dprob = dp[nt][e];
          if (p.dropout) dprob = keep[c] ? dprob * p.dropout_rescale : 0.f;
          s[nt][e] = prob * (dprob - row_delta[r]) * (1.f - t * t);  // dS (unscaled)
        }
      }
    }

    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {Tr::pack(s[2 * kk][0], s[2 * kk][1]), Tr::pack(s[2 * kk][2], s[2 * kk][3]),
                             Tr::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Tr::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < kHeadDim / 16; ++dt) {
        uint32_t bk[4];
        load_b_frags_kn<kStride>(bk, cK, kk * 16, dt * 16, lane);
        Tr::mma(acc[2 * dt], a, bk[0], bk[1]);
        Tr::mma(acc[2 * dt + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= sb.seqlen_q) continue;
    T* row = dq + rows[r] * p.dq_row_stride;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(row + dt * 8 + 2 * t) =
          Tr::pack(acc[dt][2 * r] * p.scale, acc[dt][2 * r + 1] * p.scale);
    }
  }
}

// ---------------------------------------------------------------------------
// dK, dV
// ---------------------------------------------------------------------------
template <typename Tag, int kHeadDim, bool kBanded>
__global__ void __launch_bounds__(BwdDkDvConfig<kHeadDim>::kThreads)
    flash_bwd_dkdv_kernel(const AttnParams p) {
  using Cfg = BwdDkDvConfig<kHeadDim>;
  using Tr = ElemTraits<Tag>;
  using T = typename Tr::T;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kSTiles = kBlockM / 8, kDTiles = kHeadDim / 8, kKSteps = kHeadDim / 16;
  static_assert(kBlockM <= Cfg::kThreads, "one thread per lse / delta row");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // (kBlockN, kStride)
  T* sV = sK + kBlockN * kStride;          // (kBlockN, kStride)
  T* sQ = sV + kBlockN * kStride;          // 2 x (kBlockM, kStride)
  T* sdO = sQ + 2 * kBlockM * kStride;     // 2 x (kBlockM, kStride)
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kBlockM * kStride);  // 2 x kBlockM, log2 units
  float* sDelta = sLse + 2 * kBlockM;                                  // 2 x kBlockM

  // blockIdx.y = K/V head x split of its group: this CTA takes q heads
  // hk * group + split * group_part .. + group_part - 1.
  const int splits = p.kv_group_splits;
  const int n_block = blockIdx.x, hk = blockIdx.y / splits, split = blockIdx.y % splits, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const SeqBounds sb = seq_bounds(p, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= sb.seqlen_k) return;
  const int group_part = p.num_heads_q / p.num_heads_kv / splits;
  const int h_first = hk * (group_part * splits) + split * group_part;

  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + sb.k_start * p.k_row_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + sb.k_start * p.v_row_stride + hk * p.v_head_stride;
  T* dk = static_cast<T*>(p.dk) + b * p.dk_batch_stride + sb.k_start * p.dk_row_stride + hk * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_batch_stride + sb.k_start * p.dv_row_stride + hk * p.dv_head_stride;
  const T* q_seq = static_cast<const T*>(p.q) + b * p.q_batch_stride + sb.q_start * p.q_row_stride;
  const T* do_seq = static_cast<const T*>(p.dout) + b * p.do_batch_stride + sb.q_start * p.do_row_stride;

  // Steps: (q head of the group) x (query block); banded: only the query blocks whose rows see
  // some key of this block (causal: those that do not end before it starts).
  const Band band = band_of(p, sb);
  const int last_key = min(n0 + kBlockN, sb.seqlen_k) - 1;
  const int row_begin = kBanded ? band.row_begin(n0) : 0;
  const int row_end = kBanded ? band.row_end(last_key, sb.seqlen_q) : sb.seqlen_q;
  const int m_begin = row_begin / kBlockM;
  const int num_m = row_end > row_begin ? (row_end + kBlockM - 1) / kBlockM : m_begin;
  const int steps_per_head = max(num_m - m_begin, 0);
  const int num_steps = group_part * steps_per_head;

  // Issues the loads of step `step` into buffer `buf`: Q and dO by cp.async, lse and delta
  // by plain loads (visible after the __syncthreads that precedes their use).
  auto load_step = [&](int step, int buf) {
    const int h = h_first + step / steps_per_head;
    const int mq0 = (m_begin + step % steps_per_head) * kBlockM;
    load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sQ + buf * kBlockM * kStride, q_seq + h * p.q_head_stride,
                                                      p.q_row_stride, mq0, sb.seqlen_q, tid);
    load_tile_async<kBlockM, kHeadDim, Cfg::kThreads>(sdO + buf * kBlockM * kStride, do_seq + h * p.do_head_stride,
                                                      p.do_row_stride, mq0, sb.seqlen_q, tid);
    if (tid < kBlockM) {
      const int i = mq0 + tid;
      const float l = i < sb.seqlen_q ? p.lse[lse_offset(p, sb, b, h) + i] : INFINITY;
      // Rows past the end and rows that see no key (lse = -inf) get +inf: P = 0.
      sLse[buf * kBlockM + tid] = (l == -INFINITY || l == INFINITY) ? INFINITY : l * kLog2e;
      sDelta[buf * kBlockM + tid] = i < sb.seqlen_q ? p.delta[lse_offset(p, sb, b, h) + i] : 0.f;
    }
  };

  load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sK, k, p.k_row_stride, n0, sb.seqlen_k, tid);
  load_tile_async<kBlockN, kHeadDim, Cfg::kThreads>(sV, v, p.v_row_stride, n0, sb.seqlen_k, tid);
  if (num_steps > 0) load_step(0, 0);
  cp_async_commit();

  // This warp's 16 keys: positions and whether the key-padding mask lets them be seen.
  const int keys[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};
  bool key_visible[2] = {true, true};
  if (p.key_mask != nullptr) {
    const uint8_t* km = p.key_mask + b * p.key_mask_batch_stride;
#pragma unroll
    for (int r = 0; r < 2; ++r) key_visible[r] = keys[r] < sb.seqlen_k && km[keys[r] * p.key_mask_col_stride];
  }

  float acc_dk[kDTiles][4], acc_dv[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) {
    acc_dk[i][0] = acc_dk[i][1] = acc_dk[i][2] = acc_dk[i][3] = 0.f;
    acc_dv[i][0] = acc_dv[i][1] = acc_dv[i][2] = acc_dv[i][3] = 0.f;
  }
  DropoutRng rng;
  if (p.dropout) rng.init(p, b, h_first);

  for (int step = 0; step < num_steps; ++step) {
    const int buf = step & 1;
    if (step + 1 < num_steps) {
      load_step(step + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int h = h_first + step / steps_per_head;
    const int mq0 = (m_begin + step % steps_per_head) * kBlockM;
    if (p.dropout) rng.segment = dropout_segment(p, b, h);
    const T* cQ = sQ + buf * kBlockM * kStride;
    const T* cdO = sdO + buf * kBlockM * kStride;
    const float* cLse = sLse + buf * kBlockM;
    const float* cDelta = sDelta + buf * kBlockM;

    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, 16 keys x kBlockM queries per warp.
    float s[kSTiles][4], dp[kSTiles][4];
#pragma unroll
    for (int i = 0; i < kSTiles; ++i) {
      s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t ak[4], av[4];
      load_a_frag<kStride>(ak, sK, warp * 16, kk * 16, lane);
      load_a_frag<kStride>(av, sV, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t bq[4], bdo[4];
        load_b_frags_nk<kStride>(bq, cQ, np * 16, kk * 16, lane);
        load_b_frags_nk<kStride>(bdo, cdO, np * 16, kk * 16, lane);
        Tr::mma(s[2 * np], ak, bq[0], bq[1]);
        Tr::mma(s[2 * np + 1], ak, bq[2], bq[3]);
        Tr::mma(dp[2 * np], av, bdo[0], bdo[1]);
        Tr::mma(dp[2 * np + 1], av, bdo[2], bdo[3]);
      }
    }

    // Element (key keys[e / 2], query mq0 + nt * 8 + 2t + e % 2):
    // s <- dropped P * r (for dV), dp <- dS (for dK).
    const bool band_block = kBanded && band.cuts(mq0, mq0 + kBlockM - 1, n0, n0 + kBlockN - 1);
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt) {
      const uint32_t keep = p.dropout ? rng.keep_keys_shared(keys[0], mq0 + nt * 8 + 2 * t) : 0xFu;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1), i = mq0 + col, j = keys[e >> 1];
        const bool hidden = !key_visible[e >> 1] || (band_block && band.hides(i, j));
        float t = 0.f;  // soft-capping: dS picks up its derivative 1 - tanh^2 (hidden: 0)
        const float prob = hidden ? 0.f : exp2f(logit_log2(p, s[nt][e], &t) - cLse[col]);
        float prob_kept = prob, dprob = dp[nt][e];
        if (p.dropout) {
          const bool kept = (keep >> e) & 1u;
          prob_kept = kept ? prob * p.dropout_rescale : 0.f;
          dprob = kept ? dprob * p.dropout_rescale : 0.f;
        }
        s[nt][e] = prob_kept;
        dp[nt][e] = prob * (dprob - cDelta[col]) * (1.f - t * t);
      }
    }

    // dV += (P∘Z·r)ᵀ dO and dK += dSᵀ Q; the query axis is the reduction axis.
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      const uint32_t ap[4] = {Tr::pack(s[2 * kk][0], s[2 * kk][1]), Tr::pack(s[2 * kk][2], s[2 * kk][3]),
                              Tr::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              Tr::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint32_t ads[4] = {Tr::pack(dp[2 * kk][0], dp[2 * kk][1]), Tr::pack(dp[2 * kk][2], dp[2 * kk][3]),
                               Tr::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                               Tr::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < kHeadDim / 16; ++dt) {
        uint32_t bdo[4], bq[4];
        load_b_frags_kn<kStride>(bdo, cdO, kk * 16, dt * 16, lane);
        load_b_frags_kn<kStride>(bq, cQ, kk * 16, dt * 16, lane);
        Tr::mma(acc_dv[2 * dt], ap, bdo[0], bdo[1]);
        Tr::mma(acc_dv[2 * dt + 1], ap, bdo[2], bdo[3]);
        Tr::mma(acc_dk[2 * dt], ads, bq[0], bq[1]);
        Tr::mma(acc_dk[2 * dt + 1], ads, bq[2], bq[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  if (splits > 1) {  // partial sums in float32, summed by flash_bwd_reduce.cu
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (keys[r] >= sb.seqlen_k) continue;
      const int64_t row = (p.cu_seqlens_k != nullptr ? sb.k_start : static_cast<int64_t>(b) * p.seqlen_k) + keys[r];
      const int64_t part = (static_cast<int64_t>(split) * p.num_heads_kv + hk) * p.dkv_partial_rows + row;
      const int64_t plane = static_cast<int64_t>(splits) * p.num_heads_kv * p.dkv_partial_rows * kHeadDim;
      float* pdk = p.dkv_partial + part * kHeadDim;
      float* pdv = pdk + plane;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<float2*>(pdk + dt * 8 + 2 * t) =
            float2{acc_dk[dt][2 * r] * p.scale, acc_dk[dt][2 * r + 1] * p.scale};
        *reinterpret_cast<float2*>(pdv + dt * 8 + 2 * t) = float2{acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]};
      }
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (keys[r] >= sb.seqlen_k) continue;
    T* dk_row = dk + keys[r] * p.dk_row_stride;
    T* dv_row = dv + keys[r] * p.dv_row_stride;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(dk_row + dt * 8 + 2 * t) =
          Tr::pack(acc_dk[dt][2 * r] * p.scale, acc_dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_row + dt * 8 + 2 * t) = Tr::pack(acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]);
    }
  }
}

template <typename Kernel>
void set_smem_limit(Kernel kernel, int smem_bytes) {
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
}

template <typename Tag, int kHeadDim, bool kBanded, int kBlockKeys>
void launch_bwd_dq(const AttnParams& params, cudaStream_t s) {
  using Cfg = BwdDqConfig<kHeadDim, kBlockKeys>;
  constexpr int smem_bytes = Cfg::kSmemBytes(static_cast<int>(sizeof(typename ElemTraits<Tag>::T)));
  auto kernel = flash_bwd_dq_kernel<Tag, kHeadDim, kBanded, kBlockKeys>;
  set_smem_limit(kernel, smem_bytes);
  const dim3 grid((params.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, params.num_heads_q, params.batch);
  FASTATTN_LAUNCH(kernel, grid, Cfg::kThreads, smem_bytes, s, params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dQ and dK/dV kernels on the same stream; delta must already be computed.
template <typename Tag, int kHeadDim, bool kBanded>
void run_flash_bwd(const AttnParams& params, void* stream) {
  using T = typename ElemTraits<Tag>::T;
  constexpr int kElem = static_cast<int>(sizeof(T));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  static_assert(BwdDqConfig<kHeadDim, 32>::kSmemBytes(kElem) <= kSmallestSmemOptin &&
                    BwdDkDvConfig<kHeadDim>::kSmemBytes(kElem) <= kSmallestSmemOptin,
                "every backward configuration must fit the smallest opt-in shared memory of an sm80+ GPU");
  if constexpr (BwdDqConfig<kHeadDim, 64>::kSmemBytes(kElem) <= kSmallestSmemOptin) {
    launch_bwd_dq<Tag, kHeadDim, kBanded, 64>(params, s);
  } else if (BwdDqConfig<kHeadDim, 64>::kSmemBytes(kElem) <= max_smem_optin()) {
    launch_bwd_dq<Tag, kHeadDim, kBanded, 64>(params, s);
  } else {
    launch_bwd_dq<Tag, kHeadDim, kBanded, 32>(params, s);
  }
  {
    using Cfg = BwdDkDvConfig<kHeadDim>;
    constexpr int smem_bytes = Cfg::kSmemBytes(kElem);
    auto kernel = flash_bwd_dkdv_kernel<Tag, kHeadDim, kBanded>;
    set_smem_limit(kernel, smem_bytes);
    const dim3 grid((params.seqlen_k + Cfg::kBlockN - 1) / Cfg::kBlockN, params.num_heads_kv * params.kv_group_splits,
                    params.batch);
    FASTATTN_LAUNCH(kernel, grid, Cfg::kThreads, smem_bytes, s, params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (params.kv_group_splits > 1) run_flash_bwd_reduce<Tag>(params, stream);
}

}  // namespace cuda
}  // namespace fastattn

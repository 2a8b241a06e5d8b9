// Forward pass of blocked flash attention on the CPU.
//
// One task = (batch b, query head h, chunk of up to ~kMaxChunkQ query rows). A task
// streams key/value blocks of kBlockK rows: each block is packed once and then
// reused by every query micro-block of kBlockQ rows in the chunk, which keeps
// its own running max m, normaliser l and output accumulator (online softmax,
// base 2 with the softmax scale pre-multiplied by log2 e). Extra memory is the
// per-thread scratch below, O(chunk x head_dim + block): never O(N^2).
#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

#include "attention_cpu.h"
#include "blocks.h"
#include "masking.h"

namespace fastattn {
namespace cpu {
namespace {

constexpr int kBlockQ = 48;       // query rows per micro-block (a multiple of MR)
constexpr int kBlockK = 256;      // keys per block (a multiple of NR and of 4)
constexpr int kMaxChunkQ = 512;   // query rows per task at most: they share each packed K/V block

struct FwdTask {
  int64_t b, h, q0, q1;
};

template <typename scalar_t, typename acc_t>
void fwd_impl(const AttnParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
              acc_t* lse) {
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int64_t group = p.heads_q / p.heads_kv;
  const acc_t c = static_cast<acc_t>(p.scale) * static_cast<acc_t>(kLog2e);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = dropout ? static_cast<acc_t>(1.0 / (1.0 - p.dropout_p)) : acc_t(1);
  const bool shared_mask_row = p.mask != nullptr && p.mask_strides.n == 0;  // e.g. key padding
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Chunks as long as possible (each packed K/V block is reused by more rows), but
  // at least ~4 tasks per thread so that the threads stay balanced.
  const int64_t threads = at::get_num_threads();
  const int64_t min_chunks = (4 * threads + p.batch * p.heads_q - 1) / std::max<int64_t>(p.batch * p.heads_q, 1);
  std::vector<FwdTask> tasks;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t nq = p.len_q(b);
    const int64_t chunks = std::clamp<int64_t>(std::max((nq + kMaxChunkQ - 1) / kMaxChunkQ, min_chunks), 1,
                                               std::max<int64_t>((nq + kBlockQ - 1) / kBlockQ, 1));
    const int64_t chunk = round_up((nq + chunks - 1) / chunks, kBlockQ);
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t q0 = 0; q0 < nq; q0 += chunk) tasks.push_back({b, h, q0, std::min(nq, q0 + chunk)});
  }
  // Causal chunks further down see more keys: start those first to balance threads.
  if (p.causal) std::stable_sort(tasks.begin(), tasks.end(), [](auto& x, auto& y) { return x.q1 > y.q1; });

  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t kChunkQ = round_up(kMaxChunkQ, kBlockQ);
    Scratch<acc_t> q_pack(packed_a_size(kChunkQ, D)), k_pack(packed_b_size(D, kBlockK)),
        v_pack(packed_b_size(kBlockK, Dv)), scores(kBlockQ * kBlockK),
        o_acc(static_cast<int64_t>(kChunkQ) * Dv), row_max(kChunkQ), row_sum(kChunkQ), bias(kBlockK);
    for (int64_t t; (t = next_task.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const auto [b, h, q0, q1] = tasks[t];
      const int64_t hk = h / group;
      const scalar_t* qh = q + p.base_q(p.q, b, h);
      const scalar_t* kh = k + p.base_k(p.k, b, hk);
      const scalar_t* vh = v + p.base_k(p.v, b, hk);
      const int64_t segment = b * p.heads_q + h;

      // Q is packed pre-multiplied by scale * log2(e): the scores come out of the GEMM in base-2 units.
      for (int64_t qs = q0; qs < q1; qs += kBlockQ)
        pack_a(qh + qs * p.q.n, p.q.n, p.q.d, static_cast<int>(std::min<int64_t>(kBlockQ, q1 - qs)), D,
               q_pack.get() + (qs - q0) * D, c);
      std::fill(o_acc.get(), o_acc.get() + (q1 - q0) * Dv, acc_t(0));
      std::fill(row_max.get(), row_max.get() + (q1 - q0), kNegInf);
      std::fill(row_sum.get(), row_sum.get() + (q1 - q0), acc_t(0));

      const VisibleBand band = p.band(b);
      const int64_t kv_end = band.key_end(q1 - 1);  // the chunk's last row sees the most keys
      for (int64_t kb = 0; kb < kv_end; kb += kBlockK) {
        int bk = static_cast<int>(std::min<int64_t>(kBlockK, kv_end - kb));
        // A mask broadcast over queries (key padding) gives one bias row for the whole chunk;
        // a key block it hides completely is skipped, a hidden tail is trimmed off.
        if (shared_mask_row && (bk = fill_mask_bias(p, b, h, 0, kb, bk, bias.get())) == 0) continue;
        pack_b(kh + kb * p.k.n, p.k.d, p.k.n, D, bk, k_pack.get());  // Kᵀ: (D x bk)
        const auto v_right = right_operand(vh + kb * p.v.n, p.v.n, p.v.d, bk, Dv, v_pack.get());  // V: (bk x Dv)

        for (int64_t qs = q0; qs < q1; qs += kBlockQ) {
          const int bq = static_cast<int>(std::min<int64_t>(kBlockQ, q1 - qs));
          const int64_t tile_key_end = band.key_end(qs + bq - 1);
          if (tile_key_end <= kb) continue;  // the whole tile is above the diagonal
          // On the diagonal only the keys up to the tile's last row matter: the columns past
          // them (rounded up to whole micro-kernel panels) are neither computed nor read.
          const int bk_tile = static_cast<int>(std::min<int64_t>(bk, round_up(tile_key_end - kb, NR)));
          acc_t* s = scores.get();
          gemm(bq, bk_tile, D, packed_left(q_pack.get() + (qs - q0) * D), packed_right(k_pack.get()), s, kBlockK,
               false);  // S = c Q Kᵀ

          for (int r = 0; r < bq; ++r) {
            const int64_t i = qs + r, row = qs - q0 + r;
            acc_t* x = s + static_cast<int64_t>(r) * kBlockK;
            const int n = band.keys_in_block(i, kb, bk_tile);
            if (n <= 0) {
              std::fill(x, x + bk_tile, acc_t(0));
              continue;
            }
            const acc_t* bias_row = nullptr;
            if (p.mask) {
              if (!shared_mask_row) fill_mask_bias(p, b, h, i, kb, n, bias.get());
              bias_row = bias.get();
            }
            const acc_t m_old = row_max[row];
            const acc_t m_new = std::max(m_old, add_bias_max(x, n, bias_row));
            const acc_t m_use = m_new == kNegInf ? acc_t(0) : m_new;  // all masked so far: exp2(-inf) = 0
            const acc_t alpha = std::exp2(m_old - m_use);
            row_sum[row] = row_sum[row] * alpha + exp2_sum(x, n, m_use);
            row_max[row] = m_new;
            std::fill(x + n, x + bk_tile, acc_t(0));
            if (dropout) apply_dropout_keep(p, threshold, segment, i, kb, n, x);
            if (alpha != acc_t(1)) {
              acc_t* o = o_acc.get() + row * Dv;
              for (int d = 0; d < Dv; ++d) o[d] *= alpha;
            }
          }
          gemm(bq, Dv, bk_tile, strided_left(s, kBlockK, 1), v_right, o_acc.get() + (qs - q0) * Dv, Dv, true);  // O += P V
        }
      }

      scalar_t* oh = out + p.base_q(p.out, b, h);
      for (int64_t row = 0; row < q1 - q0; ++row) {
        const int64_t i = q0 + row;
        const acc_t l = row_sum[row];
        // l == 0: the row sees no key -> zeros and lse = -inf (a NaN l stays NaN).
        const acc_t inv = l == acc_t(0) ? acc_t(0) : keep_scale / l;
        const acc_t* o = o_acc.get() + row * Dv;
        scalar_t* dst = oh + i * p.out.n;
        for (int d = 0; d < Dv; ++d) dst[d * p.out.d] = static_cast<scalar_t>(o[d] * inv);
        lse[p.row_index(b, h, i)] =
            l == acc_t(0) ? kNegInf : (row_max[row] + std::log2(l)) * static_cast<acc_t>(kLn2);
      }
    }
  });
}

}  // namespace

Tiling fwd_tiling() { return {{"fwd_block_q", kBlockQ}, {"fwd_block_k", kBlockK}, {"fwd_max_chunk_q", kMaxChunkQ}}; }

void flash_fwd_cpu(const AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fwd_impl<scalar_t, acc_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                              v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              lse.mutable_data_ptr<acc_t>());
  });
}

}  // namespace cpu
}  // namespace fastattn

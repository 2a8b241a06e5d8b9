// Backward pass of blocked flash attention on the CPU (FlashAttention-2 order).
//
//   delta_i = rowsum(dO_i * O_i)                      (one pass over the rows)
//   for each key block j (owned by one task, so dK_j, dV_j need no locks):
//     for each query head of the K/V head's group, each query block i:
//       P   = exp(S - lse),  S = scale * Q_i K_jᵀ + mask  (recomputed, never stored;
//                                                      soft-capped and ALiBi-biased when asked)
//       dV_j += (P * Z)ᵀ dO_i                         (Z: dropout keep / (1 - p))
//       dP   = (dO_i V_jᵀ) * Z
//       dS   = scale * P * (dP - delta_i)             (times 1 - tanh² under a soft-cap)
//       dK_j += dSᵀ Q_i
//       dQ_i += dS K_j                                (in dQ, or a per-chunk accumulator)
// Tasks are (batch, K/V head, chunk of key blocks). With few batch x head pairs
// the key range is split into chunks so every thread has work; each chunk then
// accumulates dQ in its own float buffer and the buffers are summed at the end (with one
// chunk, float dQ accumulates in place). Every product runs as a staircase of micro-kernel
// strips that follows the causal diagonal and the window's edges (blocks.h: Staircase).
// bf16 on a CPU with AMX-BF16 (head dims of whole tiles): the five products run on tiles over
// whole 16 x 16 tiles instead (amx_blocks.h), P and dS rounded to bf16 as operands.
#include <ATen/Parallel.h>

#include <atomic>
#include <utility>
#include <vector>

#include "amx_blocks.h"
#include "attention_cpu.h"
#include "blocks.h"
#include "masking.h"

namespace fastattn {
namespace cpu {
namespace {

constexpr int kBlockQ = 48;    // query rows per tile (a multiple of MR)
static_assert(kBlockQ <= kMaxStrips * MR, "a tile's strips fit a Staircase");
constexpr int kBlockK = 128;   // keys per tile (a multiple of NR and 4)

struct BwdTask {
  int64_t b, hk, kv0, kv1, chunk;
};

template <typename scalar_t, typename acc_t>
void bwd_impl(const AttnParams& p, const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v,
              const scalar_t* out, const acc_t* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int64_t group = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;  // no heads at all: nothing to do
  const acc_t scale = static_cast<acc_t>(p.scale);
  const bool softcap = p.softcap > 0.0;
  // exp2 argument per S = Q Kᵀ element: c S, or (softcap log2 e) t with t = tanh(S scale / softcap)
  const acc_t c = softcap ? static_cast<acc_t>(p.softcap * kLog2e) : scale * static_cast<acc_t>(kLog2e);
  const acc_t tanh_in = softcap ? static_cast<acc_t>(p.scale / p.softcap) : acc_t(0);
  const bool alibi = p.alibi_slopes != nullptr;
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = dropout ? static_cast<acc_t>(1.0 / (1.0 - p.dropout_p)) : acc_t(1);
  const bool shared_mask_row = p.mask != nullptr && p.mask_strides.n == 0;
  const bool same_mask_row_all_heads = shared_mask_row && p.mask_strides.h == 0;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t rows = p.total_rows();

  // Split the key range into chunks when batch x kv-heads alone cannot feed every thread.
  const int64_t threads = at::get_num_threads();
  const int64_t pairs = std::max<int64_t>(p.batch * p.heads_kv, 1);
  int64_t max_blocks = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_blocks = std::max(max_blocks, (p.len_k(b) + kBlockK - 1) / kBlockK);
  const int64_t chunks = std::max<int64_t>(1, std::min(max_blocks, (2 * threads + pairs - 1) / pairs));
  std::vector<BwdTask> tasks;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t nblocks = (p.len_k(b) + kBlockK - 1) / kBlockK;
    for (int64_t hk = 0; hk < p.heads_kv; ++hk)
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const int64_t blk0 = ch * nblocks / chunks, blk1 = (ch + 1) * nblocks / chunks;
        if (blk1 > blk0)
          tasks.push_back({b, hk, blk0 * kBlockK, std::min(p.len_k(b), blk1 * kBlockK), ch});
      }
  }
  // dQ accumulates in grad_q itself when one task owns all keys of a segment and grad_q holds the
  // accumulation type with unit stride (zeroed below); otherwise in one buffer per chunk,
  // (chunks, rows, D) in the accumulation type, summed at the end.
  const bool dq_in_place = chunks == 1 && std::is_same_v<scalar_t, acc_t> && p.grad_q.d == 1;
  std::vector<acc_t> dq_acc(dq_in_place ? 0 : static_cast<size_t>(chunks * rows * D), acc_t(0));

  // delta_i = sum_d dO[i, d] * O[i, d]; and lse in base 2 (+inf on rows that see no key, so P = 0).
  std::vector<acc_t> delta(rows), lse2(rows);
  at::parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t seg = begin; seg < end; ++seg) {
      const int64_t b = seg / p.heads_q, h = seg % p.heads_q;
      const scalar_t* o = out + p.base_q(p.out, b, h);
      const scalar_t* g = dout + p.base_q(p.grad_out, b, h);
      for (int64_t i = 0; i < p.len_q(b); ++i) {
        const scalar_t* oi = o + i * p.out.n;
        const scalar_t* gi = g + i * p.grad_out.n;
        const int64_t od = p.out.d, gd = p.grad_out.d;
        acc_t acc = 0;
        if (od == 1 && gd == 1) {  // the usual layout: a unit-stride loop the compiler vectorises
#pragma omp simd reduction(+ : acc)
          for (int d = 0; d < Dv; ++d) acc += static_cast<acc_t>(oi[d]) * static_cast<acc_t>(gi[d]);
        } else {
          for (int d = 0; d < Dv; ++d) acc += static_cast<acc_t>(oi[d * od]) * static_cast<acc_t>(gi[d * gd]);
        }
        const int64_t row = p.row_index(b, h, i);
        delta[row] = acc;
        if (dq_in_place) std::fill_n(dq + p.base_q(p.grad_q, b, h) + i * p.grad_q.n, D, scalar_t(0));
        lse2[row] = lse[row] == kNegInf ? std::numeric_limits<acc_t>::infinity() : lse[row] * acc_t(kLog2e);
      }
    }
  });


  // bf16 on a CPU with AMX: the five products on tiles (amx_blocks.h) when the head dims are whole
  // tiles; P and dS are rounded to bf16 where they are operands (dV, dK, dQ), as torch's bf16
  // kernels do, and Pᵀ, dSᵀ packed by a transpose of 32-bit pairs.
  const bool use_amx = std::is_same_v<scalar_t, c10::BFloat16> && D % kAmxDepth == 0 && Dv % kAmxDepth == 0 &&
                       cpu_has_amx_bf16();

  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const bool amx = use_amx;
    Scratch<acc_t> kt_pack(amx ? 0 : packed_b_size(D, kBlockK)), k_pack(amx ? 0 : packed_b_size(kBlockK, D)),
        vt_pack(amx ? 0 : packed_b_size(Dv, kBlockK)), q_a(amx ? 0 : packed_a_size(kBlockQ, D)),
        q_b(amx ? 0 : packed_b_size(kBlockQ, D)), do_a(amx ? 0 : packed_a_size(kBlockQ, Dv)),
        do_b(amx ? 0 : packed_b_size(kBlockQ, Dv)),
        dq_tile(amx ? kBlockQ * D : 0), probs(kBlockQ * kBlockK),
        dprobs(kBlockQ * kBlockK),
        dk_acc(static_cast<int64_t>(kBlockK) * D),
        dv_acc(static_cast<int64_t>(kBlockK) * Dv), bias(kBlockK), row_bias(kBlockK), keep(kBlockK),
        dtanh(kBlockK);
    // The AMX path's bf16 operands: the block's Kᵀ, Vᵀ and K tiles; a tile's Q and dO rows and tiles,
    // its dS rows, and Pᵀ and dSᵀ (keys x the tile's rows, padded to whole 32-deep tiles).
    constexpr int kRowsPadded = (kBlockQ + kAmxDepth - 1) / kAmxDepth * kAmxDepth;
    Scratch<c10::BFloat16> kt_tiles(amx ? amx_packed_size(D, kBlockK) : 0),
        vt_tiles(amx ? amx_packed_size(Dv, kBlockK) : 0), k_tiles(amx ? amx_packed_size(kBlockK, D) : 0),
        q_rows(amx ? kBlockQ * D : 0), do_rows(amx ? kBlockQ * Dv : 0), ds_rows(amx ? kBlockQ * kBlockK : 0),
        q_tiles(amx ? amx_packed_size(kBlockQ, D) : 0), do_tiles(amx ? amx_packed_size(kBlockQ, Dv) : 0),
        p_cols(amx ? kBlockK * kRowsPadded : 0), ds_cols(amx ? kBlockK * kRowsPadded : 0);
    const AmxScope amx_scope(amx);
    for (int64_t t; (t = next_task.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const auto [b, hk, kv0, kv1, chunk] = tasks[t];
      const int64_t nq = p.len_q(b);
      const VisibleBand band = p.band(b);
      const scalar_t* kh = k + p.base_k(p.k, b, hk);
      const scalar_t* vh = v + p.base_k(p.v, b, hk);
      acc_t* dq_chunk = dq_acc.data() + chunk * rows * D;

      for (int64_t kb = kv0; kb < kv1; kb += kBlockK) {
        const int bk_full = static_cast<int>(std::min<int64_t>(kBlockK, kv1 - kb));
        // (AMX: all rows, its last tile of keys adds zeros to the rows past the block's)
        std::fill(dk_acc.get(), dk_acc.get() + (amx ? kBlockK : bk_full) * D, acc_t(0));
        std::fill(dv_acc.get(), dv_acc.get() + (amx ? kBlockK : bk_full) * Dv, acc_t(0));
        // A key-padding mask, the same for every query and head, is read once per block:
        // keys past the last visible one are left out (their dK, dV stay 0).
        int bk = bk_full;
        if (same_mask_row_all_heads) bk = fill_mask_bias(p, b, 0, 0, kb, bk_full, bias.get());
        RightOperand<acc_t> k_right{};
        if (amx) {
          amx_pack_keys(kh + kb * p.k.n, p.k.n, p.k.d, bk, D, kt_tiles.get());   // Kᵀ: (D x bk)
          amx_pack_keys(vh + kb * p.v.n, p.v.n, p.v.d, bk, Dv, vt_tiles.get());  // Vᵀ: (Dv x bk)
          amx_pack_values(kh + kb * p.k.n, p.k.n, p.k.d, bk, D, k_tiles.get());  // K: (bk x D)
        } else {
          pack_b(kh + kb * p.k.n, p.k.d, p.k.n, D, bk, kt_pack.get());  // Kᵀ: (D x bk)
          k_right = right_operand(kh + kb * p.k.n, p.k.n, p.k.d, bk, D, k_pack.get());  // K: (bk x D)
          pack_b(vh + kb * p.v.n, p.v.d, p.v.n, Dv, bk, vt_pack.get());  // Vᵀ: (Dv x bk)
        }

        for (int64_t h = hk * group; bk > 0 && h < (hk + 1) * group; ++h) {
          if (shared_mask_row && !same_mask_row_all_heads && fill_mask_bias(p, b, h, 0, kb, bk, bias.get()) == 0)
            continue;  // all keys hidden
          const scalar_t* qh = q + p.base_q(p.q, b, h);
          const scalar_t* gh = dout + p.base_q(p.grad_out, b, h);
          const int64_t segment = b * p.heads_q + h;
          const acc_t slope = alibi ? static_cast<acc_t>(p.alibi_slope(b, h) * kLog2e) : acc_t(0);
          // Only the query rows [row_begin(kb), row_end(last key)) see any of these keys.
          const int64_t rows_end = band.row_end(kb + bk - 1);
          for (int64_t qs = band.row_begin(kb) / kBlockQ * kBlockQ; qs < rows_end; qs += kBlockQ) {
            const int bq = static_cast<int>(std::min<int64_t>(kBlockQ, nq - qs));
            // The keys the tile's rows see (none when the whole tile lies above the diagonal, as
            // the last row tile does when kb >= nq, causal, Nq < Nk), widened to whole panels.
            const auto tile = band.keys_in_block(qs, qs + bq - 1, kb, bk);
            if (tile.empty()) continue;
            const int col0 = tile.lo / NR * NR;
            const int col1 = static_cast<int>(std::min<int64_t>(bk, round_up(tile.hi, NR)));
            const int cols = col1 - col0;
            LeftOperand<acc_t> q_left{}, do_left{};
            RightOperand<acc_t> q_right{}, do_right{};
            const int row_tiles = (bq + kAmxRows - 1) / kAmxRows, depth = static_cast<int>(round_up(bk, kAmxDepth));
            if (amx) {  // Q and dO rows as they are, zeros past the tile's last
              for (int r = 0; r < bq; ++r) {
                amx_copy_row(qh + (qs + r) * p.q.n, p.q.d, D, q_rows.get() + r * D);
                amx_copy_row(gh + (qs + r) * p.grad_out.n, p.grad_out.d, Dv, do_rows.get() + r * Dv);
              }
              std::fill(q_rows.get() + bq * D, q_rows.get() + row_tiles * kAmxRows * D, c10::BFloat16(0.0f));
              std::fill(do_rows.get() + bq * Dv, do_rows.get() + row_tiles * kAmxRows * Dv, c10::BFloat16(0.0f));
              amx_pack_values(qh + qs * p.q.n, p.q.n, p.q.d, bq, D, q_tiles.get());  // Q: (bq x D)
              amx_pack_values(gh + qs * p.grad_out.n, p.grad_out.n, p.grad_out.d, bq, Dv, do_tiles.get());
            } else {
              q_right = right_operand(qh + qs * p.q.n, p.q.n, p.q.d, bq, D, q_b.get());
              do_right = right_operand(gh + qs * p.grad_out.n, p.grad_out.n, p.grad_out.d, bq, Dv, do_b.get());
              q_left = left_operand(qh + qs * p.q.n, p.q.n, p.q.d, bq, D, q_a.get());
              do_left = left_operand(gh + qs * p.grad_out.n, p.grad_out.n, p.grad_out.d, bq, Dv, do_a.get());
            }
            acc_t* pr = probs.get();
            acc_t* dpr = dprobs.get();
            // S = Q Kᵀ and dP = dO Vᵀ strip by strip of MR rows, each over the panels its rows see (a
            // staircase along the diagonal and the window's edges); the row pass below zero-fills
            // every row outside its keys over the tile's columns, so P and dS are whole there.
            // Strips that see the same panels (all of them off the diagonal) are one product: the
            // micro-kernel then runs each packed Kᵀ or Vᵀ panel over all their rows while it is in
            // L1, instead of every strip streaming the whole Kᵀ and Vᵀ (2 x 32 KiB at D = 64).
            Staircase strips;
            for (int s0 = 0; s0 < bq; s0 += MR) {
              const auto keys = band.keys_in_block(qs + s0, qs + std::min(bq, s0 + MR) - 1, kb, bk);
              strips.add(keys.lo, keys.hi, bk);
            }
            if (amx) {  // (AMX: whole 16 x 16 tiles; the row pass reads and zero-fills each row's keys)
              const int col_tiles = (bk + kAmxCols - 1) / kAmxCols;
              amx_gemm(row_tiles, col_tiles, D / kAmxDepth, q_rows.get(), D, kt_tiles.get(), pr, kBlockK, false);
              amx_gemm(row_tiles, col_tiles, Dv / kAmxDepth, do_rows.get(), Dv, vt_tiles.get(), dpr, kBlockK, false);
            } else strips.for_each_run([&](int first, int last, Staircase::Cols cols) {
              const int r0 = first * MR, m = std::min(last * MR, bq) - r0, n = cols.hi - cols.lo;
              gemm(m, n, D, q_left.rows_from(r0, D), packed_right(kt_pack.get() + cols.lo * D),
                   pr + r0 * kBlockK + cols.lo, kBlockK, false);
              gemm(m, n, Dv, do_left.rows_from(r0, Dv), packed_right(vt_pack.get() + cols.lo * Dv),
                   dpr + r0 * kBlockK + cols.lo, kBlockK, false);
            });

            for (int r = 0; r < bq; ++r) {
              const int64_t i = qs + r, row = p.row_index(b, h, i);
              acc_t* x = pr + static_cast<int64_t>(r) * kBlockK;
              acc_t* dx = dpr + static_cast<int64_t>(r) * kBlockK;
              const auto keys = band.keys_in_block(i, kb, bk);
              const int lo = keys.empty() ? col0 : keys.lo, hi = keys.empty() ? col0 : keys.hi, n = hi - lo;
              if (n > 0) {
                const acc_t* bias_row = nullptr;  // indexed by the block's key, like x
                if (p.mask) {
                  if (!shared_mask_row) fill_mask_bias(p, b, h, i, kb + lo, n, bias.get() + lo);
                  bias_row = bias.get();
                }
                if (alibi) {
                  alibi_row(row_bias.get(), bias_row, lo, hi, slope, i + band.offset - kb);
                  bias_row = row_bias.get();
                }
                if (softcap) {
                  softcap_row(x + lo, n, tanh_in, acc_t(1));  // t
                  for (int j = lo; j < hi; ++j) dtanh[j] = acc_t(1) - x[j] * x[j];
                }
                scale_bias_exp2(x + lo, n, c, bias_row ? bias_row + lo : nullptr, lse2[row]);  // P
                const acc_t di = delta[row];
                if (dropout) {
                  // drawn over the tile's columns (from a panel boundary: the SIMD Philox path)
                  std::fill(keep.get() + col0, keep.get() + col1, keep_scale);
                  apply_dropout_keep(p, threshold, segment, i, kb + col0, cols, keep.get() + col0);
                  for (int j = lo; j < hi; ++j) {
                    const acc_t pj = x[j], zj = keep[j];
                    dx[j] = scale * pj * (dx[j] * zj - di);  // scale dS
                    x[j] = pj * zj;                  // dropped P, for dV
                  }
                } else {
                  for (int j = lo; j < hi; ++j) dx[j] = scale * x[j] * (dx[j] - di);  // scale dS
                }
                if (softcap)
                  for (int j = lo; j < hi; ++j) dx[j] *= dtanh[j];  // through the tanh
              }
              std::fill(x + col0, x + lo, acc_t(0));
              std::fill(dx + col0, dx + lo, acc_t(0));
              std::fill(x + hi, x + col1, acc_t(0));
              std::fill(dx + hi, dx + col1, acc_t(0));
            }
            // dV += (P Z)ᵀ dO and dK += dSᵀ Q, strip by strip of MR keys, each over the tile's rows
            // that see them; Pᵀ and dSᵀ are read in place, as the transposes of the row-major tiles.
            // Key strips that the same rows see are one product (dO and Q panels reused from L1).
            auto rows_seeing = [&](int kc) {  // the tile's rows [lo, hi) that see keys [kc, kc + MR)
              const int mk = std::min(MR, col1 - kc);
              return std::pair{static_cast<int>(std::clamp<int64_t>(band.row_begin(kb + kc) - qs, 0, bq)),
                               static_cast<int>(std::clamp<int64_t>(band.row_end(kb + kc + mk - 1) - qs, 0, bq))};
            };
            if (amx) {  // Pᵀ and dSᵀ over the tile's columns (zeros elsewhere), then both products on tiles
              const int k0 = col0 / kAmxCols * kAmxCols, key_tiles = (col1 - k0 + kAmxCols - 1) / kAmxCols;
              const int depth_q = static_cast<int>(round_up(bq, kAmxDepth) / kAmxDepth);
              amx_pack_transposed(pr, kBlockK, bq, col0, col1, p_cols.get(), kRowsPadded);
              amx_pack_transposed(dpr, kBlockK, bq, col0, col1, ds_cols.get(), kRowsPadded);
              amx_gemm(key_tiles, Dv / kAmxCols, depth_q, p_cols.get() + k0 * kRowsPadded, kRowsPadded,
                       do_tiles.get(), dv_acc.get() + k0 * Dv, Dv, true);
              amx_gemm(key_tiles, D / kAmxCols, depth_q, ds_cols.get() + k0 * kRowsPadded, kRowsPadded,
                       q_tiles.get(), dk_acc.get() + k0 * D, D, true);
            }
            for (int kc = col0, kc_end; kc < col1 && !amx; kc = kc_end) {
              const auto rows_kc = rows_seeing(kc);
              for (kc_end = kc + MR; kc_end < col1 && rows_seeing(kc_end) == rows_kc;) kc_end += MR;
              kc_end = std::min(kc_end, col1);
              const auto [r_lo, r_hi] = rows_kc;
              if (r_hi <= r_lo) continue;
              gemm(kc_end - kc, Dv, r_hi - r_lo, strided_left(pr + r_lo * kBlockK + kc, 1, kBlockK),
                   do_right.rows_from(r_lo), dv_acc.get() + kc * Dv, Dv, true);
              gemm(kc_end - kc, D, r_hi - r_lo, strided_left(dpr + r_lo * kBlockK + kc, 1, kBlockK),
                   q_right.rows_from(r_lo), dk_acc.get() + kc * D, D, true);
            }
            // dQ += dS K, over each strip's keys (a run of strips with the same keys at once).
            if (amx) {  // dS rows in bf16 (zeros outside the tile's columns and past its rows), dS K on tiles
              for (int r = 0; r < row_tiles * kAmxRows; ++r)
                amx_row_to_bf16(dpr + r * kBlockK, r < bq ? col0 : 0, r < bq ? col1 : 0, depth,
                                ds_rows.get() + r * kBlockK);
              amx_gemm(row_tiles, D / kAmxCols, depth / kAmxDepth, ds_rows.get(), kBlockK, k_tiles.get(),
                       dq_tile.get(), D, false);
              acc_t* dq_rows = dq_chunk + p.row_index(b, h, qs) * D;  // (never in place: dQ is bf16)
              for (int64_t e = 0; e < static_cast<int64_t>(bq) * D; ++e) dq_rows[e] += dq_tile[e];
            } else strips.for_each_run([&](int first, int last, Staircase::Cols cols) {
              const int r0 = first * MR;
              const int64_t i0 = qs + r0;
              acc_t* dq_rows = dq_in_place ? reinterpret_cast<acc_t*>(dq) + p.base_q(p.grad_q, b, h) + i0 * p.grad_q.n
                                           : dq_chunk + p.row_index(b, h, i0) * D;
              gemm(std::min(last * MR, bq) - r0, D, cols.hi - cols.lo,
                   strided_left(dpr + r0 * kBlockK + cols.lo, kBlockK, 1), k_right.rows_from(cols.lo), dq_rows,
                   dq_in_place ? p.grad_q.n : D, true);
            });
          }
        }

        scalar_t* dkh = dk + p.base_k(p.grad_k, b, hk);
        scalar_t* dvh = dv + p.base_k(p.grad_v, b, hk);
        for (int r = 0; r < bk_full; ++r) {
          store_row(dk_acc.get() + r * D, D, dkh + (kb + r) * p.grad_k.n, p.grad_k.d);
          store_row(dv_acc.get() + r * Dv, Dv, dvh + (kb + r) * p.grad_v.n, p.grad_v.d);
        }
      }
    }
  });

  // dQ = the sum of the chunk accumulators.
  if (!dq_in_place) at::parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t seg = begin; seg < end; ++seg) {
      const int64_t b = seg / p.heads_q, h = seg % p.heads_q;
      scalar_t* dqh = dq + p.base_q(p.grad_q, b, h);
      const int64_t dq_d = p.grad_q.d;
      for (int64_t i = 0; i < p.len_q(b); ++i) {
        const acc_t* src = dq_acc.data() + p.row_index(b, h, i) * D;
        scalar_t* dst = dqh + i * p.grad_q.n;
        auto sum_at = [&](int d) {
          acc_t sum = 0;
          for (int64_t ch = 0; ch < chunks; ++ch) sum += src[ch * rows * D + d];
          return static_cast<scalar_t>(sum);
        };
        if (dq_d == 1) {  // unit stride: vectorised
#pragma omp simd
          for (int d = 0; d < D; ++d) dst[d] = sum_at(d);
        } else {
          for (int d = 0; d < D; ++d) dst[d * dq_d] = sum_at(d);
        }
      }
    }
  });
}

}  // namespace

Tiling bwd_tiling() { return {{"bwd_block_q", kBlockQ}, {"bwd_block_k", kBlockK}}; }

void flash_bwd_cpu(const AttnParams& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q,
                   at::Tensor& grad_k, at::Tensor& grad_v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bwd_impl<scalar_t, acc_t>(p, grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
                              grad_q.mutable_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(),
                              grad_v.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace cpu
}  // namespace fastattn

// Forward pass of blocked flash attention on the CPU.
//
// One task = (batch b, K/V head hk, a chunk [q0, q1) of query rows) and takes those rows of
// every query head of hk's group (GQA/MQA: the K/V of a group are read once, and a decoding
// step's few rows per head make one block of group x rows together). A task streams key/value
// blocks of kBlockK rows: each block is packed once and then reused by every query micro-block
// of kBlockQ rows of the task, each row keeping its own running max m, normaliser l and output
// accumulator (online softmax, base 2 with the softmax scale pre-multiplied by log2 e). Extra
// memory is the per-thread scratch below, O(rows x head_dim + block): never O(N^2).
//
// Tasks of at most kDecodeMaxRows rows (a decoding step: the query heads of a group, one or a few
// new tokens each) take the decode path instead (decode_task, with the kernels of decode_blocks.h):
// the same online softmax over blocks of kDecodeBlockK keys, with K and V read in place. When such
// tasks are fewer than the threads (one K/V head at batch 1: multi-query models), their keys are
// split into parts run as tasks of their own and merged afterwards (flash-decoding; the split count
// follows the thread count, so the output's last bits do too). bf16 tasks of a whole AMX tile of rows
// take the tile path instead when they are as many as the threads (amx_takes_decode_tasks).
//
// bf16 on a CPU with AMX-BF16 (head dims of whole tiles): the general path's two products run on
// tiles instead of the FMA micro-kernel (amx_blocks.h), with P rounded to bf16 for P V; the row
// pass is the same.
#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

#include "amx_blocks.h"
#include "attention_cpu.h"
#include "blocks.h"
#include "decode_blocks.h"
#include "masking.h"

namespace fastattn {
namespace cpu {
namespace {

constexpr int kBlockQ = 48;       // query rows per micro-block (a multiple of MR)
static_assert(kBlockQ <= kMaxStrips * MR, "a micro-block's strips fit a Staircase");
constexpr int kBlockK = 256;      // keys per block (a multiple of NR and of 4)
constexpr int kMaxChunkQ = 512;   // query rows per task at most: they share each packed K/V block
static_assert(kBlockQ % kAmxRows == 0 && kBlockK % kAmxDepth == 0, "AMX: micro-blocks and key blocks of whole tiles");
constexpr int kDecodeMaxRows = 32;  // tasks of at most this many rows take the decode path
constexpr int kDecodeBlockK = 64;   // keys per block of the decode path (a multiple of 8)
constexpr int kDecodeMinSplitBlocks = 4;  // flash-decoding: blocks per key split at least
constexpr int kDecodeMaxSplits = 64;      // and splits per task at most

// bf16 decode tasks of a whole tile of rows or more (e.g. 4 new tokens x 4 query heads per K/V head)
// run faster on AMX tiles than in the decode kernels, whose FMAs must widen every bf16 value first:
// B=1, 32/8 heads, Nk=8192, caches flushed: 4 tokens 3.85 -> 3.31 ms, 8 tokens 6.38 -> 3.60 ms;
// 2 tokens (8 rows) 2.9 -> 3.5 ms, so smaller tasks stay. The tile path has no key split, so only
// when the tasks are enough for every thread.
inline bool amx_takes_decode_tasks(int64_t max_rows, size_t tasks, int64_t threads) {
  return max_rows >= kAmxRows && static_cast<int64_t>(tasks) >= threads;
}

// Rows of a task: row r is query q0 + r % (q1 - q0) of head hk * group + r / (q1 - q0).
struct FwdTask {
  int64_t b, hk, q0, q1;
};

// Flash-decoding: when a call's decode tasks are fewer than the threads (e.g. multi-query heads at
// batch 1), each task's keys are split into KeySplit::count parts, run as tasks of their own that
// leave unnormalised partial outputs with their row max and sum, merged per task afterwards.
struct KeySplit {
  int index = 0, count = 1;
};
struct DecodePartial {  // one split's rows: o (rows x Dv, unnormalised), max and sum (log2 units)
  float *o, *row_max, *row_sum;
};

// Whether a call's tasks of few rows can take the decode path: float or bf16 inputs on a CPU with
// AVX2 (the decode kernels have AVX2 and AVX-512 versions only), K and V with unit stride along
// the head dim, head dims the kernels' steps divide, and no per-element logit transform (dropout,
// soft-cap, ALiBi, a mask that varies along the task's rows: those take the general path).
template <typename scalar_t>
bool decode_path_applies(const AttnParams& p, bool block_mask_row) {
  if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, c10::BFloat16>) {
    return false;
  } else {
#if FASTATTN_X86
    static const bool avx2 = cpu_has_avx2_fma();
    return avx2 && p.head_dim % 4 == 0 && p.head_dim_v % 8 == 0 && p.k.d == 1 && p.v.d == 1 && p.dropout_p == 0.0 &&
           p.softcap <= 0.0 && p.alibi_slopes == nullptr && (p.mask == nullptr || block_mask_row);
#else
    (void)p, (void)block_mask_row;
    return false;
#endif
  }
}

#if FASTATTN_X86
// One task of the decode path: the rows' scores block by block, the online softmax row pass of
// the general path, then P V; the rows go by quads of kQuadRows (a last quad's empty rows have
// zero queries and zero probabilities). Scratch: qq (quads x 4 x D), s (quads x 4 x kDecodeBlockK),
// o (quads x 4 x Dv), row_max / row_sum (quads x 4), bias (kDecodeBlockK).
// The end of a decode row: o (Dv floats, sum l and max m in log2 units) normalised in place and
// stored with its LSE; a row that saw no key gives zeros and -inf.
template <typename scalar_t>
void finish_decode_row(const AttnParams& p, int64_t b, int64_t h, int64_t i, float* o, float m, float l,
                       scalar_t* out, float* lse) {
  const int Dv = static_cast<int>(p.head_dim_v);
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;  // no dropout on this path: keep scale 1
  for (int d = 0; d < Dv; ++d) o[d] *= inv;
  store_row(o, Dv, out + p.base_q(p.out, b, h) + i * p.out.n, p.out.d);
  lse[p.row_index(b, h, i)] =
      l == 0.0f ? -std::numeric_limits<float>::infinity() : (m + std::log2(l)) * static_cast<float>(kLn2);
}

template <typename scalar_t>
void decode_task(const AttnParams& p, const FwdTask& task, KeySplit split, const DecodePartial* partial,
                 int64_t group, bool block_mask_row, float q_scale, const scalar_t* q, const scalar_t* k,
                 const scalar_t* v, scalar_t* out, float* lse, float* qq, float* s, float* o_acc, float* row_max,
                 float* row_sum, float* bias) {
  static const bool avx512 = cpu_has_avx512();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const auto [b, hk, q0, q1] = task;
  const int64_t n = q1 - q0;
  const int rows = static_cast<int>(group * n), quads = (rows + kQuadRows - 1) / kQuadRows;
  auto head_of = [&](int64_t r) { return hk * group + r / n; };
  auto query_of = [&](int64_t r) { return q0 + r % n; };
  const scalar_t* kh = k + p.base_k(p.k, b, hk);
  const scalar_t* vh = v + p.base_k(p.v, b, hk);
  const VisibleBand band = p.band(b);

  for (int qd = 0; qd < quads; ++qd) {
    const scalar_t* rows_q[kQuadRows];
    const int in_quad = std::min(kQuadRows, rows - qd * kQuadRows);
    for (int r = 0; r < kQuadRows; ++r) {
      const int64_t row = qd * kQuadRows + std::min(r, in_quad - 1);
      rows_q[r] = q + p.base_q(p.q, b, head_of(row)) + query_of(row) * p.q.n;
    }
    pack_query_quad(rows_q, in_quad, p.q.d, D, q_scale, qq + static_cast<int64_t>(qd) * kQuadRows * D);
  }
  std::fill(o_acc, o_acc + static_cast<int64_t>(quads) * kQuadRows * Dv, 0.0f);
  for (int r = 0; r < quads * kQuadRows; ++r) {  // a sink counts once: in the first split
    const float sink = r < rows && p.sinks && split.index == 0 ? static_cast<float>(p.sinks[head_of(r)] * kLog2e)
                                                               : kNegInf;
    row_max[r] = sink;
    row_sum[r] = sink == kNegInf ? 0.0f : 1.0f;
  }

  // This split's share of the task's keys, in whole blocks of kDecodeBlockK
  const int64_t band_begin = band.key_begin(q0), band_end = band.key_end(q1 - 1);
  const int64_t blocks = std::max<int64_t>((band_end - band_begin + kDecodeBlockK - 1) / kDecodeBlockK, 0);
  const int64_t per_split = (blocks + split.count - 1) / split.count;
  const int64_t kv_begin = std::min(band_end, band_begin + split.index * per_split * kDecodeBlockK);
  const int64_t kv_end = std::min(band_end, kv_begin + per_split * kDecodeBlockK);
  for (int64_t kb = kv_begin; kb < kv_end; kb += kDecodeBlockK) {
    int bk = static_cast<int>(std::min<int64_t>(kDecodeBlockK, kv_end - kb));
    if (block_mask_row && (bk = fill_mask_bias(p, b, hk * group, 0, kb, bk, bias)) == 0) continue;
    // The kernels prefetch a few KiB ahead, into the next block: up to this split's end
    const int avail = static_cast<int>(std::min<int64_t>(kv_end - kb, kDecodeBlockK + kMaxPrefetchRows));
    if (avx512) {
      decode_scores_avx512(qq, quads, kh + kb * p.k.n, p.k.n, bk, D, s, kDecodeBlockK, avail);
    } else {
      decode_scores_avx2(qq, quads, kh + kb * p.k.n, p.k.n, bk, D, s, kDecodeBlockK, avail);
    }
    for (int row = 0; row < quads * kQuadRows; ++row) {
      float* x = s + static_cast<int64_t>(row) * kDecodeBlockK;
      const auto keys = row < rows ? band.keys_in_block(query_of(row), kb, bk) : VisibleBand::Range{0, 0};
      if (keys.empty()) {  // P V reads the row's bk probabilities: zeros
        std::fill(x, x + bk, 0.0f);
        continue;
      }
      const int lo = keys.lo, cnt = keys.hi - keys.lo;
      const float m_old = row_max[row];
      const float m_new = std::max(m_old, add_bias_max(x + lo, cnt, block_mask_row ? bias + lo : nullptr));
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // all masked so far: exp2(-inf) = 0
      const float alpha = std::exp2(m_old - m_use);
      row_sum[row] = row_sum[row] * alpha + exp2_sum(x + lo, cnt, m_use);
      row_max[row] = m_new;
      std::fill(x, x + lo, 0.0f);
      std::fill(x + keys.hi, x + bk, 0.0f);
      if (alpha != 1.0f) {
        float* o = o_acc + static_cast<int64_t>(row) * Dv;
        for (int d = 0; d < Dv; ++d) o[d] *= alpha;
      }
    }
    if (avx512) {
      for (int qd = 0; qd < quads; ++qd) {
        const float* pq = s + static_cast<int64_t>(qd) * kQuadRows * kDecodeBlockK;
        float* oq = o_acc + static_cast<int64_t>(qd) * kQuadRows * Dv;
        decode_values_avx512(pq, kDecodeBlockK, vh + kb * p.v.n, p.v.n, bk, Dv, oq, qd == 0 ? avail : 0);
      }
    } else {
      decode_values_avx2(s, quads, kDecodeBlockK, vh + kb * p.v.n, p.v.n, bk, Dv, o_acc, avail);
    }
  }

  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (!avx512) decode_values_to_natural_avx2(o_acc, rows, Dv);  // from the AVX2 kernel's strip layout
  }
  if (partial != nullptr) {  // a split: merge_decode_splits normalises and stores
    std::copy(o_acc, o_acc + static_cast<int64_t>(rows) * Dv, partial->o);
    std::copy(row_max, row_max + rows, partial->row_max);
    std::copy(row_sum, row_sum + rows, partial->row_sum);
    return;
  }
  for (int row = 0; row < rows; ++row)
    finish_decode_row(p, b, head_of(row), query_of(row), o_acc + static_cast<int64_t>(row) * Dv, row_max[row],
                      row_sum[row], out, lse);
}

// A task's splits merged in split order: each split's sum and output rescaled to the common max.
// o (Dv floats) is scratch.
template <typename scalar_t>
void merge_decode_splits(const AttnParams& p, const FwdTask& task, int64_t group, const DecodePartial* parts,
                         int count, scalar_t* out, float* lse, float* o) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int Dv = static_cast<int>(p.head_dim_v);
  const int64_t n = task.q1 - task.q0;
  for (int64_t row = 0; row < group * n; ++row) {
    const int64_t h = task.hk * group + row / n, i = task.q0 + row % n;
    float m = kNegInf;
    for (int x = 0; x < count; ++x) m = std::max(m, parts[x].row_max[row]);
    const float m_use = m == kNegInf ? 0.0f : m;
    float l = 0.0f;
    std::fill(o, o + Dv, 0.0f);
    for (int x = 0; x < count; ++x) {
      if (parts[x].row_sum[row] == 0.0f) continue;  // the split saw no key of this row
      const float w = std::exp2(parts[x].row_max[row] - m_use);
      l += parts[x].row_sum[row] * w;
      const float* ox = parts[x].o + row * Dv;
      for (int d = 0; d < Dv; ++d) o[d] += ox[d] * w;
    }
    finish_decode_row(p, task.b, h, i, o, m, l, out, lse);
  }
}
#endif

template <typename scalar_t, typename acc_t>
void fwd_impl(const AttnParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
              acc_t* lse) {
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int64_t group = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;  // no heads at all: nothing to do
  const bool softcap = p.softcap > 0.0;
  // Q is packed pre-multiplied so that the GEMM gives the logits in base-2 units, or, with a
  // soft-cap, scale / softcap times them: the row pass then takes (softcap log2 e) tanh of it.
  const acc_t q_scale = static_cast<acc_t>(softcap ? p.scale / p.softcap : p.scale * kLog2e);
  const acc_t cap_log2e = static_cast<acc_t>(p.softcap * kLog2e);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = dropout ? static_cast<acc_t>(1.0 / (1.0 - p.dropout_p)) : acc_t(1);
  // A mask broadcast over queries (e.g. key padding) and over the task's heads: one bias row per block.
  const bool block_mask_row = p.mask != nullptr && p.mask_strides.n == 0 && (group == 1 || p.mask_strides.h == 0);
  const bool alibi = p.alibi_slopes != nullptr;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Chunks as long as possible (each packed K/V block is reused by more rows), but at least
  // ~4 tasks per thread so that the threads stay balanced. Without GQA the chunks are whole
  // micro-blocks of one head, as they always were; with it, a chunk's rows of all heads of the
  // group share the kMaxChunkQ budget.
  const int64_t threads = at::get_num_threads();
  const int64_t pairs = std::max<int64_t>(p.batch * p.heads_kv, 1);
  const int64_t min_chunks = (4 * threads + pairs - 1) / pairs;
  std::vector<FwdTask> tasks;
  int64_t max_rows = 1;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t nq = p.len_q(b);
    if (nq == 0) continue;
    int64_t chunk;
    if (group == 1) {
      const int64_t chunks = std::clamp<int64_t>(std::max((nq + kMaxChunkQ - 1) / kMaxChunkQ, min_chunks), 1,
                                                 std::max<int64_t>((nq + kBlockQ - 1) / kBlockQ, 1));
      chunk = round_up((nq + chunks - 1) / chunks, kBlockQ);
    } else {
      const int64_t chunks = std::clamp<int64_t>(
          std::max((nq * group + kMaxChunkQ - 1) / kMaxChunkQ, min_chunks), 1, nq);
      chunk = (nq + chunks - 1) / chunks;
    }
    for (int64_t hk = 0; hk < p.heads_kv; ++hk)
      for (int64_t q0 = 0; q0 < nq; q0 += chunk) {
        tasks.push_back({b, hk, q0, std::min(nq, q0 + chunk)});
        max_rows = std::max(max_rows, group * (tasks.back().q1 - q0));
      }
  }
  // Causal chunks further down see more keys: start those first to balance threads.
  if (p.causal && p.window_left < 0)
    std::stable_sort(tasks.begin(), tasks.end(), [](auto& x, auto& y) { return x.q1 > y.q1; });

  // bf16 on a CPU with AMX: both products on tiles (amx_blocks.h) when the head dims are whole tiles.
  const bool use_amx = std::is_same_v<scalar_t, c10::BFloat16> && D % kAmxDepth == 0 && Dv % kAmxCols == 0 &&
                       cpu_has_amx_bf16();
  std::atomic<int64_t> next_task{0};
#if FASTATTN_X86
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (max_rows <= kDecodeMaxRows && !(use_amx && amx_takes_decode_tasks(max_rows, tasks.size(), threads)) &&
        decode_path_applies<scalar_t>(p, block_mask_row)) {
      const int64_t padded = round_up(max_rows, kQuadRows);
      // Fewer tasks than threads: split the keys so that every thread has ~2 parts, each of at
      // least kDecodeMinSplitBlocks blocks (shorter ones cost more to merge than they save).
      const int64_t n_tasks = static_cast<int64_t>(tasks.size());
      int64_t longest_k = 0;
      for (int64_t b = 0; b < p.batch; ++b) longest_k = std::max(longest_k, p.len_k(b));
      const int64_t blocks = (longest_k + kDecodeBlockK - 1) / kDecodeBlockK;
      const int splits = n_tasks >= threads ? 1 : static_cast<int>(std::clamp<int64_t>(
          std::min((2 * threads + n_tasks - 1) / std::max<int64_t>(n_tasks, 1), blocks / kDecodeMinSplitBlocks), 1,
          kDecodeMaxSplits));
      std::vector<float> partial_buf;
      std::vector<DecodePartial> parts;
      if (splits > 1) {
        const int64_t per_part = max_rows * (Dv + 2);
        partial_buf.resize(static_cast<size_t>(n_tasks * splits * per_part));
        for (int64_t x = 0; x < n_tasks * splits; ++x) {
          float* base = partial_buf.data() + x * per_part;
          parts.push_back({base, base + max_rows * Dv, base + max_rows * (Dv + 1)});
        }
      }
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        Scratch<float> qq(padded * D), s(padded * kDecodeBlockK), o_acc(padded * Dv), row_max(padded),
            row_sum(padded), bias(kDecodeBlockK);
        for (int64_t t; (t = next_task.fetch_add(1)) < n_tasks * splits;)
          decode_task(p, tasks[t / splits], KeySplit{static_cast<int>(t % splits), splits},
                      splits > 1 ? &parts[t] : nullptr, group, block_mask_row, q_scale, q, k, v, out, lse, qq.get(),
                      s.get(), o_acc.get(), row_max.get(), row_sum.get(), bias.get());
      });
      if (splits > 1) {
        at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
          Scratch<float> o(Dv);
          for (int64_t t = t0; t < t1; ++t)
            merge_decode_splits(p, tasks[t], group, &parts[t * splits], splits, out, lse, o.get());
        });
      }
      return;
    }
  }
#endif
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t kRows = round_up(max_rows, kBlockQ);
    const bool amx = use_amx;
    Scratch<acc_t> q_pack(amx ? 0 : packed_a_size(kRows, D)), k_pack(amx ? 0 : packed_b_size(D, kBlockK)),
        v_pack(amx ? 0 : packed_b_size(kBlockK, Dv)), scores(kBlockQ * kBlockK), o_acc(kRows * Dv),
        row_max(kRows), row_sum(kRows), bias(kBlockK), row_bias(kBlockK);
    // The AMX path's bf16 operands: the task's Q rows, the block's Kᵀ and V tiles, a micro-block's P.
    Scratch<c10::BFloat16> q_rows(amx ? kRows * D : 0), k_tiles(amx ? amx_packed_size(D, kBlockK) : 0),
        v_tiles(amx ? amx_packed_size(kBlockK, Dv) : 0), p_rows(amx ? kBlockQ * kBlockK : 0);
    const AmxScope amx_scope(amx);
    for (int64_t t; (t = next_task.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const auto [b, hk, q0, q1] = tasks[t];
      const int64_t n = q1 - q0, rows = group * n;
      auto head_of = [&](int64_t r) { return hk * group + r / n; };
      auto query_of = [&](int64_t r) { return q0 + r % n; };
      const scalar_t* kh = k + p.base_k(p.k, b, hk);
      const scalar_t* vh = v + p.base_k(p.v, b, hk);
      const VisibleBand band = p.band(b);

      // The chunk's keys: from the first row's window start to the last row's end (whole panels).
      const int64_t kv_begin = band.key_begin(q0) / NR * NR, kv_end = band.key_end(q1 - 1);
      // Q rows, pre-scaled: one head's rows are packed a micro-block at a time (the SIMD packer);
      // a group's rows, whose heads change inside a micro-block, row by row. When the task sees one
      // key block only (short sequences) a packed Q would be used once: float Q with unit stride is
      // then read in place and the scale applied to the scores in the row pass's max instead
      // (B=8 H=12 N=128 D=64: 1.024x over 2,545 interleaved calls; with several key blocks the
      // packed panels were as fast or faster, 0.99x at N=2048 D=128 causal).
      const bool q_in_place = std::is_same_v<scalar_t, acc_t> && group == 1 && p.q.d == 1 && !softcap &&
                              kv_end - kv_begin <= kBlockK;
      const auto q_left = q_in_place ? strided_left(reinterpret_cast<const acc_t*>(q) + p.base_q(p.q, b, hk) +
                                                        q0 * p.q.n, p.q.n, 1)
                                     : packed_left(q_pack.get());
      // What the row pass multiplies the scores by (the AMX path's Q is not scaled either: the
      // scale goes into the soft-cap's tanh argument, the max pass as for Q in place, or, on
      // tiles without a bias row, the exp pass).
      const acc_t s_scale = q_in_place || (amx && !softcap) ? q_scale : acc_t(1);
      const acc_t cap_scale = amx ? q_scale : acc_t(1);
      if (q_in_place) {
        // nothing to pack
      } else if (amx) {  // bf16 rows as they are, zeros past the task's last (the scale goes to the row pass)
        for (int64_t r = 0; r < rows; ++r)
          amx_copy_row(q + p.base_q(p.q, b, head_of(r)) + query_of(r) * p.q.n, p.q.d, D, q_rows.get() + r * D);
        std::fill(q_rows.get() + rows * D, q_rows.get() + kRows * D, c10::BFloat16(0.0f));
      } else if (group == 1) {
        for (int64_t qs = q0; qs < q1; qs += kBlockQ)
          pack_a(q + p.base_q(p.q, b, hk) + qs * p.q.n, p.q.n, p.q.d,
                 static_cast<int>(std::min<int64_t>(kBlockQ, q1 - qs)), D, q_pack.get() + (qs - q0) * D, q_scale);
      } else {
        std::fill(q_pack.get() + rows / MR * MR * D, q_pack.get() + round_up(rows, MR) * D, acc_t(0));
        for (int64_t r = 0; r < rows; ++r)
          pack_a_row(q + p.base_q(p.q, b, head_of(r)) + query_of(r) * p.q.n, p.q.d, D, q_pack.get(),
                     static_cast<int>(r), q_scale);
      }
      // (all kRows: the AMX path's last tile of rows adds zeros to the rows past the task's)
      std::fill(o_acc.get(), o_acc.get() + (amx ? kRows : rows) * Dv, acc_t(0));
      // A sink is a first key of logit sinks[h] (in base 2) and value zero: max and sum start from it.
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t sink = p.sinks ? static_cast<acc_t>(p.sinks[head_of(r)] * kLog2e) : kNegInf;
        row_max[r] = sink;
        row_sum[r] = sink == kNegInf ? acc_t(0) : acc_t(1);
      }

      for (int64_t kb = kv_begin; kb < kv_end; kb += kBlockK) {
        int bk = static_cast<int>(std::min<int64_t>(kBlockK, kv_end - kb));
        // One bias row for the whole task (key padding); a key block it hides completely is skipped,
        // a hidden tail is trimmed off.
        if (block_mask_row && (bk = fill_mask_bias(p, b, hk * group, 0, kb, bk, bias.get())) == 0) continue;
        RightOperand<acc_t> v_right{};
        if (amx) {
          const int avail = static_cast<int>(std::min<int64_t>(kv_end - kb, bk + kMaxPrefetchRows));
          amx_pack_keys(kh + kb * p.k.n, p.k.n, p.k.d, bk, D, k_tiles.get(), avail);    // Kᵀ: (D x bk)
          amx_pack_values(vh + kb * p.v.n, p.v.n, p.v.d, bk, Dv, v_tiles.get(), avail);  // V: (bk x Dv)
        } else {
          pack_b(kh + kb * p.k.n, p.k.d, p.k.n, D, bk, k_pack.get());                // Kᵀ: (D x bk)
          v_right = right_operand(vh + kb * p.v.n, p.v.n, p.v.d, bk, Dv, v_pack.get());  // V: (bk x Dv)
        }

        for (int64_t r0 = 0; r0 < rows; r0 += kBlockQ) {
          const int bq = static_cast<int>(std::min<int64_t>(kBlockQ, rows - r0));
          // A tile none of whose rows sees a key of the block is skipped. A tile (or strip) across
          // two heads holds the chunk's first and last query.
          const bool across_heads = r0 / n != (r0 + bq - 1) / n;
          const auto tile = band.keys_in_block(across_heads ? q0 : query_of(r0),
                                               across_heads ? q1 - 1 : query_of(r0 + bq - 1), kb, bk);
          if (tile.empty()) continue;
          acc_t* s = scores.get();
          // S = c Q Kᵀ strip by strip of MR rows, each over the panels its own rows see: along the
          // diagonal and the window's edges the products follow a staircase, not the tile's
          // rectangle; columns outside (above the diagonal, left of the window) are neither
          // computed nor read. The row pass zero-fills a row outside its keys over its strip.
          Staircase strips;
          for (int s0 = 0; s0 < bq; s0 += MR) {
            const int64_t first = r0 + s0, last = r0 + std::min(bq, s0 + MR) - 1;
            const bool strip_across_heads = first / n != last / n;
            const auto keys = band.keys_in_block(strip_across_heads ? q0 : query_of(first),
                                                 strip_across_heads ? q1 - 1 : query_of(last), kb, bk);
            strips.add(keys.lo, keys.hi, bk);
          }
          // (AMX: the whole tile, in 16 x 16 tiles; the row pass reads each row's keys only)
          const int row_tiles = (bq + kAmxRows - 1) / kAmxRows, depth = static_cast<int>(round_up(bk, kAmxDepth));
          if (amx)
            amx_gemm(row_tiles, (bk + kAmxCols - 1) / kAmxCols, D / kAmxDepth, q_rows.get() + r0 * D, D,
                     k_tiles.get(), s, kBlockK, false);
          for (int si = 0; si < strips.count && !amx; ++si)
            if (const auto [c0, c1] = strips.cols[si]; c1 > c0)
              gemm(std::min(MR, bq - si * MR), c1 - c0, D, q_left.rows_from(r0 + si * MR, D),
                   packed_right(k_pack.get() + c0 * D), s + si * MR * kBlockK + c0, kBlockK, false);

          for (int rr = 0; rr < bq; ++rr) {
            const int64_t row = r0 + rr, h = head_of(row), i = query_of(row);
            acc_t* x = s + static_cast<int64_t>(rr) * kBlockK;
            const auto keys = band.keys_in_block(i, kb, bk);
            // P V reads the row's strip columns only: they are what must hold P (zeros outside the keys)
            const auto [c0, c1] = strips.cols[rr / MR];
            if (keys.empty()) {
              std::fill(x + c0, x + c1, acc_t(0));
              if (amx) amx_row_to_bf16(x, 0, 0, depth, p_rows.get() + rr * kBlockK);
              continue;
            }
            const int lo = keys.lo, cnt = keys.hi - keys.lo;
            if (softcap) softcap_row(x + lo, cnt, cap_scale, cap_log2e);
            const acc_t* bias_row = nullptr;  // indexed by the block's key, like x
            if (p.mask) {
              if (!block_mask_row) fill_mask_bias(p, b, h, i, kb + lo, cnt, bias.get() + lo);
              bias_row = bias.get();
            }
            if (alibi) {
              const acc_t slope = static_cast<acc_t>(p.alibi_slope(b, h) * kLog2e);
              alibi_row(row_bias.get(), bias_row, lo, keys.hi, slope, i + band.offset - kb);
              bias_row = row_bias.get();
            }
            const acc_t m_old = row_max[row];
            // AMX without a bias row: the max pass only reads the row, and the exp pass applies the
            // scale (max(s x) = s max(x) for s > 0, rounding included: the same max)
            const bool scale_in_exp = amx && !dropout && bias_row == nullptr && s_scale > acc_t(0);
            const acc_t* bias_lo = bias_row ? bias_row + lo : nullptr;
            const acc_t row_top = scale_in_exp ? add_bias_max(x + lo, cnt, bias_lo, acc_t(1)) * s_scale
                                               : add_bias_max(x + lo, cnt, bias_lo, s_scale);
            const acc_t m_new = std::max(m_old, row_top);
            const acc_t m_use = m_new == kNegInf ? acc_t(0) : m_new;  // all masked so far: exp2(-inf) = 0
            // (exp2(0) = 1 exactly: the call is skipped when the max stays, as it mostly does)
            const acc_t alpha = m_old == m_use ? acc_t(1) : std::exp2(m_old - m_use);
            if (alpha != acc_t(1)) {
              acc_t* o = o_acc.get() + row * Dv;
              for (int d = 0; d < Dv; ++d) o[d] *= alpha;
            }
            if (amx && !dropout) {  // P straight to its bf16 row (zeros outside the row's keys)
              const acc_t exp_scale = scale_in_exp ? s_scale : acc_t(1);
              row_sum[row] = row_sum[row] * alpha + amx_exp2_sum_to_bf16(x, lo, keys.hi, exp_scale, m_use, depth,
                                                                         p_rows.get() + rr * kBlockK);
              row_max[row] = m_new;
              continue;
            }
            row_sum[row] = row_sum[row] * alpha + exp2_sum(x + lo, cnt, m_use);
            row_max[row] = m_new;
            std::fill(x + c0, x + lo, acc_t(0));
            std::fill(x + keys.hi, x + c1, acc_t(0));
            // over the strip's columns (from a panel boundary: the SIMD Philox path); zeros stay zero
            if (dropout) apply_dropout_keep(p, threshold, b * p.heads_q + h, i, kb + c0, c1 - c0, x + c0);
            if (amx) amx_row_to_bf16(x, c0, c1, depth, p_rows.get() + rr * kBlockK);
          }
          if (amx) {  // O += P V, P in bf16 (the rows past the micro-block's: zeros)
            for (int rr = bq; rr < row_tiles * kAmxRows; ++rr)
              amx_row_to_bf16(s, 0, 0, depth, p_rows.get() + rr * kBlockK);
            amx_gemm(row_tiles, Dv / kAmxCols, depth / kAmxDepth, p_rows.get(), kBlockK, v_tiles.get(),
                     o_acc.get() + r0 * Dv, Dv, true);
            continue;
          }
          for (int si = 0; si < strips.count; ++si)  // O += P V, over each strip's keys
            if (const auto [c0, c1] = strips.cols[si]; c1 > c0)
              gemm(std::min(MR, bq - si * MR), Dv, c1 - c0, strided_left(s + si * MR * kBlockK + c0, kBlockK, 1),
                   v_right.rows_from(c0), o_acc.get() + (r0 + si * MR) * Dv, Dv, true);
        }
      }

      for (int64_t row = 0; row < rows; ++row) {
        const int64_t h = head_of(row), i = query_of(row);
        const acc_t l = row_sum[row];
        // l == 0: the row sees no key (and has no sink) -> zeros and lse = -inf (a NaN l stays NaN).
        const acc_t inv = l == acc_t(0) ? acc_t(0) : keep_scale / l;
        acc_t* o = o_acc.get() + row * Dv;
        if (amx) {
          amx_store_row(o, Dv, inv, out + p.base_q(p.out, b, h) + i * p.out.n, p.out.d);
        } else {
          for (int d = 0; d < Dv; ++d) o[d] *= inv;
          store_row(o, Dv, out + p.base_q(p.out, b, h) + i * p.out.n, p.out.d);
        }
        lse[p.row_index(b, h, i)] =
            l == acc_t(0) ? kNegInf : (row_max[row] + std::log2(l)) * static_cast<acc_t>(kLn2);
      }
    }
  });
}

}  // namespace

Tiling fwd_tiling() {
  return {{"fwd_block_q", kBlockQ},           {"fwd_block_k", kBlockK},
          {"fwd_max_chunk_q", kMaxChunkQ},    {"decode_max_rows", kDecodeMaxRows},
          {"decode_block_k", kDecodeBlockK},  {"decode_quad_rows", kQuadRows},
          {"decode_min_split_blocks", kDecodeMinSplitBlocks}, {"decode_max_splits", kDecodeMaxSplits},
          {"decode_values_chunk_bytes_one_quad", kValuesChunkBytesOneQuad},
          {"decode_values_chunk_bytes_float", kValuesChunkBytesFloat},
          {"decode_values_strip_cols_float", kValuesStripColsFloat},
          {"decode_values_strip_cols_bf16", kValuesStripColsBf16},
          {"decode_values_strip_cols_avx512", kValuesStripColsAvx512},
          {"amx_rows", kAmxRows},             {"amx_depth", kAmxDepth}, {"amx_cols", kAmxCols}};
}

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

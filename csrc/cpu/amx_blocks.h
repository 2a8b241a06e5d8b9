// AMX blocks of the bf16 kernels: the block products of the forward (S = Q Kᵀ, O += P V) and of
// the backward (S, dP = dO Vᵀ, dV += Pᵀ dO, dK += dSᵀ Q, dQ += dS K) on Intel's tile registers.
//
// On CPUs with AMX-BF16 (Sapphire Rapids and later) one TDPBF16PS multiplies a 16 x 32 bf16
// tile by a 32 x 16 one into a 16 x 16 fp32 tile: products exact, sums in fp32, as the FMA path
// after widening bf16 to float, only in another order. torch's SDPA uses these tiles for bf16 on
// such CPUs; the FMA path reaches about a third of its forward rate there.
//
// Layouts. A left operand (Q, dO, P or dS rows; Pᵀ, dSᵀ) is plain row-major bf16, read by a tile
// load (16 rows, 64 bytes each, any row stride). A right operand is packed once per block in the
// "VNNI" layout the instruction wants: for every 16-column tile and 32-deep chunk a 16 x 32 block
// whose row r holds, for each column c, the pair (X[2r][c], X[2r + 1][c]), X being the (depth x
// columns) matrix: Kᵀ (D x keys), Vᵀ, V (keys x Dv), K, Q, dO. Pads are zeros.
//
// What changes against the FMA path: P and dS are rounded to bf16 where they are operands (as
// torch's and flash-attention's bf16 kernels do), and the summation order. The row passes (mask,
// bias, soft-cap, max, exp2, sum, dS, dropout) are the FMA path's, on the same fp32 score rows.
#pragma once

#include "blocks.h"

namespace fastattn {
namespace cpu {

constexpr int kAmxRows = 16;   // rows of every tile
constexpr int kAmxDepth = 32;  // bf16 per row of a left tile: the depth of one TDPBF16PS
constexpr int kAmxCols = 16;   // fp32 columns of an accumulator tile
constexpr int kAmxBlock = kAmxDepth * kAmxCols;  // bf16 in one packed right tile (1 KiB)

// Elements of a packed right operand of depth x cols (both padded to whole tiles).
inline int64_t amx_packed_size(int64_t depth, int64_t cols) {
  return round_up(depth, kAmxDepth) * round_up(cols, kAmxCols);
}

}  // namespace cpu
}  // namespace fastattn

#if FASTATTN_X86
#define FASTATTN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16,avx2,fma,f16c")))

namespace fastattn {
namespace cpu {

// Every tile the kernels use is 16 rows x 64 bytes: tiles 0-3 accumulate (2 x 2 of C), 4-5 hold
// left tiles, 6-7 right tiles. The configuration is per thread: loaded by amx_begin() before the
// first tile instruction of a parallel region, dropped by amx_end() at its end (a thread holding
// tile state makes every context switch save 8 KiB more).
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC 12's tile intrinsics are asm statements that tell the compiler of less memory than they
// touch (ldtilecfg: 8 of its 64 bytes, tileloadd: none), so it may drop or sink the stores that
// fill a configuration or an operand: a compiler barrier ("memory" clobber) brackets their use.
// (Without it the configuration's rows and columns were never stored: SIGILL at the first tile op.)
inline void amx_memory_barrier() { __asm__ __volatile__("" ::: "memory"); }

FASTATTN_AMX inline void amx_begin() {
  AmxConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kAmxRows;
  }
  amx_memory_barrier();
  _tile_loadconfig(&cfg);
  amx_memory_barrier();
}

FASTATTN_AMX inline void amx_end() { _tile_release(); }

// Packs X (depth x cols, X[r * rs + c * cs], bf16) into the VNNI layout above: right tile
// (column tile j, depth chunk k) at dst + (j * depth_chunks + k) * kAmxBlock. Pads are zeros.
inline void amx_pack_right(const c10::BFloat16* src, int64_t rs, int64_t cs, int depth, int cols,
                           c10::BFloat16* dst) {
  const int chunks = static_cast<int>(round_up(depth, kAmxDepth) / kAmxDepth);
  const int col_tiles = static_cast<int>(round_up(cols, kAmxCols) / kAmxCols);
  const c10::BFloat16 zero(0.0f);
  for (int j = 0; j < col_tiles; ++j)
    for (int k = 0; k < chunks; ++k) {
      c10::BFloat16* tile = dst + (static_cast<int64_t>(j) * chunks + k) * kAmxBlock;
      for (int r = 0; r < kAmxDepth; ++r) {  // depth index k * 32 + r -> tile row r / 2, slot r % 2
        const int d = k * kAmxDepth + r;
        for (int c = 0; c < kAmxCols; ++c) {
          const int col = j * kAmxCols + c;
          tile[(r / 2) * 2 * kAmxCols + 2 * c + r % 2] =
              d < depth && col < cols ? src[static_cast<int64_t>(d) * rs + static_cast<int64_t>(col) * cs] : zero;
        }
      }
    }
}

// The 16-bit interleave of two rows held as (even row | odd row) in one register: e0 o0 e1 o1 ...,
// the 32-bit pairs of a VNNI tile row (a permutexvar index).
alignas(64) inline constexpr uint16_t kPairInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                             21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                             11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// r[0..15] (16 rows of 16 dwords) transposed in registers: unpacks of dwords, then of qwords, leave
// each 128-bit lane holding one column's 4 rows of a 4-row group; two 128-bit shuffles gather them.
FASTATTN_AMX inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // lane L of t[2i]: r[2i][4L], r[2i+1][4L], r[2i][4L+1], r[2i+1][4L+1]
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // lane L of u[4i + c]: column 4L + c of rows 4i .. 4i + 3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44),
                  y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Packs a K block (keys x D, K[key * rs + d * cs]) as the right operand Kᵀ (D x keys): the VNNI
// pair of a key is two adjacent head-dim entries, so with unit stride a packed tile is the 16 x 16
// transpose of 32-bit words of 16 keys' rows (64 bytes each). Both packers prefetch the rows a few
// KiB ahead of those they read (prefetch_rows_l1), up to row `avail` of src (0: none): a decode
// step's K/V come from memory, and the next block's first rows are then on their way.
FASTATTN_AMX inline void amx_pack_keys(const c10::BFloat16* src, int64_t rs, int64_t cs, int keys, int D,
                                       c10::BFloat16* dst, int avail = 0) {
  if (cs != 1 || D % kAmxDepth != 0) return amx_pack_right(src, cs, rs, D, keys, dst);
  const int chunks = D / kAmxDepth, col_tiles = static_cast<int>(round_up(keys, kAmxCols) / kAmxCols);
  const int ahead = prefetch_distance_rows<c10::BFloat16>(D);
  for (int j = 0; j < col_tiles; ++j) {
    prefetch_rows_l1(src, rs, j * kAmxCols + ahead, (j + 1) * kAmxCols + ahead, avail, D);
    for (int k = 0; k < chunks; ++k) {
      __m512i r[kAmxCols];
      for (int c = 0; c < kAmxCols; ++c) {
        const int key = j * kAmxCols + c;
        r[c] = key < keys ? _mm512_loadu_si512(src + static_cast<int64_t>(key) * rs + k * kAmxDepth)
                          : _mm512_setzero_si512();
      }
      transpose16x16_epi32(r);
      c10::BFloat16* tile = dst + (static_cast<int64_t>(j) * chunks + k) * kAmxBlock;
      for (int w = 0; w < kAmxDepth / 2; ++w) _mm512_storeu_si512(tile + w * 2 * kAmxCols, r[w]);
    }
  }
}

// Packs a V block (keys x Dv, V[key * rs + d * cs]) as the right operand of P V: the VNNI pair of
// a column is two adjacent keys, so with unit stride a tile row interleaves two rows of V. Row pairs
// outer: V is read row after row, as it lies in memory (column tiles outer read it eight times over
// at D = 128, 32 bytes of each row at a time).
FASTATTN_AMX inline void amx_pack_values(const c10::BFloat16* src, int64_t rs, int64_t cs, int keys, int Dv,
                                         c10::BFloat16* dst, int avail = 0) {
  if (cs != 1 || Dv % kAmxCols != 0) return amx_pack_right(src, rs, cs, keys, Dv, dst);
  const int chunks = static_cast<int>(round_up(keys, kAmxDepth) / kAmxDepth), col_tiles = Dv / kAmxCols;
  const __m512i idx = _mm512_load_si512(kPairInterleave);
  const int ahead = prefetch_distance_rows<c10::BFloat16>(Dv);
  for (int k = 0; k < chunks; ++k)
    for (int r = 0; r < kAmxDepth / 2; ++r) {
      const int key = k * kAmxDepth + 2 * r;
      prefetch_rows_l1(src, rs, key + ahead, key + 2 + ahead, avail, Dv);
      const c10::BFloat16* even_row = src + static_cast<int64_t>(key) * rs;
      for (int j = 0; j < col_tiles; ++j) {
        const __m256i even = key < keys ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even_row + j * kAmxCols))
                                        : _mm256_setzero_si256();
        const __m256i odd = key + 1 < keys ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                                 even_row + rs + j * kAmxCols))
                                           : _mm256_setzero_si256();
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
        c10::BFloat16* tile = dst + (static_cast<int64_t>(j) * chunks + k) * kAmxBlock;
        _mm512_storeu_si512(tile + r * 2 * kAmxCols, _mm512_permutexvar_epi16(idx, both));
      }
    }
}

// A row of P as the left operand of P V: dst[c] = bf16(src[c]) (round to nearest even) for c in
// [c0, c1), zero elsewhere in [0, n_padded) (columns the row's strip does not hold).
FASTATTN_AMX inline void amx_row_to_bf16(const float* src, int c0, int c1, int n_padded, c10::BFloat16* dst) {
  std::fill(dst, dst + c0, c10::BFloat16(0.0f));
  int c = c0;
  for (; c + 32 <= c1; c += 32)
    _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + c + 16), _mm512_loadu_ps(src + c)));
  for (; c < c1; ++c) dst[c] = c10::BFloat16(src[c]);
  std::fill(dst + std::max(c0, c1), dst + n_padded, c10::BFloat16(0.0f));
}

// 2^f for f in [-1/2, 1/2] in the AMX forward: a degree-5 near-minimax polynomial (relative error
// 1.8e-7, 2.3e-7 with fp32 Horner steps) instead of the FMA path's degree-7 Taylor series (8.6e-8):
// P is rounded to bf16 (2^-9) for P V, and only its fp32 row sum (the normaliser, the lse) sees the
// difference, at the level of its own summation error. Two FMAs fewer per 16 powers.
constexpr int kSoftmaxExp2Terms = 6;
constexpr float kSoftmaxExp2Poly[kSoftmaxExp2Terms] = {1.3276303262152042e-3f, 9.675490484708671e-3f,
                                                       5.55071331687032e-2f,   2.402212071404707e-1f,
                                                       6.93146967375114e-1f,   1.0f};

// 2^x for x <= 0 (a softmax's powers): x = n + f rounded, the polynomial above for 2^f, the scaling by
// 2^n in one VSCALEFPS (no exponent bits to build), and no upper clamp (x - max <= 0). Below 2^-126 a
// denormal instead of zero, which the conversion to bf16 (VCVTNE2PS2BF16 reads denormals as zero)
// and any sum cannot tell apart.
FASTATTN_AMX inline __m512 softmax_exp2_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);  // -inf would give f = NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kSoftmaxExp2Poly[0]);
  for (int i = 1; i < kSoftmaxExp2Terms; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kSoftmaxExp2Poly[i]));
  return _mm512_scalef_ps(p, n);
}

// 2^(scale x[c] - m) for the 16 lanes c in `lanes`, zeros in the others (whose x is not read).
FASTATTN_AMX inline __m512 softmax_powers_masked(const float* x, __mmask16 lanes, __m512 scale, __m512 m) {
  const __m512 powers = softmax_exp2_avx512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, x), scale, m));
  return _mm512_maskz_mov_ps(lanes, powers);
}

// The row pass's exp2 fused with the conversion of amx_row_to_bf16: dst[c] = bf16(2^(scale x[c] - m))
// for c in [lo, hi), zero elsewhere in [0, n_padded); returns the sum of the fp32 powers. The scale
// comes in here, one FMA per 16 scores, so that the max pass before it only reads the row (x holds
// the unscaled scores; scale = 1 when they were scaled there). The fp32 row of powers is never stored,
// and x is read only in [lo, hi): whole 32-column chunks from lo rounded down to 32 (dst's tiles are
// 32 deep, so no chunk passes n_padded), the lanes outside [lo, hi) masked off.
FASTATTN_AMX inline float amx_exp2_sum_to_bf16(const float* x, int lo, int hi, float scale, float m, int n_padded,
                                               c10::BFloat16* dst) {
  const int first = lo / 32 * 32;
  std::fill(dst, dst + first, c10::BFloat16(0.0f));
  const __m512 vscale = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  auto lanes = [&](int j) {  // the lanes of x[j .. j + 16) inside [lo, hi)
    const int a = std::clamp(lo - j, 0, 16), b = std::clamp(hi - j, 0, 16);
    return static_cast<__mmask16>(((1u << b) - 1) & ~((1u << a) - 1));
  };
  int j = first;
  for (; j < hi; j += 32) {
    __m512 p0, p1;
    if (j >= lo && j + 32 <= hi) {
      p0 = softmax_exp2_avx512(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vscale, vm));
      p1 = softmax_exp2_avx512(_mm512_fmsub_ps(_mm512_loadu_ps(x + j + 16), vscale, vm));
    } else {  // an edge chunk: masked loads, zeros outside [lo, hi)
      const __mmask16 m0 = lanes(j), m1 = lanes(j + 16);
      p0 = softmax_powers_masked(x + j, m0, vscale, vm);
      p1 = softmax_powers_masked(x + j + 16, m1, vscale, vm);
    }
    _mm512_storeu_si512(dst + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
  }
  std::fill(dst + j, dst + n_padded, c10::BFloat16(0.0f));  // j: hi rounded up to 32, <= n_padded
  return _mm512_reduce_add_ps(sum);
}

// The end of an output row: dst[d * stride] = bf16(o[d] * scale) for d < n, rounded as c10's
// scalar conversion (and store_row) do: to nearest even, denormals kept, a NaN as 0x7FC0 (the
// hardware conversion would flush denormals and keep NaN payloads). This is blocks.h's
// round_to_bf16_bits_avx2 in 512-bit form with the scale fused: the FMA path's `o *= inv` loop
// and store_row instead cost the AMX forward 10% at B=8 H=12 N=128 and 8% at N=512 (alternating
// processes, 12 rounds; an AVX-512 store_row alone did not recover it). The better home is a
// scaled store_row in blocks.h for every path, under test_bf16_row_store_rounds_as_c10.
FASTATTN_AMX inline void amx_store_row(const float* o, int n, float scale, c10::BFloat16* dst, int64_t stride) {
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), nan = _mm512_set1_epi32(0x7FC0);
  int d = 0;
  if (stride == 1)
    for (; d + 16 <= n; d += 16) {
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(o + d), vs);
      const __m512i u = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, lsb)), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), nan);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), _mm512_cvtepi32_epi16(r));
    }
  for (; d < n; ++d) dst[d * stride] = c10::BFloat16(o[d] * scale);
}

// The transpose of X (fp32 rows [0, rows) of ldx floats; columns [c0, c1) are its, the rest and
// the rows past `rows` are zeros) as a bf16 left operand Xᵀ: dst[c * ldd + r] for the columns c of
// whole 16-column tiles over [c0, c1) and r < round_up(rows, 32). Pairs of X rows, rounded and
// interleaved, are the 32-bit words of Xᵀ's rows; a 16 x 16 transpose of words puts them in place.
FASTATTN_AMX inline void amx_pack_transposed(const float* x, int64_t ldx, int rows, int c0, int c1,
                                             c10::BFloat16* dst, int64_t ldd) {
  const __m512i idx = _mm512_load_si512(kPairInterleave);
  const int pairs = static_cast<int>(round_up(rows, kAmxDepth) / 2);
  for (int j0 = c0 / kAmxCols * kAmxCols; j0 < c1; j0 += kAmxCols) {
    __mmask16 cols = 0;  // the tile's columns in [c0, c1)
    for (int c = 0; c < kAmxCols; ++c) cols |= static_cast<__mmask16>(j0 + c >= c0 && j0 + c < c1) << c;
    for (int m0 = 0; m0 < pairs; m0 += kAmxCols) {
      __m512i w[kAmxCols];
      for (int m = 0; m < kAmxCols; ++m) {
        const int r = 2 * (m0 + m);
        const __m512 even = r < rows ? _mm512_maskz_loadu_ps(cols, x + r * ldx + j0) : _mm512_setzero_ps();
        const __m512 odd = r + 1 < rows ? _mm512_maskz_loadu_ps(cols, x + (r + 1) * ldx + j0) : _mm512_setzero_ps();
        w[m] = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
      }
      transpose16x16_epi32(w);
      for (int c = 0; c < kAmxCols; ++c) _mm512_storeu_si512(dst + (j0 + c) * ldd + 2 * m0, w[c]);
    }
  }
}

// A row of D elements (src[d * stride]) into a left operand's row.
inline void amx_copy_row(const c10::BFloat16* src, int64_t stride, int D, c10::BFloat16* dst) {
  if (stride == 1) std::copy(src, src + D, dst);
  else for (int d = 0; d < D; ++d) dst[d] = src[d * stride];
}

// The tile configuration held for a scope (a thread's share of a parallel region).
struct AmxScope {
  bool on;
  explicit AmxScope(bool use) : on(use) {
    if (on) amx_begin();
  }
  ~AmxScope() {
    if (on) amx_end();
  }
};

// C (row_tiles * 16 x col_tiles * 16 fp32, row stride ldc floats) = or += A B, A bf16 row-major
// (row stride lda elements, depth_chunks * 32 deep), B packed by amx_pack_* (depth_chunks deep).
// 2 x 2 accumulator tiles at a time: each left and right tile loaded serves two products.
template <int kRowTiles, int kColTiles>
FASTATTN_AMX inline void amx_block(int depth_chunks, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b0,
                                   const c10::BFloat16* b1, float* c, int64_t ldc, bool accumulate) {
  const int64_t a_bytes = lda * 2, c_bytes = ldc * 4, c_next = kAmxRows * ldc;
  amx_memory_barrier();
  if (accumulate) {
    _tile_loadd(0, c, c_bytes);
    if constexpr (kColTiles > 1) _tile_loadd(1, c + kAmxCols, c_bytes);
    if constexpr (kRowTiles > 1) _tile_loadd(2, c + c_next, c_bytes);
    if constexpr (kRowTiles > 1 && kColTiles > 1) _tile_loadd(3, c + c_next + kAmxCols, c_bytes);
  } else {
    _tile_zero(0);
    if constexpr (kColTiles > 1) _tile_zero(1);
    if constexpr (kRowTiles > 1) _tile_zero(2);
    if constexpr (kRowTiles > 1 && kColTiles > 1) _tile_zero(3);
  }
  for (int k = 0; k < depth_chunks; ++k) {
    _tile_loadd(4, a + k * kAmxDepth, a_bytes);
    _tile_loadd(6, b0 + k * kAmxBlock, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kColTiles > 1) {
      _tile_loadd(7, b1 + k * kAmxBlock, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (kRowTiles > 1) {
      _tile_loadd(5, a + kAmxRows * lda + k * kAmxDepth, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kColTiles > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_bytes);
  if constexpr (kColTiles > 1) _tile_stored(1, c + kAmxCols, c_bytes);
  if constexpr (kRowTiles > 1) _tile_stored(2, c + c_next, c_bytes);
  if constexpr (kRowTiles > 1 && kColTiles > 1) _tile_stored(3, c + c_next + kAmxCols, c_bytes);
  amx_memory_barrier();
}

FASTATTN_AMX inline void amx_gemm(int row_tiles, int col_tiles, int depth_chunks, const c10::BFloat16* a,
                                  int64_t lda, const c10::BFloat16* b, float* c, int64_t ldc, bool accumulate) {
  const int64_t b_col = static_cast<int64_t>(depth_chunks) * kAmxBlock;  // between column tiles of b
  for (int i = 0; i < row_tiles; i += 2)
    for (int j = 0; j < col_tiles; j += 2) {
      const c10::BFloat16* ai = a + static_cast<int64_t>(i) * kAmxRows * lda;
      const c10::BFloat16 *bj = b + j * b_col, *bj1 = bj + b_col;
      float* cij = c + static_cast<int64_t>(i) * kAmxRows * ldc + j * kAmxCols;
      const bool two_rows = i + 1 < row_tiles, two_cols = j + 1 < col_tiles;
      if (two_rows && two_cols) amx_block<2, 2>(depth_chunks, ai, lda, bj, bj1, cij, ldc, accumulate);
      else if (two_rows) amx_block<2, 1>(depth_chunks, ai, lda, bj, nullptr, cij, ldc, accumulate);
      else if (two_cols) amx_block<1, 2>(depth_chunks, ai, lda, bj, bj1, cij, ldc, accumulate);
      else amx_block<1, 1>(depth_chunks, ai, lda, bj, nullptr, cij, ldc, accumulate);
    }
}

}  // namespace cpu
}  // namespace fastattn
#endif

namespace fastattn {
namespace cpu {
// The same names for every other element type (and, off x86, for bf16 too), so that fwd_impl reads
// the same for all its instantiations: it takes the AMX path only for bf16 where cpu_has_amx_bf16()
// said so, and these exist to compile, never to run.
[[noreturn]] inline void amx_unavailable() { std::abort(); }
template <typename T>
void amx_pack_keys(const T*, int64_t, int64_t, int, int, c10::BFloat16*, int = 0) { amx_unavailable(); }
template <typename T>
void amx_pack_values(const T*, int64_t, int64_t, int, int, c10::BFloat16*, int = 0) { amx_unavailable(); }
template <typename T>
void amx_copy_row(const T*, int64_t, int, c10::BFloat16*) { amx_unavailable(); }
template <typename T>
void amx_pack_transposed(const T*, int64_t, int, int, int, c10::BFloat16*, int64_t) { amx_unavailable(); }
template <typename T>
void amx_row_to_bf16(const T*, int, int, int, c10::BFloat16*) { amx_unavailable(); }
template <typename T>
T amx_exp2_sum_to_bf16(const T*, int, int, T, T, int, c10::BFloat16*) { amx_unavailable(); }
template <typename T, typename Dst>
void amx_store_row(const T*, int, T, Dst*, int64_t) { amx_unavailable(); }
template <typename T>
void amx_gemm(int, int, int, const c10::BFloat16*, int64_t, const c10::BFloat16*, T*, int64_t, bool) {
  amx_unavailable();
}
#if !FASTATTN_X86
struct AmxScope {
  explicit AmxScope(bool use) {
    if (use) amx_unavailable();
  }
};
#endif
}  // namespace cpu
}  // namespace fastattn

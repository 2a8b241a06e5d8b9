// Building blocks of the CPU flash-attention kernels: panel packing, a
// register-blocked GEMM micro-kernel, and the vectorised softmax row passes.
//
// Every block product of the forward and backward passes (S = Q Kᵀ, O += P V,
// dV += Pᵀ dO, dP = dO Vᵀ, dK += dSᵀ Q, dQ += dS K) is one call of gemm() on a
// LeftOperand and a RightOperand. An operand that is already float with a unit
// stride where the micro-kernel streams is read in place (P, Pᵀ and dS always,
// float Q/K/V/dO rows usually); any other is packed BLIS-style into row panels
// of MR rows (left) or column panels of NR columns (right), which also converts
// bf16/fp16 to the float accumulation type and turns transposes and
// non-contiguous inputs into unit-stride streams.
//
// SIMD: the float micro-kernel and the exp2 passes have an AVX2+FMA version
// chosen at run time (function-level target attributes, so the library itself
// is built for the baseline ISA and never executes AVX2 on a CPU without it);
// on AVX-512 CPUs the micro-kernel computes two NR panels at once with the same
// per-element FMA chain, so its results are bitwise those of the AVX2 kernel.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTATTN_X86 1
#define FASTATTN_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTATTN_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#else
#define FASTATTN_X86 0
#endif

namespace fastattn {
namespace cpu {

constexpr int MR = 6;   // rows of the micro-kernel tile (6 x 16 floats = 12 AVX registers)
constexpr int NR = 16;  // columns of the micro-kernel tile
constexpr int kSimdFloats = 8;  // floats per AVX2 register: the row passes' vector step

constexpr double kLog2e = 1.4426950408889634;  // double: the float64 path needs every digit
constexpr double kLn2 = 0.6931471805599453;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// True when the running CPU has AVX2, FMA and F16C / AVX-512F and BW (decided once; the environment
// variable FASTATTN_CPU_SIMD=avx2 or =baseline caps the choice, e.g. to test the other paths).
bool cpu_has_avx2_fma();
bool cpu_has_avx512();
// True when the CPU has AMX-BF16 and AVX512-BF16 and Linux granted this process the tile state
// (decided once; FASTATTN_CPU_SIMD=avx512, =avx2 or =baseline turns AMX off): amx_blocks.h.
bool cpu_has_amx_bf16();

// ---------------------------------------------------------------------------
// Scratch memory: one 64-byte aligned allocation per thread and kernel call, of exactly
// the size asked for (no rounding up), so that AddressSanitizer builds see its true end.
// ---------------------------------------------------------------------------
template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr;
  explicit Scratch(int64_t n) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T)) != 0) throw std::bad_alloc();
    ptr.reset(static_cast<T*>(p));
  }
  T* get() const { return ptr.get(); }
  T& operator[](int64_t i) const { return ptr.get()[i]; }
};

// Software prefetch, for the kernels that stream K/V from memory (decode_blocks.h, the AMX packers).
// Reading several rows side by side (the decode scores kernel's 4-8 keys) defeats the hardware
// prefetchers, and they stop at every 4 KiB page anyway: each kernel asks for the rows about
// kPrefetchBytes ahead of the ones it reads, as it goes, into L1. Measured on the 2-core EPYC, cold
// K/V: no prefetch 22-33 GB/s, the next block all at once into L2 the same, rows 4 KiB ahead into
// L1 33-38 GB/s (fp32 and bf16; a long pure read there: 47-58 GB/s). On the 2-core Xeon (AMX
// packers, bf16 decode): 4, 8 or 16 KiB ahead, into L1 or L2, within 5% of each other.
constexpr int64_t kPrefetchBytes = 4096;
constexpr int kMaxPrefetchRows = 64;

// Rows ahead of the one in use, for rows of `elems` values: 1 to kMaxPrefetchRows.
template <typename src_t>
inline int prefetch_distance_rows(int elems) {
  const int64_t row_bytes = std::max<int64_t>(static_cast<int64_t>(elems) * sizeof(src_t), 1);
  return static_cast<int>(std::clamp<int64_t>(kPrefetchBytes / row_bytes, 1, kMaxPrefetchRows));
}

// Asks for rows [j0, min(j1, avail)) of base (stride apart, `elems` values each) to be brought
// into L1. Rows at or past `avail` (the end of what may be read) are never asked for.
template <typename src_t>
inline void prefetch_rows_l1(const src_t* base, int64_t stride, int j0, int j1, int avail, int elems) {
#if FASTATTN_X86
  const int64_t bytes = static_cast<int64_t>(elems) * sizeof(src_t);
  for (int j = j0; j < std::min(j1, avail); ++j) {
    const char* row = reinterpret_cast<const char*>(base + static_cast<int64_t>(j) * stride);
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
  }
#else
  (void)base, (void)stride, (void)j0, (void)j1, (void)avail, (void)elems;
#endif
}

// ---------------------------------------------------------------------------
// Packing. A matrix X (rows x cols) is read as X[r * rs + c * cs].
// ---------------------------------------------------------------------------
template <typename acc_t, typename src_t>
inline acc_t load_as(const src_t* p) {
  return static_cast<acc_t>(*p);
}

#if FASTATTN_X86
FASTATTN_AVX2 inline void transpose8x8_avx2(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]),
               t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]),
               t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]),
               t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// 8 consecutive values as floats. A bfloat16 is the high half of a float, so widening it is a
// shift, exact (NaN and inf included), the same as the scalar conversion: packing bf16 K/V (the
// conversion happens once per block there) costs no more than packing float.
FASTATTN_AVX2 inline __m256 load8_as_float_avx2(const float* p) { return _mm256_loadu_ps(p); }
FASTATTN_AVX2 inline __m256 load8_as_float_avx2(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
// fp16 widens exactly too (F16C), as c10::Half's scalar conversion does: the scalar loop of it was
// ~14% of an fp16 forward.
FASTATTN_AVX2 inline __m256 load8_as_float_avx2(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The input types load8_as_float_avx2 widens: their panels are packed with SIMD.
template <typename src_t>
constexpr bool kWidensAvx2 = std::is_same_v<src_t, float> || std::is_same_v<src_t, c10::BFloat16> ||
                             std::is_same_v<src_t, c10::Half>;

// One full row panel (MR x K) of A from rows (float, bf16 or fp16, widened exactly), times scale:
// 8 x 8 register transposes (two rows of padding). Each column of MR is stored as 8 floats, in
// order, so that its 2 padding lanes land on the next column's first two, which the next store
// writes; the last of the 8 is stored as 4 + 2 floats, never past the panel. (A masked store,
// vmaskmovps, is microcoded on AMD cores: it was most of this function's time on Zen 3.)
template <typename src_t>
FASTATTN_AVX2 inline void pack_a_panel_avx2(const src_t* src, int64_t rs, int K, float* panel, float scale) {
  static_assert(MR == 6, "a transposed column is 6 of a register's 8 floats");
  const __m256 vs = _mm256_set1_ps(scale);
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 r[8];
    for (int i = 0; i < MR; ++i) r[i] = _mm256_mul_ps(load8_as_float_avx2(src + i * rs + k), vs);
    for (int i = MR; i < 8; ++i) r[i] = _mm256_setzero_ps();
    transpose8x8_avx2(r);
    for (int i = 0; i < 7; ++i) _mm256_storeu_ps(panel + (k + i) * MR, r[i]);
    float* last = panel + (k + 7) * MR;
    _mm_storeu_ps(last, _mm256_castps256_ps128(r[7]));
    _mm_storel_pi(reinterpret_cast<__m64*>(last + 4), _mm256_extractf128_ps(r[7], 1));
  }
  for (; k < K; ++k)
    for (int i = 0; i < MR; ++i) panel[k * MR + i] = load_as<float>(src + i * rs + k) * scale;
}

// One full column panel (K x NR) of Bᵀ from rows, B(k, c) = src[c * cs + k] (Kᵀ from K's
// rows): 8 x 8 register transposes instead of a strided gather.
template <typename src_t>
FASTATTN_AVX2 inline void pack_b_panel_transposed_avx2(const src_t* src, int64_t cs, int K, float* panel) {
  int k = 0;
  for (; k + 8 <= K; k += 8)
    for (int half = 0; half < NR; half += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8_as_float_avx2(src + (half + i) * cs + k);
      transpose8x8_avx2(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k + i) * NR + half, r[i]);
    }
  for (; k < K; ++k)
    for (int c = 0; c < NR; ++c) panel[k * NR + c] = load_as<float>(src + c * cs + k);
}

// One full column panel (K x NR) of B from rows with unit column stride (V), B(k, c) = src[k * rs + c].
template <typename src_t>
FASTATTN_AVX2 inline void pack_b_panel_rows_avx2(const src_t* src, int64_t rs, int K, float* panel) {
  static_assert(NR == 16, "a panel row is two registers");
  for (int k = 0; k < K; ++k) {
    _mm256_storeu_ps(panel + k * NR, load8_as_float_avx2(src + k * rs));
    _mm256_storeu_ps(panel + k * NR + 8, load8_as_float_avx2(src + k * rs + 8));
  }
}
#endif

// Left operand, M x K, times `scale`, into ceil(M / MR) row panels: dst[p][k][r] (zero padded rows).
template <typename acc_t, typename src_t>
void pack_a(const src_t* src, int64_t rs, int64_t cs, int M, int K, acc_t* dst, acc_t scale = acc_t(1)) {
#if FASTATTN_X86
  static const bool avx2 = cpu_has_avx2_fma();
#endif
  for (int p = 0; p < M; p += MR) {
    const int mr = std::min(MR, M - p);
    acc_t* panel = dst + static_cast<int64_t>(p) * K;
#if FASTATTN_X86
    if constexpr (std::is_same_v<acc_t, float> && kWidensAvx2<src_t>) {
      if (avx2 && cs == 1 && mr == MR) {
        pack_a_panel_avx2(src + p * rs, rs, K, panel, scale);
        continue;
      }
    }
#endif
    if (mr < MR) std::fill(panel, panel + static_cast<int64_t>(K) * MR, acc_t(0));
    if (cs == 1) {  // rows are contiguous: read each row once, write strided
      for (int r = 0; r < mr; ++r) {
        const src_t* row = src + (p + r) * rs;
        for (int k = 0; k < K; ++k) panel[k * MR + r] = load_as<acc_t>(row + k) * scale;
      }
    } else {
      for (int k = 0; k < K; ++k)
        for (int r = 0; r < mr; ++r) panel[k * MR + r] = load_as<acc_t>(src + (p + r) * rs + k * cs) * scale;
    }
  }
}

// Right operand, K x N, into ceil(N / NR) column panels: dst[p][k][c] (zero padded columns).
template <typename acc_t, typename src_t>
void pack_b(const src_t* src, int64_t rs, int64_t cs, int K, int N, acc_t* dst) {
#if FASTATTN_X86
  static const bool avx2 = cpu_has_avx2_fma();
#endif
  for (int p = 0; p < N; p += NR) {
    const int nr = std::min(NR, N - p);
    acc_t* panel = dst + static_cast<int64_t>(p) * K;
#if FASTATTN_X86
    if constexpr (std::is_same_v<acc_t, float> && kWidensAvx2<src_t>) {
      if (avx2 && nr == NR && rs == 1) {
        pack_b_panel_transposed_avx2(src + p * cs, cs, K, panel);
        continue;
      }
      if (avx2 && nr == NR && cs == 1) {
        pack_b_panel_rows_avx2(src + p, rs, K, panel);
        continue;
      }
    }
#endif
    if (nr < NR) std::fill(panel, panel + static_cast<int64_t>(K) * NR, acc_t(0));
    if (cs == 1) {  // rows of B contiguous (e.g. V, or Q as the right operand)
      for (int k = 0; k < K; ++k) {
        const src_t* row = src + k * rs + p;
        for (int c = 0; c < nr; ++c) panel[k * NR + c] = load_as<acc_t>(row + c);
      }
    } else {  // columns of B contiguous (e.g. Kᵀ read from K's rows)
      for (int c = 0; c < nr; ++c) {
        const src_t* col = src + (p + c) * cs;
        for (int k = 0; k < K; ++k) panel[k * NR + c] = load_as<acc_t>(col + k * rs);
      }
    }
  }
}

// Row r of a left operand packed as pack_a lays it out (panels of MR rows), from src[k * cs] * scale:
// for rows gathered from different places (the query heads of a GQA group).
template <typename acc_t, typename src_t>
void pack_a_row(const src_t* src, int64_t cs, int K, acc_t* panels, int r, acc_t scale) {
  acc_t* panel = panels + static_cast<int64_t>(r / MR) * MR * K;
  for (int k = 0; k < K; ++k) panel[k * MR + r % MR] = load_as<acc_t>(src + k * cs) * scale;
}

inline int64_t packed_a_size(int64_t M, int64_t K) { return round_up(M, MR) * K; }
inline int64_t packed_b_size(int K, int N) { return round_up(N, NR) * K; }

// ---------------------------------------------------------------------------
// GEMM on packed operands: C[M x N] (+)= A[M x K] * B[K x N], C row-major with ldc.
// ---------------------------------------------------------------------------
template <typename acc_t>
void ukernel_generic(int K, const acc_t* a, int64_t a_rs, int64_t a_ks, const acc_t* b, int64_t b_ks, acc_t* c,
                     int64_t ldc, int mr, int nr, bool accumulate) {
  acc_t tile[MR][NR] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int r = 0; r < mr; ++r) {
      const acc_t ar = a[r * a_rs + k * a_ks];
      for (int j = 0; j < NR; ++j) tile[r][j] += ar * b[k * b_ks + j];
    }
  }
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) c[r * ldc + j] = accumulate ? c[r * ldc + j] + tile[r][j] : tile[r][j];
}

#if FASTATTN_X86
// A element (r, k) is read at a[r * a_rs + k * a_ks]: a packed panel has (a_rs, a_ks) = (1, MR);
// a row-major matrix (e.g. the probabilities P, used where they were computed) has (lda, 1).
// B element (k, j) is read at b[k * b_ks + j]: b_ks = NR for a packed panel, the row stride
// for a row-major B read in place.
FASTATTN_AVX2 inline void ukernel_avx2(int K, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t b_ks,
                                       float* c, int64_t ldc, int mr, int nr, bool accumulate) {
  // Rows past mr (a partial panel of a row-major A) re-read row 0; their results are discarded.
  const float* a0 = a;
  const float* a1 = a + (mr > 1 ? a_rs : 0);
  const float* a2 = a + (mr > 2 ? 2 * a_rs : 0);
  const float* a3 = a + (mr > 3 ? 3 * a_rs : 0);
  const float* a4 = a + (mr > 4 ? 4 * a_rs : 0);
  const float* a5 = a + (mr > 5 ? 5 * a_rs : 0);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t ak = k * a_ks;
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 ar = _mm256_broadcast_ss(a0 + ak);
    c00 = _mm256_fmadd_ps(ar, b0, c00), c01 = _mm256_fmadd_ps(ar, b1, c01);
    ar = _mm256_broadcast_ss(a1 + ak);
    c10 = _mm256_fmadd_ps(ar, b0, c10), c11 = _mm256_fmadd_ps(ar, b1, c11);
    ar = _mm256_broadcast_ss(a2 + ak);
    c20 = _mm256_fmadd_ps(ar, b0, c20), c21 = _mm256_fmadd_ps(ar, b1, c21);
    ar = _mm256_broadcast_ss(a3 + ak);
    c30 = _mm256_fmadd_ps(ar, b0, c30), c31 = _mm256_fmadd_ps(ar, b1, c31);
    ar = _mm256_broadcast_ss(a4 + ak);
    c40 = _mm256_fmadd_ps(ar, b0, c40), c41 = _mm256_fmadd_ps(ar, b1, c41);
    ar = _mm256_broadcast_ss(a5 + ak);
    c50 = _mm256_fmadd_ps(ar, b0, c50), c51 = _mm256_fmadd_ps(ar, b1, c51);
    b += b_ks;
  }
  alignas(32) float tile[MR][NR];
  const __m256 rows[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (nr == NR) {
    for (int r = 0; r < mr; ++r) {
      float* cr = c + r * ldc;
      __m256 lo = rows[r][0], hi = rows[r][1];
      if (accumulate) lo = _mm256_add_ps(lo, _mm256_loadu_ps(cr)), hi = _mm256_add_ps(hi, _mm256_loadu_ps(cr + 8));
      _mm256_storeu_ps(cr, lo);
      _mm256_storeu_ps(cr + 8, hi);
    }
    return;
  }
  for (int r = 0; r < MR; ++r) _mm256_store_ps(tile[r], rows[r][0]), _mm256_store_ps(tile[r] + 8, rows[r][1]);
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) c[r * ldc + j] = accumulate ? c[r * ldc + j] + tile[r][j] : tile[r][j];
}
#endif

#if FASTATTN_X86
// One k step of one row of an AVX-512 tile: c0 (+ c1) += a * v0 (v1).
template <bool kTwoPanels>
FASTATTN_AVX512 inline void fma_row_avx512(float a, __m512 v0, __m512 v1, __m512& c0, __m512& c1) {
  const __m512 x = _mm512_set1_ps(a);
  c0 = _mm512_fmadd_ps(x, v0, c0);
  if (kTwoPanels) c1 = _mm512_fmadd_ps(x, v1, c1);
}

// One row of an AVX-512 tile to C (its first NR columns under mask m0, the next NR under m1),
// added to what C holds when accumulating.
template <bool kTwoPanels>
FASTATTN_AVX512 inline void store_tile_row_avx512(float* cr, __m512 x0, __m512 x1, __mmask16 m0, __mmask16 m1,
                                                  bool accumulate) {
  if (accumulate) x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(m0, cr));
  _mm512_mask_storeu_ps(cr, m0, x0);
  if (kTwoPanels) {
    if (accumulate) x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m1, cr + NR));
    _mm512_mask_storeu_ps(cr + NR, m1, x1);
  }
}

// The AVX-512 micro-kernel: MR rows times two adjacent B panels (b0 and b1, nr <= 2 * NR
// columns; b1 is not read when nr <= NR), one 16-float register per row and panel. Each
// element is the same chain of FMAs over k, in the same order, as in ukernel_avx2, and the
// final add to C the same single rounding, so the two kernels give identical bits.
template <bool kTwoPanels>
FASTATTN_AVX512 inline void ukernel_avx512(int K, const float* a, int64_t a_rs, int64_t a_ks, const float* b0,
                                           const float* b1, int64_t b_ks, float* c, int64_t ldc, int mr, int nr,
                                           bool accumulate) {
  static_assert(MR == 6 && NR == 16, "one register per row and panel");
  // Rows past mr (a partial panel of a row-major A) re-read row 0; their results are discarded.
  // (Spelled out as in ukernel_avx2: a helper returning the six pointers made GCC step each of them
  // separately in that kernel's loop instead of one shared index, 5-8% slower.)
  const float* a0 = a;
  const float* a1 = a + (mr > 1 ? a_rs : 0);
  const float* a2 = a + (mr > 2 ? 2 * a_rs : 0);
  const float* a3 = a + (mr > 3 ? 3 * a_rs : 0);
  const float* a4 = a + (mr > 4 ? 4 * a_rs : 0);
  const float* a5 = a + (mr > 5 ? 5 * a_rs : 0);
  // Named accumulators, not arrays: with arrays GCC kept some copies of this kernel's tile on the
  // stack, zeroed by `rep stos` on every call (~10% of the kernel's time at K = 64).
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t ak = k * a_ks;
    const __m512 v0 = _mm512_loadu_ps(b0 + k * b_ks);
    const __m512 v1 = kTwoPanels ? _mm512_loadu_ps(b1 + k * b_ks) : v0;
    fma_row_avx512<kTwoPanels>(a0[ak], v0, v1, c00, c01);
    fma_row_avx512<kTwoPanels>(a1[ak], v0, v1, c10, c11);
    fma_row_avx512<kTwoPanels>(a2[ak], v0, v1, c20, c21);
    fma_row_avx512<kTwoPanels>(a3[ak], v0, v1, c30, c31);
    fma_row_avx512<kTwoPanels>(a4[ak], v0, v1, c40, c41);
    fma_row_avx512<kTwoPanels>(a5[ak], v0, v1, c50, c51);
  }
  // Column masks of the two panels: all 16 columns of a full one, the first nr % NR of a partial one.
  const int nr0 = std::min(nr, NR), nr1 = kTwoPanels ? nr - NR : 0;
  const __mmask16 m0 = static_cast<__mmask16>((1u << nr0) - 1), m1 = static_cast<__mmask16>((1u << nr1) - 1);
  store_tile_row_avx512<kTwoPanels>(c, c00, c01, m0, m1, accumulate);
  if (mr > 1) store_tile_row_avx512<kTwoPanels>(c + ldc, c10, c11, m0, m1, accumulate);
  if (mr > 2) store_tile_row_avx512<kTwoPanels>(c + 2 * ldc, c20, c21, m0, m1, accumulate);
  if (mr > 3) store_tile_row_avx512<kTwoPanels>(c + 3 * ldc, c30, c31, m0, m1, accumulate);
  if (mr > 4) store_tile_row_avx512<kTwoPanels>(c + 4 * ldc, c40, c41, m0, m1, accumulate);
  if (mr > 5) store_tile_row_avx512<kTwoPanels>(c + 5 * ldc, c50, c51, m0, m1, accumulate);
}
#endif

// C[M x N] (+)= A[M x K] * B[K x N]. A element (r, k) at a[r * a_rs + k * a_ks] (a packed A:
// panel i at a + i * K). B packed by pack_b (b_ks = NR, panel j at b + j * b_depth, b_depth >= K
// the number of rows it was packed with: the product may use only its first K rows) or
// row-major read in place (b_ks = its row stride, N a multiple of NR).
template <typename acc_t>
void gemm(int M, int N, int K, const acc_t* a, int64_t a_rs, int64_t a_ks, bool a_packed, const acc_t* b,
          int64_t b_ks, bool b_packed, int64_t b_depth, acc_t* c, int64_t ldc, bool accumulate) {
  if (K == 0) {
    if (!accumulate)
      for (int r = 0; r < M; ++r) std::fill(c + r * ldc, c + r * ldc + N, acc_t(0));
    return;
  }
  auto a_at = [&](int i) { return a + (a_packed ? static_cast<int64_t>(i) * K : i * a_rs); };
  auto b_at = [&](int j) { return b + (b_packed ? j * b_depth : j); };
#if FASTATTN_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    static const bool avx512 = cpu_has_avx512();
    if (avx512) {
      // Pairs of column panels outer: two B panels (K x 32) stay in L1 while the A rows stream.
      for (int j = 0; j < N; j += 2 * NR) {
        const int nr = std::min(2 * NR, N - j);
        for (int i = 0; i < M; i += MR) {
          const int mr = std::min(MR, M - i);
          if (nr > NR)
            ukernel_avx512<true>(K, a_at(i), a_rs, a_ks, b_at(j), b_at(j + NR), b_ks, c + i * ldc + j, ldc, mr, nr,
                                 accumulate);
          else
            ukernel_avx512<false>(K, a_at(i), a_rs, a_ks, b_at(j), nullptr, b_ks, c + i * ldc + j, ldc, mr, nr,
                                  accumulate);
        }
      }
      return;
    }
    static const bool avx2 = cpu_has_avx2_fma();
    if (avx2) {
      // Column panels outer: one B panel (K x 16) stays in L1 while the A rows stream.
      for (int j = 0; j < N; j += NR)
        for (int i = 0; i < M; i += MR)
          ukernel_avx2(K, a_at(i), a_rs, a_ks, b_at(j), b_ks, c + i * ldc + j, ldc, std::min(MR, M - i),
                       std::min(NR, N - j), accumulate);
      return;
    }
  }
#endif
  for (int j = 0; j < N; j += NR)
    for (int i = 0; i < M; i += MR)
      ukernel_generic<acc_t>(K, a_at(i), a_rs, a_ks, b_at(j), b_ks, c + i * ldc + j, ldc, std::min(MR, M - i),
                             std::min(NR, N - j), accumulate);
}

// The operands of a block product: used in place when they already are in the
// accumulation type with unit stride where the micro-kernel streams, packed (and
// converted) otherwise.
template <typename acc_t>
struct LeftOperand {
  const acc_t* ptr;
  int64_t rs, ks;
  bool packed;
  // The same operand from its row r on, for a product of K columns over rows [r, ...) only (one
  // strip of a staircase); a packed operand's r must be a panel boundary (a multiple of MR).
  LeftOperand rows_from(int64_t r, int K) const { return {ptr + (packed ? r * K : r * rs), rs, ks, packed}; }
};

template <typename acc_t>
struct RightOperand {
  const acc_t* ptr;
  int64_t ks;
  bool packed;
  int64_t depth;  // packed: rows it was packed with (0: as many as the product uses)
  // The same operand from its row r on, for a product over rows [r, ...) only (a tile that
  // sees a band of the keys); a packed operand must know its depth for that.
  RightOperand rows_from(int64_t r) const {
    if (!packed) return {ptr + r * ks, ks, false, 0};
    return {ptr + r * NR, ks, true, depth};
  }
};

// The columns [lo, hi) of a block each MR-row strip of a tile computes: the strip's rows'
// keys widened to whole NR-column panels (the micro-kernel's width); empty (lo == hi) when no
// row of the strip sees a key of the block. A tile has at most kMaxStrips strips.
constexpr int kMaxStrips = 8;
struct Staircase {
  struct Cols {
    int lo, hi;
  };
  Cols cols[kMaxStrips];
  int count = 0;
  // The next strip, whose rows see keys [lo, hi) (none when lo >= hi) of a block `width` wide.
  void add(int lo, int hi, int width) {
    cols[count++] =
        hi <= lo ? Cols{0, 0} : Cols{lo / NR * NR, static_cast<int>(std::min<int64_t>(width, round_up(hi, NR)))};
  }
  // f(first, last, cols) for each run of consecutive strips [first, last) with the same non-empty
  // columns: one product over a run's rows keeps each B panel in L1 while the run's rows stream.
  template <typename F>
  void for_each_run(F&& f) const {
    for (int s = 0; s < count;) {
      int e = s + 1;
      while (e < count && cols[e].lo == cols[s].lo && cols[e].hi == cols[s].hi) ++e;
      if (cols[s].hi > cols[s].lo) f(s, e, cols[s]);
      s = e;
    }
  }
};

template <typename acc_t>
LeftOperand<acc_t> packed_left(const acc_t* panels) { return {panels, 1, MR, true}; }

// A read in place: element (r, k) at a[r * rs + k * ks] (fast when rs or ks is 1, e.g. Pᵀ read from P).
template <typename acc_t>
LeftOperand<acc_t> strided_left(const acc_t* a, int64_t rs, int64_t ks) { return {a, rs, ks, false}; }

template <typename acc_t>
RightOperand<acc_t> packed_right(const acc_t* panels, int64_t depth = 0) { return {panels, NR, true, depth}; }

// M x K block X[r * rs + c * cs]: in place when possible, else packed into pack_buffer.
template <typename acc_t, typename src_t>
LeftOperand<acc_t> left_operand(const src_t* src, int64_t rs, int64_t cs, int M, int K, acc_t* pack_buffer) {
  if constexpr (std::is_same_v<acc_t, src_t>) {
    if (cs == 1) return strided_left(src, rs, 1);
  }
  pack_a(src, rs, cs, M, K, pack_buffer);
  return packed_left<acc_t>(pack_buffer);
}

// K x N block X[k * rs + c * cs]: in place when its rows are unit-stride and N is a whole
// number of panels, else packed into pack_buffer.
template <typename acc_t, typename src_t>
RightOperand<acc_t> right_operand(const src_t* src, int64_t rs, int64_t cs, int K, int N, acc_t* pack_buffer) {
  if constexpr (std::is_same_v<acc_t, src_t>) {
    if (cs == 1 && N % NR == 0) return {src, rs, false, 0};
  }
  pack_b(src, rs, cs, K, N, pack_buffer);
  return packed_right<acc_t>(pack_buffer, K);
}

template <typename acc_t>
void gemm(int M, int N, int K, const LeftOperand<acc_t>& a, const RightOperand<acc_t>& b, acc_t* c, int64_t ldc,
          bool accumulate) {
  gemm(M, N, K, a.ptr, a.rs, a.ks, a.packed, b.ptr, b.ks, b.packed, b.depth ? b.depth : K, c, ldc, accumulate);
}

#if FASTATTN_X86
// 16 floats to bf16 as c10::BFloat16(float) rounds them (c10::detail::round_to_nearest_even: add
// 0x7FFF plus the lowest kept bit, keep the high half; a NaN becomes 0x7FC0), bit for bit. That
// conversion has a branch, so a plain loop of it stays scalar: ~4% of a bf16 forward was its stores.
FASTATTN_AVX2 inline __m256i round_to_bf16_bits_avx2(__m256 x) {  // 8 bf16 in the low halves of the dwords
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}
FASTATTN_AVX2 inline __m256i float16_to_bf16_avx2(__m256 lo, __m256 hi) {
  // packus works within 128-bit lanes: [lo 0-3, hi 0-3, lo 4-7, hi 4-7], put back in order
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(round_to_bf16_bits_avx2(lo), round_to_bf16_bits_avx2(hi)),
                                  0xD8);
}

FASTATTN_AVX2 inline void store_row_bf16_avx2(const float* src, int n, c10::BFloat16* dst) {
  int d = 0;
  for (; d + 16 <= n; d += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                        float16_to_bf16_avx2(_mm256_loadu_ps(src + d), _mm256_loadu_ps(src + d + 8)));
  for (; d < n; ++d) dst[d] = static_cast<c10::BFloat16>(src[d]);
}

// 8 floats to fp16 as c10::Half(float) rounds them (c10::detail::fp16_ieee_from_fp32_value), bit for
// bit: F16C's conversion rounds to nearest even as it does, overflow to inf and denormals alike; a
// NaN, whose payload F16C keeps in part, becomes c10's sign | 0x7E00. c10's scalar conversion is
// bit arithmetic that the compiler does not vectorise.
FASTATTN_AVX2 inline void store_row_f16_avx2(const float* src, int n, c10::Half* dst) {
  const __m128i quiet_nan = _mm_set1_epi16(0x7E00), sign = _mm_set1_epi16(static_cast<int16_t>(0x8000));
  int d = 0;
  for (; d + 8 <= n; d += 8) {
    const __m256 x = _mm256_loadu_ps(src + d);
    const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // the 8 NaN lanes as 16-bit masks (packs keeps all-ones and zeros as they are)
    const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
    const __m128i fixed = _mm_or_si128(_mm_and_si128(h, sign), quiet_nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), _mm_blendv_epi8(h, fixed, nan16));
  }
  for (; d < n; ++d) dst[d] = static_cast<c10::Half>(src[d]);
}
#endif

// dst[d * stride] = src[d] for d < n, converted to dst's type; a unit stride (the usual layout)
// takes a loop the compiler vectorises (bf16 and fp16: the AVX2 conversions above).
template <typename acc_t, typename dst_t>
inline void store_row(const acc_t* src, int n, dst_t* dst, int64_t stride) {
  if (stride == 1) {
#if FASTATTN_X86
    if constexpr (std::is_same_v<acc_t, float> &&
                  (std::is_same_v<dst_t, c10::BFloat16> || std::is_same_v<dst_t, c10::Half>)) {
      static const bool avx2 = cpu_has_avx2_fma();
      if (avx2) {
        if constexpr (std::is_same_v<dst_t, c10::BFloat16>) return store_row_bf16_avx2(src, n, dst);
        else return store_row_f16_avx2(src, n, dst);
      }
    }
#endif
#pragma omp simd
    for (int d = 0; d < n; ++d) dst[d] = static_cast<dst_t>(src[d]);
  } else {
    for (int d = 0; d < n; ++d) dst[d * stride] = static_cast<dst_t>(src[d]);
  }
}

// ---------------------------------------------------------------------------
// Softmax row passes, in base 2 (the softmax scale is pre-multiplied by log2(e)).
// ---------------------------------------------------------------------------
#if FASTATTN_X86
// Taylor coefficients of 2^f = exp(f ln2), ln2^k / k!, highest degree first (Horner).
constexpr int kExp2Terms = 8;
constexpr float kExp2Taylor[kExp2Terms] = {1.5252733804059840e-5f, 1.5403530393381610e-4f, 1.3333558146428443e-3f,
                                           9.6181291076284772e-3f, 5.5504108664821580e-2f, 2.4022650695910071e-1f,
                                           6.9314718055994531e-1f, 1.0f};

// 2^x for 8 floats. Rounds x to n + f (|f| <= 1/2), evaluates 2^f with a
// degree-7 polynomial (relative error ~1e-8 before rounding) and scales by 2^n
// through the exponent bits. x <= -127 (including -inf) gives exactly 0, x >= 128
// gives inf, NaN stays NaN (the clamps keep a NaN operand: it is the second one).
FASTATTN_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-127.0f);
  x = _mm256_min_ps(_mm256_set1_ps(128.0f), x);
  x = _mm256_max_ps(lo, x);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(kExp2Taylor[0]);
  for (int i = 1; i < kExp2Terms; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Taylor[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  // n = -127 encodes 0.0f above already; the mask also zeroes inputs that were -inf.
  return _mm256_and_ps(r, _mm256_cmp_ps(x, lo, _CMP_NEQ_UQ));
}

FASTATTN_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

FASTATTN_AVX2 inline float hmax_avx2(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// x[j] = x[j] * scale + bias[j] (each part when there is one: scale != 1, a bias); returns
// max_j x[j]. The _from form goes on from element j with the running maxima vmax (where the
// AVX-512 pass leaves its remainder).
FASTATTN_AVX2 inline float add_bias_max_avx2_from(float* x, int n, const float* bias, float scale, int j,
                                                  __m256 vmax) {
  const bool scaled = scale != 1.0f;
  const __m256 vscale = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    if (scaled) v = _mm256_mul_ps(v, vscale);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    if (scaled || bias) _mm256_storeu_ps(x + j, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  float m = hmax_avx2(vmax);
  for (; j < n; ++j) {
    if (scaled) x[j] *= scale;
    if (bias) x[j] += bias[j];
    m = std::max(m, x[j]);
  }
  return m;
}

FASTATTN_AVX2 inline float add_bias_max_avx2(float* x, int n, const float* bias, float scale) {
  return add_bias_max_avx2_from(x, n, bias, scale, 0, _mm256_set1_ps(-std::numeric_limits<float>::infinity()));
}

// x[j] = 2^(x[j] - m); returns the sum. The _from form goes on from element j with the
// running lane sums vs (where the AVX-512 pass leaves its remainder).
FASTATTN_AVX2 inline float exp2_sum_avx2_from(float* x, int n, float m, int j, __m256 vs) {
  const __m256 vm = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm));
    _mm256_storeu_ps(x + j, p);
    vs = _mm256_add_ps(vs, p);
  }
  float s = hsum_avx2(vs);
  for (; j < n; ++j) {
    x[j] = std::exp2(x[j] - m);
    s += x[j];
  }
  return s;
}

FASTATTN_AVX2 inline float exp2_sum_avx2(float* x, int n, float m) {
  return exp2_sum_avx2_from(x, n, m, 0, _mm256_setzero_ps());
}

// x[j] = 2^(x[j] * c + bias[j] - m) (bias may be null).
FASTATTN_AVX2 inline void scale_bias_exp2_avx2(float* x, int n, float c, const float* bias, float m) {
  const __m256 vc = _mm256_set1_ps(c), vm = _mm256_set1_ps(m);
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_fmsub_ps(_mm256_loadu_ps(x + j), vc, vm);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    _mm256_storeu_ps(x + j, exp2_avx2(v));
  }
  for (; j < n; ++j) x[j] = std::exp2(x[j] * c - m + (bias ? bias[j] : 0.0f));
}

// The same passes 16 floats at a time. Every element goes through the same operations as in
// the AVX2 versions (and a remainder of 8 through those), and exp2_sum adds its two halves to
// an 8-lane sum in the AVX2 order, so the results are bitwise those of the AVX2 passes.
FASTATTN_AVX512 inline __m512 exp2_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-127.0f);
  x = _mm512_min_ps(_mm512_set1_ps(128.0f), x);
  x = _mm512_max_ps(lo, x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Taylor[0]);
  for (int i = 1; i < kExp2Terms; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Taylor[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 r = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NEQ_UQ), r);
}

// Floats 8..15 of a register (AVX-512F only: the 32x8 extract needs AVX512DQ).
FASTATTN_AVX512 inline __m256 upper_half_avx512(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

FASTATTN_AVX512 inline float add_bias_max_avx512(float* x, int n, const float* bias, float scale) {
  const bool scaled = scale != 1.0f;
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_loadu_ps(x + j);
    if (scaled) v = _mm512_mul_ps(v, vscale);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    if (scaled || bias) _mm512_storeu_ps(x + j, v);
    vmax16 = _mm512_max_ps(vmax16, v);
  }
  return add_bias_max_avx2_from(x, n, bias, scale, j,
                                _mm256_max_ps(_mm512_castps512_ps256(vmax16), upper_half_avx512(vmax16)));
}

FASTATTN_AVX512 inline float exp2_sum_avx512(float* x, int n, float m) {
  const __m512 vm16 = _mm512_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 p = exp2_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm16));
    _mm512_storeu_ps(x + j, p);
    vs = _mm256_add_ps(vs, _mm512_castps512_ps256(p));
    vs = _mm256_add_ps(vs, upper_half_avx512(p));
  }
  return exp2_sum_avx2_from(x, n, m, j, vs);
}

FASTATTN_AVX512 inline void scale_bias_exp2_avx512(float* x, int n, float c, const float* bias, float m) {
  const __m512 vc = _mm512_set1_ps(c), vm = _mm512_set1_ps(m);
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_fmsub_ps(_mm512_loadu_ps(x + j), vc, vm);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    _mm512_storeu_ps(x + j, exp2_avx512(v));
  }
  scale_bias_exp2_avx2(x + j, n - j, c, bias ? bias + j : nullptr, m);
}
#endif

template <typename acc_t>
acc_t add_bias_max(acc_t* x, int n, const acc_t* bias, acc_t scale = acc_t(1)) {
#if FASTATTN_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    static const bool avx512 = cpu_has_avx512(), avx2 = cpu_has_avx2_fma();
    if (avx512) return add_bias_max_avx512(x, n, bias, scale);
    if (avx2) return add_bias_max_avx2(x, n, bias, scale);
  }
#endif
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int j = 0; j < n; ++j) {
    if (scale != acc_t(1)) x[j] *= scale;
    if (bias) x[j] += bias[j];
    m = std::max(m, x[j]);
  }
  return m;
}

template <typename acc_t>
acc_t exp2_sum(acc_t* x, int n, acc_t m) {
#if FASTATTN_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    static const bool avx512 = cpu_has_avx512(), avx2 = cpu_has_avx2_fma();
    if (avx512) return exp2_sum_avx512(x, n, m);
    if (avx2) return exp2_sum_avx2(x, n, m);
  }
#endif
  acc_t s = 0;
  for (int j = 0; j < n; ++j) {
    x[j] = std::exp2(x[j] - m);
    s += x[j];
  }
  return s;
}

template <typename acc_t>
void scale_bias_exp2(acc_t* x, int n, acc_t c, const acc_t* bias, acc_t m) {
#if FASTATTN_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    static const bool avx512 = cpu_has_avx512(), avx2 = cpu_has_avx2_fma();
    if (avx512) return scale_bias_exp2_avx512(x, n, c, bias, m);
    if (avx2) return scale_bias_exp2_avx2(x, n, c, bias, m);
  }
#endif
  for (int j = 0; j < n; ++j) x[j] = std::exp2(x[j] * c - m + (bias ? bias[j] : acc_t(0)));
}

}  // namespace cpu
}  // namespace fastattn

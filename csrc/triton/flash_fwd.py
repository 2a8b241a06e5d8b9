"""Forward flash-attention kernel: out = softmax(q kᵀ · scale + mask) v, and the row log-sum-exp.

One program computes BLOCK_M query rows of one (batch, q head): it streams the
key/value blocks through an online softmax in the log2 domain (``exp2``, scale
folded into ``qk_scale``), so nothing of size N x N is stored. The lse it writes
(natural log, fp32) is all the backward needs to recompute the probabilities.

Layout-agnostic: every tensor comes with its strides (any strides, stride 0
for broadcast); dense calls index (batch, head, row, col), varlen calls
(IS_VARLEN) read each sequence's start and length from cu_seqlens and index
packed rows with a zero batch stride. GQA/MQA read K/V head ``h // group``.
Head dims are padded to BLOCK_D (a power of two >= 16) by masked loads.
"""
import triton
import triton.language as tl

from .dropout import dropout_keep_tile
from .tiles import band_key_range, cast, diagonal_offset, in_bounds, mma, ordered, visible_key_range, visible_scores

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
# Integer arguments that change from call to call: Triton would otherwise specialise (and
# recompile) on "equals 1" / "divisible by 16", e.g. for one dropout seed in sixteen.
# Strides and head dims stay specialised (contiguity and alignment make faster loads).
RUNTIME_VALUES = ["seed", "rng_offset", "drop_threshold", "dense_seqlen_q", "dense_seqlen_k", "seqlen_bucket",
                  "window_left", "window_right"]


@triton.jit
def sequence_bounds(CuSeqlens, off_b, dense_len, IS_VARLEN: tl.constexpr):
    """(start row in the packed tensor, length) of sequence ``off_b``; (0, dense_len) for dense inputs."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + off_b).to(tl.int64)
        length = (tl.load(CuSeqlens + off_b + 1) - tl.load(CuSeqlens + off_b)).to(tl.int32)
    else:
        start = tl.zeros((), dtype=tl.int64)
        length = dense_len + tl.zeros((), dtype=tl.int32)
    return start, length


@triton.jit
def _fwd_key_block(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, rows, offs_n, offs_d, offs_dv,
                   seqlen_q, seqlen_k, head_dim, head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd,
                   stride_mm, stride_mn, qk_scale, seed, rng_offset, segment, drop_threshold, drop_scale,
                   offset, window_left, window_right, softcap_scale, alibi_slope,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, EDGE: tl.constexpr):
    """One step of the online softmax: key block ``start_n`` folded into (acc, l_i, m_i).

    EDGE=False: the block is wholly inside the key sequence and inside the causal /
    window band for every row, so loads need no key bound and scores no band select.
    """
    cols = start_n + offs_n
    k_ok = in_bounds(cols[None, :], seqlen_k, offs_d[:, None], head_dim, EDGE)
    v_ok = in_bounds(cols[:, None], seqlen_k, offs_dv[None, :], head_dim_v, EDGE)
    kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=k_ok, other=0.0)  # (D, N)
    qk = mma(q, kt, INPUT_PRECISION, EMULATE_BF16)
    s = visible_scores(qk, rows[:, None], cols[None, :], seqlen_q, seqlen_k, mask_base, stride_mm, stride_mn,
                       qk_scale, offset, window_left, window_right, softcap_scale, alibi_slope,
                       HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, MASK_ROW, EDGE)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DROPOUT:  # the normaliser l_i counts every probability; only the output is dropped
        keep = dropout_keep_tile(seed, rng_offset, segment, rows, start_n, drop_threshold, offs_n.shape[0])
        p = tl.where(keep, p * drop_scale, 0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd, mask=v_ok, other=0.0)  # (N, Dv)
    p = cast(p, v.dtype, EMULATE_BF16)  # P·V on the tensor cores in the input dtype, fp32 accumulator
    acc = acc * alpha[:, None] + mma(p, v, INPUT_PRECISION, EMULATE_BF16)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=RUNTIME_VALUES)
def _attn_fwd(Q, K, V, Out, Lse, Mask, CuSeqlensQ, CuSeqlensK, Alibi, Sinks,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_on, stride_od,
              stride_lb, stride_lh, stride_ln,
              stride_mb, stride_mh, stride_mm, stride_mn,
              num_heads_q, group, dense_seqlen_q, dense_seqlen_k, head_dim, head_dim_v,
              qk_scale, seed, rng_offset, drop_threshold, drop_scale,
              window_left, window_right, softcap_scale, alibi_batch_stride,
              seqlen_bucket,  # only an autotuning key
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              ALIBI: tl.constexpr, SINKS: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
              IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(max_seqlen_q, BLOCK_M), B * Hq).

    Q (B, Hq, Nq, D) or packed (total_q, Hq, D); K, V likewise with Hkv heads;
    Out like Q with Dv; Lse (B, Hq, Nq) or (Hq, total_q) fp32; Mask (B, Hq, Nq, Nk)
    with stride-0 broadcast dims (uint8 for bool); qk_scale = scale * log2(e) (scale / softcap
    with SOFTCAP, softcap_scale = softcap * log2(e)). Variants (tiles.py): the band
    (HAS_LEFT / HAS_RIGHT, window_left / window_right, BOTTOM_RIGHT), ALiBi slopes fp32
    (B|1, Hq) with alibi_batch_stride, Sinks fp32 (Hq,) starting every row's max and sum.
    """
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64: batch/head offsets can pass 2**31 elements
    off_b = pid_bh // num_heads_q
    off_h = pid_bh % num_heads_q
    off_hk = off_h // group
    q_start, seqlen_q = sequence_bounds(CuSeqlensQ, off_b, dense_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CuSeqlensK, off_b, dense_seqlen_k, IS_VARLEN)

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)  # query positions inside the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + (q_start + rows)[:, None] * stride_qn
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=(rows[:, None] < seqlen_q) & (offs_d[None, :] < head_dim), other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    segment = off_b * num_heads_q + off_h  # dropout counter word 2

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(s - m_i)
    if SINKS:  # a first key of logit sinks[h] and value zero: the max and the sum start from it
        sink = tl.load(Sinks + off_h).to(tl.float32) * LOG2E
        m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + sink
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)  # a sink of -inf is no sink
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    alibi_slope = 0.0
    if ALIBI:
        alibi_slope = tl.load(Alibi + off_b * alibi_batch_stride + off_h).to(tl.float32) * LOG2E

    # Key blocks outside the band of these rows (right of the diagonal, left of the window) are never visited.
    offset = diagonal_offset(seqlen_q, seqlen_k, BOTTOM_RIGHT)
    lo, interior_lo, interior_hi, hi = band_key_range(start_m, seqlen_k, offset, window_left, window_right,
                                                      HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    hi = tl.where(start_m < seqlen_q, hi, 0)  # programs past a short varlen sequence do nothing
    if MASK_ROW:  # key-padding style mask: only the blocks from the first to the last visible key
        key_lo, key_hi = visible_key_range(mask_base, seqlen_k, stride_mn, MASK_KIND, BLOCK_N)
        lo = tl.maximum(lo, key_lo)
        hi = tl.minimum(hi, key_hi)
    # Key blocks [interior_lo, interior_hi) are whole and inside the band for all BLOCK_M rows: the
    # fast path. The rest (the window's left edge, the diagonal, a partial last block) test each element.
    interior_lo, interior_hi = ordered(lo, interior_lo, interior_hi, hi)
    for phase in tl.static_range(3):  # [lo, interior_lo) edge, then the fast path, then [interior_hi, hi) edge
        if phase == 0:
            pass_lo, pass_hi = lo, interior_lo
        elif phase == 1:
            pass_lo, pass_hi = interior_lo, interior_hi
        else:
            pass_lo, pass_hi = interior_hi, hi
        for start_n in range(pass_lo, pass_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, rows, offs_n,
                                           offs_d, offs_dv, seqlen_q, seqlen_k, head_dim, head_dim_v,
                                           stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                                           qk_scale, seed, rng_offset, segment, drop_threshold, drop_scale,
                                           offset, window_left, window_right, softcap_scale, alibi_slope,
                                           HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, MASK_ROW, DROPOUT,
                                           INPUT_PRECISION, EMULATE_BF16, EDGE=phase != 1)

    empty = l_i == 0.0  # no visible key (and no sink): output 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    row_ok = rows < seqlen_q
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + (q_start + rows)[:, None] * stride_on
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + (q_start + rows) * stride_ln, lse, mask=row_ok)

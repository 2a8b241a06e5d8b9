"""Backward flash-attention kernels: preprocess, dK/dV, dQ (FlashAttention-2's split).

With P = softmax(S) recomputed from the saved lse, Pd = dropout(P) and
delta_i = rowsum(dO_i ∘ O_i):
    dV = Pdᵀ dO        dP = dropout(dO Vᵀ)        dS = P ∘ (dP - delta) (∘ (1 - tanh²) under a soft-cap)
    dK = scale · dSᵀ Q            dQ = scale · dS K
Windows and the causal band skip the blocks outside them as the forward does (tiles.py).
Two kernels, each owning its output so nothing needs atomics and the result is
deterministic: ``_attn_bwd_dkdv`` (one program per key block and K/V head, looping
over the q heads of its GQA group and over the query blocks) and ``_attn_bwd_dq``
(one program per query block and q head, looping over key blocks). Both
recompute q·kᵀ; that is the price of no atomics (FA2/Triton-tutorial style).
"""
import triton
import triton.language as tl

from .dropout import dropout_keep_tile
from .flash_fwd import RUNTIME_VALUES, sequence_bounds
from .tiles import (band_key_range, band_query_range, cast, diagonal_offset, in_bounds, key_block_visible, mma,
                    ordered, softcap_grad, visible_key_range, visible_scores)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _attn_bwd_preprocess(Out, GradOut, Delta, CuSeqlensQ,
                         stride_ob, stride_oh, stride_on, stride_od,
                         stride_gb, stride_gh, stride_gn, stride_gd,
                         stride_lb, stride_lh, stride_ln,
                         num_heads_q, dense_seqlen_q, head_dim_v,
                         IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO ∘ O) in fp32, laid out like lse. Grid (cdiv(max_seqlen_q, BLOCK_M), B * Hq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads_q
    off_h = pid_bh % num_heads_q
    q_start, seqlen_q = sequence_bounds(CuSeqlensQ, off_b, dense_seqlen_q, IS_VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < seqlen_q) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + (q_start + rows)[:, None] * stride_on
                + offs_dv[None, :] * stride_od, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(GradOut + off_b * stride_gb + off_h * stride_gh + (q_start + rows)[:, None] * stride_gn
                 + offs_dv[None, :] * stride_gd, mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + off_b * stride_lb + off_h * stride_lh + (q_start + rows) * stride_ln, tl.sum(o * do, axis=1),
             mask=rows < seqlen_q)


@triton.jit
def _row_stats(Lse, Delta, lse_off, rows, seqlen_q, stride_ln):
    """lse in the log2 domain (0 where the row sees nothing, so exp2(-inf - 0) = 0) and delta of ``rows``."""
    ok = rows < seqlen_q
    lse = tl.load(Lse + lse_off + rows * stride_ln, mask=ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    delta = tl.load(Delta + lse_off + rows * stride_ln, mask=ok, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_query_block(dk, dv, k, v, q_base, do_base, Lse, Delta, lse_off, mask_base, start_m, cols_start, cols,
                      offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, head_dim, head_dim_v, stride_qn, stride_qd,
                      stride_gn, stride_gd, stride_ln, stride_mm, stride_mn, qk_scale, seed, rng_offset, segment,
                      drop_threshold, drop_scale, offset, window_left, window_right, softcap_scale, alibi_slope,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                      MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, EDGE: tl.constexpr):
    """Query block ``start_m``'s share of dK and dV of this key block.

    Works on the transposed tile (keys x queries) as Triton's tutorial does: every product
    then takes its operands as loaded (tl.trans of a loaded tile is a free view of shared
    memory), where the (queries x keys) form would transpose P and dS in registers.
    EDGE=False: every row of the block is in range and sees every key of the block (the band).
    """
    rows = start_m + offs_m
    qt_ok = in_bounds(rows[None, :], seqlen_q, offs_d[:, None], head_dim, EDGE)
    do_ok = in_bounds(rows[:, None], seqlen_q, offs_dv[None, :], head_dim_v, EDGE)
    qt = tl.load(q_base + rows[None, :] * stride_qn + offs_d[:, None] * stride_qd, mask=qt_ok, other=0.0)  # (D, M)
    do = tl.load(do_base + rows[:, None] * stride_gn + offs_dv[None, :] * stride_gd, mask=do_ok, other=0.0)  # (M, Dv)
    lse2, delta = _row_stats(Lse, Delta, lse_off, rows, seqlen_q, stride_ln)
    qkt = mma(k, qt, INPUT_PRECISION, EMULATE_BF16)  # (N, M)
    st = visible_scores(qkt, rows[None, :], cols[:, None], seqlen_q, seqlen_k, mask_base, stride_mm, stride_mn,
                        qk_scale, offset, window_left, window_right, softcap_scale, alibi_slope,
                        HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, MASK_ROW, EDGE)
    pt = tl.math.exp2(st - lse2[None, :])  # (N, M) probabilities, transposed
    dpt = mma(v, tl.trans(do), INPUT_PRECISION, EMULATE_BF16)  # (N, M) = (dO Vᵀ)ᵀ
    if DROPOUT:
        keep = tl.trans(dropout_keep_tile(seed, rng_offset, segment, rows, cols_start, drop_threshold,
                                          cols.shape[0]))  # (N, M)
        pdt = tl.where(keep, pt * drop_scale, 0.0)
        dpt = tl.where(keep, dpt * drop_scale, 0.0)
    else:
        pdt = pt
    dv += mma(cast(pdt, do.dtype, EMULATE_BF16), do, INPUT_PRECISION, EMULATE_BF16)
    dst = pt * (dpt - delta[None, :]) * softcap_grad(qkt, qk_scale, SOFTCAP)
    dk += mma(cast(dst, qt.dtype, EMULATE_BF16), tl.trans(qt), INPUT_PRECISION, EMULATE_BF16)
    return dk, dv


@triton.jit(do_not_specialize=RUNTIME_VALUES)
def _attn_bwd_dkdv(Q, K, V, GradOut, Lse, Delta, GradK, GradV, Mask, CuSeqlensQ, CuSeqlensK, Alibi,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_gb, stride_gh, stride_gn, stride_gd,
                   stride_lb, stride_lh, stride_ln,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   num_heads_q, num_heads_k, group, dense_seqlen_q, dense_seqlen_k, head_dim, head_dim_v,
                   scale, qk_scale, seed, rng_offset, drop_threshold, drop_scale,
                   window_left, window_right, softcap_scale, alibi_batch_stride,
                   seqlen_bucket,  # only an autotuning key
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                   SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
                   IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one (batch, K/V head). Grid (cdiv(max_seqlen_k, BLOCK_N), B * Hkv).

    Shapes as in _attn_fwd; GradK/GradV like K/V (summed over the q heads of the group in fp32).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads_k
    off_hk = pid_bh % num_heads_k
    q_start, seqlen_q = sequence_bounds(CuSeqlensQ, off_b, dense_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CuSeqlensK, off_b, dense_seqlen_k, IS_VARLEN)

    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)  # key positions inside the sequence
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < seqlen_k
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + (k_start + cols)[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=col_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + (k_start + cols)[:, None] * stride_vn
                + offs_dv[None, :] * stride_vd, mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)

    # Query blocks above the diagonal or below the window never see this key block: not visited.
    # [interior_lo, interior_hi) are whole and see every key of it: the fast path. Before them
    # the diagonal blocks, after them the window's edge and a partial last block. Keys past
    # seqlen_k need no test: their dK/dV rows are never stored.
    offset = diagonal_offset(seqlen_q, seqlen_k, BOTTOM_RIGHT)
    lo, interior_lo, interior_hi, hi = band_query_range(start_n, seqlen_q, offset, window_left, window_right,
                                                        HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    hi = tl.where(start_n < seqlen_k, hi, 0)
    interior_lo, interior_hi = ordered(lo, interior_lo, interior_hi, hi)
    for g in range(0, group):  # the q heads sharing this K/V head (GQA); no atomics
        off_h = off_hk * group + g
        mask_base = Mask + off_b * stride_mb + off_h * stride_mh
        alibi_slope = 0.0
        if ALIBI:
            alibi_slope = tl.load(Alibi + off_b * alibi_batch_stride + off_h).to(tl.float32) * LOG2E
        visit = True
        if MASK_ROW:  # a fully masked key block contributes nothing for this head
            visit = key_block_visible(mask_base, cols, seqlen_k, stride_mn, MASK_KIND)
        if visit:
            segment = off_b * num_heads_q + off_h
            q_base = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qn
            do_base = GradOut + off_b * stride_gb + off_h * stride_gh + q_start * stride_gn
            lse_off = off_b * stride_lb + off_h * stride_lh + q_start * stride_ln
            # pass 0: diagonal blocks [lo, interior_lo); pass 1: fast path; pass 2: window edge, partial last block
            for phase in tl.static_range(3):
                if phase == 0:
                    pass_lo, pass_hi = lo, interior_lo
                elif phase == 1:
                    pass_lo, pass_hi = interior_lo, interior_hi
                else:
                    pass_lo, pass_hi = interior_hi, hi
                for start_m in range(pass_lo, pass_hi, BLOCK_M):
                    dk, dv = _dkdv_query_block(dk, dv, k, v, q_base, do_base, Lse, Delta, lse_off, mask_base,
                                               start_m, start_n, cols, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k,
                                               head_dim, head_dim_v, stride_qn, stride_qd, stride_gn, stride_gd,
                                               stride_ln, stride_mm, stride_mn, qk_scale, seed, rng_offset, segment,
                                               drop_threshold, drop_scale, offset, window_left, window_right,
                                               softcap_scale, alibi_slope, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
                                               MASK_KIND, MASK_ROW, DROPOUT, INPUT_PRECISION, EMULATE_BF16,
                                               EDGE=phase != 1)

    dk = dk * scale
    tl.store(GradK + off_b * stride_dkb + off_hk * stride_dkh + (k_start + cols)[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, cast(dk, GradK.dtype.element_ty, EMULATE_BF16),
             mask=col_ok[:, None] & (offs_d[None, :] < head_dim))
    tl.store(GradV + off_b * stride_dvb + off_hk * stride_dvh + (k_start + cols)[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, cast(dv, GradV.dtype.element_ty, EMULATE_BF16),
             mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v))


@triton.jit
def _dq_key_block(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, rows, offs_n, offs_d, offs_dv,
                  seqlen_q, seqlen_k, head_dim, head_dim_v, stride_kn, stride_kd, stride_vn, stride_vd,
                  stride_mm, stride_mn, qk_scale, seed, rng_offset, segment, drop_threshold, drop_scale,
                  offset, window_left, window_right, softcap_scale, alibi_slope,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, DROPOUT: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, EDGE: tl.constexpr):
    """Key block ``start_n``'s share of dQ. EDGE=False: whole block, inside the band for every row."""
    cols = start_n + offs_n
    k_ok = in_bounds(cols[:, None], seqlen_k, offs_d[None, :], head_dim, EDGE)
    vt_ok = in_bounds(cols[None, :], seqlen_k, offs_dv[:, None], head_dim_v, EDGE)
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=k_ok, other=0.0)  # (N, D)
    vt = tl.load(v_base + cols[None, :] * stride_vn + offs_dv[:, None] * stride_vd, mask=vt_ok, other=0.0)  # (Dv, N)
    qk = mma(q, tl.trans(k), INPUT_PRECISION, EMULATE_BF16)
    s = visible_scores(qk, rows[:, None], cols[None, :], seqlen_q, seqlen_k, mask_base, stride_mm, stride_mn,
                       qk_scale, offset, window_left, window_right, softcap_scale, alibi_slope,
                       HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, MASK_ROW, EDGE)
    p = tl.math.exp2(s - lse2[:, None])
    dp = mma(do, vt, INPUT_PRECISION, EMULATE_BF16)
    if DROPOUT:
        keep = dropout_keep_tile(seed, rng_offset, segment, rows, start_n, drop_threshold, offs_n.shape[0])
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None]) * softcap_grad(qk, qk_scale, SOFTCAP)
    return dq + mma(cast(ds, k.dtype, EMULATE_BF16), k, INPUT_PRECISION, EMULATE_BF16)


@triton.jit(do_not_specialize=RUNTIME_VALUES)
def _attn_bwd_dq(Q, K, V, GradOut, Lse, Delta, GradQ, Mask, CuSeqlensQ, CuSeqlensK, Alibi,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_gb, stride_gh, stride_gn, stride_gd,
                 stride_lb, stride_lh, stride_ln,
                 stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                 stride_mb, stride_mh, stride_mm, stride_mn,
                 num_heads_q, group, dense_seqlen_q, dense_seqlen_k, head_dim, head_dim_v,
                 scale, qk_scale, seed, rng_offset, drop_threshold, drop_scale,
                 window_left, window_right, softcap_scale, alibi_batch_stride,
                 seqlen_bucket,  # only an autotuning key
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr,
                 IS_VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block of one (batch, q head). Grid (cdiv(max_seqlen_q, BLOCK_M), B * Hq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads_q
    off_h = pid_bh % num_heads_q
    off_hk = off_h // group
    q_start, seqlen_q = sequence_bounds(CuSeqlensQ, off_b, dense_seqlen_q, IS_VARLEN)
    k_start, seqlen_k = sequence_bounds(CuSeqlensK, off_b, dense_seqlen_k, IS_VARLEN)

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + (q_start + rows)[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    do = tl.load(GradOut + off_b * stride_gb + off_h * stride_gh + (q_start + rows)[:, None] * stride_gn
                 + offs_dv[None, :] * stride_gd, mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    lse2, delta = _row_stats(Lse, Delta, off_b * stride_lb + off_h * stride_lh + q_start * stride_ln, rows,
                             seqlen_q, stride_ln)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    segment = off_b * num_heads_q + off_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    alibi_slope = 0.0
    if ALIBI:
        alibi_slope = tl.load(Alibi + off_b * alibi_batch_stride + off_h).to(tl.float32) * LOG2E

    offset = diagonal_offset(seqlen_q, seqlen_k, BOTTOM_RIGHT)  # as in the forward: the band's key blocks only
    lo, interior_lo, interior_hi, hi = band_key_range(start_m, seqlen_k, offset, window_left, window_right,
                                                      HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    hi = tl.where(start_m < seqlen_q, hi, 0)
    if MASK_ROW:  # as in the forward: only the blocks from the first to the last visible key
        key_lo, key_hi = visible_key_range(mask_base, seqlen_k, stride_mn, MASK_KIND, BLOCK_N)
        lo = tl.maximum(lo, key_lo)
        hi = tl.minimum(hi, key_hi)
    interior_lo, interior_hi = ordered(lo, interior_lo, interior_hi, hi)
    for phase in tl.static_range(3):  # as in the forward: edge, fast path, edge
        if phase == 0:
            pass_lo, pass_hi = lo, interior_lo
        elif phase == 1:
            pass_lo, pass_hi = interior_lo, interior_hi
        else:
            pass_lo, pass_hi = interior_hi, hi
        for start_n in range(pass_lo, pass_hi, BLOCK_N):
            dq = _dq_key_block(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, rows, offs_n, offs_d,
                               offs_dv, seqlen_q, seqlen_k, head_dim, head_dim_v, stride_kn, stride_kd, stride_vn,
                               stride_vd, stride_mm, stride_mn, qk_scale, seed, rng_offset, segment, drop_threshold,
                               drop_scale, offset, window_left, window_right, softcap_scale, alibi_slope,
                               HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, MASK_ROW, DROPOUT, INPUT_PRECISION,
                               EMULATE_BF16, EDGE=phase != 1)

    dq = dq * scale
    tl.store(GradQ + off_b * stride_dqb + off_h * stride_dqh + (q_start + rows)[:, None] * stride_dqn
             + offs_d[None, :] * stride_dqd, cast(dq, GradQ.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & (offs_d[None, :] < head_dim))

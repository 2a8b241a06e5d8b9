"""The logits tile shared by the forward and backward kernels, and the band of visible keys.

Scores live in the log2 domain: ``s = (q kᵀ) * scale * log2(e) + mask * log2(e)``
so that the softmax uses ``exp2`` (one MUFU instruction on NVIDIA GPUs) with the
scale folded into one multiply. Invisible entries (out of range, outside the causal /
sliding-window band, bool mask False, float mask -inf) are -inf.

The band: query row i's diagonal is key d(i) = i + offset (offset 0 top-left, Nk - Nq
bottom-right); it sees keys d(i) - window_left <= j <= d(i) + window_right, each side
only when HAS_LEFT / HAS_RIGHT (causal is HAS_RIGHT with window_right = 0). With a
soft-cap the logit is softcap * tanh(scale q·k / softcap), and ALiBi subtracts
slope * |d(i) - j|; both before the mask, as fastattn.reference defines them.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): converts a log2-domain lse back to natural log

# MASK_KIND values
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)  # uint8 view of a bool mask, nonzero = may attend
MASK_FLOAT = tl.constexpr(2)  # added to the logits


@triton.jit
def load_mask_tile(mask_ptr, q_pos, k_pos, seqlen_q, seqlen_k, stride_mm, stride_mn,
                   MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr):
    """The mask in the log2 domain: 0 / -inf for bool masks, value*LOG2E for float.

    mask_ptr already points at this (batch, head)'s mask. q_pos / k_pos: query and key
    positions as broadcastable 2-D tensors, (M, 1) and (1, N) for a (M, N) tile or
    (1, M) and (N, 1) for a transposed one. MASK_ROW: the mask does not depend on the
    query (stride_mm == 0, e.g. a key-padding mask (B, 1, 1, Nk)), so only k_pos's
    shape is read and returned (the caller's add broadcasts it).
    """
    if MASK_ROW:
        ptrs = mask_ptr + k_pos * stride_mn
        inb = k_pos < seqlen_k
    else:
        ptrs = mask_ptr + q_pos * stride_mm + k_pos * stride_mn
        inb = (q_pos < seqlen_q) & (k_pos < seqlen_k)
    if MASK_KIND == 1:
        m = tl.load(ptrs, mask=inb, other=0)
        return tl.where(m != 0, 0.0, float("-inf"))
    else:
        return tl.load(ptrs, mask=inb, other=float("-inf")).to(tl.float32) * LOG2E


@triton.jit
def key_block_visible(mask_ptr, cols, seqlen_k, stride_mn, MASK_KIND: tl.constexpr):
    """For a query-independent mask (MASK_ROW): does any key of this block stay visible?

    Lets the dK/dV kernel skip a fully masked key block (e.g. padding) without its matmuls.
    """
    inb = cols < seqlen_k
    if MASK_KIND == 1:
        m = tl.load(mask_ptr + cols * stride_mn, mask=inb, other=0)
        return tl.max((m != 0).to(tl.int32), axis=0) > 0
    else:
        m = tl.load(mask_ptr + cols * stride_mn, mask=inb, other=float("-inf")).to(tl.float32)
        return tl.max(m, axis=0) > float("-inf")


@triton.jit
def in_bounds(pos, seqlen, offs, dim, EDGE: tl.constexpr):
    """Load mask of a (rows x head dim) tile, either orientation: ``offs < dim`` (the head dim
    padded to a power of two), and ``pos < seqlen`` only on EDGE tiles (interior tiles are
    whole). pos and offs are broadcastable 2-D, e.g. (1, N) keys and (D, 1) head dims."""
    ok = offs < dim
    if EDGE:
        ok = ok & (pos < seqlen)
    return ok


@triton.jit
def visible_key_range(mask_ptr, seqlen_k, stride_mn, MASK_KIND: tl.constexpr, BLOCK_N: tl.constexpr):
    """For a query-independent mask (MASK_ROW): (lo, hi) with every visible key in [lo, hi).

    lo is a multiple of BLOCK_N, so the kernels' key loops start on the first block with a
    visible key and stop after the last: the hidden blocks of key padding (at the end, or
    at the start with left padding) are never loaded nor multiplied. A pass over one mask
    row before the main loop, rather than a test per block inside it, because a branch in
    the loop body stops Triton from software-pipelining the K/V loads. hi <= lo when no
    key is visible.
    """
    first = seqlen_k + tl.zeros((), dtype=tl.int32)
    last = tl.full((), -1, dtype=tl.int32)
    for start in range(0, seqlen_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inb = cols < seqlen_k
        if MASK_KIND == 1:
            visible = (tl.load(mask_ptr + cols * stride_mn, mask=inb, other=0) != 0) & inb
        else:
            visible = tl.load(mask_ptr + cols * stride_mn, mask=inb, other=float("-inf")).to(tl.float32) > float("-inf")
        first = tl.minimum(first, tl.min(tl.where(visible, cols, seqlen_k), axis=0))
        last = tl.maximum(last, tl.max(tl.where(visible, cols, -1), axis=0))
    return (first // BLOCK_N) * BLOCK_N, last + 1


@triton.jit
def tanh(x):
    """tanh in fp32: a [13/6] rational approximation on [-7.9, 7.9] (tanh is 1 to fp32 precision
    outside), within 4e-7 everywhere, as the CPU kernel's (1 - 2 / (e^2x + 1) loses the relative
    accuracy near 0 that a soft-capped logit needs); only FMAs and a division."""
    x = tl.minimum(tl.maximum(x, -7.90531110763549805), 7.90531110763549805)
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = p * x2 + -8.60467152213735e-11
    p = p * x2 + 5.12229709037114e-08
    p = p * x2 + 1.48572235717979e-05
    p = p * x2 + 6.37261928875436e-04
    p = p * x2 + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = q * x2 + 2.26843463243900e-03
    q = q * x2 + 4.89352518554385e-03
    return p * x / q


@triton.jit
def diagonal_offset(seqlen_q, seqlen_k, BOTTOM_RIGHT: tl.constexpr):
    """d(i) - i: Nk - Nq aligned bottom-right (flash-attn), 0 top-left (torch's is_causal)."""
    if BOTTOM_RIGHT:
        return seqlen_k - seqlen_q
    else:
        return seqlen_k * 0


@triton.jit
def band_key_range(start_m, seqlen_k, offset, window_left, window_right, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key bounds for the query rows [start_m, start_m + BLOCK_M): (lo, interior_lo, interior_hi, hi).

    Every key those rows see lies in [lo, hi) (lo a multiple of BLOCK_N); the whole key blocks in
    [interior_lo, interior_hi) are seen entirely by every row (the fast path: no per-element
    band test). The caller clamps them into order (lo <= interior_lo <= interior_hi <= hi).
    """
    d_first = start_m + offset
    d_last = start_m + BLOCK_M - 1 + offset
    lo = seqlen_k * 0
    interior_lo = lo
    hi = seqlen_k
    interior_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(d_first - window_left, 0) // BLOCK_N) * BLOCK_N
        interior_lo = tl.cdiv(tl.maximum(d_last - window_left, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(d_last + window_right + 1, 0), seqlen_k)
        interior_hi = tl.minimum(interior_hi, (tl.maximum(d_first + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    return lo, interior_lo, interior_hi, hi


@triton.jit
def band_query_range(start_n, seqlen_q, offset, window_left, window_right, HAS_LEFT: tl.constexpr,
                     HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query bounds for the keys [start_n, start_n + BLOCK_N): (lo, interior_lo, interior_hi, hi).

    The rows that see any of those keys lie in [lo, hi) (lo a multiple of BLOCK_M); the whole
    query blocks in [interior_lo, interior_hi) see all of them (the fast path). Row i sees key j
    iff j <= i + offset + window_right (rows from j - offset - window_right on) and
    j >= i + offset - window_left (rows up to j - offset + window_left).
    """
    lo = seqlen_q * 0
    interior_lo = lo
    hi = seqlen_q
    interior_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = (tl.maximum(start_n - offset - window_right, 0) // BLOCK_M) * BLOCK_M
        interior_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset - window_right, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - offset + window_left, 0), seqlen_q)
        interior_hi = tl.minimum(interior_hi, (tl.maximum(start_n - offset + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    return lo, interior_lo, interior_hi, hi


@triton.jit
def ordered(lo, interior_lo, interior_hi, hi):
    """The bounds clamped into lo <= interior_lo <= interior_hi <= hi (empty passes where they cross)."""
    interior_lo = tl.minimum(tl.maximum(interior_lo, lo), hi)
    interior_hi = tl.minimum(tl.maximum(interior_hi, interior_lo), hi)
    return interior_lo, interior_hi


@triton.jit
def visible_scores(qk, q_pos, k_pos, seqlen_q, seqlen_k, mask_ptr, stride_mm, stride_mn, qk_scale,
                   offset, window_left, window_right, softcap_scale, alibi_slope,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, EDGE: tl.constexpr):
    """log2-domain logits of a tile; -inf where query ``q_pos`` cannot see key ``k_pos``.

    qk: fp32 q·kᵀ (or its transpose, with q_pos (1, M) and k_pos (N, 1)); qk_scale =
    scale * LOG2E, or scale / softcap with SOFTCAP (then softcap_scale = softcap * LOG2E);
    alibi_slope: the head's slope * LOG2E. EDGE=False is the interior fast path: the
    caller guarantees the tile lies inside both sequences and wholly inside the band, so
    only the soft-cap, ALiBi and the mask are applied: no compares or selects per element,
    which is most tiles of a long sequence.
    """
    if SOFTCAP:
        s = tanh(qk * qk_scale) * softcap_scale
    else:
        s = qk * qk_scale
    if ALIBI:
        s = s - alibi_slope * tl.abs(q_pos + offset - k_pos).to(tl.float32)
    if MASK_KIND != 0:
        s = s + load_mask_tile(mask_ptr, q_pos, k_pos, seqlen_q, seqlen_k, stride_mm, stride_mn, MASK_KIND, MASK_ROW)
    if EDGE:
        visible = (k_pos < seqlen_k) & (q_pos < seqlen_q)
        if HAS_RIGHT:
            visible = visible & (k_pos <= q_pos + offset + window_right)
        if HAS_LEFT:
            visible = visible & (k_pos >= q_pos + offset - window_left)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def softcap_grad(qk, qk_scale, SOFTCAP: tl.constexpr):
    """d logit / d (scale q·k): 1 - tanh² under a soft-cap (qk_scale = scale / softcap), else 1."""
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        return 1.0 - t * t
    else:
        return 1.0


@triton.jit
def mma(a, b, INPUT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """a @ b accumulated in fp32.

    EMULATE_BF16: multiply exact fp32 copies instead (set only under the interpreter for
    bfloat16, whose tl.dot there reads bf16 bits as integers in Triton 3.9). The
    operands were already rounded to bf16 (by ``cast``), so the products are the GPU's.
    """
    if EMULATE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even.

    EMULATE_BF16 (only under the interpreter): its fp32 -> bf16 cast truncates, so round
    the fp32 bits to the nearest even bf16 first (the GPU's cvt.rn does this itself).
    """
    if EMULATE_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)

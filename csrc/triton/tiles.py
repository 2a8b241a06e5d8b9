"""The logits tile shared by the forward and backward kernels.

Scores live in the log2 domain: ``s = (q kᵀ) * scale * log2(e) + mask * log2(e)``
so that the softmax uses ``exp2`` (one MUFU instruction on NVIDIA GPUs) with the
scale folded into one multiply. Invisible entries (out of range, causal, bool
mask False, float mask -inf) are -inf.
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
def visible_scores(qk, q_pos, k_pos, seqlen_q, seqlen_k, mask_ptr, stride_mm, stride_mn, qk_scale,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, EDGE: tl.constexpr):
    """log2-domain logits of a tile; -inf where query ``q_pos`` cannot see key ``k_pos``.

    qk: fp32 q·kᵀ (or its transpose, with q_pos (1, M) and k_pos (N, 1)); qk_scale =
    scale * LOG2E. causal is top-left aligned (key j <= query i). EDGE=False is the
    interior fast path: the caller guarantees the tile lies inside both sequences and
    (causal) wholly left of the diagonal, so only the mask is applied: no compares or
    selects per element, which is most tiles of a long sequence.
    """
    s = qk * qk_scale
    if MASK_KIND != 0:
        s = s + load_mask_tile(mask_ptr, q_pos, k_pos, seqlen_q, seqlen_k, stride_mm, stride_mn, MASK_KIND, MASK_ROW)
    if EDGE:
        visible = (k_pos < seqlen_k) & (q_pos < seqlen_q)
        if CAUSAL:
            visible = visible & (k_pos <= q_pos)
        s = tl.where(visible, s, float("-inf"))
    return s


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

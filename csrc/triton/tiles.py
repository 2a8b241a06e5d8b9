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
def load_mask_tile(mask_ptr, rows, cols, seqlen_q, seqlen_k, stride_mm, stride_mn,
                   MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask tile in the log2 domain: 0 / -inf for bool masks, value*LOG2E for float.

    mask_ptr already points at this (batch, head)'s mask. MASK_ROW: the mask does not
    depend on the query (stride_mm == 0, e.g. a key-padding mask (B, 1, 1, Nk)), so
    one (BLOCK_N,) row is read per key block instead of a whole tile.
    """
    if MASK_ROW:
        ptrs = mask_ptr + cols * stride_mn
        inb = cols < seqlen_k
        if MASK_KIND == 1:
            m = tl.load(ptrs, mask=inb, other=0)
            row = tl.where(m != 0, 0.0, float("-inf"))
        else:
            row = tl.load(ptrs, mask=inb, other=float("-inf")).to(tl.float32) * LOG2E
        return row[None, :] + tl.zeros((rows.shape[0], 1), dtype=tl.float32)
    else:
        ptrs = mask_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mn
        inb = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
        if MASK_KIND == 1:
            m = tl.load(ptrs, mask=inb, other=0)
            return tl.where(m != 0, 0.0, float("-inf"))
        else:
            return tl.load(ptrs, mask=inb, other=float("-inf")).to(tl.float32) * LOG2E


@triton.jit
def key_block_visible(mask_ptr, cols, seqlen_k, stride_mn, MASK_KIND: tl.constexpr):
    """For a query-independent mask (MASK_ROW): does any key of this block stay visible?

    Lets the kernels skip a fully masked key block (e.g. padding) without its matmuls.
    """
    inb = cols < seqlen_k
    if MASK_KIND == 1:
        m = tl.load(mask_ptr + cols * stride_mn, mask=inb, other=0)
        return tl.max((m != 0).to(tl.int32), axis=0) > 0
    else:
        m = tl.load(mask_ptr + cols * stride_mn, mask=inb, other=float("-inf")).to(tl.float32)
        return tl.max(m, axis=0) > float("-inf")


@triton.jit
def visible_scores(qk, rows, cols, seqlen_q, seqlen_k, mask_ptr, stride_mm, stride_mn, qk_scale,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr):
    """log2-domain logits of a (BLOCK_M, BLOCK_N) tile; -inf where query ``rows`` cannot see key ``cols``.

    qk: fp32 q·kᵀ; qk_scale = scale * LOG2E. causal is top-left aligned (key j <= query i).
    """
    s = qk * qk_scale
    visible = (cols[None, :] < seqlen_k) & (rows[:, None] < seqlen_q)
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None])
    if MASK_KIND != 0:
        s = s + load_mask_tile(mask_ptr, rows, cols, seqlen_q, seqlen_k, stride_mm, stride_mn, MASK_KIND, MASK_ROW)
    return tl.where(visible, s, float("-inf"))


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

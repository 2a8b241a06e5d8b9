"""Attention dropout inside the Triton kernels: Philox4x32-10 with fastattn's counters.

The keep/drop decision of probability (segment s, query row i, key column j) is

    words = philox4x32_10(counter=(j >> 2, i, s, offset), key=seed)
    keep  = words[j & 3] >= threshold,   threshold = round(p * 2**32)

exactly as csrc/philox.h (CPU/CUDA kernels) and fastattn.reference.dropout_keep_mask,
so the three can be compared bit for bit. ``tl.philox`` is the same Philox
(rounds, multipliers, key schedule, seed split into (low, high) words). Nothing
is stored: the backward kernels call the same function with the same counters.
Each element draws all four words and keeps one (4x the Philox work of sharing a
draw between four columns, but no cross-lane shuffles; dropout is the rare path).
"""
import triton
import triton.language as tl


@triton.jit
def dropout_keep_tile(seed, offset, segment, rows, cols, threshold):
    """Bool (BLOCK_M, BLOCK_N) tile: True where the element is kept.

    seed: int64 scalar (the Philox key); offset: uint32-range int scalar;
    segment: b * Hq + h; rows (BLOCK_M,) / cols (BLOCK_N,): positions inside the
    sequence; threshold: int64 scalar in [0, 2**32).
    """
    c0 = (cols[None, :] >> 2).to(tl.uint32) + tl.zeros_like(rows[:, None]).to(tl.uint32)  # (M, N)
    c1 = rows[:, None].to(tl.uint32) + tl.zeros_like(cols[None, :]).to(tl.uint32)
    c2 = tl.zeros_like(c0) + segment.to(tl.uint32)
    c3 = tl.zeros_like(c0) + offset.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    lane = (cols & 3)[None, :]
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return word.to(tl.int64) >= threshold


@triton.jit
def _dropout_keep_mask_kernel(Out, seed, offset, threshold, seqlen_q, seqlen_k,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep mask (int8) of segment program_id(2) to contiguous Out (B*H, Nq, Nk): tests/debugging."""
    segment = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep_tile(seed, offset, segment, rows, cols, threshold)
    ok = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    tl.store(Out + segment * seqlen_q * seqlen_k + rows[:, None] * seqlen_k + cols[None, :], keep.to(tl.int8),
             mask=ok)

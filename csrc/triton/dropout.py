"""Attention dropout inside the Triton kernels: Philox4x32-10 with fastattn's counters.

The keep/drop decision of probability (segment s, query row i, key column j) is

    words = philox4x32_10(counter=(j >> 2, i, s, offset), key=seed)
    keep  = words[j & 3] >= threshold,   threshold = round(p * 2**32)

exactly as csrc/philox.h (CPU/CUDA kernels) and fastattn.reference.dropout_keep_mask,
so the three can be compared bit for bit. ``tl.philox`` is the same Philox
(rounds, multipliers, key schedule, seed split into (low, high) words). Nothing
is stored: the backward kernels call the same function with the same counters.
Each Philox call serves four consecutive keys (its four words), interleaved back
into key order with tl.join + tl.reshape.
"""
import triton
import triton.language as tl


@triton.jit
def dropout_keep_tile(seed, offset, segment, rows, start_n, threshold, BLOCK_N: tl.constexpr):
    """Bool (len(rows), BLOCK_N) tile: True where the element (query row, key start_n + j) is kept.

    seed: int64 scalar (the Philox key); offset: uint32-range int scalar; segment:
    b * Hq + h; rows: (BLOCK_M,) query positions inside the sequence; start_n: first key
    of the block, a multiple of 4; threshold: int64 scalar in [0, 2**32). The four keys
    4c..4c+3 share Philox counter c, so each call draws one group of four keys and its
    four words are interleaved back into key order: one Philox per four elements.
    """
    quads = (start_n >> 2) + tl.arange(0, BLOCK_N // 4)  # counter word 0 of each group of four keys
    zeros = tl.zeros((rows.shape[0], BLOCK_N // 4), dtype=tl.uint32)
    c0 = quads[None, :].to(tl.uint32) + zeros
    c1 = rows[:, None].to(tl.uint32) + zeros
    c2 = zeros + segment.to(tl.uint32)
    c3 = zeros + offset.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    # join(join(w0, w2), join(w1, w3))[m, c, i, k] is word 2i + k of group c: flattening
    # (c, i, k) puts word l of group c at key 4c + l
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rows.shape[0], BLOCK_N))
    return words >= threshold.to(tl.uint32)


@triton.jit
def _dropout_keep_mask_kernel(Out, seed, offset, threshold, seqlen_q, seqlen_k,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep mask (int8) of segment program_id(2) to contiguous Out (B*H, Nq, Nk): tests/debugging."""
    segment = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep_tile(seed, offset, segment, rows, tl.program_id(1) * BLOCK_N, threshold, BLOCK_N)
    ok = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    tl.store(Out + segment * seqlen_q * seqlen_k + rows[:, None] * seqlen_k + cols[None, :], keep.to(tl.int8),
             mask=ok)

"""The one plain-PyTorch reference for attention.

Tests, benchmarks and the ``"reference"`` backend all import this file; nothing
else in fastattn writes the attention math out in PyTorch. It materialises the
full ``(B, H, Nq, Nk)`` score matrix, so it is simple and slow, and it runs on
any device and dtype (autograd gives its backward).

The dropout mask is defined here too, as a pure-PyTorch Philox4x32-10, so that
the fused kernels (which regenerate it on the fly) can be checked bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# ---------------------------------------------------------------------------
# Dropout: counter-based random bits (Philox4x32-10, Salmon et al. 2011)
# ---------------------------------------------------------------------------
# Every kernel draws the keep/drop decision of attention probability
# (segment s, query row i, key column j) from the same function:
#     words = philox4x32_10(counter=(j // 4, i, s, offset), key=seed)
#     keep  = words[j % 4] >= dropout_threshold(p)
# where s = batch_index * num_q_heads + q_head, (seed, offset) = rng_state, and
# for varlen inputs i and j are positions inside their own sequence.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
PHILOX_ROUNDS = 10
_U32 = 0xFFFFFFFF


def dropout_threshold(dropout_p: float) -> int:
    """uint32 threshold: a random word below it drops the element (P = dropout_p)."""
    return min(int(math.floor(dropout_p * 4294967296.0 + 0.5)), _U32)  # as csrc/philox.h


def _mulhilo(a: int, b: torch.Tensor):
    prod = b * a  # int64; wraps modulo 2**64, which keeps the bits we need
    return (prod >> 32) & _U32, prod & _U32


def philox4x32(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns 4 words."""
    k0 = seed & _U32
    k1 = (seed >> 32) & _U32
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & _U32
            k1 = (k1 + PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_keep_mask(rng_state: torch.Tensor, dropout_p: float, num_heads: int,
                      seqlen_q: int, seqlen_k: int, *, batch: int = 1,
                      batch_start: int = 0, device=None) -> torch.Tensor:
    """Bool keep-mask of shape ``(batch, num_heads, seqlen_q, seqlen_k)``.

    ``rng_state`` is the int64 ``(seed, offset)`` pair the kernels receive;
    ``batch_start`` selects the segment numbers ``s = b * num_heads + h`` for
    ``b`` in ``[batch_start, batch_start + batch)`` (varlen: one sequence).
    """
    seed, offset = (int(x) for x in rng_state.tolist())
    seed &= 0xFFFFFFFFFFFFFFFF
    device = device if device is not None else rng_state.device
    kw = dict(dtype=torch.int64, device=device)
    s = (torch.arange(batch, **kw) + batch_start)[:, None] * num_heads + torch.arange(num_heads, **kw)
    s = s.view(batch, num_heads, 1, 1)
    i = torch.arange(seqlen_q, **kw).view(1, 1, seqlen_q, 1)
    j = torch.arange(seqlen_k, **kw).view(1, 1, 1, seqlen_k)
    shape = (batch, num_heads, seqlen_q, seqlen_k)
    c0 = (j >> 2).expand(shape)
    c1 = i.expand(shape)
    c2 = s.expand(shape)
    c3 = torch.full(shape, offset & _U32, **kw)
    words = torch.stack(philox4x32(c0, c1, c2, c3, seed), dim=-1)  # (B, H, Nq, Nk, 4)
    word = torch.gather(words, -1, (j & 3).expand(shape).unsqueeze(-1)).squeeze(-1)
    return word >= dropout_threshold(dropout_p)


# ---------------------------------------------------------------------------
# Dense attention
# ---------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_keys(seqlen_q: int, seqlen_k: int, *, causal: bool = False, window_size=(-1, -1),
                 alignment: str = "top_left", device=None) -> torch.Tensor:
    """Bool (Nq, Nk): which keys the causal structure and the window let query row i see.

    Row i's diagonal is key ``d(i) = i`` ("top_left") or ``i + Nk - Nq`` ("bottom_right");
    it sees key j iff ``d(i) - left <= j <= d(i) + right`` (-1: unbounded on that side),
    and ``causal`` sets ``right = 0``.
    """
    left, right = window_size
    if causal:
        right = 0
    d = torch.arange(seqlen_q, device=device)[:, None] + diagonal_offset(seqlen_q, seqlen_k, alignment)
    j = torch.arange(seqlen_k, device=device)[None, :]
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= d - left
    if right >= 0:
        allowed &= j <= d + right
    return allowed


def diagonal_offset(seqlen_q: int, seqlen_k: int, alignment: str) -> int:
    """d(i) - i: 0 for "top_left" (torch's is_causal), Nk - Nq for "bottom_right" (flash-attn's)."""
    return seqlen_k - seqlen_q if alignment == "bottom_right" else 0


def attention_reference(q, k, v, *, causal: bool = False, attn_mask: Optional[torch.Tensor] = None,
                        dropout_p: float = 0.0, scale: Optional[float] = None,
                        rng_state: Optional[torch.Tensor] = None, return_lse: bool = False,
                        compute_dtype: Optional[torch.dtype] = None, batch_start: int = 0,
                        window_size=(-1, -1), alignment: str = "top_left", softcap: float = 0.0,
                        alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None):
    """softmax(q kᵀ · scale + mask) v, materialised.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), Hq % Hkv == 0.
    attn_mask: bool (True = may attend) or float (added to the logits),
    broadcastable to (B, Hq, Nq, Nk). causal: key j visible to query i iff j <= d(i)
    (``alignment`` "top_left", torch's SDPA, d(i) = i; "bottom_right", flash-attn's,
    d(i) = i + Nk - Nq). Rows that can see no key give zeros and lse = -inf.

    Variants, in the order they apply to the logit s = scale · q·k:
      softcap > 0:   s = softcap · tanh(s / softcap)
      alibi_slopes:  s -= slope[(b,) h] · |d(i) - j|, float (Hq,) or (B, Hq)
      window_size:   (left, right), key j visible iff d(i) - left <= j <= d(i) + right (-1: unbounded)
      attn_mask, then the softmax, where sinks (Hq,) adds one logit per head of a key
      whose value is zero: it is in the denominator (and the lse) only.

    Computed in ``compute_dtype`` (float32, or float64 for float64 inputs); the output
    is cast back to q's dtype, lse stays in the compute dtype. Differentiable through
    autograd (sinks included).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    cdt = compute_dtype or _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = Hq // Hkv if Hkv else 1  # no heads at all: an empty result
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if group > 1:
        kc = kc.repeat_interleave(group, dim=1)  # (B, Hq, Nk, D)
        vc = vc.repeat_interleave(group, dim=1)  # (B, Hq, Nk, Dv)
    logits = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(cdt).reshape(-1, Hq, 1, 1)  # (B|1, Hq, 1, 1)
        d = torch.arange(Nq, device=q.device)[:, None] + diagonal_offset(Nq, Nk, alignment)
        distance = (d - torch.arange(Nk, device=q.device)[None, :]).abs().to(cdt)
        logits = logits - slopes * distance
    allowed = visible_keys(Nq, Nk, causal=causal, window_size=window_size, alignment=alignment, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            logits = logits + attn_mask.to(cdt)
            # -inf in a float mask hides the key like False: masked_fill then also stops the gradient
            # there, which a row that sees no key needs (logsumexp's backward is NaN on an all -inf row).
            allowed = allowed & ~torch.isneginf(attn_mask)
    logits = logits.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more logit per row, of a key whose value is zero
        sink_logits = sinks.to(cdt).view(1, Hq, 1, 1).expand(B, Hq, Nq, 1)
        logits = torch.cat([logits, sink_logits], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)  # (B, Hq, Nq); -inf where nothing is visible
    # exp(logits - lse) with the fully masked rows pinned to zero (not NaN)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(logits - safe_lse.unsqueeze(-1))
    if sinks is not None:
        probs = probs[..., :Nk]
    if dropout_p > 0.0:
        if rng_state is None:
            raise ValueError("attention_reference: dropout_p > 0 needs rng_state (seed, offset)")
        keep = dropout_keep_mask(rng_state, dropout_p, Hq, Nq, Nk, batch=B,
                                 batch_start=batch_start, device=q.device)
        probs = probs * keep.to(cdt) / (1.0 - dropout_p)
    out = torch.matmul(probs, vc).to(q.dtype)  # (B, Hq, Nq, Dv)
    return (out, lse) if return_lse else out


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = False,
                               dropout_p: float = 0.0, scale: Optional[float] = None,
                               rng_state: Optional[torch.Tensor] = None, return_lse: bool = False,
                               window_size=(-1, -1), alignment: str = "top_left", softcap: float = 0.0,
                               alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None):
    """Packed sequences, one dense reference call per sequence.

    q: (total_q, Hq, D), k: (total_k, Hkv, D), v: (total_k, Hkv, Dv);
    cu_seqlens_*: (batch + 1,) int32 prefix sums. Returns out (total_q, Hq, Dv)
    and, with return_lse, lse (Hq, total_q) as flash-attention's varlen does.
    The variants are those of :func:`attention_reference`, aligned within each
    sequence; alibi_slopes of shape (B, Hq) gives sequence b its row b.
    """
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, nq, D)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, nk, D)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, nk, Dv)
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        ob, lb = attention_reference(qb, kb, vb, causal=causal, dropout_p=dropout_p, scale=scale,
                                     rng_state=rng_state, return_lse=True, batch_start=b,
                                     window_size=window_size, alignment=alignment, softcap=softcap,
                                     alibi_slopes=slopes, sinks=sinks)
        outs.append(ob[0].transpose(0, 1))  # (nq, Hq, Dv)
        lses.append(lb[0])  # (Hq, nq)
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[2])
    if not return_lse:
        return out
    lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0, dtype=_compute_dtype(q.dtype))
    return out, lse

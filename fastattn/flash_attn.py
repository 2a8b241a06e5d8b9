"""flash-attn's Python API (``flash_attn.flash_attn_interface``, 2.8) on fastattn's kernels.

    from fastattn.flash_attn import flash_attn_func      # instead of: from flash_attn import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)          # q (B, N, H, D), k/v (B, N, Hkv, D)

Same functions, signatures and semantics as flash-attn's: the (batch, seqlen, heads, headdim)
layout ((total, heads, headdim) for varlen), causal masks, sliding windows and ALiBi distances
aligned to the bottom-right corner (query i's diagonal is key i + Nk - Nq), ``softmax_scale``
(default 1/sqrt(headdim)), ``dropout_p``, ``window_size=(left, right)`` (-1: unbounded),
``softcap``, ``alibi_slopes`` fp32 (nheads,) or (batch, nheads), GQA/MQA by K/V with fewer heads.
On CPU tensors and on GPUs, through ``fastattn.attention`` / ``fastattn.varlen_attention``
(whichever backend serves the call).

Where the behaviour differs from flash-attn's, by design:

* ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)`` as flash-attn does: the lse
  (natural log, fp32, (batch, nheads, seqlen) or (nheads, total_q)) and "the output of softmax
  (possibly with different scaling)" with the dropout pattern as its sign (negative: dropped),
  which flash-attn documents as for testing only. The kernels never build it: it is recomputed
  from q and k by the reference (O(N^2) memory) with the call's own dropout mask. Its scaling is
  flash-attn's with a single key block, exp(s - rowmax(s)) (each row's largest weight is 1;
  ``_get_block_size_n`` says so to flash-attn's test helpers, which rescale by blocks), and its
  shape is exact, (batch, nheads, seqlen_q, seqlen_k) (varlen: max_seqlen_q, max_seqlen_k, zeros
  outside each sequence), where flash-attn pads to its block sizes (its tests crop to these).
* Bad input raises errors that are ``ValueError`` / ``TypeError`` and also ``RuntimeError`` (what
  flash-attn's C++ checks raise), naming the argument.
* ``deterministic`` is accepted and has no effect: fastattn's backward passes are deterministic
  on every backend (no atomics).
* The dropout mask is fastattn's (counter-based Philox, drawn from torch's default generator),
  not flash-attn's: the same probability, different random draws.
* ``flash_attn_with_kvcache`` gathers the valid part of the (possibly paged) cache into a packed
  varlen batch before attending: a copy of the keys and values it reads (flash-attn reads them
  in place). ``num_splits`` is accepted and ignored (the CPU kernel splits the keys itself).
  Like flash-attn's, it has no backward.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import reference
from .api import _call_recording_rng_state, attention, varlen_attention
from .errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _check_layout(t, name: str, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise InvalidArgumentError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def _window(window_size) -> tuple:
    """(left, right) as ints; like flash-attn, any pair indexable as window_size[0], window_size[1]
    (a tuple, a list, a 2-element tensor as flash-attn's own tests pass)."""
    if isinstance(window_size, torch.Tensor) and window_size.numel() == 2 and not window_size.is_floating_point():
        window_size = window_size.tolist()
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise InvalidArgumentTypeError(
            f"window_size must be a pair (left, right), -1 for unbounded, got {window_size!r}")
    return tuple(int(w) if isinstance(w, torch.Tensor) else w for w in window_size)


def _probs_with_dropout_sign(q, k, *, causal, scale, window, softcap, alibi_slopes, dropout_p, rng_state,
                             batch_start=0):
    """flash-attn's S_dmask for dense q (B, Hq, Nq, D), k (B, Hkv, Nk, D): exp(s - rowmax(s)) (B, Hq, Nq, Nk)
    in q's dtype, negated where dropout dropped it. It is P / rowmax(P), P the reference attention with
    V = identity (so every variant means exactly what it means in the output)."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    with torch.no_grad():
        eye = torch.eye(Nk, dtype=torch.float32, device=q.device).expand(B, Hkv, Nk, Nk)
        probs = reference.attention_reference(q.float(), k.float(), eye, causal=causal, scale=scale,
                                              window_size=window, alignment="bottom_right", softcap=softcap,
                                              alibi_slopes=alibi_slopes)  # (B, Hq, Nq, Nk)
        row_max = probs.amax(-1, keepdim=True)
        probs = torch.where(row_max > 0, probs / row_max, probs)  # rows that see nothing stay 0
        if dropout_p > 0:
            keep = reference.dropout_keep_mask(rng_state, dropout_p, Hq, Nq, Nk, batch=B, batch_start=batch_start,
                                               device=q.device)
            probs = torch.where(keep, probs, -probs)
    return probs.to(q.dtype)


def _get_block_size_n(device=None, head_dim=None, is_dropout=None, is_causal=None) -> int:
    """flash-attn's helper (its tests rescale S_dmask block by block with it): fastattn's S_dmask is
    scaled as one block spanning every key, so the block is longer than any sequence."""
    return 1 << 30


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    """fastattn.attention on (B, H, N, D) views, and S_dmask when asked for."""
    window = _window(window_size)

    def call():
        return attention(q, k, v, causal=causal, dropout_p=dropout_p, scale=softmax_scale, window_size=window,
                         alignment="bottom_right", softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)

    if not return_attn_probs:
        return call()[0], None, None
    (out, lse), rng_state = _call_recording_rng_state(call, q.device, dropout_p)
    s_dmask = _probs_with_dropout_sign(q, k, causal=causal, scale=softmax_scale, window=window, softcap=softcap,
                                       alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state)
    return out, lse, s_dmask


# ---------------------------------------------------------------------------------------------
# Dense: (batch, seqlen, nheads, headdim)
# ---------------------------------------------------------------------------------------------
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim) -> out like q
    (with return_attn_probs: out, softmax_lse (batch, nheads, seqlen_q), S_dmask (batch, nheads, seqlen_q,
    seqlen_k)). Causal and windows aligned bottom-right: query i sees keys [i + Nk - Nq - left, i + Nk - Nq + right]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_layout(t, name, 4, "(batch, seqlen, nheads, headdim)")
    out, lse, s_dmask = _dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, softmax_scale,
                               causal, window_size, softcap, alibi_slopes, return_attn_probs)  # (B, H, N, D) views
    out = out.transpose(1, 2)  # (batch, seqlen_q, nheads, headdim)
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, nheads, headdim) -> out (batch, seqlen, nheads, headdim); see flash_attn_func."""
    _check_layout(qkv, "qkv", 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise InvalidArgumentError(f"qkv must be (batch, seqlen, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2, nheads_k, headdim); see flash_attn_func."""
    _check_layout(kv, "kv", 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise InvalidArgumentError(f"kv must be (batch, seqlen_k, 2, nheads_k, headdim), got shape {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


# ---------------------------------------------------------------------------------------------
# Varlen: (total, nheads, headdim) with cu_seqlens
# ---------------------------------------------------------------------------------------------
def _paged_to_packed(cache: torch.Tensor, block_table: torch.Tensor, lengths: list) -> torch.Tensor:
    """(num_blocks, page_block_size, H, D) pages + (batch, max_blocks) table -> (sum(lengths), H, D)."""
    page = cache.shape[1]
    parts = []
    for b, n in enumerate(lengths):
        blocks = block_table[b, :(n + page - 1) // page].long()
        if blocks.numel() * page < n:
            raise InvalidArgumentError(f"block_table row {b} holds {blocks.numel() * page} keys, fewer than its {n}")
        parts.append(cache[blocks].reshape(-1, *cache.shape[2:])[:n])
    return torch.cat(parts) if parts else cache.new_zeros(0, *cache.shape[2:])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim), cu_seqlens int32 (batch + 1,)
    -> out (total_q, nheads, headdim) (with return_attn_probs: out, softmax_lse (nheads, total_q), S_dmask
    (batch, nheads, max_seqlen_q, max_seqlen_k)).
    Causal and windows aligned bottom-right within each sequence. With ``block_table``
    (batch, max_blocks) int32, k/v are a paged cache (num_blocks, page_block_size, nheads_k, headdim)
    holding sequence b's keys in the pages of row b (forward only)."""
    _check_layout(q, "q", 3, "(total_q, nheads, headdim)")
    if block_table is not None:
        _check_layout(k, "k", 4, "(num_blocks, page_block_size, nheads_k, headdim) with a block_table")
        lengths = torch.diff(cu_seqlens_k.cpu()).tolist()
        with torch.no_grad():
            k = _paged_to_packed(k, block_table, lengths)
            v = _paged_to_packed(v, block_table, lengths)
    window = _window(window_size)

    def call():
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                causal=causal, dropout_p=dropout_p, scale=softmax_scale, window_size=window,
                                alignment="bottom_right", softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)

    if not return_attn_probs:
        return call()[0]
    (out, lse), rng_state = _call_recording_rng_state(call, q.device, dropout_p)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    s_dmask = q.new_zeros(len(cq) - 1, q.shape[1], int(max_seqlen_q), int(max_seqlen_k))  # (batch, H, Lq, Lk)
    for b in range(len(cq) - 1):  # sequence b alone, its dropout segments b * H + h as in the kernels
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, H, nq, D)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, nk, D)
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        s_dmask[b, :, :qb.shape[2], :kb.shape[2]] = _probs_with_dropout_sign(
            qb, kb, causal=causal, scale=softmax_scale, window=window, softcap=softcap, alibi_slopes=slopes,
            dropout_p=dropout_p, rng_state=rng_state, batch_start=b)[0]
    return out, lse, s_dmask


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, nheads, headdim); see flash_attn_varlen_func."""
    _check_layout(qkv, "qkv", 4, "(total, 3, nheads, headdim)")
    if qkv.shape[1] != 3:
        raise InvalidArgumentError(f"qkv must be (total, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, nheads, headdim), kv (total_k, 2, nheads_k, headdim); see flash_attn_varlen_func."""
    _check_layout(kv, "kv", 4, "(total_k, 2, nheads_k, headdim)")
    if kv.shape[1] != 2:
        raise InvalidArgumentError(f"kv must be (total_k, 2, nheads_k, headdim), got shape {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


# ---------------------------------------------------------------------------------------------
# Decoding against a KV cache
# ---------------------------------------------------------------------------------------------
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x (batch, seqlen, heads, headdim) at ``positions`` (batch, seqlen), as
    flash-attn's apply_rotary_emb: cos/sin (seqlen_ro, rotary_dim / 2) rotate the first rotary_dim
    dims, pairs (0, 1), (2, 3), ... when interleaved (GPT-J), (0, rd/2), (1, rd/2 + 1), ... otherwise
    (GPT-NeoX); the other dims pass through. Computed in fp32, returned in x's dtype."""
    rd = 2 * cos.shape[-1]
    c = cos[positions].float()[:, :, None, :]  # (batch, seqlen, 1, rd / 2)
    s = sin[positions].float()[:, :, None, :]
    rot = x[..., :rd].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :rd // 2], rot[..., rd // 2:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rd:]), dim=-1)


@torch.no_grad()
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q (batch, seqlen_q, nheads, headdim) over a KV cache, appending k/v to it first.

    k_cache/v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or pages (num_blocks,
    page_block_size, nheads_k, headdim) with ``block_table`` (batch, max_blocks) int32. With k/v
    (batch, seqlen_new, nheads_k, headdim) the new tokens are written *in place* into the cache at
    cache_seqlens[b] ... (cache row cache_batch_idx[b]), rotated first when rotary_cos/rotary_sin
    (seqlen_ro, rotary_dim / 2) are given; q is rotated at cache_seqlens[b] + i when causal or local,
    at cache_seqlens[b] otherwise. Then q attends to cache keys [cache_leftpad[b], cache_seqlens[b] +
    seqlen_new), causal / window / ALiBi bottom-right aligned on that range. Returns out like q
    (and softmax_lse (batch, nheads, seqlen_q) with return_softmax_lse). No backward.
    """
    _check_layout(q, "q", 4, "(batch, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    cache_layout = ("(num_blocks, page_block_size, nheads_k, headdim)" if paged
                    else "(batch_cache, seqlen_cache, nheads_k, headdim)")
    _check_layout(k_cache, "k_cache", 4, cache_layout)
    _check_layout(v_cache, "v_cache", 4, cache_layout)
    if (k is None) != (v is None):
        raise InvalidArgumentError("k and v must be given together (the new tokens to append) or both be None")
    B, Nq = q.shape[0], q.shape[1]
    device = q.device
    if paged:
        if cache_batch_idx is not None:
            raise InvalidArgumentError("cache_batch_idx cannot be combined with block_table (as in flash-attn)")
        page = k_cache.shape[1]
        capacity = block_table.shape[1] * page
    else:
        capacity = k_cache.shape[1]
    if cache_seqlens is None:
        seqlens = torch.full((B,), capacity if k is None else 0, dtype=torch.long)
    elif isinstance(cache_seqlens, int):
        seqlens = torch.full((B,), cache_seqlens, dtype=torch.long)
    else:
        seqlens = cache_seqlens.to("cpu", torch.long)
        if seqlens.shape != (B,):
            raise InvalidArgumentError(
                f"cache_seqlens must be an int or (batch,) = ({B},), got shape {tuple(seqlens.shape)}")
    rows = (cache_batch_idx.to("cpu", torch.long) if cache_batch_idx is not None
            else torch.arange(B))  # cache row of each batch element
    leftpad = cache_leftpad.to("cpu", torch.long) if cache_leftpad is not None else torch.zeros(B, dtype=torch.long)
    n_new = 0 if k is None else k.shape[1]
    if int((seqlens + n_new).max()) > capacity:
        held = "the block_table holds" if block_table is not None else "the cache holds"
        raise InvalidArgumentError(f"{held} {capacity} tokens per sequence, but cache_seqlens + seqlen_new reaches "
                                   f"{int((seqlens + n_new).max())}")
    local = tuple(_window(window_size)) != (-1, -1)

    def cache_index(b: int, positions: torch.Tensor) -> tuple:
        """Where sequence b's tokens ``positions`` live: (tensor index into dim 0, index into dim 1)."""
        if paged:
            pages = block_table[b].to("cpu", torch.long)[positions // page]
            return pages, positions % page
        return torch.full_like(positions, int(rows[b])), positions

    # 1. append the new tokens (rotated) at cache_seqlens
    if k is not None:
        _check_layout(k, "k", 4, "(batch, seqlen_new, nheads_k, headdim)")
        _check_layout(v, "v", 4, "(batch, seqlen_new, nheads_k, headdim)")
        new_positions = seqlens[:, None] + torch.arange(n_new)[None, :]  # (batch, seqlen_new)
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, new_positions.to(rotary_cos.device), rotary_interleaved)
        for b in range(B):
            i0, i1 = cache_index(b, new_positions[b])
            k_cache[i0.to(device), i1.to(device)] = k[b].to(k_cache.dtype)
            v_cache[i0.to(device), i1.to(device)] = v[b].to(v_cache.dtype)
    # 2. rotate q at its positions
    if rotary_cos is not None:
        offsets = torch.arange(Nq)[None, :] if (causal or local) else torch.zeros(1, Nq, dtype=torch.long)
        q = apply_rotary(q, rotary_cos, rotary_sin, (seqlens[:, None] + offsets).to(rotary_cos.device),
                         rotary_interleaved)
    # 3. gather each sequence's visible keys [leftpad, seqlen + seqlen_new) into a varlen batch
    ends = seqlens + n_new
    lengths_k = (ends - leftpad).clamp_min(0)
    keys, values = [], []
    for b in range(B):
        positions = torch.arange(int(leftpad[b]), int(ends[b]))
        i0, i1 = (t.to(device) for t in cache_index(b, positions))
        keys.append(k_cache[i0, i1])
        values.append(v_cache[i0, i1])
    cu_k = torch.zeros(B + 1, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(lengths_k, 0)
    cu_q = torch.arange(0, (B + 1) * Nq, Nq, dtype=torch.int32)
    out, lse = varlen_attention(q.reshape(B * Nq, *q.shape[2:]), torch.cat(keys).to(q.dtype),
                                torch.cat(values).to(q.dtype), cu_q.to(device), cu_k.to(device), Nq,
                                max(int(lengths_k.max()), 1) if B else 1, causal=causal, scale=softmax_scale,
                                window_size=_window(window_size), alignment="bottom_right", softcap=softcap,
                                alibi_slopes=alibi_slopes, return_lse=True)
    out = out.reshape(B, Nq, *out.shape[1:])
    if return_softmax_lse:
        return out, lse.reshape(lse.shape[0], B, Nq).transpose(0, 1)  # (nheads, B * Nq) -> (B, nheads, Nq)
    return out

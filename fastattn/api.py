"""Public functions: fastattn.attention, scaled_dot_product_attention, varlen_attention.

Each validates its inputs (errors name the argument and the expected shape or
dtype), picks a backend through fastattn.dispatch, draws the dropout seed from
torch's default generator, and calls the autograd Function of fastattn._ops
(or the plain reference).
"""

import math
from typing import Optional

import torch

from . import dispatch, reference
from ._ops import (PLAIN, AttentionFunction, Variants, VarlenAttentionFunction, attention_fwd, needs_autograd,
                   varlen_attention_fwd)
from .errors import InvalidArgumentError, InvalidArgumentTypeError

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------
def _check_tensor(t, name: str, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise InvalidArgumentError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise InvalidArgumentTypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_qkv(q, k, v, layout_q: str, layout_k: str, layout_v: str, head_axis: int, len_axis: int) -> None:
    ndim = layout_q.count(",") + 1  # k's and v's layouts have as many axes as q's
    _check_tensor(q, "q", ndim, layout_q)
    _check_tensor(k, "k", ndim, layout_k)
    _check_tensor(v, "v", ndim, layout_v)
    dtype, device = q.dtype, q.device
    if k.dtype != dtype or v.dtype != dtype:
        raise InvalidArgumentTypeError(f"q, k, v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != device or v.device != device:
        raise InvalidArgumentError(f"q, k, v must be on the same device, got q {q.device}, k {k.device}, v {v.device}")
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    if k_shape[-1] != q_shape[-1]:
        raise InvalidArgumentError(f"k head dim {k_shape[-1]} must equal q head dim {q_shape[-1]} "
                                   f"(q {tuple(q_shape)}, k {tuple(k_shape)})")
    if v_shape[len_axis] != k_shape[len_axis]:
        raise InvalidArgumentError(
            f"k and v must have the same sequence length, got k {tuple(k_shape)}, v {tuple(v_shape)}")
    if v_shape[head_axis] != k_shape[head_axis]:
        raise InvalidArgumentError(
            f"k and v must have the same number of heads, got k {tuple(k_shape)}, v {tuple(v_shape)}")
    hq, hkv = q_shape[head_axis], k_shape[head_axis]
    if (hq % hkv != 0) if hkv else hq != 0:  # no heads at all (an empty batch of heads) is allowed, as in torch
        raise InvalidArgumentError(
            f"the number of q heads ({hq}) must be a multiple of the number of k/v heads ({hkv})")


def _check_causal(causal, name: str = "causal") -> bool:
    # bool only: a truthy string or tensor ("yes", torch.tensor(0)) would silently pick a branch
    if not isinstance(causal, bool):
        raise InvalidArgumentTypeError(f"{name} must be a bool, got {type(causal).__name__} ({causal!r})")
    return causal


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise InvalidArgumentTypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0 or math.isnan(dropout_p):
        raise InvalidArgumentError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _causal_bias(attn_mask, causal: bool, alignment: str):
    """torch.nn.attention.bias.CausalBias (causal_upper_left / causal_lower_right) as what it means:
    (attn_mask=None, causal=True, its alignment); other masks unchanged. A CausalBias is a tensor
    subclass whose storage is a placeholder: read as a mask it would be silently wrong."""
    if not isinstance(attn_mask, torch.Tensor) or type(attn_mask).__name__ != "CausalBias":
        return attn_mask, causal, alignment
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(attn_mask, CausalBias):
        return attn_mask, causal, alignment
    if causal:
        raise InvalidArgumentError("CausalBias should not be used with causal=True")  # torch's error, word for word
    lower_right = attn_mask.variant == CausalVariant.LOWER_RIGHT and attn_mask.seq_len_q != attn_mask.seq_len_kv
    return None, True, "bottom_right" if lower_right else "top_left"


def _check_mask(attn_mask, q, shape) -> Optional[torch.Tensor]:
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise InvalidArgumentTypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise InvalidArgumentTypeError(
            f"attn_mask must be bool (True = may attend) or floating point (added to the logits), "
            f"got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise InvalidArgumentError(f"attn_mask must be on {q.device} like q, got {attn_mask.device}")
    try:
        ok = attn_mask.dim() <= len(shape) and torch.broadcast_shapes(attn_mask.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise InvalidArgumentError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                                   f"(B, Hq, Nq, Nk) = {tuple(shape)}")
    if attn_mask.requires_grad:
        raise InvalidArgumentError("attn_mask requires grad, but fastattn does not compute gradients for the mask; "
                                   "pass attn_mask.detach()")
    return attn_mask


_ALIGNMENTS = ("top_left", "bottom_right")


def _check_head_tensor(t, name: str, q, shapes: dict):
    """alibi_slopes / sinks: None, or a float tensor on q's device of one of ``shapes`` (label: shape)."""
    if t is None:
        return None
    expected = " or ".join(shapes)
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor {expected} or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InvalidArgumentTypeError(f"{name} must be a floating-point tensor {expected}, got {t.dtype}")
    if tuple(t.shape) not in shapes.values():
        raise InvalidArgumentError(f"{name} must have shape {expected} = {' or '.join(map(str, shapes.values()))}, "
                                   f"got {tuple(t.shape)}")
    if t.device != q.device:
        raise InvalidArgumentError(f"{name} must be on {q.device} like q, got {t.device}")
    return t


def _check_variants(q, causal: bool, window_size, alignment, softcap, alibi_slopes, sinks, *, heads_q: int,
                    batch: int, seqlens_differ: bool):
    """Validates the variant keywords; returns (causal, Variants, alibi_slopes, sinks, names of those used).

    Normalises what is plain attention in disguise (so that every backend that serves the plain
    case takes it): a window (left, 0) is causal (with a left bound), causal ignores the right bound, and the
    alignment only matters where a diagonal does (causal, a window or ALiBi) and Nq != Nk.
    """
    # Plain attention spelled as the defaults spell it (every decode step's call): nothing to check or normalise.
    # Exact types, so that what the checks below reject ((-1.0, -1), softcap=False) still reaches them.
    plain = (alibi_slopes is None and sinks is None and type(softcap) is float and softcap == 0.0
             and type(window_size) is tuple and window_size == (-1, -1)
             and type(window_size[0]) is type(window_size[1]) is int
             and (alignment == "top_left" or (alignment == "bottom_right" and not causal)))
    if plain:
        return causal, PLAIN, None, None, ()
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise InvalidArgumentTypeError(
            f"window_size must be a pair of ints (left, right), -1 for unbounded, got {window_size!r}")
    left, right = window_size
    if isinstance(left, bool) or not isinstance(left, int) or isinstance(right, bool) or not isinstance(right, int):
        raise InvalidArgumentTypeError(
            f"window_size must be a pair of ints (left, right), -1 for unbounded, got {window_size!r}")
    if left < -1 or right < -1:
        raise InvalidArgumentError(
            f"window_size must be a pair of ints >= -1 (-1: unbounded), got {tuple(window_size)}")
    if alignment not in _ALIGNMENTS:
        raise InvalidArgumentError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise InvalidArgumentTypeError(
            f"softcap must be a float >= 0 (0: no soft-capping), got {type(softcap).__name__}")
    if not (softcap >= 0.0 and math.isfinite(softcap)):
        raise InvalidArgumentError(f"softcap must be a finite float >= 0 (0: no soft-capping), got {softcap}")
    if alibi_slopes is not None:
        _check_head_tensor(alibi_slopes, "alibi_slopes", q, {"(Hq,)": (heads_q,), "(B, Hq)": (batch, heads_q)})
        if alibi_slopes.requires_grad:
            raise InvalidArgumentError(
                "alibi_slopes requires grad, but fastattn does not compute gradients for the slopes; "
                "pass alibi_slopes.detach()")
    if sinks is not None:
        _check_head_tensor(sinks, "sinks", q, {"(Hq,)": (heads_q,)})
    if causal or right == 0:
        causal, right = True, -1
    names = []
    if left >= 0 or right >= 0:
        names.append("window")
    if alignment == "bottom_right" and seqlens_differ and (causal or names or alibi_slopes is not None):
        names.append("bottom_right")
    if softcap > 0:
        names.append("softcap")
    if alibi_slopes is not None:
        names.append("alibi")
    if sinks is not None:
        names.append("sinks")
    variants = Variants(left, right, "bottom_right" in names, float(softcap))
    return causal, variants, alibi_slopes, sinks, tuple(names)


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidArgumentTypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _draw_rng_state(device: torch.device, backend: str = "cpu") -> torch.Tensor:
    """(seed, offset) for the counter-based dropout, from torch's default generator.

    For the "cuda" backend it is drawn on the GPU by torch's CUDA generator and read by
    the kernels there, so a captured CUDA graph draws fresh values on every replay.
    """
    on_gpu = backend == "cuda" and device.type == "cuda"
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device if on_gpu else "cpu")


def _generator_states(device: torch.device) -> list:
    """States of the default generators a seed draw for ``device`` may use (CPU, and the GPU's)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_generator_states(device: torch.device, states: list) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _call_recording_rng_state(call, device: torch.device, dropout_p: float):
    """(call(), the (seed, offset) its dropout used, or None without dropout).

    ``call`` runs one fastattn.attention / varlen_attention; it draws its seed with
    _draw_rng_state from torch's CPU or GPU generator (the backend decides). To rebuild that
    call's dropout mask (attention weights, flash-attn's S_dmask) the draw is replayed on the
    generator it advanced, and it must account for everything the call consumed: a change in
    how seeds are drawn fails loudly, not silently.
    """
    if dropout_p == 0:
        return call(), None
    before = _generator_states(device)
    result = call()
    after = _generator_states(device)
    for backend in ("cpu", "cuda"):  # where _draw_rng_state draws for each kind of backend
        _set_generator_states(device, before)
        rng_state = _draw_rng_state(device, backend)
        replayed = all(torch.equal(a, b) for a, b in zip(_generator_states(device), after))
        if replayed:
            break
    _set_generator_states(device, after)
    if not replayed:
        raise RuntimeError("fastattn: could not recover the dropout seed of an attention call, so its dropout "
                           "mask cannot be rebuilt")
    return result, rng_state


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, scale: Optional[float] = None,
              backend: str = "auto", return_lse: bool = False, window_size=(-1, -1), alignment: str = "top_left",
              softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
              sinks: Optional[torch.Tensor] = None):
    """Fused attention ``softmax(q kᵀ · scale + mask) v``.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv). Hq must be a
            multiple of Hkv (grouped-query / multi-query attention, K/V not copied).
            float32, float64, bfloat16 or float16, all the same dtype; any strides.
        causal: query i sees keys j <= d(i), its diagonal (see ``alignment``).
        attn_mask: bool (True = may attend) or float (added to the logits),
            broadcastable to (B, Hq, Nq, Nk). May be combined with ``causal``.
        dropout_p: probability of dropping an attention weight (rescaled by 1/(1-p)).
        scale: logit scale, default 1/sqrt(D).
        backend: "auto" or one of ``fastattn.available_backends()``.
        return_lse: also return the log-sum-exp of the scaled logits.
        window_size: (left, right): query i sees keys d(i) - left <= j <= d(i) + right
            (sliding-window attention); -1 = unbounded on that side. ``causal`` sets right = 0.
        alignment: "top_left" (d(i) = i, torch's SDPA) or "bottom_right" (d(i) = i + Nk - Nq,
            flash-attn's: the last query sees the last key, as decoding against a cache needs).
        softcap: > 0 soft-caps the scaled logit s to softcap * tanh(s / softcap) (Gemma 2).
        alibi_slopes: float (Hq,) or (B, Hq): adds -slope * |d(i) - j| to the logit (ALiBi).
        sinks: float (Hq,), one logit per query head of a virtual key with value zero (GPT-OSS):
            in the softmax denominator (and the lse) only; differentiable.
        Order: scale, softcap, ALiBi, window/causal, attn_mask, softmax (with the sink).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype; with return_lse also lse (B, Hq, Nq),
        float32 (float64 for float64 inputs), natural log, -inf where a row sees
        no key and has no sink (such rows give zeros).
    """
    _check_qkv(q, k, v, "(B, Hq, Nq, D)", "(B, Hkv, Nk, D)", "(B, Hkv, Nk, Dv)", head_axis=1, len_axis=2)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise InvalidArgumentError(
            f"q, k, v batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    causal = _check_causal(causal)
    dropout_p = _check_dropout(dropout_p)
    B, Hq, Nq, D = q.shape
    if attn_mask is not None:
        attn_mask, causal, alignment = _causal_bias(attn_mask, causal, alignment)
        attn_mask = _check_mask(attn_mask, q, (B, Hq, Nq, k.shape[2]))
    causal, variants, alibi_slopes, sinks, used = _check_variants(
        q, causal, window_size, alignment, softcap, alibi_slopes, sinks, heads_q=Hq, batch=B,
        seqlens_differ=Nq != k.shape[2])
    scale = _resolve_scale(scale, D)
    name = dispatch.choose_backend(backend, q.device, q.dtype, D, has_mask=attn_mask is not None,
                                   dropout=dropout_p > 0, mask_kind=dispatch.mask_kind(attn_mask),
                                   value_head_dim=v.shape[-1], variants=used)
    rng_state = _draw_rng_state(q.device, name) if dropout_p > 0 else None
    if name == "reference":
        return reference.attention_reference(
            q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, rng_state=rng_state,
            return_lse=return_lse, **variants.keywords(), alibi_slopes=alibi_slopes, sinks=sinks)
    run = AttentionFunction.apply if needs_autograd(q, k, v, attn_mask, alibi_slopes, sinks) else attention_fwd
    out, lse = run(q, k, v, attn_mask, bool(causal), scale, dropout_p, rng_state, name, variants, alibi_slopes, sinks)
    return (out, lse) if return_lse else out


@torch.jit.ignore  # TorchScript code that calls it (a swapped-in F.scaled_dot_product_attention) calls Python
def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature and results).

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev); at least 3-D
    (a 3-D input has one head). Hq != Hkv needs ``enable_gqa=True``, as in torch. A mask
    together with ``is_causal=True`` applies both, as torch does. ``attn_mask`` may be a
    ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` / ``causal_lower_right``):
    causal attention with that alignment, as torch computes it.
    """
    _check_causal(is_causal, "is_causal")
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
        return _sdpa_nested(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    attn_mask, is_causal, alignment = _causal_bias(attn_mask, is_causal, "top_left")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise InvalidArgumentError(f"{name} must be at least 3-D (..., L, E), got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise InvalidArgumentError(
            f"query, key, value must have the same rank, got {query.dim()}, {key.dim()}, {value.dim()}")
    if query.dim() >= 4 and query.shape[-3] != key.shape[-3] and not enable_gqa:
        raise InvalidArgumentError(f"query has {query.shape[-3]} heads but key has {key.shape[-3]}: pass "
                                   f"enable_gqa=True for grouped-query attention")
    batch_shape = query.shape[:-3] if query.dim() >= 4 else query.shape[:-2]
    for name, t in (("key", key), ("value", value)):
        if t.shape[:len(batch_shape)] != batch_shape:
            raise InvalidArgumentError(f"{name} batch dims {tuple(t.shape[:len(batch_shape)])} differ from query's "
                                       f"{tuple(batch_shape)}")

    def to4d(t):  # (..., H, N, E) -> (B, H, N, E)
        if t.dim() == 3:
            return t.unsqueeze(1)  # (B, 1, N, E)
        return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t

    q, k, v = to4d(query), to4d(key), to4d(value)
    mask = attn_mask
    if mask is not None and query.dim() != 4:
        if not isinstance(mask, torch.Tensor):
            raise InvalidArgumentTypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
        full = (*query.shape[:-1], key.shape[-2])  # (..., [Hq,] L, S)
        try:
            mask = mask.expand(full)
        except RuntimeError:
            raise InvalidArgumentError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                                       f"{tuple(full)}") from None
        mask = mask.unsqueeze(1) if query.dim() == 3 else mask.reshape(-1, *mask.shape[-3:])
    out = attention(q, k, v, causal=is_causal, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                    alignment=alignment)
    return out.reshape(*query.shape[:-1], value.shape[-1])


def _sdpa_nested(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """SDPA on nested jagged tensors (B, H, L_i, E), torch's layout for them (ragged in dim 2):
    the sequences run packed through varlen_attention (no padding); the output is nested like query."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not (isinstance(t, torch.Tensor) and t.is_nested):
            raise InvalidArgumentError(f"query, key and value must all be nested or all be dense; {name} is not nested")
        if t.layout != torch.jagged or t.dim() != 4 or t._ragged_idx != 2:
            raise InvalidArgumentError(
                f"{name}: nested tensors must be jagged (layout=torch.jagged) and 4-D (B, H, L_i, E), ragged in "
                f"dim 2 (torch.nested.nested_tensor(..., layout=torch.jagged).transpose(1, 2)), got layout "
                f"{t.layout}, {t.dim()}-D")
    if attn_mask is not None:
        raise InvalidArgumentError("attn_mask must be None with nested tensors: the nesting says which keys exist")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L_i, H, E), ragged in dim 1
    if q.shape[2] != k.shape[2] and not enable_gqa:
        raise InvalidArgumentError(f"query has {q.shape[2]} heads but key has {k.shape[2]}: pass enable_gqa=True "
                                   f"for grouped-query attention")
    if k.offsets() is not v.offsets() and not torch.equal(k.offsets(), v.offsets()):
        raise InvalidArgumentError("key and value must have the same sequence lengths")

    def cu_seqlens(t):  # int32 (B + 1,) and the longest length
        offsets = t.offsets()
        return offsets.to(torch.int32), int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0

    cu_q, max_q = cu_seqlens(q)
    cu_k, max_k = cu_seqlens(k)
    out = varlen_attention(q.values(), k.values(), v.values(), cu_q, cu_k, max_q, max_k, causal=is_causal,
                           dropout_p=dropout_p, scale=scale)  # (total_q, Hq, Ev)
    return torch.nested.nested_tensor_from_jagged(out, offsets=q.offsets()).transpose(1, 2)  # (B, Hq, L_i, Ev)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     dropout_p: float = 0.0, scale: Optional[float] = None, backend: str = "auto",
                     return_lse: bool = False, window_size=(-1, -1), alignment: str = "top_left",
                     softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                     sinks: Optional[torch.Tensor] = None):
    """Attention over packed variable-length sequences (flash-attention's varlen convention).

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums of the sequence
            lengths, starting at 0 and ending at total_q / total_k.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (upper bounds).
        causal, window_size, alignment, softcap, alibi_slopes, sinks: as for
            :func:`attention`, within each sequence (alibi_slopes (B, Hq): one row per sequence).
    Returns:
        out (total_q, Hq, Dv); with return_lse also lse (Hq, total_q).
    """
    _check_qkv(q, k, v, "(total_q, Hq, D)", "(total_k, Hkv, D)", "(total_k, Hkv, Dv)", head_axis=1, len_axis=0)
    causal = _check_causal(causal)
    dropout_p = _check_dropout(dropout_p)
    batch = None
    lengths = {}  # per sequence, from the prefix sums read once here (a GPU tensor is copied to the host once)
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            got = f"{cu.dtype} tensor of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise InvalidArgumentTypeError(f"{name} must be a 1-D int32 tensor (batch + 1,) of prefix sums, got {got}")
        if batch is not None and cu.numel() - 1 != batch:
            raise InvalidArgumentError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {batch + 1} and "
                                       f"{cu.numel()}")
        batch = cu.numel() - 1
        values = cu.tolist()
        lengths[name] = [b - a for a, b in zip(values, values[1:])]
        if values[0] != 0:
            raise InvalidArgumentError(f"{name} must start at 0, got {values[0]}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise InvalidArgumentError(f"{name} must be non-decreasing prefix sums, got {values}")
        if values[-1] != total:
            raise InvalidArgumentError(f"{name}[-1] = {values[-1]} must equal the number of packed tokens ({total})")
        longest = max((b - a for a, b in zip(values, values[1:])), default=0)
        if not isinstance(max_len, int) or longest > max_len:
            raise InvalidArgumentError(
                f"max_seqlen_{name[-1]} = {max_len} is smaller than the longest sequence ({longest})")
    causal, variants, alibi_slopes, sinks, used = _check_variants(
        q, causal, window_size, alignment, softcap, alibi_slopes, sinks, heads_q=q.shape[1], batch=batch,
        seqlens_differ=lengths["cu_seqlens_q"] != lengths["cu_seqlens_k"])
    scale = _resolve_scale(scale, q.shape[-1])
    name = dispatch.choose_backend(backend, q.device, q.dtype, q.shape[-1], dropout=dropout_p > 0, varlen=True,
                                   value_head_dim=v.shape[-1], variants=used)
    rng_state = _draw_rng_state(q.device, name) if dropout_p > 0 else None
    if name == "reference":
        return reference.varlen_attention_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, dropout_p=dropout_p, scale=scale,
            rng_state=rng_state, return_lse=return_lse, **variants.keywords(), alibi_slopes=alibi_slopes,
            sinks=sinks)
    cu_q = cu_seqlens_q.to(device=q.device).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device).contiguous()
    run = VarlenAttentionFunction.apply if needs_autograd(q, k, v, alibi_slopes, sinks) else varlen_attention_fwd
    out, lse = run(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal), scale, dropout_p,
                   rng_state, name, variants, alibi_slopes, sinks)
    return (out, lse) if return_lse else out

"""HuggingFace transformers backend: ``attn_implementation="fastattn"``.

    from fastattn.integrations import huggingface
    huggingface.register()                                    # returns "fastattn"
    model = AutoModel.from_pretrained(path, attn_implementation="fastattn")
    model.set_attn_implementation("fastattn")                 # or switch an existing model

``register`` adds two entries to transformers' registries under the same name:
  * the attention function (``AttentionInterface``): transformers calls it with
    query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) and wants (B, Lq, Hq, Dv) back;
  * the mask function (``AttentionMaskInterface``): for the patterns the kernels know,
    causal and sliding-window causal (each with padding), it returns a ``CausalBandMask``
    (the band's window and a (B, 1, 1, Lk) key-padding mask: O(Lk) memory) which the
    attention function turns into ``causal`` + ``window_size`` + ``alignment="bottom_right"``;
    anything else (bidirectional, packed, custom overlays, a static cache whose queries do
    not end at the last key) gets the ``sdpa`` bool (B, 1, Lq, Lk) mask. Without a mask
    function transformers hands a custom implementation ``attention_mask=None`` and padding
    would be silently ignored.

The attention function runs ``fastattn.attention`` (GQA without repeating K/V, dropout
with fastattn's RNG, Gemma 2's ``softcap`` and GPT-OSS's sinks ``s_aux`` natively) or,
for sequences packed into one row (padding-free training, ``position_ids`` restarting, or
flash-attention style ``cu_seq_lens_q/k`` kwargs), ``fastattn.varlen_attention``.
Results equal the ``sdpa`` (or, for models without one, the ``eager``) implementation's.
transformers is imported only by this module (``pip install fastattn[hf]``).

Versions: a model runs a registered implementation only where its attention layer looks it up in
``ALL_ATTENTION_FUNCTIONS``: the decoder families above from transformers 4.53, BERT-style encoders
(BERT, RoBERTa, ...) from 5.0; before 5.0 those pick one of their own classes by name and raise
``KeyError: 'fastattn'`` (tested here: this module's tests on 4.53.3, transformers' own model tests
on 5.0, see tests/upstream/run.py).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .. import api

NAME = "fastattn"


def register(name: str = NAME) -> str:
    """Register fastattn as attention implementation ``name`` in transformers; returns ``name``."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/' (which transformers reads as a hub "
                         f"kernel repository), got {name!r}")
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("fastattn.integrations.huggingface needs transformers >= 4.53: "
                          "pip install 'fastattn[hf]'") from e
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError("fastattn.integrations.huggingface needs transformers >= 4.53 (AttentionMaskInterface, "
                          "without which a custom attention gets no padding mask): pip install 'fastattn[hf]'") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, band_mask)
    return name


# ---------------------------------------------------------------------------------------------
# The mask function: causal and sliding-window bands stay O(Lk)
# ---------------------------------------------------------------------------------------------
@dataclass
class CausalBandMask:
    """What transformers' causal (``window`` 0) or sliding-window (``window`` w: key j visible to
    query i iff i - w < j <= i) mask is, for queries that end at the last key: the band and a
    bool key-padding mask (B, 1, 1, Lk) (None: no padding). ``dense()`` materialises the sdpa mask."""

    window: int
    key_padding: Optional[torch.Tensor]
    batch_size: int
    q_length: int
    kv_length: int
    sdpa_args: dict  # how to build the equivalent sdpa mask

    # It reads as a prepared 4-D mask to transformers (generate() builds masks ahead of the forward for
    # compileable caches, and the forward's mask creation passes 4-D masks through unchanged).
    ndim = 4

    @property
    def shape(self) -> tuple:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def dense(self) -> Optional[torch.Tensor]:
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(**self.sdpa_args)


def _band_window(mask_function) -> Optional[int]:
    """0 for transformers' causal mask function, w for its sliding_window_causal_mask_function(w), else None."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return 0
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = inspect.getclosurevars(mask_function).nonlocals.get("mask_functions", ())
    if len(parts) != 2 or parts[1] is not mu.causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask":
        return None
    window = inspect.getclosurevars(overlay).nonlocals.get("sliding_window")
    return window if isinstance(window, int) and window > 0 else None


def band_mask(**mask_args):
    """transformers mask function: a CausalBandMask where the kernels can apply the pattern themselves,
    else exactly the ``sdpa`` mask (``sdpa_mask`` called with the same arguments).

    transformers calls mask functions with keyword arguments, whose names changed across versions:
    the queries are ``q_length`` + ``q_offset`` (newer releases) or ``cache_position``, the tensor of
    their positions (up to 5.0); both are read here, and everything is passed on to ``sdpa_mask`` as given.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    attention_mask = mask_args.get("attention_mask")
    if isinstance(attention_mask, CausalBandMask):  # prepared ahead (generate with a compileable cache): as-is,
        return attention_mask                        # as transformers passes prepared 4-D tensor masks through
    batch_size, kv_length = mask_args["batch_size"], mask_args["kv_length"]
    kv_offset = mask_args.get("kv_offset", 0)
    q_length, q_offset = _query_span(mask_args)
    mask_function = mask_args.get("mask_function") or causal_mask_function
    window = None if mask_args.get("use_vmap", False) else _band_window(mask_function)
    # bottom-right alignment is the band only when the queries end at the last key (a dynamic or sliding
    # cache, no cache); a static cache's unfilled tail (tensor q_offset) keeps the dense mask. One query
    # under plain causal masking sees every key: the sdpa mask is (B, 1, 1, Lk) or None, no bigger than
    # the band's, and a compiled decode loop over a static cache then gets the same mask type at every
    # step (the band would appear at the step that fills the cache, and recompile the graph)
    if (window is None or not isinstance(q_offset, int) or not isinstance(kv_offset, int)
            or q_offset - kv_offset != kv_length - q_length or (window == 0 and q_length == 1)):
        return sdpa_mask(**mask_args)
    key_padding = None
    if attention_mask is not None:  # (B, seen keys) 2-D padding mask: pad to the cache's length, take this span
        missing = kv_offset + kv_length - attention_mask.shape[-1]
        padding = torch.nn.functional.pad(attention_mask, (0, missing)) if missing > 0 else attention_mask
        device = mask_args.get("device", attention_mask.device)
        keep = padding[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
        if not bool(keep.all()):
            key_padding = keep[:, None, None, :]  # (B, 1, 1, Lk)
    return CausalBandMask(window, key_padding, batch_size, q_length, kv_length, dict(mask_args))


def _query_span(mask_args):
    """(number of queries, position of the first) from either form transformers passes; the position
    is None where it is only known as a tensor under torch.compile, or the positions are not a range."""
    if "q_length" in mask_args:
        return mask_args["q_length"], mask_args.get("q_offset", 0)
    cache_position = mask_args["cache_position"]  # (Lq,) positions of the queries
    q_length = cache_position.shape[0]
    if torch.compiler.is_compiling() or q_length == 0:
        return q_length, None
    first, last = cache_position[[0, -1]].tolist()
    return q_length, (first if last - first == q_length - 1 else None)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function on fastattn.

    Args:
        module: the calling attention layer (its ``is_causal`` is the default for ``is_causal``).
        query: (B, Hq, Lq, D); key: (B, Hkv, Lk, D); value: (B, Hkv, Lk, Dv), Hq % Hkv == 0.
        attention_mask: None, bool (B|1, 1|Hq, Lq, Lk) (True = may attend) or float (added).
        dropout: attention dropout probability (transformers passes 0 in eval mode).
        scaling: logit scale (default 1/sqrt(D)).
        is_causal: overrides ``module.is_causal``; used only when there is no mask, as in ``sdpa``.
        kwargs: ``position_ids`` / ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``,
            ``max_length_k`` select the packed (varlen) path; ``position_bias`` (an additive bias
            that needs no gradient) is folded into the mask; ``softcap`` (Gemma 2) and the
            attention sinks ``s_aux`` (GPT-OSS: one logit per query head) go to the kernel;
            ``sliding_window`` is read from the mask (its pattern is the mask function's).
    Returns:
        (attn_output (B, Lq, Hq, Dv), None): fastattn computes no attention weights.
    """
    variants = {}
    if kwargs.get("softcap") is not None:
        variants["softcap"] = float(kwargs["softcap"])
    sinks = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
    if sinks is not None:
        variants["sinks"] = sinks
    if kwargs.get("output_attentions", False):
        warnings.warn("attn_implementation='fastattn' does not return attention weights "
                      "(output_attentions=True); use attn_implementation='eager' to get them", stacklevel=2)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    if isinstance(attention_mask, CausalBandMask):
        band = attention_mask
        if (band.q_length, band.kv_length) == (q_len, kv_len) and kwargs.get("position_bias") is None:
            window = (band.window - 1, 0) if band.window else (-1, -1)
            out = api.attention(query, key, value, causal=True, alignment="bottom_right", window_size=window,
                                attn_mask=band.key_padding, dropout_p=dropout, scale=scaling, **variants)
            return out.transpose(1, 2).contiguous(), None  # (B, Lq, Hq, Dv)
        attention_mask = band.dense()  # shapes transformers did not announce: the sdpa mask, as always
    if attention_mask is not None and attention_mask.shape[-1] > kv_len:
        attention_mask = attention_mask[..., :kv_len]  # masks built for a longer (static) cache

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        attention_mask, is_causal = _fold_position_bias(position_bias, attention_mask, is_causal, q_len, kv_len)

    packed = _packed_sequences(query, key, attention_mask, is_causal, kwargs)
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        out = api.varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1),  # (total, H, D) views
                                   value[0].transpose(0, 1), cu_q, cu_k, max_q, max_k, causal=bool(is_causal),
                                   dropout_p=dropout, scale=scaling, **variants)  # (total_q, Hq, Dv)
        return out.unsqueeze(0), None  # (1, Lq, Hq, Dv)

    # As sdpa: the causal flag only without a mask and outside single-token decoding.
    causal = bool(is_causal and attention_mask is None and q_len > 1)
    if causal and kv_len > q_len:
        # prefill into an empty static cache: top-left causal never reaches the keys past q_len
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = api.attention(query, key, value, causal=causal, attn_mask=attention_mask, dropout_p=dropout,
                        scale=scaling, **variants)  # (B, Hq, Lq, Dv), stored as (B, Lq, Hq, Dv)
    return out.transpose(1, 2).contiguous(), None


def _fold_position_bias(position_bias, attention_mask, is_causal, q_len, kv_len):
    """An additive (B|1, H, Lq, Lk) bias merged into one float mask (sdpa does the same)."""
    if position_bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("attn_implementation='fastattn' does not compute gradients for position_bias (a learned "
                         "additive attention bias); use attn_implementation='sdpa' to train this model")
    bias = position_bias.detach()
    if attention_mask is None:
        if is_causal and q_len > 1:
            hidden = torch.ones(q_len, kv_len, dtype=torch.bool, device=bias.device).triu(1)  # key j > query i
            bias = bias.masked_fill(hidden, float("-inf"))
        return bias, False
    if attention_mask.dtype == torch.bool:
        return bias.masked_fill(~attention_mask, float("-inf")), False
    return bias + attention_mask, False


def _packed_sequences(query, key, attention_mask, is_causal, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) when several sequences are packed into one row, else None.

    Packing is read from flash-attention style kwargs (cu_seq_lens_q/k, max_length_q/k) or from
    ``position_ids`` that restart. It is used only where the mask transformers built agrees (the
    block-diagonal, causal or not, pattern of those sequences), or, without a mask, when the
    cu_seq_lens kwargs say so explicitly; anything else (sliding windows, a cache, padding) keeps
    the dense path with the mask, which is always correct.
    """
    B, _, q_len, _ = query.shape
    if B != 1 or q_len < 2 or key.shape[2] != q_len:
        return None
    explicit = [kwargs.get(n) for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in explicit):
        cu_q, cu_k, max_q, max_k = explicit
        if not torch.equal(cu_q.cpu(), cu_k.cpu()):
            return None  # different query/key packing: only the mask can describe it
        cu = cu_q.to(device=query.device, dtype=torch.int32)
        if attention_mask is not None and not _mask_is_block_diagonal(attention_mask, cu, q_len, is_causal):
            return None
        return cu, cu, int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    if attention_mask is None or position_ids is None or position_ids.shape[-1] != q_len:
        return None
    pos = position_ids.reshape(-1, q_len)[0]
    # a sequence starts where the position does not follow the previous one (transformers' rule)
    restarts = torch.nonzero(torch.diff(pos) != 1).flatten() + 1
    if restarts.numel() == 0:
        return None  # one sequence: the dense path
    cu = torch.cat([restarts.new_zeros(1), restarts, restarts.new_tensor([q_len])])
    cu = cu.to(device=query.device, dtype=torch.int32)  # (num_sequences + 1,)
    if not _mask_is_block_diagonal(attention_mask, cu, q_len, is_causal):
        return None
    max_len = int(cu.diff().max())
    return cu, cu, max_len, max_len


def _mask_is_block_diagonal(attention_mask, cu, length, causal) -> bool:
    if attention_mask.dtype != torch.bool or attention_mask.shape != (1, 1, length, length):
        return False
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff())  # (length,)
    expected = seq[:, None] == seq[None, :]  # (L, L) same sequence
    if causal:
        expected = expected.tril()
    return torch.equal(attention_mask[0, 0], expected.to(attention_mask.device))

"""fastattn.nn.MultiheadAttention: torch.nn.MultiheadAttention on the fused kernel.

A subclass of ``torch.nn.MultiheadAttention`` with the same constructor, the same
parameters (so the same ``state_dict`` keys) and the same ``forward``; only the
attention itself changes: ``fastattn.attention`` instead of torch's
``F.multi_head_attention_forward``. Padding masks, attention masks, causal hints,
``add_bias_kv`` and ``add_zero_attn`` all become one bool or float mask for the
kernel; the weights asked for with ``need_weights=True`` are recomputed from the
log-sum-exp the kernel returns (one extra ``q kᵀ``, no second softmax pass).

Where results differ from torch's on purpose:
  * a query row that may see no key gives a zero output and zero weights
    (torch's SDPA path gives zeros too; its ``need_weights=True`` path gives NaN);
  * dropout uses fastattn's counter-based RNG, so dropped positions differ from
    torch's (same rate, same 1/(1-p) rescaling, the same draw for out and weights);
  * invalid shapes raise ValueError/TypeError naming the argument (torch: AssertionError).
"""

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import api
from ..reference import dropout_keep_mask
from ..errors import MultiheadAttentionInputError, MultiheadAttentionTypeError


def _keep_torch_fused_encoder_off(module, args):
    """No-op forward pre-hook. ``torch.nn.TransformerEncoderLayer`` skips its fused C++
    inference path (which would read our weights and run torch's own attention, never
    calling this module) whenever a submodule has a hook; this hook is there for that.
    TorchScript does not get it (``__prepare_scriptable__``)."""
    return None


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` whose attention runs on ``fastattn.attention``.

    Args (as torch's): embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None.
    Parameters and ``state_dict`` keys are torch's (``in_proj_weight`` or
    ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj.*``), so
    ``load_state_dict`` works both ways with ``strict=True``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.register_forward_pre_hook(_keep_torch_fused_encoder_off)

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: removes the no-op pre-hook, which TorchScript cannot compile for a
        forward with default arguments. Without it a ``TransformerEncoderLayer`` holding this module may take
        torch's fused inference path again (torch's kernel, the same math), scripted or not; say so."""
        hooks = [key for key, hook in self._forward_pre_hooks.items() if hook is _keep_torch_fused_encoder_off]
        if hooks:
            warnings.warn("fastattn.nn.MultiheadAttention: scripting removes its no-op forward pre-hook; in eval "
                          "mode a torch.nn.TransformerEncoderLayer that holds it may now run torch's fused "
                          "attention (same result, torch's kernel) instead of fastattn's", stacklevel=2)
        for key in hooks:
            del self._forward_pre_hooks[key]
        return self

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> "MultiheadAttention":
        """A fastattn module sharing ``module``'s parameters (the very same Parameter objects,
        so optimizers keep working), its forward hooks and its training mode."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise MultiheadAttentionTypeError(
                f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout,
                  bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                  add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                  batch_first=module.batch_first, device="meta", dtype=module.out_proj.weight.dtype)
        for name, param in module._parameters.items():  # replaces the meta placeholders
            new._parameters[name] = param
        new.out_proj = module.out_proj
        new.train(module.training)
        for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(module, hooks):  # the user's hooks keep firing (e.g. activation capture)
                getattr(new, hooks).update(getattr(module, hooks))
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Same arguments and results as ``torch.nn.MultiheadAttention.forward``.

        Shapes (E = embed_dim, N batch, L target length, S source length; (N, L, E) when batch_first):
            query (L, N, E) or unbatched (L, E); key (S, N, kdim); value (S, N, vdim).
            key_padding_mask: (N, S) or (S,); bool (True = ignore the key) or float (added).
            attn_mask: (L, S) or (N * num_heads, L, S); bool (True = may not attend) or float (added).
            is_causal: hint that attn_mask is the causal mask (needs attn_mask, as in torch).
        Returns:
            attn_output (L, N, E) (or (N, L, E) / (L, E)); attn_weights (N, L, S) averaged over heads,
            (N, num_heads, L, S) per head ((L, S) / (num_heads, L, S) unbatched), or None without need_weights.
        """
        # TorchScript compiles this forward and leaves the implementation to Python (torch.jit.ignore), so a
        # scripted module that holds ours runs; it cannot be saved with torch.jit.save (Python is in it).
        return self._forward_impl(query, key, value, key_padding_mask, need_weights, attn_mask,
                                  average_attn_weights, is_causal)

    @torch.jit.ignore
    def _forward_impl(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor], need_weights: bool,
                      attn_mask: Optional[torch.Tensor], average_attn_weights: bool,
                      is_causal: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # Under TorchScript ``self`` is the scripted module: it has our attributes but not our Python
        # methods, so the helpers are called through the class.
        if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
            return MultiheadAttention._forward_nested(self, query, key, value, key_padding_mask, need_weights,
                                                      attn_mask, average_attn_weights, is_causal)
        # torch drops attn_mask unseen when the causal hint is given with no padding mask and no weights
        mask_dropped = is_causal and key_padding_mask is None and not need_weights
        q_in, k_in, v_in, kpm, mask, batched = MultiheadAttention._check_inputs(
            self, query, key, value, key_padding_mask, attn_mask, mask_dropped)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if batched and not self.batch_first:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))  # (N, L|S, E), views
        elif not batched:
            q_in, k_in, v_in = (t.unsqueeze(0) for t in (q_in, k_in, v_in))  # (1, L|S, E)
            kpm = kpm.unsqueeze(0) if kpm is not None else None  # (1, S)
        B, L, _ = q_in.shape
        H, E = self.num_heads, self.embed_dim
        D = E // H

        q, k, v = MultiheadAttention._in_projection(self, q_in, k_in, v_in)  # (N, L, E), (N, S, E), (N, S, E)
        extra_keys = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)  # (N, S + 1, E)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
            extra_keys += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, 1, E)], dim=1)  # (N, S' + 1, E)
            v = torch.cat([v, v.new_zeros(B, 1, E)], dim=1)
            extra_keys += 1
        S = k.shape[1]
        q = q.view(B, L, H, D).transpose(1, 2)  # (N, H, L, D), a view
        k = k.view(B, S, H, D).transpose(1, 2)  # (N, H, S, D)
        v = v.view(B, S, H, D).transpose(1, 2)  # (N, H, S, D)

        # torch's rule for the causal hint: SDPA gets is_causal (attn_mask dropped) when there is no key
        # padding mask and no weights are asked for. Without extra keys the hint means the mask *is* the
        # causal one, so we use causal=True (faster, same result) in the other cases too.
        causal = bool(is_causal) and (extra_keys == 0 or (kpm is None and not need_weights))
        if causal:
            mask = None
        mask = _merge_masks(mask, kpm, B, H, L, S - extra_keys, q.dtype)
        if mask is not None and extra_keys:
            # the appended keys are visible to every query: pad with "attend" (True / 0.0)
            mask = F.pad(mask, (0, extra_keys), value=True if mask.dtype == torch.bool else 0.0)

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, lse, rng_state = _attention_with_rng_state(q, k, v, causal, mask, dropout_p)
        else:
            out, lse, rng_state = api.attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=dropout_p), None, None

        out = out.transpose(1, 2).reshape(B, L, E)  # (N, L, H, D) -> (N, L, E); the kernel writes it this way
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)  # (L, E)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (L, N, E)
        if not need_weights:
            return out, None

        weights = attention_weights_from_lse(q, k, lse, causal=causal, attn_mask=mask)  # (N, H, L, S)
        if dropout_p > 0:
            keep = dropout_keep_mask(rng_state, dropout_p, H, L, S, batch=B, device=q.device)
            weights = weights * keep / (1.0 - dropout_p)
        weights = weights.to(q.dtype)
        if average_attn_weights:
            weights = weights.mean(dim=1)  # (N, L, S)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights

    # ------------------------------------------------------------------------------------------
    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                        is_causal):
        """Nested (ragged) batches: query (N, L_i, E), key (N, S_i, kdim), value (N, S_i, vdim), batch_first.

        Strided nested tensors (what torch.nn.TransformerEncoder builds with enable_nested_tensor) and jagged
        ones (torch.nested.nested_tensor(..., layout=torch.jagged)) both work, forward and backward; the
        output has query's layout. Without weights the sequences go through fastattn.varlen_attention
        packed, with no padding; need_weights=True runs the padded module and returns the weights padded to
        (N, L_max, S_max) with zeros outside each sequence (as torch's fast path returns them).
        """
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not (isinstance(t, torch.Tensor) and t.is_nested):
                raise MultiheadAttentionInputError(
                    f"query, key and value must all be nested tensors or all be dense; {name} is "
                    f"{type(t).__name__ if not isinstance(t, torch.Tensor) else 'a dense tensor'}")
            if t.dim() != 3:  # torch's words first
                raise MultiheadAttentionInputError(
                    f"query should be unbatched 2D or batched 3D tensor but received {t.dim()}-D query tensor: "
                    f"{name} must be a 3-D nested tensor (N, L_i, E), got {t.dim()}-D")
        if not self.batch_first:
            raise MultiheadAttentionInputError(
                "nested tensors need batch_first=True (they are (N, L_i, E)), as torch's MultiheadAttention does")
        if key_padding_mask is not None or attn_mask is not None:
            raise MultiheadAttentionInputError(
                "key_padding_mask and attn_mask must be None with nested tensors: the nesting already says which "
                "positions exist")
        if is_causal:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        q_vals, q_lens = _nested_values(query)  # (total_q, E), [L_i]
        k_vals, k_lens = (q_vals, q_lens) if key is query else _nested_values(key)  # (total_k, kdim), [S_i]
        v_vals, v_lens = (k_vals, k_lens) if value is key else _nested_values(value)
        if len(q_lens) != len(k_lens) or k_lens != v_lens:
            raise MultiheadAttentionInputError(
                f"key and value must have the same sequence lengths and query the same batch size, got query "
                f"{q_lens}, key {k_lens}, value {v_lens}")
        MultiheadAttention._check_widths(self, q_vals, k_vals, v_vals, lambda t: t.shape[-1])
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return MultiheadAttention._forward_nested_padded(self, query, key, value, q_lens, k_lens, need_weights,
                                                             average_attn_weights)

        H, E = self.num_heads, self.embed_dim
        # (total_q | total_k, E) each; self-attention (the same values tensor three times): one matmul
        q, k, v = MultiheadAttention._in_projection(self, q_vals, k_vals, v_vals)
        cu_q = _prefix_sums(q_lens, q.device)
        cu_k = _prefix_sums(k_lens, q.device)
        out = api.varlen_attention(q.view(-1, H, E // H), k.view(-1, H, E // H), v.view(-1, H, E // H), cu_q, cu_k,
                                   max(q_lens, default=0), max(k_lens, default=0),
                                   dropout_p=self.dropout if self.training else 0.0)  # (total_q, H, D)
        out = F.linear(out.reshape(-1, E), self.out_proj.weight, self.out_proj.bias)  # (total_q, E)
        return _nested_like(query, out, q_lens), None

    def _forward_nested_padded(self, query, key, value, q_lens, k_lens, need_weights, average_attn_weights):
        """The padded module on nested inputs (weights asked for, or extra bias/zero keys)."""
        padded = [t.to_padded_tensor(0.0) for t in (query, key, value)]  # (N, L_max|S_max, E|kdim|vdim)
        S_max = padded[1].shape[1]
        key_lens = torch.tensor(k_lens, device=padded[1].device)
        kpm = torch.arange(S_max, device=key_lens.device) >= key_lens[:, None]  # (N, S_max), True = padding
        out, weights = MultiheadAttention._forward_impl(self, *padded, kpm, need_weights, None, average_attn_weights,
                                                        False)  # (N, L_max, E)
        if weights is not None:
            L_max = padded[0].shape[1]
            real_rows = torch.arange(L_max, device=kpm.device) < torch.tensor(q_lens, device=kpm.device)[:, None]
            real_rows = real_rows.view(len(q_lens), *([1] * (weights.dim() - 3)), L_max, 1)  # (N, [1,] L_max, 1)
            weights = weights * real_rows  # padded query rows have no weights
        rows = [out[i, :n] for i, n in enumerate(q_lens)]
        return _nested_like(query, torch.cat(rows) if rows else out.reshape(0, out.shape[-1]), q_lens), weights

    # ------------------------------------------------------------------------------------------
    def _in_projection(self, query, key, value):
        """q, k, v = the three input projections of (N, L|S, E|kdim|vdim) inputs."""
        E = self.embed_dim
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            if query is key and key is value:  # self-attention: one matmul
                qkv = _linear(query, self.in_proj_weight, bias)  # (N, L, 3E)
                return qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if bias is not None:
            b_q, b_k, b_v = bias.chunk(3)
        return _linear(query, w_q, b_q), _linear(key, w_k, b_k), _linear(value, w_v, b_v)

    def _check_widths(self, query, key, value, shape_of):
        """The last dims are embed_dim, kdim and vdim; ``shape_of`` says how a failing input is shown."""
        for name, t, width, width_name in (("query", query, self.embed_dim, "embed_dim"),
                                           ("key", key, self.kdim, "kdim"), ("value", value, self.vdim, "vdim")):
            if t.shape[-1] != width:
                raise MultiheadAttentionInputError(
                    f"{name} must have last dim {width} ({width_name}), got {shape_of(t)}")

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, mask_dropped=False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise MultiheadAttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
        # The dimension checks say what torch's say, word for word (code matches on them), then what we expect.
        if query.dim() not in (2, 3):
            raise MultiheadAttentionInputError(
                f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor: "
                f"query must be batched 3-D {layout} or unbatched 2-D (L, E), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise MultiheadAttentionInputError(
                f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found {key.dim()}-D and "
                f"{value.dim()}-D tensors respectively (key {tuple(key.shape)}, value {tuple(value.shape)})")
        if key_padding_mask is not None and isinstance(key_padding_mask, torch.Tensor) \
                and key_padding_mask.dim() != query.dim() - 1:
            raise MultiheadAttentionInputError(
                f"For {kind} `query`, expected `key_padding_mask` to be `None` or {query.dim() - 1}-D but found "
                f"{key_padding_mask.dim()}-D tensor instead ({'(N, S)' if batched else '(S,)'}, got shape "
                f"{tuple(key_padding_mask.shape)})")
        if attn_mask is not None and isinstance(attn_mask, torch.Tensor) and attn_mask.dim() not in (2, 3):
            raise MultiheadAttentionInputError(
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found {attn_mask.dim()}-D "
                f"tensor instead (got shape {tuple(attn_mask.shape)})")
        MultiheadAttention._check_widths(self, query, key, value, lambda t: f"shape {tuple(t.shape)}")
        seq_axis = 1 if (self.batch_first and batched) else 0
        if key.shape[:-1] != value.shape[:-1]:
            raise MultiheadAttentionInputError(
                f"key and value must have the same batch and sequence dims, got key {tuple(key.shape)}, "
                f"value {tuple(value.shape)}")
        if batched and query.shape[1 - seq_axis] != key.shape[1 - seq_axis]:
            raise MultiheadAttentionInputError(
                f"query and key batch sizes differ: query {tuple(query.shape)}, key {tuple(key.shape)} "
                f"(layout {layout})")
        N = query.shape[1 - seq_axis] if batched else None
        L, S = query.shape[seq_axis], key.shape[seq_axis]
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and not isinstance(m, torch.Tensor):
                raise MultiheadAttentionTypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
            if m is not None and m.dtype != torch.bool and not m.is_floating_point():
                raise MultiheadAttentionTypeError(f"{name} must be bool or floating point, got {m.dtype}")
        if key_padding_mask is not None:
            expected = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != expected:
                raise MultiheadAttentionInputError(
                    f"key_padding_mask must have shape {'(N, S)' if batched else '(S,)'} = {expected}, "
                    f"got {tuple(key_padding_mask.shape)}")
        if mask_dropped:
            attn_mask = None  # its dimensions were checked above; its shape is not (torch's rule)
        if attn_mask is not None:
            three_d = (N * self.num_heads if batched else self.num_heads, L, S)
            if tuple(attn_mask.shape) not in ((L, S), three_d):
                expected = f"Expected `attn_mask` shape to be {three_d} but got {attn_mask.shape}: " \
                    if attn_mask.dim() == 3 else ""
                raise MultiheadAttentionInputError(
                    f"{expected}attn_mask must have shape (L, S) = {(L, S)} or "
                    f"({'N * num_heads' if batched else 'num_heads'}, L, S) = {three_d}, "
                    f"got {tuple(attn_mask.shape)}")
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=3)  # torch's own warning
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(N if batched else 1, self.num_heads, L, S)  # (N, H, L, S)
            else:
                attn_mask = attn_mask.view(1, 1, L, S)
        return query, key, value, key_padding_mask, attn_mask, batched


def _linear(x, weight, bias):
    """F.linear, also for a bias of another dtype than x (torch's module accepts one: its matmul + add promotes)."""
    if bias is not None and bias.dtype != x.dtype:
        return F.linear(x, weight) + bias
    return F.linear(x, weight, bias)


def _nested_values(t):
    """(values (total, E), [length of each sequence]) of a 3-D nested tensor, strided or jagged."""
    if t.layout == torch.jagged:
        if t._ragged_idx != 1:
            raise MultiheadAttentionInputError(
                f"a jagged nested tensor must be ragged in dim 1 ((N, L_i, E)), got ragged dim {t._ragged_idx}")
        offsets = t.offsets()
        return t.values(), (offsets[1:] - offsets[:-1]).tolist()
    pieces = t.unbind()  # each (L_i, E)
    return torch.cat(pieces), [p.shape[0] for p in pieces]


def _nested_like(like, values, lengths):
    """A nested tensor of ``like``'s layout holding ``values`` (total, E) split by ``lengths``."""
    if like.layout == torch.jagged:
        return torch.nested.nested_tensor_from_jagged(values, offsets=like.offsets())
    return torch.nested.as_nested_tensor(list(values.split(lengths)), layout=torch.strided)


def _prefix_sums(lengths, device):
    """int32 (len + 1,) cumulative lengths, starting at 0 (varlen_attention's cu_seqlens)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)


def _merge_masks(attn_mask, key_padding_mask, B, H, L, S, dtype):
    """One kernel mask, broadcastable to (B, H, L, S), from torch's two.

    attn_mask: (1|B, 1|H, L, S), torch convention (bool True = may NOT attend; float added);
    key_padding_mask: (B, S), same convention. Returns None, a bool mask (True = may attend,
    when both are bool; keeps the kernel's key-padding fast path) or a float mask in ``dtype``
    (bool parts become -inf where masked, as torch's ``_canonical_mask`` does).
    """
    kpm = key_padding_mask.view(B, 1, 1, S) if key_padding_mask is not None else None  # (B, 1, 1, S)
    masks = [m for m in (attn_mask, kpm) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        for m in masks[1:]:
            keep = keep & ~m  # (B|1, H|1, L|1, S)
        return keep
    total = None
    for m in masks:
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        total = m if total is None else total + m
    return total


def _attention_with_rng_state(q, k, v, causal, mask, dropout_p):
    """fastattn.attention(..., return_lse=True) and the (seed, offset) its dropout used (None without)."""
    (out, lse), rng_state = api._call_recording_rng_state(
        lambda: api.attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=dropout_p, return_lse=True),
        q.device, dropout_p)
    return out, lse, rng_state


class _ProbsFromLSE(torch.autograd.Function):
    """probs = exp(scores - lse), where lse = logsumexp(scores) was saved by the fused kernel.

    Forward skips the softmax's max and sum passes; backward is the softmax's:
    dscores = probs * (dprobs - sum(dprobs * probs)). Rows with lse = -inf (no visible key) are 0.
    """

    @staticmethod
    def forward(ctx, scores, lse):
        probs = torch.exp(scores - lse.unsqueeze(-1))
        probs = probs.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
        return grad_scores, None


def attention_weights_from_lse(q, k, lse, *, causal: bool = False, attn_mask: Optional[torch.Tensor] = None,
                               scale: Optional[float] = None) -> torch.Tensor:
    """The softmax probabilities of an attention call, rebuilt from its log-sum-exp.

    q (B, H, L, D), k (B, H, S, D), lse (B, H, L) as returned by ``fastattn.attention(...,
    return_lse=True)``; attn_mask and causal as given to that call (kernel convention: bool True =
    may attend). Returns (B, H, L, S) in lse's dtype (float32, float64 for float64), differentiable
    with respect to q and k; without dropout.
    """
    D = q.shape[-1]
    scale = api._resolve_scale(scale, D)
    cdt = lse.dtype
    scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale  # (B, H, L, S)
    L, S = scores.shape[-2:]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(cdt)
    if causal:
        hidden = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)  # key j > query i
        scores = scores.masked_fill(hidden, float("-inf"))
    return _ProbsFromLSE.apply(scores, lse.detach())


def replace_attention(model: torch.nn.Module) -> int:
    """Swap every ``torch.nn.MultiheadAttention`` inside ``model`` for fastattn's, in place.

    Parameters are shared, not copied (optimizers keep working); a module used in several places
    is swapped once and stays shared. Subclasses of torch's module are left alone (their forward
    may differ). A ``torch.nn.TransformerEncoder``'s inference path (nested tensors) keeps working:
    its layers hand our module the nested batch, which runs packed through varlen attention.
    Returns the number of modules swapped.
    """
    if not isinstance(model, torch.nn.Module):
        raise MultiheadAttentionTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is torch.nn.MultiheadAttention:
        raise MultiheadAttentionTypeError(
            "replace_attention swaps submodules in place and cannot replace the module it is given; "
            "use fastattn.nn.MultiheadAttention.from_torch(module) for a single module")
    swapped = {}  # id(torch module) -> fastattn module
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.MultiheadAttention:
                if id(child) not in swapped:
                    swapped[id(child)] = MultiheadAttention.from_torch(child)
                setattr(parent, name, swapped[id(child)])
    return len(swapped)

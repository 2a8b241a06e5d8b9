"""Op registration and autograd, in one place.

The schemas of ``torch.ops.fastattn.*`` are defined in C++ (csrc/ops.cpp) and
each backend registers its kernels for its device there. This module loads the
compiled extensions, gives every op a fake (meta) kernel so that
``torch.compile`` can trace it, and pairs the forward and backward ops in
``torch.autograd.Function``s.

Op contract (all backends):
  fwd(q, k, v, attn_mask?, causal, scale, dropout_p, rng_state?) -> (out, lse)
      q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)
      out (B, Hq, Nq, Dv) in q's dtype, stored as (B, Nq, Hq, Dv) and viewed;
      lse (B, Hq, Nq) float32 (float64 for float64 inputs)
  bwd(grad_out, q, k, v, out, lse, attn_mask?, causal, scale, dropout_p, rng_state?)
      -> (grad_q, grad_k, grad_v), laid out like q, k, v
  varlen_fwd / varlen_bwd: the same on packed (total, H, D) tensors with
      cu_seqlens_q / cu_seqlens_k; lse is (Hq, total_q).
  rng_state: int64 (seed, offset) tensor, required when dropout_p > 0.
  After rng_state every op takes the variants (defaults: plain attention), see
  ``Variants``: window_left, window_right (-1: unbounded), bottom_right, softcap,
  alibi_slopes (Hq,) or (B, Hq); the forwards also take sinks (Hq,) and return
  an lse that includes them (so the backwards need not), and the gradient of
  the sinks is computed here from out, grad_out and lse (``sinks_grad``).
  triton_fwd / triton_bwd / triton_varlen_fwd / triton_varlen_bwd: the same
      contracts, served by the Triton kernels (csrc/triton); OP_PAIRS maps a
      backend name to its ops.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

try:
    from . import _C  # noqa: F401  (registers the schemas and the CPU kernels)
except ImportError as e:  # pragma: no cover - only without a build
    _C = None
    _C_IMPORT_ERROR = e
    import os as _os

    _package = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.exists(_os.path.join(_package, _os.pardir, "setup.py")):  # a source checkout, imported in place
        _C_IMPORT_ERROR = ImportError(
            f"{e}; fastattn was imported from the source checkout {_package} (the current directory comes first "
            "on sys.path), which has no build of the extension: run from another directory, or build in place "
            "with `pip install --no-build-isolation -e .`")
else:
    _C_IMPORT_ERROR = None

try:
    from . import _C_cuda  # noqa: F401  (registers the CUDA kernels, when built)
except ImportError:
    _C_cuda = None


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Variants(NamedTuple):
    """The plain (non-tensor) variant arguments every op takes after rng_state, in schema order."""

    window_left: int = -1  # keys d(i) - left .. d(i) + right visible; -1: unbounded
    window_right: int = -1
    bottom_right: bool = False  # diagonal d(i) = i + Nk - Nq (flash-attn) instead of i (torch)
    softcap: float = 0.0  # > 0: logit = softcap * tanh(logit / softcap)

    def keywords(self) -> dict:
        """The same variants as fastattn.attention's (and the reference's) keyword arguments."""
        return dict(window_size=(self.window_left, self.window_right),
                    alignment="bottom_right" if self.bottom_right else "top_left", softcap=self.softcap)


PLAIN = Variants()

# The schema text of the variants, as FASTATTN_VARIANT_ARGS in csrc/ops.cpp (the Triton ops get it too).
_VARIANT_ARGS = ("int window_left=-1, int window_right=-1, bool bottom_right=False, float softcap=0.0, "
                 "Tensor? alibi_slopes=None")


def _fwd_fake(q, k, v, attn_mask, causal, scale, dropout_p, rng_state, window_left=-1, window_right=-1,
              bottom_right=False, softcap=0.0, alibi_slopes=None, sinks=None):
    B, Hq, Nq, _ = q.shape
    out = q.new_empty(B, Nq, Hq, v.shape[-1]).transpose(1, 2)  # (B, Hq, Nq, Dv)
    lse = q.new_empty(B, Hq, Nq, dtype=lse_dtype(q.dtype))
    return out, lse


def _bwd_fake(grad_out, q, k, v, out, lse, attn_mask, causal, scale, dropout_p, rng_state, window_left=-1,
              window_right=-1, bottom_right=False, softcap=0.0, alibi_slopes=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                     dropout_p, rng_state, window_left=-1, window_right=-1, bottom_right=False, softcap=0.0,
                     alibi_slopes=None, sinks=None):
    total_q, Hq, _ = q.shape
    out = q.new_empty(total_q, Hq, v.shape[-1])  # (total_q, Hq, Dv)
    lse = q.new_empty(Hq, total_q, dtype=lse_dtype(q.dtype))
    return out, lse


def _varlen_bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal, scale, dropout_p, rng_state, window_left=-1, window_right=-1, bottom_right=False,
                     softcap=0.0, alibi_slopes=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


if _C is not None:
    torch.library.register_fake("fastattn::fwd", _fwd_fake)
    torch.library.register_fake("fastattn::bwd", _bwd_fake)
    torch.library.register_fake("fastattn::varlen_fwd", _varlen_fwd_fake)
    torch.library.register_fake("fastattn::varlen_bwd", _varlen_bwd_fake)


# ---------------------------------------------------------------------------
# Triton ops. The CPU and CUDA dispatch keys of fwd/bwd/varlen_* belong to the C++
# kernels, so the Triton kernels get ops of their own with the same schemas. They are
# custom ops (opaque to torch.compile, traced through the fake kernels above): the
# launcher reads the dropout seed from the CPU rng_state tensor and picks interpreter
# or GPU kernels at call time, which triton_op's tracing of the launcher would not allow.
# The kernel modules are imported on the first call (TRITON_INTERPRET is read then).
# ---------------------------------------------------------------------------
# op name -> (launcher in fastattn.triton_kernels.launch, schema as in csrc/ops.cpp)
_TRITON_OPS = {
    "triton_fwd": ("attn_fwd", "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, float scale, "
                               "float dropout_p, Tensor? rng_state, " + _VARIANT_ARGS +
                               ", Tensor? sinks=None) -> (Tensor, Tensor)"),
    "triton_bwd": ("attn_bwd", "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                               "Tensor? attn_mask, bool causal, float scale, float dropout_p, Tensor? rng_state, "
                               + _VARIANT_ARGS + ") -> (Tensor, Tensor, Tensor)"),
    "triton_varlen_fwd": ("varlen_fwd", "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                                        "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
                                        "float dropout_p, Tensor? rng_state, " + _VARIANT_ARGS +
                                        ", Tensor? sinks=None) -> (Tensor, Tensor)"),
    "triton_varlen_bwd": ("varlen_bwd", "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                                        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
                                        "int max_seqlen_k, bool causal, float scale, float dropout_p, "
                                        "Tensor? rng_state, " + _VARIANT_ARGS + ") -> (Tensor, Tensor, Tensor)"),
}


def _triton_launcher(launcher: str):
    def run(*args):
        from .triton_kernels import launch  # first use: the kernels are decorated now

        return getattr(launch, launcher)(*args)
    run.__name__ = launcher
    return run


for _name, (_launcher, _schema) in _TRITON_OPS.items():
    torch.library.custom_op(f"fastattn::{_name}", _triton_launcher(_launcher), mutates_args=(), schema=_schema)
torch.library.register_fake("fastattn::triton_fwd", _fwd_fake)
torch.library.register_fake("fastattn::triton_bwd", _bwd_fake)
torch.library.register_fake("fastattn::triton_varlen_fwd", _varlen_fwd_fake)
torch.library.register_fake("fastattn::triton_varlen_bwd", _varlen_bwd_fake)


class OpPair:
    """The forward and backward ops (dense and varlen) of one kernel backend."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __getattr__(self, op: str):  # fwd, bwd, varlen_fwd, varlen_bwd (only called until cached)
        # The overload itself, not its packet, which would pick it again on every call (a few us);
        # kept as an attribute, so later calls find it without coming here.
        overload = getattr(torch.ops.fastattn, self.prefix + op).default
        setattr(self, op, overload)
        return overload


# Which ops run a backend: the C++ backends share fwd/bwd (dispatch by device), Triton has its own.
OP_PAIRS = {"cpu": OpPair(""), "cuda": OpPair(""), "triton": OpPair("triton_")}


def sinks_grad(sinks: Optional[torch.Tensor], out: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
               varlen: bool) -> Optional[torch.Tensor]:
    """d loss / d sinks[h] = -sum over rows of p_sink * rowsum(dO * O), p_sink = exp(sinks[h] - lse).

    A sink is a key of value zero, so its dP is 0 and dS_sink = p_sink (0 - delta); lse (which
    includes the sink) is -inf only on rows without one, whose p_sink is 0.
    """
    if sinks is None or not sinks.requires_grad:
        return None
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # (B, Hq, Nq) or (total_q, Hq)
    if varlen:
        delta = delta.transpose(0, 1)  # (Hq, total_q), like lse
        head_view = (-1, 1)
    else:
        head_view = (1, -1, 1)
    p_sink = torch.exp(sinks.to(lse.dtype).view(head_view) - lse)
    p_sink = torch.where(torch.isneginf(lse), torch.zeros_like(p_sink), p_sink)
    dims = (1,) if varlen else (0, 2)
    return (-(p_sink * delta).sum(dims)).to(sinks.dtype)


def needs_autograd(*tensors) -> bool:
    """Whether a call on these inputs must go through its autograd.Function: grad mode is on and
    one of them requires grad. Otherwise (inference) the forward op runs alone, without the
    Function's bookkeeping (tens of microseconds, as much as a short decode step's kernel)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any(generator): this runs on every call
        if t is not None and t.requires_grad:
            return True
    return False


def attention_fwd(q, k, v, attn_mask, causal, scale, dropout_p, rng_state, backend="cpu", variants=PLAIN,
                  alibi_slopes=None, sinks=None):
    """The forward op of ``backend``: what AttentionFunction.forward runs, and inference calls alone."""
    return OP_PAIRS[backend].fwd(q, k, v, attn_mask, causal, scale, dropout_p, rng_state, *variants, alibi_slopes,
                                 sinks)


def varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
                         rng_state, backend="cpu", variants=PLAIN, alibi_slopes=None, sinks=None):
    """The varlen forward op of ``backend`` (VarlenAttentionFunction.forward's, and inference's)."""
    return OP_PAIRS[backend].varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                        scale, dropout_p, rng_state, *variants, alibi_slopes, sinks)


class AttentionFunction(torch.autograd.Function):
    """out, lse = fwd(...); backward calls the bwd op (lse is not differentiable).

    Differentiable in q, k, v and sinks; ``variants`` is a :class:`Variants`.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, causal, scale, dropout_p, rng_state, backend="cpu", variants=PLAIN,
                alibi_slopes=None, sinks=None):
        out, lse = attention_fwd(q, k, v, attn_mask, causal, scale, dropout_p, rng_state, backend, variants,
                                 alibi_slopes, sinks)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, rng_state, alibi_slopes, sinks)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.backend, ctx.variants = causal, scale, dropout_p, backend, variants
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, attn_mask, rng_state, alibi_slopes, sinks = ctx.saved_tensors
        grad_q, grad_k, grad_v = OP_PAIRS[ctx.backend].bwd(
            grad_out, q, k, v, out, lse, attn_mask, ctx.causal, ctx.scale, ctx.dropout_p, rng_state, *ctx.variants,
            alibi_slopes)
        grads = (grad_q, grad_k, grad_v) + (None,) * 8 + (sinks_grad(sinks, out, grad_out, lse, varlen=False),)
        return grads[:len(ctx.needs_input_grad)]  # as many as forward was given


class VarlenAttentionFunction(torch.autograd.Function):
    """Packed-sequence counterpart of AttentionFunction."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
                rng_state, backend="cpu", variants=PLAIN, alibi_slopes=None, sinks=None):
        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                        scale, dropout_p, rng_state, backend, variants, alibi_slopes, sinks)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state, alibi_slopes, sinks)
        ctx.args = (max_seqlen_q, max_seqlen_k, causal, scale, dropout_p)
        ctx.backend, ctx.variants = backend, variants
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state, alibi_slopes, sinks = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, causal, scale, dropout_p = ctx.args
        grad_q, grad_k, grad_v = OP_PAIRS[ctx.backend].varlen_bwd(
            grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
            dropout_p, rng_state, *ctx.variants, alibi_slopes)
        grads = (grad_q, grad_k, grad_v) + (None,) * 11 + (sinks_grad(sinks, out, grad_out, lse, varlen=True),)
        return grads[:len(ctx.needs_input_grad)]  # as many as forward was given

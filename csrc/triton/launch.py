"""Launchers: shape the grid, allocate outputs and call the Triton kernels.

``attn_fwd`` / ``attn_bwd`` serve dense (B, H, N, D) inputs and
``varlen_fwd`` / ``varlen_bwd`` packed (total, H, D) ones, with the signatures of
the ``torch.ops.fastattn`` ops (see fastattn/_ops.py), which call them.

Kernel modules are imported on first use, because ``@triton.jit`` reads
TRITON_INTERPRET when it decorates: with TRITON_INTERPRET=1 set before the
first call, the kernels run in Triton's interpreter on CPU tensors (how the
tests run without a GPU) with one fixed block size; on a GPU they are autotuned.

fp32 inputs: tl.dot follows torch's matmul setting. With the default
``torch.get_float32_matmul_precision() == "highest"`` it multiplies in exact
IEEE fp32; with "high"/"medium" (or ``torch.backends.cuda.matmul.allow_tf32``)
it uses TF32 tensor cores (10-bit mantissa inputs, about 3x faster on Hopper).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import autotune as cfg

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


class _Kernels:
    """The kernels, built once on first use: autotuned on a GPU, one fixed config otherwise.

    Fixed configs: under the interpreter (INTERPRET_BLOCK_M/N), or on a GPU with
    FASTATTN_TRITON_AUTOTUNE=0 (e.g. test runs, where autotuning every new shape would
    cost more than the tests).
    """

    def __init__(self):
        from . import flash_bwd, flash_fwd

        self.interpret = cfg.interpreting()
        self.autotune = not self.interpret and cfg.autotune_enabled()
        self.preprocess = flash_bwd._attn_bwd_preprocess
        # resident fp32 tiles: fwd holds q and acc; dkdv holds k, v, dk, dv; dq holds q, do, dq
        self.specs = {"fwd": (flash_fwd._attn_fwd, cfg.FWD_SPACE, "M", 2),
                      "dkdv": (flash_bwd._attn_bwd_dkdv, cfg.BWD_DKDV_SPACE, "N", 4),
                      "dq": (flash_bwd._attn_bwd_dq, cfg.BWD_DQ_SPACE, "M", 3)}
        for name, (kernel, space, resident, tiles) in self.specs.items():
            setattr(self, name, cfg.autotuned(kernel, space, resident, tiles) if self.autotune else kernel)

    def options(self, name: str, head_dim: int) -> dict:
        """Launch options of kernel ``name``: {} when autotuned, else its fixed blocks (and warps/stages on a GPU)."""
        if self.autotune:
            return {}
        if self.interpret:
            return {"BLOCK_M": cfg.INTERPRET_BLOCK_M, "BLOCK_N": cfg.INTERPRET_BLOCK_N}
        _, space, resident, tiles = self.specs[name]
        m, n, warps, stages = cfg.fixed_config(space, head_dim, resident, tiles)
        return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}


_kernels: Optional[_Kernels] = None


def kernels() -> _Kernels:
    global _kernels
    if _kernels is None:
        _kernels = _Kernels()
    return _kernels


def _grid(blocks_along: int, block_key: str, programs: int, options: dict):
    """(cdiv(blocks_along, block), programs); a function of the config when autotuned (options empty)."""
    if options:
        return (triton.cdiv(blocks_along, options[block_key]), programs)
    return lambda meta: (triton.cdiv(blocks_along, meta[block_key]), programs)


def input_precision(dtype: torch.dtype) -> str:
    """"ieee" (exact) or "tf32" for fp32 inputs, following torch's float32 matmul precision."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _check_inputs(q, k, v, where: str) -> None:
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fastattn triton {where}: q must be float16, bfloat16 or float32, got {q.dtype}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"fastattn triton {where}: head dims up to {MAX_HEAD_DIM} are supported, got "
                         f"D={q.shape[-1]}, Dv={v.shape[-1]}")
    if not cfg.interpreting() and q.device.type != "cuda":
        raise ValueError(f"fastattn triton {where}: q must be a CUDA tensor (or set TRITON_INTERPRET=1 to run "
                         f"the kernels in Triton's CPU interpreter), got {q.device}")


@dataclass
class _Variants:
    """The variants as the kernels take them (tiles.py)."""

    consts: dict  # HAS_LEFT, HAS_RIGHT, BOTTOM_RIGHT, SOFTCAP, ALIBI
    alibi: torch.Tensor  # fp32 slopes (B|1, Hq), or a dummy pointer
    runtime: tuple  # window_left, window_right, softcap_scale, alibi_batch_stride
    qk_scale: float  # scale * log2(e), or scale / softcap under a soft-cap


def _variant_args(q, causal, scale, window_left, window_right, bottom_right, softcap, alibi_slopes) -> _Variants:
    """Causal is the band's right side at 0 (whatever window_right says, as fastattn.attention defines it)."""
    right = 0 if causal else window_right
    consts = dict(HAS_LEFT=window_left >= 0, HAS_RIGHT=right >= 0, BOTTOM_RIGHT=bool(bottom_right),
                  SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None)
    alibi = q if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
    alibi_batch_stride = alibi.shape[-1] if alibi_slopes is not None and alibi.dim() == 2 else 0
    runtime = (max(window_left, 0), max(right, 0), softcap * LOG2E, alibi_batch_stride)
    return _Variants(consts, alibi, runtime, scale / softcap if softcap > 0 else scale * LOG2E)


def _dropout_args(dropout_p: float, rng_state: Optional[torch.Tensor]) -> tuple:
    """(seed, offset, threshold, 1/(1-p)) as the kernels take them; the Philox convention of csrc/philox.h."""
    if dropout_p <= 0.0:
        return 0, 0, 0, 1.0
    if rng_state is None or rng_state.numel() != 2:
        raise ValueError("fastattn triton: dropout_p > 0 needs rng_state, an int64 (seed, offset) tensor of shape (2,)")
    seed, offset = (int(x) for x in rng_state.tolist())
    seed = seed & 0xFFFFFFFFFFFFFFFF
    if seed >= 2**63:  # passed as a signed int64 with the same bits
        seed -= 2**64
    threshold = min(int(math.floor(dropout_p * 4294967296.0 + 0.5)), 0xFFFFFFFF)  # as dropout_threshold
    return seed, offset & 0xFFFFFFFF, threshold, 1.0 / (1.0 - dropout_p)


def _mask_args(attn_mask: Optional[torch.Tensor], q: torch.Tensor, B: int, Hq: int, Nq: int, Nk: int) -> tuple:
    """(mask tensor, its 4 strides, MASK_KIND, MASK_ROW) for the kernels.

    The mask is expanded (a view, stride 0 on broadcast dims, nothing copied) to
    (B, Hq, Nq, Nk); bool masks are read through a uint8 view. MASK_ROW marks a mask
    that does not depend on the query (e.g. key padding (B, 1, 1, Nk)): one row per key block.
    """
    if attn_mask is None:
        return q, (0, 0, 0, 0), 0, False
    mask = attn_mask.expand(B, Hq, Nq, Nk)  # (B, Hq, Nq, Nk) view
    kind = 1 if mask.dtype == torch.bool else 2
    if kind == 1:
        mask = mask.view(torch.uint8)
    strides = tuple(mask.stride())
    return mask, strides, kind, (strides[2] == 0 or Nq == 1)


def _dense_strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _varlen_strides(t: torch.Tensor) -> tuple:
    """(total, H, D) seen as (batch, head, row, col) with a zero batch stride (rows start at cu_seqlens)."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
def _forward(q, k, v, out, lse, strides, lse_strides, mask_args, cu_q, cu_k, batch, Hq, Hkv, Nq, Nk, max_q,
             causal, scale, dropout_p, rng_state, variants: _Variants, sinks):
    kern = kernels()
    mask, mask_strides, mask_kind, mask_row = mask_args
    seed, offset, threshold, drop_scale = _dropout_args(dropout_p, rng_state)
    D, Dv = q.shape[-1], v.shape[-1]
    sq, sk, sv, so = strides
    varlen = cu_q is not None
    options = kern.options("fwd", max(D, Dv))
    sinks_arg = q if sinks is None else sinks.to(device=q.device, dtype=torch.float32).contiguous()
    kern.fwd[_grid(max_q, "BLOCK_M", batch * Hq, options)](
        q, k, v, out, lse, mask, cu_q if varlen else q, cu_k if varlen else q, variants.alibi, sinks_arg,
        *sq, *sk, *sv, *so, *lse_strides, *mask_strides,
        Hq, Hq // Hkv, Nq, Nk, D, Dv,
        variants.qk_scale, seed, offset, threshold, drop_scale, *variants.runtime,
        cfg.seqlen_bucket(max(max_q, Nk)),
        **variants.consts, SINKS=sinks is not None, MASK_KIND=mask_kind, MASK_ROW=bool(mask_row), IS_VARLEN=varlen,
        DROPOUT=dropout_p > 0.0, INPUT_PRECISION=input_precision(q.dtype),
        EMULATE_BF16=kern.interpret and q.dtype == torch.bfloat16,
        BLOCK_D=cfg.head_block(D), BLOCK_DV=cfg.head_block(Dv), **options)


def attn_fwd(q, k, v, attn_mask, causal, scale, dropout_p, rng_state, window_left=-1, window_right=-1,
             bottom_right=False, softcap=0.0, alibi_slopes=None, sinks=None):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides ->
    out (B, Hq, Nq, Dv) (stored (B, Nq, Hq, Dv)), lse (B, Hq, Nq) fp32."""
    _check_inputs(q, k, v, "fwd")
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, Nq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, Hq, Nq, Dv)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    _forward(q, k, v, out, lse, tuple(_dense_strides(t) for t in (q, k, v, out)), lse.stride(),
             _mask_args(attn_mask, q, B, Hq, Nq, Nk), None, None, B, Hq, Hkv, Nq, Nk, Nq,
             causal, scale, dropout_p, rng_state,
             _variant_args(q, causal, scale, window_left, window_right, bottom_right, softcap, alibi_slopes), sinks)
    return out, lse


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
               rng_state, window_left=-1, window_right=-1, bottom_right=False, softcap=0.0, alibi_slopes=None,
               sinks=None):
    """q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); cu_seqlens int32 (batch + 1,) ->
    out (total_q, Hq, Dv), lse (Hq, total_q) fp32."""
    _check_inputs(q, k, v, "varlen_fwd")
    total_q, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    batch = cu_seqlens_q.numel() - 1
    out = torch.empty(total_q, Hq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(Hq, total_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch <= 0 or max_seqlen_q <= 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    lse_strides = (0, lse.stride(0), lse.stride(1))
    _forward(q, k, v, out, lse, tuple(_varlen_strides(t) for t in (q, k, v, out)), lse_strides,
             (q, (0, 0, 0, 0), 0, False), cu_seqlens_q, cu_seqlens_k, batch, Hq, Hkv, 0, 0, max_seqlen_q,
             causal, scale, dropout_p, rng_state,
             _variant_args(q, causal, scale, window_left, window_right, bottom_right, softcap, alibi_slopes), sinks)
    return out, lse


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
def _backward(grad_out, q, k, v, out, lse, dq, dk, dv, layout, lse_strides, mask_args, cu_q, cu_k, batch, Hq, Hkv,
              Nq, Nk, max_q, max_k, causal, scale, dropout_p, rng_state, variants: _Variants):
    kern = kernels()
    strides = _dense_strides if layout == "dense" else _varlen_strides
    sq, sk, sv, so, sg, sdq, sdk, sdv = (strides(t) for t in (q, k, v, out, grad_out, dq, dk, dv))
    mask, mask_strides, mask_kind, mask_row = mask_args
    seed, offset, threshold, drop_scale = _dropout_args(dropout_p, rng_state)
    D, Dv = q.shape[-1], v.shape[-1]
    varlen = cu_q is not None
    cu_q_arg, cu_k_arg = (cu_q, cu_k) if varlen else (q, q)

    delta = torch.empty_like(lse)  # rowsum(dO ∘ O), laid out like lse
    bm = cfg.PREPROCESS_BLOCK_M
    kern.preprocess[(triton.cdiv(max_q, bm), batch * Hq)](
        out, grad_out, delta, cu_q_arg, *so, *sg, *lse_strides, Hq, Nq, Dv,
        IS_VARLEN=varlen, BLOCK_M=bm, BLOCK_DV=cfg.head_block(Dv))

    common = dict(**variants.consts, MASK_KIND=mask_kind, MASK_ROW=bool(mask_row), IS_VARLEN=varlen,
                  DROPOUT=dropout_p > 0.0, INPUT_PRECISION=input_precision(q.dtype),
                  EMULATE_BF16=kern.interpret and q.dtype == torch.bfloat16,
                  BLOCK_D=cfg.head_block(D), BLOCK_DV=cfg.head_block(Dv))
    scalars = (scale, variants.qk_scale, seed, offset, threshold, drop_scale, *variants.runtime,
               cfg.seqlen_bucket(max(max_q, max_k)))
    options = kern.options("dkdv", max(D, Dv))
    kern.dkdv[_grid(max_k, "BLOCK_N", batch * Hkv, options)](
        q, k, v, grad_out, lse, delta, dk, dv, mask, cu_q_arg, cu_k_arg, variants.alibi,
        *sq, *sk, *sv, *sg, *lse_strides, *sdk, *sdv, *mask_strides,
        Hq, Hkv, Hq // Hkv, Nq, Nk, D, Dv, *scalars, **common, **options)
    options = kern.options("dq", max(D, Dv))
    kern.dq[_grid(max_q, "BLOCK_M", batch * Hq, options)](
        q, k, v, grad_out, lse, delta, dq, mask, cu_q_arg, cu_k_arg, variants.alibi,
        *sq, *sk, *sv, *sg, *lse_strides, *sdq, *mask_strides,
        Hq, Hq // Hkv, Nq, Nk, D, Dv, *scalars, **common, **options)


def attn_bwd(grad_out, q, k, v, out, lse, attn_mask, causal, scale, dropout_p, rng_state, window_left=-1,
             window_right=-1, bottom_right=False, softcap=0.0, alibi_slopes=None):
    """Gradients of attn_fwd: (dq, dk, dv) shaped like (and dtype of) q, k, v."""
    _check_inputs(q, k, v, "bwd")
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if Nq == 0 or Nk == 0 or B == 0 or Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _backward(grad_out, q, k, v, out, lse, dq, dk, dv, "dense", lse.stride(),
              _mask_args(attn_mask, q, B, Hq, Nq, Nk), None, None, B, Hq, Hkv, Nq, Nk, Nq, Nk,
              causal, scale, dropout_p, rng_state,
              _variant_args(q, causal, scale, window_left, window_right, bottom_right, softcap, alibi_slopes))
    return dq, dk, dv


def varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
               scale, dropout_p, rng_state, window_left=-1, window_right=-1, bottom_right=False, softcap=0.0,
               alibi_slopes=None):
    """Gradients of varlen_fwd: (dq, dk, dv) shaped like q, k, v (packed)."""
    _check_inputs(q, k, v, "varlen_bwd")
    Hq, Hkv = q.shape[1], k.shape[1]
    batch = cu_seqlens_q.numel() - 1
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.shape[0] == 0 or k.shape[0] == 0 or batch <= 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0:
        return dq, dk, dv
    _backward(grad_out, q, k, v, out, lse, dq, dk, dv, "varlen", (0, lse.stride(0), lse.stride(1)),
              (q, (0, 0, 0, 0), 0, False), cu_seqlens_q, cu_seqlens_k, batch, Hq, Hkv, 0, 0,
              max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, rng_state,
              _variant_args(q, causal, scale, window_left, window_right, bottom_right, softcap, alibi_slopes))
    return dq, dk, dv


def dropout_keep_mask(rng_state: torch.Tensor, dropout_p: float, batch: int, num_heads: int, seqlen_q: int,
                      seqlen_k: int, device) -> torch.Tensor:
    """Bool (batch, num_heads, seqlen_q, seqlen_k): the keep mask the kernels draw, materialised.

    For tests and debugging: equals fastattn.reference.dropout_keep_mask bit for bit.
    """
    from .dropout import _dropout_keep_mask_kernel

    seed, offset, threshold, _ = _dropout_args(dropout_p, rng_state)
    out = torch.empty(batch, num_heads, seqlen_q, seqlen_k, dtype=torch.int8, device=device)
    block = 32
    grid = (triton.cdiv(seqlen_q, block), triton.cdiv(seqlen_k, block), batch * num_heads)
    _dropout_keep_mask_kernel[grid](out, seed, offset, threshold, seqlen_q, seqlen_k, BLOCK_M=block, BLOCK_N=block)
    return out.bool()

"""Which backend runs a call: one small table, one function.

Backends:
  "cpu"       fused C++ kernel (csrc/cpu), CPU tensors
  "cuda"      fused CUDA C++ kernel (csrc/cuda), when built         [CUDA issue]
  "triton"    fused Triton kernel (csrc/triton): cuda tensors, or CPU tensors under TRITON_INTERPRET=1
  "reference" plain PyTorch (fastattn/reference.py), any device; O(N^2) memory
"""
from __future__ import annotations

import functools

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import _ops
# Imported here, not where it is first needed: an import inside a function that torch.compile traces fails
# the whole graph when the module was not imported before (it imports neither triton nor a kernel).
from . import triton_kernels
from .errors import InvalidArgumentError, InvalidArgumentTypeError

# Order in which "auto" tries the backends for a device.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


@dataclass(frozen=True)
class Capability:
    """What a backend can serve: devices, dtypes, head dims, features."""

    devices: tuple
    dtypes: tuple
    max_head_dim: Optional[int]  # None: no limit
    masks: bool = True
    dropout: bool = True
    varlen: bool = True
    fused: bool = True  # O(N) memory (False: materialises the N x N scores)
    variants: frozenset = frozenset()  # of VARIANTS it serves


# The attention variants (fastattn.attention's keywords), by the names dispatch uses.
VARIANTS = {
    "window": "window_size (sliding-window attention)",
    "bottom_right": "alignment='bottom_right'",
    "softcap": "softcap (logit soft-capping)",
    "alibi": "alibi_slopes (ALiBi)",
    "sinks": "sinks (attention sinks)",
}
_ALL_VARIANTS = frozenset(VARIANTS)


_ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

CAPABILITIES = {
    "cpu": Capability(devices=("cpu",), dtypes=_ALL_FLOATS, max_head_dim=None, variants=_ALL_VARIANTS),
    "reference": Capability(devices=("any",), dtypes=_ALL_FLOATS, max_head_dim=None, fused=False,
                            variants=_ALL_VARIANTS),
    # cuda tensors on a GPU; CPU tensors under TRITON_INTERPRET=1 (see backend_devices)
    "triton": Capability(devices=("cuda",), dtypes=(torch.float32, torch.bfloat16, torch.float16), max_head_dim=256,
                         variants=_ALL_VARIANTS),
    # sm80+; head dims = those built (fastattn._C_cuda.head_dims), Dv == D; masks: bool key-padding only
    "cuda": Capability(devices=("cuda",), dtypes=(torch.bfloat16, torch.float16), max_head_dim=128,
                       variants=frozenset({"window", "bottom_right", "softcap"})),
}


def cuda_head_dims() -> tuple:
    """Head dims the CUDA extension was built with (empty when it is not built)."""
    return tuple(_ops._C_cuda.head_dims) if _ops._C_cuda is not None else ()


def mask_kind(attn_mask: Optional[torch.Tensor]) -> Optional[str]:
    """None, "key_padding" (bool, broadcastable as (B|1, 1, 1, Nk)), "bool" or "float"."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool:
        return "float"
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)  # (B|1, H|1, Nq|1, Nk|1)
    return "key_padding" if shape[1] == 1 and shape[2] == 1 else "bool"


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its import of torch._dynamo (2 s at ``import
    fastattn``): that decorator only sets this mark, which Dynamo reads when it traces a call
    (tests/test_compile.py checks that torch's decorator still sets exactly this mark)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result  # a device property: keeps torch.compile(fullgraph=True) traceable
def _compute_capability(index: Optional[int]) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


@functools.lru_cache(maxsize=None)
def _kernel_image_problem_cached(index: int) -> str:
    return _ops._C_cuda.kernel_image_problem(index)


@_assume_constant_result
def _kernel_image_problem(index: Optional[int]) -> str:
    """Empty when the built CUDA kernels have an image this GPU can run (probed once per device)."""
    if _ops._C_cuda is None or not hasattr(_ops._C_cuda, "kernel_image_problem"):
        return ""
    return _kernel_image_problem_cached(torch.cuda.current_device() if index is None else index)


def _cuda_unsupported(device: torch.device, head_dim: int, value_head_dim: Optional[int], has_mask: bool,
                      mask: Optional[str]) -> Optional[str]:
    """What the CUDA C++ kernels lack for a call the generic checks let through."""
    capability = _compute_capability(device.index)
    if capability < (8, 0):
        return "backend 'cuda' needs compute capability 8.0+ (mma.sync bf16/fp16, cp.async)"
    problem = _kernel_image_problem(device.index)
    if problem:  # e.g. a GPU newer than the build's archs, built without PTX
        arch_list = getattr(_ops._C_cuda, "arch_list", "unknown")
        return (f"backend 'cuda' has no kernel this GPU (sm{capability[0]}{capability[1]}) can run: {problem}; "
                f"fastattn was built with TORCH_CUDA_ARCH_LIST={arch_list!r}: rebuild with this GPU's arch "
                f"(or an older one with +PTX) in TORCH_CUDA_ARCH_LIST")
    if head_dim not in cuda_head_dims():
        return f"backend 'cuda' has kernels for head dims {list(cuda_head_dims())}, got {head_dim}"
    if value_head_dim is not None and value_head_dim != head_dim:
        return f"backend 'cuda' needs v's head dim equal to q's ({head_dim}), got {value_head_dim}"
    if has_mask and mask != "key_padding":
        what = {"float": "float masks", "bool": "bool masks other than key padding"}.get(mask, "masks of unknown kind")
        return f"backend 'cuda' takes bool key-padding masks of shape (B|1, 1, 1, Nk) only, not {what}"
    return None


def backend_devices(backend: str) -> tuple:
    """Device types whose tensors ``backend`` takes (Triton: "cpu" under its interpreter, read now)."""
    if backend == "triton":
        return (triton_kernels.device_type(),)
    return CAPABILITIES[backend].devices


def available_backends() -> list:
    """Backends usable in this process, fastest first."""
    names = []
    if _ops._C is not None:
        names.append("cpu")
    if _ops._C_cuda is not None and torch.cuda.is_available():
        names.append("cuda")
    if triton_kernels.unavailable_reason() is None:
        names.append("triton")
    names.append("reference")
    return names


def why_unsupported(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    has_mask: bool = False, dropout: bool = False, varlen: bool = False,
                    mask_kind: Optional[str] = None, value_head_dim: Optional[int] = None,
                    variants: tuple = ()) -> Optional[str]:
    """None if ``backend`` can serve the call, else the reason it cannot.

    ``mask_kind`` (see :func:`mask_kind`) and ``value_head_dim`` (Dv) matter to the
    "cuda" backend only, which takes key-padding masks and Dv == D. ``variants``:
    the names (keys of :data:`VARIANTS`) of the variants the call uses.
    """
    # The built CPU backend is available: every CPU call asks, and need not ask about the GPU and Triton
    if not (backend == "cpu" and _ops._C is not None) and backend not in available_backends():
        if backend == "triton":
            return f"backend 'triton' is not available in this process: {triton_kernels.unavailable_reason()}"
        if backend in CAPABILITIES or backend in ("cuda", "triton"):
            return f"backend {backend!r} is not available in this process (available: {available_backends()})"
        return f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}"
    cap = CAPABILITIES[backend]
    devices = backend_devices(backend)
    if "any" not in devices and device.type not in devices:
        return f"backend {backend!r} runs on {devices} tensors here, got {device.type}"
    if dtype not in cap.dtypes:
        return f"backend {backend!r} does not support dtype {dtype}"
    if cap.max_head_dim is not None and head_dim > cap.max_head_dim:
        return f"backend {backend!r} supports head dims up to {cap.max_head_dim}, got {head_dim}"
    if has_mask and not cap.masks:
        return f"backend {backend!r} does not support attn_mask"
    if dropout and not cap.dropout:
        return f"backend {backend!r} does not support dropout"
    if varlen and not cap.varlen:
        return f"backend {backend!r} does not support varlen inputs"
    missing = [VARIANTS[v] for v in variants if v not in cap.variants] if variants else None
    if missing:
        return f"backend {backend!r} does not serve {', '.join(missing)} yet"
    if backend == "cuda":
        return _cuda_unsupported(device, head_dim, value_head_dim, has_mask, mask_kind)
    return None


_warned = set()


def _warn_if_passed_over(skipped, chosen: str, reasons: list, device: torch.device) -> None:
    """Warn once when "auto" skips the CUDA C++ kernels (built, on this device) for another fused backend."""
    if chosen == "reference" or "cuda" not in skipped or "cuda" not in available_backends():
        return
    reason = reasons[list(skipped).index("cuda")]
    key = ("passed-over", "cuda", chosen, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastattn: {reason}; running this call on backend {chosen!r} instead", stacklevel=4)


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, **features) -> str:
    """The backend that runs a call: ``requested`` if it can, or the fastest that can for "auto".

    An explicitly requested backend that cannot serve the call raises ValueError.
    "auto" that has to fall back to the plain PyTorch reference warns once, and so
    does "auto" that passes over the built CUDA C++ kernels for Triton.
    """
    if not isinstance(requested, str):
        raise InvalidArgumentTypeError(f"backend must be a string, got {type(requested).__name__}")
    if requested != "auto":
        reason = why_unsupported(requested, device, dtype, head_dim, **features)
        if reason is not None:
            raise InvalidArgumentError(f"fastattn: backend={requested!r} cannot run this call: {reason}")
        return requested
    order = AUTO_ORDER.get(device.type, ("reference",))
    reasons = []
    for name in order:
        reason = why_unsupported(name, device, dtype, head_dim, **features)
        if reason is None:
            if reasons:  # faster backends could not serve the call: say so where that matters
                _warn_if_passed_over(order[:order.index(name)], name, reasons, device)
                if name == "reference":
                    key = (device.type, dtype, tuple(sorted(features.items())))
                    if key not in _warned:
                        _warned.add(key)
                        warnings.warn("fastattn: no fused kernel can run this call (" + "; ".join(reasons) +
                                      "); falling back to the plain PyTorch reference (O(N^2) memory)", stacklevel=3)
            return name
        reasons.append(reason)
    raise InvalidArgumentError("fastattn: no backend can run this call: " + "; ".join(reasons))

"""Which backend runs a call: one small table, one function.

Backends:
  "cpu"       fused C++ kernel (csrc/cpu), CPU tensors
  "cuda"      fused CUDA C++ kernel (csrc/cuda), when built         [CUDA issue]
  "triton"    fused Triton kernel (csrc/triton): cuda tensors, or CPU tensors under TRITON_INTERPRET=1
  "reference" plain PyTorch (fastattn/reference.py), any device; O(N^2) memory
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import _ops

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


_ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

CAPABILITIES = {
    "cpu": Capability(devices=("cpu",), dtypes=_ALL_FLOATS, max_head_dim=None),
    "reference": Capability(devices=("any",), dtypes=_ALL_FLOATS, max_head_dim=None, fused=False),
    # cuda tensors on a GPU; CPU tensors under TRITON_INTERPRET=1 (see backend_devices)
    "triton": Capability(devices=("cuda",), dtypes=(torch.float32, torch.bfloat16, torch.float16), max_head_dim=256),
}


def backend_devices(backend: str) -> tuple:
    """Device types whose tensors ``backend`` takes (Triton: "cpu" under its interpreter, read now)."""
    if backend == "triton":
        from . import triton_kernels

        return (triton_kernels.device_type(),)
    return CAPABILITIES[backend].devices


def available_backends() -> list:
    """Backends usable in this process, fastest first."""
    names = []
    if _ops._C is not None:
        names.append("cpu")
    from . import triton_kernels

    if triton_kernels.unavailable_reason() is None:
        names.append("triton")
    names.append("reference")
    return names


def why_unsupported(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    has_mask: bool = False, dropout: bool = False, varlen: bool = False) -> Optional[str]:
    """None if ``backend`` can serve the call, else the reason it cannot."""
    if backend not in available_backends():
        if backend == "triton":
            from . import triton_kernels

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
    return None


_warned = set()


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, **features) -> str:
    """The backend that runs a call: ``requested`` if it can, or the fastest that can for "auto".

    An explicitly requested backend that cannot serve the call raises ValueError.
    "auto" that has to fall back to the plain PyTorch reference warns once.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    if requested != "auto":
        reason = why_unsupported(requested, device, dtype, head_dim, **features)
        if reason is not None:
            raise ValueError(f"fastattn: backend={requested!r} cannot run this call: {reason}")
        return requested
    order = AUTO_ORDER.get(device.type, ("reference",))
    reasons = []
    for name in order:
        reason = why_unsupported(name, device, dtype, head_dim, **features)
        if reason is None:
            if name == "reference" and len(order) > 1:
                key = (device.type, dtype, tuple(sorted(features.items())))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn("fastattn: no fused kernel can run this call (" + "; ".join(reasons) +
                                  "); falling back to the plain PyTorch reference (O(N^2) memory)", stacklevel=3)
            return name
        reasons.append(reason)
    raise ValueError("fastattn: no backend can run this call: " + "; ".join(reasons))

"""Shared tolerances, input makers and comparison helpers for the fastattn tests.

Every kernel backend that ``fastattn.available_backends()`` lists (all of them
but the plain-PyTorch "reference") is tested by any test that takes a
``backend`` argument, so a new backend is picked up without touching the tests.
A test that needs something a backend cannot do (a dtype, a head dim, masks,
dropout, varlen) asks ``require(...)``, which skips with the backend's own
reason from ``fastattn.dispatch.why_unsupported``; nothing passes silently.

Accuracy is judged against ``fastattn.reference.attention_reference`` computed
in float64 from the very same (already rounded) inputs:
  * float64 / float32: ``|ours - ref64| <= atol + rtol * |ref64|`` with the named
    tolerances below;
  * bfloat16 / float16: flash-attention's rule, ``err(ours) <= 2 * err(torch) + floor``
    where err(torch) is the error of the same reference computed entirely in the
    low dtype (what plain PyTorch code in that dtype would get).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/test_triton.py). It is
# switched on here, before any test module imports a kernel (@triton.jit reads it when it
# decorates), so the whole session agrees on it; an explicit TRITON_INTERPRET=0 is respected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastattn  # noqa: E402
from fastattn import dispatch  # noqa: E402
from fastattn.reference import attention_reference, varlen_attention_reference  # noqa: E402

LOW_PRECISION = (torch.bfloat16, torch.float16)

# --------------------------------------------------------------------------------------------
# Tolerances (vs the float64 reference on the same inputs). Measured errors of the CPU kernel
# are ~1e-15 (float64) and ~1e-6 (float32) for the output and ~3e-6 for gradients of
# magnitude ~10; the tolerances leave about 10x room, no more.
# --------------------------------------------------------------------------------------------
FWD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}
FWD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
GRAD_ATOL = {torch.float64: 1e-9, torch.float32: 5e-5}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# lse is float32 for every dtype but float64, accumulated in float32: so the low dtypes share
# float32's tolerance (their inputs are exact in float32).
LSE_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
LSE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# Floors of the 2x rule: what may be lost on top of 2x PyTorch's own error (a fraction of one
# unit in the last place at magnitude 1; covers cases where PyTorch happens to be exact).
FWD_FLOOR = {torch.bfloat16: 2e-3, torch.float16: 2e-4}
GRAD_FLOOR = {torch.bfloat16: 4e-3, torch.float16: 4e-4}

# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
# Kernel backends the package knows of; the ones not built here are listed in the report header.
KNOWN_KERNEL_BACKENDS = ("cpu", "cuda", "triton")


# Triton in its CPU interpreter (TRITON_INTERPRET=1, no GPU) runs each kernel program in NumPy:
# the ~600 generic tests would take hours, so it is tested by tests/test_triton.py (small shapes).
INTERPRETED_TRITON_REASON = ("triton runs in its CPU interpreter here (TRITON_INTERPRET=1): excluded from the "
                             "generic backend tests (too slow); tests/test_triton.py covers it on small shapes")


def triton_interpreted() -> bool:
    from fastattn import triton_kernels

    return "triton" in fastattn.available_backends() and triton_kernels.interpreting()


def kernel_backends() -> list:
    """The backends under test: every available one except the plain PyTorch reference (and interpreted triton)."""
    return [b for b in fastattn.available_backends()
            if b != "reference" and not (b == "triton" and triton_interpreted())]


def backend_device(backend: str) -> torch.device:
    """The device a backend's tensors live on ("cpu" for cpu, "cuda" for cuda/triton on a GPU)."""
    devices = dispatch.backend_devices(backend) if backend in dispatch.CAPABILITIES else ("cuda",)
    if "cpu" in devices or "any" in devices:
        return torch.device("cpu")
    return torch.device(devices[0])


def kernel_devices() -> list:
    """Devices on which the torch.ops.fastattn fwd/bwd/varlen_* ops have a kernel (one per C++ backend).

    Triton has ops of its own (triton_fwd, ...), tested in tests/test_triton.py.
    """
    seen = []
    for b in kernel_backends():
        if b == "triton":
            continue
        d = backend_device(b)
        if d not in seen:
            seen.append(d)
    return seen


def require(backend: str, *, dtype=torch.float32, head_dim: int = 64, has_mask: bool = False,
            dropout: bool = False, varlen: bool = False) -> torch.device:
    """Skip (with the backend's own reason) unless ``backend`` can run such a call; returns its device."""
    device = backend_device(backend)
    reason = dispatch.why_unsupported(backend, device, dtype, head_dim, has_mask=has_mask, dropout=dropout,
                                      varlen=varlen)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    return device


def _require_any(device: torch.device, backends, nothing: str, dtype, head_dim: int, **features) -> None:
    """Skip, with every backend's reason, unless one of ``backends`` on ``device`` can serve the call."""
    reasons = []
    for b in backends:
        if backend_device(b) != device:
            continue
        reason = dispatch.why_unsupported(b, device, dtype, head_dim, **features)
        if reason is None:
            return
        reasons.append(f"{b}: {reason}")
    pytest.skip("; ".join(reasons) or nothing)


def require_op(device: torch.device, *, dtype=torch.float32, head_dim: int = 64, has_mask: bool = False,
               dropout: bool = False, varlen: bool = False) -> None:
    """Skip unless some kernel backend on ``device`` can serve the call (tests of torch.ops.fastattn.*)."""
    _require_any(device, [b for b in kernel_backends() if b != "triton"],  # triton: its own ops, not fwd/bwd
                 f"no kernel backend on {device}", dtype=dtype, head_dim=head_dim, has_mask=has_mask,
                 dropout=dropout, varlen=varlen)


def attention_devices() -> list:
    """Devices on which fastattn.attention has a fused kernel backend of any kind (C++ or Triton);
    the modules built on it (fastattn.nn, the HF backend) are tested on each."""
    seen = []
    for b in kernel_backends():
        d = backend_device(b)
        if d not in seen:
            seen.append(d)
    return seen


def require_fused(device: torch.device, *, dtype=torch.float32, head_dim: int = 64, has_mask: bool = False,
                  dropout: bool = False, varlen: bool = False) -> None:
    """Skip unless backend="auto" would run such a call on ``device`` with a fused kernel (not the reference)."""
    _require_any(device, kernel_backends(), f"no fused kernel backend on {device}", dtype=dtype,
                 head_dim=head_dim, has_mask=has_mask, dropout=dropout, varlen=varlen)


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", kernel_backends(), ids=lambda b: f"backend={b}")
    if "op_device" in metafunc.fixturenames:
        metafunc.parametrize("op_device", kernel_devices(), ids=lambda d: f"device={d.type}")


def pytest_report_header(config):
    avail = fastattn.available_backends()
    missing = [b for b in KNOWN_KERNEL_BACKENDS if b not in avail]
    return [f"fastattn {fastattn.__version__}: kernel backends under test: {kernel_backends()}; "
            f"not available here (not tested): {missing or 'none'}; torch threads: {torch.get_num_threads()}"] + (
        [f"fastattn: {INTERPRETED_TRITON_REASON}"] if triton_interpreted() else [])


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
LAYOUTS = ("contiguous", "bnhd", "strided", "expanded")


def make_tensor(shape, *, dtype=torch.float32, device="cpu", layout: str = "contiguous",
                requires_grad: bool = False, std: float = 1.0) -> torch.Tensor:
    """A fresh randn tensor of logical shape (B, H, N, D) (or any 4-D shape) in a given memory layout.

    layout: "contiguous"; "bnhd": made as (B, N, H, D) and transposed (the usual projection output);
    "strided": a slice of a twice-as-wide last dim (stride 2 along D); "expanded": batch 0 repeated
    over the batch with stride 0. Returned as a leaf (requires_grad as asked) keeping that layout.
    """
    B, H, N, D = shape

    def randn(*size):  # drawn in float64, scaled, rounded once to the test dtype (contiguous)
        return (torch.randn(*size, dtype=torch.float64, device=device) * std).to(dtype)

    if layout == "contiguous":
        t = randn(B, H, N, D)
    elif layout == "bnhd":
        t = randn(B, N, H, D).transpose(1, 2)  # (B, H, N, D), non-contiguous
    elif layout == "strided":
        t = randn(B, H, N, 2 * D)[..., ::2]  # (B, H, N, D), stride 2 on D
    elif layout == "expanded":
        t = randn(1, H, N, D).expand(B, H, N, D)  # stride 0 on B
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if layout != "contiguous" and B > 1 and N > 1 and H > 1 and D > 1:
        assert not t.is_contiguous()
    return t.detach().requires_grad_(requires_grad)


def make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv=None, *, dtype=torch.float32, device="cpu", layout="contiguous",
             requires_grad=True, std: float = 1.0):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): fresh randn leaves."""
    Dv = D if Dv is None else Dv
    q = make_tensor((B, Hq, Nq, D), dtype=dtype, device=device, layout=layout, requires_grad=requires_grad, std=std)
    k = make_tensor((B, Hkv, Nk, D), dtype=dtype, device=device, layout=layout, requires_grad=requires_grad,
                    std=std)
    v = make_tensor((B, Hkv, Nk, Dv), dtype=dtype, device=device, layout=layout, requires_grad=requires_grad)
    return q, k, v


def make_mask(kind: str, shape, Nk: int, *, dtype=torch.float32, device="cpu", p_keep: float = 0.7,
              keep_first_key: bool = True) -> torch.Tensor:
    """A random mask of ``shape`` (broadcastable to (B, Hq, Nq, Nk)).

    kind "bool": True = may attend, drawn with P(True) = p_keep. kind "float": randn biases with
    -inf where the same draw says "masked". With keep_first_key, key 0 is always allowed (so no
    row is fully masked unless the test wants it; needs the last dim of ``shape`` to be Nk).
    """
    keep = torch.rand(shape, device=device) < p_keep
    if keep_first_key and shape[-1] == Nk and Nk > 0:
        keep[..., 0] = True
    if kind == "bool":
        return keep
    if kind == "float":
        bias = torch.randn(shape, dtype=torch.float64, device=device)
        if not keep_first_key or shape[-1] == Nk:
            bias = bias.masked_fill(~keep, float("-inf"))
        return bias.to(dtype)
    raise ValueError(f"unknown mask kind {kind!r}")


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------
def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (0 for empty tensors; inf where exactly one side is NaN/inf)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))  # equal infinities / both NaN count as exact
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    return diff.max().item()


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def assert_within_2x(name: str, ours: torch.Tensor, torch_low: torch.Tensor, ref64: torch.Tensor,
                     floor: float) -> None:
    """flash-attention's rule: err(ours) <= 2 * err(PyTorch in the same low dtype) + floor."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    ours_err, torch_err = max_err(ours, ref64), max_err(torch_low, ref64)
    assert ours_err <= 2 * torch_err + floor, (
        f"{name}: max error {ours_err:.3g} vs float64 reference exceeds 2 x PyTorch's own error in "
        f"{ours.dtype} ({torch_err:.3g}) + floor {floor:g}")


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).clone().requires_grad_(True)


def _leaf_low(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def check_attention(backend: str, q, k, v, *, causal=False, attn_mask=None, scale=None, grads=True,
                    grad_out: Optional[torch.Tensor] = None, variants: Optional[dict] = None):
    """Run fastattn.attention on ``backend`` and compare out, lse and dq/dk/dv with the float64 reference.

    q, k, v are leaves (requires_grad when grads=True) in the test dtype and layout; ``variants``:
    keyword arguments both take (window_size, alignment, ...). Returns (out, lse, ref_out64, ref_lse64)
    for further checks by the caller.
    """
    dtype = q.dtype
    variants = variants or {}
    out, lse = fastattn.attention(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale, backend=backend,
                                  return_lse=True, **variants)
    B, Hq, Nq, _ = q.shape
    Dv = v.shape[-1]
    assert out.shape == (B, Hq, Nq, Dv) and out.dtype == dtype and out.device == q.device
    assert lse.shape == (B, Hq, Nq) and lse.device == q.device
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    q64, k64, v64 = _leaf64(q), _leaf64(k), _leaf64(v)
    mask64 = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, attn_mask=mask64, scale=scale,
                                       return_lse=True, **variants)
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dtype], rtol=LSE_RTOL[dtype])

    low = None
    if dtype in LOW_PRECISION:  # PyTorch's own error: the same reference, computed in the low dtype
        ql, kl, vl = _leaf_low(q), _leaf_low(k), _leaf_low(v)
        low = (ql, kl, vl, attention_reference(ql, kl, vl, causal=causal, attn_mask=attn_mask, scale=scale,
                                               compute_dtype=dtype, **variants))
        assert_within_2x("out", out, low[3], ref, FWD_FLOOR[dtype])
    else:
        assert_close("out", out, ref, atol=FWD_ATOL[dtype], rtol=FWD_RTOL[dtype])

    if grads:
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float64, device=q.device).to(dtype)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
        rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
        for name, g, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {g.shape} {g.dtype} vs input {t.shape}"
        if low is not None:
            lq, lk, lv = torch.autograd.grad(low[3], low[:3], grad_out)
            for name, g, lg, rg in (("dq", dq, lq, rq), ("dk", dk, lk, rk), ("dv", dv, lv, rv)):
                assert_within_2x(name, g, lg, rg, GRAD_FLOOR[dtype])
        else:
            for name, g, rg in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
                assert_close(name, g, rg, atol=GRAD_ATOL[dtype], rtol=GRAD_RTOL[dtype])
    return out, lse, ref, ref_lse


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_id(B, Hq, Hkv, Nq, Nk, D, Dv=None) -> str:
    heads = f"H{Hq}" if Hq == Hkv else f"H{Hq}/{Hkv}"
    dv = "" if Dv is None or Dv == D else f"-Dv{Dv}"
    return f"B{B}-{heads}-N{Nq}x{Nk}-D{D}{dv}"


# Small float64 problems for gradcheck (the numerical Jacobian costs one call per input element).
GRADCHECK_EPS = 1e-6
GRADCHECK_ATOL = 1e-6


# --------------------------------------------------------------------------------------------
# Packed (varlen) inputs
# --------------------------------------------------------------------------------------------
def cu_seqlens(lengths, device="cpu"):
    """int32 (batch + 1,) prefix sums starting at 0."""
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def make_varlen(lens_q, lens_k, Hq, Hkv, D, Dv=None, *, dtype=torch.float32, device="cpu", layout="contiguous",
                requires_grad=True):
    """Packed q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), fresh randn leaves.

    layout "transposed": each made as (H, total, D) and transposed; "qkv_packed" (needs equal
    q/k lengths, heads and head dims): q, k, v are views of one (total, 3, H, D) tensor.
    """
    Dv = D if Dv is None else Dv
    tq, tk = sum(lens_q), sum(lens_k)

    def randn(*size):
        return torch.randn(*size, dtype=torch.float64, device=device).to(dtype)

    if layout == "contiguous":
        q, k, v = randn(tq, Hq, D), randn(tk, Hkv, D), randn(tk, Hkv, Dv)
    elif layout == "transposed":
        q, k, v = (randn(h, t, d).transpose(0, 1) for h, t, d in ((Hq, tq, D), (Hkv, tk, D), (Hkv, tk, Dv)))
    elif layout == "qkv_packed":
        assert tq == tk and Hq == Hkv and D == Dv
        q, k, v = randn(tq, 3, Hq, D).unbind(1)  # (total, H, D) each, row stride 3*H*D
    else:
        raise ValueError(layout)
    return tuple(t.detach().requires_grad_(requires_grad) for t in (q, k, v))


def check_varlen_attention(backend, lens_q, lens_k, Hq, Hkv, D, Dv, dtype, causal, device, layout="contiguous",
                           scale=None, max_extra=0):
    """Run fastattn.varlen_attention on ``backend`` and compare out, lse (Hq, total_q) and the
    gradients with varlen_attention_reference in float64 (2x rule for the low dtypes)."""
    q, k, v = make_varlen(lens_q, lens_k, Hq, Hkv, D, Dv, dtype=dtype, device=device, layout=layout)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    max_q, max_k = max(lens_q, default=0) + max_extra, max(lens_k, default=0) + max_extra
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
                                         backend=backend, return_lse=True)
    tq = sum(lens_q)
    assert out.shape == (tq, Hq, v.shape[-1]) and out.dtype == dtype
    assert lse.shape == (Hq, tq) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = varlen_attention_reference(q64, k64, v64, cu_q, cu_k, causal=causal, scale=scale,
                                              return_lse=True)
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dtype], rtol=LSE_RTOL[dtype])
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=device).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out) if out.numel() else (torch.zeros_like(q),
                                                                              torch.zeros_like(k),
                                                                              torch.zeros_like(v))
    ref_grads = (torch.autograd.grad(ref, (q64, k64, v64), grad_out.double(), allow_unused=True)
                 if ref.numel() else (None, None, None))
    ref_grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(ref_grads, (q64, k64, v64)))
    if dtype in LOW_PRECISION:
        # PyTorch's own error: the reference computed in the low dtype, sequence by sequence
        lows, (ql, kl, vl) = [], (t.detach().clone().requires_grad_() for t in (q, k, v))
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for b in range(len(lens_q)):
            sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            o = attention_reference(ql[sq].transpose(0, 1)[None], kl[sk].transpose(0, 1)[None],  # (1, H, n, D)
                                    vl[sk].transpose(0, 1)[None], causal=causal, scale=scale, compute_dtype=dtype)
            lows.append(o[0].transpose(0, 1))  # (n, Hq, Dv)
        low = torch.cat(lows)
        low_grads = torch.autograd.grad(low, (ql, kl, vl), grad_out, allow_unused=True)
        assert_within_2x("out", out, low, ref, FWD_FLOOR[dtype])
        for name, g, lg, rg in zip(("dq", "dk", "dv"), grads, low_grads, ref_grads):
            assert_within_2x(name, g, torch.zeros_like(g) if lg is None else lg, rg, GRAD_FLOOR[dtype])
    else:
        assert_close("out", out, ref, atol=FWD_ATOL[dtype], rtol=FWD_RTOL[dtype])
        for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close(name, g, rg, atol=GRAD_ATOL[dtype], rtol=GRAD_RTOL[dtype])
    return q, k, v, out, lse

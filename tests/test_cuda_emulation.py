"""The CUDA backend's own code, run on the CPU against an emulation of the device.

csrc/cuda/emulation/ compiles attention_cuda.cpp and every generated kernel file with the
host compiler (-DFASTATTN_CUDA_EMULATION) and runs the kernels as fibers, the warp-level
instructions (mma.sync m16n8k16, ldmatrix with and without .trans, shuffles) by the PTX
ISA's fragment tables, cp.async completing only at wait_group, shared memory poisoned with
NaN and bounded by the launch's size, barriers that every thread must reach, and the
driver's shared-memory limits of each GPU (see device_emulation.h). No GPU and no CUDA
toolkit is needed; what it cannot show is timing and the compiler's code generation
(tests/test_cuda.py covers those on a GPU).

Parity is judged as tests/test_cuda.py judges the real kernels: against the float64
reference, with flash-attention's 2x rule in fp16/bf16.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastattn.reference import attention_reference, dropout_keep_mask, varlen_attention_reference

from conftest import (FWD_FLOOR, GRAD_FLOOR, LSE_ATOL, LSE_RTOL, assert_close, assert_within_2x, cu_seqlens,
                      make_qkv, make_varlen)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc" / "cuda" / "emulation"))
import emulation_build  # noqa: E402  (csrc/cuda/emulation/emulation_build.py; not "build", which is also a PyPI package)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NO_VARIANTS = (-1, -1, False, 0.0, None)  # window_left, window_right, bottom_right, softcap, alibi_slopes


@pytest.fixture(scope="module")
def emu():
    module = emulation_build.load()
    module.set_device("sm90")
    return module


@pytest.fixture
def sm90(emu):
    emu.set_device("sm90")
    yield emu
    emu.set_device("sm90")


def band_variants(window, bottom_right, softcap=0.0):
    """The op schema's variant arguments for a window, an alignment and a soft-cap (no ALiBi)."""
    return (window[0], window[1], bottom_right, softcap, None)


def run_dense(emu, q, k, v, *, mask=None, causal=False, dropout_p=0.0, rng_state=None, grad_out=None,
              window=(-1, -1), bottom_right=False, softcap=0.0):
    """out, lse and (dq, dk, dv) from the emulated CUDA ops (q (B, Hq, Nq, D) etc.)."""
    scale = q.shape[-1] ** -0.5
    variants = band_variants(window, bottom_right, softcap)
    out, lse = emu.fwd(q, k, v, mask, causal, scale, dropout_p, rng_state, *variants, None)
    grads = emu.bwd(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, rng_state, *variants)
    return out, lse, grads


def check_dense(emu, B, Hq, Hkv, Nq, Nk, D, dtype, *, causal=False, mask=None, dropout_p=0.0, layout="contiguous",
                window=(-1, -1), bottom_right=False, softcap=0.0):
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, layout=layout, requires_grad=False)
    grad_out = torch.randn(B, Hq, Nq, D, dtype=torch.float64).to(dtype)
    rng_state = torch.tensor([1234, 5678], dtype=torch.int64) if dropout_p > 0 else None
    out, lse, (dq, dk, dv) = run_dense(emu, q, k, v, mask=mask, causal=causal, dropout_p=dropout_p,
                                       rng_state=rng_state, grad_out=grad_out, window=window,
                                       bottom_right=bottom_right, softcap=softcap)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves_low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(causal=causal, attn_mask=mask, dropout_p=dropout_p, rng_state=rng_state, window_size=window,
              alignment="bottom_right" if bottom_right else "top_left", softcap=softcap)
    ref, ref_lse = attention_reference(*leaves64, return_lse=True, **kw)
    low = attention_reference(*leaves_low, compute_dtype=dtype, **kw)
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dtype], rtol=LSE_RTOL[dtype])
    assert_within_2x("out", out, low, ref, FWD_FLOOR[dtype])
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    low_grads = torch.autograd.grad(low, leaves_low, grad_out)
    for name, g, lg, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), low_grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == dtype, name
        assert_within_2x(name, g, lg, rg, GRAD_FLOOR[dtype])
    return out, lse


# ---------------------------------------------------------------------------------------------
# The emulator itself: each rule it claims to check fails when broken
# ---------------------------------------------------------------------------------------------
def test_cp_async_lands_only_at_wait(emu):
    before = emu.checks.read_before_wait(False)
    after = emu.checks.read_before_wait(True)
    assert torch.isnan(before).all(), "a read before cp.async.wait_group must see the NaN poison"
    assert torch.equal(after, torch.arange(0, 256, 4, dtype=torch.float32))


@pytest.mark.parametrize("which,message", [(0, "__syncthreads after 32 threads of the block exited"),
                                           (1, "divergent warp"),
                                           (2, "past the launch's dynamic shared memory"),
                                           (3, "outside every tensor of the call")])
def test_emulator_faults(emu, which, message):
    with pytest.raises(RuntimeError, match=message):
        emu.checks.fault(which)


def test_launch_over_48k_needs_the_attribute(emu):
    emu.checks.launch_without_attribute(48 * 1024)
    with pytest.raises(RuntimeError, match="cudaFuncSetAttribute"):
        emu.checks.launch_without_attribute(48 * 1024 + 16)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("b_is_nk", [True, False], ids=["A_Bt", "A_B"])
def test_fragment_loaders_multiply(emu, dtype, b_is_nk):
    """The kernels' ldmatrix loaders + mma give A·Bᵀ (K in [n][k]) and A·B (V in [k][n])."""
    a = torch.randn(16, 16, dtype=torch.float64).to(dtype)
    b = torch.randn(16, 16, dtype=torch.float64).to(dtype)
    c = emu.checks.mma(a, b, b_is_nk)
    expected = a.double() @ (b.double().T if b_is_nk else b.double())
    torch.testing.assert_close(c.double(), expected, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Parity of the kernels as written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D", emulation_build.head_dims())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dims_dtypes(sm90, D, dtype, causal):
    """Nq = 77, Nk = 133: partial query and key blocks, GQA 2:1."""
    check_dense(sm90, 1, 2, 1, 77, 133, D, dtype, causal=causal)


@pytest.mark.parametrize("shape,causal", [
    ((1, 1, 1, 1, 1), False), ((1, 1, 1, 1, 1), True),
    ((2, 2, 2, 64, 64), True),        # exactly one block
    ((1, 3, 3, 130, 65), True),       # more queries than keys: rows past the last key
    ((1, 2, 2, 65, 200), True),       # fewer queries than keys
    ((1, 4, 1, 97, 129), False),      # MQA, one key past two blocks
    ((1, 2, 2, 200, 1), True),        # one key
], ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_shapes(sm90, shape, causal):
    check_dense(sm90, *shape, 64, torch.bfloat16, causal=causal)


@pytest.mark.parametrize("sm_count", [1, 132], ids=["one-cta-per-group", "group-split"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_backward_split(emu, sm_count, causal):
    """MQA 8:1 with three key blocks: on a 132-SM GPU the dK/dV grid splits the 8 query heads over 8 CTAs
    (float32 partials summed in a fixed order); on one SM (3 CTAs already fill it) it keeps one CTA per
    group. Both are right, and the split is deterministic (two runs are bitwise equal). Varlen takes the
    same path (test_varlen: 2 splits)."""
    emu.set_device("sm90")
    emu.set_sm_count(sm_count)
    try:
        check_dense(emu, 1, 8, 1, 50, 130, 64, torch.bfloat16, causal=causal)
        q, k, v = make_qkv(1, 8, 1, 50, 130, 64, dtype=torch.bfloat16, requires_grad=False)
        grad_out = torch.randn(1, 8, 50, 64).to(torch.bfloat16)
        first = run_dense(emu, q, k, v, causal=causal, grad_out=grad_out)[2]
        again = run_dense(emu, q, k, v, causal=causal, grad_out=grad_out)[2]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        emu.set_device("sm90")


@pytest.mark.parametrize("layout", ["bnhd", "strided"])
def test_layouts(sm90, layout):
    """(B, N, H, D) views go to the kernels as they are; a stride-2 head dim is copied first."""
    check_dense(sm90, 2, 2, 2, 70, 90, 64, torch.float16, causal=True, layout=layout)


def test_key_padding_mask(sm90):
    """(B, 1, 1, Nk) bool masks, batch 1 with every key hidden (zeros, lse = -inf)."""
    B, Nk = 3, 150
    mask = torch.rand(B, 1, 1, Nk) < 0.6
    mask[:, ..., 0] = True
    mask[1] = False
    out, lse = check_dense(sm90, B, 2, 1, 70, Nk, 64, torch.bfloat16, mask=mask)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout(sm90, causal):
    """The kernels drop exactly the reference's Philox elements (the reference replays them)."""
    check_dense(sm90, 2, 2, 1, 70, 100, 64, torch.bfloat16, causal=causal, dropout_p=0.3)
    keep = dropout_keep_mask(torch.tensor([1234, 5678]), 0.3, 2, 70, 100, batch=2)
    assert 0.6 < keep.double().mean().item() < 0.8  # the draw the reference used is a real one


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(sm90, causal):
    """Packed sequences with empty and length-1 ones, max lengths above the real ones."""
    lens_q, lens_k = [0, 5, 77, 1, 64, 3], [4, 0, 90, 1, 64, 70]
    dtype, D, Hq, Hkv = torch.float16, 64, 2, 1
    q, k, v = make_varlen(lens_q, lens_k, Hq, Hkv, D, dtype=dtype, requires_grad=False)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    scale = D ** -0.5
    out, lse = sm90.varlen_fwd(q, k, v, cu_q, cu_k, 80, 95, causal, scale, 0.0, None, *NO_VARIANTS, None)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    dq, dk, dv = sm90.varlen_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, 80, 95, causal, scale, 0.0, None,
                                 *NO_VARIANTS)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = varlen_attention_reference(*leaves, cu_q, cu_k, causal=causal, return_lse=True)
    # rows that see no key (empty key sequences) have lse = -inf in both
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dtype], rtol=LSE_RTOL[dtype])
    assert_close("out", out, ref, atol=2e-3, rtol=1e-2)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double(), allow_unused=True)
    for name, g, rg, t in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, leaves):
        assert_close(name, g, torch.zeros_like(t) if rg is None else rg, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Sliding windows and bottom-right alignment (the banded kernels)
# ---------------------------------------------------------------------------------------------
# Window sides around the kernels' block sizes: 64 query rows and 64 keys per forward / dQ block,
# 64 keys and 64 / 32 / 16 queries (D = 64 / 96 / 128) per dK/dV step.
@pytest.mark.parametrize("window,causal,Nq,Nk,bottom_right", [
    ((63, -1), True, 130, 130, False),
    ((64, -1), True, 130, 130, False),
    ((65, -1), True, 200, 130, False),
    ((0, 64), False, 129, 190, False),
    ((17, 33), False, 97, 161, False),
    ((-1, 5), False, 130, 70, False),  # right side only, not causal
    ((100, -1), False, 65, 200, False),  # left side only
    ((-1, -1), True, 70, 200, True),  # causal, bottom-right, Nq < Nk
    ((-1, -1), True, 200, 70, True),  # bottom-right, Nq > Nk: the first 130 rows see nothing
    ((40, -1), True, 3, 300, True),  # decode against a longer cache, with a window
    ((64, 0), False, 1, 257, True),  # one new query
    ((1, 1), False, 77, 133, True),
], ids=lambda x: str(x).replace(" ", ""))
def test_band(sm90, window, causal, Nq, Nk, bottom_right):
    check_dense(sm90, 2, 4, 2, Nq, Nk, 64, torch.float16, causal=causal, window=window, bottom_right=bottom_right)


@pytest.mark.parametrize("D", emulation_build.head_dims())
def test_band_head_dims(sm90, D):
    check_dense(sm90, 1, 2, 1, 150, 210, D, torch.bfloat16, causal=True, window=(48, -1), bottom_right=True)


def test_band_with_mask_and_dropout(sm90):
    mask = torch.rand(2, 1, 1, 140) < 0.8
    mask[1, ..., 100:] = False
    check_dense(sm90, 2, 2, 2, 90, 140, 64, torch.float16, window=(30, 10), bottom_right=True, mask=mask,
                dropout_p=0.2)


def test_band_varlen(sm90):
    """Bottom-right per sequence (each sequence's own Nk - Nq), windows, empty sequences."""
    lens_q, lens_k = [0, 5, 77, 1, 64, 3, 90], [4, 0, 90, 130, 64, 70, 20]
    dtype, D, Hq, Hkv = torch.float16, 64, 2, 1
    q, k, v = make_varlen(lens_q, lens_k, Hq, Hkv, D, dtype=dtype, requires_grad=False)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    scale, variants = D ** -0.5, band_variants((33, -1), True)
    out, lse = sm90.varlen_fwd(q, k, v, cu_q, cu_k, 90, 130, True, scale, 0.0, None, *variants, None)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    dq, dk, dv = sm90.varlen_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, 90, 130, True, scale, 0.0, None,
                                 *variants)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = varlen_attention_reference(*leaves, cu_q, cu_k, causal=True, return_lse=True, window_size=(33, -1),
                                              alignment="bottom_right")
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dtype], rtol=LSE_RTOL[dtype])
    assert_close("out", out, ref, atol=2e-3, rtol=1e-2)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double(), allow_unused=True)
    for name, g, rg, t in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, leaves):
        assert_close(name, g, torch.zeros_like(t) if rg is None else rg, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("D", emulation_build.head_dims())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(sm90, D, causal):
    """Gemma 2's logit soft-capping; a cap of 0.7 against logits of about unit size, so tanh bends most."""
    check_dense(sm90, 2, 2, 1, 97, 130, D, torch.bfloat16, causal=causal, softcap=0.7)


def test_softcap_with_window_mask_and_dropout(sm90):
    mask = torch.rand(2, 1, 1, 150) < 0.8
    check_dense(sm90, 2, 4, 2, 70, 150, 64, torch.float16, causal=True, window=(40, -1), bottom_right=True,
                mask=mask, dropout_p=0.15, softcap=2.5)


def test_band_skips_blocks_outside_the_window(sm90):
    """Work proportional to what is visible: a 64-key window over 1024 keys costs a fraction of full causal
    (tensor-core instructions counted by the emulator, forward and backward)."""
    def mma_count(window):
        q, k, v = make_qkv(1, 1, 1, 1024, 1024, 64, dtype=torch.float16, requires_grad=False)
        before = sm90.counters()["mma"]
        run_dense(sm90, q, k, v, causal=True, window=window, grad_out=torch.randn_like(q))
        return sm90.counters()["mma"] - before

    causal, windowed = mma_count((-1, -1)), mma_count((64, -1))
    # causal visits ~half of the 16 x 16 blocks (136 of 256); a 64-wide window ~2 per row block (31 of 256)
    assert windowed < 0.3 * causal, (windowed, causal)


# ---------------------------------------------------------------------------------------------
# Every (kernel, head dim, dtype) within each GPU's shared-memory limit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["sm80", "sm86", "sm89", "sm90", "sm120"])
@pytest.mark.parametrize("D", emulation_build.head_dims())
def test_fits_each_gpu(emu, device, D):
    """Forward and backward launch on each GPU the backend claims, as its driver would allow
    (D = 128's dQ kernel takes 32-key blocks where 64 do not fit: sm86, sm89, sm120)."""
    emu.set_device(device)
    try:
        check_dense(emu, 1, 2, 2, 70, 70, D, torch.bfloat16, causal=True)
        check_dense(emu, 1, 2, 1, 77, 133, D, torch.float16, causal=False)
    finally:
        emu.set_device("sm90")

"""The Triton backend: forward, lse and gradients against the float64 reference.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports a
kernel, so these tests run the very same kernels in Triton's CPU interpreter on CPU
tensors (one fixed 32x32 block config; shapes are kept small, N <= 70, because the
interpreter executes every program in NumPy). On a GPU they run on cuda tensors with
the autotuned kernels. Every test asks ``require("triton", ...)`` for its device,
which skips with the backend's own reason when Triton cannot run here (no triton
package, or no GPU and TRITON_INTERPRET=0).

Covered: dtypes fp32/bf16/fp16, causal (top-left, Nq != Nk), GQA/MQA, head dims
8..256 incl. 40/80/96 and Dv != D, odd lengths, non-contiguous / broadcast inputs,
bool and float masks of every broadcast shape (key-padding row path, fully hidden
key blocks, fully masked rows), large logits, varlen, dropout (bit-exact Philox mask,
rate, rescaling, backward with the same mask, equality with the CPU kernel),
opcheck and torch.compile(fullgraph=True) of the four triton ops, dispatch.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import dispatch, triton_kernels
from fastattn._ops import AttentionFunction, VarlenAttentionFunction
from fastattn.reference import attention_reference, dropout_keep_mask, dropout_threshold

from conftest import (FWD_ATOL, FWD_RTOL, GRAD_ATOL, GRAD_RTOL, assert_close, check_attention,
                      check_varlen_attention, cu_seqlens, dtype_id, kernel_backends, make_mask, make_qkv,
                      make_varlen, require, shape_id)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON = "triton"

# (B, Hq, Hkv, Nq, Nk, D): odd lengths across one and several 32-wide interpreter blocks,
# Nq > Nk and Nq < Nk (top-left causal differs from bottom-right there), MHA, GQA and MQA.
# 97 x 83 has whole interior blocks on both sides of the causal diagonal (the kernels' fast path
# without per-element tests) next to diagonal and partial ones.
SHAPES = [
    (1, 2, 2, 37, 37, 16),
    (2, 4, 2, 45, 29, 40),
    (1, 3, 1, 17, 70, 64),
    (1, 2, 1, 97, 83, 32),
]


# ----------------------------------------------------------------------------------------------
# Forward + backward parity
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_backward(dtype, shape, causal):
    device = require(TRITON, dtype=dtype, head_dim=shape[-1])
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, device=device)
    check_attention(TRITON, q, k, v, causal=causal)


@pytest.mark.parametrize("D, Dv", [(8, 8), (40, 40), (80, 80), (96, 96), (128, 128), (256, 256), (40, 24),
                                   (64, 100)])
def test_head_dims(D, Dv):
    """Head dims padded inside the kernel to a power of two (>= 16), D != Dv too."""
    device = require(TRITON, dtype=torch.float32, head_dim=max(D, Dv))
    q, k, v = make_qkv(1, 2, 1, 19, 23, D, Dv, device=device)
    check_attention(TRITON, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["bnhd", "strided", "expanded"])
def test_non_contiguous_inputs(layout, dtype):
    device = require(TRITON, dtype=dtype, head_dim=40)
    q, k, v = make_qkv(2, 4, 2, 33, 35, 40, dtype=dtype, device=device, layout=layout)
    # gradient also non-contiguous (a transposed view), as from a (B, N, H, D) projection
    grad_out = torch.randn(2, 33, 4, 40, device=device).to(dtype).transpose(1, 2)
    check_attention(TRITON, q, k, v, causal=layout == "bnhd", grad_out=grad_out)


@pytest.mark.parametrize("Nq, Nk", [(1, 1), (1, 50), (50, 1), (64, 64), (33, 65)])
def test_odd_lengths(Nq, Nk):
    device = require(TRITON, dtype=torch.float32, head_dim=16)
    q, k, v = make_qkv(1, 2, 2, Nq, Nk, 16, device=device)
    check_attention(TRITON, q, k, v, causal=Nq != Nk)


def test_scale():
    device = require(TRITON, dtype=torch.float32, head_dim=16)
    q, k, v = make_qkv(1, 2, 2, 21, 30, 16, device=device)
    check_attention(TRITON, q, k, v, scale=0.37)


def test_empty_inputs():
    device = require(TRITON, dtype=torch.float32, head_dim=16)
    q, k, v = make_qkv(1, 2, 2, 0, 5, 16, device=device)
    out, lse = fastattn.attention(q, k, v, backend=TRITON, return_lse=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    q, k, v = make_qkv(1, 2, 2, 4, 0, 16, device=device)
    out, lse = fastattn.attention(q, k, v, backend=TRITON, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
B_, HQ, HKV, NQ, NK, D_ = 2, 4, 2, 29, 70, 16
MASK_SHAPES = {
    "key_padding": (B_, 1, 1, NK),  # the row path: one mask row per key block
    "per_head_row": (1, HQ, 1, NK),  # row path with a per-head row
    "full": (B_, HQ, NQ, NK),
    "per_query": (B_, 1, NQ, NK),
    "2d": (NQ, NK),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES), ids=list(MASK_SHAPES))
def test_masks(mask_shape, kind, causal):
    device = require(TRITON, dtype=torch.float32, head_dim=D_, has_mask=True)
    q, k, v = make_qkv(B_, HQ, HKV, NQ, NK, D_, device=device)
    mask = make_mask(kind, MASK_SHAPES[mask_shape], NK, device=device)
    check_attention(TRITON, q, k, v, attn_mask=mask, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_mask_low_precision(dtype):
    device = require(TRITON, dtype=dtype, head_dim=D_, has_mask=True)
    q, k, v = make_qkv(B_, HQ, HKV, NQ, NK, D_, dtype=dtype, device=device)
    mask = make_mask("float", (B_, HQ, NQ, NK), NK, dtype=dtype, device=device)
    check_attention(TRITON, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_hides_whole_key_blocks(kind):
    """Keys 20.. hidden for batch 0 (two whole 32-key blocks are skipped), none hidden for batch 1."""
    device = require(TRITON, dtype=torch.float32, head_dim=D_, has_mask=True)
    q, k, v = make_qkv(2, 2, 2, 40, 96, D_, device=device)
    keep = torch.ones(2, 1, 1, 96, dtype=torch.bool, device=device)
    keep[0, ..., 20:] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
    check_attention(TRITON, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros(kind):
    device = require(TRITON, dtype=torch.float32, head_dim=D_, has_mask=True)
    q, k, v = make_qkv(1, 2, 2, 20, 37, D_, device=device)
    keep = torch.rand(1, 2, 20, 37, device=device) < 0.6
    keep[:, :, 3] = False  # row 3 sees nothing
    keep[:, 1, 11] = False
    mask = keep if kind == "bool" else torch.randn(keep.shape, device=device).masked_fill(~keep, float("-inf"))
    # float: the reference's own gradient is NaN there (autograd through logsumexp of an all -inf
    # row), so only the forward is compared; our gradients are checked below
    out, lse, _, _ = check_attention(TRITON, q, k, v, attn_mask=mask, grads=kind == "bool")
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])) and torch.isneginf(lse[:, :, 3]).all()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fastattn.attention(q2, k2, v2, attn_mask=mask, backend=TRITON)
    out.sum().backward()
    assert torch.equal(q2.grad[:, :, 3], torch.zeros_like(q2.grad[:, :, 3]))
    assert all(torch.isfinite(t.grad).all() for t in (q2, k2, v2))


def test_fully_masked_everything():
    device = require(TRITON, dtype=torch.float32, head_dim=D_, has_mask=True)
    q, k, v = make_qkv(1, 2, 2, 9, 40, D_, device=device)
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bool, device=device)
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, backend=TRITON, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_large_logits_stay_finite(dtype):
    """Logits of size ~1e3 (std-30 inputs): the online softmax keeps everything finite and accurate."""
    device = require(TRITON, dtype=dtype, head_dim=16)
    q, k, v = make_qkv(1, 2, 2, 25, 41, 16, dtype=dtype, device=device, std=30.0)
    if dtype != torch.float32:
        out, lse, _, _ = check_attention(TRITON, q, k, v, causal=True)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        return
    # fp32: every flash kernel exponentiates s - max (forward) and s - lse (backward, from the saved
    # lse), and an fp32 logit of size |s| ~ 1e3 carries |s| * 2**-24 of absolute error into that
    # exponent: relative errors of ~1e-4 in P whatever the kernel (our CPU kernel and torch's own fp32
    # attention show the same on such inputs, draw by draw). So outputs, lse and gradients are held to
    # a tolerance scaled by the largest logit instead of the usual fp32 one.
    out, lse = fastattn.attention(q, k, v, causal=True, backend=TRITON, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=True, return_lse=True)
    max_logit = (q64 @ k64.transpose(-1, -2)).abs().max().item() / math.sqrt(q.shape[-1])
    tol = 8 * max_logit * torch.finfo(torch.float32).eps
    assert_close("out", out, ref, atol=tol, rtol=tol)
    assert_close("lse", lse, ref_lse, atol=tol, rtol=1e-6)
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.float())
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert_close(name, g, rg, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# Varlen
# ----------------------------------------------------------------------------------------------
VARLEN_CASES = {
    "mixed": ([5, 0, 33, 17], [7, 3, 30, 1], 4, 2, 16),
    "one_long": ([70], [45], 2, 2, 40),
    "mqa": ([9, 21], [21, 9], 3, 1, 64),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_varlen(dtype, case, causal):
    lens_q, lens_k, Hq, Hkv, D = VARLEN_CASES[case]
    device = require(TRITON, dtype=dtype, head_dim=D, varlen=True)
    check_varlen_attention(TRITON, lens_q, lens_k, Hq, Hkv, D, D, dtype, causal, device, max_extra=3)


@pytest.mark.parametrize("layout", ["transposed", "qkv_packed"])
def test_varlen_layouts(layout):
    device = require(TRITON, dtype=torch.float32, head_dim=16, varlen=True)
    check_varlen_attention(TRITON, [11, 30], [11, 30], 2, 2, 16, 16, torch.float32, True, device, layout=layout)


# ----------------------------------------------------------------------------------------------
# Dropout: the Philox convention of csrc/philox.h / reference.dropout_keep_mask, bit for bit
# ----------------------------------------------------------------------------------------------
RNG_STATES = [torch.tensor([123456789012345, 77]), torch.tensor([2**62 + 12345, 2**40 + 9]), torch.tensor([-5, 3])]


@pytest.mark.parametrize("rng", range(len(RNG_STATES)))
def test_dropout_keep_mask_matches_reference_bits(rng):
    """The kernels' keep tile (materialised by launch.dropout_keep_mask) equals reference.dropout_keep_mask."""
    device = require(TRITON, dtype=torch.float32, dropout=True)
    from fastattn.triton_kernels.launch import dropout_keep_mask as triton_keep_mask

    B, H, Nq, Nk, p = 2, 3, 29, 70, 0.3
    got = triton_keep_mask(RNG_STATES[rng], p, B, H, Nq, Nk, device)
    want = dropout_keep_mask(RNG_STATES[rng], p, H, Nq, Nk, batch=B, device=device)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {want.numel()} bits differ"


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_forward_backward_match_reference(causal, p):
    """Out and gradients equal the reference with the same rng_state: forward and backward drop the same entries."""
    device = require(TRITON, dtype=torch.float32, head_dim=16, dropout=True, has_mask=True)
    q, k, v = make_qkv(2, 4, 2, 37, 45, 16, device=device)
    mask = make_mask("bool", (2, 1, 1, 45), 45, device=device)
    rng = RNG_STATES[0]
    out, lse = AttentionFunction.apply(q, k, v, mask, causal, 0.25, p, rng, TRITON)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, attn_mask=mask, scale=0.25, dropout_p=p,
                                       rng_state=rng, return_lse=True)
    assert_close("out", out, ref, atol=FWD_ATOL[torch.float32], rtol=FWD_RTOL[torch.float32])
    assert_close("lse (not dropped)", lse, ref_lse, atol=2e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r, atol=GRAD_ATOL[torch.float32], rtol=GRAD_RTOL[torch.float32])


def test_dropout_varlen_matches_reference():
    device = require(TRITON, dtype=torch.float32, head_dim=16, dropout=True, varlen=True)
    from fastattn.reference import varlen_attention_reference

    lens_q, lens_k = [13, 0, 40], [20, 5, 33]
    q, k, v = make_varlen(lens_q, lens_k, 4, 2, 16, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    rng = RNG_STATES[1]
    out, _ = VarlenAttentionFunction.apply(q, k, v, cu_q, cu_k, 40, 33, True, 0.25, 0.2, rng, TRITON)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = varlen_attention_reference(q64, k64, v64, cu_q, cu_k, causal=True, scale=0.25, dropout_p=0.2,
                                     rng_state=rng)
    assert_close("out", out, ref, atol=FWD_ATOL[torch.float32], rtol=FWD_RTOL[torch.float32])
    grad_out = torch.randn_like(out)
    for name, g, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), grad_out),
                          torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())):
        assert_close(name, g, r, atol=GRAD_ATOL[torch.float32], rtol=GRAD_RTOL[torch.float32])


def test_dropout_rate_and_rescaling():
    """scale=0 makes every probability 1/Nk; with v = identity, out[i, j] = keep[i, j] / (Nk (1 - p))."""
    device = require(TRITON, dtype=torch.float32, head_dim=64, dropout=True)
    B, H, N, p = 2, 2, 64, 0.3
    q, k, _ = make_qkv(B, H, H, N, N, 64, device=device, requires_grad=False)
    v = torch.eye(N, device=device).expand(B, H, N, N)
    out, _ = AttentionFunction.apply(q, k, v, None, False, 0.0, p, RNG_STATES[0], TRITON)
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1.0 / (N * (1 - p))), rtol=1e-6, atol=0)
    rate = 1.0 - kept.float().mean().item()
    n = kept.numel()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), f"drop rate {rate:.4f} vs p={p} over {n} draws"
    assert torch.equal(kept, dropout_keep_mask(RNG_STATES[0], p, H, N, N, batch=B, device=device))
    assert dropout_threshold(p) == round(p * 2**32)


def test_dropout_same_as_cpu_kernel():
    """With the same rng_state the CPU kernel and the Triton kernel drop the same entries."""
    device = require(TRITON, dtype=torch.float32, head_dim=16, dropout=True)
    if "cpu" not in fastattn.available_backends():
        pytest.skip("the CPU extension is not built here")
    q, k, v = make_qkv(2, 4, 2, 37, 45, 16, device=device, requires_grad=False)
    rng = RNG_STATES[2]
    ours = AttentionFunction.apply(q, k, v, None, True, 0.25, 0.4, rng, TRITON)[0]
    cpu = AttentionFunction.apply(q.cpu(), k.cpu(), v.cpu(), None, True, 0.25, 0.4, rng, "cpu")[0]
    assert_close("out vs cpu kernel", ours.cpu(), cpu, atol=2 * FWD_ATOL[torch.float32], rtol=FWD_RTOL[torch.float32])


def test_dropout_through_public_api_follows_torch_seed():
    device = require(TRITON, dtype=torch.float32, head_dim=16, dropout=True)
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, device=device, requires_grad=False)
    torch.manual_seed(1)
    a = fastattn.attention(q, k, v, dropout_p=0.5, backend=TRITON)
    torch.manual_seed(1)
    b = fastattn.attention(q, k, v, dropout_p=0.5, backend=TRITON)
    c = fastattn.attention(q, k, v, dropout_p=0.5, backend=TRITON)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------
# The ops: opcheck and torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------
def _dense_args(device, dropout=False):
    q, k, v = make_qkv(1, 2, 1, 9, 13, 16, device=device)
    mask = make_mask("bool", (1, 1, 1, 13), 13, device=device)
    rng = RNG_STATES[0] if dropout else None
    return q, k, v, mask, True, 0.25, 0.2 if dropout else 0.0, rng


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_opcheck_triton_fwd_bwd(dropout):
    device = require(TRITON, dtype=torch.float32, head_dim=16, has_mask=True, dropout=dropout)
    q, k, v, mask, causal, scale, p, rng = _dense_args(device, dropout)
    q, k, v = q.detach(), k.detach(), v.detach()  # the ops themselves; autograd is AttentionFunction's
    torch.library.opcheck(torch.ops.fastattn.triton_fwd.default, (q, k, v, mask, causal, scale, p, rng))
    out, lse = torch.ops.fastattn.triton_fwd(q, k, v, mask, causal, scale, p, rng)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastattn.triton_bwd.default,
                          (grad_out, q, k, v, out, lse, mask, causal, scale, p, rng))


def test_opcheck_triton_varlen():
    device = require(TRITON, dtype=torch.float32, head_dim=16, varlen=True)
    lens = [5, 11]
    q, k, v = make_varlen(lens, lens, 2, 1, 16, device=device, requires_grad=False)
    cu = cu_seqlens(lens, device)
    args = (q, k, v, cu, cu, 11, 11, True, 0.25, 0.0, None)
    torch.library.opcheck(torch.ops.fastattn.triton_varlen_fwd.default, args)
    out, lse = torch.ops.fastattn.triton_varlen_fwd(*args)
    torch.library.opcheck(torch.ops.fastattn.triton_varlen_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, cu, cu, 11, 11, True, 0.25, 0.0, None))


def test_compile_fullgraph():
    """fastattn.attention (triton backend) and the varlen Function on the triton ops in torch.compile(fullgraph=True)."""
    device = require(TRITON, dtype=torch.float32, head_dim=16, has_mask=True, varlen=True)
    torch._dynamo.reset()
    q, k, v, mask, _, _, _, _ = _dense_args(device)

    def dense(q, k, v, mask):
        out, lse = fastattn.attention(q, k, v, attn_mask=mask, causal=True, backend=TRITON, return_lse=True)
        return out * 2.0, lse

    grad_out = torch.randn(1, 2, 9, 16, device=device)
    eager = dense(q, k, v, mask)
    compiled = torch.compile(dense, fullgraph=True)(q, k, v, mask)
    for name, a, b in zip(("out", "lse"), compiled, eager):
        assert_close(name, a, b, atol=1e-6, rtol=1e-6)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(compiled[0], (q, k, v), grad_out),
                          torch.autograd.grad(eager[0], (q, k, v), grad_out)):
        assert_close(name, a, b, atol=1e-6, rtol=1e-6)

    lens_q, lens_k = [5, 11], [7, 11]
    vq, vk, vv = make_varlen(lens_q, lens_k, 2, 1, 16, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)

    def varlen(q, k, v, cu_q, cu_k):  # the autograd Function on the triton ops (varlen_attention's input
        # checks read cu_seqlens values, which fullgraph cannot trace, for any backend)
        return VarlenAttentionFunction.apply(q, k, v, cu_q, cu_k, 11, 11, True, 0.25, 0.0, None, TRITON)[0]

    eager = varlen(vq, vk, vv, cu_q, cu_k)
    compiled = torch.compile(varlen, fullgraph=True)(vq, vk, vv, cu_q, cu_k)
    assert_close("varlen out", compiled, eager, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(eager)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(compiled, (vq, vk, vv), g),
                          torch.autograd.grad(eager, (vq, vk, vv), g)):
        assert_close(f"varlen {name}", a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Dispatch, errors, config space
# ----------------------------------------------------------------------------------------------
def test_dispatch_and_errors():
    device = require(TRITON, dtype=torch.float32)
    assert "triton" in fastattn.available_backends()
    if triton_kernels.interpreting():
        assert "triton" not in kernel_backends(), "interpreted triton must stay out of the generic suite"
        assert dispatch.choose_backend("auto", device, torch.float32, 64) != "triton"
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="triton.*float64"):
        fastattn.attention(q, k, v, backend=TRITON)
    q, k, v = make_qkv(1, 1, 1, 4, 4, 300, device=device)
    with pytest.raises(ValueError, match="head dims up to 256"):
        fastattn.attention(q, k, v, backend=TRITON)
    other = torch.device("cuda") if device.type == "cpu" else torch.device("cpu")
    assert "runs on" in dispatch.why_unsupported(TRITON, other, torch.float32, 64)


def test_config_space_is_valid():
    from fastattn.triton_kernels import autotune as cfg

    for space in (cfg.FWD_SPACE, cfg.BWD_DKDV_SPACE, cfg.BWD_DQ_SPACE):
        for m, n, warps, stages in space:
            assert m >= 16 and n >= 16 and m & (m - 1) == 0 and n & (n - 1) == 0
            assert warps in (1, 2, 4, 8, 16) and stages >= 1
    assert cfg.head_block(40) == 64 and cfg.head_block(8) == 16 and cfg.head_block(256) == 256
    assert cfg.seqlen_bucket(1000) == 1024 and cfg.seqlen_bucket(3) == 64
    assert not cfg.fits(128, 128, 256, 4) and cfg.fits(64, 64, 64, 2)
    # the register model against what compile_check --resources measured on sm_90 (bf16, D=128):
    assert not cfg.fits(128, 64, 128, 2, num_warps=4)  # forward 128x64, 4 warps: 224 B of spills
    assert cfg.fits(128, 128, 128, 2, num_warps=8)  # forward 128x128, 8 warps: 249 registers, none spilled
    assert not cfg.fits(64, 64, 128, 4, num_warps=4)  # dK/dV 64 keys x 64 queries: 104 B of spills
    assert cfg.fits(64, 32, 128, 4, num_warps=4)  # dK/dV 64 keys x 32 queries: 244 registers
    # the pruning autotuning runs, called as triton's Autotuner calls it (positional args by name,
    # constexpr flags as keywords): dropout drops the forward configs that spilled most
    prune = cfg._prune("M", 2)
    configs = cfg._configs(cfg.FWD_SPACE)
    plain = prune(configs, {"head_dim": 128, "head_dim_v": 128}, CAUSAL=True, MASK_KIND=0, DROPOUT=False)
    dropout = prune(configs, {"head_dim": 128, "head_dim_v": 128}, CAUSAL=True, MASK_KIND=1, MASK_ROW=True,
                    DROPOUT=True)
    as_tuple = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)  # noqa: E731
    assert [as_tuple(c) for c in plain][:2] == [(128, 128, 8), (128, 64, 8)]
    assert (128, 128, 8) not in [as_tuple(c) for c in dropout] and len(dropout) == cfg.MAX_CONFIGS_TRIED
    # every head dim keeps at least one config of each space
    for d in (16, 64, 128, 256):
        for space, res, tiles in ((cfg.FWD_SPACE, 0, 2), (cfg.BWD_DKDV_SPACE, 1, 4), (cfg.BWD_DQ_SPACE, 0, 3)):
            for extra in (0, 3):
                assert any(cfg.fits(c[res], c[1 - res], d, tiles, c[2], extra) for c in space), (d, extra, space)


def test_fp32_precision_follows_torch():
    from fastattn.triton_kernels.launch import input_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert input_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_gpu_or_interpreter_says_why():
    """TRITON_INTERPRET=0 and no GPU: triton is not listed, and asking for it is a ValueError saying why."""
    code = ("import torch, fastattn\n"
            "assert 'triton' not in fastattn.available_backends()\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "try:\n"
            "    fastattn.attention(q, q, q, backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout, proc.stdout

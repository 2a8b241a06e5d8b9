"""fastattn.varlen_attention (packed sequences) vs varlen_attention_reference and per-sequence attention."""
import math

import pytest
import torch

import fastattn
from conftest import (FWD_ATOL, FWD_RTOL, GRAD_ATOL, GRAD_RTOL, LSE_ATOL, LSE_RTOL, assert_close,
                      check_varlen_attention, cu_seqlens, dtype_id, make_varlen, require, require_op)
from fastattn.reference import varlen_attention_reference


# (lens_q, lens_k): ones, odd sizes, empty sequences, q longer and shorter than k, one long pair.
LENGTHS = {
    "one_token": ([1], [1]),
    "single_7": ([7], [7]),
    "mixed_with_empty": ([5, 0, 97, 1, 3], [5, 3, 97, 0, 8]),
    "q_ne_k": ([13, 40, 7], [29, 7, 64]),
    "many_short": ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]),
    "long_1000": ([1000, 3], [997, 5]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_varlen_matches_reference(backend, lengths, dtype, causal):
    lens_q, lens_k = lengths
    Hq, Hkv, D = (2, 1, 64) if max(lens_q) >= 1000 else (4, 2, 32)
    device = require(backend, dtype=dtype, head_dim=D, varlen=True)
    check_varlen_attention(backend, lens_q, lens_k, Hq, Hkv, D, None, dtype, causal, device)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D,Dv", [(8, 8), (40, 80), (128, 16), (256, 256)], ids=lambda x: str(x))
def test_varlen_head_dims_and_gqa(backend, D, Dv, causal):
    device = require(backend, dtype=torch.float32, head_dim=max(D, Dv), varlen=True)
    check_varlen_attention(backend, [9, 31, 2], [17, 30, 5], 6, 3, D, Dv, torch.float32, causal, device)
    check_varlen_attention(backend, [9, 31, 2], [17, 30, 5], 4, 1, D, Dv, torch.float32, causal, device)


@pytest.mark.parametrize("layout", ["transposed", "qkv_packed"])
def test_varlen_noncontiguous(backend, layout):
    device = require(backend, dtype=torch.float64, head_dim=16, varlen=True)
    lens = [3, 50, 17]
    q, *_ = check_varlen_attention(backend, lens, lens, 4, 4, 16, None, torch.float64, True, device, layout=layout)
    assert not q.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_low_precision(backend, dtype, causal):
    device = require(backend, dtype=dtype, head_dim=64, varlen=True)
    check_varlen_attention(backend, [5, 0, 97, 1, 130], [5, 3, 97, 0, 64], 4, 2, 64, None, dtype, causal, device)


def test_varlen_scale_and_loose_max_seqlen(backend):
    """A custom scale, and max_seqlen_* larger than the longest sequence (upper bounds are allowed)."""
    device = require(backend, dtype=torch.float64, head_dim=16, varlen=True)
    check_varlen_attention(backend, [4, 9], [6, 2], 2, 2, 16, None, torch.float64, True, device, scale=0.37,
                           max_extra=50)


@pytest.mark.parametrize("lens", [[], [0], [0, 0, 0]], ids=["batch0", "one_empty", "three_empty"])
def test_varlen_empty(backend, lens):
    device = require(backend, dtype=torch.float32, head_dim=16, varlen=True)
    q, k, v = make_varlen(lens, lens, 2, 2, 16, device=device)
    cu = cu_seqlens(lens, device)
    out, lse = fastattn.varlen_attention(q, k, v, cu, cu, 0, 0, backend=backend, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out), allow_unused=True)
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g is None or g.shape == t.shape


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_per_sequence_attention(backend, causal):
    """Packed results equal fastattn.attention run on each sequence alone (same backend)."""
    device = require(backend, dtype=torch.float32, head_dim=32, varlen=True)
    lens_q, lens_k = [7, 1, 64, 33], [9, 5, 64, 20]
    q, k, v = make_varlen(lens_q, lens_k, 4, 2, 32, 24, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         backend=backend, return_lse=True)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens_q)):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        qb, kb, vb = (t[s].detach().transpose(0, 1)[None].requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        ob, lb = fastattn.attention(qb, kb, vb, causal=causal, backend=backend, return_lse=True)
        gb = torch.autograd.grad(ob, (qb, kb, vb), grad_out[sq].transpose(0, 1)[None])
        tol = dict(atol=FWD_ATOL[torch.float32], rtol=FWD_RTOL[torch.float32])
        assert_close(f"seq {b} out", out[sq], ob[0].transpose(0, 1), **tol)
        assert_close(f"seq {b} lse", lse[:, sq], lb[0], **tol)
        for name, g, s, gref in (("dq", dq, sq, gb[0]), ("dk", dk, sk, gb[1]), ("dv", dv, sk, gb[2])):
            assert_close(f"seq {b} {name}", g[s], gref[0].transpose(0, 1), atol=GRAD_ATOL[torch.float32],
                         rtol=GRAD_RTOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# Dropout on packed sequences
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("p", [0.2, 0.7], ids=lambda p: f"p{p}")
def test_varlen_dropout_op_matches_reference(op_device, p, causal):
    require_op(op_device, dtype=torch.float64, head_dim=16, dropout=True, varlen=True)
    lens_q, lens_k = [5, 0, 40, 1], [7, 3, 33, 0]
    q, k, v = make_varlen(lens_q, lens_k, 4, 2, 16, dtype=torch.float64, device=op_device, requires_grad=False)
    cu_q, cu_k = cu_seqlens(lens_q, op_device), cu_seqlens(lens_k, op_device)
    rng_state = torch.tensor([2**40 + 3, 11], dtype=torch.int64)
    scale = 1 / math.sqrt(16)
    out, lse = torch.ops.fastattn.varlen_fwd(q, k, v, cu_q, cu_k, 40, 33, causal, scale, p, rng_state)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.ops.fastattn.varlen_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, 40, 33, causal, scale, p,
                                               rng_state)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = varlen_attention_reference(q64, k64, v64, cu_q, cu_k, causal=causal, scale=scale, dropout_p=p,
                                              rng_state=rng_state, return_lse=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    dt = torch.float64
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dt], rtol=LSE_RTOL[dt])
    assert_close("out", out, ref, atol=FWD_ATOL[dt], rtol=FWD_RTOL[dt])
    for name, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert_close(name, g, rg, atol=GRAD_ATOL[dt], rtol=GRAD_RTOL[dt])


def test_varlen_dropout_matches_reference_backend(backend):
    device = require(backend, dtype=torch.float64, head_dim=16, dropout=True, varlen=True)
    lens_q, lens_k = [5, 30, 1], [7, 30, 4]
    q, k, v = make_varlen(lens_q, lens_k, 2, 1, 16, dtype=torch.float64, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    results = {}
    for name in (backend, "reference"):
        torch.manual_seed(31)
        out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 30, 30, causal=True, dropout_p=0.4, backend=name)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), results[backend], results["reference"]):
        assert_close(name, a, b, atol=1e-10, rtol=1e-10)

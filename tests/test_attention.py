"""fastattn.attention on every kernel backend vs the float64 reference: out, lse, dq, dk, dv."""
import math

import pytest
import torch

import fastattn
from fastattn import dispatch
from conftest import (FWD_ATOL, FWD_RTOL, GRAD_ATOL, GRADCHECK_ATOL, GRADCHECK_EPS, LAYOUTS, LOW_PRECISION,
                      assert_close, check_attention, dtype_id, make_mask, make_qkv, make_tensor, require, shape_id)
from fastattn.reference import attention_reference

# (B, Hq, Hkv, Nq, Nk, D): odd lengths, every head dim, GQA/MQA, Nq != Nk both ways.
# The N=1000 cases keep B*H at 1-2: the float64 reference materialises N x N.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 2, 2, 7, 7, 16),
    (2, 4, 2, 7, 97, 40),  # GQA, Nq < Nk
    (2, 4, 1, 97, 7, 80),  # MQA, Nq > Nk
    (1, 3, 3, 97, 97, 64),
    (3, 6, 3, 33, 65, 128),
    (1, 2, 2, 64, 63, 256),
    (1, 2, 1, 1000, 1000, 64),
    (1, 1, 1, 1000, 97, 128),
    (1, 1, 1, 7, 1000, 256),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(*s))
def test_matches_reference(backend, shape, dtype, causal):
    B, Hq, Hkv, Nq, Nk, D = shape
    device = require(backend, dtype=dtype, head_dim=D)
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, device=device)
    check_attention(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("D", [1, 3, 8, 16, 40, 64, 80, 96, 128, 129, 160, 256], ids=lambda d: f"D{d}")
def test_head_dims(backend, D):
    device = require(backend, dtype=torch.float32, head_dim=D)
    q, k, v = make_qkv(2, 2, 1, 37, 45, D, device=device)
    check_attention(backend, q, k, v, causal=True)


@pytest.mark.parametrize("D,Dv", [(64, 32), (16, 128), (40, 80), (128, 8), (8, 1), (256, 64)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_value_head_dim_differs(backend, D, Dv, dtype):
    device = require(backend, dtype=dtype, head_dim=max(D, Dv))
    q, k, v = make_qkv(2, 4, 2, 19, 23, D, Dv, dtype=dtype, device=device)
    check_attention(backend, q, k, v, causal=False)
    check_attention(backend, q, k, v, causal=True)


@pytest.mark.parametrize("Hq,Hkv", [(8, 1), (8, 2), (8, 4), (6, 3), (5, 5)], ids=lambda x: str(x))
def test_gqa_mqa(backend, Hq, Hkv):
    device = require(backend, dtype=torch.float64, head_dim=32)
    q, k, v = make_qkv(2, Hq, Hkv, 29, 31, 32, dtype=torch.float64, device=device)
    check_attention(backend, q, k, v, causal=True)


def test_gqa_equals_repeated_kv(backend):
    """GQA is exactly MHA on K/V repeated per group (same kernel, so compare tightly)."""
    device = require(backend, dtype=torch.float32, head_dim=32)
    q, k, v = make_qkv(2, 6, 2, 17, 19, 32, device=device, requires_grad=False)
    out = fastattn.attention(q, k, v, backend=backend, causal=True)
    out_rep = fastattn.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), backend=backend,
                                 causal=True)
    assert_close("out", out, out_rep, atol=FWD_ATOL[torch.float32], rtol=FWD_RTOL[torch.float32])


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 50), (50, 1), (7, 97), (97, 7), (64, 64), (65, 63), (128, 300),
                                   (300, 128)], ids=lambda x: str(x))
def test_causal_lengths(backend, Nq, Nk):
    """Top-left aligned causal mask for every Nq/Nk relation (incl. rows i >= Nk that see all keys)."""
    device = require(backend, dtype=torch.float64, head_dim=16)
    q, k, v = make_qkv(1, 2, 1, Nq, Nk, 16, dtype=torch.float64, device=device)
    check_attention(backend, q, k, v, causal=True)


def test_causal_is_top_left(backend):
    """Row i must equal plain attention over keys[: i + 1] (the definition, not the reference)."""
    device = require(backend, dtype=torch.float64, head_dim=8)
    q, k, v = make_qkv(1, 1, 1, 5, 9, 8, dtype=torch.float64, device=device, requires_grad=False)
    out = fastattn.attention(q, k, v, causal=True, backend=backend)
    for i in range(5):
        row = fastattn.attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], backend=backend)
        assert_close(f"row {i}", out[:, :, i:i + 1], row, atol=1e-12, rtol=1e-12)


# Mask shapes broadcast to (B=2, Hq=4, Nq=13, Nk=29) in several ways.
MASK_SHAPES = {
    "Nq,Nk": (13, 29),
    "Nk": (29,),
    "B,1,1,Nk(key_padding)": (2, 1, 1, 29),
    "1,H,Nq,Nk": (1, 4, 13, 29),
    "B,1,Nq,1": (2, 1, 13, 1),
    "B,H,Nq,Nk": (2, 4, 13, 29),
    "H,Nq,Nk": (4, 13, 29),
    "1,1,1,1": (1, 1, 1, 1),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES.values()), ids=list(MASK_SHAPES))
def test_masks(backend, mask_shape, kind, causal):
    dtype = torch.float64
    device = require(backend, dtype=dtype, head_dim=24, has_mask=True)
    q, k, v = make_qkv(2, 4, 2, 13, 29, 24, dtype=dtype, device=device)
    mask = make_mask(kind, mask_shape, 29, dtype=dtype, device=device)
    check_attention(backend, q, k, v, causal=causal, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_float32_long(backend, kind):
    """A key-padding mask on a long sequence, float32 (masking across many key blocks)."""
    device = require(backend, dtype=torch.float32, head_dim=64, has_mask=True)
    q, k, v = make_qkv(1, 2, 1, 300, 1000, 64, device=device)
    mask = make_mask(kind, (1, 1, 1, 1000), 1000, dtype=torch.float32, device=device, p_keep=0.5)
    check_attention(backend, q, k, v, causal=True, attn_mask=mask)


def test_mask_noncontiguous(backend):
    """Masks given as views: transposed and expanded (stride 0)."""
    device = require(backend, dtype=torch.float64, head_dim=16, has_mask=True)
    q, k, v = make_qkv(2, 2, 2, 11, 17, 16, dtype=torch.float64, device=device)
    mask_t = (torch.rand(2, 2, 17, 11, device=device) < 0.7).transpose(-1, -2)  # (B, H, Nq, Nk) view
    mask_t[..., 0] = True
    check_attention(backend, q, k, v, attn_mask=mask_t)
    bias = torch.randn(1, 1, 1, 17, dtype=torch.float64, device=device).expand(2, 2, 11, 17)
    check_attention(backend, q, k, v, attn_mask=bias, causal=True)


def test_mask_large_negative_float(backend):
    """A float mask of -1e9 (not -inf) behaves like masking out those keys."""
    device = require(backend, dtype=torch.float32, head_dim=16, has_mask=True)
    q, k, v = make_qkv(2, 2, 2, 9, 21, 16, device=device)
    keep = make_mask("bool", (2, 1, 1, 21), 21, device=device)
    bias = torch.zeros(2, 1, 1, 21, device=device).masked_fill(~keep, -1e9)
    out, lse, _, _ = check_attention(backend, q, k, v, attn_mask=bias)
    out_bool = fastattn.attention(q, k, v, attn_mask=keep, backend=backend)
    assert_close("out(-1e9) vs out(bool)", out, out_bool, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Rows that see no key: zeros, lse = -inf, zero gradients.
# ----------------------------------------------------------------------------------------------
def _fully_masked_case(case, device, dtype):
    B, H, Nq, Nk = 2, 2, 10, 12
    causal = False
    if case == "bool_rows":
        mask = torch.rand(B, H, Nq, Nk, device=device) < 0.7
        mask[0, 1, 3] = False
        mask[1, :, 7:] = False
    elif case == "float_rows":
        mask = torch.randn(B, H, Nq, Nk, dtype=dtype, device=device)
        mask[0, 1, 3] = float("-inf")
        mask[1, :, 7:] = float("-inf")
    elif case == "bool_query_mask":  # (B, 1, Nq, 1): whole queries masked
        mask = torch.ones(B, 1, Nq, 1, dtype=torch.bool, device=device)
        mask[0, :, 2] = False
        mask[1, :, ::3] = False
    elif case == "causal_key_padding":  # key 0 padded away: with causal, row 0 sees nothing
        mask = torch.ones(B, 1, 1, Nk, dtype=torch.bool, device=device)
        mask[:, :, :, 0] = False
        mask[1, :, :, 1] = False
        causal = True
    elif case == "all_masked":
        mask = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=device)
    else:
        raise ValueError(case)
    return (B, H, Nq, Nk), mask, causal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", ["bool_rows", "float_rows", "bool_query_mask", "causal_key_padding",
                                  "all_masked"])
def test_fully_masked_rows(backend, case, dtype):
    device = require(backend, dtype=dtype, head_dim=16, has_mask=True)
    (B, H, Nq, Nk), mask, causal = _fully_masked_case(case, device, dtype)
    q, k, v = make_qkv(B, H, H, Nq, Nk, 16, dtype=dtype, device=device)
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, causal=causal, backend=backend, return_lse=True)
    if mask.dtype == torch.bool:
        allowed = mask.expand(B, H, Nq, Nk)
    else:
        allowed = torch.isfinite(mask).expand(B, H, Nq, Nk)
    if causal:
        allowed = allowed & torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril()
    dead = ~allowed.any(-1)  # (B, H, Nq)
    assert dead.any(), "test setup: no fully masked row"
    assert torch.isneginf(lse[dead]).all(), f"lse on fully masked rows: {lse[dead]}"
    assert torch.isfinite(lse[~dead]).all()
    assert (out[dead] == 0).all(), "fully masked rows must give exact zeros"
    assert torch.isfinite(out).all()
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name} has non-finite entries"
    assert (dq[dead] == 0).all(), "dq of fully masked rows must be zero"
    # The live rows still match the reference; the dead rows contribute nothing to dk/dv, so
    # dropping them (zero grad_out) must not change dk/dv.
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), causal=causal,
                              attn_mask=mask.double() if mask.is_floating_point() else mask)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype in LOW_PRECISION else dict(atol=1e-5, rtol=1e-4)
    assert_close("out (live rows)", out[~dead], ref[~dead], **tol)
    dq2, dk2, dv2 = torch.autograd.grad(
        fastattn.attention(q, k, v, attn_mask=mask, causal=causal, backend=backend),
        (q, k, v), grad_out.masked_fill(dead.unsqueeze(-1), 0))
    same = dict(atol=1e-2, rtol=1e-2) if dtype in LOW_PRECISION else dict(atol=1e-6, rtol=1e-6)
    for name, g, g2 in (("dq", dq, dq2), ("dk", dk, dk2), ("dv", dv, dv2)):
        assert_close(f"{name} (dead rows' grad_out zeroed)", g, g2, **same)


@pytest.mark.parametrize("Nq,Nk", [(5, 0), (0, 5), (0, 0)], ids=lambda x: str(x))
def test_empty_sequences(backend, Nq, Nk):
    """Nk = 0: every row sees no key (zeros, lse -inf); Nq = 0: empty output."""
    device = require(backend, dtype=torch.float32, head_dim=16)
    q, k, v = make_qkv(2, 2, 1, Nq, Nk, 16, 24, device=device)
    out, lse = fastattn.attention(q, k, v, backend=backend, return_lse=True)
    assert out.shape == (2, 2, Nq, 24) and lse.shape == (2, 2, Nq)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_batch(backend, causal):
    device = require(backend, dtype=torch.float32, head_dim=32, has_mask=True)
    q, k, v = make_qkv(0, 4, 2, 7, 9, 32, 16, device=device)
    mask = torch.ones(0, 1, 7, 9, dtype=torch.bool, device=device)
    for m in (None, mask):
        out, lse = fastattn.attention(q, k, v, causal=causal, attn_mask=m, backend=backend, return_lse=True)
        assert out.shape == (0, 4, 7, 16) and out.dtype == q.dtype
        assert lse.shape == (0, 4, 7) and lse.dtype == torch.float32
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


# ----------------------------------------------------------------------------------------------
# Layouts, scale, dtypes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_noncontiguous_inputs(backend, layout, dtype):
    device = require(backend, dtype=dtype, head_dim=40)
    q, k, v = make_qkv(2, 4, 2, 23, 37, 40, 24, dtype=dtype, device=device, layout=layout)
    check_attention(backend, q, k, v, causal=True)


def test_mixed_layouts(backend):
    """q, k, v each in a different layout, and a non-contiguous grad_out."""
    device = require(backend, dtype=torch.float64, head_dim=16)
    q = make_tensor((2, 4, 9, 16), dtype=torch.float64, device=device, layout="bnhd", requires_grad=True)
    k = make_tensor((2, 2, 11, 16), dtype=torch.float64, device=device, layout="strided", requires_grad=True)
    v = make_tensor((2, 2, 11, 8), dtype=torch.float64, device=device, layout="contiguous", requires_grad=True)
    grad_out = torch.randn(2, 9, 8, 4, dtype=torch.float64, device=device).permute(0, 3, 1, 2)  # (B, H, N, Dv)
    check_attention(backend, q, k, v, causal=True, grad_out=grad_out)


def test_inputs_not_modified(backend):
    device = require(backend, dtype=torch.float32, head_dim=16, has_mask=True)
    q, k, v = make_qkv(2, 2, 1, 9, 13, 16, device=device)
    mask = make_mask("float", (2, 1, 9, 13), 13, device=device)
    before = [t.detach().clone() for t in (q, k, v, mask)]
    out = fastattn.attention(q, k, v, attn_mask=mask, causal=True, backend=backend)
    out.backward(torch.randn_like(out))
    for name, t, b in zip("q k v attn_mask".split(), (q, k, v, mask), before):
        assert torch.equal(t.detach(), b), f"{name} was modified in place"


@pytest.mark.parametrize("scale", [0.0, 0.05, 0.3, 1.0, 2.5, -0.7], ids=lambda s: f"scale={s}")
def test_custom_scale(backend, scale):
    device = require(backend, dtype=torch.float64, head_dim=32)
    q, k, v = make_qkv(2, 2, 2, 15, 33, 32, dtype=torch.float64, device=device)
    check_attention(backend, q, k, v, scale=scale, causal=True)


def test_default_scale_is_inv_sqrt_d(backend):
    device = require(backend, dtype=torch.float64, head_dim=40)
    q, k, v = make_qkv(1, 2, 2, 9, 10, 40, dtype=torch.float64, device=device, requires_grad=False)
    a = fastattn.attention(q, k, v, backend=backend)
    b = fastattn.attention(q, k, v, scale=1 / math.sqrt(40), backend=backend)
    assert_close("out", a, b, atol=1e-14, rtol=1e-14)


# Low precision: the 2x rule against the same reference computed in that dtype.
LOWP_CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, Dv, causal, mask)
    (2, 4, 2, 7, 97, 64, 64, True, None),
    (2, 4, 2, 97, 7, 64, 64, True, None),
    (2, 3, 3, 97, 97, 40, 80, False, None),
    (1, 2, 1, 1000, 1000, 64, 64, True, None),
    (1, 1, 1, 1, 1, 8, 8, False, None),
    (2, 2, 1, 33, 45, 128, 128, False, "bool"),
    (2, 2, 2, 33, 45, 256, 256, True, "float"),
    (1, 2, 2, 61, 77, 16, 16, False, "float"),
]


def _lowp_id(c):
    return shape_id(*c[:7]) + ("-causal" if c[7] else "") + (f"-{c[8]}mask" if c[8] else "")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("case", LOWP_CASES, ids=_lowp_id)
def test_low_precision(backend, case, dtype):
    B, Hq, Hkv, Nq, Nk, D, Dv, causal, mask_kind = case
    device = require(backend, dtype=dtype, head_dim=max(D, Dv), has_mask=mask_kind is not None)
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype, device=device)
    mask = make_mask(mask_kind, (B, 1, Nq, Nk), Nk, dtype=dtype, device=device) if mask_kind else None
    check_attention(backend, q, k, v, causal=causal, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_output_and_lse_dtypes(backend, dtype):
    device = require(backend, dtype=dtype, head_dim=16)
    q, k, v = make_qkv(1, 2, 2, 5, 6, 16, dtype=dtype, device=device, requires_grad=False)
    out = fastattn.attention(q, k, v, backend=backend)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype
    out2, lse = fastattn.attention(q, k, v, backend=backend, return_lse=True)
    assert out2.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(out, out2)


# ----------------------------------------------------------------------------------------------
# NaN and large logits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_propagates_through_logits(backend, where, causal):
    """A NaN in q row i (or key j) makes NaN every output row whose logits it reaches.

    Rows of other batches/heads, and rows before j under causal, stay exact. A row that only a
    bool mask hides from key j may go either way (the reference keeps it finite, torch's SDPA
    gives NaN), so it is not checked.
    """
    device = require(backend, dtype=torch.float32, head_dim=16, has_mask=True)
    q, k, v = make_qkv(2, 4, 2, 11, 13, 16, device=device, requires_grad=False)
    mask = torch.ones(2, 1, 11, 13, dtype=torch.bool, device=device)
    mask[:, :, 4, 6] = False  # row 4 cannot see key 6
    if where == "q":
        q[1, 3, 5, 2] = float("nan")
    else:
        k[0, 1, 6, 7] = float("nan")  # reaches q heads 2, 3 of batch 0, rows that see key 6
    out, lse = fastattn.attention(q, k, v, causal=causal, attn_mask=mask, backend=backend, return_lse=True)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=causal, attn_mask=mask,
                                       return_lse=True)
    nan_rows = torch.isnan(ref).any(-1)  # (B, H, Nq): rows the NaN reaches
    assert nan_rows.any() and not nan_rows.all()
    assert torch.isnan(out[nan_rows]).all(), (
        f"rows the NaN reaches must be all NaN; ours has finite values in rows "
        f"{(~torch.isnan(out).all(-1) & nan_rows).nonzero().tolist()}")
    assert torch.isnan(lse[nan_rows]).all()
    clean = ~nan_rows
    if where == "k":
        clean[0, 2:4, 4] = False  # hidden from key 6 by the bool mask only: either result is accepted
    assert_close("out (rows the NaN does not reach)", out[clean], ref[clean], atol=1e-5, rtol=1e-4)
    assert_close("lse (rows the NaN does not reach)", lse[clean], ref_lse[clean], atol=2e-5, rtol=1e-5)


def test_nan_in_v_reaches_rows_that_see_it(backend):
    """NaN in v[key 4, column 3]: column 3 of every row that sees key 4 is NaN; nothing else changes."""
    device = require(backend, dtype=torch.float32, head_dim=16)
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, device=device, requires_grad=False)
    v[0, 0, 4, 3] = float("nan")
    out = fastattn.attention(q, k, v, causal=True, backend=backend)
    assert torch.isnan(out[0, 0, 4:, 3]).all(), "rows that see key 4 must have NaN in column 3"
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    other = torch.arange(16, device=device) != 3
    assert_close("other columns", out[..., other], ref[..., other], atol=1e-5, rtol=1e-4)
    assert_close("other head", out[0, 1], ref[0, 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_large_logits_stay_finite(backend, dtype):
    """Logits of magnitude ~1e4: no overflow in the exponentials, forward or backward."""
    device = require(backend, dtype=dtype, head_dim=64)
    q, k, v = make_qkv(2, 2, 2, 50, 70, 64, dtype=dtype, device=device, std=30.0)
    out, lse = fastattn.attention(q, k, v, causal=True, backend=backend, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert lse.abs().max() > 1e3, "test setup: logits are not large"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=True, return_lse=True)
    # Softmax is near one-hot here. Logits are float32 sums of D products of size ~|q||k| ~ 1e3,
    # so they carry ~1e-3 absolute error (float32 epsilon x D x 1e3), whatever the kernel.
    assert_close("lse", lse, ref_lse, atol=5e-3, rtol=1e-5)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, g, rg in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert torch.isfinite(g).all(), f"{name} not finite"
    if dtype == torch.float32:
        assert_close("out", out, ref, atol=1e-2, rtol=1e-2)
        assert_close("dv", dv, rv, atol=1e-2, rtol=1e-2)


def test_large_float_mask_values(backend):
    """Additive biases of +-1e4 shift logits far from 0 without overflow."""
    device = require(backend, dtype=torch.float32, head_dim=16, has_mask=True)
    q, k, v = make_qkv(1, 2, 2, 8, 12, 16, device=device)
    bias = torch.randn(1, 2, 8, 12, device=device) * 1e4
    out, lse = fastattn.attention(q, k, v, attn_mask=bias, backend=backend, return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, attn_mask=bias.double(), return_lse=True)
    # Logits of size ~1e4 have a float32 last place of ~1e-3: any float32 computation (PyTorch's
    # own included) rounds them, so the probabilities, the output and the gradients carry a
    # relative error of a few eps * |logit|. The backward also recomputes P = exp(logit - lse)
    # from a float32 lse of that size, like any FA2 backward.
    rel = 8 * torch.finfo(torch.float32).eps * ref_lse.abs().max().item()
    assert_close("out", out, ref, atol=rel * ref.abs().max().item() + FWD_ATOL[torch.float32], rtol=0)
    assert_close("lse", lse, ref_lse, atol=0, rtol=1e-6)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(g).all(), f"{name} not finite"
        assert_close(name, g, rg, atol=rel * rg.abs().max().item() + GRAD_ATOL[torch.float32], rtol=0)


# ----------------------------------------------------------------------------------------------
# gradcheck in float64
# ----------------------------------------------------------------------------------------------
GRADCHECK_CASES = {
    "plain": dict(shape=(1, 2, 2, 5, 6, 4), causal=False, mask=None),
    "causal_Nq>Nk": dict(shape=(1, 2, 2, 6, 4, 3), causal=True, mask=None),
    "causal_Nq<Nk": dict(shape=(1, 2, 1, 3, 7, 4), causal=True, mask=None),
    "gqa_bool_mask": dict(shape=(2, 4, 2, 4, 5, 3), causal=False, mask="bool"),
    "mqa_float_mask_causal": dict(shape=(1, 3, 1, 5, 5, 4), causal=True, mask="float"),
    "dv_differs": dict(shape=(1, 2, 2, 4, 5, 3), causal=False, mask=None, Dv=6),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES.values()), ids=list(GRADCHECK_CASES))
def test_gradcheck(backend, case):
    B, Hq, Hkv, Nq, Nk, D = case["shape"]
    device = require(backend, dtype=torch.float64, head_dim=D, has_mask=case["mask"] is not None)
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, case.get("Dv"), dtype=torch.float64, device=device)
    mask = None
    if case["mask"]:
        mask = make_mask(case["mask"], (B, 1, Nq, Nk), Nk, dtype=torch.float64, device=device)

    def fn(q, k, v):
        return fastattn.attention(q, k, v, causal=case["causal"], attn_mask=mask, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=GRADCHECK_EPS, atol=GRADCHECK_ATOL)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------
def test_auto_matches_named_backend(backend):
    """backend="auto" runs a fused kernel for a plain call and gives the same result as naming it."""
    device = require(backend, dtype=torch.float32, head_dim=64)
    chosen = dispatch.choose_backend("auto", device, torch.float32, 64)
    assert chosen != "reference", "auto fell back to the reference for a plain float32 call"
    q, k, v = make_qkv(2, 2, 2, 33, 33, 64, device=device, requires_grad=False)
    a = fastattn.attention(q, k, v, causal=True)
    b = fastattn.attention(q, k, v, causal=True, backend=chosen)
    assert torch.equal(a, b)


def test_reference_backend_matches_reference():
    """backend="reference" is the reference (sanity of the comparison baseline itself)."""
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16, dtype=torch.float64, requires_grad=False)
    out = fastattn.attention(q, k, v, causal=True, backend="reference")
    assert_close("out", out, attention_reference(q, k, v, causal=True), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Key padding: kernels may skip key blocks the mask hides completely and trim hidden block tails
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_shape", ["B11N", "BH1N"])
def test_right_padding_whole_blocks_hidden(backend, mask_shape, causal):
    """Right-padded keys (BERT batches) long enough to hide whole key blocks, and a padded tail inside a block."""
    device = require(backend, dtype=torch.float64, head_dim=32, has_mask=True)
    B, Hq, Hkv, N = 3, 4, 2, 600
    q, k, v = make_qkv(B, Hq, Hkv, N, N, 32, dtype=torch.float64, device=device)
    lengths = [600, 300, 5]  # no padding; half the keys; all but the first 5
    keep = torch.zeros(B, Hq if mask_shape == "BH1N" else 1, 1, N, dtype=torch.bool, device=device)
    for b, n in enumerate(lengths):
        keep[b, ..., :n] = True
    if mask_shape == "BH1N":
        keep[1, 1, :, 200:] = False  # one head of sequence 1 sees fewer keys
    check_attention(backend, q, k, v, causal=causal, attn_mask=keep)


# ----------------------------------------------------------------------------------------------
# Regression: the causal backward with Nq < Nk (issue 13). The last query tile could end 16+ rows
# above a key block (Nq = 97: tile 96..96 against keys 128..), its key count came out negative and
# the backward wrote past its scratch buffers (SIGSEGV). tests/sweep.py sweeps every such boundary.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Nq, Nk, D, Hq, Hkv", [(97, 129, 64, 1, 1), (97, 130, 64, 1, 1), (97, 202, 59, 6, 2),
                                                (97, 400, 64, 6, 6), (481, 600, 64, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_causal_backward_fewer_queries_than_keys(backend, dtype, Nq, Nk, D, Hq, Hkv):
    device = require(backend, dtype=dtype, head_dim=D)
    q, k, v = make_qkv(1, Hq, Hkv, Nq, Nk, D, dtype=dtype, device=device)
    check_attention(backend, q, k, v, causal=True)


def test_reference_float_mask_hides_rows_with_zero_gradients():
    """A float mask that is -inf on a whole row: the reference gives zeros and zero (not NaN) gradients,
    as with a bool mask (logsumexp's backward alone would be NaN on such a row)."""
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8, dtype=torch.float64)
    bias = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    bias[0, 1, 2] = float("-inf")
    out = attention_reference(q, k, v, attn_mask=bias)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (out[0, 1, 2] == 0).all() and (dq[0, 1, 2] == 0).all()
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    out_bool = attention_reference(q, k, v, attn_mask=torch.isfinite(bias))
    assert torch.allclose(out[0, 1, 2], out_bool[0, 1, 2])

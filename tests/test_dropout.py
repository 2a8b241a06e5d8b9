"""Dropout: bit-exact against the reference's Philox mask, statistics, rescaling, reproducibility.

The exact tests call the ops with a fixed rng_state (seed, offset) and compare with
``attention_reference(..., rng_state=...)``, forward and gradients. Through the public API,
where the rng_state is drawn from torch's default generator, a kernel backend and the
"reference" backend run after the same ``torch.manual_seed`` must agree.
"""
import math

import pytest
import torch

import fastattn
from conftest import (FWD_ATOL, FWD_RTOL, FWD_FLOOR, GRAD_ATOL, GRAD_FLOOR, GRAD_RTOL, LSE_ATOL, LSE_RTOL,
                      assert_close, assert_within_2x, dtype_id, make_mask, make_qkv, require, require_op,
                      shape_id)
from fastattn.reference import attention_reference, dropout_keep_mask

# (B, Hq, Hkv, Nq, Nk, D, causal, mask kind, p)
EXACT_CASES = [
    (2, 4, 2, 13, 29, 16, False, None, 0.2),
    (1, 2, 1, 97, 7, 32, True, None, 0.5),
    (2, 2, 2, 7, 97, 40, True, "bool", 0.1),
    (1, 3, 3, 65, 130, 64, False, "float", 0.9),
    (1, 1, 1, 1, 1, 8, False, None, 0.5),
    (1, 2, 2, 300, 257, 16, True, None, 0.3),
    (2, 2, 1, 33, 45, 128, False, None, 0.01),
]
RNG_STATES = {
    "seed42": (42, 0),
    "big_seed_offset": (2**62 + 12345, 2**33 + 7),
    "seed0_offset9": (0, 9),
}


def _case_id(c):
    B, Hq, Hkv, Nq, Nk, D, causal, mask, p = c
    return shape_id(B, Hq, Hkv, Nq, Nk, D) + ("-causal" if causal else "") + (f"-{mask}mask" if mask else "") + f"-p{p}"


def _grad_out(out):
    return torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)


@pytest.mark.parametrize("rng", list(RNG_STATES.values()), ids=list(RNG_STATES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", EXACT_CASES, ids=_case_id)
def test_dropout_op_matches_reference(op_device, case, dtype, rng):
    B, Hq, Hkv, Nq, Nk, D, causal, mask_kind, p = case
    require_op(op_device, dtype=dtype, head_dim=D, has_mask=mask_kind is not None, dropout=True)
    rng_state = torch.tensor(rng, dtype=torch.int64)
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, device=op_device, requires_grad=False)
    mask = make_mask(mask_kind, (B, 1, Nq, Nk), Nk, dtype=dtype, device=op_device) if mask_kind else None
    scale = 1.0 / math.sqrt(D)
    out, lse = torch.ops.fastattn.fwd(q, k, v, mask, causal, scale, p, rng_state)
    grad_out = _grad_out(out)
    dq, dk, dv = torch.ops.fastattn.bwd(grad_out, q, k, v, out, lse, mask, causal, scale, p, rng_state)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, attn_mask=mask64, scale=scale, dropout_p=p,
                                       rng_state=rng_state, return_lse=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    # lse is the log-sum-exp of the logits before dropout
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dtype], rtol=LSE_RTOL[dtype])
    if dtype == torch.bfloat16:
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        low = attention_reference(ql, kl, vl, causal=causal, attn_mask=mask, scale=scale, dropout_p=p,
                                  rng_state=rng_state, compute_dtype=dtype)
        low_grads = torch.autograd.grad(low, (ql, kl, vl), grad_out)
        assert_within_2x("out", out, low, ref, FWD_FLOOR[dtype])
        for name, g, lg, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), low_grads, ref_grads):
            assert_within_2x(name, g, lg, rg, GRAD_FLOOR[dtype])
    else:
        assert_close("out", out, ref, atol=FWD_ATOL[dtype], rtol=FWD_RTOL[dtype])
        for name, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
            assert_close(name, g, rg, atol=GRAD_ATOL[dtype], rtol=GRAD_RTOL[dtype])


def test_dropout_op_depends_on_seed_and_offset(op_device):
    require_op(op_device, dtype=torch.float64, head_dim=16, dropout=True)
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, dtype=torch.float64, device=op_device, requires_grad=False)
    outs = {}
    for name, rng in {"a": (1, 0), "seed": (2, 0), "offset": (1, 1), "a_again": (1, 0)}.items():
        outs[name], _ = torch.ops.fastattn.fwd(q, k, v, None, False, 0.25, 0.5, torch.tensor(rng))
    assert torch.equal(outs["a"], outs["a_again"])
    assert not torch.allclose(outs["a"], outs["seed"])
    assert not torch.allclose(outs["a"], outs["offset"])


# ----------------------------------------------------------------------------------------------
# Through the public API: the kernel's keep-mask, recovered exactly
# ----------------------------------------------------------------------------------------------
def recover_keep_mask(backend, B, Hq, Hkv, Nq, Nk, p, seed, causal=False, device="cpu"):
    """The (B, Hq, Nq, Nk) keep-mask the backend applied, read off its output.

    scale=0 makes every visible key equally likely and v = I (Dv = Nk) gives
    out[b, h, i, j] = keep[b, h, i, j] / (n_visible(i) * (1 - p)).
    """
    q, k, _ = make_qkv(B, Hq, Hkv, Nq, Nk, 8, dtype=torch.float64, device=device, requires_grad=False)
    v = torch.eye(Nk, dtype=torch.float64, device=device).expand(B, Hkv, Nk, Nk)  # (B, Hkv, Nk, Dv=Nk)
    torch.manual_seed(seed)
    out = fastattn.attention(q, k, v, scale=0.0, dropout_p=p, causal=causal, backend=backend)
    visible = torch.ones(Nq, Nk, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril()
    n_visible = visible.sum(-1, keepdim=True).clamp(min=1).double()  # (Nq, 1)
    scaled = out * n_visible * (1 - p)
    keep = scaled.round()
    assert ((scaled - keep).abs() < 1e-9).all(), "kept weights are not rescaled by exactly 1/(1-p)"
    assert ((keep == 0) | (keep == 1)).all()
    assert not keep[..., ~visible].any(), "dropout kept an invisible (causally masked) key"
    return keep.bool() & visible


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9], ids=lambda p: f"p{p}")
def test_kept_fraction(backend, p):
    device = require(backend, dtype=torch.float64, head_dim=8, dropout=True)
    B, H, Nq, Nk = 2, 4, 128, 64
    keep = recover_keep_mask(backend, B, H, 2, Nq, Nk, p, seed=1234, device=device)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept fraction {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # Each of the four Philox words (key j % 4) is used with the same threshold.
    for lane in range(4):
        f = keep[..., lane::4].double().mean().item()
        assert abs(f - (1 - p)) < 5 * 2 * sigma, f"keys j % 4 == {lane}: kept fraction {f:.4f}"
    # Masks of different (batch, head) segments and rows are not copies of each other.
    segs = keep.reshape(B * H, Nq * Nk)
    assert all(not torch.equal(segs[0], segs[s]) for s in range(1, B * H))
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_keep_mask_matches_reference_backend(backend, causal):
    """The kernel's mask equals the reference's Philox mask for the same torch.manual_seed."""
    device = require(backend, dtype=torch.float64, head_dim=8, dropout=True)
    args = (2, 4, 2, 37, 53, 0.3)
    ours = recover_keep_mask(backend, *args, seed=7, causal=causal, device=device)
    ref = recover_keep_mask("reference", *args, seed=7, causal=causal, device=device)
    assert torch.equal(ours, ref), f"{(ours != ref).sum().item()} of {ours.numel()} keep decisions differ"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("case", EXACT_CASES[:4], ids=_case_id)
def test_dropout_matches_reference_backend(backend, case, dtype):
    """Same seed, same result as backend="reference" (forward and gradients), incl. GQA/mask/causal."""
    B, Hq, Hkv, Nq, Nk, D, causal, mask_kind, p = case
    device = require(backend, dtype=dtype, head_dim=D, has_mask=mask_kind is not None, dropout=True)
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, device=device)
    mask = make_mask(mask_kind, (B, 1, Nq, Nk), Nk, dtype=dtype, device=device) if mask_kind else None
    grad_out = torch.randn(B, Hq, Nq, D, dtype=dtype, device=device)
    results = {}
    for name in (backend, "reference"):
        torch.manual_seed(2024)
        out = fastattn.attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=p, backend=name)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for name, a, b in zip(("out", "dq", "dk", "dv"), results[backend], results["reference"]):
        tol = (FWD_ATOL[dtype], FWD_RTOL[dtype]) if name == "out" else (GRAD_ATOL[dtype], GRAD_RTOL[dtype])
        assert_close(name, a, b, atol=tol[0], rtol=tol[1])


def test_rescaling_is_unbiased(backend):
    """E[dropout output] = output without dropout: the mean over many draws converges to it."""
    device = require(backend, dtype=torch.float64, head_dim=8, dropout=True)
    q, k, v = make_qkv(1, 2, 1, 8, 16, 8, dtype=torch.float64, device=device, requires_grad=False)
    expected = fastattn.attention(q, k, v, backend=backend)
    torch.manual_seed(0)
    draws = torch.stack([fastattn.attention(q, k, v, dropout_p=0.5, backend=backend) for _ in range(400)])
    mean, sem = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    z = ((mean - expected).abs() / sem).max().item()
    assert z < 5, f"mean over 400 draws is {z:.1f} standard errors from the no-dropout output"
    assert (sem > 0).all(), "some outputs never varied across draws"


@pytest.mark.parametrize("p", [0.1, 0.6], ids=lambda p: f"p{p}")
def test_ones_value_gives_kept_mass(backend, p):
    """With v = 1 every output entry is (kept probability mass) / (1 - p), and averages to 1."""
    device = require(backend, dtype=torch.float64, head_dim=16, dropout=True)
    q, k, _ = make_qkv(2, 4, 4, 64, 96, 16, dtype=torch.float64, device=device, requires_grad=False)
    v = torch.ones(2, 4, 96, 3, dtype=torch.float64, device=device)
    torch.manual_seed(99)
    out = fastattn.attention(q, k, v, dropout_p=p, backend=backend)
    assert torch.allclose(out[..., 0], out[..., 1]) and torch.allclose(out[..., 0], out[..., 2])
    mass = out[..., 0] * (1 - p)  # kept probability mass per row, in [0, 1]
    assert (mass >= -1e-12).all() and (mass <= 1 + 1e-12).all()
    mean = out[..., 0].mean().item()
    # each row's kept mass has variance <= p (1-p) sum_j P_ij^2; loosely bounded over 512 rows
    assert abs(mean - 1) < 0.1, f"mean output {mean:.3f}, expected ~1"


def test_reproducible_under_manual_seed(backend):
    device = require(backend, dtype=torch.float32, head_dim=32, dropout=True)
    q, k, v = make_qkv(2, 4, 2, 33, 47, 32, device=device)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        out = fastattn.attention(q, k, v, dropout_p=0.3, causal=True, backend=backend)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two runs with the same seed"


def test_different_seeds_and_calls_differ(backend):
    device = require(backend, dtype=torch.float32, head_dim=32, dropout=True)
    q, k, v = make_qkv(1, 2, 2, 33, 47, 32, device=device, requires_grad=False)
    torch.manual_seed(1)
    a = fastattn.attention(q, k, v, dropout_p=0.3, backend=backend)
    a_next = fastattn.attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(2)
    b = fastattn.attention(q, k, v, dropout_p=0.3, backend=backend)
    assert not torch.allclose(a, b), "different seeds gave the same dropout"
    assert not torch.allclose(a, a_next), "two successive calls reused the same dropout mask"


def test_dropout_zero_is_no_dropout(backend):
    device = require(backend, dtype=torch.float32, head_dim=32, dropout=True)
    q, k, v = make_qkv(2, 2, 2, 17, 19, 32, device=device, requires_grad=False)
    assert torch.equal(fastattn.attention(q, k, v, dropout_p=0.0, backend=backend),
                       fastattn.attention(q, k, v, backend=backend))


def test_dropout_with_fully_masked_rows(backend):
    device = require(backend, dtype=torch.float32, head_dim=16, has_mask=True, dropout=True)
    q, k, v = make_qkv(2, 2, 2, 9, 11, 16, device=device)
    mask = torch.rand(2, 1, 9, 11, device=device) < 0.8
    mask[:, :, 3] = False
    torch.manual_seed(5)
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, dropout_p=0.4, backend=backend, return_lse=True)
    assert (out[:, :, 3] == 0).all() and torch.isneginf(lse[:, :, 3]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:, :, 3] == 0).all()


def test_reference_keep_mask_fraction():
    """Sanity of the reference Philox itself (what the kernels are compared with)."""
    rng_state = torch.tensor([17, 3])
    keep = dropout_keep_mask(rng_state, 0.25, 4, 64, 64, batch=2)
    assert keep.shape == (2, 4, 64, 64)
    assert abs(keep.double().mean().item() - 0.75) < 5 * math.sqrt(0.25 * 0.75 / keep.numel())
    # batch_start selects the same segments as slicing a larger batch
    assert torch.equal(dropout_keep_mask(rng_state, 0.25, 4, 64, 64, batch=1, batch_start=1), keep[1:])

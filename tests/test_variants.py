"""Attention variants: sliding windows, bottom-right alignment, soft-capping, ALiBi, sinks.

The float64 reference (fastattn/reference.py) is first checked against the definitions written
out element by element (``definition``), then every backend that declares a variant
(dispatch.CAPABILITIES) against the reference: forward, lse and every gradient (the sinks'
included), Nq != Nk in both alignments, GQA, varlen, decode shapes, rows that see nothing, low
precision by the 2x rule. Backends that do not serve a variant must refuse it by name.
The boundary sweep (tests/sweep.py, sections 6-9) crosses the variants with every block edge.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn import dispatch, reference
from fastattn._ops import sinks_grad
from sweep import _rounded_output_allowance as rounded_output_allowance
from conftest import (FWD_ATOL, FWD_FLOOR, FWD_RTOL, GRAD_ATOL, GRAD_FLOOR, GRAD_RTOL, LOW_PRECISION, LSE_ATOL,
                      LSE_RTOL, assert_close, assert_within_2x, backend_device, cu_seqlens, kernel_backends,
                      make_qkv, make_varlen)


def definition(q, k, v, *, causal=False, window_size=(-1, -1), alignment="top_left", softcap=0.0,
               alibi_slopes=None, sinks=None, attn_mask=None, scale=None):
    """Attention with the variants, one (b, h, i) row at a time, straight from the definitions."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    left, right = window_size
    if causal:
        right = 0
    sinks = sinks.detach() if sinks is not None else None
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Nq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for i in range(Nq):
                d = i + (Nk - Nq if alignment == "bottom_right" else 0)
                logits, values = [], []
                for j in range(Nk):
                    if (left >= 0 and j < d - left) or (right >= 0 and j > d + right):
                        continue
                    s = scale * float(q[b, h, i] @ k[b, hk, j])
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if alibi_slopes is not None:
                        slope = alibi_slopes[h] if alibi_slopes.dim() == 1 else alibi_slopes[b, h]
                        s -= float(slope) * abs(d - j)
                    if attn_mask is not None:
                        m = attn_mask.expand(B, Hq, Nq, Nk)[b, h, i, j]
                        if attn_mask.dtype == torch.bool:
                            if not m:
                                continue
                        else:
                            s += float(m)
                    logits.append(s)
                    values.append(v[b, hk, j].double())
                if sinks is not None:
                    logits.append(float(sinks[h]))
                    values.append(torch.zeros(v.shape[-1], dtype=torch.float64))
                if not logits or max(logits) == -math.inf:
                    continue
                m = max(logits)
                weights = [math.exp(x - m) for x in logits]
                total = sum(weights)
                out[b, h, i] = sum(w * x for w, x in zip(weights, values)) / total
                lse[b, h, i] = m + math.log(total)
    return out, lse


COMBOS = {
    "window-left": dict(window_size=(5, -1)),
    "window-right": dict(window_size=(-1, 3)),
    "window-both": dict(window_size=(6, 2)),
    "window-causal": dict(window_size=(9, 4), causal=True),
    "causal-bottom-right": dict(causal=True, alignment="bottom_right"),
    "window-bottom-right": dict(window_size=(4, 1), alignment="bottom_right"),
    "softcap": dict(softcap=2.5),
    "alibi-heads": dict(alibi="heads"),
    "alibi-batch-bottom-right": dict(alibi="batch", alignment="bottom_right"),
    "sinks": dict(sinks=True),
    "all": dict(window_size=(7, 0), alignment="bottom_right", softcap=4.0, alibi="batch", sinks=True,
                causal=True),
}


def variant_args(combo: dict, B: int, Hq: int, *, sinks_dtype=torch.float32, seed: int = 0) -> dict:
    """fastattn.attention keywords for a COMBOS entry: slopes and sinks drawn fresh (never zero)."""
    gen = torch.Generator().manual_seed(seed)
    kw = {key: val for key, val in combo.items() if key not in ("alibi", "sinks")}
    if combo.get("alibi"):
        shape = (Hq,) if combo["alibi"] == "heads" else (B, Hq)
        kw["alibi_slopes"] = torch.rand(shape, generator=gen) * 0.5 + 0.05
    if combo.get("sinks"):
        kw["sinks"] = (torch.randn(Hq, generator=gen) * 2).to(sinks_dtype).requires_grad_(True)
    return kw


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("Nq,Nk", [(5, 5), (3, 11), (11, 3)])
def test_reference_matches_the_definitions(combo, Nq, Nk):
    torch.manual_seed(0)
    q, k, v = make_qkv(2, 4, 2, Nq, Nk, 8, dtype=torch.float64, requires_grad=False)
    kw = variant_args(COMBOS[combo], 2, 4, sinks_dtype=torch.float64)
    mask = torch.rand(2, 1, Nq, Nk) < 0.8
    for m in (None, mask, torch.randn(2, 4, Nq, Nk, dtype=torch.float64)):
        out, lse = reference.attention_reference(q, k, v, attn_mask=m, return_lse=True, **kw)
        want, want_lse = definition(q, k, v, attn_mask=m, **kw)
        assert_close("out", out, want, atol=1e-12, rtol=1e-12)
        assert_close("lse", lse, want_lse, atol=1e-12, rtol=1e-12)


def test_sinks_gradient_formula_matches_autograd():
    """dsink_h = -sum_{b,i} p_sink * rowsum(dO * O), what the backends use, against the reference's autograd."""
    torch.manual_seed(1)
    q, k, v = make_qkv(2, 3, 3, 6, 9, 8, dtype=torch.float64, requires_grad=False)
    sinks = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out, lse = reference.attention_reference(q, k, v, sinks=sinks, window_size=(2, 0), return_lse=True)
    grad_out = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, sinks, grad_out)
    assert_close("dsinks", sinks_grad(sinks, out, grad_out, lse, varlen=False), want, atol=1e-12, rtol=1e-12)


def _backends_serving(variant_names):
    """The backends under test here (conftest.kernel_backends: interpreted Triton has its own small-shape
    test below) whose capability table lists every variant, and the reference."""
    return [b for b in kernel_backends() + ["reference"] if set(variant_names) <= dispatch.CAPABILITIES[b].variants]


def _names(combo: dict, Nq: int, Nk: int) -> tuple:
    names = []
    if combo.get("window_size", (-1, -1)) != (-1, -1):
        names.append("window")
    if combo.get("alignment") == "bottom_right" and Nq != Nk:
        names.append("bottom_right")
    for key, name in (("softcap", "softcap"), ("alibi", "alibi"), ("sinks", "sinks")):
        if combo.get(key):
            names.append(name)
    return tuple(names)


def check_variant(backend, q, k, v, kw, *, attn_mask=None):
    """fastattn.attention with the variants ``kw`` against the float64 reference: out, lse, dq, dk, dv, dsinks.

    The inputs are moved to the backend's device (as leaves) first."""
    device = backend_device(backend) if backend != "reference" else q.device
    if device != q.device:
        q, k, v = (t.detach().to(device).requires_grad_(True) for t in (q, k, v))
        kw = {key: (val.detach().to(device).requires_grad_(val.requires_grad) if isinstance(val, torch.Tensor)
                    else val) for key, val in kw.items()}
        attn_mask = attn_mask.to(device) if attn_mask is not None else None
    dtype = q.dtype
    sinks = kw.get("sinks")
    out, lse = fastattn.attention(q, k, v, attn_mask=attn_mask, backend=backend, return_lse=True, **kw)
    inputs = (q, k, v) + ((sinks,) if sinks is not None else ())
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)

    def run_reference(cdt):
        leaves = [t.detach().to(cdt).requires_grad_(True) for t in inputs]
        m = attn_mask.to(cdt) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        o, l = reference.attention_reference(*leaves[:3], attn_mask=m, return_lse=True, compute_dtype=cdt,
                                             **dict(kw, sinks=leaves[3] if sinks is not None else None))
        return o, l, torch.autograd.grad(o, leaves, grad_out.to(cdt))

    ref, ref_lse, ref_grads = run_reference(torch.float64)
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dtype], rtol=LSE_RTOL[dtype])
    names = ("dq", "dk", "dv", "dsinks")
    if dtype in LOW_PRECISION:
        low, _, low_grads = run_reference(dtype)
        assert_within_2x("out", out, low, ref, FWD_FLOOR[dtype])
        # the flash backward's delta = rowsum(dO * O) reads the rounded O: its exact cost on top of the floor
        leaves = [t.detach().double().requires_grad_(True) for t in inputs]
        m = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        o64, l64 = reference.attention_reference(*leaves[:3], attn_mask=m, return_lse=True,
                                                 **dict(kw, sinks=leaves[3] if sinks is not None else None))
        allowance = rounded_output_allowance(out, o64, l64, leaves, grad_out.double(), lambda rows: rows)
        for name, g, lg, rg, extra in zip(names, grads, low_grads, ref_grads, allowance):
            assert_within_2x(name, g, lg, rg, GRAD_FLOOR[dtype] + extra)
    else:
        assert_close("out", out, ref, atol=FWD_ATOL[dtype], rtol=FWD_RTOL[dtype])
        for name, g, rg in zip(names, grads, ref_grads):
            assert_close(name, g, rg, atol=GRAD_ATOL[dtype], rtol=GRAD_RTOL[dtype])
    return out, lse


SHAPES = [(1, 1), (7, 97), (97, 7), (3, 1000), (130, 300)]


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("Nq,Nk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_variant_matches_reference(combo, Nq, Nk, dtype):
    backends = _backends_serving(_names(COMBOS[combo], Nq, Nk))
    assert "cpu" in backends and "reference" in backends  # the CPU kernel serves every variant
    torch.manual_seed(Nq * 7 + Nk)
    for backend in backends:
        if dtype not in dispatch.CAPABILITIES[backend].dtypes:
            continue
        q, k, v = make_qkv(2, 4, 2, Nq, Nk, 16, dtype=dtype)
        sinks_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        check_variant(backend, q, k, v, variant_args(COMBOS[combo], 2, 4, sinks_dtype=sinks_dtype, seed=Nq))


TRITON_INTERPRETED = "triton" in dispatch.available_backends() and "cpu" in dispatch.backend_devices("triton")


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="triton's interpreter is not in use (on a GPU the generic test "
                    "above covers triton)")
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("Nq,Nk,dtype", [(7, 33, torch.float32), (33, 7, torch.float32), (40, 40, torch.bfloat16),
                                         (3, 70, torch.float16)], ids=["7x33", "33x7", "40x40-bf16", "3x70-fp16"])
def test_triton_variants_in_the_interpreter(combo, Nq, Nk, dtype):
    """Triton in its CPU interpreter on small shapes that cross its 32 x 32 blocks (edge and interior paths)."""
    assert set(_names(COMBOS[combo], Nq, Nk)) <= dispatch.CAPABILITIES["triton"].variants
    torch.manual_seed(Nq + Nk)
    q, k, v = make_qkv(1, 4, 2, Nq, Nk, 16, dtype=dtype)
    check_variant("triton", q, k, v, variant_args(COMBOS[combo], 1, 4, seed=Nk))


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="triton's interpreter is not in use")
@pytest.mark.parametrize("mask", ["keypad", "float"])
def test_triton_variants_with_masks_in_the_interpreter(mask):
    torch.manual_seed(8)
    q, k, v = make_qkv(1, 2, 1, 9, 70, 16)
    m = torch.ones(1, 1, 1, 70, dtype=torch.bool)
    m[..., 50:] = False
    if mask == "float":
        m = torch.randn(1, 2, 9, 70).masked_fill(~m, float("-inf"))
    check_variant("triton", q, k, v, variant_args(COMBOS["all"], 1, 2), attn_mask=m)


@pytest.mark.parametrize("combo", ["window-both", "all", "alibi-heads", "softcap"])
@pytest.mark.parametrize("mask", ["keypad", "bool", "float"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_variants_with_masks_and_layouts(combo, mask, layout):
    torch.manual_seed(3)
    Nq, Nk = 37, 70
    q, k, v = make_qkv(2, 4, 2, Nq, Nk, 24, layout=layout)
    if mask == "keypad":
        m = torch.ones(2, 1, 1, Nk, dtype=torch.bool)
        m[0, ..., 50:] = False
    elif mask == "bool":
        m = torch.rand(2, 4, Nq, Nk) < 0.7
    else:
        m = torch.randn(2, 1, Nq, Nk).masked_fill(torch.rand(2, 1, Nq, Nk) < 0.2, float("-inf"))
    check_variant("cpu", q, k, v, variant_args(COMBOS[combo], 2, 4), attn_mask=m)


@pytest.mark.parametrize("combo", ["window-causal", "all", "sinks"])
def test_variants_with_dropout_match_reference(combo):
    """The dropout keep-mask is a function of (segment, row, key): the reference draws the same one."""
    torch.manual_seed(4)
    q, k, v = make_qkv(2, 4, 2, 33, 65, 16)
    kw = variant_args(COMBOS[combo], 2, 4)
    torch.manual_seed(11)
    out = fastattn.attention(q, k, v, dropout_p=0.3, backend="cpu", **kw)
    torch.manual_seed(11)
    rng_state = fastattn.api._draw_rng_state(q.device, "cpu")
    want = reference.attention_reference(q.double(), k.double(), v.double(), dropout_p=0.3, rng_state=rng_state,
                                         **dict(kw, sinks=kw["sinks"].double() if "sinks" in kw else None))
    assert_close("out", out, want, atol=FWD_ATOL[torch.float32], rtol=FWD_RTOL[torch.float32])
    out.sum().backward()  # runs; the gradients with dropout are checked by the sweep (tests/sweep.py)


VARLEN_BACKENDS = ["cpu"] + (["triton"] if TRITON_INTERPRETED else []) + [
    b for b in kernel_backends() if b not in ("cpu",) and dispatch.CAPABILITIES[b].variants]


@pytest.mark.parametrize("name", VARLEN_BACKENDS)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_varlen_variants_match_reference(name, combo):
    backend = name  # (conftest parametrises tests that take "backend" over the generic kernel backends)
    torch.manual_seed(5)
    lens_q, lens_k = [0, 5, 1, 40, 17], [9, 0, 1, 33, 60]
    if not set(_names(COMBOS[combo], 1, 2)) <= dispatch.CAPABILITIES[backend].variants:
        pytest.skip(f"backend {backend!r} does not serve {combo} (it refuses it: test_dispatch_knows_every_variant)")
    device = backend_device(backend)
    q, k, v = make_varlen(lens_q, lens_k, 4, 2, 16, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device=device), cu_seqlens(lens_k, device=device)
    kw = {key: val.to(device).detach().requires_grad_(val.requires_grad) if isinstance(val, torch.Tensor) else val
          for key, val in variant_args(COMBOS[combo], len(lens_q), 4).items()}
    sinks = kw.get("sinks")
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 40, 60, return_lse=True, backend=backend, **kw)
    inputs = (q, k, v) + ((sinks,) if sinks is not None else ())
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    want, want_lse = reference.varlen_attention_reference(*leaves[:3], cu_q, cu_k, return_lse=True,
                                                          **dict(kw, sinks=leaves[3] if sinks is not None else None))
    assert_close("out", out, want, atol=FWD_ATOL[torch.float32], rtol=FWD_RTOL[torch.float32])
    assert_close("lse", lse, want_lse, atol=LSE_ATOL[torch.float32], rtol=LSE_RTOL[torch.float32])
    for name, g, rg in zip(("dq", "dk", "dv", "dsinks"), grads, torch.autograd.grad(want, leaves, grad_out.double())):
        assert_close(name, g, rg, atol=GRAD_ATOL[torch.float32], rtol=GRAD_RTOL[torch.float32])


def test_rows_that_see_nothing_give_zeros_and_zero_gradients():
    """Bottom-right, Nq > Nk: rows whose diagonal is left of key 0 see no key (flash-attn's convention)."""
    q, k, v = make_qkv(1, 2, 2, 9, 4, 8)
    out, lse = fastattn.attention(q, k, v, causal=True, alignment="bottom_right", window_size=(1, -1),
                                  return_lse=True)
    assert torch.all(out[:, :, :5] == 0) and torch.all(torch.isneginf(lse[:, :, :5]))
    assert torch.isfinite(lse[:, :, 5:]).all()
    dq, = torch.autograd.grad(out.sum(), q)
    assert torch.all(dq[:, :, :5] == 0)
    # with a sink the same rows are zeros too, but their lse is the sink's logit and the sink gets a gradient
    sinks = torch.tensor([0.5, -1.0], requires_grad=True)
    out, lse = fastattn.attention(q, k, v, causal=True, alignment="bottom_right", window_size=(1, -1),
                                  sinks=sinks, return_lse=True)
    assert torch.all(out[:, :, :5] == 0)
    assert_close("lse", lse[0, :, :5], sinks.detach()[:, None].expand(2, 5), atol=1e-6, rtol=0)
    check_variant("cpu", q, k, v, dict(causal=True, alignment="bottom_right", window_size=(1, -1),
                                       sinks=sinks))


def test_plain_attention_in_disguise_is_plain():
    """(left, 0) is causal with a left bound; bottom-right with Nq == Nk is top-left; Nq = 1 bottom-right
    causal is attention over the whole cache (decoding)."""
    q, k, v = make_qkv(1, 2, 2, 12, 12, 8, requires_grad=False)
    assert torch.equal(fastattn.attention(q, k, v, window_size=(-1, 0)), fastattn.attention(q, k, v, causal=True))
    assert torch.equal(fastattn.attention(q, k, v, window_size=(3, 0)),
                       fastattn.attention(q, k, v, window_size=(3, 7), causal=True))
    assert torch.equal(fastattn.attention(q, k, v, causal=True, alignment="bottom_right"),
                       fastattn.attention(q, k, v, causal=True))
    q1 = q[:, :, -1:]
    assert_close("decode", fastattn.attention(q1, k, v, causal=True, alignment="bottom_right"),
                 fastattn.attention(q1, k, v), atol=0, rtol=0)


def test_decode_against_a_long_cache_with_a_window():
    """A GQA decode step (Nq = 1..3, bottom-right) with a sliding window sees exactly the last keys."""
    torch.manual_seed(6)
    for nq in (1, 2, 3):
        q, k, v = make_qkv(2, 8, 2, nq, 1500, 64)
        check_variant("cpu", q, k, v, dict(causal=True, alignment="bottom_right", window_size=(255, 0)))
        window = fastattn.attention(q, k, v, causal=True, alignment="bottom_right", window_size=(255, 0))
        for i in range(nq):  # row i's diagonal is key 1500 - nq + i; it sees that key and the 255 before it
            end = 1500 - nq + i + 1
            tail = fastattn.attention(q[:, :, i:i + 1], k[:, :, end - 256:end], v[:, :, end - 256:end])
            assert_close(f"row {i}: window == the last 256 keys it sees", window[:, :, i:i + 1], tail,
                         atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dispatch, ops, compile, errors
# ---------------------------------------------------------------------------------------------
def test_dispatch_knows_every_variant_per_backend():
    assert set(dispatch.VARIANTS) == {"window", "bottom_right", "softcap", "alibi", "sinks"}
    assert dispatch.CAPABILITIES["cpu"].variants == frozenset(dispatch.VARIANTS)
    assert dispatch.CAPABILITIES["reference"].variants == frozenset(dispatch.VARIANTS)
    for backend in ("cuda", "triton"):
        missing = set(dispatch.VARIANTS) - dispatch.CAPABILITIES[backend].variants
        device = torch.device(dispatch.backend_devices(backend)[0])
        for name in missing:  # refused by name, never run wrong
            reason = dispatch.why_unsupported(backend, device, torch.float16, 64, variants=(name,))
            assert reason is not None and (dispatch.VARIANTS[name] in reason or "not available" in reason)


@pytest.mark.skipif("cuda" not in dispatch.available_backends(), reason="the cuda backend is not available here "
                    "(fastattn._C_cuda not built, or no GPU)")
def test_cuda_refuses_the_variants_it_lacks_by_name():
    """The variants the CUDA kernels do not serve (softcap, ALiBi, sinks): backend="cuda" raises naming them."""
    q, k, v = (t.cuda() for t in make_qkv(1, 2, 2, 8, 8, 64, dtype=torch.float16, requires_grad=False))
    kw = {"window": dict(window_size=(2, 2)), "softcap": dict(softcap=3.0),
          "sinks": dict(sinks=torch.zeros(2, device="cuda")), "alibi": dict(alibi_slopes=torch.ones(2, device="cuda")),
          "bottom_right": dict(causal=True, alignment="bottom_right")}
    for name in sorted(set(dispatch.VARIANTS) - dispatch.CAPABILITIES["cuda"].variants):
        qq = q[:, :, :4] if name == "bottom_right" else q
        with pytest.raises(ValueError, match="does not serve"):
            fastattn.attention(qq, k, v, backend="cuda", **kw[name])


def _op_args(Nq=9, Nk=13):
    q, k, v = make_qkv(2, 4, 2, Nq, Nk, 16, requires_grad=False)
    return q, k, v, torch.rand(4) * 0.3, torch.randn(4)


@pytest.mark.parametrize("variant", [(-1, -1, False, 0.0), (5, 2, True, 0.0), (3, -1, True, 7.5)])
def test_opcheck_with_variants(variant):
    q, k, v, slopes, sinks = _op_args()
    args = (q, k, v, None, False, 0.25, 0.0, None, *variant, slopes, sinks)
    torch.library.opcheck(torch.ops.fastattn.fwd.default, args)
    out, lse = torch.ops.fastattn.fwd(*args)
    torch.library.opcheck(torch.ops.fastattn.bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, None, False, 0.25, 0.0, None, *variant, slopes))
    qv, kv, vv = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    cu_q, cu_k = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 13], dtype=torch.int32)
    vargs = (qv, kv, vv, cu_q, cu_k, 9, 13, True, 0.25, 0.0, None, *variant, slopes, sinks)
    torch.library.opcheck(torch.ops.fastattn.varlen_fwd.default, vargs)


def test_compile_fullgraph_with_variants():
    q, k, v, slopes, _ = _op_args()
    sinks = torch.randn(4, requires_grad=True)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))

    def f(q, k, v, slopes, sinks):
        return fastattn.attention(q, k, v, causal=True, window_size=(4, 0), alignment="bottom_right", softcap=5.0,
                                  alibi_slopes=slopes, sinks=sinks)

    eager = f(q, k, v, slopes, sinks)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, slopes, sinks)
    assert_close("compiled", compiled, eager, atol=0, rtol=0)
    g = torch.randn_like(eager)
    a = torch.autograd.grad(eager, (q, k, v, sinks), g)
    b = torch.autograd.grad(compiled, (q, k, v, sinks), g)
    for name, x, y in zip(("dq", "dk", "dv", "dsinks"), a, b):
        assert_close(name, y, x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window_size=3), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(1, 2, 3)), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(1.0, 2)), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(True, 2)), TypeError, "window_size must be a pair of ints"),
    (dict(window_size=(-1.0, -1)), TypeError, "window_size must be a pair of ints"),  # == the default (-1, -1)
    (dict(window_size=(-1, -1.0)), TypeError, "window_size must be a pair of ints"),
    (dict(softcap=False), TypeError, "softcap must be a float"),  # == the default 0.0
    (dict(window_size=(-2, 0)), ValueError, "window_size must be a pair of ints >= -1"),
    (dict(alignment="bottom-right"), ValueError, "alignment must be 'top_left' or 'bottom_right'"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite float >= 0"),
    (dict(softcap="30"), TypeError, "softcap must be a float"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(Hq,\) or \(B, Hq\)"),
    (dict(alibi_slopes=torch.ones(2, 2, 4)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "alibi_slopes must be a floating-point"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes must be a torch.Tensor"),
    (dict(alibi_slopes=torch.ones(4, requires_grad=True)), ValueError, "alibi_slopes requires grad"),
    (dict(sinks=torch.ones(2, 4)), ValueError, r"sinks must have shape \(Hq,\)"),
    (dict(sinks=torch.ones(4, dtype=torch.int32)), TypeError, "sinks must be a floating-point"),
    (dict(causal=1), TypeError, "causal must be a bool"),
])
def test_bad_variant_arguments_are_named(kwargs, error, match):
    q, k, v = make_qkv(2, 4, 2, 5, 6, 8, requires_grad=False)
    with pytest.raises(error, match=match):
        fastattn.attention(q, k, v, **kwargs)


def test_op_level_checks_guard_direct_calls():
    q, k, v, slopes, sinks = _op_args()
    fwd = torch.ops.fastattn.fwd
    with pytest.raises(ValueError, match="window_size must be a pair of ints >= -1"):
        fwd(q, k, v, None, False, 0.25, 0.0, None, -3, 0, False, 0.0, None, None)
    with pytest.raises(ValueError, match="softcap must be a finite float >= 0"):
        fwd(q, k, v, None, False, 0.25, 0.0, None, -1, -1, False, -2.0, None, None)
    with pytest.raises(ValueError, match="alibi_slopes must be"):
        fwd(q, k, v, None, False, 0.25, 0.0, None, -1, -1, False, 0.0, torch.ones(3), None)
    with pytest.raises(ValueError, match="sinks must be"):
        fwd(q, k, v, None, False, 0.25, 0.0, None, -1, -1, False, 0.0, None, torch.ones(5))

"""Tests of the CUDA C++ backend (csrc/cuda, fastattn._C_cuda).

Three tiers, each skipping with its reason where it cannot run:
  * everywhere: the generated kernel files are current, and dispatch's "cuda" rules
    (mask kinds, head dims, dtypes, Dv == D, the warning when "auto" passes over cuda);
  * where fastattn._C_cuda is built (CI's CUDA-torch venv, even without a GPU): the
    four ops have a CUDA kernel registered;
  * on an sm80+ GPU: parity with the float64 reference (out, lse, dq/dk/dv) by
    flash-attention's 2x rule, key-padding masks, varlen, GQA, causal, odd sizes,
    non-contiguous layouts, dropout bit-exact against the reference Philox mask,
    torch SDPA in the same dtype by the 2x rule, opcheck, torch.compile, CUDA graphs.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import _ops, dispatch
from fastattn.reference import attention_reference

from conftest import (FWD_FLOOR, GRAD_FLOOR, LSE_ATOL, LSE_RTOL, assert_close, assert_within_2x, check_attention,
                      check_varlen_attention, make_qkv)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc" / "cuda"))
import generate_kernels  # noqa: E402  (csrc/cuda/generate_kernels.py)

CUDA_BUILT = _ops._C_cuda is not None
HEAD_DIMS = tuple(_ops._C_cuda.head_dims) if CUDA_BUILT else ()


def _gpu_skip_reason():
    if not CUDA_BUILT:
        return "fastattn._C_cuda is not built (build with FASTATTN_CUDA=1 against a CUDA build of torch)"
    if not torch.cuda.is_available():
        return "no CUDA GPU in this process: the CUDA kernels are compiled here but cannot run"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"the CUDA kernels need sm80+, this GPU is sm{''.join(map(str, torch.cuda.get_device_capability()))}"
    return None


needs_build = pytest.mark.skipif(not CUDA_BUILT, reason="fastattn._C_cuda is not built (FASTATTN_CUDA=1 build "
                                                        "against a CUDA build of torch)")
needs_gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
LOW = (torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def head_dims_or_skip(*wanted):
    """The wanted head dims this build has kernels for (a test with none of them skips)."""
    return [pytest.param(d, marks=pytest.mark.skipif(d not in HEAD_DIMS, reason=f"head dim {d} not built "
                                                                                f"(built: {list(HEAD_DIMS)})"))
            for d in wanted]


# ------------------------------------------------------------------------------------------
# Everywhere
# ------------------------------------------------------------------------------------------
def test_generated_kernel_files_are_current(tmp_path):
    generate_kernels.main(["--out", str(tmp_path)])
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.cu")}
    committed = {p.name: p.read_text() for p in (ROOT / "csrc" / "cuda").glob("flash_*_hdim*.cu")}
    assert generated == committed, "csrc/cuda is out of date: run python csrc/cuda/generate_kernels.py"
    assert len(generated) == 2 * len(generate_kernels.HEAD_DIMS) * 2 * 2  # direction x hdim x dtype x causal


@pytest.mark.parametrize("shape, dtype, expected", [
    ((5,), torch.bool, "key_padding"),
    ((3, 1, 1, 5), torch.bool, "key_padding"),
    ((1, 5), torch.bool, "key_padding"),
    ((4, 5), torch.bool, "bool"),  # (Nq, Nk): varies over queries
    ((3, 2, 1, 5), torch.bool, "bool"),  # per head
    ((3, 1, 1, 5), torch.float32, "float"),
])
def test_mask_kind(shape, dtype, expected):
    assert dispatch.mask_kind(torch.zeros(shape, dtype=dtype)) == expected
    assert dispatch.mask_kind(None) is None


@pytest.fixture
def fake_cuda_build(monkeypatch):
    """Dispatch as on a GPU machine with the CUDA extension built for head dims 64 and 128."""

    class FakeExtension:
        head_dims = [64, 128]

    monkeypatch.setattr(_ops, "_C_cuda", FakeExtension())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dispatch._warned.clear()
    dispatch._kernel_image_problem_cached.cache_clear()
    yield
    dispatch._warned.clear()
    dispatch._kernel_image_problem_cached.cache_clear()


def test_dispatch_refuses_a_gpu_without_kernel_image(fake_cuda_build, monkeypatch):
    """A GPU newer than the build's archs (no PTX): 'cuda' is not chosen, and the reason says how to fix it."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))

    class NoImageExtension:
        head_dims = [64, 128]
        arch_list = "8.0,9.0"

        @staticmethod
        def kernel_image_problem(index):
            return "no kernel image is available for execution on the device"

    monkeypatch.setattr(_ops, "_C_cuda", NoImageExtension())
    reason = dispatch.why_unsupported("cuda", torch.device("cuda"), torch.bfloat16, 64)
    assert "sm120" in reason and "no kernel image" in reason and "TORCH_CUDA_ARCH_LIST='8.0,9.0'" in reason


def test_dispatch_cuda_rules(fake_cuda_build):
    dev = torch.device("cuda")

    def why(dtype=torch.bfloat16, head_dim=64, **kw):
        return dispatch.why_unsupported("cuda", dev, dtype, head_dim, **kw)

    assert "cuda" in dispatch.available_backends()
    assert why() is None
    assert why(torch.float16, 128, has_mask=True, mask_kind="key_padding", dropout=True) is None
    assert why(varlen=True, value_head_dim=64) is None
    assert "dtype" in why(torch.float32)
    assert "head dims [64, 128]" in why(head_dim=96)
    assert "v's head dim" in why(value_head_dim=32)
    assert "float masks" in why(has_mask=True, mask_kind="float")
    assert "key padding" in why(has_mask=True, mask_kind="bool")
    assert "unknown kind" in why(has_mask=True)  # callers that do not say which mask it is
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call: .*float masks"):
        dispatch.choose_backend("cuda", dev, torch.bfloat16, 64, has_mask=True, mask_kind="float")


def test_dispatch_auto_passes_over_cuda_with_one_warning(fake_cuda_build, monkeypatch):
    dev = torch.device("cuda")
    monkeypatch.setattr(dispatch, "available_backends", lambda: ["cpu", "cuda", "triton", "reference"])
    monkeypatch.setattr(dispatch, "backend_devices", lambda backend: ("cuda",))
    assert dispatch.choose_backend("auto", dev, torch.bfloat16, 64, has_mask=True, mask_kind="key_padding") == "cuda"
    with pytest.warns(UserWarning, match="float masks; running this call on backend 'triton'"):
        assert dispatch.choose_backend("auto", dev, torch.bfloat16, 64, has_mask=True, mask_kind="float") == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        assert dispatch.choose_backend("auto", dev, torch.bfloat16, 64, has_mask=True, mask_kind="float") == "triton"
    with pytest.warns(UserWarning, match="dtype torch.float32; running this call on backend 'triton'"):
        assert dispatch.choose_backend("auto", dev, torch.float32, 64) == "triton"


# ------------------------------------------------------------------------------------------
# Where the extension is built (no GPU needed)
# ------------------------------------------------------------------------------------------
@needs_build
@pytest.mark.parametrize("op", ["fwd", "bwd", "varlen_fwd", "varlen_bwd"])
def test_ops_have_cuda_kernels(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", "CUDA")


def test_resource_check_parses_cuobjdump():
    sys.path.insert(0, str(ROOT / "csrc" / "cuda"))
    import resource_check

    text = """
Fatbin elf code:
================
arch = sm_80
Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8fastattn4cuda21flash_bwd_dkdv_kernel:
  REG:168 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN8fastattn4cuda16flash_fwd_kernel:
  REG:255 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = resource_check.parse_resource_usage(text)
    assert [(r.arch, r.registers, r.stack) for r in rows] == [("sm_80", 168, 16), ("sm_80", 255, 0)]
    assert "stack 16 B" in rows[0].problems()[0] and rows[1].problems() == []


@needs_build
def test_kernel_resources():
    """Every kernel of every cubin: no stack or local memory, <= 255 registers, no static shared memory."""
    sys.path.insert(0, str(ROOT / "csrc" / "cuda"))
    import resource_check

    if resource_check.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit, PATH or triton's bundled copy)")
    assert resource_check.main([_ops._C_cuda.__file__]) == 0


@needs_build
def test_built_head_dims():
    assert HEAD_DIMS and set(HEAD_DIMS) <= set(generate_kernels.HEAD_DIMS)
    assert list(_ops._C_cuda.dtypes) == ["float16", "bfloat16"]


# ------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------
SHAPES = [  # (B, Hq, Hkv, Nq, Nk)
    (2, 4, 4, 128, 128),
    (1, 2, 2, 1, 1),
    (2, 3, 3, 77, 133),  # odd, Nq < Nk, partial blocks
    (1, 4, 1, 200, 65),  # MQA, Nq > Nk
    (2, 6, 2, 257, 300),  # GQA 3:1, several blocks
]


@needs_gpu
@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", head_dims_or_skip(32, 64, 96, 128))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_with_float64_reference(shape, causal, head_dim, dtype):
    B, Hq, Hkv, Nq, Nk = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, head_dim, dtype=dtype, device="cuda")
    check_attention("cuda", q, k, v, causal=causal)


@needs_gpu
@pytest.mark.parametrize("layout", ["bnhd", "strided", "expanded"])
@pytest.mark.parametrize("head_dim", head_dims_or_skip(64, 128))
def test_noncontiguous_layouts(layout, head_dim):
    q, k, v = make_qkv(2, 4, 2, 97, 131, head_dim, dtype=torch.bfloat16, device="cuda", layout=layout)
    check_attention("cuda", q, k, v, causal=True)


@needs_gpu
@pytest.mark.parametrize("mask_shape", ["B11N", "1N", "N"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", head_dims_or_skip(64, 128))
def test_key_padding_mask(mask_shape, causal, head_dim):
    B, Hq, Hkv, Nq, Nk = 3, 4, 2, 90, 150
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, head_dim, dtype=torch.float16, device="cuda")
    lengths = torch.tensor([150, 37, 1], device="cuda")
    keep = torch.arange(Nk, device="cuda")[None] < lengths[:, None]  # (B, Nk) padding at the end
    keep[0, 5:9] = False  # and holes
    mask = {"B11N": keep[:, None, None, :], "1N": keep[:1], "N": keep[1]}[mask_shape]
    assert dispatch.mask_kind(mask) == "key_padding"
    check_attention("cuda", q, k, v, causal=causal, attn_mask=mask)


@needs_gpu
@pytest.mark.parametrize("window,causal,alignment,Nq,Nk", [
    ((63, -1), True, "top_left", 130, 130),
    ((65, 0), False, "bottom_right", 200, 330),
    ((17, 33), False, "top_left", 97, 161),
    ((-1, -1), True, "bottom_right", 3, 300),  # decode against a cache
    ((-1, -1), True, "bottom_right", 200, 70),  # rows that see nothing
    ((40, -1), True, "bottom_right", 1, 257),
], ids=lambda x: str(x).replace(" ", ""))
@pytest.mark.parametrize("head_dim", head_dims_or_skip(64, 128))
def test_sliding_window_and_bottom_right(window, causal, alignment, Nq, Nk, head_dim):
    """The banded kernels: causal and sliding windows, top-left and bottom-right (also run in the emulation)."""
    q, k, v = make_qkv(2, 4, 2, Nq, Nk, head_dim, dtype=torch.bfloat16, device="cuda")
    check_attention("cuda", q, k, v, causal=causal, variants=dict(window_size=window, alignment=alignment))


@needs_gpu
@pytest.mark.parametrize("window", [(-1, -1), (50, 0)], ids=["full", "window"])
@pytest.mark.parametrize("head_dim", head_dims_or_skip(64, 128))
def test_softcap(window, head_dim):
    q, k, v = make_qkv(2, 4, 2, 97, 200, head_dim, dtype=torch.bfloat16, device="cuda")
    check_attention("cuda", q, k, v, variants=dict(window_size=window, alignment="bottom_right", softcap=0.7))


@needs_gpu
def test_fully_masked_rows_give_zeros_and_neg_inf_lse():
    q, k, v = make_qkv(2, 2, 2, 33, 70, HEAD_DIMS[0], dtype=torch.bfloat16, device="cuda")
    keep = torch.ones(2, 1, 1, 70, dtype=torch.bool, device="cuda")
    keep[1] = False  # batch 1 sees nothing
    out, lse = fastattn.attention(q, k, v, attn_mask=keep, backend="cuda", return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    check_attention("cuda", q, k, v, attn_mask=keep)


@needs_gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
def test_varlen(causal, dtype):
    lens_q, lens_k = [5, 0, 130, 64, 1], [7, 3, 130, 200, 0]
    check_varlen_attention("cuda", lens_q, lens_k, 4, 2, HEAD_DIMS[-1], HEAD_DIMS[-1], dtype, causal,
                           torch.device("cuda"), max_extra=3)


def _dropout_case(dtype, causal, rng_device, p=0.3):
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 75, 140, HEAD_DIMS[0]
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, device="cuda")
    rng = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64, device=rng_device)
    scale = 1 / math.sqrt(D)
    out, lse = torch.ops.fastattn.fwd(q, k, v, None, causal, scale, p, rng)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.ops.fastattn.bwd(grad_out, q, k, v, out, lse, None, causal, scale, p, rng)
    return (q, k, v, rng, scale, p), (out, lse, dq, dk, dv), grad_out


@needs_gpu
@pytest.mark.parametrize("rng_device", ["cpu", "cuda"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
def test_dropout_matches_reference_philox(dtype, causal, rng_device):
    (q, k, v, rng, scale, p), (out, lse, dq, dk, dv), grad_out = _dropout_case(dtype, causal, rng_device)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, dropout_p=p, scale=scale, rng_state=rng.cpu(),
                                       return_lse=True)
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    low = attention_reference(ql, kl, vl, causal=causal, dropout_p=p, scale=scale, rng_state=rng.cpu(),
                              compute_dtype=dtype)
    assert_close("lse", lse, ref_lse, atol=LSE_ATOL[dtype], rtol=LSE_RTOL[dtype])
    assert_within_2x("out", out, low, ref, FWD_FLOOR[dtype])
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    low_grads = torch.autograd.grad(low, (ql, kl, vl), grad_out)
    for name, g, lg, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), low_grads, ref_grads):
        assert_within_2x(name, g, lg, rg, GRAD_FLOOR[dtype])


@needs_gpu
def test_dropout_through_the_api_is_reproducible_and_drops():
    q, k, v = make_qkv(1, 2, 2, 64, 64, HEAD_DIMS[0], dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    a = fastattn.attention(q, k, v, dropout_p=0.5, backend="cuda")
    torch.manual_seed(0)
    b = fastattn.attention(q, k, v, dropout_p=0.5, backend="cuda")
    c = fastattn.attention(q, k, v, dropout_p=0.5, backend="cuda")
    assert torch.equal(a, b) and not torch.equal(a, c)


@needs_gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", head_dims_or_skip(64, 128))
@pytest.mark.parametrize("dtype", LOW, ids=DTYPE_IDS.get)
def test_within_2x_of_torch_sdpa_error(dtype, head_dim, causal):
    """flash-attention's rule against torch's own fused SDPA in the same dtype."""
    q, k, v = make_qkv(2, 8, 8, 333, 333, head_dim, dtype=dtype, device="cuda")
    grad_out = torch.randn(2, 8, 333, head_dim, device="cuda", dtype=dtype)
    ours = fastattn.attention(q, k, v, causal=causal, backend="cuda")
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    theirs = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    theirs_grads = torch.autograd.grad(theirs, (qs, ks, vs), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert_within_2x("out", ours, theirs, ref, FWD_FLOOR[dtype])
    for name, g, tg, rg in zip(("dq", "dk", "dv"), ours_grads, theirs_grads, ref_grads):
        assert_within_2x(name, g, tg, rg, GRAD_FLOOR[dtype])


@needs_gpu
def test_explicit_cuda_raises_for_what_it_lacks():
    q, k, v = make_qkv(1, 2, 2, 16, 16, HEAD_DIMS[0], dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="float masks"):
        fastattn.attention(q, k, v, attn_mask=torch.zeros(16, 16, device="cuda", dtype=torch.bfloat16),
                           backend="cuda")
    with pytest.raises(ValueError, match="key padding"):
        fastattn.attention(q, k, v, attn_mask=torch.ones(16, 16, device="cuda", dtype=torch.bool), backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        fastattn.attention(q.float(), k.float(), v.float(), backend="cuda")
    q80, k80, v80 = make_qkv(1, 2, 2, 16, 16, 80, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="head dims"):
        fastattn.attention(q80, k80, v80, backend="cuda")
    # the op itself names what is wrong, too
    with pytest.raises(NotImplementedError, match="key-padding"):
        torch.ops.fastattn.fwd(q, k, v, torch.ones(1, 2, 16, 16, dtype=torch.bool, device="cuda"), False, 1.0, 0.0,
                               None)
    with pytest.raises(ValueError, match="rng_state"):
        torch.ops.fastattn.fwd(q, k, v, None, False, 1.0, 0.1, None)


@needs_gpu
def test_auto_routes_float_masks_elsewhere_with_a_warning():
    dispatch._warned.clear()
    q, k, v = make_qkv(1, 2, 2, 16, 16, HEAD_DIMS[0], dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(16, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="float masks"):
        out = fastattn.attention(q, k, v, attn_mask=bias)
    ref = attention_reference(q.double(), k.double(), v.double(), attn_mask=bias.double())
    assert (out.double() - ref).abs().max() < 3e-2


@needs_gpu
def test_opcheck():
    q, k, v = make_qkv(2, 4, 2, 37, 45, HEAD_DIMS[0], dtype=torch.float16, device="cuda")
    out, lse = torch.ops.fastattn.fwd(q, k, v, None, True, 0.1, 0.0, None)
    torch.library.opcheck(torch.ops.fastattn.fwd, (q, k, v, None, True, 0.1, 0.0, None))
    torch.library.opcheck(torch.ops.fastattn.bwd, (torch.randn_like(out), q, k, v, out, lse, None, True, 0.1, 0.0,
                                                   None))


@needs_gpu
def test_torch_compile_fullgraph():
    q, k, v = make_qkv(2, 4, 2, 70, 70, HEAD_DIMS[0], dtype=torch.bfloat16, device="cuda")

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return fastattn.attention(q, k, v, causal=True, backend="cuda")

    out = f(q, k, v)
    out.sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eager = fastattn.attention(q2, k2, v2, causal=True, backend="cuda")
    eager.sum().backward()
    assert torch.equal(out, eager)
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert torch.equal(a, b)  # same kernels, no atomics: bit-identical


@needs_gpu
def test_cuda_graph_replays_draw_fresh_dropout():
    """rng_state on the device is read by the kernels, so each replay uses the values the graph's
    own generator kernel wrote: dropout stays random across replays and matches the reference."""
    q, k, v = make_qkv(1, 2, 2, 64, 64, HEAD_DIMS[0], dtype=torch.float16, device="cuda", requires_grad=False)
    rng = torch.zeros(2, dtype=torch.int64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        torch.ops.fastattn.fwd(q, k, v, None, False, 0.125, 0.25, rng)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rng.copy_(torch.randint(0, 2**62, (2,), device="cuda"))
        out, _ = torch.ops.fastattn.fwd(q, k, v, None, False, 0.125, 0.25, rng)
    seen = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        state = rng.cpu()
        ref = attention_reference(q.double(), k.double(), v.double(), dropout_p=0.25, scale=0.125, rng_state=state)
        assert (out.double() - ref).abs().max() < 1e-2
        seen.append(tuple(state.tolist()))
    assert seen[0] != seen[1]

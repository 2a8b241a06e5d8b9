"""The torch.ops.fastattn ops: opcheck, torch.compile(fullgraph=True), and ``python -m fastattn.info``."""
import math
import subprocess
import sys

import pytest
import torch

import fastattn
from conftest import (FWD_ATOL, FWD_RTOL, GRAD_ATOL, GRAD_RTOL, assert_close, make_mask, make_qkv, require,
                      require_op)

OPS = ("fwd", "bwd", "varlen_fwd", "varlen_bwd")


def test_ops_registered():
    for name in OPS:
        assert hasattr(torch.ops.fastattn, name), f"torch.ops.fastattn.{name} is not registered"


# id -> (B, Hq, Hkv, Nq, Nk, D, Dv, mask kind, causal, dropout_p, layout)
OPCHECK_CASES = {
    "plain": (2, 2, 2, 9, 11, 16, 16, None, False, 0.0, "contiguous"),
    "gqa_causal_dv": (1, 4, 2, 13, 7, 8, 24, None, True, 0.0, "contiguous"),
    "bool_mask": (2, 2, 1, 9, 11, 16, 16, "bool", False, 0.0, "contiguous"),
    "float_mask_causal": (1, 2, 2, 9, 9, 16, 16, "float", True, 0.0, "contiguous"),
    "dropout": (1, 2, 2, 9, 11, 16, 16, None, False, 0.25, "contiguous"),
    "noncontiguous": (2, 4, 2, 9, 11, 16, 16, None, True, 0.0, "bnhd"),
}


def _dense_args(op_device, case, dtype=torch.float32):
    B, Hq, Hkv, Nq, Nk, D, Dv, mask_kind, causal, p, layout = OPCHECK_CASES[case]
    require_op(op_device, dtype=dtype, head_dim=max(D, Dv), has_mask=mask_kind is not None, dropout=p > 0)
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype, device=op_device, layout=layout,
                       requires_grad=False)
    mask = make_mask(mask_kind, (B, 1, Nq, Nk), Nk, dtype=dtype, device=op_device) if mask_kind else None
    rng_state = torch.tensor([1234, 5], dtype=torch.int64) if p > 0 else None
    return q, k, v, mask, causal, 1.0 / math.sqrt(D), p, rng_state


@pytest.mark.parametrize("case", list(OPCHECK_CASES), ids=list(OPCHECK_CASES))
def test_opcheck_fwd(op_device, case):
    args = _dense_args(op_device, case)
    torch.library.opcheck(torch.ops.fastattn.fwd.default, args)


@pytest.mark.parametrize("case", list(OPCHECK_CASES), ids=list(OPCHECK_CASES))
def test_opcheck_bwd(op_device, case):
    q, k, v, mask, causal, scale, p, rng_state = _dense_args(op_device, case)
    out, lse = torch.ops.fastattn.fwd(q, k, v, mask, causal, scale, p, rng_state)
    grad_out = torch.randn_like(out)
    # the bwd op gets inputs of its own (fresh tensors, nothing shared with the fwd call's outputs)
    args = (grad_out, q.clone(), k.clone(), v.clone(), out.clone(), lse.clone(), mask, causal, scale, p, rng_state)
    torch.library.opcheck(torch.ops.fastattn.bwd.default, args)


def _varlen_args(op_device, causal, p, Dv=16):
    require_op(op_device, dtype=torch.float32, head_dim=max(16, Dv), dropout=p > 0, varlen=True)
    lens_q, lens_k = [3, 0, 9, 1], [5, 2, 9, 0]
    cu_q = torch.tensor([0, 3, 3, 12, 13], dtype=torch.int32, device=op_device)
    cu_k = torch.tensor([0, 5, 7, 16, 16], dtype=torch.int32, device=op_device)
    q = torch.randn(sum(lens_q), 4, 16, device=op_device)
    k = torch.randn(sum(lens_k), 2, 16, device=op_device)
    v = torch.randn(sum(lens_k), 2, Dv, device=op_device)
    rng_state = torch.tensor([99, 0], dtype=torch.int64) if p > 0 else None
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, 0.25, p, rng_state


VARLEN_CASES = {"plain": (False, 0.0, 16), "causal_dv": (True, 0.0, 8), "dropout": (True, 0.3, 16)}


@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=list(VARLEN_CASES))
def test_opcheck_varlen_fwd(op_device, case):
    torch.library.opcheck(torch.ops.fastattn.varlen_fwd.default, _varlen_args(op_device, *VARLEN_CASES[case]))


@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=list(VARLEN_CASES))
def test_opcheck_varlen_bwd(op_device, case):
    q, k, v, cu_q, cu_k, mq, mk, causal, scale, p, rng = _varlen_args(op_device, *VARLEN_CASES[case])
    out, lse = torch.ops.fastattn.varlen_fwd(q, k, v, cu_q, cu_k, mq, mk, causal, scale, p, rng)
    args = (torch.randn_like(out), q.clone(), k.clone(), v.clone(), out.clone(), lse.clone(), cu_q, cu_k, mq, mk,
            causal, scale, p, rng)
    torch.library.opcheck(torch.ops.fastattn.varlen_bwd.default, args)


def test_fwd_output_layout(op_device):
    """out is (B, Hq, Nq, Dv) viewed from (B, Nq, Hq, Dv) storage, as the fake kernel promises."""
    require_op(op_device)
    q, k, v = make_qkv(2, 4, 2, 5, 6, 8, 12, device=op_device, requires_grad=False)
    out, lse = torch.ops.fastattn.fwd(q, k, v, None, False, 0.3, 0.0, None)
    assert out.shape == (2, 4, 5, 12) and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 4, 5) and lse.is_contiguous() and lse.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal_gqa", "mask_gqa"])
def test_compile_attention_fullgraph(backend, with_mask):
    device = require(backend, dtype=torch.float32, head_dim=32, has_mask=with_mask)
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 4, 2, 33, 41, 32, device=device)
    mask = make_mask("bool", (2, 1, 1, 41), 41, device=device) if with_mask else None

    def fn(q, k, v, mask):
        out, lse = fastattn.attention(q, k, v, causal=not with_mask, attn_mask=mask, backend=backend,
                                      return_lse=True)
        return out * 2.0, lse

    compiled = torch.compile(fn, fullgraph=True)
    grad_out = torch.randn(2, 4, 33, 32, device=device)
    eager_out, eager_lse = fn(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager_out, (q, k, v), grad_out)
    out, lse = compiled(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    tol = dict(atol=FWD_ATOL[torch.float32], rtol=FWD_RTOL[torch.float32])
    assert_close("out", out, eager_out, **tol)
    assert_close("lse", lse, eager_lse, **tol)
    for name, g, eg in zip(("dq", "dk", "dv"), grads, eager_grads):
        assert_close(name, g, eg, atol=GRAD_ATOL[torch.float32], rtol=GRAD_RTOL[torch.float32])


def test_compile_ops_fullgraph(op_device):
    """Each op traced on its own (fake kernels + schemas): fwd/bwd and varlen_fwd/varlen_bwd."""
    require_op(op_device, varlen=True)
    torch._dynamo.reset()
    q, k, v, mask, causal, scale, p, rng = _dense_args(op_device, "bool_mask")

    def dense(q, k, v, mask, grad_out):
        out, lse = torch.ops.fastattn.fwd(q, k, v, mask, True, scale, 0.0, None)
        return out, lse, torch.ops.fastattn.bwd(grad_out, q, k, v, out, lse, mask, True, scale, 0.0, None)

    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), device=op_device)
    eager, compiled = dense(q, k, v, mask, grad_out), torch.compile(dense, fullgraph=True)(q, k, v, mask, grad_out)
    for name, a, b in zip(("out", "lse"), compiled[:2], eager[:2]):
        assert_close(name, a, b, atol=1e-6, rtol=1e-6)
    for name, a, b in zip(("dq", "dk", "dv"), compiled[2], eager[2]):
        assert_close(name, a, b, atol=1e-6, rtol=1e-6)

    vq, vk, vv, cu_q, cu_k, mq, mk, causal, scale, p, rng = _varlen_args(op_device, True, 0.0)

    def varlen(q, k, v, cu_q, cu_k, grad_out):
        out, lse = torch.ops.fastattn.varlen_fwd(q, k, v, cu_q, cu_k, mq, mk, True, scale, 0.0, None)
        return out, lse, torch.ops.fastattn.varlen_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, mq, mk, True, scale,
                                                       0.0, None)

    grad_out = torch.randn(vq.shape[0], vq.shape[1], vv.shape[-1], device=op_device)
    eager = varlen(vq, vk, vv, cu_q, cu_k, grad_out)
    compiled = torch.compile(varlen, fullgraph=True)(vq, vk, vv, cu_q, cu_k, grad_out)
    for name, a, b in zip(("out", "lse"), compiled[:2], eager[:2]):
        assert_close(f"varlen {name}", a, b, atol=1e-6, rtol=1e-6)
    for name, a, b in zip(("dq", "dk", "dv"), compiled[2], eager[2]):
        assert_close(f"varlen {name}", a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# python -m fastattn.info
# ----------------------------------------------------------------------------------------------
def test_info_module_runs():
    proc = subprocess.run([sys.executable, "-m", "fastattn.info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"python -m fastattn.info failed:\n{proc.stdout}\n{proc.stderr}"
    text = proc.stdout
    assert fastattn.__version__ in text
    assert torch.__version__ in text
    for backend in fastattn.available_backends():
        assert backend in text, f"backend {backend!r} missing from the info output:\n{text}"


def test_constant_result_mark_is_torchs():
    """dispatch marks its device probes as torch.compiler.assume_constant_result does, without
    importing torch._dynamo at `import fastattn` (2 s): the mark must stay torch's."""
    from fastattn import dispatch

    def probe():
        return 1

    before = set(vars(probe))
    torch.compiler.assume_constant_result(probe)
    assert set(vars(probe)) - before == {"_dynamo_marked_constant"} and probe._dynamo_marked_constant is True
    for fn in (dispatch._compute_capability, dispatch._kernel_image_problem):
        assert fn._dynamo_marked_constant is True


def test_import_does_not_load_dynamo():
    import subprocess
    import sys
    code = "import sys, fastattn, fastattn.nn; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "import fastattn imports torch._dynamo (about 2 s)"

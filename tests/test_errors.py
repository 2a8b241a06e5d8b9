"""Bad input raises ValueError/TypeError/RuntimeError whose message names the offending argument."""
import math

import pytest
import torch

import fastattn

ERRORS = (ValueError, TypeError, RuntimeError)


def qkv(B=2, Hq=4, Hkv=2, Nq=5, Nk=6, D=8, Dv=None, dtype=torch.float32):
    Dv = D if Dv is None else Dv
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, dtype=dtype))


def _replace(args, **kw):
    q, k, v = args
    return kw.get("q", q), kw.get("k", k), kw.get("v", v)


# id -> (q, k, v, extra kwargs, regex that must appear in the message)
def _attention_cases():
    base = qkv()
    q, k, v = base
    return {
        "q_rank3": (*_replace(base, q=q[0]), {}, r"\bq\b"),
        "q_rank5": (*_replace(base, q=q[None]), {}, r"\bq\b"),
        "k_rank3": (*_replace(base, k=k[0]), {}, r"\bk\b"),
        "v_rank5": (*_replace(base, v=v[None]), {}, r"\bv\b"),
        "head_dim_differs": (*_replace(base, k=torch.randn(2, 2, 6, 16)), {}, r"\bk\b.*head dim|head dim.*\bk\b"),
        "kv_len_differs": (*_replace(base, v=torch.randn(2, 2, 7, 8)), {}, r"\bv\b"),
        "kv_heads_differ": (*_replace(base, v=torch.randn(2, 4, 6, 8)), {}, r"\bv\b"),
        "hq_not_multiple": (*_replace(base, k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), {},
                            r"(?i)\bq\b.*heads|heads.*\bk\b"),
        "no_kv_heads": (*_replace(base, k=torch.randn(2, 0, 6, 8), v=torch.randn(2, 0, 6, 8)), {},
                        r"(?i)\bq\b.*heads|heads.*\bk\b"),
        "batch_differs": (*_replace(base, k=torch.randn(3, 2, 6, 8), v=torch.randn(3, 2, 6, 8)), {},
                          r"(?i)batch"),
        "k_dtype_differs": (*_replace(base, k=k.double()), {}, r"\bk\b.*float64|dtype"),
        "v_dtype_differs": (*_replace(base, v=v.half()), {}, r"\bv\b"),
        "q_int": (*_replace(base, q=q.to(torch.int32)), {}, r"\bq\b"),
        "all_int": (q.long(), k.long(), v.long(), {}, r"\bq\b"),
        "q_not_tensor": (q.tolist(), k, v, {}, r"\bq\b"),
        "mask_int": (*base, {"attn_mask": torch.ones(5, 6, dtype=torch.int64)}, r"attn_mask"),
        "mask_not_broadcastable": (*base, {"attn_mask": torch.ones(5, 7, dtype=torch.bool)}, r"attn_mask"),
        "mask_wrong_heads": (*base, {"attn_mask": torch.ones(2, 3, 5, 6, dtype=torch.bool)}, r"attn_mask"),
        "mask_rank5": (*base, {"attn_mask": torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)}, r"attn_mask"),
        "mask_not_tensor": (*base, {"attn_mask": [[True] * 6] * 5}, r"attn_mask"),
        "dropout_negative": (*base, {"dropout_p": -0.1}, r"dropout_p"),
        "dropout_one": (*base, {"dropout_p": 1.0}, r"dropout_p"),
        "dropout_above_one": (*base, {"dropout_p": 1.5}, r"dropout_p"),
        "dropout_nan": (*base, {"dropout_p": math.nan}, r"dropout_p"),
        "dropout_not_number": (*base, {"dropout_p": "0.1"}, r"dropout_p"),
        "backend_unknown": (*base, {"backend": "no_such_backend"}, r"backend"),
        "backend_not_str": (*base, {"backend": 3}, r"backend"),
        "causal_str": (*base, {"causal": "yes"}, r"causal must be a bool"),
        "causal_int": (*base, {"causal": 1}, r"causal must be a bool"),
        "causal_tensor": (*base, {"causal": torch.tensor(True)}, r"causal must be a bool"),
    }


ATTENTION_CASES = _attention_cases()


@pytest.mark.parametrize("backend_name", ["auto", *fastattn.available_backends()], ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=list(ATTENTION_CASES))
def test_attention_errors(case, backend_name):
    q, k, v, kwargs, match = ATTENTION_CASES[case]
    kwargs = {"backend": backend_name, **kwargs}
    with pytest.raises(ERRORS, match=match):
        fastattn.attention(q, k, v, **kwargs)


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend"):
        fastattn.attention(*qkv(), backend="nope")


def test_unavailable_known_backend_is_value_error():
    """Naming a known kernel backend that is not built here is a ValueError, not a silent fallback."""
    missing = [b for b in ("cuda", "triton") if b not in fastattn.available_backends()]
    if not missing:
        pytest.skip("every known backend is available here")
    with pytest.raises(ValueError, match=missing[0]):
        fastattn.attention(*qkv(), backend=missing[0])


def test_available_backends():
    backends = fastattn.available_backends()
    assert isinstance(backends, list) and all(isinstance(b, str) for b in backends)
    assert "cpu" in backends, "the compiled CPU extension is not loaded (fastattn._C failed to import?)"
    assert "reference" in backends


# ----------------------------------------------------------------------------------------------
# varlen
# ----------------------------------------------------------------------------------------------
def _varlen_base():
    q, k, v = torch.randn(10, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu_q = torch.tensor([0, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=7)


def _varlen_cases():
    i32 = dict(dtype=torch.int32)
    return {
        "cu_q_decreasing": ({"cu_seqlens_q": torch.tensor([0, 8, 3, 10], **i32),
                             "cu_seqlens_k": torch.tensor([0, 5, 6, 12], **i32), "max_seqlen_q": 10}, "cu_seqlens_q"),
        "cu_k_decreasing": ({"cu_seqlens_k": torch.tensor([0, 7, 5], **i32)}, "cu_seqlens_k"),
        "cu_q_int64": ({"cu_seqlens_q": torch.tensor([0, 3, 10])}, "cu_seqlens_q"),
        "cu_k_float": ({"cu_seqlens_k": torch.tensor([0.0, 5.0, 12.0])}, "cu_seqlens_k"),
        "cu_q_last_not_total": ({"cu_seqlens_q": torch.tensor([0, 3, 9], **i32)}, "cu_seqlens_q"),
        "cu_k_last_not_total": ({"cu_seqlens_k": torch.tensor([0, 5, 13], **i32)}, "cu_seqlens_k"),
        "cu_q_not_from_zero": ({"cu_seqlens_q": torch.tensor([1, 3, 10], **i32)}, "cu_seqlens_q"),
        "cu_q_2d": ({"cu_seqlens_q": torch.tensor([[0, 3, 10]], **i32)}, "cu_seqlens_q"),
        "cu_q_list": ({"cu_seqlens_q": [0, 3, 10]}, "cu_seqlens_q"),
        "cu_lengths_differ": ({"cu_seqlens_k": torch.tensor([0, 5, 6, 12], **i32)}, "cu_seqlens"),
        "max_seqlen_q_too_small": ({"max_seqlen_q": 6}, "max_seqlen_q"),
        "max_seqlen_k_too_small": ({"max_seqlen_k": 6}, "max_seqlen_k"),
        "q_rank4": ({"q": torch.randn(1, 10, 4, 8)}, r"\bq\b"),
        "k_rank2": ({"k": torch.randn(12, 16)}, r"\bk\b"),
        "head_dim_differs": ({"k": torch.randn(12, 2, 16)}, r"\bk\b"),
        "kv_len_differs": ({"v": torch.randn(11, 2, 8)}, r"\bv\b"),
        "hq_not_multiple": ({"k": torch.randn(12, 3, 8), "v": torch.randn(12, 3, 8)}, r"heads"),
        "dtype_differs": ({"v": torch.randn(12, 2, 8, dtype=torch.float64)}, r"\bv\b|dtype"),
        "q_int": ({"q": torch.ones(10, 4, 8, dtype=torch.int64)}, r"\bq\b"),
        "dropout_one": ({"dropout_p": 1.0}, "dropout_p"),
        "dropout_negative": ({"dropout_p": -1e-3}, "dropout_p"),
        "backend_unknown": ({"backend": "fast"}, "backend"),
        "causal_str": ({"causal": "no"}, "causal must be a bool"),
    }


VARLEN_CASES = _varlen_cases()


@pytest.mark.parametrize("backend_name", ["auto", *fastattn.available_backends()], ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=list(VARLEN_CASES))
def test_varlen_errors(case, backend_name):
    changes, match = VARLEN_CASES[case]
    args = {**_varlen_base(), "backend": backend_name, **changes}
    positional = [args.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                        "max_seqlen_k")]
    with pytest.raises(ERRORS, match=match):
        fastattn.varlen_attention(*positional, **args)


def test_varlen_valid_base_runs():
    """The base of the error cases above is itself valid (so each case fails for its own reason)."""
    args = _varlen_base()
    out = fastattn.varlen_attention(*args.values())
    assert out.shape == (10, 4, 8)
    out = fastattn.attention(*qkv())
    assert out.shape == (2, 4, 5, 8)


# ----------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ----------------------------------------------------------------------------------------------
SDPA_CASES = {
    "query_2d": (dict(query=torch.randn(5, 8)), r"query"),
    "key_2d": (dict(key=torch.randn(6, 8)), r"key"),
    "query_not_tensor": (dict(query=[[1.0]]), r"query"),
    "dropout_one": (dict(dropout_p=1.0), r"dropout_p"),
    "mask_int": (dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), r"attn_mask"),
    "mask_not_broadcastable": (dict(attn_mask=torch.ones(4, 6, dtype=torch.bool)), r"attn_mask"),
    "is_causal_str": (dict(is_causal="yes"), r"is_causal must be a bool"),
}


@pytest.mark.parametrize("case", list(SDPA_CASES), ids=list(SDPA_CASES))
def test_sdpa_errors(case):
    changes, match = SDPA_CASES[case]
    args = dict(query=torch.randn(2, 4, 5, 8), key=torch.randn(2, 4, 6, 8), value=torch.randn(2, 4, 6, 8))
    args.update(changes)
    with pytest.raises(ERRORS, match=match):
        fastattn.scaled_dot_product_attention(**args)


# ----------------------------------------------------------------------------------------------
# The ops check their inputs too (C++ checks that name the tensor)
# ----------------------------------------------------------------------------------------------
def test_op_errors_name_the_argument(op_device):
    q, k, v = (t.to(op_device) for t in qkv())
    fwd = torch.ops.fastattn.fwd
    with pytest.raises(ERRORS, match=r"\bq\b"):
        fwd(q[0], k, v, None, False, 1.0, 0.0, None)
    with pytest.raises(ERRORS, match=r"\bk\b"):
        fwd(q, k[..., :4], v, None, False, 1.0, 0.0, None)
    with pytest.raises(ERRORS, match=r"attn_mask"):
        fwd(q, k, v, torch.ones(3, 3, dtype=torch.bool, device=op_device), False, 1.0, 0.0, None)
    with pytest.raises(ERRORS, match=r"dropout_p"):
        fwd(q, k, v, None, False, 1.0, 1.0, torch.tensor([1, 2]))
    with pytest.raises(ERRORS, match=r"rng_state"):
        fwd(q, k, v, None, False, 1.0, 0.5, None)
    out, lse = fwd(q, k, v, None, False, 1.0, 0.0, None)
    with pytest.raises(ERRORS, match=r"lse"):
        torch.ops.fastattn.bwd(out, q, k, v, out, lse.double(), None, False, 1.0, 0.0, None)
    with pytest.raises(ERRORS, match=r"grad_out|out"):
        torch.ops.fastattn.bwd(out[..., :4], q, k, v, out, lse, None, False, 1.0, 0.0, None)
    cu = torch.tensor([0, 2, 1], dtype=torch.int32, device=op_device)
    qv, kv, vv = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (N, H, D)
    with pytest.raises(ERRORS, match=r"cu_seqlens_q"):
        torch.ops.fastattn.varlen_fwd(qv, kv, vv, cu, torch.tensor([0, 3, 6], dtype=torch.int32, device=op_device),
                                      5, 5, False, 1.0, 0.0, None)

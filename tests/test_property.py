"""Property tests: random shapes, head counts, layouts, masks and flags, each checked against the reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import check_attention, check_varlen_attention, make_tensor, require

SETTINGS = settings(max_examples=30, deadline=None, derandomize=False, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# How a mask of (B, Hq, Nq, Nk) is broadcast: which of the four dims it keeps (else 1), and
# whether leading dims are dropped.
MASK_FORMS = ["BHNqNk", "B11Nk", "1HNqNk", "B1Nq1", "NqNk", "Nk", "11NqNk", "B1NqNk"]


def _mask_shape(form, B, Hq, Nq, Nk):
    return {"BHNqNk": (B, Hq, Nq, Nk), "B11Nk": (B, 1, 1, Nk), "1HNqNk": (1, Hq, Nq, Nk), "B1Nq1": (B, 1, Nq, 1),
            "NqNk": (Nq, Nk), "Nk": (Nk,), "11NqNk": (1, 1, Nq, Nk), "B1NqNk": (B, 1, Nq, Nk)}[form]


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3]))
    Nq = draw(st.one_of(st.integers(1, 20), st.integers(21, 150)))
    Nk = draw(st.one_of(st.integers(1, 20), st.integers(21, 150)))
    D = draw(st.sampled_from([1, 5, 8, 16, 24, 33, 64, 80, 128]))
    Dv = draw(st.sampled_from([D, D, 7, 32]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    layouts = draw(st.tuples(*[st.sampled_from(["contiguous", "bnhd", "strided", "expanded"])] * 3))
    causal = draw(st.booleans())
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    mask_form = draw(st.sampled_from(MASK_FORMS))
    p_keep = draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
    # scale around 1/sqrt(D) keeps logits O(1-10): the named float32 tolerances assume that
    # (huge logits have their own tests in test_attention.py)
    factor = draw(st.one_of(st.none(), st.floats(0.05, 3.0)))
    scale = None if factor is None else factor / D ** 0.5
    return dict(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=dtype, layouts=layouts, causal=causal,
                mask_kind=mask_kind, mask_form=mask_form, p_keep=p_keep, scale=scale)


@SETTINGS
@given(prob=problems(), seed=st.integers(0, 2**31 - 1))
def test_attention_property(backend, prob, seed):
    device = require(backend, dtype=prob["dtype"], head_dim=max(prob["D"], prob["Dv"]),
                     has_mask=prob["mask_kind"] is not None)
    torch.manual_seed(seed)
    B, Hq, Hkv, Nq, Nk, D, Dv, dtype = (prob[n] for n in ("B", "Hq", "Hkv", "Nq", "Nk", "D", "Dv", "dtype"))
    lq, lk, lv = prob["layouts"]
    q = make_tensor((B, Hq, Nq, D), dtype=dtype, device=device, layout=lq, requires_grad=True)
    k = make_tensor((B, Hkv, Nk, D), dtype=dtype, device=device, layout=lk, requires_grad=True)
    v = make_tensor((B, Hkv, Nk, Dv), dtype=dtype, device=device, layout=lv, requires_grad=True)
    mask = None
    if prob["mask_kind"] is not None:
        shape = _mask_shape(prob["mask_form"], B, Hq, Nq, Nk)
        keep = torch.rand(shape, device=device) < prob["p_keep"]
        if prob["mask_kind"] == "bool":
            mask = keep  # may fully mask rows: they must give zeros and zero grads like the reference
        else:
            # finite biases, -inf only where key 0 stays finite (a fully -inf float row has no
            # defined reference gradient; fully masked rows are covered by the bool masks)
            bias = torch.randn(shape, dtype=torch.float64, device=device)
            if shape[-1] == Nk and Nk > 1:
                bias[..., 1:] = bias[..., 1:].masked_fill(~keep[..., 1:], float("-inf"))
            mask = bias.to(dtype)
    check_attention(backend, q, k, v, causal=prob["causal"], attn_mask=mask, scale=prob["scale"])


@st.composite
def varlen_problems(draw):
    batch = draw(st.integers(0, 5))
    lens_q = draw(st.lists(st.integers(0, 60), min_size=batch, max_size=batch))
    lens_k = draw(st.lists(st.integers(0, 60), min_size=batch, max_size=batch))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([8, 16, 40, 64]))
    Dv = draw(st.sampled_from([D, 24]))
    return dict(lens_q=lens_q, lens_k=lens_k, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, causal=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                layout=draw(st.sampled_from(["contiguous", "transposed"])))


@SETTINGS
@given(prob=varlen_problems(), seed=st.integers(0, 2**31 - 1))
def test_varlen_property(backend, prob, seed):
    device = require(backend, dtype=prob["dtype"], head_dim=max(prob["D"], prob["Dv"]), varlen=True)
    torch.manual_seed(seed)
    check_varlen_attention(backend, prob["lens_q"], prob["lens_k"], prob["Hq"], prob["Hkv"], prob["D"], prob["Dv"],
                   prob["dtype"], prob["causal"], device, layout=prob["layout"])

"""fastattn.nn.MultiheadAttention against torch.nn.MultiheadAttention, and replace_attention.

Parity is checked on the same weights (loaded from torch's module with strict=True) over
randomised configurations: outputs, returned weights and the gradients of the inputs and
parameters. Float64 runs compare at FWD/GRAD tolerances of float64; float32 at float32's;
bfloat16/float16 by the 2x rule against the float64 module. Every test runs on each device
that has a fastattn kernel backend (the CPU here; CUDA too when one is present), and checks
that the fused kernel (not the plain-PyTorch reference) served the call.
"""
from __future__ import annotations

import io
import random

import pytest
import torch

import fastattn
import fastattn.nn as fnn
from fastattn import dispatch
from conftest import (FWD_FLOOR, GRAD_FLOOR, assert_close, assert_within_2x, attention_devices, dtype_id,
                      require_fused)

# Looser than the kernel's own tolerances: the projections add float32 matmul rounding of
# E-wide dot products on top of the attention (measured ~2e-6 / ~1e-5 at these sizes).
MHA_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}
MHA_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(params=attention_devices(), ids=lambda d: f"device={d.type}")
def device(request):
    """Each device on which fastattn.attention has a fused kernel (the CPU; CUDA when present)."""
    return request.param


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the backend dispatch chose for every fastattn call made during the test."""
    chosen = []
    real = dispatch.choose_backend

    def spy(*args, **kwargs):
        name = real(*args, **kwargs)
        chosen.append(name)
        return name

    monkeypatch.setattr(dispatch, "choose_backend", spy)
    return chosen


def assert_fused(chosen):
    assert chosen, "fastattn.attention was never called"
    assert "reference" not in chosen, f"the plain-PyTorch reference ran instead of a fused kernel: {chosen}"


def make_pair(config, device, dtype):
    """(torch module, fastattn module) with identical weights; bias_k/bias_v/in_proj_bias randomised
    (torch initialises some of them to zero, which would hide mistakes)."""
    ref = torch.nn.MultiheadAttention(**config, device=device, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = fnn.MultiheadAttention(**config, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


# ---------------------------------------------------------------------------------------------
# Construction and state_dict
# ---------------------------------------------------------------------------------------------
STATE_CONFIGS = [
    dict(embed_dim=16, num_heads=4),
    dict(embed_dim=12, num_heads=3, bias=False, batch_first=True),
    dict(embed_dim=16, num_heads=2, kdim=10, vdim=7),
    dict(embed_dim=8, num_heads=2, add_bias_kv=True, add_zero_attn=True, dropout=0.1),
]


@pytest.mark.parametrize("config", STATE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_state_dict_round_trip(config):
    ref = torch.nn.MultiheadAttention(**config)
    ours = fnn.MultiheadAttention(**config)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict(), strict=True)
    for (n, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n
    fresh = torch.nn.MultiheadAttention(**config)
    fresh.load_state_dict(ours.state_dict(), strict=True)  # and back
    for (n, a), b in zip(fresh.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), n


def test_from_torch_shares_parameters():
    ref = torch.nn.MultiheadAttention(16, 4, add_bias_kv=True).train(False)
    ours = fnn.MultiheadAttention.from_torch(ref)
    assert ours.in_proj_weight is ref.in_proj_weight and ours.bias_k is ref.bias_k
    assert ours.out_proj is ref.out_proj and not ours.training
    assert all(p.device.type != "meta" for p in ours.parameters())
    seen = []
    ref.register_forward_hook(lambda mod, args, out: seen.append(type(mod)))
    ours = fnn.MultiheadAttention.from_torch(ref)
    x = torch.randn(3, 2, 16)
    ours(x, x, x)
    assert seen == [fnn.MultiheadAttention], "the user's forward hooks must move to the new module"


# ---------------------------------------------------------------------------------------------
# Randomised parity with torch's module
# ---------------------------------------------------------------------------------------------
def random_case(seed):
    """A random configuration and call: module args, input sizes, masks, flags."""
    r = random.Random(seed)
    H = r.choice([1, 2, 3, 4])
    D = r.choice([1, 4, 7, 8, 16])
    E = H * D
    cross = r.random() < 0.4
    config = dict(embed_dim=E, num_heads=H, bias=r.random() < 0.8, add_bias_kv=r.random() < 0.25,
                  add_zero_attn=r.random() < 0.25, batch_first=r.random() < 0.5)
    if cross and r.random() < 0.6:
        config["kdim"], config["vdim"] = r.choice([E, 5, 9]), r.choice([E, 3, 11])
    call = dict(N=r.choice([1, 2, 3]), L=r.choice([1, 3, 7, 17]), S=r.choice([1, 4, 9, 16]),
                batched=r.random() < 0.8, cross=cross, kpm=r.choice([None, "bool", "float"]),
                attn_mask=r.choice([None, None, "bool2d", "float2d", "bool3d", "float3d"]),
                need_weights=r.random() < 0.6, average=r.random() < 0.5)
    if not cross:
        call["S"] = call["L"]
    if call["kpm"] is not None and call["attn_mask"] is not None:  # same kind: torch warns otherwise
        call["kpm"] = "bool" if call["attn_mask"].startswith("bool") else "float"
    return config, call


def make_inputs(config, call, device, dtype, gen):
    E, H = config["embed_dim"], config["num_heads"]
    kdim, vdim = config.get("kdim") or E, config.get("vdim") or E
    N, L, S = call["N"], call["L"], call["S"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def seq(length, width):  # (N, len, width) batch-first, (len, N, width) otherwise, (len, width) unbatched
        if not call["batched"]:
            return randn(length, width)
        return randn(N, length, width) if config["batch_first"] else randn(length, N, width)

    query = seq(L, E)
    if call["cross"]:
        key, value = seq(S, kdim), seq(S, vdim)
    else:
        key = value = query
    kpm_shape = (N, S) if call["batched"] else (S,)
    kpm = None
    if call["kpm"] is not None:
        hidden = torch.rand(kpm_shape, generator=gen) < 0.3
        hidden[..., 0] = False  # every row keeps a key (torch's need_weights path gives NaN otherwise)
        kpm = hidden if call["kpm"] == "bool" else torch.randn(kpm_shape, generator=gen, dtype=torch.float64
                                                                ).masked_fill(hidden, float("-inf")).to(dtype)
        kpm = kpm.to(device)
    mask = None
    if call["attn_mask"] is not None:
        shape = (L, S) if call["attn_mask"].endswith("2d") else ((N * H if call["batched"] else H), L, S)
        hidden = torch.rand(shape, generator=gen) < 0.3
        hidden[..., 0] = False
        if call["attn_mask"].startswith("bool"):
            mask = hidden
        else:
            mask = torch.randn(shape, generator=gen, dtype=torch.float64).masked_fill(hidden, float("-inf")).to(dtype)
        mask = mask.to(device)
    return query, key, value, kpm, mask


def leaves(query, key, value):
    q = query.detach().clone().requires_grad_()
    if key is query:
        return q, q, q
    return q, key.detach().clone().requires_grad_(), value.detach().clone().requires_grad_()


def run(module, query, key, value, kpm, mask, call, **extra):
    out, w = module(query, key, value, key_padding_mask=kpm, attn_mask=mask, need_weights=call["need_weights"],
                    average_attn_weights=call["average"], **extra)
    return out, w


def grads_of(module, out, w, inputs, grad_out, grad_w):
    loss = (out * grad_out).sum() + ((w * grad_w).sum() if w is not None else 0)
    targets = [t for t in dict.fromkeys(inputs)] + [p for p in module.parameters()]
    return torch.autograd.grad(loss, targets)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("seed", range(24))
def test_parity_random_configs(seed, dtype, device, kernel_calls):
    require_fused(device, dtype=dtype, has_mask=True)
    config, call = random_case(seed)
    torch.manual_seed(seed)
    ref, ours = make_pair(config, device, dtype)
    gen = torch.Generator().manual_seed(1000 + seed)
    query, key, value, kpm, mask = make_inputs(config, call, device, dtype, gen)

    ri, oi = leaves(query, key, value), leaves(query, key, value)
    ref_out, ref_w = run(ref, *ri, kpm, mask, call)
    out, w = run(ours, *oi, kpm, mask, call)
    assert_fused(kernel_calls)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert_close("out", out, ref_out, atol=MHA_ATOL[dtype], rtol=MHA_RTOL[dtype])
    if call["need_weights"]:
        assert w.shape == ref_w.shape and w.dtype == ref_w.dtype
        assert_close("weights", w, ref_w, atol=MHA_ATOL[dtype], rtol=MHA_RTOL[dtype])
    else:
        assert w is None and ref_w is None

    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    grad_w = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(device, dtype) if w is not None else None
    ref_grads = grads_of(ref, ref_out, ref_w, ri, grad_out, grad_w)
    our_grads = grads_of(ours, out, w, oi, grad_out, grad_w)
    names = ["d_query", "d_key", "d_value"][:len(dict.fromkeys(oi))] + [f"d_{n}" for n, _ in ours.named_parameters()]
    for name, g, rg in zip(names, our_grads, ref_grads):
        assert_close(name, g, rg, atol=MHA_ATOL[dtype] * 10, rtol=MHA_RTOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_low_precision_within_2x_of_torch(dtype, device, kernel_calls):
    """bf16/fp16: our error vs a float64 torch module <= 2x torch's own error in that dtype + floor."""
    require_fused(device, dtype=dtype, has_mask=True)
    config = dict(embed_dim=32, num_heads=4, batch_first=True)
    torch.manual_seed(0)
    ref64, _ = make_pair(config, device, torch.float64)
    ref_low = torch.nn.MultiheadAttention(**config, device=device, dtype=dtype)
    ref_low.load_state_dict(ref64.state_dict())
    ours = fnn.MultiheadAttention(**config, device=device, dtype=dtype)
    ours.load_state_dict(ref64.state_dict())
    x = torch.randn(2, 19, 32, dtype=torch.float64, device=device).to(dtype)
    kpm = torch.rand(2, 19, device=device) < 0.3
    kpm[:, 0] = False
    results = {}
    for name, m, t in (("ref64", ref64, x.double()), ("low", ref_low, x), ("ours", ours, x)):
        xi = t.detach().clone().requires_grad_()
        out, w = m(xi, xi, xi, key_padding_mask=kpm, need_weights=True)
        g = torch.ones_like(out)
        (dx,) = torch.autograd.grad((out * g).sum() + w.sum(), xi)
        results[name] = (out, w, dx)
    assert_fused(kernel_calls)
    for i, what in enumerate(("out", "weights")):
        assert_within_2x(what, results["ours"][i], results["low"][i], results["ref64"][i], FWD_FLOOR[dtype])
    assert_within_2x("d_query", results["ours"][2], results["low"][2], results["ref64"][2],
                     GRAD_FLOOR[dtype] * 8)  # dx sums over E * 3 projection paths


# ---------------------------------------------------------------------------------------------
# Causal hint, the single-matmul self-attention path, non-contiguous inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("extra", ["none", "add_bias_kv", "add_zero_attn"])
def test_is_causal_hint(need_weights, with_kpm, extra, device, kernel_calls, monkeypatch):
    require_fused(device, dtype=torch.float64, has_mask=True)
    config = dict(embed_dim=16, num_heads=2, batch_first=True, add_bias_kv=extra == "add_bias_kv",
                  add_zero_attn=extra == "add_zero_attn")
    ref, ours = make_pair(config, device, torch.float64)
    x = torch.randn(2, 9, 16, dtype=torch.float64, device=device)
    causal_mask = torch.nn.Transformer.generate_square_subsequent_mask(9, device=device, dtype=torch.float64)
    kpm = None
    if with_kpm:
        kpm = torch.zeros(2, 9, dtype=torch.float64, device=device)
        kpm[1, 6:] = float("-inf")
    causal_flags = []
    real = fastattn.api.attention
    monkeypatch.setattr(fastattn.api, "attention",
                        lambda *a, **k: causal_flags.append(k.get("causal")) or real(*a, **k))
    r = ref(x, x, x, attn_mask=causal_mask, key_padding_mask=kpm, need_weights=need_weights, is_causal=True)
    o = ours(x, x, x, attn_mask=causal_mask, key_padding_mask=kpm, need_weights=need_weights, is_causal=True)
    assert_fused(kernel_calls)
    assert_close("out", o[0], r[0], atol=1e-10, rtol=1e-10)
    if need_weights:
        assert_close("weights", o[1], r[1], atol=1e-10, rtol=1e-10)
    # with no appended key the hint is used as the kernel's causal flag (no mask tensor)
    assert causal_flags == [extra == "none" or (not with_kpm and not need_weights)]


def test_is_causal_needs_attn_mask():
    m = fnn.MultiheadAttention(8, 2)
    x = torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        m(x, x, x, is_causal=True)


def test_non_contiguous_inputs(device, kernel_calls):
    require_fused(device, dtype=torch.float64, has_mask=True)
    ref, ours = make_pair(dict(embed_dim=16, num_heads=4, kdim=6, vdim=5), device, torch.float64)
    q = torch.randn(2, 7, 32, dtype=torch.float64, device=device)[..., ::2].transpose(0, 1)  # (7, 2, 16)
    k = torch.randn(2, 5, 6, dtype=torch.float64, device=device).transpose(0, 1)  # (5, 2, 6)
    v = torch.randn(5, 2, 10, dtype=torch.float64, device=device)[..., 1::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    r, o = ref(q, k, v), ours(q, k, v)
    assert_fused(kernel_calls)
    assert_close("out", o[0], r[0], atol=1e-10, rtol=1e-10)
    assert_close("weights", o[1], r[1], atol=1e-10, rtol=1e-10)


def test_torch_compile_fullgraph(device, kernel_calls):
    """The module traces as one graph (the fastattn ops have fake kernels), with and without weights."""
    require_fused(device, dtype=torch.float32, has_mask=True)
    torch.manual_seed(8)
    ref, ours = make_pair(dict(embed_dim=16, num_heads=4, batch_first=True), device, torch.float32)
    ours.eval()
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(2, 9, 16, device=device)
    kpm = torch.zeros(2, 9, dtype=torch.bool, device=device)
    kpm[1, 5:] = True
    for need_weights in (False, True):
        o, w = compiled(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        r, rw = ref(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        assert_close("compiled out", o, r, atol=MHA_ATOL[torch.float32], rtol=MHA_RTOL[torch.float32])
        if need_weights:
            assert_close("compiled weights", w, rw, atol=MHA_ATOL[torch.float32], rtol=MHA_RTOL[torch.float32])
    assert_fused(kernel_calls)


def test_fully_masked_rows_give_zeros(device):
    """Documented difference: a query that may see no key gives zeros (torch: zeros without weights,
    NaN with need_weights=True)."""
    require_fused(device, dtype=torch.float64, has_mask=True)
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=True), device, torch.float64)
    x = torch.randn(2, 4, 8, dtype=torch.float64, device=device)
    kpm = torch.tensor([[False, False, True, False], [True, True, True, True]], device=device)
    o, w = ours(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    assert torch.equal(w[1], torch.zeros_like(w[1]))
    assert_close("out of the masked sample", o[1], ours.out_proj.bias.expand(4, 8), atol=0, rtol=0)
    r, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert_close("out", o, r, atol=1e-10, rtol=1e-10)  # torch's SDPA path agrees


def test_mixed_mask_types_warn_like_torch(device):
    require_fused(device, dtype=torch.float64, has_mask=True)
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2), device, torch.float64)
    x = torch.randn(5, 2, 8, dtype=torch.float64, device=device)
    kpm = torch.zeros(2, 5, dtype=torch.bool, device=device)
    kpm[0, 3:] = True
    mask = torch.randn(5, 5, dtype=torch.float64, device=device)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        o = ours(x, x, x, key_padding_mask=kpm, attn_mask=mask)
    with pytest.warns(UserWarning):
        r = ref(x, x, x, key_padding_mask=kpm, attn_mask=mask)
    assert_close("out", o[0], r[0], atol=1e-10, rtol=1e-10)
    assert_close("weights", o[1], r[1], atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------
def test_dropout_only_in_training(device, kernel_calls):
    require_fused(device, dtype=torch.float64, dropout=True)
    ref, ours = make_pair(dict(embed_dim=16, num_heads=2, dropout=0.4, batch_first=True), device, torch.float64)
    x = torch.randn(2, 12, 16, dtype=torch.float64, device=device)
    ref.eval(), ours.eval()
    e1, e2, r = ours(x, x, x)[0], ours(x, x, x)[0], ref(x, x, x)[0]
    assert torch.equal(e1, e2)
    assert_close("eval out", e1, r, atol=1e-10, rtol=1e-10)
    ours.train()
    t1, t2 = ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(t1, e1) and not torch.allclose(t1, t2)
    torch.manual_seed(7)
    a = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(7)
    b = ours(x, x, x, need_weights=False)[0]
    assert torch.equal(a, b), "dropout must be reproducible under torch.manual_seed"
    assert_fused(kernel_calls)


def test_dropout_weights_are_the_ones_applied(device, kernel_calls):
    """With need_weights in training, the returned per-head weights are the dropped-out, rescaled
    probabilities the kernel used: weights @ v reproduces the attention output exactly, and about
    p of them are zero."""
    require_fused(device, dtype=torch.float64, dropout=True)
    E, H, p = 16, 2, 0.3
    m = fnn.MultiheadAttention(E, H, dropout=p, batch_first=True, device=device, dtype=torch.float64)
    with torch.no_grad():  # identity output projection: the output is the attention itself
        m.out_proj.weight.copy_(torch.eye(E))
        m.out_proj.bias.zero_()
    x = torch.randn(3, 40, E, dtype=torch.float64, device=device)
    out, w = m(x, x, x, average_attn_weights=False)  # w (3, H, 40, 40)
    assert_fused(kernel_calls)
    v = torch.nn.functional.linear(x, m.in_proj_weight[2 * E:], m.in_proj_bias[2 * E:])  # (3, 40, E)
    v = v.view(3, 40, H, E // H).transpose(1, 2)  # (3, H, 40, E/H)
    expected = torch.matmul(w, v).transpose(1, 2).reshape(3, 40, E)
    assert_close("out vs weights @ v", out, expected, atol=1e-10, rtol=1e-10)
    zero_fraction = (w == 0).double().mean().item()
    assert abs(zero_fraction - p) < 0.05, zero_fraction
    kept = w[w != 0]
    rows = w.sum(-1)  # each row sums to (sum of kept probs) / (1 - p), ~1 on average
    assert kept.min() > 0 and abs(rows.mean().item() - 1.0) < 0.1
    out.sum().backward()  # dropout backward runs
    assert m.in_proj_weight.grad is not None and torch.isfinite(m.in_proj_weight.grad).all()


def test_dropout_seed_recovery_fails_loudly(monkeypatch):
    """If fastattn.attention drew its seed differently, the weights could not be rebuilt: error, not wrong weights."""
    m = fnn.MultiheadAttention(8, 2, dropout=0.5)
    real = fastattn.api.attention
    monkeypatch.setattr(fastattn.api, "attention", lambda *a, **k: (torch.rand(1), real(*a, **k))[1])
    x = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="could not recover the dropout seed"):
        m(x, x, x)
    m(x, x, x, need_weights=False)  # no weights asked: nothing to rebuild


# ---------------------------------------------------------------------------------------------
# Real torch.nn.Transformer* modules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layer_swapped(norm_first, batch_first, device, kernel_calls):
    require_fused(device, dtype=torch.float64, has_mask=True)
    torch.manual_seed(3)
    ref = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first, device=device, dtype=torch.float64)
    model = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=batch_first,
                                             norm_first=norm_first, device=device, dtype=torch.float64)
    model.load_state_dict(ref.state_dict())
    assert fnn.replace_attention(model) == 1 and isinstance(model.self_attn, fnn.MultiheadAttention)
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 10, 32, dtype=torch.float64, device=device)
    x = x if batch_first else x.transpose(0, 1)
    kpm = torch.zeros(3, 10, dtype=torch.bool, device=device)
    kpm[1, 7:], kpm[2, 4:] = True, True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10, device=device, dtype=torch.float64)
    for kwargs in (dict(), dict(src_key_padding_mask=kpm), dict(src_mask=causal, is_causal=True),
                   dict(src_mask=causal, src_key_padding_mask=kpm.double().masked_fill(kpm, float("-inf")))):
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        r, o = ref(xr, **kwargs), model(xo, **kwargs)
        assert_close(f"train out {list(kwargs)}", o, r, atol=1e-10, rtol=1e-10)
        g = torch.randn_like(r)
        (gr,), (go,) = torch.autograd.grad(r, xr, g), torch.autograd.grad(o, xo, g)
        assert_close(f"d_src {list(kwargs)}", go, gr, atol=1e-9, rtol=1e-9)
        # inference: torch's layer takes its fused C++ path here; ours must still run fastattn
        ref.eval(), model.eval()
        kernel_calls.clear()
        with torch.no_grad():
            r, o = ref(x, **kwargs), model(x, **kwargs)
        assert_fused(kernel_calls)
        valid = ~kpm if batch_first else ~kpm.T  # torch's fused path leaves padded rows unspecified
        assert_close(f"eval out {list(kwargs)}", o[valid], r[valid], atol=1e-10, rtol=1e-10)
        ref.train(), model.train()


def test_transformer_encoder_nested_inference(device, kernel_calls, monkeypatch):
    """torch.nn.TransformerEncoder converts padded batches to nested tensors in inference and hands
    them to its layers' attention: ours runs them packed (varlen, no padding); zeros where padded."""
    require_fused(device, dtype=torch.float64, has_mask=True)
    torch.manual_seed(4)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True,
                                             device=device, dtype=torch.float64)
    ref = torch.nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=True).eval()
    model = torch.nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=True).eval()
    model.load_state_dict(ref.state_dict())
    assert fnn.replace_attention(model) == 3
    assert model.use_nested_tensor is True  # the encoder's nested inference path stays on
    assert fnn.replace_attention(model) == 0  # nothing left to swap
    nested_calls = []
    real_nested = fnn.MultiheadAttention._forward_nested
    monkeypatch.setattr(fnn.MultiheadAttention, "_forward_nested",
                        lambda self, q, *a: nested_calls.append(q.layout) or real_nested(self, q, *a))
    x = torch.randn(3, 8, 16, dtype=torch.float64, device=device)
    kpm = torch.zeros(3, 8, dtype=torch.bool, device=device)
    kpm[0, 5:], kpm[2, 2:] = True, True
    with torch.no_grad():
        r, o = ref(x, src_key_padding_mask=kpm), model(x, src_key_padding_mask=kpm)
    assert_fused(kernel_calls)
    assert len(kernel_calls) == 3
    assert nested_calls == [torch.strided] * 3, "the layers did not get the encoder's nested batch"
    assert_close("out (valid positions)", o[~kpm], r[~kpm], atol=1e-10, rtol=1e-10)
    assert torch.all(o[kpm] == 0), "the nested path leaves zeros at padded positions"


def test_replace_attention_in_full_transformer():
    torch.manual_seed(5)
    model = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                                 dim_feedforward=20, dropout=0.0, dtype=torch.float64)
    ref = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=20, dropout=0.0, dtype=torch.float64)
    ref.load_state_dict(model.state_dict())
    before = {n: p for n, p in model.named_parameters()}
    assert fnn.replace_attention(model) == 2 + 2 * 2  # encoder self, decoder self + cross
    assert all(p is before[n] for n, p in model.named_parameters()), "parameters must be kept, not copied"
    src, tgt = torch.randn(7, 2, 16, dtype=torch.float64), torch.randn(5, 2, 16, dtype=torch.float64)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    assert_close("out", model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True),
                 ref(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True), atol=1e-10, rtol=1e-10)


def test_replace_attention_shared_and_subclass():
    class Custom(torch.nn.MultiheadAttention):
        pass

    shared = torch.nn.MultiheadAttention(8, 2)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared), "c": Custom(8, 2)})
    assert fnn.replace_attention(model) == 1
    assert model["a"] is model["b"][0] and isinstance(model["a"], fnn.MultiheadAttention)
    assert type(model["c"]) is Custom  # subclasses may have their own forward: left alone
    with pytest.raises(TypeError, match="from_torch"):
        fnn.replace_attention(torch.nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fnn.replace_attention("model")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_clear_errors():
    m = fnn.MultiheadAttention(8, 2, kdim=6, vdim=4)
    x, k, v = torch.randn(5, 3, 8), torch.randn(4, 3, 6), torch.randn(4, 3, 4)
    with pytest.raises(ValueError, match=r"query must have last dim 8 \(embed_dim\)"):
        m(torch.randn(5, 3, 7), k, v)
    with pytest.raises(ValueError, match=r"key must have last dim 6 \(kdim\)"):
        m(x, torch.randn(4, 3, 8), v)
    with pytest.raises(ValueError, match="query must be batched 3-D"):
        m(torch.randn(1, 5, 3, 8), k, v)
    with pytest.raises(ValueError, match="key and value must have the same batch and sequence dims"):
        m(x, k, torch.randn(5, 3, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        m(x, torch.randn(4, 2, 6), torch.randn(4, 2, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\) = \(3, 4\)"):
        m(x, k, v, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(5, 4\)"):
        m(x, k, v, attn_mask=torch.zeros(4, 4))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating point"):
        m(x, k, v, attn_mask=torch.zeros(5, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        m(x, None, v)
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    with pytest.raises(ValueError, match="batch_first=True"):
        fnn.MultiheadAttention(8, 2)(nested, nested, nested)
    with pytest.raises(ValueError, match="must all be nested"):
        fnn.MultiheadAttention(8, 2, batch_first=True)(nested, torch.randn(2, 3, 8), nested)
    with pytest.raises(ValueError, match="key_padding_mask and attn_mask must be None"):
        fnn.MultiheadAttention(8, 2, batch_first=True)(nested, nested, nested, attn_mask=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention"):
        fnn.MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_inputs(layout, device, kernel_calls):
    """Nested batches (N, L_i, E): the output of each sequence is torch's module on that sequence alone,
    forward and backward (weights asked for: padded to (N, L_max, S_max), zeros outside, as torch's fast path)."""
    require_fused(device, dtype=torch.float64, varlen=True)
    torch.manual_seed(11)
    ref, ours = make_pair(dict(embed_dim=12, num_heads=3, batch_first=True), device, torch.float64)
    lengths, key_lengths = [5, 1, 7], [4, 2, 9]
    xs = [torch.randn(n, 12, dtype=torch.float64, device=device) for n in lengths]
    ys = [torch.randn(n, 12, dtype=torch.float64, device=device) for n in key_lengths]
    for cross in (False, True):
        q = torch.nested.nested_tensor(xs, layout=layout, requires_grad=True)
        kv = torch.nested.nested_tensor(ys, layout=layout, requires_grad=True) if cross else q
        kernel_calls.clear()
        out, weights = ours(q, kv, kv, need_weights=False)
        assert weights is None and out.is_nested and out.layout == layout
        assert_fused(kernel_calls)
        grads = torch.autograd.grad(sum((o * o).sum() for o in out.unbind()), [q, ours.in_proj_weight])
        for i, x in enumerate(xs):
            x = x.detach().requires_grad_()
            y = ys[i].detach().requires_grad_() if cross else x
            r, _ = ref(x[None], y[None], y[None], need_weights=False)
            assert_close(f"out seq {i} cross={cross}", out.unbind()[i], r[0], atol=1e-10, rtol=1e-10)
            (dx,) = torch.autograd.grad((r * r).sum(), [x])
            assert_close(f"d query seq {i} cross={cross}", grads[0].unbind()[i], dx, atol=1e-9, rtol=1e-9)
        out_w, weights = ours(q, kv, kv)  # need_weights=True
        lens_k = key_lengths if cross else lengths
        assert weights.shape == (3, max(lengths), max(lens_k))
        for i, x in enumerate(xs):
            y = ys[i] if cross else x
            _, w = ref(x[None], y[None], y[None])
            assert_close(f"weights seq {i}", weights[i, :lengths[i], :lens_k[i]], w[0], atol=1e-10, rtol=1e-10)
            assert torch.all(weights[i, lengths[i]:] == 0) and torch.all(weights[i, :, lens_k[i]:] == 0)
            assert_close(f"out (weights path) seq {i}", out_w.unbind()[i], out.unbind()[i], atol=1e-12, rtol=0)


def test_errors_are_the_classes_torch_raises():
    """Code written for torch catches our errors: AssertionError for shapes (torch's module asserts,
    with the same words), RuntimeError too; ValueError / TypeError as before."""
    m = fnn.MultiheadAttention(4, 4)
    x = torch.randn(4, 4, 4)
    cases = [
        (lambda: m(x, torch.randn(4, 4), x), "expected `key` and `value` to be 3-D but found 2-D and 3-D tensors"),
        (lambda: m(x, x, x, key_padding_mask=torch.zeros(4, dtype=torch.bool)),
         "expected `key_padding_mask` to be `None` or 2-D but found 1-D tensor instead"),
        (lambda: m(x, x, x, attn_mask=torch.zeros(4)), "expected `attn_mask` to be `None`, 2-D or 3-D but found 1-D"),
        (lambda: m(x[:, 0], x[:, 0], x[:, 0], attn_mask=torch.zeros(3, 4, 4)),
         r"Expected `attn_mask` shape to be \(4, 4, 4\)"),
        (lambda: m(torch.randn(4), x, x), "query should be unbatched 2D or batched 3D tensor"),
    ]
    for call, message in cases:
        for error in (AssertionError, RuntimeError, ValueError):
            with pytest.raises(error, match=message):
                call()
    with pytest.raises(AssertionError, match="bool or floating point"):
        m(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.int64))


def test_in_proj_bias_of_another_dtype():
    """torch's module accepts an in_proj_bias whose dtype differs from the weights (its matmul + add promotes)."""
    torch.manual_seed(12)
    ref, ours = make_pair(dict(embed_dim=8, num_heads=2, batch_first=True), "cpu", torch.float64)
    for module in (ref, ours):
        module.in_proj_bias = torch.nn.Parameter(ref.in_proj_bias.detach().to(torch.half))
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    (r, _), (o, _) = ref(x, x, x), ours(x, x, x)
    assert o.dtype == r.dtype == torch.float64
    assert_close("out", o, r, atol=1e-10, rtol=1e-10)


def test_torchscript(kernel_calls):
    """torch.jit.script compiles a module holding ours; the attention itself runs in Python (fastattn),
    so the scripted module runs but cannot be saved (torch.jit.save names the Python call)."""
    torch.manual_seed(13)
    ref, ours = make_pair(dict(embed_dim=16, num_heads=4, kdim=8, vdim=8), "cpu", torch.float64)
    scripted = torch.jit.script(ours)
    x, y = torch.randn(3, 2, 16, dtype=torch.float64), torch.randn(5, 2, 8, dtype=torch.float64)
    kpm = torch.tensor([[False] * 5, [False, False, True, True, True]])
    kernel_calls.clear()
    (o, w), (r, rw) = scripted(x, y, y, key_padding_mask=kpm), ref(x, y, y, key_padding_mask=kpm)
    assert_fused(kernel_calls)
    assert_close("scripted out", o, r, atol=1e-10, rtol=1e-10)
    assert_close("scripted weights", w, rw, atol=1e-10, rtol=1e-10)
    layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, dtype=torch.float64)
    fnn.replace_attention(layer)
    with pytest.warns(UserWarning, match="scripting removes its no-op forward pre-hook"):
        scripted_layer = torch.jit.script(layer)
    kernel_calls.clear()
    src = torch.randn(6, 2, 16, dtype=torch.float64)
    assert_close("scripted layer", scripted_layer(src), layer(src), atol=1e-12, rtol=0)
    assert_fused(kernel_calls)
    with pytest.raises(RuntimeError, match="Could not export Python function call '_forward_impl'"):
        torch.jit.save(scripted, io.BytesIO())

"""attn_implementation="fastattn" in HuggingFace transformers against the "sdpa" implementation.

Tiny randomly initialised models built from configs (no downloads): BERT and RoBERTa with
padding, a Llama-style decoder with grouped-query attention (padded, packed into one row,
generating with a cache). The same weights run once with "sdpa" and once with "fastattn";
logits / hidden states and the parameter gradients must agree to float32 rounding, and a spy
on fastattn's dispatch checks that the fused kernel (dense or varlen) served every layer.
Needs transformers (`pip install fastattn[hf]`); without it the module is skipped, saying so.
"""
from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastattn[hf])")

from fastattn import api, dispatch  # noqa: E402
from fastattn.integrations import huggingface as fhf  # noqa: E402
from conftest import attention_devices, require_fused  # noqa: E402

# float32 models: sdpa and fastattn round differently; errors measured ~3e-7 for hidden states
# of magnitude ~1-3 and ~1e-6 for gradients; the tolerances leave ~10x room.
OUT_ATOL, OUT_RTOL = 5e-6, 1e-5
GRAD_ATOL, GRAD_RTOL = 2e-5, 1e-4
# BERT-style encoders look registered implementations up from transformers 5.0 (before, they pick one of
# their own attention classes by name); the decoders from 4.53, the oldest release fastattn[hf] allows.
ENCODERS_CALL_REGISTERED = int(transformers.__version__.split(".")[0]) >= 5
needs_encoder_interface = pytest.mark.skipif(
    not ENCODERS_CALL_REGISTERED, reason=f"transformers {transformers.__version__}: BERT-style encoders call a "
    "registered attention implementation from 5.0")


@pytest.fixture(params=attention_devices(), ids=lambda d: f"device={d.type}")
def device(request):
    """Each device on which fastattn.attention has a fused kernel (the CPU; CUDA when present)."""
    return request.param


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert fhf.register() == "fastattn"


@pytest.fixture
def calls(monkeypatch):
    """What fastattn ran during the test: dispatch choices and which entry point (dense or varlen)."""
    record = {"backends": [], "dense": [], "varlen": []}
    real_choose, real_attention, real_varlen = dispatch.choose_backend, api.attention, api.varlen_attention

    def choose(*a, **k):
        name = real_choose(*a, **k)
        record["backends"].append(name)
        return name

    def attention(*a, **k):
        record["dense"].append(dict(k, q_len=a[0].shape[-2]))
        return real_attention(*a, **k)

    def varlen(*a, **k):
        record["varlen"].append(k)
        return real_varlen(*a, **k)

    monkeypatch.setattr(dispatch, "choose_backend", choose)
    monkeypatch.setattr(api, "attention", attention)
    monkeypatch.setattr(api, "varlen_attention", varlen)
    return record


def assert_fused(calls, n):
    assert len(calls["backends"]) == n, f"expected {n} fastattn calls, got {len(calls['backends'])}"
    assert "reference" not in calls["backends"], calls["backends"]


def switch_to_fastattn(model):
    """model.set_attn_implementation (newer transformers), or the config field that older ones (4.53) read
    at every forward: the same switch either way."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("fastattn")
    else:
        model.config._attn_implementation = "fastattn"


def twin(model_cls, config, device):
    """(sdpa model, fastattn model) with the same random weights."""
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    sdpa = model_cls(config).to(device)
    ours = copy.deepcopy(sdpa)
    switch_to_fastattn(ours)
    assert ours.config._attn_implementation == "fastattn" and sdpa.config._attn_implementation == "sdpa"
    return sdpa, ours


def close(name, a, b, atol=OUT_ATOL, rtol=OUT_RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def compare_grads(sdpa, ours):
    named = dict(sdpa.named_parameters())
    checked = 0
    for n, p in ours.named_parameters():
        ref = named[n].grad
        if ref is None:
            assert p.grad is None, n
            continue
        close(f"grad {n}", p.grad, ref, GRAD_ATOL, GRAD_RTOL)
        checked += 1
    assert checked > 0


def test_import_fastattn_does_not_import_transformers():
    code = "import sys, fastattn, fastattn.nn; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_adds_attention_and_mask_functions():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionInterface._global_mapping["fastattn"] is fhf.attention_forward
    # the mask function is what makes transformers build padding masks for us at all: ours keeps causal and
    # sliding-window bands O(Lk) and gives the sdpa mask for everything else
    assert AttentionMaskInterface._global_mapping["fastattn"] is fhf.band_mask
    assert fhf.register("fastattn_custom") == "fastattn_custom"
    with pytest.raises(ValueError, match="without '/'"):
        fhf.register("org/kernel")


def test_band_mask_reads_both_forms_of_the_query_span():
    """transformers up to 5.0 passes the queries' positions (``cache_position``), newer releases
    ``q_length`` + ``q_offset``: both give the same band (found by running transformers 5.0's own
    model tests, where the ``cache_position`` form raised a TypeError)."""
    from transformers.masking_utils import causal_mask_function
    padding = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # (B, seen keys): left padding in row 0
    common = dict(batch_size=2, kv_length=6, kv_offset=0, mask_function=causal_mask_function,
                  attention_mask=padding, allow_is_causal_skip=False)
    newer = fhf.band_mask(q_length=2, q_offset=4, **common)
    older = fhf.band_mask(cache_position=torch.arange(4, 6), **common)
    for band in (newer, older):
        assert isinstance(band, fhf.CausalBandMask) and band.window == 0 and band.shape == (2, 1, 2, 6)
        assert torch.equal(band.key_padding, padding.bool()[:, None, None, :])
    assert older.sdpa_args["cache_position"].tolist() == [4, 5]  # passed on to sdpa_mask as given
    assert fhf._query_span({"cache_position": torch.tensor([4, 6])}) == (2, None)  # not a range: dense mask
    # queries that do not end at the last key (a static cache's unfilled tail): the dense sdpa mask,
    # built by this transformers' sdpa_mask, which takes one of the two forms
    from transformers.masking_utils import sdpa_mask

    def installed_form(q_length, q_offset):
        if "q_length" in inspect.signature(sdpa_mask).parameters:
            return {"q_length": q_length, "q_offset": q_offset}
        return {"cache_position": torch.arange(q_offset, q_offset + q_length)}

    dense = fhf.band_mask(**installed_form(2, 2), **common)
    assert isinstance(dense, torch.Tensor) and dense.shape == (2, 1, 2, 6)
    # one query under plain causal masking: the sdpa mask, (B, 1, 1, Lk), no bigger than the band; a compiled
    # decode loop over a static cache then sees one mask type at every step (transformers' own
    # test_generate_compile_model_forward_fullgraph recompiled at the step that filled the cache)
    one = fhf.band_mask(**installed_form(1, 5), **common)
    assert isinstance(one, torch.Tensor) and one.shape == (2, 1, 1, 6)


# ---------------------------------------------------------------------------------------------
# Encoders with padding
# ---------------------------------------------------------------------------------------------
def encoder_config(kind):
    common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        return transformers.BertModel, transformers.BertConfig(**common)
    return transformers.RobertaModel, transformers.RobertaConfig(**common, pad_token_id=1)


@needs_encoder_interface
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encoder_with_padding_matches_sdpa(kind, padding, device, calls):
    require_fused(device, dtype=torch.float32, has_mask=True)
    model_cls, config = encoder_config(kind)
    sdpa, ours = twin(model_cls, config, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 13), generator=g).to(device)
    mask = torch.ones(3, 13, dtype=torch.long, device=device)
    for row, n in ((1, 9), (2, 4)):
        if padding == "right":
            mask[row, n:] = 0
        else:
            mask[row, :13 - n] = 0
    sdpa.train(), ours.train()  # dropout is 0: train mode to get gradients through everything
    ref = sdpa(ids, attention_mask=mask).last_hidden_state
    out = ours(ids, attention_mask=mask).last_hidden_state
    assert_fused(calls, config.num_hidden_layers)
    assert all(k["attn_mask"] is not None and k["attn_mask"].dtype == torch.bool for k in calls["dense"])
    close("last_hidden_state", out, ref)
    weight = torch.randn(ref.shape, generator=g).to(device)
    (ref * weight).sum().backward()
    (out * weight).sum().backward()
    compare_grads(sdpa, ours)


@needs_encoder_interface
def test_encoder_without_padding_passes_no_mask(device, calls):
    require_fused(device, dtype=torch.float32, has_mask=True)
    model_cls, config = encoder_config("bert")
    sdpa, ours = twin(model_cls, config, device)
    ids = torch.randint(3, 99, (2, 10)).to(device)
    with torch.no_grad():
        close("out", ours(ids).last_hidden_state, sdpa(ids).last_hidden_state)
    assert_fused(calls, 2)
    assert all(k["attn_mask"] is None and not k["causal"] for k in calls["dense"])


# ---------------------------------------------------------------------------------------------
# Llama-style decoder with grouped-query attention
# ---------------------------------------------------------------------------------------------
def llama_config(**overrides):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_llama_gqa_matches_sdpa(padding, device, calls):
    require_fused(device, dtype=torch.float32, has_mask=True)
    config = llama_config()
    sdpa, ours = twin(transformers.LlamaForCausalLM, config, device)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (3, 11), generator=g).to(device)
    mask = torch.ones(3, 11, dtype=torch.long, device=device)
    if padding == "left":
        mask[1, :3], mask[2, :6] = 0, 0
    elif padding == "right":
        mask[1, 8:], mask[2, 5:] = 0, 0
    sdpa.train(), ours.train()
    ref = sdpa(ids, attention_mask=mask, labels=ids, use_cache=False)
    out = ours(ids, attention_mask=mask, labels=ids, use_cache=False)
    assert_fused(calls, config.num_hidden_layers)
    for k in calls["dense"]:  # no padding: the kernel's causal flag, no mask tensor
        assert (k["attn_mask"] is None and k["causal"]) if padding == "none" else k["attn_mask"] is not None
    valid = mask.bool()  # fully padded query rows are not compared (sdpa gives them no defined meaning)
    close("logits", out.logits[valid], ref.logits[valid])
    if padding == "none":
        ref.loss.backward()
        out.loss.backward()
        compare_grads(sdpa, ours)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_llama_custom_4d_mask(kind, device, calls):
    """A ready 4-D mask from the user is passed through by transformers as is (bool or additive float)."""
    require_fused(device, dtype=torch.float32, has_mask=True)
    config = llama_config()
    sdpa, ours = twin(transformers.LlamaForCausalLM, config, device)
    ids = torch.randint(0, 128, (2, 8)).to(device)
    allowed = torch.ones(8, 8, dtype=torch.bool, device=device).tril() & (torch.rand(2, 1, 8, 8, device=device) < 0.7)
    allowed[..., 0] = True  # every query keeps the first token
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape, device=device).masked_fill(~allowed, -1e9)
    with torch.no_grad():
        ref, out = sdpa(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert_fused(calls, config.num_hidden_layers)
    assert all(k["attn_mask"] is not None and k["attn_mask"].dtype == mask.dtype for k in calls["dense"])
    close("logits", out, ref)


def test_llama_gqa_does_not_repeat_kv(device, monkeypatch):
    """K/V reach the kernel with Hkv heads (grouped-query attention without copies)."""
    require_fused(device, dtype=torch.float32, has_mask=True)
    config = llama_config()
    _, ours = twin(transformers.LlamaForCausalLM, config, device)
    shapes = []
    real = api.attention
    monkeypatch.setattr(api, "attention",
                        lambda q, k, v, **kw: shapes.append((q.shape, k.shape)) or real(q, k, v, **kw))
    with torch.no_grad():
        ours(torch.randint(0, 128, (2, 7)).to(device))
    assert shapes and all(q[1] == 4 and k[1] == 2 for q, k in shapes)


def test_llama_packed_sequences_use_varlen(device, calls):
    """Padding-free batch: three sequences in one row, position_ids restarting. Same logits as sdpa
    (whose mask is block-diagonal) and as running each sequence alone; fastattn runs varlen."""
    require_fused(device, dtype=torch.float32, varlen=True)
    config = llama_config()
    sdpa, ours = twin(transformers.LlamaForCausalLM, config, device)
    lengths = [5, 3, 6]
    ids = torch.randint(0, 128, (1, sum(lengths))).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    sdpa.train(), ours.train()
    ref = sdpa(ids, position_ids=pos, labels=ids, use_cache=False)
    out = ours(ids, position_ids=pos, labels=ids, use_cache=False)
    assert_fused(calls, config.num_hidden_layers)
    assert len(calls["varlen"]) == config.num_hidden_layers and not calls["dense"]
    close("packed logits", out.logits, ref.logits)
    start = 0
    with torch.no_grad():
        for n in lengths:
            alone = sdpa(ids[:, start:start + n], use_cache=False).logits
            close(f"sequence at {start}", out.logits[:, start:start + n], alone)
            start += n
    ref.loss.backward()
    out.loss.backward()
    compare_grads(sdpa, ours)


def test_llama_flash_style_cu_seqlens_kwargs(device, calls):
    """cu_seq_lens_q/k + max_length_q/k (DataCollatorWithFlattening(return_flash_attn_kwargs=True))."""
    require_fused(device, dtype=torch.float32, varlen=True)
    config = llama_config()
    sdpa, ours = twin(transformers.LlamaForCausalLM, config, device)
    lengths = [4, 7]
    ids = torch.randint(0, 128, (1, 11)).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=device)
    with torch.no_grad():
        ref = sdpa(ids, position_ids=pos, use_cache=False).logits
        out = ours(ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                   max_length_k=7).logits
    assert len(calls["varlen"]) == config.num_hidden_layers
    close("logits", out, ref)


def test_llama_sliding_window_mask_stays_dense(device, calls):
    """A packed row whose mask is not plain block-diagonal (here: a sliding window) keeps the dense
    masked path, which is always right."""
    require_fused(device, dtype=torch.float32, has_mask=True)
    config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=3)
    sdpa, ours = twin(transformers.MistralForCausalLM, config, device)
    ids = torch.randint(0, 128, (1, 12)).to(device)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]], device=device)
    with torch.no_grad():
        ref, out = sdpa(ids, position_ids=pos, use_cache=False).logits, ours(ids, position_ids=pos,
                                                                              use_cache=False).logits
    assert not calls["varlen"] and len(calls["dense"]) == 1
    close("logits", out, ref)


def test_llama_generate_with_cache(device, calls):
    require_fused(device, dtype=torch.float32, has_mask=True)
    config = llama_config()
    sdpa, ours = twin(transformers.LlamaForCausalLM, config, device)
    ids = torch.randint(0, 128, (2, 6)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as for generation
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref, out = sdpa.generate(ids, **kw), ours.generate(ids, **kw)
    assert torch.equal(out, ref)
    assert "reference" not in calls["backends"] and len(calls["backends"]) == 6 * config.num_hidden_layers


def test_llama_dropout_in_training(device, calls):
    require_fused(device, dtype=torch.float32, dropout=True)
    config = llama_config(attention_dropout=0.5)
    sdpa, ours = twin(transformers.LlamaForCausalLM, config, device)
    ids = torch.randint(0, 128, (2, 9)).to(device)
    ours.eval(), sdpa.eval()
    with torch.no_grad():
        e1, e2, r = ours(ids).logits, ours(ids).logits, sdpa(ids).logits
    assert torch.equal(e1, e2)
    close("eval logits", e1, r)
    assert all(k["dropout_p"] == 0.0 for k in calls["dense"])
    calls["dense"].clear()
    ours.train()
    t1, t2 = ours(ids).logits, ours(ids).logits
    assert all(k["dropout_p"] == 0.5 for k in calls["dense"]) and len(calls["dense"]) == 4
    assert not torch.allclose(t1, e1) and not torch.allclose(t1, t2)
    t1.sum().backward()


def test_from_pretrained_with_fastattn(tmp_path, device, calls):
    require_fused(device, dtype=torch.float32, has_mask=True)
    config = llama_config()
    sdpa, _ = twin(transformers.LlamaForCausalLM, config, device)
    sdpa.save_pretrained(tmp_path)
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="fastattn").to(device)
    assert ours.config._attn_implementation == "fastattn"
    ids = torch.randint(0, 128, (2, 8)).to(device)
    with torch.no_grad():
        close("logits", ours(ids).logits, sdpa(ids).logits)
    assert_fused(calls, config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------
# The function itself: position_bias and clear errors
# ---------------------------------------------------------------------------------------------
class _Layer(torch.nn.Module):
    is_causal = False


def test_position_bias_folded_into_the_mask():
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 5) < 0.7
    mask[..., 0] = True
    out, w = fhf.attention_forward(_Layer(), q, k, v, mask, position_bias=bias)
    assert w is None and out.shape == (2, 5, 4, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~mask, float("-inf")))
    close("out", out, ref.transpose(1, 2), 1e-10, 1e-10)
    with pytest.raises(ValueError, match="does not compute gradients for position_bias"):
        fhf.attention_forward(_Layer(), q, k, v, mask, position_bias=bias.clone().requires_grad_())


def test_softcap_and_sinks_go_to_the_kernel():
    """Gemma 2's softcap and GPT-OSS's s_aux (one logit per query head) reach fastattn.attention natively."""
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(2, dtype=torch.float64)
    out, _ = fhf.attention_forward(_Layer(), q, k, v, None, softcap=3.0, s_aux=sinks)
    from fastattn.reference import attention_reference

    close("out", out, attention_reference(q, k, v, softcap=3.0, sinks=sinks).transpose(1, 2), 1e-10, 1e-10)


def test_unsupported_features_raise():
    q = k = v = torch.randn(1, 2, 3, 4)
    with pytest.warns(UserWarning, match="output_attentions"):
        fhf.attention_forward(_Layer(), q, k, v, None, output_attentions=True)
    with pytest.raises(ValueError, match="multiple of the number of k/v heads"):
        fhf.attention_forward(_Layer(), torch.randn(1, 3, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                              None)


# ---------------------------------------------------------------------------------------------
# Decoders that need the variants: sliding windows, soft-capping, sinks (against "eager")
# ---------------------------------------------------------------------------------------------
WINDOW = 5  # shorter than the sequences below, so the window matters


def decoder(family: str):
    """(model class, tiny config) of a decoder family, built locally (no download)."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    alternating = ["sliding_attention", "full_attention"]
    return {
        "llama": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(**common)),
        "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(**common, sliding_window=WINDOW)),
        "qwen2": lambda: (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
        "gemma2": lambda: (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **common, sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=30.0)),
        "gemma3": lambda: (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            **common, sliding_window=WINDOW, layer_types=alternating)),
        "gpt_oss": lambda: (transformers.GptOssForCausalLM, transformers.GptOssConfig(
            **dict(common, intermediate_size=64), num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
            layer_types=alternating)),
    }[family]()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt_oss"])
def test_decoders_match_eager_without_materialising_masks(family, device, calls):
    """Logits at the real positions of a left-padded batch and greedy generate() tokens (DynamicCache,
    sliding-window layers) equal "eager"'s; every fastattn call got the band natively (causal, the window,
    bottom-right) with at most a (B, 1, 1, Lk) key-padding mask: nothing of size Lq x Lk was built."""
    require_fused(device, dtype=torch.float32, has_mask=True)
    if family == "gpt_oss" and not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no GPT-OSS")
    model_cls, config = decoder(family)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = model_cls(config).to(device).eval()
    with torch.no_grad():  # sinks start at zero: give them values that matter
        for m in eager.modules():
            if isinstance(getattr(m, "sinks", None), torch.nn.Parameter):
                m.sinks.normal_()
    ours = copy.deepcopy(eager)
    switch_to_fastattn(ours)
    ids = torch.randint(1, 128, (2, 12)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ref, out = eager(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    real = mask.bool()
    close("logits at real positions", out[real], ref[real])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))
    assert "reference" not in calls["backends"] and calls["dense"]
    sliding = getattr(config, "sliding_window", None) and (family != "qwen2" or config.use_sliding_window)
    windows = set()
    for k in calls["dense"]:
        m = k.get("attn_mask")
        assert m is None or (m.dim() == 4 and m.shape[1:3] == (1, 1)), f"an Lq x Lk mask was built: {m.shape}"
        if k["q_len"] == 1 and not k.get("causal"):  # one query under plain causal masking: the sdpa mask,
            assert m is None or m.dtype == torch.bool  # (B, 1, 1, Lk) key padding, no band needed
            continue
        assert k.get("causal") and k.get("alignment") == "bottom_right"
        windows.add(tuple(k.get("window_size", (-1, -1))))
        if family == "gemma2":
            assert k.get("softcap") == 5.0
        if family == "gpt_oss":
            assert k.get("sinks") is not None
    assert ((WINDOW - 1, 0) in windows) == bool(sliding), windows


def test_static_cache_generate_matches_eager(device, calls):
    """A static cache: generate() builds the masks ahead of the forward (a band where the queries end at the
    last key, the sdpa mask where the cache's unfilled tail runs past them); tokens equal eager's."""
    require_fused(device, dtype=torch.float32, has_mask=True)
    model_cls, config = decoder("mistral")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = model_cls(config).to(device).eval()
    ours = copy.deepcopy(eager)
    switch_to_fastattn(ours)
    ids = torch.randint(1, 128, (1, 7)).to(device)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))

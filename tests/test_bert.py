"""fastattn.models.bert against transformers' BertForMaskedLM on the same weights.

Parity in float64 against HF's eager attention (tolerances at float64 rounding), and in
float32 against HF's default (sdpa) path; logits at real tokens, loss and every parameter's
gradient, with and without padding, for each attention implementation of our model
(fastattn padding-free, fastattn padded, sdpa, eager). Plus the checkpoint round trips
both ways and the dense_seq_output / empty-label edge cases.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastattn.models import BertConfig, BertForMaskedLM, build_bert
from fastattn.models.bert import pad_packed, unpad_layout

transformers = pytest.importorskip("transformers", reason="transformers is needed for the HF parity tests")

# Tolerances: measured float64 differences are ~1e-15 (logits) and ~1e-13 (gradients); float32 ~1e-6.
PARITY_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}
PARITY_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}

VARIANTS = [("fastattn", True), ("fastattn", False), ("sdpa", True), ("eager", True)]
VARIANT_IDS = ["fastattn-unpad", "fastattn-padded", "sdpa", "eager"]


def tiny_hf(dtype=torch.float64, attn="eager", vocab=97, seed=0, **kw):
    """A random HF BertForMaskedLM with odd sizes (vocab 97, 3 heads of 16, intermediate 80), no dropout."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=80, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **kw)
    cfg._attn_implementation = attn
    model = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():  # HF's init has zero biases and unit LayerNorms: randomise so every term is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)


def make_batch(B=3, N=19, vocab=97, padded=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    if padded:  # row 0 full, the others end early (row 2 very short)
        mask[1, 13:] = 0
        mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.randint(0, 2, (B, N), generator=g)
    labels = torch.where(torch.rand(B, N, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    labels[0, 0] = ids[0, 0]  # at least one label
    return ids, mask, types, labels


def assert_close(ours, theirs, dtype, what):
    torch.testing.assert_close(ours, theirs, atol=PARITY_ATOL[dtype], rtol=PARITY_RTOL[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype,hf_attn", [(torch.float64, "eager"), (torch.float32, "sdpa")], ids=["f64-eager", "f32-sdpa"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "full"])
@pytest.mark.parametrize("attn,unpad", VARIANTS, ids=VARIANT_IDS)
def test_parity_with_transformers(attn, unpad, padded, dtype, hf_attn):
    hf = tiny_hf(dtype, hf_attn)
    ours = BertForMaskedLM.from_hf(hf, attn_implementation=attn, unpad=unpad).to(dtype)
    ids, mask, types, labels = make_batch(padded=padded)
    real = mask.bool()

    hf.eval(), ours.eval()
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        b = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert b.logits.shape == a.logits.shape
    assert_close(b.logits[real], a.logits[real], dtype, "logits at real tokens")
    assert_close(b.loss, a.loss, dtype, "eval loss")

    # training mode (dropout 0): our MLM head runs only on the labelled positions
    hf.train(), ours.train()
    a = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    n = int((labels != -100).sum())
    assert b.masked_logits.shape == (n, hf.config.vocab_size)
    with pytest.raises(RuntimeError, match="masked_logits"):
        b.logits  # no (B, N, V) logits in this mode: an (M, V) tensor is never handed out as them
    flat = a.logits.reshape(-1, a.logits.shape[-1])
    assert_close(b.masked_logits, flat[b.masked_positions], dtype, "dense_seq_output logits")
    assert_close(b.loss, a.loss, dtype, "train loss")
    a.loss.backward()
    b.loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, theirs[name].grad, dtype, f"grad of {name}")


def test_position_ids_and_default_token_types():
    hf = tiny_hf()
    ours = BertForMaskedLM.from_hf(hf).double().eval()
    hf.eval()
    ids, mask, _, _ = make_batch()
    pos = torch.arange(3, 22).expand(3, -1)  # shifted positions
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, position_ids=pos).logits
        b = ours(ids, attention_mask=mask, position_ids=pos).logits
    assert_close(b[mask.bool()], a[mask.bool()], torch.float64, "logits with position_ids")


def test_padding_free_path_equals_padded_path_and_zero_pads():
    torch.manual_seed(0)
    model = build_bert("tiny", "fastattn", vocab_size=101, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0).double().eval()
    ids, mask, types, _ = make_batch(vocab=101)
    unpadded = model.bert(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    model.config.unpad = False
    padded = model.bert(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    assert_close(unpadded[real], padded[real], torch.float64, "hidden at real tokens")
    assert torch.all(unpadded[~real] == 0), "padding positions of the padding-free path are zeros"


def test_unpad_layout_roundtrip():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    layout = unpad_layout(mask)
    assert layout.cu_seqlens.tolist() == [0, 3, 4, 8] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_seqlen == 4
    x = torch.randn(3, 4, 5)
    packed = x.reshape(12, 5)[layout.indices]  # (T, C)
    back = pad_packed(packed, layout)
    assert torch.equal(back[mask.bool()], x[mask.bool()]) and torch.all(back[~mask.bool()] == 0)


@pytest.mark.parametrize("attn", ["fastattn", "sdpa", "eager"])
def test_same_weights_same_result_across_attention(attn):
    """build_bert with one seed gives the same weights for every attention choice, and equal losses."""
    ids, mask, _, labels = make_batch(vocab=101)
    ref = build_bert("tiny", "eager", seed=3, vocab_size=101).double().eval()
    model = build_bert("tiny", attn, seed=3, vocab_size=101).double().eval()
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        assert_close(model(ids, mask, labels=labels).loss, ref(ids, mask, labels=labels).loss, torch.float64, "loss")


def test_no_labelled_token_gives_zero_loss_not_nan():
    model = build_bert("tiny", "fastattn", seed=0, vocab_size=101).train()
    ids, mask, _, _ = make_batch(vocab=101)
    labels = torch.full_like(ids, -100)
    for reduction in ("mean", "sum"):
        out = model(ids, attention_mask=mask, labels=labels, loss_reduction=reduction)
        assert out.loss.item() == 0.0 and int(out.num_masked) == 0
        out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sum_reduction_is_mean_times_count():
    model = build_bert("tiny", "fastattn", seed=0, vocab_size=101, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0).double().train()
    ids, mask, _, labels = make_batch(vocab=101)
    mean = model(ids, mask, labels=labels).loss
    total = model(ids, mask, labels=labels, loss_reduction="sum")
    assert_close(total.loss, mean * (labels != -100).sum(), torch.float64, "sum loss")


def test_tied_embeddings():
    model = build_bert("tiny", seed=0, vocab_size=101)
    names = [n for n, _ in model.named_parameters()]
    assert "cls.predictions.bias" in names and not any("decoder" in n for n in names)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[7] += 1.0
    h = torch.randn(2, 128)
    expected = torch.nn.functional.linear(model.cls.predictions.transform(h), model.bert.embeddings.word_embeddings.weight,
                                          model.cls.predictions.bias)
    torch.testing.assert_close(model.cls(h), expected)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = build_bert("tiny", seed=5, vocab_size=101, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():
        ours.cls.predictions.bias.normal_()
    ours.save_pretrained(str(tmp_path))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    ours.eval()
    ids, mask, types, labels = make_batch(vocab=101)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        b = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert_close(b.logits[mask.bool()], a.logits[mask.bool()], torch.float32, "logits after save_pretrained")
    assert_close(b.loss, a.loss, torch.float32, "loss after save_pretrained")


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_from_pretrained_reads_transformers_folder(tmp_path, safe):
    hf = tiny_hf(torch.float32, "eager", vocab=101).eval()
    hf.save_pretrained(str(tmp_path), safe_serialization=safe) if not safe else hf.save_pretrained(str(tmp_path))
    if not safe and not os.path.isfile(tmp_path / "pytorch_model.bin"):  # transformers 5 writes safetensors only
        from safetensors.torch import load_file

        torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
        os.remove(tmp_path / "model.safetensors")
    ours = BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    ids, mask, types, labels = make_batch(vocab=101)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        b = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert_close(b.logits[mask.bool()], a.logits[mask.bool()], torch.float32, "logits after from_pretrained")


def test_round_trip_preserves_every_tensor(tmp_path):
    ours = build_bert("tiny", seed=2, vocab_size=101)
    ours.save_pretrained(str(tmp_path / "a"))
    again = BertForMaskedLM.from_pretrained(str(tmp_path / "a"))
    for (n, p), (_, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
    assert again.config == ours.config
    hf = ours.to_hf()
    back = BertForMaskedLM.from_hf(hf)
    for (n, p), (_, q) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n


def test_config_from_hf_to_hf():
    hf_cfg = transformers.BertConfig(vocab_size=1234, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=200, hidden_act="gelu_new", layer_norm_eps=1e-7)
    cfg = BertConfig.from_hf(hf_cfg)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_act, cfg.layer_norm_eps) == \
        (1234, 96, 3, "gelu_new", 1e-7)
    back = cfg.to_hf()
    for k in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "layer_norm_eps"):
        assert getattr(back, k) == getattr(hf_cfg, k)
    assert BertConfig() == BertConfig.from_hf(transformers.BertConfig()), "same defaults as HF"


def test_bad_inputs_raise_clear_errors(tmp_path):
    model = build_bert("tiny", seed=0, vocab_size=101)
    ids, mask, _, labels = make_batch(vocab=101)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:2])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 600, dtype=torch.long))
    with pytest.raises(ValueError, match="attn_implementation"):
        BertConfig(attn_implementation="flash")
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertForMaskedLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        BertForMaskedLM.from_pretrained(str(tmp_path))


def test_mlm_label_at_a_padding_position_is_refused():
    """The padding-free encoder has no hidden state at padding positions: a label there cannot give
    transformers' loss, so it is refused instead of silently adding log(V) for each such label."""
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64))
    ids = torch.randint(5, 50, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 2] = ids[0, 2]
    model(ids, attention_mask=mask, labels=labels)  # real positions only: fine
    labels[1, 7] = ids[1, 7]
    with pytest.raises(ValueError, match="at padding positions"):
        model(ids, attention_mask=mask, labels=labels)

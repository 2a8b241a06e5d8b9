"""BERT task heads against transformers on the same weights: outputs, losses and every gradient, padded
batches, each attention path; checkpoints both ways; what the padding-free heads refuse.

float64 with transformers' eager attention: measured differences ~1e-15 (outputs), ~1e-13 (gradients).
"""
from __future__ import annotations

import pytest
import torch

from fastattn.models.bert import (BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                                  BertForTokenClassification)

transformers = pytest.importorskip("transformers", reason="transformers is needed for the HF parity tests")

ATOL, RTOL = 1e-10, 1e-10
VARIANTS = [("fastattn", True), ("fastattn", False), ("sdpa", True)]
VARIANT_IDS = ["fastattn-unpad", "fastattn-padded", "sdpa"]
HEADS = {"qa": (BertForQuestionAnswering, 2), "cls": (BertForSequenceClassification, 3),
         "tok": (BertForTokenClassification, 5)}


def tiny_hf(head: str, num_labels: int, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=80, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=num_labels, **kw)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, HEADS[head][0].hf_class)(cfg)
    with torch.no_grad():  # randomise zero biases / unit LayerNorms so that every term is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.double()


def batch(B=3, N=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 97, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, 13:] = 0  # right padding; row 2 very short
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.randint(0, 2, (B, N), generator=g)
    return ids, mask, types


def close(ours, theirs, what):
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def same_grads(ours, hf):
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, theirs[name].grad, f"grad {name}")


def ours_from(hf, head, attn, unpad):
    return HEADS[head][0].from_hf(hf, attn_implementation=attn, unpad=unpad).double()


@pytest.mark.parametrize("attn,unpad", VARIANTS, ids=VARIANT_IDS)
def test_question_answering(attn, unpad):
    hf = tiny_hf("qa", 2)
    ours = ours_from(hf, "qa", attn, unpad)
    ids, mask, types = batch()
    real = mask.bool()
    starts = torch.tensor([5, 2, 0])  # row 2: the [CLS] position, as for an unanswerable question
    ends = torch.tensor([9, 40, 3])  # 40 > N: clamped to N and ignored, as transformers does
    a = hf(ids, attention_mask=mask, token_type_ids=types, start_positions=starts, end_positions=ends)
    b = ours(ids, attention_mask=mask, token_type_ids=types, start_positions=starts, end_positions=ends)
    close(b.start_logits[real], a.start_logits[real], "start logits at real tokens")
    close(b.end_logits[real], a.end_logits[real], "end logits at real tokens")
    if attn == "fastattn" and unpad:
        # padding positions are -inf: the span softmax is over the real tokens; transformers' over every position
        assert torch.isneginf(b.start_logits[~real]).all() and torch.isneginf(b.end_logits[~real]).all()
        n = ids.shape[1]
        theirs = (torch.nn.functional.cross_entropy(a.start_logits.masked_fill(~real, float("-inf")),
                                                    starts.clamp(0, n), ignore_index=n) +
                  torch.nn.functional.cross_entropy(a.end_logits.masked_fill(~real, float("-inf")),
                                                    ends.clamp(0, n), ignore_index=n)) / 2
    else:
        close(b.start_logits, a.start_logits, "start logits everywhere (padded encoder)")
        theirs = a.loss
    close(b.loss, theirs, "loss")
    theirs.backward()
    b.loss.backward()
    same_grads(ours, hf)


@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression",
                                     "regression1"])
@pytest.mark.parametrize("attn,unpad", VARIANTS, ids=VARIANT_IDS)
def test_sequence_classification(attn, unpad, problem):
    num_labels = 1 if problem == "regression1" else 3
    kind = "regression" if problem == "regression1" else problem
    hf = tiny_hf("cls", num_labels, problem_type=None if problem == "regression1" else kind)
    ours = ours_from(hf, "cls", attn, unpad)
    ids, mask, types = batch()
    g = torch.Generator().manual_seed(3)
    labels = {"single_label_classification": torch.tensor([2, 0, 1]),
              "multi_label_classification": (torch.rand(3, 3, generator=g) < 0.5).double(),
              "regression": torch.randn(3, 3, generator=g, dtype=torch.float64),
              "regression1": torch.randn(3, generator=g, dtype=torch.float64)}[problem]
    a = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert ours.problem_type(labels) == kind
    close(b.logits, a.logits, "logits")
    close(b.loss, a.loss, "loss")
    a.loss.backward()
    b.loss.backward()
    same_grads(ours, hf)


@pytest.mark.parametrize("attn,unpad", VARIANTS, ids=VARIANT_IDS)
def test_token_classification(attn, unpad):
    hf = tiny_hf("tok", 5)
    ours = ours_from(hf, "tok", attn, unpad)
    ids, mask, types = batch()
    real = mask.bool()
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(4))
    labels[~real] = -100
    labels[0, 3] = -100  # a continuation sub-token
    a = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    close(b.logits[real], a.logits[real], "logits at real tokens")
    close(b.loss, a.loss, "loss")
    a.loss.backward()
    b.loss.backward()
    same_grads(ours, hf)


@pytest.mark.parametrize("head", list(HEADS))
def test_checkpoints_both_ways(head, tmp_path):
    cls, num_labels = HEADS[head]
    hf = tiny_hf(head, num_labels)
    hf.save_pretrained(tmp_path / "hf")
    ours = cls.from_pretrained(str(tmp_path / "hf")).double()
    assert ours.config.num_labels == num_labels
    ours.save_pretrained(str(tmp_path / "ours"))
    back = getattr(transformers, f"AutoModelFor{ {'qa': 'QuestionAnswering', 'cls': 'SequenceClassification', 'tok': 'TokenClassification'}[head]}").from_pretrained(
        str(tmp_path / "ours"), attn_implementation="eager").double()
    assert type(back).__name__ == cls.hf_class
    ids, mask, types = batch()
    with torch.no_grad():
        x = hf.eval()(ids, attention_mask=mask, token_type_ids=types)
        y = back.eval()(ids, attention_mask=mask, token_type_ids=types)
    for name in ("start_logits", "end_logits") if head == "qa" else ("logits",):
        close(getattr(y, name), getattr(x, name), f"{name} after our save_pretrained")


def test_fine_tuning_starts_from_a_pretrained_encoder(tmp_path):
    """A BertForMaskedLM checkpoint loads into every head: the encoder's weights, a fresh head (warned)."""
    mlm = BertForMaskedLM.from_hf(transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=80)))
    mlm.save_pretrained(str(tmp_path))
    for cls, _ in HEADS.values():
        with pytest.warns(UserWarning, match="fresh initialisation"):
            model = cls.from_pretrained(str(tmp_path))
        torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight,
                                   mlm.bert.embeddings.word_embeddings.weight)


def test_padding_free_heads_refuse_targets_at_padding():
    ids, mask, types = batch()
    qa = BertForQuestionAnswering.from_hf(tiny_hf("qa", 2))
    with pytest.raises(ValueError, match="start_positions at padding positions"):
        qa(ids, attention_mask=mask, start_positions=torch.tensor([1, 15, 1]), end_positions=torch.tensor([2, 2, 2]))
    tok = BertForTokenClassification.from_hf(tiny_hf("tok", 5))
    labels = torch.zeros_like(ids)
    with pytest.raises(ValueError, match="at padding positions"):
        tok(ids, attention_mask=mask, labels=labels)
    cls = BertForSequenceClassification.from_hf(tiny_hf("cls", 3))
    left = mask.flip(1)  # left padding: no [CLS] state on the padding-free path
    with pytest.raises(ValueError, match="first token"):
        cls(ids, attention_mask=left)
    with pytest.raises(ValueError, match="num_labels = 2"):
        BertForQuestionAnswering(qa.config.__class__(num_labels=3, hidden_size=48, num_attention_heads=3))

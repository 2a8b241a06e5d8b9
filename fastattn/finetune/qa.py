"""Extractive question answering: SQuAD files, features with a doc stride, span search, EM/F1.

    examples = read_squad("train-v1.1.json")                 # SQuAD v1.1 or v2.0 format
    features = make_features(examples, tok, max_len=384, doc_stride=128)
    preds = predict_answers(features, start_logits, end_logits)  # example id -> answer text ("" = no answer)
    squad_metrics(examples, preds)                           # {"exact": .., "f1": ..}, as the SQuAD script

Long contexts are cut into windows of ``max_len`` tokens, ``doc_stride`` context tokens apart
(BERT's recipe); each window is ``[CLS] question [SEP] context window [SEP]``. An answer outside a
window (or an unanswerable question, SQuAD v2.0) points at [CLS] (position 0) in that window.
"""
from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: List[dict] = field(default_factory=list)  # [{"text": .., "answer_start": char offset}]; [] = none


@dataclass
class QAFeature:
    """One window of one example, as the model sees it."""
    example_id: str
    input_ids: List[int]
    token_type_ids: List[int]
    offsets: List[Optional[tuple]]  # context character span of each token (None: question/special token)
    start_position: int = 0  # answer tokens in this window; 0, 0 ([CLS]) when not inside it
    end_position: int = 0


def read_squad(path: str) -> List[QAExample]:
    """SQuAD v1.1 / v2.0 JSON: data[].paragraphs[].qas[] (``is_impossible`` questions get no answer)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"]
    out = []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [] if qa.get("is_impossible") else [
                    {"text": a["text"], "answer_start": int(a["answer_start"])} for a in qa["answers"]]
                out.append(QAExample(str(qa["id"]), qa["question"], para["context"], answers))
    return out


def write_squad(examples: Iterable[QAExample], path: str, version: str = "v2.0") -> None:
    """The inverse of read_squad (one paragraph per example)."""
    paragraphs = [{"context": e.context, "qas": [{"id": e.id, "question": e.question, "answers": e.answers,
                                                   "is_impossible": not e.answers}]} for e in examples]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"version": version, "data": [{"title": "fastattn", "paragraphs": paragraphs}]}, f)


def _ids(tok, name: str) -> int:
    i = tok.token_to_id(name)
    if i is None:
        raise ValueError(f"the tokenizer has no {name} token")
    return i


def make_features(examples: List[QAExample], tok, max_len: int = 384, doc_stride: int = 128,
                  max_question_len: int = 64) -> List[QAFeature]:
    """Windows over each context (``tok``: a ``tokenizers.Tokenizer``; offsets come from it)."""
    cls_id, sep_id = _ids(tok, "[CLS]"), _ids(tok, "[SEP]")
    features = []
    questions = tok.encode_batch([e.question for e in examples], add_special_tokens=False)
    contexts = tok.encode_batch([e.context for e in examples], add_special_tokens=False)
    for e, q, c in zip(examples, questions, contexts):
        q_ids = q.ids[:max_question_len]
        room = max_len - len(q_ids) - 3  # [CLS] q [SEP] ... [SEP]
        if room < 1:
            raise ValueError(f"max_len {max_len} leaves no room for the context after a {len(q_ids)}-token question")
        answer = None
        if e.answers:
            a = e.answers[0]
            answer = (a["answer_start"], a["answer_start"] + len(a["text"]))
        start = 0
        while True:
            stop = min(start + room, len(c.ids))
            ids = [cls_id] + q_ids + [sep_id] + c.ids[start:stop] + [sep_id]
            types = [0] * (len(q_ids) + 2) + [1] * (stop - start + 1)
            offsets = [None] * (len(q_ids) + 2) + list(c.offsets[start:stop]) + [None]
            f = QAFeature(e.id, ids, types, offsets)
            if answer is not None:
                first = len(q_ids) + 2
                tokens = [i for i in range(first, first + stop - start)
                          if offsets[i][0] < answer[1] and offsets[i][1] > answer[0]]  # overlapping the answer
                if tokens and offsets[tokens[0]][0] <= answer[0] and offsets[tokens[-1]][1] >= answer[1]:
                    f.start_position, f.end_position = tokens[0], tokens[-1]
            features.append(f)
            if stop >= len(c.ids):
                break
            start += doc_stride
    return features


def collate(features: List[QAFeature], pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-padded (B, N) tensors of a list of features (N = the longest)."""
    n = max(len(f.input_ids) for f in features)
    ids = torch.full((len(features), n), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, :len(f.input_ids)] = torch.tensor(f.input_ids)
        types[i, :len(f.token_type_ids)] = torch.tensor(f.token_type_ids)
        mask[i, :len(f.input_ids)] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
            "start_positions": torch.tensor([f.start_position for f in features]),
            "end_positions": torch.tensor([f.end_position for f in features])}


def best_spans(feature: QAFeature, start_logits: torch.Tensor, end_logits: torch.Tensor, n_best: int = 20,
               max_answer_len: int = 30) -> List[tuple]:
    """(score, char_start, char_end) of the n_best context spans of one window, best first: the top
    ``n_best`` starts x top ``n_best`` ends with start <= end < start + max_answer_len, both in the context."""
    k = min(n_best, len(feature.input_ids))
    starts = torch.topk(start_logits[:len(feature.input_ids)], k).indices.tolist()
    ends = torch.topk(end_logits[:len(feature.input_ids)], k).indices.tolist()
    spans = []
    for s in starts:
        for e in ends:
            if feature.offsets[s] is None or feature.offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                continue
            spans.append((float(start_logits[s] + end_logits[e]), feature.offsets[s][0], feature.offsets[e][1]))
    spans.sort(key=lambda x: -x[0])
    return spans[:n_best]


def predict_answers(examples: List[QAExample], features: List[QAFeature], start_logits: torch.Tensor,
                    end_logits: torch.Tensor, n_best: int = 20, max_answer_len: int = 30,
                    null_threshold: Optional[float] = None) -> Dict[str, dict]:
    """Example id -> {"text", "score", "start", "end"} from the logits (F, N) of its windows: the best span
    over all windows. With ``null_threshold`` (SQuAD v2.0) the answer is "" when the best [CLS] score
    (start + end logit at position 0) beats the best span's by more than the threshold."""
    contexts = {e.id: e.context for e in examples}
    best: Dict[str, dict] = {}
    null: Dict[str, float] = collections.defaultdict(lambda: float("-inf"))
    for i, f in enumerate(features):
        null[f.example_id] = max(null[f.example_id], float(start_logits[i, 0] + end_logits[i, 0]))
        for score, a, b in best_spans(f, start_logits[i], end_logits[i], n_best, max_answer_len)[:1]:
            if f.example_id not in best or score > best[f.example_id]["score"]:
                best[f.example_id] = {"text": contexts[f.example_id][a:b], "score": score, "start": a, "end": b}
    out = {}
    for ex_id in contexts:
        pred = best.get(ex_id, {"text": "", "score": float("-inf"), "start": 0, "end": 0})
        if null_threshold is not None and null[ex_id] - pred["score"] > null_threshold:
            pred = {"text": "", "score": null[ex_id], "start": 0, "end": 0}
        out[ex_id] = pred
    return out


# ----------------------------------------------------------------------------------------------
# SQuAD's evaluation (the official script's normalisation, exact match and token F1)
# ----------------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:  # v2.0: an empty answer scores 1 only against an empty answer
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(examples: List[QAExample], predictions: Dict[str, object]) -> dict:
    """Mean exact match and F1 (in %) over the examples, each the max over its gold answers."""
    em = f1 = 0.0
    for e in examples:
        pred = predictions.get(e.id, "")
        pred = pred["text"] if isinstance(pred, dict) else pred
        golds = [a["text"] for a in e.answers] or [""]
        em += max(exact_match(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    n = max(len(examples), 1)
    return {"exact": 100.0 * em / n, "f1": 100.0 * f1 / n, "count": len(examples)}


@torch.no_grad()
def answer(question: str, context: str, model, tokenizer, max_len: int = 384, doc_stride: int = 128,
           n_best: int = 20, max_answer_len: int = 30, batch_size: int = 16) -> dict:
    """The answer to ``question`` in ``context``: {"text", "score", "start", "end"} (character offsets in
    ``context``). Contexts longer than the model are read in windows (``doc_stride``)."""
    model.eval()
    ex = QAExample("q", question, context)
    features = make_features([ex], tokenizer, max_len=max_len, doc_stride=doc_stride)
    device = next(model.parameters()).device
    starts, ends = [], []
    for i in range(0, len(features), batch_size):
        batch = collate(features[i:i + batch_size], _ids(tokenizer, "[PAD]"))
        out = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    token_type_ids=batch["token_type_ids"].to(device))
        starts.append(out.start_logits.float().cpu())
        ends.append(out.end_logits.float().cpu())
    n = max(x.shape[1] for x in starts)
    pad = lambda xs: torch.cat([torch.nn.functional.pad(x, (0, n - x.shape[1]), value=float("-inf")) for x in xs])
    return predict_answers([ex], features, pad(starts), pad(ends), n_best, max_answer_len)["q"]

"""Classification and tagging data from local files.

* classification: CSV (header row) or JSONL with a text column, an optional second text column
  (sentence pairs) and a label column; labels are class names (mapped to ids in sorted order),
  integers, or floats (regression).
* tagging: CoNLL-style files, one ``token ... label`` line per token (the label is the last
  column), a blank line between sentences; ``-DOCSTART-`` lines are skipped. The label goes on each
  word's first sub-token, -100 on the others, as transformers' token-classification recipe does.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch


@dataclass
class Encoded:
    input_ids: List[int]
    token_type_ids: List[int]
    label: object  # int / float / list of floats (classification), list of ints (tagging)


def read_table(path: str) -> List[dict]:
    """Rows of a .csv (with a header) or .jsonl file."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith((".jsonl", ".json")):
            return [json.loads(line) for line in f if line.strip()]
        return list(csv.DictReader(f))


def label_table(values: Sequence[object]) -> Optional[List[str]]:
    """Class names in id order when the labels are names; None when they are numbers."""
    def number(v):
        try:
            float(v)
            return True
        except (TypeError, ValueError):
            return False
    return None if all(number(v) for v in values) else sorted({str(v) for v in values})


def encode_classification(rows: List[dict], tok, text: str, label: str, text_pair: Optional[str] = None,
                          max_len: int = 128, names: Optional[List[str]] = None, regression: bool = False
                          ) -> List[Encoded]:
    """``[CLS] text [SEP] (pair [SEP])``, truncated to max_len (longest first)."""
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    for name in (text, label, text_pair):
        if name is not None and rows and name not in rows[0]:
            raise ValueError(f"column {name!r} not in the data (columns: {sorted(rows[0])})")
    a = tok.encode_batch([str(r[text]) for r in rows], add_special_tokens=False)
    b = tok.encode_batch([str(r[text_pair]) for r in rows], add_special_tokens=False) if text_pair else None
    out = []
    for i, r in enumerate(rows):
        x, y = a[i].ids, (b[i].ids if b else [])
        room = max_len - 2 - (1 if b else 0)
        while len(x) + len(y) > room:  # longest first
            if len(x) >= len(y):
                x = x[:-1]
            else:
                y = y[:-1]
        ids = [cls_id] + x + [sep_id] + (y + [sep_id] if b else [])
        types = [0] * (len(x) + 2) + [1] * ((len(y) + 1) if b else 0)
        value = r[label]
        lab = float(value) if regression else (names.index(str(value)) if names else int(value))
        out.append(Encoded(ids, types, lab))
    return out


def read_conll(path: str) -> List[tuple]:
    """[(words, labels)] sentences of a CoNLL file."""
    sentences, words, labels = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("-DOCSTART-"):
                if words:
                    sentences.append((words, labels))
                words, labels = [], []
                continue
            cols = line.split()
            words.append(cols[0])
            labels.append(cols[-1])
    if words:
        sentences.append((words, labels))
    return sentences


def encode_tagging(sentences: List[tuple], tok, names: List[str], max_len: int = 128) -> List[Encoded]:
    """First sub-token of each word carries its label, the others -100; truncated to max_len."""
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    out = []
    for words, labels in sentences:
        ids, tags = [cls_id], [-100]
        for word, lab in zip(words, labels):
            pieces = tok.encode(word, add_special_tokens=False).ids or [tok.token_to_id("[UNK]")]
            ids += pieces
            tags += [names.index(lab)] + [-100] * (len(pieces) - 1)
        ids, tags = ids[:max_len - 1] + [sep_id], tags[:max_len - 1] + [-100]
        out.append(Encoded(ids, [0] * len(ids), tags))
    return out


def collate(items: List[Encoded], pad_id: int = 0, tagging: bool = False) -> Dict[str, torch.Tensor]:
    """Right-padded (B, N) input_ids / token_type_ids / attention_mask and the labels."""
    n = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, x in enumerate(items):
        ids[i, :len(x.input_ids)] = torch.tensor(x.input_ids)
        types[i, :len(x.token_type_ids)] = torch.tensor(x.token_type_ids)
        mask[i, :len(x.input_ids)] = 1
    if tagging:
        labels = torch.full((len(items), n), -100, dtype=torch.long)
        for i, x in enumerate(items):
            labels[i, :len(x.label)] = torch.tensor(x.label)
    else:
        labels = torch.tensor([x.label for x in items])
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


def classification_metrics(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> dict:
    """Accuracy and macro-F1 (in %) of integer predictions (positions with gold -100 left out)."""
    keep = gold != -100
    pred, gold = pred[keep], gold[keep]
    f1s = []
    for c in range(num_labels):
        tp = float(((pred == c) & (gold == c)).sum())
        fp, fn = float(((pred == c) & (gold != c)).sum()), float(((pred != c) & (gold == c)).sum())
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": 100.0 * float((pred == gold).float().mean()) if gold.numel() else 0.0,
            "macro_f1": 100.0 * sum(f1s) / max(len(f1s), 1), "count": int(gold.numel())}

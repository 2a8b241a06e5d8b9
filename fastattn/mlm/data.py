"""Token sequences for MLM and the deterministic order they are read in.

Two ways to cut a corpus into sequences of at most ``max_seq_len`` tokens:
  * "pack": documents are concatenated ([SEP] between them) and cut into full-length
    ``[CLS] ... [SEP]`` windows, so batches carry no padding (MosaicBERT, RoBERTa's
    FULL-SENTENCES); the remainder shorter than a window is dropped.
  * "line": one paragraph (line) per sequence, truncated; batches are padded to their
    longest sequence, which is where the padding-free attention path pays off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from .masking import MaskingConfig, mask_tokens
from .tokenizer import TokenizerInfo, encode

PACKING_MODES = ("pack", "line")


def build_sequences(tok, docs: Sequence[str], info: TokenizerInfo, max_seq_len: int, mode: str) -> List[torch.Tensor]:
    """Token sequences (each a 1-D int64 tensor starting with [CLS] and ending with [SEP])."""
    if mode not in PACKING_MODES:
        raise ValueError(f"packing mode must be one of {PACKING_MODES}, got {mode!r}")
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must be at least 3 ([CLS] token [SEP]), got {max_seq_len}")
    body = max_seq_len - 2  # room left by [CLS] and [SEP]
    seqs = []
    if mode == "pack":
        stream: List[int] = []
        for ids in encode(tok, docs):
            if ids:
                stream.extend(ids)
                stream.append(info.sep_id)  # document boundary
        for start in range(0, len(stream) - body + 1, body):
            seqs.append(torch.tensor([info.cls_id, *stream[start:start + body], info.sep_id]))
    else:
        lines = [ln for d in docs for ln in d.split("\n") if ln.strip()]
        for ids in encode(tok, lines):
            if ids:
                seqs.append(torch.tensor([info.cls_id, *ids[:body], info.sep_id]))
    if not seqs:
        raise ValueError(f"the corpus gives no sequence of length {max_seq_len} in {mode!r} mode "
                         f"(too little text; try --packing line or a shorter --max-seq-len)")
    return seqs


@dataclass
class Batch:
    """An MLM batch: all (B, N) int64 except ``attention_mask`` (B, N) int64 of 0/1."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels)))

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    @property
    def num_masked(self) -> int:
        return int((self.labels != -100).sum())


def collate(seqs: Sequence[torch.Tensor], info: TokenizerInfo, masking: MaskingConfig,
            seeds: Sequence[int]) -> Batch:
    """Mask each sequence with its own seed, then pad to the longest.

    One seed per sequence (a function of its place in the run), so a sample is masked the
    same way whatever batch, micro-batch or process it lands in. Padding and special
    tokens are never masked.
    """
    if len(seeds) != len(seqs):
        raise ValueError(f"collate needs one seed per sequence, got {len(seeds)} seeds for {len(seqs)} sequences")
    N = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), N), info.pad_id, dtype=torch.long)  # (B, N)
    labels = torch.full((len(seqs), N), -100, dtype=torch.long)
    attn = torch.zeros((len(seqs), N), dtype=torch.long)
    ordinary = torch.nonzero(~torch.isin(torch.arange(info.vocab_size), info.special_ids)).flatten()
    for i, (s, seed) in enumerate(zip(seqs, seeds)):
        row = s[None, :]  # (1, n)
        row_ids, row_labels = mask_tokens(row, eligible=~torch.isin(row, info.special_ids), mask_id=info.mask_id,
                                          random_ids=ordinary, config=masking,
                                          generator=torch.Generator().manual_seed(seed),
                                          continues_word=info.continues_word)
        ids[i, :len(s)], labels[i, :len(s)], attn[i, :len(s)] = row_ids[0], row_labels[0], 1
    return Batch(ids, attn, labels)


class SampleOrder:
    """Which sequence is the i-th sample seen in training: an endless series of shuffled epochs.

    Sample i is ``perm(epoch = i // n)[i % n]`` with the permutation drawn from ``seed + epoch``,
    so any position of the run (a resumed run, another rank) is found without replaying it.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, i: int) -> int:
        epoch = i // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[i % self.n]

    def epoch_of(self, i: int) -> float:
        return i / self.n


def eval_batches(seqs: Sequence[torch.Tensor], info: TokenizerInfo, batch_size: int, seed: int = 1234,
                 mask_prob: float = 0.15) -> List[Batch]:
    """The held-out batches, masked once at ``mask_prob`` (BERT's 15%) with a fixed seed, whatever
    the training rate, so eval losses of runs with different settings compare."""
    masking = MaskingConfig(mask_prob=mask_prob)
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        batches.append(collate(chunk, info, masking, [seed * 1_000_003 + start + j for j in range(len(chunk))]))
    return batches


def unigram_cross_entropy(train_seqs: Sequence[torch.Tensor], batches: Sequence[Batch], info: TokenizerInfo) -> float:
    """Cross-entropy (nats) of predicting every masked token by its training-set frequency
    (add-one smoothed): the loss a model ignoring context would reach. Special tokens are not counted."""
    counts = torch.zeros(info.vocab_size, dtype=torch.float64)
    for s in train_seqs:
        counts += torch.bincount(s, minlength=info.vocab_size).double()
    counts[info.special_ids] = 0  # never a target
    counts += 1
    log_p = (counts / counts.sum()).log()
    total, n = 0.0, 0
    for b in batches:
        targets = b.labels[b.labels != -100]
        total -= float(log_p[targets].sum())
        n += targets.numel()
    return total / max(n, 1)

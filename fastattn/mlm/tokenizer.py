"""WordPiece tokenizer for MLM: trained with HuggingFace ``tokenizers`` (cached) or loaded.

BERT-uncased conventions: lower-casing and accent stripping (``BertNormalizer``),
whitespace/punctuation pre-splitting, ``##`` continuation prefix, and the five
special tokens with [PAD] = 0 (BERT's ``pad_token_id``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION_PREFIX = "##"


@dataclass
class TokenizerInfo:
    """The ids and tables the data pipeline and masking need from a tokenizer."""

    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: torch.Tensor  # (S,) int64: ids never masked
    continues_word: torch.Tensor  # (vocab_size,) bool: token is a "##" piece inside a word

    @classmethod
    def from_tokenizer(cls, tok) -> "TokenizerInfo":
        vocab = tok.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the BERT special tokens {missing}")
        size = tok.get_vocab_size()
        continues = torch.zeros(size, dtype=torch.bool)
        for token, i in vocab.items():
            continues[i] = token.startswith(CONTINUATION_PREFIX)
        return cls(vocab_size=size, pad_id=vocab["[PAD]"], cls_id=vocab["[CLS]"], sep_id=vocab["[SEP]"],
                   mask_id=vocab["[MASK]"], special_ids=torch.tensor(sorted(vocab[t] for t in SPECIAL_TOKENS)),
                   continues_word=continues)


def _new_wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=CONTINUATION_PREFIX))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tok


def train_wordpiece(texts: Sequence[str], vocab_size: int, min_frequency: int = 2):
    """A WordPiece tokenizer trained on ``texts`` (special tokens first: [PAD] = 0)."""
    from tokenizers import trainers

    tok = _new_wordpiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix=CONTINUATION_PREFIX, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str):
    """A ``tokenizer.json``, a BERT ``vocab.txt``, or a folder holding either."""
    from tokenizers import Tokenizer, models

    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path!r} does not exist")
    if path.endswith(".json"):
        return Tokenizer.from_file(path)
    tok = _new_wordpiece()  # vocab.txt: one token per line, id = line number
    tok.model = models.WordPiece.from_file(path, unk_token="[UNK]")
    return tok


def get_tokenizer(texts: Sequence[str], cache_dir: str, fingerprint: str, vocab_size: int,
                  path: Optional[str] = None):
    """``path`` loaded if given, else a WordPiece trained on ``texts`` and cached by corpus fingerprint."""
    if path:
        return load_tokenizer(path)
    cached = os.path.join(cache_dir, f"wordpiece-{fingerprint}-{vocab_size}.json")
    if os.path.isfile(cached):
        return load_tokenizer(cached)
    tok = train_wordpiece(texts, vocab_size)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cached}.{os.getpid()}.tmp"
    tok.save(tmp)
    os.replace(tmp, cached)
    return tok


def save_tokenizer(tok, folder: str) -> None:
    """tokenizer.json, vocab.txt and a tokenizer_config.json that ``transformers.AutoTokenizer`` reads."""
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.writelines(token + "\n" for token, _ in vocab)
    config = dict(tokenizer_class="BertTokenizer", do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
                  pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_max_length=512)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def encode(tok, texts: Sequence[str]) -> List[List[int]]:
    """Token ids of each text, without special tokens."""
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

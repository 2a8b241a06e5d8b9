"""BERT encoder and masked-language model whose attention is fastattn.

The module tree and parameter names mirror HuggingFace's ``BertForMaskedLM``
(``bert.embeddings.word_embeddings``, ``bert.encoder.layer.0.attention.self.query``,
``cls.predictions.transform.dense`` ...), so a transformers checkpoint loads with
no renaming table and ``save_pretrained`` writes one transformers loads.

Two ways to skip work, both on by default (``BertConfig.unpad``, ``dense_seq_output``):
  * padding-free: when ``attention_mask`` hides some tokens, they are dropped right
    after the embedding lookup; every layer runs on the packed (T, C) real tokens and
    attention is ``fastattn.varlen_attention`` (as MosaicBERT and ModernBERT do); the
    (B, N, C) shape is restored at the end, zeros at the padding positions.
  * ``dense_seq_output``: in training with labels, the MLM head (whose vocabulary
    projection is a large share of BERT's FLOPs) runs only on the masked positions;
    its ``masked_logits`` are (num_masked, vocab), ``masked_positions`` says which, and
    there are no (B, N, vocab) ``logits`` (reading them raises).

``attn_implementation`` picks the attention of the same model code: "fastattn"
(padded batches through ``fastattn.attention`` when unpadding is off), "sdpa"
(``torch.nn.functional.scaled_dot_product_attention``) or "eager" (explicit softmax,
like HF's eager path). sdpa/eager always run padded.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastattn

ATTN_IMPLEMENTATIONS = ("fastattn", "sdpa", "eager")

# HF activation names -> functions ("gelu" is the exact erf GELU, as in the original BERT).
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# Fields of transformers.BertConfig we read and write (the rest of a config.json is ignored).
_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
              "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "tie_word_embeddings",
              "problem_type", "classifier_dropout")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclass
class BertConfig:
    """BERT hyper-parameters, HF field names and defaults (bert-base-uncased), plus fastattn switches."""

    vocab_size: int = 30522  # WordPiece vocabulary of bert-base-uncased
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # head dim = hidden_size / heads = 64
    intermediate_size: int = 3072  # 4x hidden, the feed-forward width
    hidden_act: str = "gelu"  # exact (erf) GELU
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention weights (inside the fused kernel)
    max_position_embeddings: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # segment A / B
    initializer_range: float = 0.02  # std of the normal init of every weight matrix
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"  # the only kind supported (HF 4.x field)
    tie_word_embeddings: bool = True  # MLM decoder weight = input embedding matrix
    # task heads (HF fields): classes of a classifier / tagger; 2 for question answering (start, end)
    num_labels: int = 2
    problem_type: Optional[str] = None  # "regression" | "single_label_classification" | "multi_label_classification"
    classifier_dropout: Optional[float] = None  # None: hidden_dropout_prob
    id2label: Optional[dict] = None  # class index -> name (written to config.json as transformers does)
    # --- fastattn switches (not HF fields) ---
    attn_implementation: str = "fastattn"  # "fastattn", "sdpa" or "eager"
    unpad: bool = True  # fastattn only: drop padding tokens and run varlen attention on packed tokens
    dense_seq_output: bool = True  # training with labels: MLM head only on the masked positions

    def __post_init__(self):
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                             f"got {self.attn_implementation!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"only position_embedding_type='absolute' is supported, got "
                             f"{self.position_embedding_type!r}")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}  # JSON keys are strings
            self.num_labels = len(self.id2label)
            if self.id2label == {i: f"LABEL_{i}" for i in range(self.num_labels)}:
                self.id2label = None  # transformers' default names: the same config as none given
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if not self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=False is not supported: the MLM decoder reuses the input "
                             "embedding matrix")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def labels(self) -> dict:
        """id2label / label2id as transformers writes them (names LABEL_i by default)."""
        id2label = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        return {"id2label": {str(i): n for i, n in id2label.items()}, "label2id": {n: i for i, n in id2label.items()}}

    def to_dict(self, architecture: str = "BertForMaskedLM") -> dict:
        """The HF config.json fields (fastattn switches left out)."""
        d = {k: getattr(self, k) for k in _HF_FIELDS}
        d.update(self.labels(), model_type="bert", architectures=[architecture])
        return d

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "BertConfig":
        """From a config.json dict (unknown keys ignored); ``overrides`` set fastattn switches or fields."""
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"expected a BERT config (model_type 'bert'), got model_type {d.get('model_type')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> "BertConfig":
        """From a ``transformers.BertConfig``."""
        d = {k: getattr(hf_config, k) for k in (*_HF_FIELDS, "position_embedding_type", "id2label")
             if hasattr(hf_config, k)}
        return cls.from_dict(d, **overrides)

    def to_hf(self):
        """A ``transformers.BertConfig`` with the same fields."""
        from transformers import BertConfig as HFBertConfig

        labels = self.labels()
        return HFBertConfig(**{k: getattr(self, k) for k in _HF_FIELDS},
                            id2label={int(i): n for i, n in labels["id2label"].items()}, label2id=labels["label2id"])


# BERT sizes (Turc et al. 2019 "well-read students" for tiny..small, Devlin et al. 2019 for base/large).
PRESETS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}


def preset_config(preset: str, **overrides) -> BertConfig:
    """``BertConfig`` of a named size with field overrides, e.g. ``preset_config("mini", vocab_size=8192)``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    return BertConfig(**{**PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------
# Padding removal (the varlen layout)
# ---------------------------------------------------------------------------
@dataclass
class PackedLayout:
    """Where the packed real tokens of a padded (B, N) batch came from.

    indices: (T,) int64 flat positions b * N + n of the kept tokens, row-major.
    cu_seqlens: (B + 1,) int32 prefix sums of the per-row token counts.
    max_seqlen: the longest row.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seqlen: int


def unpad_layout(attention_mask: torch.Tensor) -> PackedLayout:
    """Packed layout of the tokens where ``attention_mask`` (B, N) is nonzero.

    Kept tokens must form a prefix or any subset of each row; their order is kept.
    """
    B, N = attention_mask.shape
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1, dtype=torch.int32)  # (B,)
    cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))  # (B + 1,)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()  # (T,)
    return PackedLayout(indices=indices, cu_seqlens=cu, max_seqlen=int(lengths.max()) if B else 0,
                        batch=B, seqlen=N)


def first_tokens(hidden: torch.Tensor, layout: Optional[PackedLayout]) -> torch.Tensor:
    """(B, C) hidden states at position 0 ([CLS]) from (B, N, C), or from packed (T, C) rows: there
    position 0 of row b is packed row cu_seqlens[b], when it is a real token (right padding)."""
    if layout is None:
        return hidden[:, 0]
    first = layout.cu_seqlens[:-1].long()  # (B,) packed row of each row's first kept token
    ok = first < layout.indices.numel()  # False for a row without tokens at the end
    if bool(ok.all()):
        ok = layout.indices[first] == torch.arange(layout.batch, device=first.device) * layout.seqlen
    if not bool(ok.all()):
        raise ValueError("the first token of every row must be a real one (attention_mask[:, 0] == 1): left "
                         "padding leaves no [CLS] state on the padding-free path (set config.unpad=False)")
    return hidden[first]


def refuse_labels_at_padding(labelled: torch.Tensor, attention_mask: Optional[torch.Tensor],
                             layout: Optional[PackedLayout], what: str) -> None:
    """On the padding-free path nothing is computed at padding positions, where transformers' padded model
    predicts from the pad token's hidden state: a target there has no loss to match, so it is refused."""
    if layout is not None and bool((labelled & (attention_mask == 0)).any()):
        raise ValueError(f"{what} at padding positions (attention_mask == 0): the padding-free encoder has no "
                         "hidden state there (set config.unpad=False to train on them)")


def pad_packed(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """(T, C) packed rows -> (B, N, C) with zeros at the dropped positions."""
    out = x.new_zeros(layout.batch * layout.seqlen, x.shape[-1])  # (B*N, C)
    out.index_copy_(0, layout.indices, x)  # in place: one (B*N, C) buffer, not two
    return out.view(layout.batch, layout.seqlen, x.shape[-1])  # (B, N, C)


# ---------------------------------------------------------------------------
# Modules (names as in HF's modeling_bert)
# ---------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    """word + segment + absolute position embeddings, LayerNorm, dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids) -> torch.Tensor:
        """Any shape S of int64 ids (all three the same shape) -> (*S, C)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Q, K, V projections and the attention itself, on padded or packed tokens."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.impl = config.attn_implementation
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], layout: Optional[PackedLayout]):
        """x: (B, N, C) padded (key_mask (B, N) bool or None) or (T, C) packed (layout given)."""
        H, D = self.num_heads, self.head_dim
        p = self.dropout_p if self.training else 0.0
        if layout is not None:  # packed real tokens: one varlen call, no padding anywhere
            q, k, v = (proj(x).view(-1, H, D) for proj in (self.query, self.key, self.value))  # (T, H, D)
            out = fastattn.varlen_attention(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                                            layout.max_seqlen, dropout_p=p)  # (T, H, D)
            return out.reshape(-1, H * D)  # (T, C)
        B, N, _ = x.shape
        q, k, v = (proj(x).view(B, N, H, D).transpose(1, 2) for proj in (self.query, self.key, self.value))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N), True = attend
        if self.impl == "fastattn":
            out = fastattn.attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, N, D)
        elif self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:  # eager: the textbook formula, as HF's eager BERT
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, N, N)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            out = torch.matmul(F.dropout(scores.softmax(dim=-1), p), v)  # (B, H, N, D)
        return out.transpose(1, 2).reshape(B, N, H * D)  # (B, N, C)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): HF's BertSelfOutput / BertOutput."""

    def __init__(self, config: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config, config.hidden_size)

    def forward(self, x, key_mask, layout):
        return self.output(self.self(x, key_mask, layout), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block (original BERT)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config, config.intermediate_size)

    def forward(self, x, key_mask=None, layout=None):
        x = self.attention(x, key_mask, layout)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x, key_mask=None, layout=None):
        for layer in self.layer:
            x = layer(x, key_mask, layout)
        return x


def _init_weights(module: nn.Module, std: float) -> None:
    """HF BERT init: normal(0, initializer_range) weights, zero biases, unit LayerNorm, zero padding row."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass
class BertModelOutput:
    last_hidden_state: torch.Tensor  # (B, N, C); zeros at padding positions on the padding-free path
    pooler_output: Optional[torch.Tensor] = None  # (B, C), with add_pooling_layer


class MaskedLMOutput:
    """loss: mean (or sum, see ``loss_reduction``) cross-entropy over labels != -100; 0 when none.

    logits: (B, N, V). On the padding-free path the logits at padding positions are zeros (HF's
        there are meaningless values: not compared).
    masked_logits, masked_positions: in training with labels and ``dense_seq_output`` (the default)
        the MLM head runs on the labelled positions only: ``masked_logits`` (M, V) holds their logits,
        row r for the flat position ``masked_positions[r]`` = b * N + n. There are no (B, N, V) logits
        then, and reading ``logits`` raises (so that an (M, V) tensor is never mistaken for them).
    num_masked: int64 scalar tensor, the number of labelled tokens (M).
    """

    def __init__(self, loss: Optional[torch.Tensor], logits: Optional[torch.Tensor] = None,
                 num_masked: Optional[torch.Tensor] = None, masked_positions: Optional[torch.Tensor] = None,
                 masked_logits: Optional[torch.Tensor] = None):
        self.loss, self._logits, self.num_masked = loss, logits, num_masked
        self.masked_positions, self.masked_logits = masked_positions, masked_logits

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            raise RuntimeError("no (B, N, V) logits: in training with labels and config.dense_seq_output the MLM "
                               "head ran on the labelled positions only; use .masked_logits (M, V) and "
                               ".masked_positions, or set dense_seq_output=False (or call in eval mode)")
        return self._logits


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token, [CLS])): the sentence vector of the classifier."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, first_token):  # (B, C)
        return self.activation(self.dense(first_token))


class BertModel(nn.Module):
    """BERT encoder. ``forward`` returns ``.last_hidden_state`` (B, N, C) (and ``.pooler_output`` (B, C)
    with ``add_pooling_layer``, which the sequence classifier uses)."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """Hidden states of the tokens that are computed.

        Returns (hidden, layout): on the padding-free path hidden is (T, C) for the kept tokens
        and layout their ``PackedLayout``; otherwise hidden is (B, N, C) and layout None.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor (B, N), got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        B, N = input_ids.shape
        if N > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {N} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} must have input_ids' shape (B, N) = {(B, N)}, got {tuple(t.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(N, device=input_ids.device)
        position_ids = position_ids.expand(B, N)  # (B, N) from (N,), (1, N) or (B, N)

        key_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            key_mask = attention_mask.bool()
        cfg = self.config
        if key_mask is not None and cfg.attn_implementation == "fastattn" and cfg.unpad:
            layout = unpad_layout(key_mask)
            ids, types, pos = (t.flatten()[layout.indices] for t in (input_ids, token_type_ids, position_ids))
            x = self.embeddings(ids, types, pos)  # (T, C)
            return self.encoder(x, None, layout), layout
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, N, C)
        return self.encoder(x, key_mask, None), None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> BertModelOutput:
        hidden, layout = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        pooled = self.pooler(first_tokens(hidden, layout)) if self.pooler is not None else None
        return BertModelOutput(hidden if layout is None else pad_packed(hidden, layout), pooled)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """transform, then the tied decoder ``x @ word_embeddingsᵀ + bias``."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self._embeddings = [word_embeddings]  # a list so the tied weight is not registered twice

    def forward(self, x):
        return F.linear(self.transform(x), self._embeddings[0].weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)

    def forward(self, x):
        return self.predictions(x)


# The head modules of transformers' BERT classes: a checkpoint of one task loads into a model
# of another (e.g. a BertForMaskedLM checkpoint into BertForQuestionAnswering), without them.
_OTHER_HEADS = ("cls.", "qa_outputs.", "classifier.", "bert.pooler.")

# Keys of an HF state dict that carry nothing of ours: tied copies, buffers.
_IGNORED_HF_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                    "bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


class BertPreTrainedModel(nn.Module):
    """What every BERT with a head shares: transformers checkpoint interop, both ways.

    A subclass names its transformers class (``hf_class``) and builds its modules with HF's
    names, so that state dicts map one to one.
    """

    hf_class = "BertForMaskedLM"

    def __init__(self, config: "BertConfig"):
        super().__init__()
        self.config = config

    def _init_weights(self) -> None:
        self.apply(lambda m: _init_weights(m, self.config.initializer_range))

    # ------------------------------------------------------------------
    # HuggingFace interop
    # ------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model, **overrides):
        """A copy of a transformers model of class ``hf_class`` (same weights); ``overrides`` set config fields."""
        model = cls(BertConfig.from_hf(hf_model.config, **overrides))
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    @classmethod
    def from_pretrained(cls, path: str, **overrides):
        """Load a transformers BERT folder: config.json + model.safetensors or pytorch_model.bin (local only)."""
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{path!r} is not a BERT checkpoint folder: no config.json "
                                    f"(only local folders are read, nothing is downloaded)")
        with open(config_file) as f:
            config = BertConfig.from_dict(json.load(f), **overrides)
        st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st):
            from safetensors.torch import load_file

            state = load_file(st)
        elif os.path.isfile(pt):
            state = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path!r}")
        model = cls(config)
        model.load_hf_state_dict(state)
        return model

    def load_hf_state_dict(self, state: dict) -> None:
        """Copy an HF state dict in: the encoder must match; head weights the checkpoint lacks (a task head
        on a pre-trained encoder, as when fine-tuning) keep their fresh initialisation, with a warning, and
        the checkpoint's own heads that this model has not are left out. Raises listing what does not match."""
        own = self.state_dict()
        renamed = {}
        for key, value in state.items():
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if not key.startswith(("bert.", *_OTHER_HEADS)):  # saved from a bare BertModel
                key = "bert." + key
            if key in _IGNORED_HF_KEYS or (key.startswith(_OTHER_HEADS) and key not in own):
                continue
            renamed[key] = value
        missing = sorted(set(own) - set(renamed))
        fresh = [k for k in missing if k.startswith(_OTHER_HEADS)]
        missing = [k for k in missing if k not in fresh]
        unexpected = sorted(set(renamed) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match {type(self).__name__}: missing {missing}, "
                             f"unexpected {unexpected}")
        for key, value in renamed.items():
            if own[key].shape != value.shape:
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(own[key].shape)}")
        if fresh:
            warnings.warn(f"{type(self).__name__}: the checkpoint has no {sorted({k.rsplit('.', 1)[0] for k in fresh})}; "
                          "they keep their fresh initialisation (train them before use)", stacklevel=3)
        self.load_state_dict(renamed, strict=False)

    def save_pretrained(self, path: str) -> None:
        """Write config.json + model.safetensors that transformers' ``hf_class.from_pretrained`` loads."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_dict(self.hf_class), f, indent=2)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    def to_hf(self):
        """The transformers model of class ``hf_class`` with the same weights."""
        import transformers

        hf = getattr(transformers, self.hf_class)(self.config.to_hf())
        missing, unexpected = hf.load_state_dict(self.state_dict(), strict=False)
        left = [k for k in missing if k not in _IGNORED_HF_KEYS]
        if left or unexpected:
            raise RuntimeError(f"state dict mismatch with transformers' BERT: missing {left}, unexpected {unexpected}")
        if hasattr(hf, "tie_weights"):
            hf.tie_weights()
        return hf


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with the masked-language-model head (tied input/output embeddings)."""

    hf_class = "BertForMaskedLM"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self._init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                loss_reduction: str = "mean") -> MaskedLMOutput:
        """input_ids, attention_mask (1 = real token), token_type_ids, labels: (B, N); position_ids (B|1, N).

        labels: target id at the positions to predict, -100 elsewhere. loss_reduction "sum" returns
        the summed cross-entropy (to normalise over several micro-batches), "mean" divides by the
        number of labelled tokens (loss 0, not NaN, when there is none).
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        hidden, layout = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids)
        if labels is not None:
            refuse_labels_at_padding(labels != -100, attention_mask, layout, "labels other than -100")
        if labels is not None and self.training and self.config.dense_seq_output:
            flat = hidden.reshape(-1, hidden.shape[-1])  # (T or B*N, C)
            row_labels = labels.flatten() if layout is None else labels.flatten()[layout.indices]
            rows = torch.nonzero(row_labels != -100, as_tuple=False).flatten()  # (M,)
            logits = self.cls(flat[rows])  # (M, V): the vocabulary projection only where it is needed
            targets = row_labels[rows]
            positions = rows if layout is None else layout.indices[rows]
        else:
            if layout is None:
                logits = self.cls(hidden)  # (B, N, V)
            else:
                logits = self._padded_head(hidden, layout)  # (B, N, V), zeros at padding positions
            if labels is None:
                return MaskedLMOutput(loss=None, logits=logits)
            positions = None
            targets = labels.flatten()
        flat_logits = logits.reshape(-1, logits.shape[-1])  # (M or B*N, V)
        if flat_logits.dtype in (torch.bfloat16, torch.float16):
            flat_logits = flat_logits.float()  # the log-softmax over the vocabulary in float32
        loss_sum = F.cross_entropy(flat_logits, targets, ignore_index=-100, reduction="sum")
        num_masked = (targets != -100).sum()
        loss = loss_sum if loss_reduction == "sum" else loss_sum / num_masked.clamp(min=1)
        if positions is not None:  # dense_seq_output: (M, V) logits of the labelled positions
            return MaskedLMOutput(loss=loss, num_masked=num_masked, masked_positions=positions, masked_logits=logits)
        return MaskedLMOutput(loss=loss, logits=logits, num_masked=num_masked)

    HEAD_CHUNK_ROWS = 256  # packed rows per vocabulary projection on the padding-free path (~30 MiB at V=30522)

    def _padded_head(self, hidden: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """MLM logits (B, N, V) of packed hidden states (T, C), zeros at the padding positions.

        The head runs on chunks of real tokens written straight into the padded output, so the
        logits exist once: a (T, V) block padded afterwards would hold them twice (the largest
        tensor of BERT's inference, ~1 GB at B=32, N=256).
        """
        rows, logits = self.HEAD_CHUNK_ROWS, None
        for start in range(0, max(hidden.shape[0], 1), rows):
            part = self.cls(hidden[start:start + rows])  # (<= rows, V)
            if logits is None:  # the head's dtype (autocast may make it bf16)
                logits = part.new_zeros(layout.batch * layout.seqlen, part.shape[-1])  # (B*N, V)
            logits.index_copy_(0, layout.indices[start:start + rows], part)
        return logits.view(layout.batch, layout.seqlen, -1)  # (B, N, V)

def build_bert(preset: str = "mini", attn: str = "fastattn", *, unpad: bool = True, seed: Optional[int] = None,
               **overrides) -> BertForMaskedLM:
    """A freshly initialised ``BertForMaskedLM`` of a preset size with the chosen attention.

    ``attn`` "fastattn" | "sdpa" | "eager"; ``seed`` makes the initial weights reproducible
    (same seed -> same weights whatever ``attn``); ``overrides`` are BertConfig fields.
    """
    config = preset_config(preset, attn_implementation=attn, unpad=unpad, **overrides)
    if seed is None:
        return BertForMaskedLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForMaskedLM(config)


# The task heads (question answering, sequence and token classification) share this file's encoder.
from .bert_tasks import (BertForQuestionAnswering, BertForSequenceClassification,  # noqa: E402,F401
                         BertForTokenClassification, QuestionAnsweringOutput, SequenceClassifierOutput,
                         TokenClassifierOutput)
from ..finetune.qa import answer  # noqa: E402,F401  (question answering with a BertForQuestionAnswering)

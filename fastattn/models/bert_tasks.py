"""BERT task heads with transformers' names, configs, outputs and losses: extractive question
answering, sentence classification, token tagging.

Each runs the padding-free encoder of ``bert.py`` (real tokens packed, ``varlen_attention``) and
gives, at real positions, the outputs transformers' head gives on the same weights. Where a head
reads padding positions, transformers' padded model has values there and ours has none:
  * question answering: ``start_logits`` / ``end_logits`` are -inf at padding positions, so the span
    softmax (and the loss) runs over the real tokens only; transformers' also counts the padding
    positions' logits. ``config.unpad=False`` runs the padded encoder and gives transformers' loss exactly;
  * token classification: logits are zeros at padding positions (labels there must be -100, as
    transformers' data collators write them);
  * sequence classification reads the first token ([CLS]) only: identical with right padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bert import BertConfig, BertModel, BertPreTrainedModel, first_tokens, pad_packed, refuse_labels_at_padding


@dataclass
class QuestionAnsweringOutput:
    loss: Optional[torch.Tensor]  # mean of the start and end cross-entropies
    start_logits: torch.Tensor  # (B, N)
    end_logits: torch.Tensor  # (B, N)


@dataclass
class SequenceClassifierOutput:
    loss: Optional[torch.Tensor]
    logits: torch.Tensor  # (B, num_labels)


@dataclass
class TokenClassifierOutput:
    loss: Optional[torch.Tensor]
    logits: torch.Tensor  # (B, N, num_labels); zeros at padding positions on the padding-free path


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to float32 for the log-softmax of a loss; other dtypes as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _classifier_dropout(config: BertConfig) -> nn.Dropout:
    return nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None
                      else config.hidden_dropout_prob)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Span extraction: a start and an end logit per token (``qa_outputs``, num_labels = 2)."""

    hf_class = "BertForQuestionAnswering"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"question answering needs num_labels = 2 (start, end), got {config.num_labels}")
        self.bert = BertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self._init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None) -> QuestionAnsweringOutput:
        """input_ids, attention_mask, token_type_ids: (B, N). start/end_positions: (B,) token indices of the
        answer span (clamped to [0, N] as transformers does; N and beyond are ignored by the loss)."""
        hidden, layout = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.qa_outputs(hidden)  # (B, N, 2), or (T, 2) packed
        if layout is not None:  # (a layout exists only when attention_mask hides some positions)
            logits = pad_packed(logits, layout).masked_fill(~attention_mask.bool().unsqueeze(-1), float("-inf"))
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in logits.split(1, dim=-1))  # (B, N) each
        loss = None
        if start_positions is not None and end_positions is not None:
            n = start_logits.shape[1]
            starts, ends = (p.reshape(-1).clamp(0, n) for p in (start_positions, end_positions))  # (B,)
            for name, pos in (("start_positions", starts), ("end_positions", ends)):
                picked = F.one_hot(pos, n + 1)[:, :n].bool()  # (B, N); position n (ignored) picks nothing
                refuse_labels_at_padding(picked, attention_mask, layout, name)
            loss = (F.cross_entropy(_upcast(start_logits), starts, ignore_index=n) +
                    F.cross_entropy(_upcast(end_logits), ends, ignore_index=n)) / 2
        return QuestionAnsweringOutput(loss, start_logits, end_logits)


class BertForSequenceClassification(BertPreTrainedModel):
    """Sentence (pair) classification or regression on the pooled [CLS] state (``bert.pooler``, ``classifier``)."""

    hf_class = "BertForSequenceClassification"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=True)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_weights()

    def problem_type(self, labels: torch.Tensor) -> str:
        """config.problem_type, or transformers' inference from num_labels and the labels' dtype."""
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.config.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None) -> SequenceClassifierOutput:
        """labels: (B,) class indices (single label), (B, num_labels) floats (multi-label: 0/1 targets,
        regression with num_labels > 1) or (B,) floats (regression, num_labels = 1)."""
        hidden, layout = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids)
        pooled = self.bert.pooler(first_tokens(hidden, layout))  # (B, C)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            kind = self.problem_type(labels)
            if kind == "regression":
                loss = (F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
                        if self.config.num_labels == 1 else F.mse_loss(logits, labels.to(logits.dtype)))
            elif kind == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return SequenceClassifierOutput(loss, logits)


class BertForTokenClassification(BertPreTrainedModel):
    """A label per token (tagging: named entities, parts of speech): ``classifier`` on every hidden state."""

    hf_class = "BertForTokenClassification"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None) -> TokenClassifierOutput:
        """labels: (B, N) class indices, -100 where no label (padding, continuation sub-tokens)."""
        hidden, layout = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(self.dropout(hidden))  # (B, N, L) or (T, L)
        if layout is not None:
            logits = pad_packed(logits, layout)  # zeros at padding positions
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got "
                                 f"{tuple(labels.shape)}")
            refuse_labels_at_padding(labels != -100, attention_mask, layout, "labels other than -100")
            loss = F.cross_entropy(_upcast(logits.reshape(-1, self.config.num_labels)), labels.reshape(-1),
                                   ignore_index=-100)
        return TokenClassifierOutput(loss, logits)

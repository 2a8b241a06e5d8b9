"""Models whose attention is fastattn.

    from fastattn.models import build_bert
    model = build_bert("mini", attn="fastattn", vocab_size=8192)   # or attn="sdpa" / "eager"
    out = model(input_ids, attention_mask=mask, labels=labels)      # out.loss, out.logits (eval) / out.masked_logits
    qa = BertForQuestionAnswering.from_pretrained("runs/mlm/final")  # task heads: bert_tasks.py
"""
from .bert import (ATTN_IMPLEMENTATIONS, PRESETS, BertConfig, BertForMaskedLM, BertForQuestionAnswering,
                   BertForSequenceClassification, BertForTokenClassification, BertModel, MaskedLMOutput, build_bert,
                   preset_config)

__all__ = ["ATTN_IMPLEMENTATIONS", "PRESETS", "BertConfig", "BertForMaskedLM", "BertForQuestionAnswering",
           "BertForSequenceClassification", "BertForTokenClassification", "BertModel", "MaskedLMOutput",
           "build_bert", "preset_config"]

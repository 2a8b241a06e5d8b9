"""Fine-tuning the bundled BERT on downstream tasks (``python -m fastattn.finetune``, ``fastattn-finetune``).

    qa.py         SQuAD files, windows with a doc stride, n-best span search, EM/F1, answer()
    data.py       classification (CSV/JSONL) and tagging (CoNLL) files, metrics
    synthetic.py  a SQuAD-format set built from the standard library's docstrings (no network)
    train.py      the training loop (FinetuneConfig, train)
"""
from .qa import answer  # noqa: F401

"""Masked-language-model pre-training pieces used by ``fastattn.train_mlm``, one concern per module.

    corpus     text files, or the default corpus (Python's bundled docs + stdlib docstrings), held-out split
    tokenizer  WordPiece trained with HuggingFace ``tokenizers`` (cached) or loaded; ids the pipeline needs
    masking    BERT's 80/10/10 corruption, optional whole-word masking
    data       sequences (packed windows or one paragraph each), batches, sample order, unigram baseline
    compare    tokens/s of one BERT MLM step per attention variant (``python -m fastattn.mlm.compare``)
"""

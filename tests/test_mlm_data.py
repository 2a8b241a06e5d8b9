"""The MLM data pipeline: masking statistics, corpus cleaning and split, tokenizer, sequences."""
from __future__ import annotations

import math

import pytest
import torch

from fastattn.mlm import corpus as corpus_lib
from fastattn.mlm import data as data_lib
from fastattn.mlm.masking import IGNORE_INDEX, MaskingConfig, mask_tokens, word_start_positions

pytest.importorskip("tokenizers", reason="the MLM tokenizer is trained with HuggingFace tokenizers")
from fastattn.mlm import tokenizer as tokenizer_lib  # noqa: E402

SIGMAS = 5  # statistical checks allow 5 standard deviations of a binomial count (false alarm ~1e-6)

TEXT = """The quick brown fox jumps over the lazy dog while the cat watches from the window.
Attention is computed as the softmax of scaled dot products between queries and keys.
Tokenizers split unusual words like antidisestablishmentarianism into several pieces.

A second document talks about gradients, optimizers and learning rate schedules.
Padding tokens are never masked and special tokens keep their identity."""


def within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p)) + 1


def synthetic_batch(B=64, N=128, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, N), generator=g)
    lengths = torch.randint(N // 4, N + 1, (B,), generator=g)
    real = torch.arange(N)[None, :] < lengths[:, None]
    ids[:, 0] = 2  # [CLS]
    ids[torch.arange(B), lengths - 1] = 3  # [SEP]
    ids[~real] = 0  # [PAD]
    eligible = real & (ids > 4)
    return ids, eligible


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_masking_statistics(mask_prob):
    ids, eligible = synthetic_batch()
    random_ids = torch.arange(5, 1000)
    inputs, labels = mask_tokens(ids, eligible=eligible, mask_id=4, random_ids=random_ids,
                                 config=MaskingConfig(mask_prob=mask_prob), generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    n_eligible, n_sel = int(eligible.sum()), int(selected.sum())
    assert within_binomial(n_sel, n_eligible, mask_prob), (n_sel, n_eligible)
    assert not selected[~eligible].any(), "special tokens and padding are never selected"
    assert torch.equal(labels[selected], ids[selected]), "labels hold the original ids"
    assert torch.equal(inputs[~selected], ids[~selected]), "unselected tokens are untouched"
    n_mask = int((inputs[selected] == 4).sum())
    n_kept = int((inputs[selected] == ids[selected]).sum())
    n_random = n_sel - n_mask - n_kept
    # a random replacement equals the original with probability 1/995: counted as "kept" (tiny bias)
    assert within_binomial(n_mask, n_sel, 0.8), n_mask
    assert within_binomial(n_random, n_sel, 0.1 * (1 - 1 / 995)), n_random
    assert within_binomial(n_kept, n_sel, 0.1 + 0.1 / 995), n_kept
    random_tokens = inputs[selected & (inputs != 4) & (inputs != ids)]
    assert (random_tokens >= 5).all(), "random replacements are ordinary tokens"


def test_masking_is_reproducible_and_seed_dependent():
    ids, eligible = synthetic_batch(B=8, N=32)
    cfg = MaskingConfig()
    args = dict(eligible=eligible, mask_id=4, random_ids=torch.arange(5, 1000), config=cfg)
    a = mask_tokens(ids, generator=torch.Generator().manual_seed(7), **args)
    b = mask_tokens(ids, generator=torch.Generator().manual_seed(7), **args)
    c = mask_tokens(ids, generator=torch.Generator().manual_seed(8), **args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_whole_word_masking_selects_all_pieces_of_a_word():
    vocab = 1000
    continues = torch.zeros(vocab, dtype=torch.bool)
    continues[500:] = True  # ids >= 500 are "##" pieces
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (32, 64), generator=g)
    ids[:, 0] = 2
    eligible = ids > 4
    inputs, labels = mask_tokens(ids, eligible=eligible, mask_id=4, random_ids=torch.arange(5, vocab),
                                 config=MaskingConfig(mask_prob=0.2, whole_word=True), continues_word=continues,
                                 generator=torch.Generator().manual_seed(3))
    selected = labels != IGNORE_INDEX
    starts = word_start_positions(ids, continues)
    word_selected = selected.gather(1, starts)
    pieces = eligible & (starts > 0)
    assert torch.equal(selected[pieces], word_selected[pieces]), "a word is selected whole or not at all"
    n_words = int((eligible & ~continues[ids]).sum())
    n_sel_words = int((selected & ~continues[ids]).sum())
    assert within_binomial(n_sel_words, n_words, 0.2)


def test_masking_config_validation():
    with pytest.raises(ValueError, match="mask_prob"):
        MaskingConfig(mask_prob=1.5)
    with pytest.raises(ValueError, match="replace_with_mask"):
        MaskingConfig(replace_with_mask=0.9, replace_with_random=0.2)


def test_clean_paragraphs_drops_doctests_and_short_lines():
    doc = """Summary line that is long enough to keep.

        >>> print("doctest")
        doctest

        A second paragraph
        spread over two lines.
        Ok.
        """
    paras = corpus_lib.clean_paragraphs(doc)
    assert paras[0] == "Summary line that is long enough to keep."
    assert paras[-1] == "A second paragraph spread over two lines. Ok."
    assert not any(">>>" in p for p in paras)


def test_split_is_stable_and_disjoint():
    docs = [f"document number {i} with some words" for i in range(500)]
    train, held = corpus_lib.split_documents(docs, 0.1)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 500
    assert 20 < len(held) < 90
    train2, held2 = corpus_lib.split_documents(docs[:250] + ["a new one"] + docs[250:], 0.1)
    assert set(held) <= set(held2), "adding a document does not move the others"


@pytest.fixture(scope="module")
def small_tokenizer():
    docs = TEXT.split("\n\n")
    tok = tokenizer_lib.train_wordpiece(docs * 5, vocab_size=300, min_frequency=1)
    return tok, tokenizer_lib.TokenizerInfo.from_tokenizer(tok)


def test_tokenizer_special_tokens_and_save_load(small_tokenizer, tmp_path):
    tok, info = small_tokenizer
    assert (info.pad_id, info.cls_id, info.sep_id, info.mask_id) == (0, 2, 3, 4)
    assert info.continues_word.shape == (info.vocab_size,) and info.continues_word.any()
    tokenizer_lib.save_tokenizer(tok, str(tmp_path))
    for name in ("tokenizer.json", "vocab.txt"):
        again = tokenizer_lib.load_tokenizer(str(tmp_path / name))
        assert again.encode("the quick fox").ids == tok.encode("the quick fox").ids, name
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf_tok("the quick fox", add_special_tokens=False)["input_ids"] == tok.encode("the quick fox").ids


def test_text_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Another file.\n\nWith two documents.")
    docs = corpus_lib.text_file_documents([str(tmp_path)])
    assert len(docs) == 4 and docs[-1] == "With two documents."
    with pytest.raises(FileNotFoundError, match="--data"):
        corpus_lib.text_file_documents([str(tmp_path / "missing")])


@pytest.mark.parametrize("mode", ["pack", "line"])
def test_sequences(small_tokenizer, mode):
    tok, info = small_tokenizer
    docs = TEXT.split("\n\n") * 3
    seqs = data_lib.build_sequences(tok, docs, info, 16, mode)
    assert all(s[0] == info.cls_id and s[-1] == info.sep_id and len(s) <= 16 for s in seqs)
    if mode == "pack":
        assert all(len(s) == 16 for s in seqs)
        body = torch.cat([s[1:-1] for s in seqs])
        stream = torch.tensor([t for ids in tokenizer_lib.encode(tok, docs) for t in (*ids, info.sep_id)])
        assert torch.equal(body, stream[:len(body)]), "windows are consecutive slices of the token stream"
    else:
        assert len(seqs) == 3 * len([ln for d in TEXT.split("\n\n") for ln in d.split("\n")])
    batch = data_lib.collate(seqs[:5], info, MaskingConfig(), seeds=range(5))
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
    assert (batch.input_ids[batch.attention_mask == 0] == info.pad_id).all()
    again = data_lib.collate(seqs[3:5], info, MaskingConfig(), seeds=[3, 4])
    n = again.input_ids.shape[1]
    assert torch.equal(again.labels, batch.labels[3:5, :n]), "a sequence's mask depends on its seed, not its batch"


def test_eval_batches_are_fixed_at_15_percent(small_tokenizer):
    tok, info = small_tokenizer
    seqs = data_lib.build_sequences(tok, TEXT.split("\n\n") * 20, info, 32, "pack")
    a = data_lib.eval_batches(seqs, info, 8)
    b = data_lib.eval_batches(seqs, info, 8)
    assert all(torch.equal(x.labels, y.labels) and torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    eligible = sum(int(((x.attention_mask == 1) & ~torch.isin(x.input_ids, info.special_ids) |
                        (x.labels != -100)).sum()) for x in a)
    assert within_binomial(sum(x.num_masked for x in a), eligible, 0.15)


def test_sample_order_is_a_permutation_per_epoch():
    order = data_lib.SampleOrder(10, seed=3)
    first, second = [order[i] for i in range(10)], [order[i] for i in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert data_lib.SampleOrder(10, seed=3)[13] == second[3], "random access equals sequential reading"


def test_unigram_baseline_is_frequency_cross_entropy(small_tokenizer):
    tok, info = small_tokenizer
    seqs = [torch.tensor([2, 7, 7, 8, 3])]
    batch = data_lib.Batch(torch.tensor([[2, 4, 4, 3]]), torch.ones(1, 4, dtype=torch.long),
                           torch.tensor([[-100, 7, 8, -100]]))
    counts = torch.ones(info.vocab_size, dtype=torch.float64)
    counts[7] += 2
    counts[8] += 1
    p = counts / counts.sum()
    expected = -(p[7].log() + p[8].log()) / 2
    assert abs(data_lib.unigram_cross_entropy(seqs, [batch], info) - float(expected)) < 1e-12

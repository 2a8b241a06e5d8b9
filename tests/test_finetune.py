"""Fine-tuning: SQuAD's metric and preprocessing, the span search, answer() on long contexts, the
classification and tagging readers, and short end-to-end runs of every task (with resume)."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

pytest.importorskip("tokenizers", reason="the fine-tuning data pipeline needs tokenizers")

from fastattn.finetune import data as data_lib  # noqa: E402
from fastattn.finetune import qa, synthetic  # noqa: E402
from fastattn.finetune.__main__ import main as finetune_main  # noqa: E402
from fastattn.finetune.__main__ import parse_args  # noqa: E402
from fastattn.mlm import tokenizer as tokenizer_lib  # noqa: E402
from fastattn.models.bert import BertConfig, BertForMaskedLM, BertForQuestionAnswering  # noqa: E402


# ----------------------------------------------------------------------------------------------
# SQuAD's evaluation, as the official script defines it
# ----------------------------------------------------------------------------------------------
def test_squad_normalisation_exact_match_and_f1():
    assert qa.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert qa.exact_match("the Eiffel tower", "Eiffel Tower.") == 1.0
    assert qa.f1_score("Eiffel tower in Paris", "the Eiffel Tower") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert qa.f1_score("", "") == 1.0 and qa.f1_score("x", "") == 0.0  # v2.0: empty only matches empty
    ex = [qa.QAExample("a", "q", "c", [{"text": "Paris", "answer_start": 0}, {"text": "in Paris", "answer_start": 0}]),
          qa.QAExample("b", "q", "c", [])]
    m = qa.squad_metrics(ex, {"a": "in paris", "b": ""})
    assert m["exact"] == 100.0 and m["f1"] == 100.0 and m["count"] == 2
    assert qa.squad_metrics(ex, {"a": "Paris France", "b": "x"})["exact"] == 0.0


@pytest.fixture(scope="module")
def tok():
    texts = [e.context + " " + e.question for e in synthetic.build_examples()[0][:400]]
    return tokenizer_lib.train_wordpiece(texts + ["one two three four five six seven eight nine ten"] * 5, 600)


def test_features_windows_and_answer_positions(tok):
    words = [f"w{i}" for i in range(60)]
    context = " ".join(words)
    start = context.index("w41")
    ex = qa.QAExample("x", "where is it", context, [{"text": "w41 w42", "answer_start": start}])
    feats = qa.make_features([ex], tok, max_len=24, doc_stride=8)
    assert len(feats) > 2  # the long context is read in windows
    inside = [f for f in feats if f.start_position > 0]
    assert inside, "some window holds the answer"
    for f in inside:
        a, b = f.offsets[f.start_position][0], f.offsets[f.end_position][1]
        assert context[a:b] == "w41 w42"
        assert f.token_type_ids[f.start_position] == 1 and f.input_ids[0] == tok.token_to_id("[CLS]")
    for f in feats:
        assert len(f.input_ids) <= 24 and len(f.input_ids) == len(f.offsets) == len(f.token_type_ids)
    # windows that cut the answer, or miss it, point at [CLS]
    assert any(f.start_position == 0 for f in feats)


def test_span_search_and_null_answer(tok):
    ex = qa.QAExample("x", "what", "one two three four", [])
    (f,) = qa.make_features([ex], tok, max_len=32)
    n = len(f.input_ids)
    starts_at = {o[0]: i for i, o in enumerate(f.offsets) if o is not None}  # char -> token starting there
    ends_at = {o[1]: i for i, o in enumerate(f.offsets) if o is not None}
    word = lambda w: ex.context.index(w)
    at = {"two": starts_at[word("two")], "three": ends_at[word("three") + 5], "one": starts_at[0]}
    start, end = torch.full((1, n), -5.0), torch.full((1, n), -5.0)
    start[0, at["two"]], end[0, at["three"]] = 3.0, 3.0
    pred = qa.predict_answers([ex], [f], start, end)["x"]
    assert pred["text"] == "two three" and pred["score"] == 6.0
    end[0, at["one"]] = 9.0  # end before start: never chosen
    assert qa.predict_answers([ex], [f], start, end)["x"]["text"] == "two three"
    start[0, 0], end[0, 0] = 8.0, 8.0  # [CLS] wins by more than the threshold: no answer
    assert qa.predict_answers([ex], [f], start, end, null_threshold=0.0)["x"]["text"] == ""
    assert qa.predict_answers([ex], [f], start, end, null_threshold=20.0)["x"]["text"] == "two three"


class _PointsAt(torch.nn.Module):
    """A stand-in QA model whose start and end logits peak at one token id."""

    def __init__(self, token_id):
        super().__init__()
        self.token_id, self.w = token_id, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hit = (input_ids == self.token_id).float() * 10 - 5
        return type("Out", (), {"start_logits": hit + self.w, "end_logits": hit + self.w})()


def test_answer_reads_long_contexts_in_windows(tok):
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and len(w) >= 4)[:2]  # whole words: one token each
    filler, target = words
    context = " ".join([filler] * 200 + [target] + [filler] * 20)
    model = _PointsAt(tok.token_to_id(target))
    got = qa.answer("which", context, model, tok, max_len=32, doc_stride=8)
    assert got["text"] == target and context[got["start"]:got["end"]] == target


# ----------------------------------------------------------------------------------------------
# Classification and tagging files
# ----------------------------------------------------------------------------------------------
def test_classification_and_tagging_readers(tmp_path, tok):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\none two,pos\nthree four five,neg\n")
    rows = data_lib.read_table(str(csv_path))
    names = data_lib.label_table([r["label"] for r in rows])
    assert names == ["neg", "pos"]
    enc = data_lib.encode_classification(rows, tok, "text", "label", names=names, max_len=4)
    assert [e.label for e in enc] == [1, 0] and all(len(e.input_ids) <= 4 for e in enc)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "one", "label": 2}) + "\n")
    assert data_lib.label_table([r["label"] for r in data_lib.read_table(str(jsonl))]) is None
    conll = tmp_path / "d.conll"
    conll.write_text("-DOCSTART- O\n\none B-X\nseventeen I-X\n\nten O\n")
    sents = data_lib.read_conll(str(conll))
    assert sents == [(["one", "seventeen"], ["B-X", "I-X"]), (["ten"], ["O"])]
    (a, b) = data_lib.encode_tagging(sents, tok, ["B-X", "I-X", "O"])
    pieces = len(tok.encode("seventeen", add_special_tokens=False).ids)
    assert a.label == [-100, 0, 1] + [-100] * (pieces - 1) + [-100]  # first sub-token only; [CLS]/[SEP] -100
    m = data_lib.classification_metrics(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, -100]), 3)
    assert m["accuracy"] == pytest.approx(200 / 3) and m["count"] == 3


def test_synthetic_qa_splits_by_module():
    train, dev = synthetic.build_examples(unanswerable=0.2)
    assert len(train) > 500 and len(dev) > 50
    names = lambda exs: {a["text"] for e in exs if e.id.endswith("-which") for a in e.answers}
    assert names(train) and names(dev) and not names(train) & names(dev)  # dev functions are unseen
    assert any(not e.answers for e in train)


def test_synthetic_topics_split_by_sentence_and_cover_every_class(tmp_path):
    train, dev = synthetic.build_topic_rows()
    assert len(train) > 500 and len(dev) > 100
    assert not {r["text"] for r in train} & {r["text"] for r in dev}  # no dev sentence seen in training
    labels = {r["label"] for r in train}
    assert len(labels) >= 8 and labels == {r["label"] for r in dev}
    assert max(Counter(r["label"] for r in dev).values()) < 0.5 * len(dev)  # a majority guess stays weak
    finetune_main(["make-classification-data", "--out", str(tmp_path)])
    rows = data_lib.read_table(str(tmp_path / "dev.csv"))
    assert rows == [{"text": r["text"], "label": r["label"]} for r in dev]


def test_every_flag_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.count("(default:") >= 35


# ----------------------------------------------------------------------------------------------
# End to end, tiny models
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    path = str(tmp_path_factory.mktemp("ckpt"))
    model = BertForMaskedLM(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0))
    model.save_pretrained(path)
    tokenizer_lib.save_tokenizer(tok, path)
    return path


def _run(checkpoint, out, task, train_file, eval_file, *extra):
    finetune_main(["--task", task, "--model", checkpoint, "--train-file", train_file, "--eval-file", eval_file,
                   "--batch-size", "4", "--max-seq-len", "64", "--out-dir", out, "--log-every", "1",
                   "--eval-every", "2", "--no-progress", "--no-plot", *extra])
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_qa_end_to_end_resume_and_transformers_loads_it(tmp_path, checkpoint):
    train, dev = synthetic.build_examples(unanswerable=0.1)
    tr, dv = str(tmp_path / "train.json"), str(tmp_path / "dev.json")
    qa.write_squad(train[:40], tr)
    qa.write_squad(dev[:12], dv)
    rows = _run(checkpoint, str(tmp_path / "a"), "qa", tr, dv, "--steps", "4", "--lr", "1e-3")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(0 <= r["eval"]["f1"] <= 100 for r in rows if "eval" in r)
    _run(checkpoint, str(tmp_path / "b"), "qa", tr, dv, "--steps", "4", "--lr", "1e-3", "--stop-at", "2")
    _run(checkpoint, str(tmp_path / "b"), "qa", tr, dv, "--steps", "4", "--lr", "1e-3", "--resume")
    a = BertForQuestionAnswering.from_pretrained(str(tmp_path / "a" / "final")).state_dict()
    b = BertForQuestionAnswering.from_pretrained(str(tmp_path / "b" / "final")).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"resumed run differs at {k}")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "a" / "final"))
    assert type(hf).__name__ == "BertForQuestionAnswering"


def test_classification_and_tagging_end_to_end(tmp_path, checkpoint):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("text,label\n" + "".join(f"{'one two' if i % 2 else 'three four'} {i},{'a' if i % 2 else 'b'}\n"
                                                for i in range(12)))
    rows = _run(checkpoint, str(tmp_path / "cls"), "classification", str(csv_path), str(csv_path), "--steps", "3")
    assert "accuracy" in rows[-1]["eval"] and "macro_f1" in rows[-1]["eval"]
    png = tmp_path / "runs.png"  # runs side by side (here the same run twice)
    finetune_main(["plot-runs", "--out", str(png), f"a={tmp_path / 'cls'}", f"b={tmp_path / 'cls' / 'metrics.jsonl'}"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    conll = tmp_path / "t.conll"
    conll.write_text("\n\n".join("one B\ntwo I\nten O" for _ in range(6)) + "\n")
    rows = _run(checkpoint, str(tmp_path / "tag"), "tagging", str(conll), str(conll), "--steps", "3")
    assert rows[-1]["eval"]["count"] == 18  # 3 words x 6 sentences, first sub-tokens only
    with open(tmp_path / "tag" / "final" / "config.json") as f:
        assert json.load(f)["id2label"] == {"0": "B", "1": "I", "2": "O"}


def test_two_process_gloo_ddp_matches_single_process(tmp_path, checkpoint):
    """torchrun with 2 CPU processes (Gloo), 4 windows each == 1 process with 8 windows per step."""
    import subprocess
    import sys

    train, dev = synthetic.build_examples()
    tr, dv = str(tmp_path / "train.json"), str(tmp_path / "dev.json")
    qa.write_squad(train[:32], tr)
    qa.write_squad(dev[:8], dv)
    common = ["--task", "qa", "--model", checkpoint, "--train-file", tr, "--eval-file", dv, "--steps", "3",
              "--lr", "1e-3", "--max-seq-len", "64", "--log-every", "1", "--eval-every", "3", "--no-progress",
              "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastattn.finetune", *common, "--batch-size", "4", "--out-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.load(open(tmp_path / "ddp" / "summary.json"))["world_size"] == 2
    finetune_main([*common, "--batch-size", "8", "--out-dir", str(tmp_path / "single"), "--threads", "1"])
    a = BertForQuestionAnswering.from_pretrained(str(tmp_path / "ddp" / "final")).state_dict()
    b = BertForQuestionAnswering.from_pretrained(str(tmp_path / "single" / "final")).state_dict()
    for k in a:  # the same updates up to float32 rounding of the all-reduce (1e-5 vs steps of ~1e-3)
        if k == "qa_outputs.bias":
            # Its gradient is exactly zero (a shift of every position's logit leaves the span softmax as it is),
            # so Adam turns the rounding noise of that zero into steps of up to lr: only that bound holds.
            assert (a[k] - b[k]).abs().max() <= 2 * 3 * 1e-3, k
            continue
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)

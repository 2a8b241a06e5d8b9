"""python -m fastattn.train_mlm: short CPU runs of the real training loop.

The default corpus is extracted into a fresh cache once per session (the fresh-machine
path); the other runs train on a slice of it written to a text file (faster to tokenize).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tokenizers", reason="train_mlm trains a WordPiece tokenizer with HuggingFace tokenizers")
pytest.importorskip("safetensors", reason="train_mlm saves the final model as safetensors")

from fastattn import train_mlm  # noqa: E402
from fastattn.mlm import corpus as corpus_lib  # noqa: E402
from fastattn.models import BertForMaskedLM  # noqa: E402

# Per-step training loss of fastattn against torch's attention (same weights, same batches, no
# dropout, float32): kernels differ in rounding only (~1e-6 relative per step), which training
# amplifies over steps; 1e-4 relative over 8 steps leaves ~10x room and catches any real difference.
STEP_LOSS_RTOL = 1e-4
# Weights after equivalent runs whose float32 sums are grouped differently (grad accumulation,
# DDP all-reduce): a few Adam steps at lr 1e-3 move a weight by ~1e-2; rounding moves it ~1e-7.
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mlm-cache"))


@pytest.fixture(scope="session")
def small_text(cache_dir, tmp_path_factory):
    """A text file with ~200 documents of the default corpus (about a tenth of it)."""
    docs = corpus_lib.python_docs_corpus(cache_dir)
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(docs[::4][:200]))  # documents separated by blank lines
    return str(path)


def run(tmp_path, cache_dir, name, **kw) -> dict:
    # tiny preset made smaller still (hidden 64, 2 heads of 32): the loop is under test, not the model
    base = dict(cache_dir=cache_dir, out_dir=str(tmp_path / name), model="tiny", hidden_size=64, intermediate_size=128,
                vocab_size=1000, max_seq_len=48, batch_size=8, steps=8, lr=1e-3, log_every=1, eval_every=4, progress=False, plot=False,
                max_eval_sequences=32, threads=torch.get_num_threads())
    base.update(kw)
    return train_mlm.train(train_mlm.TrainConfig(**base))


def metrics(out_dir) -> list:
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def train_losses(out_dir) -> list:
    return [r["loss"] for r in metrics(out_dir) if "loss" in r]


def final_weights(out_dir) -> dict:
    return BertForMaskedLM.from_pretrained(os.path.join(out_dir, "final")).state_dict()


def test_default_corpus_extraction(cache_dir):
    corpus = corpus_lib.load_corpus(None, cache_dir)
    assert corpus.name == "python-docs"
    assert corpus.words() > 200_000, "pydoc topics + stdlib docstrings give ~330k words"
    assert corpus.eval and corpus.train and set(corpus.eval).isdisjoint(corpus.train)
    assert os.path.isfile(os.path.join(cache_dir, "corpus-python-{}.{}.{}.jsonl".format(*sys.version_info[:3])))


def test_short_run_on_default_corpus_loss_falls(tmp_path, cache_dir):
    s = run(tmp_path, cache_dir, "default", steps=20, batch_size=16, lr=3e-3, eval_every=10, plot=True,
            hidden_size=None, intermediate_size=None)  # the tiny preset as is (hidden 128)
    out = str(tmp_path / "default")
    losses = train_losses(out)
    evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    assert len(losses) == 20 and all(map(lambda x: x == x, losses)), "one finite loss per step"
    # from ~ln(vocab) = 6.9 (uniform guess) towards the unigram entropy within 20 steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses
    assert evals[-1] < evals[0], evals
    assert s["final_eval"]["eval_loss"] == evals[-1] and 0 <= s["final_eval"]["accuracy"] <= 1
    assert s["unigram_loss"] > 0
    for f in ("loss.png", "summary.json", "checkpoint.pt", "final/config.json", "final/model.safetensors",
              "final/tokenizer.json", "final/vocab.txt"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = metrics(out)
    assert rows[0]["step"] == 0 and "eval_loss" in rows[0], "the eval curve starts at the untrained model"
    assert abs(rows[0]["eval_loss"] - math.log(1000)) < 1.0, "untrained: about ln(vocab)"
    row = rows[1]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(row) and row["tokens_per_s"] > 0


def test_resume_equals_uninterrupted_run(tmp_path, cache_dir, small_text):
    kw = dict(data=[small_text], steps=6, dropout=0.1, grad_accum=2, eval_every=3)  # dropout: RNG must resume too
    run(tmp_path, cache_dir, "full", **kw)
    run(tmp_path, cache_dir, "split", stop_at=3, **kw)
    assert len(train_losses(tmp_path / "split")) == 3
    run(tmp_path, cache_dir, "split", resume=True, **kw)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fastattn_tracks_torch_attention_step_by_step(tmp_path, cache_dir, small_text):
    """Same weights, batches and masks; line-by-line sequences, so batches have padding and
    fastattn runs padding-free (varlen) while sdpa / eager run padded with a mask."""
    kw = dict(data=[small_text], packing="line", steps=8, dropout=0.0)
    finals, losses = {}, {}
    for attn in ("fastattn", "sdpa", "eager"):
        finals[attn] = run(tmp_path, cache_dir, attn, attn=attn, **kw)["final_eval"]["eval_loss"]
        losses[attn] = torch.tensor(train_losses(tmp_path / attn))
    assert len(losses["fastattn"]) == 8
    for attn in ("sdpa", "eager"):
        torch.testing.assert_close(losses["fastattn"], losses[attn], rtol=STEP_LOSS_RTOL, atol=0, msg=attn)
        assert abs(finals["fastattn"] - finals[attn]) < STEP_LOSS_RTOL * finals[attn], attn
    assert losses["fastattn"][-1] < losses["fastattn"][0]


def test_grad_accumulation_normalises_by_all_masked_tokens(tmp_path, cache_dir, small_text):
    """2 micro-batches of 8 == one batch of 16: the loss is divided by the masked tokens of both
    (averaging the two micro-batch means would weight their tokens differently and fail this)."""
    kw = dict(data=[small_text], packing="line", steps=4, dropout=0.0)
    run(tmp_path, cache_dir, "accum", batch_size=8, grad_accum=2, **kw)
    run(tmp_path, cache_dir, "big", batch_size=16, grad_accum=1, **kw)
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "accum")),
                               torch.tensor(train_losses(tmp_path / "big")), rtol=1e-6, atol=0)
    a, b = final_weights(tmp_path / "accum"), final_weights(tmp_path / "big")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=WEIGHT_ATOL, rtol=0, msg=name)


def test_step_without_masked_tokens_is_finite(tmp_path, cache_dir, small_text):
    s = run(tmp_path, cache_dir, "nomask", data=[small_text], steps=2, mask_prob=0.0, eval_every=2)
    assert train_losses(tmp_path / "nomask") == [0.0, 0.0]
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "nomask").values())
    assert s["final_eval"]["eval_loss"] > 0, "evaluation still masks 15%"


def test_command_line(tmp_path, cache_dir, small_text):
    cfg = train_mlm.parse_args(["--data", small_text, "--model", "mini", "--attn", "sdpa", "--no-unpad",
                                "--mask-prob", "0.3", "--whole-word", "--num-layers", "3", "--stop-at", "5",
                                "--tokenizer", "x.json"])
    assert (cfg.model, cfg.attn, cfg.unpad, cfg.mask_prob, cfg.whole_word, cfg.num_layers, cfg.stop_at,
            cfg.tokenizer) == ("mini", "sdpa", False, 0.3, True, 3, 5, "x.json")
    assert cfg.model_config(1000).num_hidden_layers == 3 and cfg.model_config(1000).hidden_size == 256
    with pytest.raises(SystemExit):
        train_mlm.parse_args(["--attn", "flash"])
    with pytest.raises(ValueError, match="--steps"):
        train_mlm.TrainConfig(steps=0)
    out = tmp_path / "cli"
    rc = train_mlm.main(["--data", small_text, "--cache-dir", cache_dir, "--out-dir", str(out), "--steps", "2",
                         "--batch-size", "4", "--vocab-size", "1000", "--max-seq-len", "32", "--whole-word", "--hidden-size", "64",
                         "--no-progress", "--no-plot", "--threads", str(torch.get_num_threads())])
    assert rc == 0 and os.path.isfile(out / "final" / "model.safetensors")


def test_two_process_gloo_ddp_matches_single_process(tmp_path, cache_dir, small_text):
    """torchrun with 2 CPU processes (Gloo), 4 sequences each == 1 process with 8 sequences."""
    common = ["--data", small_text, "--cache-dir", cache_dir, "--model", "tiny", "--hidden-size", "64",
              "--intermediate-size", "128", "--vocab-size", "1000", "--max-seq-len", "48", "--steps", "4", "--lr", "1e-3", "--dropout", "0", "--log-every", "1",
              "--eval-every", "4", "--max-eval-sequences", "32", "--no-progress", "--no-plot", "--packing", "line"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastattn.train_mlm", *common, "--batch-size", "4", "--out-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "ddp" / "summary.json"))
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    train_mlm.main([*common, "--batch-size", "8", "--out-dir", str(tmp_path / "single"), "--threads", "1"])
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "ddp")),
                               torch.tensor(train_losses(tmp_path / "single")), rtol=1e-5, atol=0)
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=WEIGHT_ATOL, rtol=0, msg=name)

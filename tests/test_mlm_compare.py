"""python -m fastattn.mlm.compare: the BERT attention comparison runs end to end (tiny settings;
its timings are not checked here, only that every variant computes the same model)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tokenizers", reason="the comparison trains a WordPiece tokenizer")
transformers = pytest.importorskip("transformers", reason="the hf-sdpa variant is transformers' BertForMaskedLM")

from fastattn.mlm import compare  # noqa: E402

TEXT = "\n\n".join(f"Paragraph {i} talks about attention kernels, padding and masked language models "
                   f"with {i % 7} extra words here." for i in range(120))


def test_every_variant_gives_the_same_first_step_loss(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "res"
    rc = compare.main(["--model", "tiny", "--max-seq-len", "32", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                       "--rounds", "1", "--vocab-size", "300", "--data", str(tmp_path / "t.txt"), "--cache-dir",
                       str(tmp_path / "cache"), "--hf", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    report = json.load(open(f"{out}.json"))
    losses = {k: r["first_step_loss"] for k, r in report["results"].items()}
    assert set(losses) == {"fastattn", "fastattn-padded", "sdpa", "eager", "hf-sdpa"}
    for name, loss in losses.items():
        assert abs(loss - losses["sdpa"]) < 1e-4 * losses["sdpa"], (name, losses)
    assert all(r["tokens_per_s"] > 0 for r in report["results"].values())
    assert "| fastattn |" in open(f"{out}.md").read()


def test_train_and_inference_step_helpers():
    from fastattn.mlm.data import Batch

    ids = torch.randint(5, 300, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.where(torch.rand(2, 16) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 1] = ids[0, 1]
    labels[mask == 0] = -100
    batch = Batch(ids, mask, labels)
    for name in compare.VARIANTS:
        model = compare.build_variant(name, "tiny", 300, 16, seed=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        before = [p.detach().clone() for p in model.parameters()]
        loss = compare.train_step(model, opt, batch)
        assert loss == loss and loss > 0, name
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), f"{name}: weights updated"
        assert compare.inference_step(model, batch).shape == (2, 16, 300), name
    with pytest.raises(ValueError, match="variant"):
        compare.build_variant("flash", "tiny", 300, 16)

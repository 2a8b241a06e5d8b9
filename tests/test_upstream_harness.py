"""tests/upstream/run.py: the harness that runs PyTorch's and transformers' own tests against fastattn.

The upstream test files are not here (CI cannot fetch them); this checks the harness itself on small
stand-in suites: the swap reaches code that imported torch's names (PyTorch) or every model that would
get sdpa (transformers), and outcomes are compared test by test (a regression is a test that fails
with fastattn only).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "upstream"))
import run as upstream_run  # noqa: E402

STAND_IN = '''
import torch
import torch.nn.functional as F
from torch.nn import MultiheadAttention


def test_swapped_names():
    import fastattn, fastattn.nn
    import os
    swapped = os.environ["FASTATTN_UPSTREAM_SWAP"] == "1"
    assert (F.scaled_dot_product_attention is fastattn.scaled_dot_product_attention) == swapped
    assert (MultiheadAttention is fastattn.nn.MultiheadAttention) == swapped
    layer = torch.nn.TransformerEncoderLayer(8, 2)
    assert isinstance(layer.self_attn, fastattn.nn.MultiheadAttention) == swapped


def test_fails_only_with_fastattn():
    assert F.scaled_dot_product_attention.__module__.startswith("torch")


def test_fails_with_both():
    assert False


def test_passes_with_both():
    q = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q), F.scaled_dot_product_attention(q, q, q))
'''


def test_harness_swaps_and_compares(tmp_path):
    (tmp_path / "test_stand_in.py").write_text(STAND_IN)
    out = tmp_path / "results"
    assert upstream_run.main(["--pytorch-test-dir", str(tmp_path), "--out", str(out), "test_stand_in.py"]) == 0
    report = json.loads((out / "results.json").read_text())["files"]["test_stand_in.py"]
    assert report["counts"]["baseline_passed"] == 3 and report["counts"]["baseline_failed"] == 1
    assert report["counts"]["fastattn_passed"] == 2 and report["counts"]["fastattn_failed"] == 2
    assert list(report["regressions"]) == ["test_stand_in::test_fails_only_with_fastattn"]
    assert "regressions: 1" in (out / "results.md").read_text()


HF_STAND_IN = '''
import os

import torch
from transformers import BertConfig, BertModel

SWAPPED = os.environ["FASTATTN_UPSTREAM_SWAP"] == "1"


def tiny_bert(**kwargs):
    config = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    return BertModel._from_config(config, **kwargs).eval()  # where transformers reads attn_implementation


def test_default_and_sdpa_become_fastattn():
    expected = "fastattn" if SWAPPED else "sdpa"
    assert tiny_bert().config._attn_implementation == expected
    assert tiny_bert(attn_implementation="sdpa").config._attn_implementation == expected
    assert tiny_bert(attn_implementation="eager").config._attn_implementation == "eager"


def test_fastattn_matches_eager():
    torch.manual_seed(0)
    model, eager = tiny_bert(), tiny_bert(attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    ids, mask = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state[mask.bool()],
                                   eager(ids, attention_mask=mask).last_hidden_state[mask.bool()])


def test_fails_only_with_fastattn():
    assert tiny_bert().config._attn_implementation == "sdpa"
'''


def test_transformers_harness_swaps_and_counts(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_hf_stand_in.py").write_text(HF_STAND_IN)
    out = tmp_path / "results"
    assert upstream_run.main(["--transformers-dir", str(tmp_path), "--out", str(out), "tests/test_hf_stand_in.py"]) == 0
    report = json.loads((out / "results.json").read_text())["files"]["tests/test_hf_stand_in.py"]
    assert report["counts"]["baseline_passed"] == 3 and report["counts"]["fastattn_passed"] == 2
    assert list(report["regressions"]) == ["tests.test_hf_stand_in::test_fails_only_with_fastattn"]
    assert report["fastattn_attention_calls"] >= 1  # the layer's one call in test_fastattn_matches_eager

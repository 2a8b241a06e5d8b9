"""tests/upstream/run.py: the harness that runs PyTorch's own tests against our drop-ins.

PyTorch's test files are not here (CI cannot fetch them); this checks the harness itself on a small
stand-in suite: the swap reaches code that imported torch's names, and outcomes are compared
test by test (a regression is a test that fails with fastattn only).
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
    assert report["counts"]["torch_passed"] == 3 and report["counts"]["torch_failed"] == 1
    assert report["counts"]["fastattn_passed"] == 2 and report["counts"]["fastattn_failed"] == 2
    assert list(report["regressions"]) == ["test_stand_in::test_fails_only_with_fastattn"]
    assert "regressions: 1" in (out / "results.md").read_text()

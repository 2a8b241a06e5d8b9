"""benchmarks/gpu_check.py without a GPU: its plan, its refusal, and its report logic.

The rows below are synthetic inputs of the report functions (to test the judging and
the table), not measurements; real numbers only come from running it on a GPU.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gpu_check = pytest.importorskip("benchmarks.gpu_check", reason="the benchmarks package is not importable "
                                "(run pytest from the repository root)")

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_lists_tests_and_cases():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert "pytest" in plan["tests"]["command"] and plan["tests"]["env"] == {"FASTATTN_TRITON_AUTOTUNE": "0"}
    cases = plan["bench"]["cases"]
    assert cases[0].startswith("B=") and "D=128" in cases[0] and "bf16" in cases[0] and "causal" not in cases[0]
    assert {"fastattn:triton", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn"} <= set(plan["bench"]["candidates"])
    assert any("N=512 " in c for c in cases) and any("N=16384" in c for c in cases)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not list(tmp_path.iterdir()), "no result file may be written without a measurement"


def test_cases_keep_tokens_constant():
    cfg = gpu_check.GpuCheckConfig()
    for case in gpu_check.bench_cases(cfg):
        assert case.batch * case.seqlen == cfg.tokens
        assert case.heads * case.head_dim == 2048


def _row(case, backend, mode, tflops):
    return {"case": case.label, **case.as_dict(), "backend": backend, "mode": mode,
            "time_s": None if tflops is None else 1.0, "tflops": tflops, "note": ""}


def test_targets_are_judged_from_rows_only(tmp_path):
    Case = gpu_check.Case
    head = Case(batch=4, heads=16, seqlen=4096, head_dim=128, dtype="bfloat16")
    short = Case(batch=32, heads=16, seqlen=512, head_dim=128, dtype="bfloat16")
    rows = [_row(head, "fastattn:triton", "fwd", 600.0), _row(head, "sdpa:flash", "fwd", 450.0),
            _row(head, "fastattn:triton", "bwd", 300.0), _row(head, "sdpa:flash", "bwd", 280.0),
            _row(short, "fastattn:triton", "fwd", 300.0), _row(short, "sdpa:cudnn", "fwd", 350.0)]
    verdicts = gpu_check.judge_targets(rows)
    assert any(v.startswith("fwd") and "600 TFLOP/s" in v and ": met" in v for v in verdicts)
    assert any(v.startswith("bwd") and "NOT met" in v for v in verdicts)
    assert any("REGRESSION" in v for v in verdicts)
    result = {"environment": {"date_utc": "2000-01-01T00:00:00+00:00", "gpu": "synthetic", "driver": None,
                              "cuda_runtime": None, "torch": torch.__version__, "triton": None},
              "config": {"candidates": ["fastattn:triton", "sdpa:flash", "sdpa:cudnn"], "modes": ["fwd", "bwd"]},
              "bench": {"rows": rows, "not_run": ["B=1 H=16 N=16384 D=128 bf16"], "missing_candidates": []}}
    table = gpu_check.markdown(result)
    assert "| 600 | 450 | - |" in table and "Not run (time budget)" in table
    json_path, md_path = gpu_check.write_results(result, tmp_path)
    assert json.loads(json_path.read_text())["bench"]["rows"][0]["tflops"] == 600.0 and md_path.exists()

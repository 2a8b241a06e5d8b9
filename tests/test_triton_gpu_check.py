"""benchmarks/gpu_check.py without a GPU: its plan, its refusal, and its report logic.

The rows below are synthetic inputs of the report functions (to test the judging and
the table), not measurements; real numbers only come from running it on a GPU.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gpu_check = pytest.importorskip("benchmarks.gpu_check", reason="the benchmarks package is not importable "
                                "(run pytest from the repository root)")

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_lists_stages_and_cases():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    names = [st["name"] for st in plan["stages"]]
    assert names == ["build", "selftest", "sanitizer:memcheck:cuda", "sanitizer:memcheck:triton",
                     "sanitizer:racecheck:cuda", "sanitizer:synccheck:cuda", "tests:cuda", "tests:triton", "bench"]
    assert plan["estimate_total_s"] <= plan["total_budget_s"] <= 540, "the whole check must fit one ~9 min call"
    build = plan["stages"][0]
    assert build["env"]["FASTATTN_CUDA"] == "1" and int(build["env"]["MAX_JOBS"]) == os.cpu_count()
    assert "--no-build-isolation" in build["command"] and "--no-deps" in build["command"]
    assert all(st["command"][0] == "compute-sanitizer" for st in plan["stages"] if st["name"].startswith("sanitizer"))
    assert all(st["env"] == {"FASTATTN_TRITON_AUTOTUNE": "0"} for st in plan["stages"] if st["name"].startswith("tests"))
    assert "total ~" in proc.stderr and "selftest" in proc.stderr  # the human-readable plan
    cases = plan["bench"]["cases"]
    assert cases[0].startswith("B=") and "D=128" in cases[0] and "bf16" in cases[0] and "causal" not in cases[0]
    assert {"fastattn:triton", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn"} <= set(plan["bench"]["candidates"])
    assert any("N=512 " in c for c in cases) and any("N=16384" in c for c in cases)


def test_stages_survive_a_crash_and_log_as_they_go(tmp_path):
    """A stage that segfaults is a failed record; the next stage still runs; a stage that no longer fits
    the budget is not run; every record is in the JSON-lines log."""
    py = sys.executable
    log = tmp_path / "gpu_check.jsonl"
    plan = [gpu_check.Stage("crash", [py, "-c", "import os, signal; print('before'); os.kill(os.getpid(), signal.SIGSEGV)"],
                            1, 30),
            gpu_check.Stage("hang", [py, "-c", "import time; time.sleep(60)"], 1, 2),
            gpu_check.Stage("fine", [py, "-c", "print('3 passed in 0.1s')"], 1, 30),
            gpu_check.Stage("too-long", [py, "-c", "pass"], 10_000, 30)]
    records = gpu_check.run_stages(plan, total_budget_s=600, log=log)
    assert [r["status"] for r in records] == ["failed", "timeout", "ok", "not run"]
    assert records[0]["returncode"] == -11 and "before" in records[0]["output_tail"]
    assert records[2]["summary"] == "3 passed in 0.1s"
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["stage"] for r in logged] == ["crash", "hang", "fine", "too-long"]


def test_sanitizer_refusal_is_reported_not_failed():
    stage = gpu_check.Stage("sanitizer:memcheck:cuda", ["compute-sanitizer"], 1, 1, sanitizer=True)
    refused = "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
    assert gpu_check.stage_status(stage, 1, False, refused) == "unavailable"
    found = "========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 1 error\n"
    assert gpu_check.stage_status(stage, 3, False, found) == "failed"
    assert gpu_check.stage_status(stage, 0, False, "========= ERROR SUMMARY: 0 errors") == "ok"



def test_missing_compute_sanitizer_is_unavailable(tmp_path):
    record = gpu_check.run_stage(gpu_check.Stage("sanitizer:memcheck:cuda", ["compute-sanitizer", "--version"], 1, 30,
                                                 sanitizer=True), tmp_path / "log.jsonl")
    expected = "unavailable" if shutil.which("compute-sanitizer") is None else "ok"
    assert record["status"] == expected, record


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

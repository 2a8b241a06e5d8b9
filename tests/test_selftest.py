"""python -m fastattn.selftest: the installed package's own parity check (fastattn/selftest.py)."""
import json
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import dispatch, selftest


def test_selftest_passes_on_the_cpu_backend(tmp_path, capsys):
    report = tmp_path / "selftest.json"
    assert selftest.main(["--backend", "cpu", "--device", "cpu", "--json", str(report)]) == 0
    results = json.loads(report.read_text())
    assert len(results) == len(selftest.cases_for("cpu", torch.device("cpu"))) >= 20
    assert {r["status"] for r in results} == {"PASS"}
    out = capsys.readouterr().out
    assert "dropout replay" in out and "varlen, empty sequences" in out and " 0 failed" in out


def test_selftest_fails_a_wrong_backend(monkeypatch, capsys):
    """A backend 0.1% off in every output is reported as FAIL with the error, and the exit status is 1."""
    real = fastattn.attention

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) * 1.001

    monkeypatch.setattr(fastattn, "attention", off_by_a_little)
    assert selftest.main(["--backend", "cpu", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "out error" in out
    assert "PASS" in out  # varlen cases go through fastattn.varlen_attention, untouched


def test_selftest_reports_what_a_backend_does_not_serve(monkeypatch, capsys):
    real = dispatch.why_unsupported

    def no_float_masks(backend, device, dtype, head_dim, **kw):
        if kw.get("mask_kind") == "float":
            return "no float masks here"
        return real(backend, device, dtype, head_dim, **kw)

    monkeypatch.setattr(dispatch, "why_unsupported", no_float_masks)
    assert selftest.main(["--backend", "cpu", "--device", "cpu"]) == 0
    assert "NOT SERVED no float masks here" in capsys.readouterr().out


def test_selftest_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "fastattn.selftest", "--backend", "cpu"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "selftest" in done.stdout and "0 failed" in done.stdout

"""Regression tracking: ``pytest benchmarks/ --benchmark-only`` (needs pytest-benchmark).

Small shapes that run in seconds on any machine, one forward and one training step
per candidate, so that ``--benchmark-compare`` shows a kernel getting slower. The full
picture (interleaved medians, memory, targets) is ``python -m benchmarks``.
"""
import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

import torch  # noqa: E402

from benchmarks import core  # noqa: E402

DEVICE = core.default_device()
DTYPE = "float32" if DEVICE.type == "cpu" else "bfloat16"
CANDIDATES = [c for c in core.available_candidates(DEVICE) if c.name != "fastattn:reference"]
CASES = [
    core.Case(2, 8, 256, 64, dtype=DTYPE),
    core.Case(1, 8, 1024, 64, causal=True, dtype=DTYPE),
    core.Case(2, 8, 256, 64, key_padding=True, dtype=DTYPE),
    core.Case(2, 8, 256, 64, kv_heads=2, dtype=DTYPE),
]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _prepared(cand, case):
    reason = cand.why_unsupported(case, DEVICE)
    if reason:
        pytest.skip(f"{cand.name}: {reason}")
    p = cand.prepare(case, core.make_inputs(case, DEVICE))
    try:
        core.run_forward(p)
    except Exception as e:  # e.g. an SDPA backend that does not take this combination
        pytest.skip(f"{cand.name} cannot run {case.label}: {type(e).__name__}")
    return p


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
@pytest.mark.parametrize("cand", CANDIDATES, ids=lambda c: c.name)
def test_forward(benchmark, cand, case):
    p = _prepared(cand, case)
    benchmark.group = f"fwd {case.label}"
    benchmark.extra_info["gflop"] = core.attention_flops(case, "fwd") / 1e9
    benchmark(lambda: (core.run_forward(p), _sync()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
@pytest.mark.parametrize("cand", CANDIDATES, ids=lambda c: c.name)
def test_forward_backward(benchmark, cand, case):
    p = _prepared(cand, case)
    benchmark.group = f"fwd_bwd {case.label}"
    benchmark.extra_info["gflop"] = core.attention_flops(case, "fwd_bwd") / 1e9
    benchmark(lambda: (core.run_train_step(p), _sync()))

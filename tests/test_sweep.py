"""The boundary sweep (tests/sweep.py) as tests: one test per case, each run in an isolated worker.

A case whose worker crashes (segfault, sanitizer report, abort) or hangs fails with the signal and
the end of the worker's stderr; the next case gets a fresh worker. The CPU kernels get the full sweep
(every (Nq, Nk) in 1..160, and every block boundary of the kernels' own tiling up to two query chunks);
Triton, in its CPU interpreter, a sampled subset on small shapes.
"""
from __future__ import annotations

import pytest

import fastattn
import sweep
from conftest import require


@pytest.fixture(scope="module")
def runner():
    r = sweep.IsolatedRunner()
    yield r
    r.close()


def _check(runner, case):
    result = runner.run(case)
    assert result.ok, f"{case.name}: {result.error}\ncase: {case}"


CPU_CASES = sweep.cpu_cases() if "cpu" in fastattn.available_backends() else []


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_cpu_sweep(runner, case):
    _check(runner, case)


def _triton_cases():
    try:
        return sweep.triton_cases()
    except ImportError:  # no triton package: the test below skips with the backend's reason
        return [sweep.Case(name="triton-unavailable", backend="triton")]


TRITON_CASES = _triton_cases()


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c.name for c in TRITON_CASES])
def test_triton_sweep(runner, case):
    require("triton", dtype=getattr(__import__("torch"), case.dtype), head_dim=case.D,
            has_mask=case.mask != "none", dropout=case.dropout_p > 0, varlen=case.kind == "varlen")
    _check(runner, case)


# ----------------------------------------------------------------------------------------------
# The sweep itself: its cases follow the kernels' constants, and a crash or hang is one failure
# ----------------------------------------------------------------------------------------------
def test_boundaries_follow_the_kernels_tiling():
    tiling = sweep.cpu_tiling()
    assert {"micro_rows", "micro_cols", "fwd_block_q", "fwd_block_k", "bwd_block_q", "bwd_block_k",
            "fwd_max_chunk_q"} <= set(tiling)
    lengths = set()
    for c in sweep.cpu_boundary_cases():
        lengths |= {c.Nq, c.Nk, *c.lens_q, *c.lens_k}
    for name, block in tiling.items():
        for m in (1, 2):
            edge = m * block
            if edge + 1 <= 2 * tiling["fwd_max_chunk_q"] + 1 and edge > sweep.GRID_MAX:
                assert {edge - 1, edge, edge + 1} <= lengths, f"{name} = {block}: {m} x block not swept"
    grid = {(c.Nq, n) for c in sweep.cpu_grid_cases() for n in range(1, c.Nk + 1)}
    assert {(nq, nk) for nq in range(1, sweep.GRID_MAX + 1) for nk in range(1, sweep.GRID_MAX + 1)} <= grid
    assert (97, 130) in grid  # the shape of the causal backward crash (issue 13)
    assert {c.D for c in sweep.cpu_boundary_cases()} >= set(sweep.HEAD_DIMS)


def test_boundary_lengths():
    assert sweep.boundary_lengths([16], 40) == [1, 2, 15, 16, 17, 31, 32, 33]


def test_runner_reports_a_crash_as_that_case_and_goes_on():
    r = sweep.IsolatedRunner()
    try:
        crash = r.run(sweep.Case(name="crash", kind="selftest_crash"))
        assert not crash.ok and "SEGV" in crash.error, crash.error  # ASan reports it as SEGV, then aborts
        after = r.run(sweep.Case(name="after", Nq=7, Nk=9, D=8, causal=True))
        assert after.ok, after.error
    finally:
        r.close()


def test_runner_reports_a_hang():
    r = sweep.IsolatedRunner(timeout_s=5)
    try:
        assert r.run(sweep.Case(name="warm", Nq=3, Nk=3, D=8)).ok
        hang = r.run(sweep.Case(name="hang", kind="selftest_hang"))
        assert not hang.ok and "hang" in hang.error, hang.error
    finally:
        r.close()


def test_runner_reports_a_wrong_result():
    r = sweep.IsolatedRunner()
    try:
        bad = r.run(sweep.Case(name="bad", Nq=5, Nk=5, D=8, dtype="no_such_dtype"))
        assert not bad.ok and "no_such_dtype" in bad.error, bad.error
    finally:
        r.close()

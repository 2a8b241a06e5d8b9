"""Smoke tests of the benchmark program itself (tiny shapes; seconds on a CPU).

Run with ``pytest benchmarks/``; CI's ``pytest tests/`` does not collect them.
"""
import json

import pytest
import torch

from benchmarks import core, report
from benchmarks.__main__ import config_from_args, main, run
from benchmarks.config import BenchConfig, attention_cases, memory_cases


def test_flop_formula_is_written_out():
    case = core.Case(2, 3, 128, 64)
    fwd = 4 * 2 * 3 * 128 * 128 * 64
    assert core.attention_flops(case, "fwd") == fwd
    assert core.attention_flops(case, "bwd") == 2.5 * fwd
    assert core.attention_flops(case, "fwd_bwd") == 3.5 * fwd
    assert core.attention_flops(core.Case(2, 3, 128, 64, causal=True), "fwd") == fwd / 2


def test_naive_matches_reference():
    case = core.Case(2, 4, 33, 16, kv_heads=2, causal=True, key_padding=True)
    inputs = core.make_inputs(case, torch.device("cpu"))
    p = core.get_candidate("naive", torch.device("cpu")).prepare(case, inputs)
    assert core.reference_slice(case, inputs).max_abs_err(core.run_forward(p)) < 1e-5


def test_reference_slice_limits_the_check():
    case = core.Case(3, 4, 64, 8, kv_heads=2)
    inputs = core.make_inputs(case, torch.device("cpu"))
    ref = core.reference_slice(case, inputs, max_matrix_bytes=64 * 64 * 8 * 2)  # one k/v head's group
    assert (ref.batches, ref.q_heads, ref.scope) == (1, 2, "b<1 h<2")


def test_quick_preset_has_the_target_shapes():
    cases = [c for c, _ in attention_cases(BenchConfig(), torch.device("cpu"))]
    assert core.Case(4, 12, 512, 64) in cases
    assert core.Case(1, 16, 2048, 128, causal=True) in cases
    assert core.Case(1, 8, 8192, 64) in memory_cases(BenchConfig(), torch.device("cpu"))
    # half precision keeps its dtype in the default run, and every half-precision target has its row
    for dtype in ("bfloat16", "float16"):
        assert (core.Case(4, 12, 512, 64, dtype=dtype), ("fwd", "fwd_bwd")) in attention_cases(
            BenchConfig(), torch.device("cpu"))
    half = [t for t in report.TARGETS if t.case.dtype != "float32" and t.suite == report.PAIRED]
    assert len(half) == 4 and all(t.case in cases for t in half)
    # every target the paired rows serve is a case of the quick run's attention suite
    assert all(t.case in cases for t in report.TARGETS if t.suite == report.PAIRED)
    # --dtype runs the whole preset in that one dtype
    assert {c.dtype for c, _ in attention_cases(BenchConfig(dtype="float64"), torch.device("cpu"))} == {"float64"}


def test_targets_plot_marks_each_measured_target(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    half = next(t for t in report.TARGETS if t.case.dtype == "bfloat16")
    memory = next(t for t in report.TARGETS if t.metric == "memory_vs_sdpa")
    results = [report.TargetResult(half, 1.5, "PASS"), report.TargetResult(memory, 2.0, "MISS"),
               report.TargetResult(report.TARGETS[0], None, "not measured")]
    assert [report._target_margin(r) for r in results[:2]] == [1.5 / 1.2, 1.5 / 2.0]
    path = report._plot_targets(plt, results, tmp_path / "t-targets.png")
    assert path.stat().st_size > 0
    assert report._plot_targets(plt, results[2:], tmp_path / "none.png") is None


def test_full_sweep_holds_tokens_constant():
    cases = [c for c, _ in attention_cases(BenchConfig(full=True), torch.device("cpu"))]
    assert {c.batch * c.seqlen for c in cases} == {16384}
    assert {c.seqlen for c in cases} == {128 * 2 ** i for i in range(8)}


def test_cli_parses_every_flag():
    cfg = config_from_args(["--seqlens", "128,256", "--heads", "2", "--head-dims", "32", "--batch", "1",
                            "--backends", "sdpa,naive", "--dtype", "float32", "--causal", "both",
                            "--modes", "fwd,fwd_bwd", "--reps", "2", "--no-plot", "--variants", "plain,gqa"])
    cases = attention_cases(cfg, torch.device("cpu"))
    assert len(cases) == 2 * 2 * 2 and all(m == ("fwd", "fwd_bwd") for _, m in cases)


@pytest.mark.parametrize("plot", [False, True])
def test_tiny_run_writes_files(tmp_path, plot):
    if plot:
        pytest.importorskip("matplotlib")
    cfg = BenchConfig(suites=("attention", "memory"), shapes=[(1, 2, 64, 16), (1, 2, 128, 16)],
                      backends=["sdpa", "naive"], reps=2, min_reps=1,
                      warmup=1, memory_seqlens=[64, 128], out=tmp_path, plot=plot, progress=False)
    result = run(cfg, echo=lambda *a: None)
    data = json.loads(result.files[0].read_text())
    timed = [r for r in data["rows"] if r["suite"] == "attention" and r["time_s"] is not None]
    assert timed and all(r["flops_per_s"] > 0 and r["max_abs_err"] < 1e-4 for r in timed)
    assert all(r["extra_peak_bytes"] is not None for r in data["rows"] if r["suite"] == "memory")
    assert result.files[1].read_text().startswith("suite,case,")
    assert any(str(f).endswith("-speed.png") for f in result.files) == plot


def test_main_returns_zero(tmp_path):
    assert main(["--shapes", "1x2x64x16", "--backends", "naive", "--reps", "1", "--min-reps", "1",
                 "--suites", "attention", "--no-row-memory", "--no-plot", "--no-progress",
                 "--out", str(tmp_path)]) == 0


def test_targets_are_computed_not_hard_coded():
    case = report.TARGETS[0].case
    rows = [core.Row("attention", case, "fwd", "fastattn:cpu", time_s=1.0, speedup_vs_naive=2.0)]
    result = report.evaluate_targets(rows)[0]
    assert (result.value, result.status) == (2.0, "MISS")


def test_window_target_reads_the_side_by_side_rows():
    # full causal and a window, timed round-robin by the variants suite; the target divides those
    from benchmarks import suites

    cfg = BenchConfig(reps=2, min_reps=2, warmup=1)
    ctx = suites.make_context(cfg)
    ctx.candidates = [c for c in ctx.candidates if c.name == "fastattn:cpu"]
    causal = core.Case(1, 2, 96, 16, causal=True)
    window = core.Case(1, 2, 96, 16, causal=True, window=16)
    rows = suites.windows_side_by_side([causal, window], cfg, ctx)
    assert [(r.suite, r.case, r.mode, r.reps) for r in rows] == [
        (suites.SIDE_BY_SIDE, causal, "fwd_bwd", 2), (suites.SIDE_BY_SIDE, window, "fwd_bwd", 2)]
    assert all(r.time_s > 0 for r in rows)
    assert suites.windows_side_by_side([causal], cfg, ctx) == []  # nothing to compare
    target = next(t for t in report.TARGETS if t.metric == "speedup_vs_case")
    assert target.suite == suites.SIDE_BY_SIDE
    rows = [core.Row(suites.SIDE_BY_SIDE, target.other_case, "fwd_bwd", "fastattn:cpu", time_s=3.0),
            core.Row("variants", target.other_case, "fwd_bwd", "fastattn:cpu", time_s=100.0),
            core.Row(suites.SIDE_BY_SIDE, target.case, "fwd_bwd", "fastattn:cpu", time_s=0.25)]
    result = next(r for r in report.evaluate_targets(rows) if r.target is target)
    assert (result.value, result.status) == (12.0, "PASS")


def test_median_ci_is_the_order_statistics_interval():
    # n = 15: P(Binomial(15, 1/2) <= 3) = 0.018 <= 0.025 < P(<= 4), so the 4th smallest and 4th largest
    assert core.median_ci(list(range(1, 16))) == (4, 12)
    assert core.median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 95%: the whole range


def test_paired_rows_time_ours_against_the_fastest_sdpa(monkeypatch):
    # the training-shape targets read a second round-robin of fastattn and the fastest SDPA backend alone
    from benchmarks import suites

    cfg = BenchConfig(reps=3, min_reps=3, warmup=1)
    ctx = suites.make_context(cfg)
    ctx.candidates = [c for c in ctx.candidates if c.name in ("fastattn:cpu", "sdpa:flash", "naive")]
    case = core.Case(1, 2, 64, 16)
    monkeypatch.setattr(suites, "paired_cases", lambda: {case})
    rows = suites.run_attention_case(case, ("fwd", "fwd_bwd"), ctx, cfg)
    paired = [r for r in rows if r.suite == report.PAIRED]
    assert [(r.mode, r.backend, r.reps) for r in paired] == [
        ("fwd", "fastattn:cpu", 3), ("fwd", "sdpa:flash", 3), ("fwd_bwd", "fastattn:cpu", 3),
        ("fwd_bwd", "sdpa:flash", 3)]
    for ours in paired[::2]:
        lo, hi = ours.speedup_ci
        assert lo <= ours.speedup_vs_sdpa <= hi and "per-repetition ratios" in ours.note
    # the training-shape targets read the paired rows and print the interval, and whether it spans the threshold
    target = next(t for t in report.TARGETS if t.metric == "speedup_vs_sdpa" and t.mode == "fwd_bwd"
                  and t.suite == report.PAIRED)
    rows = [core.Row("attention", target.case, "fwd_bwd", "fastattn:cpu", speedup_vs_sdpa=2.0),
            core.Row(report.PAIRED, target.case, "fwd_bwd", "fastattn:cpu", speedup_vs_sdpa=1.16, reps=21,
                     speedup_ci=(1.12, 1.19))]
    result = next(r for r in report.evaluate_targets(rows) if r.target is target)
    assert (result.value, result.status, result.ci, result.pairs) == (1.16, "PASS", (1.12, 1.19), 21)
    assert "[95% CI 1.12-1.19, 21 pairs, spans the threshold]" in report.format_targets([result])


def test_machine_rates_are_measured():
    rates = core.machine_rates(torch.device("cpu"), reps=3)
    assert set(rates) == {"copy_bytes_per_s", "gemm_flops_per_s"}
    assert 1e8 < rates["copy_bytes_per_s"] < 1e13 and 1e8 < rates["gemm_flops_per_s"] < 1e15


def test_decode_rows_and_their_machine_relative_targets():
    # a small decode case through the suite's row code: K/V bytes / time, printed beside the copy bandwidth
    from benchmarks import suites

    cfg = BenchConfig(reps=2, min_reps=2, warmup=1)
    ctx = suites.make_context(cfg)
    ctx.candidates = [c for c in ctx.candidates if c.name in ("fastattn:cpu", "sdpa:flash")]
    case = core.Case(1, 4, 64, 16, kv_heads=2, seqlen_q=1)
    rows = suites.run_attention_case(case, ("fwd",), ctx, cfg, suite="decode")
    ours = next(r for r in rows if r.backend == "fastattn:cpu")
    assert ours.kv_bytes_per_s == pytest.approx(2 * 2 * 64 * 16 * 4 / ours.time_s)
    machine = {"copy_bytes_per_s": 4 * ours.kv_bytes_per_s, "gemm_flops_per_s": 1e12}
    assert "= 25% of copy" in report.format_table(rows, "cpu", machine)
    # every decode shape in both dtypes has both targets; the fractions come from the machine passed in
    decode = [t for t in report.TARGETS if t.suite == "decode"]
    assert len(decode) == 2 * 2 * 5 and {t.metric for t in decode} == {"speedup_vs_sdpa", "kv_rate_vs_copy"}
    target = next(t for t in decode if t.metric == "kv_rate_vs_copy")
    row = core.Row("decode", target.case, "fwd", "fastattn:cpu", time_s=1.0, kv_bytes_per_s=6e9)
    result = next(r for r in report.evaluate_targets([row], machine={"copy_bytes_per_s": 10e9,
                                                                      "gemm_flops_per_s": 1e11})
                  if r.target is target)
    assert (result.value, result.status) == (0.6, "PASS")
    result = next(r for r in report.evaluate_targets([row]) if r.target is target)
    assert result.status == "not measured"  # no machine rates: no fraction


def test_decode_suite_times_every_call_from_memory(monkeypatch):
    # K/V rates are compared with a copy bandwidth measured from memory: the decode suite's CPU clock
    # flushes the caches before each call, the other suites' does not
    from benchmarks import suites

    ctx = suites.make_context(BenchConfig(reps=2))
    assert isinstance(ctx.clock, core.WallClock) and ctx.clock._flush is None
    seen = []
    monkeypatch.setattr(suites, "_run_cases", lambda suite, cases, cfg, ctx: seen.append(ctx.clock) or [])
    suites.decode_suite(BenchConfig(reps=2), ctx)
    (clock,) = seen
    flush_bytes = suites.decode_flush_bytes(core.last_level_cache_bytes())
    assert clock._flush.numel() * clock._flush.element_size() == flush_bytes
    assert suites.decode_flush_bytes(32 << 20) == suites.DECODE_FLUSH_BYTES  # a usual L3: 256 MiB
    assert suites.decode_flush_bytes(480 << 20) == 960 << 20  # a large one: twice it
    assert suites.decode_flush_bytes(64 << 30) == suites.DECODE_FLUSH_MAX_BYTES
    assert "flushed" in clock.name and ctx.clock._flush is None  # the run's own clock is unchanged
    small = core.WallClock(flush_bytes=4096)
    small.before_call()  # reads the buffer; writes nothing
    assert torch.equal(small._flush, torch.ones(1024))


def test_bert_suite_tiny():
    pytest.importorskip("transformers", reason="the bert suite compares against transformers' BERT")
    from benchmarks import bert

    w = bert.BertWorkload("tiny", 2, 32, vocab_size=2048)
    rows = bert.run_workload(w, bert.MODES, torch.device("cpu"), reps=1, warmup=1, row_memory=True, threads=1)
    assert {(r.mode, r.backend) for r in rows} == {(m, b) for m in bert.MODES for b in bert.CANDIDATES}
    assert all(r.time_s > 0 and r.tokens_per_s > 0 and r.extra_peak_bytes is not None for r in rows), \
        [(r.backend, r.mode, r.note) for r in rows]
    # same weights, same batch: every model's inference logits match transformers' eager BERT
    assert all(r.max_abs_err < 1e-4 for r in rows if r.mode == "infer")
    table = report.format_table(rows, "cpu")
    assert "bert: BERT-tiny B=2 N=32" in table and "hf:sdpa" in table


def test_bert_suite_cli(tmp_path):
    pytest.importorskip("transformers", reason="the bert suite compares against transformers' BERT")
    cfg = config_from_args(["--suites", "bert", "--bert-model", "tiny", "--bert-shapes", "2x16", "--reps", "1",
                            "--no-row-memory", "--no-plot", "--no-progress", "--out", str(tmp_path)])
    result = run(cfg, echo=lambda *a: None)
    data = json.loads(result.files[0].read_text())
    assert {r["backend"] for r in data["rows"]} == set(__import__("benchmarks.bert").bert.CANDIDATES)
    assert result.files[0].name.endswith("-bert.json") and "tokens_per_s" in result.files[1].read_text()


def test_bert_batches_are_padded_and_masked():
    from benchmarks import bert

    w = bert.BertWorkload("tiny", 8, 64)
    b = bert.make_batch(w, torch.device("cpu"))
    lengths = b["attention_mask"].sum(1)
    assert lengths.max() == 64 and lengths.min() >= 32
    labelled = b["labels"] != -100
    assert (labelled <= b["attention_mask"].bool()).all() and labelled.any(1).all()
    assert (b["input_ids"][labelled] == bert.MASK_TOKEN_ID).all()

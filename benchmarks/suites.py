"""The registry of benchmark suites, and the two that exist so far.

A suite is a function ``(cfg: BenchConfig, ctx: RunContext) -> list[Row]`` registered by
name; ``python -m benchmarks --suites a,b`` runs them in order and reports every row
together. End-to-end model suites (the BERT one) register here the same way::

    @register_suite("bert")
    def bert_suite(cfg, ctx):
        ...
        return rows
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import core, memory, report
from .config import BenchConfig, attention_cases, decode_cases, device_defaults, memory_cases, variant_cases
from .core import Case, Row

SUITES: dict = {}


def register_suite(name: str):
    def decorate(fn: Callable):
        SUITES[name] = fn
        return fn

    return decorate


# ---------------------------------------------------------------------------
# Shared run state
# ---------------------------------------------------------------------------
class Progress:
    """tqdm on a terminal when importable, else one printed line per step (to stderr, like tqdm): a log
    file gets no carriage-return lines."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.count, self.bar = total, desc, 0, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)
        elif self.enabled:
            print(f"[{self.desc} {self.count + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Left out unless --full or --backends names them: the fastattn fallback is the same
# materialised O(N²) math as "naive" and would add a minute to the quick default.
SLOW_BY_DEFAULT = ("fastattn:reference",)


@dataclass
class RunContext:
    device: torch.device
    candidates: list  # core.Candidate, already filtered by --backends
    reps: int
    warmup: int
    case_budget_s: Optional[float]
    clock: object  # core.WallClock or core.CudaEventClock; None with the do_bench timer


def make_context(cfg: BenchConfig) -> RunContext:
    device = cfg.resolved_device()
    defaults = device_defaults(device)
    if cfg.timer == "do_bench" and device.type != "cuda":
        raise SystemExit("--timer do_bench needs a CUDA device")
    clock = None
    if cfg.timer != "do_bench":
        clock = core.CudaEventClock(device) if device.type == "cuda" else core.WallClock()
    budget = cfg.case_budget_s if cfg.case_budget_s is not None else defaults["case_budget_s"]
    candidates = core.select_candidates(device, cfg.backends)
    if cfg.backends is None and not cfg.full:
        candidates = [c for c in candidates if c.name not in SLOW_BY_DEFAULT]
    return RunContext(device=device, candidates=candidates,
                      reps=cfg.reps or defaults["reps"],
                      warmup=cfg.warmup if cfg.warmup is not None else defaults["warmup"],
                      case_budget_s=budget or None,  # 0: no budget
                      clock=clock)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def _skip_reason(cand: core.Candidate, case: Case, device: torch.device, train: bool) -> Optional[str]:
    try:
        reason = cand.why_unsupported(case, device)
    except Exception as e:  # a checker that breaks must not stop the run
        reason = _first_line(e)
    if reason:
        return f"unsupported: {reason}"
    need = core.estimated_extra_bytes(cand, case, train)
    if need > 0.8 * core.free_memory_bytes(device):
        return f"skipped: needs ~{need / 2**30:.1f} GiB (O(N^2) memory)"
    return None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# attention: time, throughput, memory, speedups and error of every candidate on every case
# ---------------------------------------------------------------------------
def run_attention_case(case: Case, modes: tuple, ctx: RunContext, cfg: BenchConfig,
                       log: Callable[[str], None] = print, suite: str = "attention",
                       skip_materialising: bool = False) -> list:
    """All rows of one case: every candidate in ``ctx.candidates`` x every mode in ``modes``
    (``skip_materialising``: not the ones that hold (B, H, Nq, Nk) score matrices)."""
    device = ctx.device
    train = any(m in core.TRAIN_MODES for m in modes)
    inputs = core.make_inputs(case, device, cfg.seed)
    ref = None
    if case.dropout_p == 0 and core.attention_reference is not None:
        ref = core.reference_slice(case, inputs)  # the dropout mask differs per backend: no check there
    notes, errors, prepared, kinds = {}, {}, {}, {}  # kinds: {name: {"fwd", "train"}} that ran in warm-up
    for cand in ctx.candidates:
        reason = _skip_reason(cand, case, device, train)
        if not reason and skip_materialising and cand.materialises:
            reason = (f"skipped: materialises the {core.score_matrix_bytes(case) / 2**30:.0f} GiB score matrix "
                      f"(minutes here; --full runs it)")
        if reason:
            notes[cand.name] = reason
            continue
        try:
            p = cand.prepare(case, inputs)
            with warnings.catch_warnings(record=True) as caught:  # SDPA says why it has no kernel
                warnings.simplefilter("always")
                try:
                    out = core.run_forward(p)  # tells whether it runs at all; the first forward warm-up
                except RuntimeError as e:
                    why = [str(w.message).split(" (Triggered")[0] for w in caught]
                    if "No available kernel" in str(e) and why:
                        notes[cand.name] = "unsupported: " + " ".join(dict.fromkeys(why))[:160]
                        continue
                    raise
            if ref is not None:
                errors[cand.name] = ref.max_abs_err(p.to_bhnd(out))
            del out
            for _ in range(ctx.warmup - 1 if "fwd" in modes else 0):
                core.run_forward(p)
        except Exception as e:  # unsupported combination, out of memory, ...
            notes[cand.name] = f"failed: {_first_line(e)}"
            _release(device)
            continue
        prepared[cand.name], kinds[cand.name] = p, {"fwd"}
        try:
            for _ in range(ctx.warmup if train else 0):
                core.run_train_step(p)
            kinds[cand.name].add("train")
        except Exception as e:  # a forward that has no backward for this case
            notes[cand.name] = f"backward failed: {_first_line(e)}"
            _release(device)
    # extra peak memory, one call per (candidate, forward / training step)
    peaks = {}
    if cfg.row_memory:
        for name in prepared:
            for kind in (["fwd"] if "fwd" in modes else []) + (["fwd_bwd"] if train and "train" in kinds[name] else []):
                job = memory.MemoryJob(name, case, kind, str(device), memory.threads_for_children())
                res = memory.measure(job)
                if res["error"]:
                    log(f"  memory of {name} {kind} on {case.label}: {res['error']}")
                peaks[(name, kind)] = res["extra_peak_bytes"]
        _release(device)
    # time: candidates round-robin within each repetition
    try:
        if ctx.clock is None:
            timings = core.time_with_do_bench(prepared, modes, kinds)
        else:
            timings = core.time_interleaved(prepared, modes, ctx.clock, ctx.reps, cfg.min_reps,
                                            ctx.case_budget_s, kinds)
    except Exception as e:  # e.g. out of memory on a GPU once every candidate holds its buffers
        log(f"  timing {case.label} failed: {_first_line(e)}")
        timings = {}
        notes.update({name: f"failed while timing: {_first_line(e)}" for name in prepared})
    rows = []
    for mode in modes:
        flops = core.attention_flops(case, mode)
        naive = timings.get(("naive", mode), {}).get("median_s")
        sdpa = [t["median_s"] for (name, m), t in timings.items() if m == mode and name.startswith("sdpa:")]
        best_sdpa = min(sdpa) if sdpa else None
        for cand in ctx.candidates:
            row = Row(suite, case, mode, cand.name, note=notes.get(cand.name, ""))
            t = timings.get((cand.name, mode))
            if t is not None:
                row.time_s, row.reps = t["median_s"], t["reps"]
                row.flops_per_s = flops / t["median_s"]
                row.speedup_vs_naive = naive / t["median_s"] if naive else None
                row.speedup_vs_sdpa = best_sdpa / t["median_s"] if best_sdpa else None
                row.extra_peak_bytes = peaks.get((cand.name, "fwd" if mode == "fwd" else "fwd_bwd"))
                row.max_abs_err = errors.get(cand.name)
                if case.decode:
                    row.kv_bytes_per_s = core.kv_bytes(case) / t["median_s"]
                if ref is not None and row.max_abs_err is not None:
                    row.err_scope = ref.scope
            rows.append(row)
    if suite == "attention" and case in paired_cases() and ctx.clock is not None and device.type == "cpu":
        rows += paired_rows(case, modes, prepared, kinds, timings, ctx, cfg, errors, ref.scope if ref else "")
    del prepared, inputs, ref
    _release(device)
    return rows


# ---------------------------------------------------------------------------
# attention side by side: fastattn against the fastest SDPA backend, in pairs, at the target shapes
# ---------------------------------------------------------------------------
PAIRED_BUDGET_S = 10.0  # seconds of paired timing per case (the quick run's N = 2048 cases: 15 pairs)
PAIRED_MIN_REPS = 15  # the budget never cuts below this: enough for a 95% CI of the median (k = 4)
PAIRED_MAX_REPS = 301


def paired_cases() -> set:
    """The cases whose targets read the paired rows (report.PAIRED)."""
    return {t.case for t in report.TARGETS if t.suite == report.PAIRED}


def paired_rows(case: Case, modes: tuple, prepared: dict, kinds: dict, timings: dict, ctx: RunContext,
                cfg: BenchConfig, errors: dict, err_scope: str = "", ours: str = "fastattn:cpu") -> list:
    """Rows (suite report.PAIRED) of ``ours`` and, per mode, the SDPA backend that was fastest in
    ``timings`` (the case's round-robin of every candidate), timed again by themselves in round-robin
    for PAIRED_MIN_REPS repetitions or more, up to PAIRED_BUDGET_S (``--reps`` given: exactly that
    many). Our x SDPA is the median of the per-repetition ratios time(SDPA) / time(ours), which a
    drift common to both cancels out of, with the 95% confidence interval of that median."""
    rivals = {}
    for mode in modes:
        sdpa = {name: t["median_s"] for (name, m), t in timings.items() if m == mode and name.startswith("sdpa:")}
        if sdpa and (ours, mode) in timings:
            rivals[mode] = min(sdpa, key=sdpa.get)
    if not rivals:
        return []
    names = [ours] + sorted(set(rivals.values()))
    fixed = cfg.reps is not None
    paired = core.time_interleaved({n: prepared[n] for n in names}, tuple(rivals), ctx.clock,
                                   cfg.reps if fixed else PAIRED_MAX_REPS,
                                   cfg.reps if fixed else PAIRED_MIN_REPS,
                                   None if fixed else PAIRED_BUDGET_S, {n: kinds[n] for n in names})
    rows = []
    for mode in modes:
        if mode not in rivals:
            continue
        rival = rivals[mode]
        mine, theirs = paired[(ours, mode)]["all_s"], paired[(rival, mode)]["all_s"]
        ratios = [t / m for t, m in zip(theirs, mine)]
        for name, times in ((ours, mine), (rival, theirs)):
            row = Row(report.PAIRED, case, mode, name, time_s=statistics.median(times), reps=len(times),
                      max_abs_err=errors.get(name), err_scope=err_scope if name in errors else "")
            row.flops_per_s = core.attention_flops(case, mode) / row.time_s
            if name == ours:
                row.speedup_vs_sdpa, row.speedup_ci = statistics.median(ratios), core.median_ci(ratios)
                row.note = (f"x {rival}: median of {len(ratios)} per-repetition ratios, 95% CI "
                            f"{row.speedup_ci[0]:.2f}-{row.speedup_ci[1]:.2f}")
            else:
                row.speedup_vs_sdpa = 1.0
            rows.append(row)
    return rows


def _run_cases(suite: str, cases: list, cfg: BenchConfig, ctx: RunContext,
               skip_materialising: Callable[[Case], bool] = lambda case: False) -> list:
    """run_attention_case over [(Case, modes)], with a progress line per case."""
    progress = Progress(len(cases), suite, cfg.progress)
    rows = []
    try:
        for case, modes in cases:
            progress.step(f"{case.label} {'/'.join(modes)}")
            rows += run_attention_case(case, modes, ctx, cfg, log=progress.write, suite=suite,
                                       skip_materialising=skip_materialising(case))
            progress.done()
    finally:
        progress.close()
    return rows


@register_suite("attention")
def attention_suite(cfg: BenchConfig, ctx: RunContext) -> list:
    return _run_cases("attention", attention_cases(cfg, ctx.device), cfg, ctx)


# ---------------------------------------------------------------------------
# variants: sliding windows beside full causal (config.variant_cases)
# ---------------------------------------------------------------------------
@register_suite("variants")
def variants_suite(cfg: BenchConfig, ctx: RunContext) -> list:
    # the long-sequence window rows compare fused kernels (SDPA given the window's bool mask)
    cases = variant_cases(cfg, ctx.device)
    rows = _run_cases("variants", cases, cfg, ctx, skip_materialising=lambda case: not cfg.full)
    return rows + windows_side_by_side([c for c, modes in cases if "fwd_bwd" in modes], cfg, ctx)


# The window target is a ratio between two cases, which the rows above time minutes apart (each
# case's candidates round-robin, not the cases): on a shared host that drift alone moves the ratio
# by +-30%. So fastattn's forward+backward on full causal and on every window is timed again, the
# cases round-robin within each repetition; the target reads these rows.
SIDE_BY_SIDE = "variants side by side"


def windows_side_by_side(cases: list, cfg: BenchConfig, ctx: RunContext) -> list:
    """Rows (suite SIDE_BY_SIDE, mode fwd_bwd) of each fastattn backend on ``cases`` (full causal and
    the windows at one shape), the cases run round-robin within each repetition."""
    if not any(c.window for c in cases) or all(c.window for c in cases):
        return []  # nothing to compare
    rows = []
    for cand in ctx.candidates:
        if not cand.name.startswith("fastattn:") or cand.name == "fastattn:reference":
            continue
        prepared, notes = {}, {}
        for case in cases:
            reason = _skip_reason(cand, case, ctx.device, train=True)
            if reason:
                notes[case] = reason
                continue
            try:
                p = cand.prepare(case, core.make_inputs(case, ctx.device, cfg.seed))
                for _ in range(max(ctx.warmup, 1)):
                    core.run_train_step(p)
                prepared[case] = p
            except Exception as e:
                notes[case] = f"failed: {_first_line(e)}"
        timings = {}
        if len(prepared) > 1 and ctx.clock is not None:
            by_label = {case.label: p for case, p in prepared.items()}
            timings = core.time_interleaved(by_label, ("fwd_bwd",), ctx.clock, ctx.reps, ctx.reps)
        for case in cases:
            row = Row(SIDE_BY_SIDE, case, "fwd_bwd", cand.name, note=notes.get(case, ""))
            t = timings.get((case.label, "fwd_bwd"))
            if t is not None:
                row.time_s, row.reps = t["median_s"], t["reps"]
                row.flops_per_s = core.attention_flops(case, "fwd_bwd") / t["median_s"]
            elif not row.note:
                row.note = "not timed (needs the wall/event clock and two cases that run)"
            rows.append(row)
        del prepared
        _release(ctx.device)
    return rows


# ---------------------------------------------------------------------------
# decode: a few new queries against a long K/V cache, GQA, fp32 and bf16 (config.decode_cases)
# ---------------------------------------------------------------------------
DECODE_FLUSH_BYTES = 256 * 2**20  # as the copy bandwidth's buffer: several times the L3 a core sees (32-96 MiB)
DECODE_FLUSH_MAX_BYTES = 2 * 2**30  # at most, whatever the cache


def decode_flush_bytes(llc_bytes: int) -> int:
    """The decode clock's flush: DECODE_FLUSH_BYTES, or twice the last-level cache where that is larger (a
    Xeon 6 guest reports a 480 MiB L3, which a 256 MiB read leaves holding most of a K/V cache)."""
    return int(min(max(DECODE_FLUSH_BYTES, 2 * llc_bytes), DECODE_FLUSH_MAX_BYTES))


@register_suite("decode")
def decode_suite(cfg: BenchConfig, ctx: RunContext) -> list:
    # memory-bound: the rows print K/V bytes per second, the report puts them beside the copy bandwidth,
    # which is measured from memory; so on the CPU every call starts with K/V in memory too (as in a
    # model, whose layers' caches together outgrow the last-level cache), not in whatever state the
    # previous candidate left (SDPA would read K/V from L3 after fastattn, fastattn after naive's writes).
    if isinstance(ctx.clock, core.WallClock):
        flush_bytes = decode_flush_bytes(core.last_level_cache_bytes())
        ctx = dataclasses.replace(ctx, clock=core.WallClock(flush_bytes=flush_bytes))
    return _run_cases("decode", decode_cases(cfg, ctx.device), cfg, ctx)


# ---------------------------------------------------------------------------
# memory: extra peak of one forward+backward per backend, over N
# ---------------------------------------------------------------------------
@register_suite("memory")
def memory_suite(cfg: BenchConfig, ctx: RunContext) -> list:
    cases = memory_cases(cfg, ctx.device)
    jobs = [(case, cand) for case in cases for cand in ctx.candidates]
    progress = Progress(len(jobs), "memory", cfg.progress)
    rows = []
    try:
        for case, cand in jobs:
            progress.step(f"{cand.name} {case.label}")
            row = Row("memory", case, "fwd_bwd", cand.name)
            reason = _skip_reason(cand, case, ctx.device, train=True)
            if reason:
                row.note = reason
            else:
                res = memory.measure(memory.MemoryJob(cand.name, case, "fwd_bwd", str(ctx.device),
                                                      memory.threads_for_children()))
                row.extra_peak_bytes = res["extra_peak_bytes"]
                if res["error"]:
                    row.note = f"failed: {res['error']}"
                elif res["method"] not in memory.EXACT_METHODS:
                    row.note = res["method"]
            rows.append(row)
            progress.done()
    finally:
        progress.close()
    return rows


# ---------------------------------------------------------------------------
# bert: end-to-end MLM training steps and inference (benchmarks/bert.py)
# ---------------------------------------------------------------------------
@register_suite("bert")
def bert_suite(cfg: BenchConfig, ctx: RunContext) -> list:
    from . import bert

    workloads = bert.default_workloads(ctx.device)
    if cfg.bert_model or cfg.bert_shapes:
        model = cfg.bert_model or workloads[0].preset
        shapes = cfg.bert_shapes or [(w.batch, w.seqlen) for w in workloads]
        workloads = [bert.BertWorkload(model, b, n, workloads[0].dtype) for b, n in shapes]
    if cfg.dtype in ("float32", "bfloat16", "float16"):  # low precision: autocast over fp32 weights
        workloads = [bert.BertWorkload(w.preset, w.batch, w.seqlen, cfg.dtype) for w in workloads]
    progress = Progress(len(workloads), "bert", cfg.progress)
    rows = []
    try:
        for w in workloads:
            progress.step(w.label)
            rows += bert.run_workload(w, bert.MODES, ctx.device, reps=cfg.bert_reps or ctx.reps,
                                      warmup=max(1, ctx.warmup), row_memory=cfg.row_memory,
                                      threads=memory.threads_for_children(), log=progress.write)
            progress.done()
    finally:
        progress.close()
    return rows

"""``python -m benchmarks``: benchmark fastattn against torch SDPA and naive PyTorch.

    python -m benchmarks                        # quick default (~3-4 min on a 2-core CPU)
    python -m benchmarks --full                 # the full sweep (hours on a CPU)
    python -m benchmarks --memory               # only the memory suite
    python -m benchmarks --seqlens 512,1024 --head-dims 64,128 --causal both --modes fwd,fwd_bwd
    python -m benchmarks --shapes 4x12x512x64 --backends fastattn:cpu,sdpa,naive --reps 10

Prints a table and the targets, writes benchmarks/runs/<device>-<date>.json and .csv (ignored
by git; --save writes them to benchmarks/results/, the committed figures), and draws PNG plots
when matplotlib is importable. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from . import core, report
from .config import DEFAULT_SUITES, RESULTS_DIR, RUNS_DIR, VARIANTS, BenchConfig, parse_shape
from .suites import SUITES, decode_flush_bytes, make_context


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def _causal(text: str) -> list:
    return {"true": [True], "false": [False], "both": [False, True]}[text.lower()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full sweep: N = 128..16k at --tokens tokens per batch, "
                   "D 64 and 128, causal and not, plain / key padding / GQA")
    p.add_argument("--memory", action="store_true", help="run only the memory suite (one fwd+bwd per backend, "
                   "fresh process per call on CPU)")
    p.add_argument("--suites", type=_names, help=f"suites to run, in order (registered: {', '.join(SUITES)})")
    p.add_argument("--shapes", type=lambda s: [parse_shape(x) for x in _names(s)],
                   help="explicit shapes BxHxNxD, comma separated, e.g. 4x12x512x64,1x16x2048x128")
    p.add_argument("--seqlens", type=_ints, help="sequence lengths of a sweep, e.g. 512,1024,2048")
    p.add_argument("--heads", type=_ints, help="query heads (default: hidden // D, hidden 2048 CUDA / 768 CPU)")
    p.add_argument("--head-dims", type=_ints, help="head dims, e.g. 64,128")
    p.add_argument("--batch", type=int, help="batch size (default in a sweep: --tokens // N)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch held constant in a sweep")
    p.add_argument("--causal", type=_causal, nargs="?", const=[True], metavar="{true,false,both}",
                   help="causal masking (bare --causal means true)")
    p.add_argument("--variants", type=_names, help=f"subset of {', '.join(VARIANTS)} (padding: a quarter of the "
                   "keys masked; gqa: 4 query heads per k/v head; dropout: p = 0.1)")
    p.add_argument("--backends", type=_names, help="candidates by name or family: fastattn:cpu, fastattn, sdpa, "
                   "sdpa:math, naive, flash_attn, xformers (default: all available)")
    p.add_argument("--dtype", choices=list(core.DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--modes", type=_names, default=list(core.MODES), help="subset of fwd,bwd,fwd_bwd")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--reps", type=int, help="timed repetitions per row (median reported); default 5 CPU, 30 CUDA")
    p.add_argument("--min-reps", type=int, default=3, help="the per-case time budget never cuts below this")
    p.add_argument("--case-budget", type=float, help="seconds of timing per case before repetitions stop early "
                   "(default 10 on CPU, none on CUDA; 0 = no budget)")
    p.add_argument("--warmup", type=int, help="untimed calls per candidate (default 1 CPU, 5 CUDA)")
    p.add_argument("--timer", choices=["auto", "do_bench"], default="auto",
                   help="auto: wall clock (CPU) / CUDA events (GPU), interleaved; do_bench: triton's, per candidate")
    p.add_argument("--no-row-memory", action="store_true", help="skip the per-row extra peak memory column")
    p.add_argument("--memory-seqlens", type=_ints, help="sequence lengths of the memory suite")
    p.add_argument("--bert-model", choices=["tiny", "mini", "small", "base", "large"],
                   help="bert suite: model size (default mini on CPU, base on CUDA)")
    p.add_argument("--bert-shapes", type=lambda s: [tuple(int(v) for v in x.lower().split("x")) for x in _names(s)],
                   help="bert suite: batch shapes BxN, e.g. 16x128,4x512")
    p.add_argument("--bert-reps", type=int, help="bert suite: timed repetitions (default --reps)")
    p.add_argument("--out", type=Path, help="output directory (default benchmarks/runs, which git ignores)")
    p.add_argument("--save", action="store_true", help="write the outputs to benchmarks/results, the committed "
                   "figures (same as --out benchmarks/results)")
    p.add_argument("--no-plot", action="store_true", help="do not draw PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    return p


def config_from_args(argv: Optional[list] = None) -> BenchConfig:
    a = build_parser().parse_args(argv)
    bad = [m for m in a.modes if m not in core.MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {core.MODES}")
    if a.variants and any(v not in VARIANTS for v in a.variants):
        raise SystemExit(f"--variants: choose from {VARIANTS}")
    suites = tuple(a.suites) if a.suites else (("memory",) if a.memory else DEFAULT_SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"--suites: unknown {unknown}; registered: {list(SUITES)}")
    grid = a.full or any(x is not None for x in (a.shapes, a.seqlens, a.heads, a.head_dims, a.batch, a.causal,
                                                   a.variants))
    if not a.suites and grid:
        suites = tuple(x for x in suites if x != "bert")  # an attention grid: the end-to-end suite only on request
    return BenchConfig(suites=suites, device=a.device, full=a.full, shapes=a.shapes, seqlens=a.seqlens,
                       heads=a.heads, head_dims=a.head_dims, batch=a.batch, tokens=a.tokens, causal=a.causal,
                       variants=a.variants, dtype=a.dtype, backends=a.backends, modes=tuple(a.modes),
                       reps=a.reps, min_reps=a.min_reps,
                       case_budget_s=a.case_budget, warmup=a.warmup, timer=a.timer, row_memory=not a.no_row_memory,
                       memory_seqlens=a.memory_seqlens, bert_model=a.bert_model, bert_shapes=a.bert_shapes,
                       bert_reps=a.bert_reps, out=a.out or (RESULTS_DIR if a.save else RUNS_DIR),
                       plot=not a.no_plot,
                       progress=not a.no_progress, seed=a.seed)


@dataclass
class RunResult:
    rows: list
    targets: list
    meta: dict
    files: list  # paths written


def _load() -> Optional[tuple]:
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def busy_cores(interval_s: float = 0.5) -> Optional[float]:
    """How many cores other processes keep busy right now (from /proc/stat; None if unknown)."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals) - idle, sum(vals)

    try:
        busy0, total0 = sample()
        time.sleep(interval_s)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def collect_meta(cfg: BenchConfig, device: torch.device, ctx) -> dict:
    fa = core.fastattn
    return {
        "device": core.device_name(device),
        "device_description": (torch.cuda.get_device_name(device) if device.type == "cuda" else core.cpu_model()),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "preset": cfg.preset_name(),
        "suites": list(cfg.suites),
        "torch": torch.__version__,
        "fastattn": getattr(fa, "__version__", None) if fa is not None else f"not importable: {core.FASTATTN_IMPORT_ERROR}",
        "fastattn_backends": fa.available_backends() if fa is not None else [],
        "candidates": [c.name for c in ctx.candidates],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "fastattn_cpu_simd": _fastattn_cpu_simd(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "timer": _timer_description(ctx),
        "reps": ctx.reps, "warmup": ctx.warmup, "case_budget_s": ctx.case_budget_s,
        "load_average_start": _load(),
        "flop_formula": "fwd = 2*B*Hq*Nq*Nk*(D+Dv) (= 4*B*H*N^2*D), /2 if causal; bwd = 2.5x fwd; fwd_bwd = 3.5x fwd",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }


def _timer_description(ctx) -> str:
    if ctx.clock is None:
        return "triton.testing.do_bench"
    if isinstance(ctx.clock, core.WallClock):  # suites.decode_suite times on a flushing one
        return (f"{ctx.clock.name}; decode suite: wall clock, caches flushed before each call "
                f"(a {decode_flush_bytes(core.last_level_cache_bytes()) >> 20} MiB read)")
    return ctx.clock.name


def _fastattn_cpu_simd():
    """The SIMD path of fastattn's CPU kernels on this machine (AVX-512, AVX2, baseline), or None."""
    from fastattn import _ops
    return _ops._C.cpu_simd() if _ops._C is not None else None


def run(cfg: BenchConfig, echo=print) -> RunResult:
    """Run ``cfg``'s suites, print the table and targets, write the files. Callable from tests."""
    ctx = make_context(cfg)
    device = ctx.device
    meta = collect_meta(cfg, device, ctx)
    if device.type == "cpu":
        meta["busy_cores_start"] = busy = busy_cores()
        if busy is not None and busy > 0.25:
            echo(f"note: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: timings will be noisy")
    chosen = {c.name for c in ctx.candidates}
    skipped = [c.name for c in core.select_candidates(device, cfg.backends) if c.name not in chosen]
    if skipped:
        echo(f"left out by default: {', '.join(skipped)} (name it in --backends, or --full, to include it)")
    echo(f"device {meta['device']} ({meta['device_description']}), torch {meta['torch']}, "
         f"{meta['torch_threads']} threads, fastattn CPU SIMD {meta['fastattn_cpu_simd']}; "
         f"candidates: {', '.join(meta['candidates'])}")
    # the machine's copy bandwidth and GEMM rate, at the start and the end: the decode and training
    # targets are fractions of the higher of the two
    rates = [core.machine_rates(device)]
    t0 = time.perf_counter()
    rows = []
    meta["suite_elapsed_s"] = {}
    for name in cfg.suites:
        t_suite = time.perf_counter()
        rows += SUITES[name](cfg, ctx)
        meta["suite_elapsed_s"][name] = round(time.perf_counter() - t_suite, 1)
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    rates.append(core.machine_rates(device))
    machine = {key: max(r[key] for r in rates) for key in rates[0]}
    meta["machine"] = {**machine, "start": rates[0], "end": rates[1]}
    meta["load_average_end"] = _load()
    if device.type == "cpu":
        meta["busy_cores_end"] = busy_cores()
    targets = report.evaluate_targets(rows, machine=machine)
    echo(report.format_machine(machine))
    echo(report.format_table(rows, device.type, machine))
    echo("")
    echo(report.format_targets(targets))

    cfg.out.mkdir(parents=True, exist_ok=True)
    preset = cfg.preset_name()
    stem = cfg.out / (f"{meta['device']}-{_dt.date.today().isoformat()}" + ("" if preset == "quick" else f"-{preset}"))
    files = [stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".csv")]
    report.write_json(files[0], meta, rows, targets)
    report.write_csv(files[1], rows)
    if cfg.plot:
        try:
            files += report.plot(rows, stem, device.type, targets)
        except ImportError:
            echo("matplotlib is not importable: skipped the plots (pip install matplotlib)")
    else:
        echo("plots skipped (--no-plot)")
    echo("")
    per_suite = ", ".join(f"{k} {v:.0f} s" for k, v in meta["suite_elapsed_s"].items())
    echo(f"ran in {meta['elapsed_s']:.0f} s ({per_suite}); wrote " + ", ".join(str(f) for f in files))
    return RunResult(rows, targets, meta, files)


def main(argv: Optional[list] = None) -> int:
    run(config_from_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks.gpu_check``: the GPU test set and the GPU benchmark in one go.

    python -m benchmarks.gpu_check                 # tests + benchmark, < 8 min on one H200
    python -m benchmarks.gpu_check --dry-run       # list what it would run (works without a GPU)
    python -m benchmarks.gpu_check --no-tests      # benchmark only
    python -m benchmarks.gpu_check --out DIR       # default: $OUT if set, else benchmarks/results

1. Tests (one pytest process, FASTATTN_TRITON_AUTOTUNE=0 so each new shape does not
   trigger an autotuning sweep): ``pytest tests -k "triton or cuda"``, i.e.
   tests/test_triton.py on cuda tensors plus the generic backend-parametrised suite
   for the GPU backends (triton, and the CUDA C++ backend / cuda op tests when built).
2. Benchmark: bf16 (and some fp16), B·N = 16k tokens, H = 16 at D = 128 and H = 32 at
   D = 64, N = 512 .. 16k, causal and not, forward and forward+backward (backward
   alone derived from the same steps), fastattn:triton (autotuned), fastattn:cuda when
   built, and torch SDPA with each GPU backend (flash, efficient, cudnn). Timed with
   triton.testing.do_bench (median, L2 flushed). TFLOP/s from benchmarks.core's FLOP
   formula (4·B·H·N²·D forward, half for causal, 2.5x for backward). Cases run in
   priority order (the headline targets first) until the time budget is spent; the
   cases left out are listed as not run, never filled in.

Writes <out>/gpu-<device>-<date>.json (environment, test summary, every row) and a
short markdown table (.md) with the targets judged from the measured rows only.
Exits 2 without CUDA (except --dry-run), 1 when tests fail.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import core
from .core import Case

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

# The targets of the Triton issue (one H200, bf16, B·N = 16k).
TARGET_FWD_TFLOPS = 550.0  # D = 128, N >= 4k, non-causal
TARGET_BWD_TFLOPS = 400.0
TARGET_SPEEDUP_VS_FLASH = 1.2


@dataclass
class GpuCheckConfig:
    """What one run does; the defaults are sized to finish in < 8 min on one H200."""

    out_dir: Path = field(default_factory=lambda: Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR)
    tests: bool = True
    bench: bool = True
    test_timeout_s: float = 240.0  # the pytest process is killed after this (its output so far is kept)
    bench_budget_s: float = 190.0  # no new case starts after this
    tokens: int = 16384  # B·N, as in the FlashAttention papers' sweeps
    seqlens: tuple = (512, 1024, 2048, 4096, 8192, 16384)
    # (dtype, head dim, heads): heads · D = 2048 (the papers' hidden size)
    configs: tuple = (("bfloat16", 128, 16), ("bfloat16", 64, 32), ("float16", 128, 16))
    fp16_seqlens: tuple = (1024, 4096, 16384)  # fp16 is a spot check, not the whole sweep
    candidates: tuple = ("fastattn:triton", "fastattn:cuda", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn")
    modes: tuple = ("fwd", "bwd", "fwd_bwd")
    dry_run: bool = False


# ---------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------
def test_command() -> list:
    return [sys.executable, "-m", "pytest", "tests", "-q", "-rs", "-p", "no:cacheprovider", "-k", "triton or cuda"]


def bench_cases(cfg: GpuCheckConfig) -> list:
    """Cases in priority order: D=128 bf16 non-causal long sequences (the headline), causal, N=512, the rest."""
    cases = []
    for dtype, d, heads in cfg.configs:
        lens = cfg.fp16_seqlens if dtype == "float16" else cfg.seqlens
        for causal in (False, True):
            for n in lens:
                cases.append(Case(batch=max(1, cfg.tokens // n), heads=heads, seqlen=n, head_dim=d, causal=causal,
                                  dtype=dtype))

    def priority(c: Case) -> tuple:
        headline = c.dtype == "bfloat16" and c.head_dim == 128 and c.seqlen >= 4096
        return (c.dtype != "bfloat16", not headline, c.head_dim != 128, c.seqlen != 512, c.causal, -c.seqlen)

    return sorted(cases, key=priority)


def plan(cfg: GpuCheckConfig) -> dict:
    return {"tests": {"command": test_command(), "env": {"FASTATTN_TRITON_AUTOTUNE": "0"},
                      "timeout_s": cfg.test_timeout_s} if cfg.tests else None,
            "bench": {"cases": [c.label for c in bench_cases(cfg)] if cfg.bench else [],
                      "candidates": list(cfg.candidates), "modes": list(cfg.modes),
                      "budget_s": cfg.bench_budget_s},
            "out_dir": str(cfg.out_dir)}


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------
def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "driver": _driver_version() if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed|deselected)")


def run_tests(cfg: GpuCheckConfig) -> dict:
    env = dict(os.environ, FASTATTN_TRITON_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)
    cmd = test_command()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=cfg.test_timeout_s)
        output, returncode, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        returncode, timed_out = None, True
    counts = {}
    lines = output.strip().splitlines()
    summary = next((ln for ln in reversed(lines) if _SUMMARY.search(ln)), "")
    for num, word in _SUMMARY.findall(summary):
        counts[word.rstrip("s") if word == "errors" else word] = int(num)
    ok = not timed_out and returncode == 0
    return {"command": " ".join(cmd), "returncode": returncode, "timed_out": timed_out, "ok": ok,
            "seconds": round(time.perf_counter() - start, 1), "summary": summary, "counts": counts,
            "output_tail": "\n".join(lines[-60:])}


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------
def _candidates(cfg: GpuCheckConfig, device: torch.device) -> list:
    available = {c.name: c for c in core.available_candidates(device)}
    return [available[name] for name in cfg.candidates if name in available]


def run_bench(cfg: GpuCheckConfig, device: torch.device) -> dict:
    cands = _candidates(cfg, device)
    missing = [n for n in cfg.candidates if n not in {c.name for c in cands}]
    rows, not_run = [], []
    start = time.perf_counter()
    for case in bench_cases(cfg):
        if time.perf_counter() - start > cfg.bench_budget_s:
            not_run.append(case.label)
            continue
        inputs = core.make_inputs(case, device)
        prepared, outputs, reference = {}, {}, None
        for cand in cands:
            reason = cand.why_unsupported(case, device)
            if reason is None:
                try:
                    prepared[cand.name] = cand.prepare(case, inputs)
                    with torch.no_grad():  # warm-up (compiles; autotunes triton for this key)
                        out = prepared[cand.name].call()
                    core.run_train_step(prepared[cand.name])
                    torch.cuda.synchronize()
                    if cand.name == "sdpa:flash":
                        reference = out.float()
                    outputs[cand.name] = out
                except Exception as e:  # noqa: BLE001  (recorded: an unsupported case is a row with a note)
                    prepared.pop(cand.name, None)
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    torch.cuda.empty_cache()
            if reason is not None:
                rows.append({"case": case.label, **case.as_dict(), "backend": cand.name, "mode": None,
                             "time_s": None, "tflops": None, "note": reason})
        diffs = {name: (out.float() - reference).abs().max().item() if reference is not None else None
                 for name, out in outputs.items()}
        del outputs
        timings = core.time_with_do_bench(prepared, cfg.modes)
        for (name, mode), t in timings.items():
            flops = core.attention_flops(case, mode)
            rows.append({"case": case.label, **case.as_dict(), "backend": name, "mode": mode,
                         "time_s": t["median_s"], "tflops": flops / t["median_s"] / 1e12,
                         "max_abs_diff_vs_sdpa_flash": diffs.get(name), "note": ""})
        del prepared, inputs, reference
        torch.cuda.empty_cache()
    return {"rows": rows, "not_run": not_run, "missing_candidates": missing,
            "seconds": round(time.perf_counter() - start, 1), "timer": "triton.testing.do_bench (median)",
            "triton_configs": triton_configs_chosen()}


def triton_configs_chosen() -> dict:
    """The config autotuning picked for each tuning key of each Triton kernel run so far
    (what the next ordering of the spaces in csrc/triton/autotune.py should learn from)."""
    try:
        from fastattn.triton_kernels import launch
    except ImportError:
        return {}
    if launch._kernels is None or not launch._kernels.autotune:
        return {}
    chosen = {}
    for name in launch._kernels.specs:
        tuner = getattr(launch._kernels, name)
        chosen[name] = {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
    return chosen


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def _tflops(rows, case_label, backend, mode) -> Optional[float]:
    for r in rows:
        if r["case"] == case_label and r["backend"] == backend and r["mode"] == mode and r["tflops"] is not None:
            return r["tflops"]
    return None


def judge_targets(rows: list) -> list:
    """The issue's targets, judged only on measured rows (a target with no row says so)."""
    verdicts = []
    head = sorted({r["case"] for r in rows if r["dtype"] == "bfloat16" and r["head_dim"] == 128
                   and r["seqlen"] >= 4096 and not r["causal"]})
    for mode, target in (("fwd", TARGET_FWD_TFLOPS), ("bwd", TARGET_BWD_TFLOPS)):
        for label in head:
            ours, flash = _tflops(rows, label, "fastattn:triton", mode), _tflops(rows, label, "sdpa:flash", mode)
            if ours is None:
                verdicts.append(f"{mode} {label}: no triton measurement")
                continue
            speed = f"{ours / flash:.2f}x flash" if flash else "flash not measured"
            ok = ours >= target and (flash is None or ours >= TARGET_SPEEDUP_VS_FLASH * flash)
            verdicts.append(f"{mode} {label}: {ours:.0f} TFLOP/s (target {target:.0f}), {speed} (target "
                            f"{TARGET_SPEEDUP_VS_FLASH}x): {'met' if ok else 'NOT met'}")
    for label in sorted({r["case"] for r in rows if r["seqlen"] == 512}):
        for mode in ("fwd", "fwd_bwd"):
            ours = _tflops(rows, label, "fastattn:triton", mode)
            best = max((t for t in (_tflops(rows, label, b, mode) for b in ("sdpa:flash", "sdpa:efficient",
                                                                               "sdpa:cudnn")) if t), default=None)
            if ours is not None and best is not None:
                verdicts.append(f"{mode} {label}: triton {ours:.0f} vs best SDPA {best:.0f} TFLOP/s: "
                                f"{'no regression' if ours >= best else 'REGRESSION'}")
    return verdicts


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# fastattn GPU check, {env['date_utc']}", "",
             f"GPU {env['gpu']}, driver {env['driver']}, CUDA {env['cuda_runtime']}, torch {env['torch']}, "
             f"triton {env['triton']}", ""]
    tests = result.get("tests")
    if tests:
        lines += [f"Tests: `{tests['command']}`: {tests['summary'] or 'no summary'}"
                  f"{' (TIMED OUT)' if tests['timed_out'] else ''}, {tests['seconds']} s", ""]
    bench = result.get("bench")
    if bench:
        backends = [b for b in result["config"]["candidates"] if any(r["backend"] == b for r in bench["rows"])]
        lines += ["TFLOP/s (median of triton.testing.do_bench; '-' = not measured, see JSON notes)", "",
                  "| case | mode | " + " | ".join(backends) + " |", "|---|---|" + "---|" * len(backends)]
        for label in dict.fromkeys(r["case"] for r in bench["rows"]):
            for mode in result["config"]["modes"]:
                cells = [_tflops(bench["rows"], label, b, mode) for b in backends]
                if any(c is not None for c in cells):
                    lines.append(f"| {label} | {mode} | " + " | ".join("-" if c is None else f"{c:.0f}"
                                                                        for c in cells) + " |")
        if bench["not_run"]:
            lines += ["", f"Not run (time budget): {', '.join(bench['not_run'])}"]
        if bench["missing_candidates"]:
            lines += ["", f"Not available here: {', '.join(bench['missing_candidates'])}"]
        lines += ["", "Targets:"] + [f"- {v}" for v in judge_targets(bench["rows"])]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path) -> tuple:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = result["environment"]
    stem = f"gpu-{core.slug(env['gpu'] or 'none')}-{env['date_utc'][:10]}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md_path.write_text(markdown(result))
    return json_path, md_path


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan (tests, cases, candidates) and exit")
    p.add_argument("--no-tests", action="store_true", help="skip the GPU test run")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    p.add_argument("--out", type=Path, help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--bench-budget-s", type=float, help="no new benchmark case starts after this many seconds")
    p.add_argument("--test-timeout-s", type=float, help="kill the pytest run after this many seconds")
    return p


def config_from_args(argv=None) -> GpuCheckConfig:
    args = build_parser().parse_args(argv)
    cfg = GpuCheckConfig(tests=not args.no_tests, bench=not args.no_bench, dry_run=args.dry_run)
    if args.out is not None:
        cfg.out_dir = args.out
    if args.bench_budget_s is not None:
        cfg.bench_budget_s = args.bench_budget_s
    if args.test_timeout_s is not None:
        cfg.test_timeout_s = args.test_timeout_s
    return cfg


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    if cfg.dry_run:
        print(json.dumps(plan(cfg), indent=1))
        return 0
    if not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device here; this check needs an NVIDIA GPU "
              "(use --dry-run to see what it would run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is not benchmarked; keep defaults explicit
    result = {"environment": environment(), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in asdict(cfg).items()}}
    if cfg.tests:
        print(f"[gpu_check] tests: {' '.join(test_command())}", flush=True)
        result["tests"] = run_tests(cfg)
        print(f"[gpu_check] tests: {result['tests']['summary']} ({result['tests']['seconds']} s)", flush=True)
    if cfg.bench:
        print(f"[gpu_check] benchmark: {len(bench_cases(cfg))} cases, budget {cfg.bench_budget_s:.0f} s", flush=True)
        result["bench"] = run_bench(cfg, torch.device("cuda"))
    json_path, md_path = write_results(result, cfg.out_dir)
    print(markdown(result))
    print(f"[gpu_check] wrote {json_path} and {md_path}")
    return 1 if cfg.tests and not result["tests"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())

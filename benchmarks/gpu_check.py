"""``python -m benchmarks.gpu_check``: build, self-test, sanitizers, tests and benchmark on one GPU, in one call.

    python -m benchmarks.gpu_check                 # everything, <= ~9 min on one H200
    python -m benchmarks.gpu_check --dry-run       # the plan with its time estimates (works without a GPU)
    python -m benchmarks.gpu_check --no-build      # use the extension already built
    python -m benchmarks.gpu_check --out DIR       # default: $OUT if set, else benchmarks/results

Each stage is its own process with its own time limit (a CUDA illegal-address error poisons
the whole process: it must not take the other backends' results with it), and each stage's
result is appended to <out>/gpu_check.jsonl the moment it ends, the benchmark's rows to
<out>/gpu_bench.jsonl case by case, so a crash or a timeout leaves everything measured before it.
A stage that would not finish inside the total budget is not started (and listed as not run).

1. build: ``pip install --no-deps --no-build-isolation -e .`` with FASTATTN_CUDA=1, every core
   (MAX_JOBS) and only this GPU's arch (TORCH_CUDA_ARCH_LIST); its time is reported.
2. selftest: ``python -m fastattn.selftest`` (every backend, every feature it claims).
3. sanitizer: ``compute-sanitizer`` memcheck on a handful of small cases per backend (dense
   causal bf16 D=128, Nq=77, Nk=133, GQA, dropout and a key mask; varlen with empty sequences; a
   bottom-right sliding window),
   then racecheck and synccheck on the CUDA kernels. Where compute-sanitizer refuses the
   device (some runtimes do), the stage says so and the run goes on.
4. tests: tests/test_cuda.py, then the Triton tests (``pytest tests -k triton``), each in its
   own process, FASTATTN_TRITON_AUTOTUNE=0 so each new shape does not start an autotuning sweep.
5. benchmark: bf16 (and some fp16), B·N = 16k tokens, H = 16 at D = 128 and H = 32 at
   D = 64, N = 512 .. 16k, causal and not, forward and forward+backward (backward
   alone derived from the same steps), fastattn:triton (autotuned), fastattn:cuda when
   built, and torch SDPA with each GPU backend (flash, efficient, cudnn). Timed with
   triton.testing.do_bench (median, L2 flushed). TFLOP/s from benchmarks.core's FLOP
   formula (4·B·H·N²·D forward, half for causal, 2.5x for backward). Cases run in
   priority order (the headline targets first) until the time budget is spent; the
   cases left out are listed as not run, never filled in.

Writes <out>/gpu-<device>-<date>.json (environment, stages, every row) and a short markdown
table (.md) with the targets judged from the measured rows only. Exits 2 without CUDA
(except --dry-run), 1 when a stage failed.
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
from dataclasses import asdict, dataclass, field, replace
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
    build: bool = True
    selftest: bool = True
    sanitizer: bool = True
    tests: bool = True
    bench: bool = True
    total_budget_s: float = 540.0  # a stage whose estimate does not fit in what is left is not started
    test_timeout_s: float = 150.0  # each pytest process is killed after this (its output so far is kept)
    bench_budget_s: float = 100.0  # no new case starts after this
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
@dataclass
class Stage:
    """One step of the check: a command run in its own process."""
    name: str
    command: list
    estimate_s: float  # expected seconds on one H200 with 16 cores (estimates: no GPU has run the check yet)
    timeout_s: float
    env: dict = field(default_factory=dict)
    sanitizer: bool = False  # compute-sanitizer may refuse the device: then the stage is "unavailable"


def device_arch() -> str:
    """This GPU's arch for TORCH_CUDA_ARCH_LIST ("9.0" on an H200); a placeholder without one."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "<this GPU's arch>"


def test_command(*selection) -> list:
    return [sys.executable, "-m", "pytest", *selection, "-q", "-rs", "-p", "no:cacheprovider"]


SANITIZER_TOOLS = (("memcheck", ("cuda", "triton")), ("racecheck", ("cuda",)), ("synccheck", ("cuda",)))


def stages(cfg: GpuCheckConfig) -> list:
    py, out = sys.executable, str(cfg.out_dir)
    no_autotune = {"FASTATTN_TRITON_AUTOTUNE": "0"}
    plan = []
    if cfg.build:
        plan.append(Stage("build", [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
                          120, 300, {"FASTATTN_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 8),
                                     "TORCH_CUDA_ARCH_LIST": device_arch()}))
    if cfg.selftest:
        plan.append(Stage("selftest", [py, "-m", "fastattn.selftest", "--json", f"{out}/selftest.json"], 60, 150))
    if cfg.sanitizer:
        for tool, backends in SANITIZER_TOOLS:
            for backend in backends:
                plan.append(Stage(f"sanitizer:{tool}:{backend}",
                                  ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", py, "-m",
                                   "benchmarks.gpu_check", "--sanitizer-cases", backend],
                                  25, 90, dict(no_autotune), sanitizer=True))
    if cfg.tests:
        plan.append(Stage("tests:cuda", test_command("tests/test_cuda.py"), 50, cfg.test_timeout_s, dict(no_autotune)))
        plan.append(Stage("tests:triton", test_command("tests", "-k", "triton"), 80,
                          cfg.test_timeout_s, dict(no_autotune)))
    if cfg.bench:
        plan.append(Stage("bench", [py, "-m", "benchmarks.gpu_check", "--bench-only", "--out", out,
                                    "--bench-budget-s", str(cfg.bench_budget_s)], cfg.bench_budget_s + 25,
                          cfg.bench_budget_s + 120))
    return plan


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
    steps = stages(cfg)
    return {"stages": [{"name": st.name, "command": st.command, "env": st.env, "estimate_s": st.estimate_s,
                        "timeout_s": st.timeout_s} for st in steps],
            "estimate_total_s": sum(st.estimate_s for st in steps), "total_budget_s": cfg.total_budget_s,
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
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed|deselected|not served)")
# compute-sanitizer's own refusals (not findings in our kernels): the device or runtime is not supported
_SANITIZER_REFUSED = re.compile(r"Device not supported|Target application terminated before first instrumented API|"
                                r"Unable to find injection library|Error: Could not find|sanitizer.*not supported|"
                                r"No such file or directory: 'compute-sanitizer'", re.I)


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line, written and flushed at once (what a later crash cannot take back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def stage_status(stage: Stage, returncode: Optional[int], timed_out: bool, output: str) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    if stage.sanitizer and _SANITIZER_REFUSED.search(output) and "ERROR SUMMARY: 0 errors" not in output:
        return "unavailable"
    return "failed"


def run_stage(stage: Stage, log: Path) -> dict:
    """Runs one stage in its own process; its record goes to ``log`` before this returns."""
    env = dict(os.environ, **stage.env)
    env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(stage.command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=stage.timeout_s)
        output, returncode, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as e:
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        returncode, timed_out = None, True
    except OSError as e:  # e.g. compute-sanitizer not installed
        output, returncode, timed_out = f"{type(e).__name__}: {e}", None, False
    lines = output.strip().splitlines()
    summary = next((ln for ln in reversed(lines) if _SUMMARY.search(ln) or "ERROR SUMMARY" in ln), "")
    record = {"stage": stage.name, "command": " ".join(stage.command), "env": stage.env, "returncode": returncode,
              "timed_out": timed_out, "status": stage_status(stage, returncode, timed_out, output),
              "seconds": round(time.perf_counter() - start, 1), "estimate_s": stage.estimate_s,
              "summary": summary, "output_tail": "\n".join(lines[-60:])}
    if record["status"] == "unavailable":
        record["summary"] = "compute-sanitizer refused this device/runtime: " + next(
            (ln for ln in lines if _SANITIZER_REFUSED.search(ln)), "")
    append_jsonl(log, record)
    return record


def sanitizer_cases(backend: str) -> int:
    """The small cases the sanitizer stages run (forward and backward of each): 0 when all ran."""
    import fastattn

    device = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_()

    q, k, v = randn(2, 4, 77, 128), randn(2, 2, 133, 128), randn(2, 2, 133, 128)
    key_mask = torch.ones(2, 1, 1, 133, dtype=torch.bool)
    key_mask[1, ..., 100:] = False
    out = fastattn.attention(q, k, v, causal=True, attn_mask=key_mask.to(device), dropout_p=0.1, backend=backend)
    out.backward(torch.randn_like(out))
    lens = [0, 5, 77, 1, 0, 64]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(device)
    qv, kv, vv = randn(sum(lens), 4, 64), randn(sum(lens), 2, 64), randn(sum(lens), 2, 64)
    out = fastattn.varlen_attention(qv, kv, vv, cu, cu, max(lens), max(lens), causal=True, backend=backend)
    out.backward(torch.randn_like(out))
    # the banded kernels' block bounds: a window whose sides fall inside blocks, bottom-right, Nq < Nk
    out = fastattn.attention(q, k, v, causal=True, window_size=(37, 0), alignment="bottom_right", backend=backend)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print(f"sanitizer cases on {backend}: dense causal bf16 D=128 77x133 GQA dropout key mask; varlen with empty "
          f"sequences; sliding window (37, 0) bottom-right: ran")
    return 0


# ---------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------
def _candidates(cfg: GpuCheckConfig, device: torch.device) -> list:
    available = {c.name: c for c in core.available_candidates(device)}
    return [available[name] for name in cfg.candidates if name in available]


def run_bench(cfg: GpuCheckConfig, device: torch.device, rows_log: Optional[Path] = None) -> dict:
    cands = _candidates(cfg, device)
    missing = [n for n in cfg.candidates if n not in {c.name for c in cands}]
    rows, not_run, done_rows = [], [], 0
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
        if rows_log is not None:
            for row in rows[done_rows:]:
                append_jsonl(rows_log, row)
        done_rows = len(rows)
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
    stage_rows = result.get("stages") or []
    if stage_rows:
        lines += ["| stage | status | seconds | summary |", "|---|---|---|---|"]
        lines += [f"| {st['stage']} | {st['status']} | {st.get('seconds', '-')} | {st.get('summary', '')} |"
                  for st in stage_rows]
        lines.append("")
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
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, estimates, cases) and exit")
    p.add_argument("--no-build", action="store_true", help="use the extension already built")
    p.add_argument("--no-selftest", action="store_true", help="skip python -m fastattn.selftest")
    p.add_argument("--no-sanitizer", action="store_true", help="skip the compute-sanitizer stages")
    p.add_argument("--no-tests", action="store_true", help="skip the GPU test runs")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    p.add_argument("--out", type=Path, help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--total-budget-s", type=float, help="stages that would end after this many seconds are not run")
    p.add_argument("--bench-budget-s", type=float, help="no new benchmark case starts after this many seconds")
    p.add_argument("--test-timeout-s", type=float, help="kill each pytest run after this many seconds")
    # what the stages' own processes run
    p.add_argument("--bench-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sanitizer-cases", metavar="BACKEND", help=argparse.SUPPRESS)
    return p


def config_from_args(argv=None) -> tuple:
    args = build_parser().parse_args(argv)
    cfg = GpuCheckConfig(build=not args.no_build, selftest=not args.no_selftest, sanitizer=not args.no_sanitizer,
                         tests=not args.no_tests, bench=not args.no_bench, dry_run=args.dry_run)
    if args.out is not None:
        cfg.out_dir = args.out
    for name in ("total_budget_s", "bench_budget_s", "test_timeout_s"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    return cfg, args


def main(argv=None) -> int:
    cfg, args = config_from_args(argv)
    if cfg.dry_run:
        print_plan(cfg)
        return 0
    if not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device here; this check needs an NVIDIA GPU "
              "(use --dry-run to see what it would run)", file=sys.stderr)
        return 2
    if args.sanitizer_cases:
        return sanitizer_cases(args.sanitizer_cases)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is not benchmarked; keep defaults explicit
    if args.bench_only:  # the bench stage's own process: rows go to gpu_bench.jsonl as they come
        bench = run_bench(cfg, torch.device("cuda"), rows_log=cfg.out_dir / "gpu_bench.jsonl")
        append_jsonl(cfg.out_dir / "gpu_bench.jsonl", {"summary": {k: v for k, v in bench.items() if k != "rows"}})
        return 0
    log, bench_log = cfg.out_dir / "gpu_check.jsonl", cfg.out_dir / "gpu_bench.jsonl"
    for stale in (log, bench_log):  # this run's logs only
        stale.unlink(missing_ok=True)
    result = {"environment": environment(), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in asdict(cfg).items()}}
    append_jsonl(log, {"stage": "environment", **result["environment"]})
    result["stages"] = run_stages(stages(cfg), cfg.total_budget_s, log)
    if cfg.bench and bench_log.exists():
        rows, summary = [], {}
        for line in bench_log.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "summary" in item and "case" not in item:
                summary = item["summary"]
            else:
                rows.append(item)
        result["bench"] = {"rows": rows, "not_run": summary.get("not_run", []),
                           "missing_candidates": summary.get("missing_candidates", []),
                           "triton_configs": summary.get("triton_configs", {}),
                           "complete": bool(summary)}
    json_path, md_path = write_results(result, cfg.out_dir)
    print(markdown(result))
    print(f"[gpu_check] wrote {json_path}, {md_path} and {log}")
    return 1 if any(r["status"] in ("failed", "timeout") for r in result["stages"]) else 0


def run_stages(plan_stages: list, total_budget_s: float, log: Path) -> list:
    """Each stage in its own process, in order, whatever the previous ones did; a stage whose
    estimate no longer fits in the budget is recorded as not run. Returns the records."""
    records, start = [], time.perf_counter()
    for stage in plan_stages:
        left = total_budget_s - (time.perf_counter() - start)
        if stage.estimate_s > left:
            record = {"stage": stage.name, "status": "not run",
                      "summary": f"{max(left, 0):.0f} s left of the budget, estimate {stage.estimate_s:.0f} s"}
            append_jsonl(log, record)
        else:
            print(f"[gpu_check] {stage.name}: {' '.join(stage.command)}", flush=True)
            # its timeout is cut to what is left of the budget (plus a little)
            record = run_stage(replace(stage, timeout_s=min(stage.timeout_s, left + 30)), log)
        records.append(record)
        print(f"[gpu_check] {stage.name}: {record['status']} {record.get('summary', '')} "
              f"({record.get('seconds', 0)} s)", flush=True)
    return records


def print_plan(cfg: GpuCheckConfig) -> None:
    """The plan as a table (stderr) and as JSON (stdout)."""
    p = plan(cfg)
    for st in p["stages"]:
        env = " ".join(f"{k}={v}" for k, v in st["env"].items())
        print(f"  {st['name']:<26} ~{st['estimate_s']:>4.0f} s (limit {st['timeout_s']:>4.0f} s)  {env} "
              f"{' '.join(st['command'])}", file=sys.stderr)
    print(f"  total ~{p['estimate_total_s']:.0f} s of a {p['total_budget_s']:.0f} s budget; benchmark: "
          f"{len(p['bench']['cases'])} cases in priority order within {p['bench']['budget_s']:.0f} s", file=sys.stderr)
    print(json.dumps(p, indent=1))


if __name__ == "__main__":
    sys.exit(main())

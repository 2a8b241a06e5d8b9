"""Output of a run: the printed table, the targets, JSON / CSV files and PNG plots."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .core import DTYPE_SHORT, Case, Row

MIB = 2 ** 20


# ---------------------------------------------------------------------------
# Targets: what the issues promise, checked against the rows of this run
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    text: str  # the promise, in words
    metric: str  # "speedup_vs_naive" | "speedup_vs_sdpa" | "speedup_vs_case" (higher is better)
    #              | "memory_vs_sdpa" (lower) | "kv_rate_vs_copy" | "flops_vs_gemm" (fractions of the
    #              machine's copy bandwidth / fp32 GEMM rate measured in the same run: higher)
    case: Case
    mode: str
    threshold: Optional[float]  # None: reported only (the issue gives no number yet)
    backend: str = "fastattn:cpu"
    sdpa_backend: str = "sdpa:flash"  # memory target: torch SDPA's default CPU backend
    suite: str = "attention"
    other_case: Optional[Case] = None  # speedup_vs_case: time(other_case) / time(case), same backend


# The targets against torch SDPA at the training and half-precision shapes are ratios a few per cent
# from their thresholds, which the attention rows' few repetitions of every candidate (naive and math
# included) cannot resolve on a shared host. fastattn and the fastest SDPA backend are timed again, as
# pairs, for as many repetitions as suites.PAIRED_BUDGET_S allows; those targets read these rows, and
# print the 95% confidence interval of the median per-repetition ratio beside it.
PAIRED = "attention side by side"

_BASE = Case(4, 12, 512, 64)
TARGETS = [
    Target("forward >= 3x faster than the naive PyTorch reference", "speedup_vs_naive", _BASE, "fwd", 3.0),
    Target("forward+backward >= 1.5x faster than the naive PyTorch reference", "speedup_vs_naive", _BASE,
           "fwd_bwd", 1.5),
    Target("extra peak memory of forward+backward <= 1.5x torch SDPA's (flash)", "memory_vs_sdpa",
           Case(1, 8, 8192, 64), "fwd_bwd", 1.5),
]
# The training shapes of the CPU speed issues against the fastest torch SDPA backend that runs them
# (on CPU the default, flash): forward+backward >= 1.15x, forward >= 1.05x and >= 90% of the fp32
# GEMM rate (round two); dropout and key padding reported without a threshold.
_TRAINING = (Case(8, 12, 128, 64), _BASE, Case(1, 12, 2048, 64), Case(1, 16, 2048, 128, causal=True))
for _case in _TRAINING:
    TARGETS += [
        Target("forward >= 1.05x torch SDPA", "speedup_vs_sdpa", _case, "fwd", 1.05, suite=PAIRED),
        Target("forward+backward >= 1.15x torch SDPA", "speedup_vs_sdpa", _case, "fwd_bwd", 1.15, suite=PAIRED),
        Target("forward >= 90% of the fp32 GEMM rate", "flops_vs_gemm", _case, "fwd", 0.9, suite=PAIRED),
    ]
for _case in (Case(4, 12, 512, 64, dropout_p=0.1), Case(4, 12, 512, 64, key_padding=True)):
    for _mode in (("fwd_bwd",) if _case.dropout_p else ("fwd", "fwd_bwd")):
        TARGETS.append(Target("speed against torch SDPA (fastest SDPA backend that runs it)", "speedup_vs_sdpa", _case, _mode, None))
# Half precision: bf16 and fp16 forward and forward+backward >= 1.2x SDPA in the same dtype (the
# fastest SDPA backend: in fp16 on CPU that is math for forward+backward, flash's fp16 path is slow)
for _dtype, _short in (("bfloat16", "bf16"), ("float16", "fp16")):
    for _mode in ("fwd", "fwd_bwd"):
        TARGETS.append(Target(f"{_short} >= 1.2x torch SDPA in {_short}", "speedup_vs_sdpa",
                              Case(4, 12, 512, 64, dtype=_dtype), _mode, 1.2, suite=PAIRED))
# The variants issue: a causal window of 256 at N = 8192 does ~16x less work than full causal.
_WINDOW = Case(1, 8, 8192, 64, causal=True, window=256)
TARGETS += [
    # timed side by side (the cases round-robin within each repetition: suites.windows_side_by_side)
    Target("sliding window (256, 0) forward+backward >= 10x faster than full causal", "speedup_vs_case", _WINDOW,
           "fwd_bwd", 10.0, suite="variants side by side", other_case=Case(1, 8, 8192, 64, causal=True)),
    Target("sliding window forward+backward at least as fast as torch SDPA given the equivalent bool mask",
           "speedup_vs_sdpa", _WINDOW, "fwd_bwd", 1.0, suite="variants"),
]


# Decoding (round two): every decode shape, fp32 and bf16, >= 2x SDPA (enable_gqa) and K/V read at
# >= 50% of the copy bandwidth
def _decode_targets() -> list:
    from .config import DECODE_DTYPES, DECODE_SHAPES, decode_case

    out = []
    for dtype in DECODE_DTYPES:
        for b, nq, nk in DECODE_SHAPES:
            case = decode_case(b, nq, nk, dtype)
            out += [Target("decode >= 2x torch SDPA (enable_gqa)", "speedup_vs_sdpa", case, "fwd", 2.0, suite="decode"),
                    Target("decode reads K/V at >= 50% of the copy bandwidth", "kv_rate_vs_copy", case, "fwd", 0.5,
                           suite="decode")]
    return out


TARGETS += _decode_targets()


@dataclass
class TargetResult:
    target: Target
    value: Optional[float]
    status: str  # "PASS", "MISS", "info", "not measured"
    ci: Optional[tuple] = None  # paired x SDPA: 95% CI of the median per-repetition ratio
    pairs: Optional[int] = None  # ... over this many repetitions

    def as_dict(self) -> dict:
        t = self.target
        return {"text": t.text, "metric": t.metric, "case": t.case.label, "mode": t.mode, "backend": t.backend,
                "threshold": t.threshold, "value": self.value, "status": self.status, "ci": self.ci,
                "pairs": self.pairs}

    def ci_text(self) -> str:
        """ "[95% CI 1.08-1.14, 21 pairs]", with ", spans the threshold" when the interval holds the threshold
        (the run cannot tell which side the kernel is on); "" without an interval."""
        if self.ci is None:
            return ""
        lo, hi = self.ci
        t = self.target.threshold
        side = "" if t is None or lo >= t or hi < t else ", spans the threshold"
        return f"[95% CI {lo:.2f}-{hi:.2f}, {self.pairs} pairs{side}]"


def _find(rows, case: Case, mode: str, backend: str, suite: Optional[str] = None) -> Optional[Row]:
    for row in rows:
        if row.case == case and row.mode == mode and row.backend == backend and suite in (None, row.suite):
            return row
    return None


def _memory(rows, case: Case, backend: str) -> Optional[int]:
    for suite in ("memory", "attention"):  # the memory suite's figure first
        row = _find(rows, case, "fwd_bwd", backend, suite)
        if row is not None and row.extra_peak_bytes:
            return row.extra_peak_bytes
    return None


def evaluate_targets(rows: list, targets: list = TARGETS, machine: Optional[dict] = None) -> list:
    """``machine``: core.machine_rates of this run (the kv_rate_vs_copy and flops_vs_gemm targets)."""
    results = []
    for t in targets:
        value, ci, pairs = None, None, None
        if t.metric in ("kv_rate_vs_copy", "flops_vs_gemm"):
            row = _find(rows, t.case, t.mode, t.backend, t.suite)
            ours, limit = ((row and row.kv_bytes_per_s, machine and machine["copy_bytes_per_s"])
                           if t.metric == "kv_rate_vs_copy" else
                           (row and row.flops_per_s, machine and machine["gemm_flops_per_s"]))
            value = ours / limit if ours and limit else None
        elif t.metric == "memory_vs_sdpa":
            ours, theirs = _memory(rows, t.case, t.backend), _memory(rows, t.case, t.sdpa_backend)
            value = ours / theirs if ours and theirs else None
        elif t.metric == "speedup_vs_case":
            row, other = _find(rows, t.case, t.mode, t.backend, t.suite), _find(rows, t.other_case, t.mode,
                                                                                  t.backend, t.suite)
            if row is not None and other is not None and row.time_s and other.time_s:
                value = other.time_s / row.time_s
        else:
            row = _find(rows, t.case, t.mode, t.backend, t.suite)
            value = getattr(row, t.metric) if row is not None else None
            if row is not None and t.metric == "speedup_vs_sdpa" and row.speedup_ci is not None:
                ci, pairs = row.speedup_ci, row.reps
        if value is None:
            status = "not measured"
        elif t.threshold is None:
            status = "info"
        elif t.metric == "memory_vs_sdpa":
            status = "PASS" if value <= t.threshold else "MISS"
        else:
            status = "PASS" if value >= t.threshold else "MISS"
        results.append(TargetResult(t, value, status, ci, pairs))
    return results


def format_targets(results: list) -> str:
    measured = [r for r in results if r.status != "not measured"]
    if not measured:
        return "targets: none of the target rows ran (they are CPU rows of the quick default's suites)"
    lines = ["targets (measured in this run; speedups are time(other) / time(fastattn))"]
    for r in results:
        t = r.target
        if t.metric == "memory_vs_sdpa":
            what = f"{t.backend} / {t.sdpa_backend} extra peak"
        elif t.metric == "speedup_vs_naive":
            what = f"{t.backend} vs naive"
        elif t.metric == "speedup_vs_case":
            what = f"{t.backend} vs itself on {t.other_case.label.split(' D=')[0]}"
        elif t.metric == "kv_rate_vs_copy":
            what = f"{t.backend} K/V GB/s / copy GB/s"
        elif t.metric == "flops_vs_gemm":
            what = f"{t.backend} GFLOP/s / fp32 GEMM's"
        else:
            what = f"{t.backend} vs best SDPA"
        fraction = t.metric in ("kv_rate_vs_copy", "flops_vs_gemm")
        value = "—" if r.value is None else (f"{r.value:.0%}" if fraction else f"{r.value:.2f}x")
        bound = "" if t.threshold is None else (f" (need <= {t.threshold:g}x)" if t.metric == "memory_vs_sdpa"
                                                  else f" (need >= {t.threshold:.0%})" if fraction
                                                  else f" (need >= {t.threshold:g}x)")
        lines.append(f"  [{r.status:^12}] {t.case.label:<34} {t.mode:<8} {what:<38} {value:>7}{bound}  "
                     f"{t.text}  {r.ci_text()}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------
def flops_unit(device_type: str) -> tuple:
    return ("TFLOP/s", 1e12) if device_type == "cuda" else ("GFLOP/s", 1e9)


def _num(x, fmt: str, width: int) -> str:
    return f"{'—':>{width}}" if x is None else f"{x:{width}{fmt}}"


def format_machine(machine: Optional[dict]) -> str:
    if not machine:
        return ""
    return (f"machine (measured in this run, the higher of its start and end): copy bandwidth "
            f"{machine['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + written by a 256 MiB copy_), fp32 GEMM "
            f"{machine['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s (torch.mm)")


def format_table(rows: list, device_type: str, machine: Optional[dict] = None) -> str:
    """``machine``: core.machine_rates of this run; decode rows then give their K/V rate as a share of its copy bandwidth."""
    unit, scale = flops_unit(device_type)
    lines = []
    speed = [r for r in rows if r.suite not in ("memory", "bert")]
    header = (f"  {'mode':<8} {'backend':<18} {'time ms':>9} {unit:>8} {'extra MiB':>9} {'x naive':>7} "
              f"{'x SDPA':>7} {'max err':>8} {'reps':>4}  note")
    current = None
    for r in speed:
        if (r.suite, r.case) != current:
            current = (r.suite, r.case)
            scopes = {x.err_scope for x in speed if (x.suite, x.case) == current and x.err_scope}
            scope = f"   (max err on {', '.join(sorted(scopes))} of the output)" if scopes else ""
            if r.suite == "decode" and device_type == "cpu":  # see suites.decode_suite
                scope += "   (K/V from memory: caches flushed before each call)"
            lines += ["", f"{r.suite}: {r.case.label}{scope}", header]
        if r.time_s is None:
            lines.append(f"  {r.mode:<8} {r.backend:<18} {'—':>9} {'':>8} {'':>9} {'':>7} {'':>7} {'':>8} {'':>4}  "
                         f"{r.note}")
            continue
        note = r.note
        if r.kv_bytes_per_s:
            share = f" = {r.kv_bytes_per_s / machine['copy_bytes_per_s']:.0%} of copy" if machine else ""
            note = f"K/V {r.kv_bytes_per_s / 1e9:.1f} GB/s{share}" + (f"; {note}" if note else "")
        lines.append(
            f"  {r.mode:<8} {r.backend:<18} {r.time_s * 1e3:9.2f} "
            f"{_num(r.flops_per_s and r.flops_per_s / scale, '.1f', 8)} "
            f"{_num(r.extra_peak_bytes and r.extra_peak_bytes / MIB, '.1f', 9)} "
            f"{_num(r.speedup_vs_naive, '.2f', 7)} {_num(r.speedup_vs_sdpa, '.2f', 7)} "
            f"{_num(r.max_abs_err, '.1e', 8)} {_num(r.reps, 'd', 4)}  {note}".rstrip())
    mem = [r for r in rows if r.suite == "memory"]
    if mem:
        lines += ["", "memory: extra peak memory of one forward+backward (inputs excluded, outputs and grads included)",
                  f"  {'case':<34} {'backend':<18} {'extra MiB':>10} {'x sdpa:flash':>12}  note"]
        for r in mem:
            sdpa = _find(mem, r.case, "fwd_bwd", "sdpa:flash")
            ratio = (r.extra_peak_bytes / sdpa.extra_peak_bytes
                     if sdpa is not None and sdpa.extra_peak_bytes and r.extra_peak_bytes is not None else None)
            lines.append(f"  {r.case.label:<34} {r.backend:<18} "
                         f"{_num(r.extra_peak_bytes and r.extra_peak_bytes / MIB, '.1f', 10)} "
                         f"{_num(ratio, '.2f', 12)}  {r.note}".rstrip())
    model_rows = [r for r in rows if r.suite == "bert"]
    if model_rows:
        from .bert import format_model_table

        lines += ["", format_model_table(model_rows)]
    return "\n".join(lines).lstrip("\n")


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def write_json(path: Path, meta: dict, rows: list, targets: list) -> None:
    payload = {"meta": meta, "rows": [r.as_dict() for r in rows], "targets": [t.as_dict() for t in targets]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: list) -> None:
    dicts = [r.as_dict() for r in rows]
    if not dicts:
        path.write_text("")
        return
    fields = list(dict.fromkeys(key for d in dicts for key in d))  # suites have different columns
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(dicts)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------
def _series_key(case: Case) -> tuple:
    return (case.head_dim, case.causal, case.variant, case.dtype)


def _series_title(key: tuple) -> str:
    d, causal, variant, dtype = key
    return f"D={d}{' causal' if causal else ''} {variant} {DTYPE_SHORT[dtype]}"


def _series_with_seqlens(rows: list) -> dict:
    """{series key: rows} for series measured at 2 or more sequence lengths."""
    groups = {}
    for r in rows:
        groups.setdefault(_series_key(r.case), []).append(r)
    return {k: v for k, v in groups.items() if len({r.case.seqlen for r in v}) >= 2}


def _seqlen_axis(ax, seqlens: set) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(seqlens))
    ax.set_xticklabels([str(n) for n in sorted(seqlens)], fontsize=7)
    from matplotlib.ticker import NullLocator

    ax.xaxis.set_minor_locator(NullLocator())


def plot(rows: list, stem: Path, device_type: str, targets: Optional[list] = None) -> list:
    """speed-vs-N, memory-vs-N and (given ``targets``, evaluate_targets' results) target PNGs next to
    the JSON; returns their paths ([] if nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, scale = flops_unit(device_type)
    written = []
    speed = [r for r in rows if r.suite == "attention" and r.time_s is not None]
    series = _series_with_seqlens(speed)
    modes = [m for m in ("fwd", "bwd", "fwd_bwd") if any(r.mode == m for r in speed)]
    if series and modes:
        fig, axes = plt.subplots(len(series), len(modes), figsize=(5 * len(modes), 3.6 * len(series)),
                                 squeeze=False)
        for i, (key, srows) in enumerate(sorted(series.items(), key=lambda kv: str(kv[0]))):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                for backend in dict.fromkeys(r.backend for r in srows):
                    pts = sorted((r.case.seqlen, r.flops_per_s / scale) for r in srows
                                 if r.backend == backend and r.mode == mode)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=backend)
                _seqlen_axis(ax, {r.case.seqlen for r in srows})
                varies = len({(r.case.batch, r.case.heads) for r in srows}) > 1  # e.g. tokens held constant
                ax.set_title(f"{mode}: {_series_title(key)}{' (B, H vary with N)' if varies else ''}", fontsize=9)
                ax.set_xlabel("sequence length N")
                ax.set_ylabel(unit)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.parent / (stem.name + "-speed.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    # memory: the memory suite (fixed B, H, D) and, per series, the attention rows' training steps
    mem_groups = {}
    for r in rows:
        if r.extra_peak_bytes is None or r.mode != "fwd_bwd":
            continue
        key = ("memory suite",) if r.suite == "memory" else ("attention",) + _series_key(r.case)
        mem_groups.setdefault(key, []).append(r)
    mem_groups = {k: v for k, v in mem_groups.items() if len({r.case.seqlen for r in v}) >= 2}
    if mem_groups:
        fig, axes = plt.subplots(1, len(mem_groups), figsize=(5.5 * len(mem_groups), 4), squeeze=False)
        for ax, (key, mrows) in zip(axes[0], sorted(mem_groups.items(), key=lambda kv: str(kv[0]))):
            for backend in dict.fromkeys(r.backend for r in mrows):
                pts = sorted((r.case.seqlen, r.extra_peak_bytes / MIB) for r in mrows if r.backend == backend)
                ax.plot(*zip(*pts), marker="o", label=backend)
            c = mrows[0].case
            title = (f"one fwd+bwd, B={c.batch} H={c.heads} D={c.head_dim} {DTYPE_SHORT[c.dtype]}"
                     if key[0] == "memory suite" else f"fwd+bwd rows: {_series_title(key[1:])}")
            ax.set_title(title, fontsize=9)
            _seqlen_axis(ax, {r.case.seqlen for r in mrows})
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("extra peak memory (MiB)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.parent / (stem.name + "-memory.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    path = _plot_targets(plt, targets or [], stem.parent / (stem.name + "-targets.png"))
    return written + ([path] if path else [])


def _target_margin(r: TargetResult) -> float:
    """measured / needed, oriented so that >= 1 passes (memory: needed / measured)."""
    t = r.target
    return t.threshold / r.value if t.metric == "memory_vs_sdpa" else r.value / t.threshold


def _plot_targets(plt, results: list, path: Path) -> Optional[Path]:
    """One bar per measured target with a threshold: the measurement over the threshold (1 = just met).

    The shapes that are not a sequence-length series (decode, half precision, windows) appear here."""
    shown = [r for r in results if r.value is not None and r.target.threshold is not None]
    if not shown:
        return None
    what = {"speedup_vs_naive": "x naive", "speedup_vs_sdpa": "x SDPA", "speedup_vs_case": "x other case",
            "memory_vs_sdpa": "memory / SDPA's", "kv_rate_vs_copy": "K/V rate / copy", "flops_vs_gemm": "of GEMM rate"}
    labels = [f"{r.target.case.label} {r.target.mode}: {what[r.target.metric]}" for r in shown]
    margins = [_target_margin(r) for r in shown]
    fig, ax = plt.subplots(figsize=(9, 0.26 * len(shown) + 1.2))
    ys = range(len(shown))[::-1]  # the targets' order, top to bottom
    ax.barh(list(ys), margins, color=["tab:green" if r.status == "PASS" else "tab:red" for r in shown])
    ax.axvline(1.0, color="black", linewidth=1)
    for y, r in zip(ys, shown):  # paired x SDPA: the 95% CI of the median ratio as a whisker
        if r.ci is not None:
            ax.plot([r.ci[0] / r.target.threshold, r.ci[1] / r.target.threshold], [y, y], color="black", linewidth=1)
    for y, m, r in zip(ys, margins, shown):
        value = f"{r.value:.0%}" if r.target.metric in ("kv_rate_vs_copy", "flops_vs_gemm") else f"{r.value:.2f}x"
        ax.text(m, y, f" {value}", va="center", fontsize=6)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlim(0, max(max(margins), 1.0) * 1.15)
    ax.set_xlabel("measured / needed (>= 1 meets the target; memory: needed / measured)")
    passed = sum(r.status == "PASS" for r in shown)
    ax.set_title(f"targets measured in this run: {passed} of {len(shown)} met", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



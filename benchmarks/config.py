"""The benchmark's configuration and its presets (the quick default and the full sweep)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from .core import MODES, Case

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed figures (--save)
RUNS_DIR = Path(__file__).resolve().parent / "runs"  # every run's outputs by default; ignored by git
DEFAULT_SUITES = ("attention", "variants", "decode", "memory", "bert")  # the quick default runs all five

VARIANTS = ("plain", "padding", "gqa", "dropout")
DROPOUT_P = 0.1  # the dropout variant's probability (the target row)
GQA_GROUPS = (4, 3, 2)  # GQA variant: Hkv = Hq / the first of these that divides Hq


@dataclass
class BenchConfig:
    """Everything one run does; ``python -m benchmarks --help`` sets these from the command line.

    Unset fields (None) take the preset's value for the device, so one config means
    the same thing on a laptop CPU and on an H200.
    """

    suites: tuple = DEFAULT_SUITES  # names in benchmarks.suites.SUITES
    device: str = "auto"  # "auto": cuda when present, else cpu
    full: bool = False  # the full sweep: N = 128 .. 16k at a constant token count, D 64/128, causal or not
    # grid of shapes (any of these switches from the quick preset to a grid)
    shapes: Optional[list] = None  # explicit (B, H, N, D) tuples
    seqlens: Optional[list] = None
    heads: Optional[list] = None  # default: hidden // D (2048 on CUDA as flash-attention's plots, 768 on CPU)
    head_dims: Optional[list] = None
    batch: Optional[int] = None  # default: tokens // N, so every N processes the same number of tokens
    tokens: int = 16384  # tokens per batch in a sweep (flash-attention's benchmarks use 16k)
    causal: Optional[list] = None  # [False], [True] or [False, True]
    variants: Optional[list] = None  # subset of VARIANTS
    dtype: Optional[str] = None  # default: float32 on CPU (the targets), bfloat16 on CUDA
    backends: Optional[list] = None  # candidate names or families ("fastattn", "sdpa", "naive", ...); None: all
    modes: tuple = MODES
    # timing
    reps: Optional[int] = None  # repetitions (median reported): default 5 on CPU, 30 on CUDA
    min_reps: int = 3  # a case's time budget never cuts below this
    case_budget_s: Optional[float] = None  # stop adding repetitions to a case after this (0: never); 10 s on CPU
    warmup: Optional[int] = None  # untimed calls per candidate and kind of call: 1 on CPU, 5 on CUDA
    timer: str = "auto"  # "auto" (wall clock on CPU, CUDA events on GPU) or "do_bench" (GPU, not interleaved)
    row_memory: bool = True  # extra peak memory for every row (CPU: a fresh subprocess per row)
    # the memory suite: one forward+backward per backend at B=1, H=8, D=64
    memory_seqlens: Optional[list] = None
    # the bert suite (end to end): model preset and (batch, seqlen) shapes; default BERT-mini at
    # 16x128 and 4x512 on CPU, BERT-base at 64x128 and 16x512 (bf16 autocast) on CUDA
    bert_model: Optional[str] = None
    bert_shapes: Optional[list] = None
    bert_reps: Optional[int] = None  # default: --reps
    # output
    out: Path = RUNS_DIR
    plot: bool = True
    progress: bool = True
    seed: int = 0

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device)

    def is_grid(self) -> bool:
        return bool(self.full or self.shapes or self.seqlens or self.heads or self.head_dims or self.batch
                    or self.causal is not None or self.variants)

    def preset_name(self) -> str:
        if len(self.suites) == 1 and self.suites[0] != "attention":
            return self.suites[0]  # memory, bert, variants, decode
        if self.full:
            return "full"
        if self.is_grid():
            return "custom"
        # a subset of the default suites is named by them, so that it never replaces a quick run's files
        return "quick" if tuple(self.suites) in (DEFAULT_SUITES, ("attention",)) else "-".join(self.suites)


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------
_ALL = MODES
_TRAIN = ("bwd", "fwd_bwd")

# The quick default on CPU: the issues' target shapes, side by side, fp32 (about 3 minutes on 2 cores).
QUICK_CPU = [
    (Case(8, 12, 128, 64), _ALL),
    (Case(4, 12, 512, 64), _ALL),  # the foundation issue's speed target
    (Case(1, 12, 2048, 64), _ALL),
    (Case(1, 16, 2048, 128, causal=True), _ALL),
    (Case(4, 12, 512, 64, dropout_p=DROPOUT_P), _TRAIN),  # dropout only matters when training
    (Case(4, 12, 512, 64, key_padding=True), _ALL),
    (Case(4, 12, 512, 64, kv_heads=3), _ALL),  # GQA, 4 query heads per k/v head
]
# ... and half precision at the foundation shape, against SDPA in the same dtype (round two's target).
# They keep their dtype: --dtype runs the whole preset in one dtype instead.
QUICK_CPU_HALF = [(Case(4, 12, 512, 64, dtype=dtype), ("fwd", "fwd_bwd")) for dtype in ("bfloat16", "float16")]

# The quick default on CUDA: tokens = 16k, hidden 2048 (as flash-attention's benchmarks), bf16.
QUICK_CUDA = [(Case(16384 // n, 2048 // d, n, d, causal=c), _ALL)
              for n in (512, 2048, 8192) for d in (64, 128) for c in (False, True)]
QUICK_CUDA += [(Case(8, 16, 2048, 128, key_padding=True), _ALL),
               (Case(8, 16, 2048, 128, kv_heads=4), _ALL),
               (Case(8, 16, 2048, 128, dropout_p=DROPOUT_P), _TRAIN)]

FULL_SEQLENS = [128 * 2 ** i for i in range(8)]  # 128 .. 16384
GRID_SEQLENS = [512, 1024, 2048]
MEMORY_SHAPE = dict(batch=1, heads=8, head_dim=64)  # the foundation issue's memory target shape
MEMORY_SEQLENS = {("cpu", False): [2048, 8192], ("cpu", True): [1024, 2048, 4096, 8192, 16384],
                  ("cuda", False): [2048, 8192, 16384], ("cuda", True): [1024, 2048, 4096, 8192, 16384, 32768]}


def default_dtype(device: torch.device) -> str:
    return "float32" if device.type == "cpu" else "bfloat16"


def device_defaults(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"reps": 30, "warmup": 5, "case_budget_s": None, "hidden": 2048}
    return {"reps": 5, "warmup": 1, "case_budget_s": 10.0, "hidden": 768}


def gqa_kv_heads(heads: int) -> int:
    for group in GQA_GROUPS:
        if heads % group == 0 and heads > group:
            return heads // group
    return 1  # multi-query


def _variant_case(case: Case, variant: str) -> Case:
    if variant == "padding":
        return replace(case, key_padding=True)
    if variant == "gqa":
        return replace(case, kv_heads=gqa_kv_heads(case.heads))
    if variant == "dropout":
        return replace(case, dropout_p=DROPOUT_P)
    return case


def attention_cases(cfg: BenchConfig, device: torch.device) -> list:
    """[(Case, modes)] the attention suite runs, in order."""
    dtype = cfg.dtype or default_dtype(device)
    wanted = tuple(m for m in MODES if m in cfg.modes)
    if not cfg.is_grid():
        preset = QUICK_CUDA if device.type == "cuda" else QUICK_CPU
        cases = [(replace(c, dtype=dtype), tuple(m for m in modes if m in wanted))
                 for c, modes in preset]
        if device.type == "cpu" and cfg.dtype is None:
            cases += [(c, tuple(m for m in modes if m in wanted)) for c, modes in QUICK_CPU_HALF]
        return [(c, modes) for c, modes in cases if modes]
    causal = cfg.causal if cfg.causal is not None else ([False, True] if cfg.full else [False])
    variants = cfg.variants or (["plain", "padding", "gqa"] if cfg.full else ["plain"])
    if cfg.shapes:
        base = [(b, h, n, d) for b, h, n, d in cfg.shapes]
    else:
        seqlens = cfg.seqlens or (FULL_SEQLENS if cfg.full else GRID_SEQLENS)
        head_dims = cfg.head_dims or ([64, 128] if cfg.full else [64])
        hidden = device_defaults(device)["hidden"]
        base = []
        for d in head_dims:
            for h in (cfg.heads or [max(1, hidden // d)]):
                for n in seqlens:
                    base.append((cfg.batch or max(1, cfg.tokens // n), h, n, d))
    out = []
    for b, h, n, d in base:
        for c in causal:
            for variant in variants:
                case = _variant_case(Case(b, h, n, d, causal=c, dtype=dtype), variant)
                modes = _TRAIN if case.dropout_p > 0 else _ALL
                modes = tuple(m for m in modes if m in wanted)
                if modes:
                    out.append((case, modes))
    return out


# The variants suite: causal sliding windows at N = 8192 beside full causal at the same shape (the
# variants issue's target: window 256 forward+backward >= 10x faster than full causal, and faster
# than SDPA given the equivalent bool mask).
WINDOW_CASE = Case(1, 8, 8192, 64, causal=True)
WINDOWS = (0, 256, 1024)  # 0: full causal


def variant_cases(cfg: BenchConfig, device: torch.device) -> list:
    """[(Case, modes)] of the variants suite: full causal and the windows (fwd, fwd_bwd)."""
    dtype = cfg.dtype or default_dtype(device)
    wanted = tuple(m for m in MODES if m in cfg.modes)
    cases = [(replace(WINDOW_CASE, window=w, dtype=dtype), tuple(m for m in ("fwd", "fwd_bwd") if m in wanted))
             for w in WINDOWS]
    return [(c, modes) for c, modes in cases if modes]


# The decode suite (the CPU speed issue, round two): Nq new queries against a cache of Nk keys, no
# mask, Llama-style GQA (32 query heads on 8 K/V heads, D = 128), forward only, in float32 and
# bfloat16 (--dtype picks one). Memory-bound: judged by the K/V bytes read per second against the
# machine's copy bandwidth, and against SDPA with enable_gqa.
DECODE_SHAPES = [(1, 1, 1024), (1, 1, 8192), (1, 1, 32768), (8, 1, 4096), (1, 4, 8192)]  # (B, Nq, Nk)
DECODE_DTYPES = ("float32", "bfloat16")


def decode_case(batch: int, nq: int, nk: int, dtype: str) -> Case:
    """One decode shape: the suite's rows and the report's targets both build it here."""
    return Case(batch, 32, nk, 128, kv_heads=8, seqlen_q=nq, dtype=dtype)


def decode_cases(cfg: BenchConfig, device: torch.device) -> list:
    """[(Case, ("fwd",))] of the decode suite: every shape in every dtype."""
    if "fwd" not in cfg.modes:
        return []
    dtypes = (cfg.dtype,) if cfg.dtype else DECODE_DTYPES
    return [(decode_case(b, nq, nk, dtype), ("fwd",)) for dtype in dtypes for b, nq, nk in DECODE_SHAPES]


def memory_cases(cfg: BenchConfig, device: torch.device) -> list:
    """Cases of the memory suite: one forward+backward each, B=1, H=8, D=64 unless overridden."""
    dtype = cfg.dtype or default_dtype(device)
    seqlens = cfg.memory_seqlens or cfg.seqlens or MEMORY_SEQLENS[(device.type, cfg.full)]
    batch = cfg.batch or MEMORY_SHAPE["batch"]
    heads = (cfg.heads or [MEMORY_SHAPE["heads"]])[0]
    head_dim = (cfg.head_dims or [MEMORY_SHAPE["head_dim"]])[0]
    return [Case(batch, heads, n, head_dim, dtype=dtype) for n in seqlens]


def parse_shape(text: str) -> tuple:
    """"4x12x512x64" -> (B, H, N, D)."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"shape {text!r} must be BxHxNxD, e.g. 4x12x512x64")
    return tuple(int(p) for p in parts)


__all__ = ["BenchConfig", "attention_cases", "variant_cases", "decode_case", "decode_cases", "memory_cases", "parse_shape",
           "device_defaults", "default_dtype",
           "QUICK_CPU", "QUICK_CPU_HALF", "QUICK_CUDA", "VARIANTS", "RESULTS_DIR", "RUNS_DIR"]

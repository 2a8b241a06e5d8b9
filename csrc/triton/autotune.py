"""Block sizes, warps and stages: the autotuning search space, written as data.

On a GPU the launchers wrap each kernel in ``triton.autotune`` over these
configs, keyed on what changes the best choice: head dims, causal, mask kind,
dropout, varlen and the sequence-length bucket (next power of two, so a new
length in the same bucket reuses the measurement). ``fits`` drops configs whose
tiles would not fit in registers/shared memory at large head dims, before any
is compiled. Under the interpreter (TRITON_INTERPRET=1) one small fixed config
is used instead: autotuning there would multiply the test time.
"""
import os

import triton

from . import interpreting  # noqa: F401  (re-exported: launch.py asks it)

# (BLOCK_M, BLOCK_N, num_warps, num_stages), most promising first (Triton's Hopper tutorial
# settings lead): only the first MAX_CONFIGS_TRIED that fit the head dim are compiled and timed.
FWD_SPACE = [
    (128, 64, 4, 3),
    (128, 128, 8, 3),
    (128, 64, 8, 4),
    (64, 64, 4, 3),
    (128, 32, 4, 4),
    (64, 32, 4, 4),
    (32, 32, 4, 2),  # head dim 256
]
# dK/dV: BLOCK_N key rows stay resident, BLOCK_M query rows stream through.
BWD_DKDV_SPACE = [
    (32, 128, 4, 3),
    (64, 128, 8, 3),
    (32, 64, 4, 3),
    (64, 64, 4, 3),
    (32, 32, 4, 2),
    (16, 32, 4, 2),
    (16, 16, 4, 2),  # head dim 256
]
# dQ: BLOCK_M query rows resident, BLOCK_N key rows stream.
BWD_DQ_SPACE = [
    (128, 32, 4, 3),
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (32, 32, 4, 2),
    (16, 32, 4, 2),  # head dim 256
]
# Each config is one compilation per kernel variant (dtype, head dim, causal, mask, ...), seconds
# each: this bounds the autotuning time of a new variant.
MAX_CONFIGS_TRIED = 4
PREPROCESS_BLOCK_M = 64

# Interpreter: one config, big enough that the NumPy-backed interpreter does few programs.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32

# Autotuning keys (argument names of the kernels).
TUNING_KEY = ["seqlen_bucket", "head_dim", "head_dim_v", "CAUSAL", "MASK_KIND", "DROPOUT", "IS_VARLEN",
              "INPUT_PRECISION"]


def autotune_enabled() -> bool:
    """False with FASTATTN_TRITON_AUTOTUNE=0: each kernel then runs one fixed config (``fixed_config``)."""
    return os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"


def fixed_config(space, head_dim: int, resident: str, resident_tiles: int) -> tuple:
    """The config used without autotuning: the first of ``space`` with blocks <= 64 that fits ``head_dim``."""
    for m, n, warps, stages in space:
        rows, stream = (m, n) if resident == "M" else (n, m)
        if max(m, n) <= 64 and fits(rows, stream, head_dim, resident_tiles):
            return m, n, warps, stages
    return space[-1]


def seqlen_bucket(n: int) -> int:
    """Next power of two of a sequence length, at least 64: the length part of the tuning key."""
    return max(64, triton.next_power_of_2(max(int(n), 1)))


def head_block(d: int) -> int:
    """Head dim padded inside the kernel: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(d)))


def fits(block_rows: int, block_stream: int, head_dim: int, resident_tiles: int) -> bool:
    """Whether ``resident_tiles`` fp32 (block_rows x head_dim) accumulators plus the streamed tiles fit.

    A rough register budget (not a measurement): an SM has 64K 32-bit registers; 40K words of
    live tiles is about what one CTA holds before spilling. Only head dims >= 128 are pruned.
    """
    d = head_block(head_dim)
    words = resident_tiles * block_rows * d + 2 * block_stream * d + 2 * block_rows * block_stream
    return words <= 40 * 1024 if d >= 128 else True


def _configs(space):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in space]


def _prune(resident: str, resident_tiles: int):
    def prune(configs, named_args, **kwargs):
        d = max(int(named_args["head_dim"]), int(named_args["head_dim_v"]))
        kept = [c for c in configs
                if fits(c.kwargs["BLOCK_M" if resident == "M" else "BLOCK_N"],
                        c.kwargs["BLOCK_N" if resident == "M" else "BLOCK_M"], d, resident_tiles)]
        return kept[:MAX_CONFIGS_TRIED] or configs[-1:]
    return prune


def autotuned(kernel, space, resident: str, resident_tiles: int):
    """``kernel`` wrapped in triton.autotune over ``space`` (configs that do not fit are pruned first)."""
    return triton.autotune(configs=_configs(space), key=TUNING_KEY,
                           prune_configs_by={"early_config_prune": _prune(resident, resident_tiles)})(kernel)

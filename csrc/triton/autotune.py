"""Block sizes, warps and stages: the autotuning search space, written as data.

On a GPU the launchers wrap each kernel in ``triton.autotune`` over these
configs, keyed on what changes the best choice: head dims, causal / window, soft-cap, mask kind,
dropout, varlen and the sequence-length bucket (next power of two, so a new
length in the same bucket reuses the measurement). ``fits`` drops configs whose
tiles would not fit in registers/shared memory at large head dims, before any
is compiled. Under the interpreter (TRITON_INTERPRET=1) one small fixed config
is used instead: autotuning there would multiply the test time.
"""
import os

import triton

from . import interpreting  # noqa: F401  (re-exported: launch.py asks it)

# (BLOCK_M, BLOCK_N, num_warps, num_stages), most promising first: only the first
# MAX_CONFIGS_TRIED that ``fits`` the head dim are compiled and timed. The order comes from
# compiling every config for sm_90 (bf16, D=64 and 128) with ``compile_check --configs all``:
# at both head dims the configs tried first for the plain kernels use no spill stack (the
# register file holds every live tile), and configs that spill at D=128 (e.g. fwd 128x64
# with 4 warps, dK/dV 64x128) are either pruned by ``fits`` there or come last. Causal,
# float-mask and dropout variants hold more live tiles and some of their tried configs
# spill (8-576 B per thread); timing on a GPU decides between those.
FWD_SPACE = [
    (128, 128, 8, 3),
    (128, 64, 4, 3),  # D <= 64 (spills at D=128, where fits() drops it)
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (128, 32, 4, 4),
    (64, 32, 4, 4),
    (32, 32, 4, 2),  # head dim 256
]
# dK/dV: BLOCK_N key rows stay resident, BLOCK_M query rows stream through.
BWD_DKDV_SPACE = [
    (32, 128, 8, 3),
    (64, 128, 8, 3),  # D <= 64
    (32, 64, 4, 3),
    (64, 64, 4, 3),  # D <= 64
    (32, 64, 8, 3),
    (16, 64, 4, 3),
    (32, 128, 4, 3),  # Triton tutorial's choice; spills even at D=64 (128 B) with our four resident tiles
    (32, 32, 4, 2),
    (16, 32, 4, 2),
    (16, 16, 4, 2),  # head dim 256
]
# dQ: BLOCK_M query rows resident, BLOCK_N key rows stream.
BWD_DQ_SPACE = [
    (128, 64, 8, 3),
    (128, 32, 4, 3),  # D <= 64
    (128, 32, 8, 3),
    (64, 64, 8, 3),
    (64, 32, 4, 3),
    (64, 64, 4, 3),  # spills 56 B at D=128
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
TUNING_KEY = ["seqlen_bucket", "head_dim", "head_dim_v", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "MASK_KIND", "DROPOUT",
              "IS_VARLEN",
              "INPUT_PRECISION"]


def autotune_enabled() -> bool:
    """False with FASTATTN_TRITON_AUTOTUNE=0: each kernel then runs one fixed config (``fixed_config``)."""
    return os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"


def fixed_config(space, head_dim: int, resident: str, resident_tiles: int) -> tuple:
    """The config used without autotuning: the first of ``space`` with blocks <= 64 that fits ``head_dim``."""
    for m, n, warps, stages in space:
        rows, stream = (m, n) if resident == "M" else (n, m)
        if max(m, n) <= 64 and fits(rows, stream, head_dim, resident_tiles, warps):
            return m, n, warps, stages
    return space[-1]


def seqlen_bucket(n: int) -> int:
    """Next power of two of a sequence length, at least 64: the length part of the tuning key."""
    return max(64, triton.next_power_of_2(max(int(n), 1)))


def head_block(d: int) -> int:
    """Head dim padded inside the kernel: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(d)))


# Live fp32 words per thread above which a config spills registers: calibrated with
# ``compile_check --configs all`` on sm_90 (bf16, plain kernels): 288 words compiled without spills
# in every kernel (e.g. dK/dV 32x64 at D=128, 244 registers); 320 spilled in dK/dV
# (64x64 at D=128 with 4 warps: 104 B of stack), 384 in the forward (128x64 at D=128).
MAX_WORDS_PER_THREAD = 288


def fits(block_rows: int, block_stream: int, head_dim: int, resident_tiles: int, num_warps: int = 4,
         extra_score_tiles: int = 0) -> bool:
    """Whether a config's live register tiles fit without spilling (a model, see MAX_WORDS_PER_THREAD).

    Counts the fp32 words per thread of the ``resident_tiles`` (block_rows x head_dim)
    tiles a program keeps for its whole life (accumulators, resident operands) and of
    the two (block_rows x block_stream) score tiles (s and p, or p and dp), plus
    ``extra_score_tiles`` more (see extra_score_tiles); the streamed operands wait in
    shared memory, not registers.
    """
    d = head_block(head_dim)
    words = resident_tiles * block_rows * d + (2 + extra_score_tiles) * block_rows * block_stream
    return words <= MAX_WORDS_PER_THREAD * 32 * num_warps


def extra_score_tiles(dropout: bool, mask_kind: int, mask_row: bool) -> int:
    """Score-sized tiles a kernel variant holds beyond s and p: dropout's Philox words and keep
    mask count as two, a mask (the tile, or the key-padding row with its pipelined loads) as one.
    With them ``fits`` drops the configs that spilled most in compile_check: forward 128x128 with
    dropout (336 B at D=64, 536 B at D=128), with a float mask tile (112 B at D=128) or key
    padding (128 B at D=128); forward 128x64 with 4 warps and key padding (104 B at D=64)."""
    return (2 if dropout else 0) + (1 if mask_kind != 0 else 0)


def _configs(space):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in space]


def _prune(resident: str, resident_tiles: int):
    def prune(configs, named_args, **kwargs):
        """Triton calls it with the positional arguments by name and the keyword ones (the constexpr flags)."""
        d = max(int(named_args["head_dim"]), int(named_args["head_dim_v"]))
        extra = extra_score_tiles(bool(kwargs.get("DROPOUT", False)), int(kwargs.get("MASK_KIND", 0)),
                                  bool(kwargs.get("MASK_ROW", False)))
        kept = [c for c in configs
                if fits(c.kwargs["BLOCK_M" if resident == "M" else "BLOCK_N"],
                        c.kwargs["BLOCK_N" if resident == "M" else "BLOCK_M"], d, resident_tiles, c.num_warps, extra)]
        return kept[:MAX_CONFIGS_TRIED] or configs[-1:]
    return prune


def autotuned(kernel, space, resident: str, resident_tiles: int):
    """``kernel`` wrapped in triton.autotune over ``space`` (configs that do not fit are pruned first)."""
    return triton.autotune(configs=_configs(space), key=TUNING_KEY,
                           prune_configs_by={"early_config_prune": _prune(resident, resident_tiles)})(kernel)

"""``python -m fastattn.triton_kernels.compile_check``: compile the kernels for a GPU without one.

The interpreter (how the tests run without a GPU) does not compile anything, so errors
that only the compiler sees (non-constexpr globals, type clashes between branches,
unsupported ops) would first show on a GPU. This compiles the kernels ahead of time
for a CUDA target (default sm_90, H100/H200) down to a cubin with the ptxas bundled
in the triton wheel, specialised as the JIT would for a contiguous call, and prints the
shared memory, registers and spill stack (cuobjdump) of each variant.

    python -m fastattn.triton_kernels.compile_check               # bf16, D=64, one variant per feature set
    python -m fastattn.triton_kernels.compile_check --arch 80 --dtype fp16 --head-dim 128 --variants all
    python -m fastattn.triton_kernels.compile_check --head-dim 128 --variants 0 --configs all   # every autotune config

Needs TRITON_INTERPRET unset or 0 from the start: ``import torch`` (which runs before this
module, through ``import fastattn``) already imports triton, whose standard library is
decorated for the interpreter when the variable is 1.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
    sys.exit("compile_check: run it with TRITON_INTERPRET=0 (or unset); triton was imported in interpreter mode")

import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import autotune as cfg  # noqa: E402
from . import flash_bwd, flash_fwd  # noqa: E402

_POINTER_TYPES = {"CuSeqlensQ": "*i32", "CuSeqlensK": "*i32", "Lse": "*fp32", "Delta": "*fp32", "Mask": "*u8",
                  "Alibi": "*fp32", "Sinks": "*fp32"}
_FLOAT_SCALARS = ("qk_scale", "drop_scale", "scale", "softcap_scale")
_INT64_SCALARS = ("seed", "drop_threshold")

# (causal, MASK_KIND, MASK_ROW, IS_VARLEN, DROPOUT, extra flags): plain; causal + key padding (row path)
# + dropout; causal + float tile mask; varlen; causal; key padding; sliding window (bottom-right) with
# soft-cap, ALiBi and sinks
_ALL_VARIANTS = dict(HAS_LEFT=True, BOTTOM_RIGHT=True, SOFTCAP=True, ALIBI=True, SINKS=True)
VARIANTS = [(False, 0, False, False, False, {}), (True, 1, True, False, True, {}), (True, 2, False, False, False, {}),
            (True, 0, False, True, False, {}), (True, 0, False, False, False, {}), (False, 1, True, False, False, {}),
            (True, 0, False, False, False, _ALL_VARIANTS)]
_PLAIN = dict(HAS_LEFT=False, BOTTOM_RIGHT=False, SOFTCAP=False, ALIBI=False, SINKS=False)


def representative_ints(fn, heads: int, seqlen: int, head_dim: int, mask_kind: int, mask_row: bool,
                        varlen: bool = False) -> dict:
    """Integer arguments of a typical call: contiguous (B, H, N, D) tensors (varlen: packed
    (total, H, D) with a zero batch stride), lse (B, H, N) or (H, total), no GQA.

    The JIT specialises on them (a stride of 1 becomes a constant, multiples of 16 get a
    divisibility hint), and that decides vector widths, async copies and so registers:
    compiling without them would measure a kernel no GPU ever runs.
    """
    if varlen:
        tensor = {"b": 0, "h": head_dim, "n": heads * head_dim, "d": 1}
        lse = {"b": 0, "h": seqlen, "n": 1}
    else:
        tensor = {"b": heads * seqlen * head_dim, "h": seqlen * head_dim, "n": head_dim, "d": 1}
        lse = {"b": heads * seqlen, "h": seqlen, "n": 1}
    if mask_kind == 0:
        mask = {"b": 0, "h": 0, "m": 0, "n": 0}
    elif mask_row:  # key padding (B, 1, 1, Nk) expanded
        mask = {"b": seqlen, "h": 0, "m": 0, "n": 1}
    else:  # one (Nq, Nk) mask shared by the batch and heads
        mask = {"b": 0, "h": 0, "m": seqlen, "n": 1}
    values = {"num_heads_q": heads, "num_heads_k": heads, "group": 1, "head_dim": head_dim,
              "head_dim_v": head_dim}
    for name in fn.arg_names:
        if name.startswith("stride_"):
            tag, axis = name[len("stride_"):-1], name[-1]
            values[name] = (lse if tag == "l" else mask if tag == "m" else tensor)[axis]
    return values


def specialise(fn, dtype: str, constexprs: dict, ints: dict) -> tuple:
    """(signature, constexprs, attrs) as triton's JIT would build them for these argument values.

    Capitalised arguments are pointers (16-byte aligned, as torch allocates), the rest
    scalars; ints equal to 1 become constants and multiples of 16 get a divisibility hint,
    except the arguments the kernel marks do_not_specialize.
    """
    sig, consts, attrs = {}, dict(constexprs), {}
    skip = {p.name for p in fn.params if p.do_not_specialize}
    divisible = [["tt.divisibility", 16]]
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = _POINTER_TYPES.get(name, f"*{dtype}")
            attrs[(i,)] = divisible
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in _INT64_SCALARS:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
            if name in ints and name not in skip:
                kind, spec = native_specialize_impl(BaseBackend, ints[name], False, True, True)
                if kind == "constexpr":
                    sig[name], consts[name] = "constexpr", spec
                elif spec == "D":
                    attrs[(i,)] = divisible
    return sig, consts, attrs


def compile_kernel(fn, dtype: str, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   ints: dict = None):
    """Compile ``fn`` for sm_``arch``; ``ints``: argument values to specialise on (see representative_ints)."""
    target = GPUTarget("cuda", arch, 32)
    sig, consts, attrs = specialise(fn, dtype, constexprs, ints or {})
    src = ASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def resources(kernel) -> dict:
    """Registers per thread and spill stack (bytes) of a compiled kernel, read by cuobjdump from its cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(found.group(1)), "stack": int(found.group(2))} if found else {}


KERNELS = (("fwd", flash_fwd._attn_fwd, cfg.FWD_SPACE, "M", 2),
           ("dkdv", flash_bwd._attn_bwd_dkdv, cfg.BWD_DKDV_SPACE, "N", 4),
           ("dq", flash_bwd._attn_bwd_dq, cfg.BWD_DQ_SPACE, "M", 3))


def configs_of(which: str, space, head_dim: int, resident: str, tiles: int, extra: int = 0) -> list:
    """"fixed": the no-autotune config; "tried": those autotuning compiles and times at this head
    dim for a variant with ``extra`` score tiles (kept by ``fits``, first MAX_CONFIGS_TRIED);
    "all": the whole space."""
    if which == "fixed":
        return [cfg.fixed_config(space, head_dim, resident, tiles)]
    if which == "all":
        return list(space)
    kept = [c for c in space
            if cfg.fits(*((c[0], c[1]) if resident == "M" else (c[1], c[0])), head_dim, tiles, c[2], extra)]
    return kept[:cfg.MAX_CONFIGS_TRIED] or list(space[-1:])


def run(dtype: str = "bf16", head_dim: int = 64, arch: int = 90, variants=(1,), which: str = "fixed") -> list:
    """Compile fwd, dK/dV and dQ (and the preprocess) for a typical contiguous call.

    Each kernel is compiled with the configs ``which`` names (see configs_of). Returns dict
    rows: kernel, flags, config, whether ``fits`` keeps it, shared bytes, registers, spill
    stack bytes, compile seconds.
    """
    rows = []
    block_d = cfg.head_block(head_dim)
    precision = "ieee" if dtype == "fp32" else "tf32"
    for causal, mask_kind, mask_row, varlen, dropout, extra_flags in (VARIANTS[i] for i in variants):
        flags = dict(_PLAIN, **extra_flags, HAS_RIGHT=causal, MASK_KIND=mask_kind, MASK_ROW=mask_row, IS_VARLEN=varlen,
                     DROPOUT=dropout)
        for name, fn, space, resident, tiles in KERNELS:
            ints = representative_ints(fn, 16, 4096, head_dim, mask_kind, mask_row, varlen)
            extra = cfg.extra_score_tiles(dropout, mask_kind, mask_row)
            for m, n, warps, stages in configs_of(which, space, head_dim, resident, tiles, extra):
                consts = dict({key: val for key, val in flags.items() if key in fn.arg_names},
                              INPUT_PRECISION=precision, EMULATE_BF16=False, BLOCK_D=block_d,
                              BLOCK_DV=block_d, BLOCK_M=m, BLOCK_N=n)
                start = time.perf_counter()
                kernel = compile_kernel(fn, dtype, consts, arch, warps, stages, ints)
                rows.append(dict(kernel=name, flags=flags, config=(m, n, warps, stages),
                                 fits=cfg.fits(*((m, n) if resident == "M" else (n, m)), head_dim, tiles, warps,
                                               extra),
                                 shared=kernel.metadata.shared, **resources(kernel),
                                 seconds=time.perf_counter() - start))
    consts = dict(IS_VARLEN=False, BLOCK_M=cfg.PREPROCESS_BLOCK_M, BLOCK_DV=block_d)
    start = time.perf_counter()
    kernel = compile_kernel(flash_bwd._attn_bwd_preprocess, dtype, consts, arch, 4, 1)
    rows.append(dict(kernel="preprocess", flags={}, config=(cfg.PREPROCESS_BLOCK_M, 0, 4, 1), fits=True,
                     shared=kernel.metadata.shared, **resources(kernel), seconds=time.perf_counter() - start))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastattn.triton_kernels.compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 A100, 90 H100/H200)")
    p.add_argument("--variants", default="1", help="comma-separated indices into VARIANTS (0 plain, 1 causal + "
                   "key padding + dropout, 2 causal + float mask, 3 varlen, 4 causal, 5 key padding, 6 sliding "
                   "window + soft-cap + ALiBi + sinks) or 'all'")
    p.add_argument("--configs", default="fixed", choices=("fixed", "tried", "all"),
                   help="fixed: the no-autotune config; tried: those autotuning times at this head dim; all: the "
                   "whole space (registers and spills of each: how the spaces are ordered)")
    args = p.parse_args(argv)
    variants = range(len(VARIANTS)) if args.variants == "all" else [int(i) for i in args.variants.split(",")]
    for row in run(args.dtype, args.head_dim, args.arch, variants, args.configs):
        m, n, warps, stages = row["config"]
        print(f"compiled {row['kernel']:<10} sm_{args.arch} {args.dtype} D={args.head_dim} {row['flags']} "
              f"M={m} N={n} warps={warps} stages={stages}: {row.get('regs', '?')} registers, "
              f"{row.get('stack', '?')} B spilled, shared {row['shared']} B"
              f"{'' if row['fits'] else ', dropped by fits()'} ({row['seconds']:.1f} s)")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastattn.triton_kernels.compile_check``: compile the kernels for a GPU without one.

The interpreter (how the tests run without a GPU) does not compile anything, so errors
that only the compiler sees (non-constexpr globals, type clashes between branches,
unsupported ops) would first show on a GPU. This compiles the kernels ahead of time
for a CUDA target (default sm_90, H100/H200) down to a cubin with the ptxas bundled
in the triton wheel, and prints the shared memory each variant needs.

    python -m fastattn.triton_kernels.compile_check               # bf16, D=64, one variant per feature set
    python -m fastattn.triton_kernels.compile_check --arch 80 --dtype fp16 --head-dim 128 --variants all

Needs TRITON_INTERPRET unset or 0 from the start: ``import torch`` (which runs before this
module, through ``import fastattn``) already imports triton, whose standard library is
decorated for the interpreter when the variable is 1.
"""
import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
    sys.exit("compile_check: run it with TRITON_INTERPRET=0 (or unset); triton was imported in interpreter mode")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import autotune as cfg  # noqa: E402
from . import flash_bwd, flash_fwd  # noqa: E402

_POINTER_TYPES = {"CuSeqlensQ": "*i32", "CuSeqlensK": "*i32", "Lse": "*fp32", "Delta": "*fp32", "Mask": "*u8"}
_FLOAT_SCALARS = ("qk_scale", "drop_scale", "scale")
_INT64_SCALARS = ("seed", "drop_threshold")

# (CAUSAL, MASK_KIND, MASK_ROW, IS_VARLEN, DROPOUT): plain; causal + key padding (row path) + dropout;
# causal + float tile mask; varlen
VARIANTS = [(False, 0, False, False, False), (True, 1, True, False, True), (True, 2, False, False, False),
            (True, 0, False, True, False)]


def signature(fn, dtype: str, constexprs: dict) -> dict:
    """Triton signature of one of our kernels: capitalised arguments are pointers, the rest scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = _POINTER_TYPES.get(name, f"*{dtype}")
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in _INT64_SCALARS:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(fn, dtype: str, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    target = GPUTarget("cuda", arch, 32)
    src = ASTSource(fn, signature(fn, dtype, constexprs), constexprs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def run(dtype: str = "bf16", head_dim: int = 64, arch: int = 90, variants=(1,)) -> list:
    """Compile fwd, dK/dV and dQ (and the preprocess); returns (kernel, variant, shared bytes, seconds) rows."""
    rows = []
    block_d = cfg.head_block(head_dim)
    precision = "ieee" if dtype == "fp32" else "tf32"
    kernels = (("fwd", flash_fwd._attn_fwd, cfg.FWD_SPACE, "M", 2),
               ("dkdv", flash_bwd._attn_bwd_dkdv, cfg.BWD_DKDV_SPACE, "N", 4),
               ("dq", flash_bwd._attn_bwd_dq, cfg.BWD_DQ_SPACE, "M", 3))
    for causal, mask_kind, mask_row, varlen, dropout in (VARIANTS[i] for i in variants):
        for name, fn, space, resident, tiles in kernels:
            m, n, warps, stages = cfg.fixed_config(space, head_dim, resident, tiles)
            consts = dict(CAUSAL=causal, MASK_KIND=mask_kind, MASK_ROW=mask_row, IS_VARLEN=varlen, DROPOUT=dropout,
                          INPUT_PRECISION=precision, EMULATE_BF16=False, BLOCK_D=block_d, BLOCK_DV=block_d,
                          BLOCK_M=m, BLOCK_N=n)
            start = time.perf_counter()
            kernel = compile_kernel(fn, dtype, consts, arch, warps, stages)
            rows.append((name, consts, kernel.metadata.shared, time.perf_counter() - start))
    consts = dict(IS_VARLEN=False, BLOCK_M=cfg.PREPROCESS_BLOCK_M, BLOCK_DV=block_d)
    start = time.perf_counter()
    kernel = compile_kernel(flash_bwd._attn_bwd_preprocess, dtype, consts, arch, 4, 1)
    rows.append(("preprocess", consts, kernel.metadata.shared, time.perf_counter() - start))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastattn.triton_kernels.compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 A100, 90 H100/H200)")
    p.add_argument("--variants", default="1", help="comma-separated indices into VARIANTS (0 plain, 1 causal + "
                   "key padding + dropout, 2 causal + float mask, 3 varlen) or 'all'")
    args = p.parse_args(argv)
    variants = range(len(VARIANTS)) if args.variants == "all" else [int(i) for i in args.variants.split(",")]
    for name, consts, shared, seconds in run(args.dtype, args.head_dim, args.arch, variants):
        flags = {k: v for k, v in consts.items() if k in ("CAUSAL", "MASK_KIND", "MASK_ROW", "IS_VARLEN", "DROPOUT")}
        print(f"compiled {name:<10} sm_{args.arch} {args.dtype} D={args.head_dim} {flags} "
              f"shared={shared} B ({seconds:.1f} s)")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

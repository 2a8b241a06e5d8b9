"""The CPU kernels' SIMD paths against each other.

The library picks its widest path at run time (AVX-512, AVX2+FMA, or portable C++), so a test run
on one machine only exercises one of them. FASTATTN_CPU_SIMD caps the choice; each path runs here
in its own process (the choice is made once per process):

- the AVX-512 micro-kernel computes every element with the same FMA chain as the AVX2 one, so its
  outputs and gradients must be *bitwise* those of the AVX2 path (on a CPU with AVX-512);
- the portable path (what non-x86 CPUs run) must match the float64 reference like the others;
- on a CPU with AMX, bf16 calls with head dims of whole tiles take the AMX path (its own summation
  order, P and dS rounded to bf16 where they are operands): it must keep flash-attention's 2x rule
  against PyTorch's bf16 error, and FASTATTN_CPU_SIMD=avx512 must turn it off.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastattn
from fastattn import _ops
from conftest import FWD_FLOOR, GRAD_FLOOR, assert_within_2x
from fastattn.reference import attention_reference

pytestmark = pytest.mark.skipif(_ops._C is None, reason="the CPU extension is not built")

# Shapes around the micro-kernel's edges: head dims (the N of O = P V) and key counts (the N of
# S = Q Kᵀ) on both sides of one and two 16-column panels, rows on both sides of the 6-row tile.
CASES = [
    dict(B=1, Hq=2, Hkv=1, Nq=7, Nk=33, D=17, causal=False, mask=False, dtype="float32"),
    dict(B=2, Hq=4, Hkv=2, Nq=13, Nk=31, D=33, causal=True, mask=False, dtype="float32"),
    dict(B=1, Hq=2, Hkv=2, Nq=97, Nk=65, D=59, causal=False, mask=True, dtype="float32"),
    dict(B=1, Hq=3, Hkv=1, Nq=64, Nk=97, D=64, causal=True, mask=False, dtype="float32"),
    dict(B=1, Hq=2, Hkv=1, Nq=1, Nk=1000, D=128, causal=False, mask=False, dtype="float32"),
    dict(B=1, Hq=2, Hkv=1, Nq=5, Nk=48, D=129, causal=False, mask=True, dtype="float32"),
    dict(B=1, Hq=2, Hkv=1, Nq=40, Nk=40, D=65, causal=True, mask=False, dtype="bfloat16"),
    dict(B=1, Hq=2, Hkv=2, Nq=6, Nk=32, D=16, causal=False, mask=False, dtype="float16"),
    # the decode path (tasks of <= decode_max_rows rows): quads of rows, key blocks, a value row's last 8 columns
    dict(B=2, Hq=8, Hkv=2, Nq=3, Nk=131, D=64, causal=True, mask=False, dtype="bfloat16"),
    dict(B=1, Hq=16, Hkv=1, Nq=1, Nk=77, D=24, causal=False, mask=True, dtype="float32"),
    dict(B=2, Hq=6, Hkv=2, Nq=5, Nk=200, D=40, causal=True, mask=True, dtype="float32"),
    dict(B=2, Hq=8, Hkv=2, Nq=1, Nk=515, D=128, causal=False, mask=False, dtype="bfloat16"),  # one quad
    dict(B=1, Hq=8, Hkv=2, Nq=4, Nk=300, D=72, causal=True, mask=False, dtype="bfloat16"),  # four quads
    # flash-decoding (one K/V head: fewer tasks than threads, keys split into parts merged afterwards)
    dict(B=1, Hq=8, Hkv=1, Nq=1, Nk=1000, D=64, causal=False, mask=False, dtype="float32"),
    dict(B=1, Hq=4, Hkv=1, Nq=2, Nk=777, D=128, causal=True, mask=False, dtype="bfloat16"),
]

WORKER = textwrap.dedent("""
    import sys, torch, fastattn
    from fastattn import _ops
    cases, path = eval(sys.argv[1]), sys.argv[2]
    out = {"simd": _ops._C.cpu_simd(), "results": []}
    for i, c in enumerate(cases):
        if "threads" in c:
            torch.set_num_threads(c["threads"])
        g = torch.Generator().manual_seed(1000 + i)
        dt = getattr(torch, c["dtype"])
        q = torch.randn(c["B"], c["Hq"], c["Nq"], c["D"], generator=g).to(dt).requires_grad_()
        k = torch.randn(c["B"], c["Hkv"], c["Nk"], c["D"], generator=g).to(dt).requires_grad_()
        v = torch.randn(c["B"], c["Hkv"], c["Nk"], c["D"], generator=g).to(dt).requires_grad_()
        mask = torch.randn(c["B"], 1, c["Nq"], c["Nk"], generator=g) if c["mask"] else None
        do = torch.randn(c["B"], c["Hq"], c["Nq"], c["D"], generator=g).to(dt)
        o = fastattn.attention(q, k, v, attn_mask=mask, causal=c["causal"], backend="cpu")
        o.backward(do)
        out["results"].append([t.detach().clone() for t in (o, q.grad, k.grad, v.grad)] + [q, k, v, mask, do])
    torch.save(out, path)
""")


def run_path(simd: str, tmp_path, cases=CASES):
    """The cases run in a fresh process whose widest path is capped at simd ("": no cap)."""
    path = tmp_path / f"{simd or 'widest'}.pt"
    env = dict(os.environ, FASTATTN_CPU_SIMD=simd)
    proc = subprocess.run([sys.executable, "-c", WORKER, repr(cases), str(path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"FASTATTN_CPU_SIMD={simd} worker failed:\n{proc.stderr[-3000:]}"
    return torch.load(path, weights_only=False)


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_the_cap_selects_the_path(tmp_path):
    assert run_path("baseline", tmp_path)["simd"] == "baseline (no AVX2)"
    flags = cpu_flags()
    if {"avx2", "fma", "f16c"} <= flags:
        assert run_path("avx2", tmp_path)["simd"] == "avx2+fma+f16c"
    if {"avx2", "fma", "f16c", "avx512f", "avx512bw"} <= flags:
        assert run_path("avx512", tmp_path)["simd"] == "avx512f+avx512bw+avx2+fma+f16c"
        amx = {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags
        # (a CPU with AMX whose kernel refuses this process the tile state runs the AVX-512 path)
        assert _ops._C.cpu_simd() in (("amx-bf16+avx512f+avx512bw+avx2+fma+f16c",) if amx else ()) + (
            "avx512f+avx512bw+avx2+fma+f16c",)


# bf16 cases the AMX path takes (head dims of whole tiles, tasks of more rows than the decode path's):
# rows on both sides of the 16-row tile and the 48-row micro-block, keys on both sides of the 16- and
# 32-key tiles and of the 256-key block, GQA, causal, masks.
AMX_CASES = [
    dict(B=1, Hq=2, Hkv=2, Nq=33, Nk=17, D=32, causal=False, mask=False, dtype="bfloat16"),
    dict(B=2, Hq=4, Hkv=1, Nq=37, Nk=257, D=64, causal=True, mask=False, dtype="bfloat16"),
    dict(B=1, Hq=2, Hkv=2, Nq=97, Nk=95, D=128, causal=False, mask=True, dtype="bfloat16"),
    dict(B=1, Hq=3, Hkv=3, Nq=49, Nk=513, D=96, causal=True, mask=True, dtype="bfloat16"),
    # decode-shaped: 16 and 32 rows per task (4 and 8 new tokens x 4 heads), as many tasks as threads or
    # more (B x Hkv >= 4 x threads: fwd_impl then keeps each task's queries together)
    dict(B=2, Hq=16, Hkv=4, Nq=4, Nk=600, D=128, causal=False, mask=False, dtype="bfloat16", threads=2),
    dict(B=1, Hq=16, Hkv=4, Nq=8, Nk=300, D=64, causal=True, mask=False, dtype="bfloat16", threads=1),
]

# A decode-shaped task the tiles could take, but fewer tasks than threads: the decode path splits its
# keys instead (the tile path has no split), so its output has the bits of the AVX-512 path's.
SPLIT_DECODE_CASE = dict(B=1, Hq=4, Hkv=1, Nq=4, Nk=1000, D=128, causal=False, mask=False, dtype="bfloat16",
                         threads=2)


@pytest.mark.skipif(not {"amx_tile", "amx_bf16", "avx512_bf16"} <= cpu_flags(),
                    reason="this CPU has no AMX-BF16: the AMX path cannot run here")
def test_amx_path_keeps_the_2x_rule(tmp_path):
    tiles, fma = run_path("", tmp_path, AMX_CASES), run_path("avx512", tmp_path, AMX_CASES)
    if tiles["simd"] != "amx-bf16+avx512f+avx512bw+avx2+fma+f16c":
        pytest.skip(f"the kernel did not grant this process AMX tile state (path: {tiles['simd']})")
    for case, a, b in zip(AMX_CASES, tiles["results"], fma["results"]):
        o, dq, dk, dv, q, k, v, mask, do = a
        # the tiles sum in another order and round P (and dS) to bf16: not the FMA path's bits
        assert not any(torch.equal(x, y) for x, y in zip(a[:4], b[:4])), f"{case}: was the AMX path taken?"
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention_reference(q64, k64, v64, attn_mask=None if mask is None else mask.double(),
                                  causal=case["causal"])
        ref.backward(do.double())
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        low = attention_reference(ql, kl, vl, attn_mask=mask, causal=case["causal"], compute_dtype=torch.bfloat16)
        low.backward(do)
        assert_within_2x("out", o, low, ref, FWD_FLOOR[torch.bfloat16])
        for name, g, lg, rg in (("dq", dq, ql.grad, q64.grad), ("dk", dk, kl.grad, k64.grad),
                                ("dv", dv, vl.grad, v64.grad)):
            assert_within_2x(name, g, lg, rg, GRAD_FLOOR[torch.bfloat16])


@pytest.mark.skipif(not {"amx_tile", "amx_bf16", "avx512_bf16"} <= cpu_flags(),
                    reason="this CPU has no AMX-BF16: the AMX path cannot run here")
def test_amx_leaves_split_decode_tasks_to_the_decode_path(tmp_path):
    tiles, fma = run_path("", tmp_path, [SPLIT_DECODE_CASE]), run_path("avx512", tmp_path, [SPLIT_DECODE_CASE])
    # the forward's output only: the backward has no decode path, and takes the tiles in the first process
    assert torch.equal(tiles["results"][0][0], fma["results"][0][0]), "the split decode task left the decode path"


@pytest.mark.skipif(not {"avx2", "fma", "f16c", "avx512f", "avx512bw"} <= cpu_flags(),
                    reason="this CPU has no AVX-512F/BW: the AVX-512 kernels cannot run here")
def test_avx512_gives_the_bits_of_avx2(tmp_path):
    wide, narrow = run_path("avx512", tmp_path), run_path("avx2", tmp_path)
    assert (wide["simd"], narrow["simd"]) == ("avx512f+avx512bw+avx2+fma+f16c", "avx2+fma+f16c")
    for case, a, b in zip(CASES, wide["results"], narrow["results"]):
        for name, x, y in zip(("out", "dq", "dk", "dv"), a[:4], b[:4]):
            assert torch.equal(x, y), f"{case}: {name} differs between AVX-512 and AVX2 " \
                                      f"(max |diff| {(x.double() - y.double()).abs().max().item():.3g})"


def test_portable_path_matches_the_float64_reference(tmp_path):
    # What a CPU without AVX2 (ARM, old x86) runs: the same checks as the SIMD paths get elsewhere.
    res = run_path("baseline", tmp_path)
    assert res["simd"] == "baseline (no AVX2)"
    for case, r in zip(CASES, res["results"]):
        o, dq, dk, dv, q, k, v, mask, do = r
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention_reference(q64, k64, v64, attn_mask=None if mask is None else mask.double(),
                                  causal=case["causal"])
        ref.backward(do.double())
        tol = 2e-5 if case["dtype"] == "float32" else 2e-2
        for name, x, y in (("out", o, ref), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
            err = (x.double() - y).abs().max().item()
            scale = y.abs().max().item() + 1e-6
            assert err <= tol * max(1.0, scale), f"{case}: {name} max error {err:.3g} (scale {scale:.3g})"


def _as_float32(bits: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns held in int64 as the float32 tensor of the same 32 bits."""
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)


def _check_row_store(store, bits: torch.Tensor, want: torch.Tensor, lengths) -> None:
    """store (a kernel's float32 -> 16-bit row store hook) of the first n of ``bits`` (float32 bit patterns,
    int64) must give ``want[:n]`` (16-bit patterns, int64) for every n in ``lengths``."""
    src = _as_float32(bits)
    for n in lengths:
        got = store(src[:n].contiguous()).view(torch.int16).to(torch.int64) & 0xFFFF
        mismatch = (got != want[:n]).nonzero()
        assert mismatch.numel() == 0, (
            f"{mismatch.numel()} of {n} floats round differently, first at bits {int(bits[mismatch[0, 0]]):#010x}: "
            f"got {int(got[mismatch[0, 0]]):#06x}, c10 gives {int(want[mismatch[0, 0]]):#06x}")


def _bf16_bits_c10(bits: torch.Tensor) -> torch.Tensor:
    """c10::BFloat16(float)'s rounding (round_to_nearest_even) on float32 bit patterns (int64): add 0x7FFF
    plus the lowest kept bit, keep the high half; a NaN becomes 0x7FC0."""
    u = bits & 0xFFFFFFFF
    rounded = ((u + ((u >> 16) & 1) + 0x7FFF) >> 16) & 0xFFFF
    exponent_all_ones = (u >> 23) & 0xFF == 0xFF
    nan = exponent_all_ones & (u & 0x7FFFFF != 0)
    return torch.where(nan, torch.full_like(rounded, 0x7FC0), rounded)


def test_bf16_row_store_rounds_as_c10():
    # The outputs' float32 -> bf16 store (AVX2 where the CPU has it, 16 floats a step, the rest scalar)
    # must round every float as the scalar c10 conversion the kernels used before: every high half with the
    # low halves at and around the rounding boundary (ties to even and odd, +-1), NaNs, infinities,
    # denormals, plus random bit patterns; lengths that leave 0-15 floats for the scalar tail.
    highs = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000], dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    bits = torch.cat([(highs[:, None] | lows[None, :]).flatten(),
                      torch.randint(0, 1 << 32, (1 << 20,), generator=gen, dtype=torch.int64)])
    _check_row_store(_ops._C.cpu_store_row_bf16, bits, _bf16_bits_c10(bits), (bits.numel(), 1, 15, 16, 17, 31, 33))


def _f16_bits_c10(bits: torch.Tensor) -> torch.Tensor:
    """c10::Half(float)'s rounding (fp16_ieee_from_fp32_value) on float32 bit patterns (int64): IEEE
    round-to-nearest-even (numpy's float32 -> float16 cast, an independent implementation) for every
    number, and sign | 0x7E00 for a NaN."""
    u = bits & 0xFFFFFFFF
    with np.errstate(over="ignore"):
        rounded = torch.from_numpy(_as_float32(u).numpy().astype(np.float16).view(np.uint16).astype(np.int64))
    nan = ((u >> 23) & 0xFF == 0xFF) & (u & 0x7FFFFF != 0)
    return torch.where(nan, ((u >> 16) & 0x8000) | 0x7E00, rounded)


def test_f16_row_store_rounds_as_c10():
    # The outputs' float32 -> fp16 store (F16C where the CPU has AVX2, 8 floats a step, the rest scalar)
    # against the scalar c10 rule: every high half with low halves at and around fp16's rounding
    # boundaries (bit 12 for normal results, higher for fp16 denormals: the high half covers those),
    # NaNs with payloads (F16C keeps part of a payload, c10 does not), infinities, overflow, plus
    # random bit patterns; lengths that leave 0-7 floats for the scalar tail.
    highs = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0xFFFF], dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    bits = torch.cat([(highs[:, None] | lows[None, :]).flatten(),
                      torch.randint(0, 1 << 32, (1 << 20,), generator=gen, dtype=torch.int64)])
    _check_row_store(_ops._C.cpu_store_row_f16, bits, _f16_bits_c10(bits), (bits.numel(), 1, 7, 8, 9, 15, 17))

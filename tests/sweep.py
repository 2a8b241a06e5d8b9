"""Boundary sweep of the attention kernels: every block and tile edge, each case isolated.

Random shapes rarely land on the one length where a loop bound goes wrong (the CPU backward
crashed only when the last query tile ended 16+ rows above a key block: causal 97 x 130), so
this sweep enumerates shapes instead of drawing them:

* **grid**: every (Nq, Nk) in 1..GRID_MAX, causal and not, through the dense op (one call per
  pair, each on freshly allocated tensors so that AddressSanitizer sees every buffer's true end)
  and through varlen (the GRID_MAX key lengths of one Nq packed into one call), fp32, GQA;
* **boundary**: lengths ``m * block - 1, m * block, m * block + 1`` for every block size the kernels
  tile with (read from the kernels themselves: ``fastattn._C.cpu_tiling()`` for the CPU kernels,
  the interpreter's block sizes for Triton), crossed with head dims that take every micro-kernel
  path, dtypes, causal, GQA, key padding, bool and float masks (with fully hidden rows), dropout,
  non-contiguous layouts, thread counts, and varlen batches with empty and length-1 sequences;
  and the attention variants: sliding windows whose sizes sit on the same block edges, both
  alignments, soft-capping, ALiBi and sinks, alone and together, dense, varlen and decode shapes.

Each case is checked forward (out, lse) and backward (dq, dk, dv) against the float64 reference
with the tolerances of tests/conftest.py (the 2x rule for bf16/fp16).

Isolation: the cases run in a worker process (``python tests/sweep.py --worker``) that prints a
line before and after each case. When the worker dies (a segfault, an ASan report, an abort) or
hangs, the runner records the case it was in as failed, with the signal and the end of stderr, and
starts a fresh worker for the remaining cases: a crash is one case's failure, not the end of the run.

By hand: ``python tests/sweep.py [--backend cpu|triton] [--only grid|boundary] [-v]`` prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, List, Optional

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

GRID_MAX = 160  # every (Nq, Nk) in 1..GRID_MAX
# Head dims that take every path of the CPU micro-kernels and packers: 1, below / at / above one
# 8-float SIMD step and one 16-column panel, odd sizes, whole multiples of both, and the largest.
HEAD_DIMS = (1, 8, 15, 16, 17, 59, 64, 65, 128, 129, 256)
DTYPES = ("float32", "bfloat16", "float16")
CASE_TIMEOUT_S = 300.0  # a case that takes longer is a hang
STARTUP_TIMEOUT_S = 300.0  # a worker importing torch under ASan on a loaded machine can take a while


@dataclass
class Case:
    """One sweep case: a dense call (B, Hq, Nq, D) x (B, Hkv, Nk, D), a varlen batch, or a grid row."""
    name: str
    kind: str = "dense"  # "dense" | "varlen" | "grid_row"
    backend: str = "cpu"
    dtype: str = "float32"
    B: int = 1
    Hq: int = 1
    Hkv: int = 1
    Nq: int = 1
    Nk: int = 1
    D: int = 16
    Dv: Optional[int] = None
    causal: bool = False
    mask: str = "none"  # "none" | "keypad" | "bool" | "float" (bool/float may hide whole rows)
    mask_heads: bool = False  # bool/float mask per head (B, Hq, Nq, Nk) instead of (B, 1, Nq, Nk)
    dropout_p: float = 0.0
    layout: str = "contiguous"  # "contiguous" | "bnhd" | "strided" (see conftest.make_tensor)
    threads: int = 0  # torch.set_num_threads for this case (0: leave as is)
    lens_q: List[int] = field(default_factory=list)  # varlen
    lens_k: List[int] = field(default_factory=list)
    # attention variants (fastattn.attention's keywords)
    window: List[int] = field(default_factory=lambda: [-1, -1])  # window_size (left, right)
    alignment: str = "top_left"
    softcap: float = 0.0
    alibi: str = "none"  # "none" | "heads" (slopes (Hq,)) | "batch" (slopes (B, Hq))
    sinks: bool = False
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Case generation
# ----------------------------------------------------------------------------------------------
def cpu_tiling() -> dict:
    """The CPU kernels' block sizes by name, from the kernels themselves."""
    import fastattn._C

    return dict(fastattn._C.cpu_tiling())


def triton_tiling() -> dict:
    """The block sizes of the Triton kernels as the interpreter runs them (one fixed config)."""
    from fastattn.triton_kernels import autotune

    return {"interpret_block_m": autotune.INTERPRET_BLOCK_M, "interpret_block_n": autotune.INTERPRET_BLOCK_N}


def boundary_lengths(blocks: Iterable[int], limit: int) -> List[int]:
    """1, 2 and m*b - 1, m*b, m*b + 1 for every block size b and multiple m, up to ``limit``."""
    out = {1, 2}
    for b in blocks:
        for m in range(1, limit // b + 2):
            out.update(x for x in (m * b - 1, m * b, m * b + 1) if 1 <= x <= limit)
    return sorted(out)


def _pick(rng, values, n):
    values = list(values)
    return values if len(values) <= n else sorted(rng.sample(values, n))


def cpu_cases() -> List[Case]:
    """The whole CPU sweep: the grid rows, then the boundary cases."""
    return cpu_grid_cases() + cpu_boundary_cases()


def cpu_grid_cases() -> List[Case]:
    # One case per (Nq, causal): GRID_MAX dense calls (Nk = 1..GRID_MAX) and one varlen call.
    # GQA (2 query heads on 1 K/V head) so the head-group loops are crossed too.
    return [Case(name=f"grid-Nq{nq}-{'causal' if c else 'full'}", kind="grid_row", Hq=2, Hkv=1, Nq=nq,
                 Nk=GRID_MAX, D=16 if nq % 2 else 17, causal=c, seed=nq)
            for c in (False, True) for nq in range(1, GRID_MAX + 1)]


def cpu_boundary_cases() -> List[Case]:
    import random

    t = cpu_tiling()
    rng = random.Random(1234)
    small = [t["micro_rows"], t["micro_cols"], t["micro_cols_avx512"], t["simd_floats"], t["dropout_simd_keys"]]
    big = [t["fwd_block_q"], t["fwd_block_k"], t["bwd_block_q"], t["bwd_block_k"], t["fwd_max_chunk_q"],
           t["decode_block_k"]]
    # The micro-tile edges recur every few rows: all of them up to GRID_MAX (the grid has every length there);
    # the block and chunk edges up to two query chunks and one more row.
    lengths = sorted(set(boundary_lengths(small, GRID_MAX)) | set(boundary_lengths(big, 2 * t["fwd_max_chunk_q"] + 1)))
    long_lengths = [n for n in lengths if n > GRID_MAX]
    cases: List[Case] = []

    def add(**kw):
        cases.append(Case(**kw, seed=len(cases)))

    # 1. Every length boundary, both sides (Nq and Nk), causal and not, against a short and a long other side.
    for n in long_lengths:
        for other in (1, 97, 2 * t["bwd_block_k"] + 1):
            for causal in (False, True):
                add(name=f"len-Nq{n}-Nk{other}-{'causal' if causal else 'full'}", Nq=n, Nk=other, D=16,
                    causal=causal)
                add(name=f"len-Nq{other}-Nk{n}-{'causal' if causal else 'full'}", Nq=other, Nk=n, D=16,
                    causal=causal)
    # 1b. Each long length against a random longer and a random shorter one: block edges on both sides at once.
    for n in long_lengths:
        for other in (rng.choice([m for m in lengths if m > n] or [n]), rng.choice([m for m in lengths if m < n])):
            for causal in (False, True):
                add(name=f"pair-Nq{n}-Nk{other}-{'causal' if causal else 'full'}", Nq=n, Nk=other,
                    D=rng.choice((16, 17)), causal=causal)
    # 2. Every head dim x dtype x causal x GQA, on pairs of boundary lengths (Nq < Nk, = and >).
    for D in HEAD_DIMS:
        for dtype in DTYPES:
            for causal in (False, True):
                for gqa in (False, True):
                    for nq, nk in _pick(rng, [(a, b) for a in lengths for b in lengths if a <= 600 and b <= 600], 2):
                        add(name=f"hdim-D{D}-{dtype}-{'causal' if causal else 'full'}-{'gqa' if gqa else 'mha'}"
                                 f"-Nq{nq}-Nk{nk}", dtype=dtype, Hq=4 if gqa else 2, Hkv=1 if gqa else 2, Nq=nq,
                            Nk=nk, D=D, causal=causal)
    # 3. Masks and dropout on every dtype, causal and not, with layouts and thread counts.
    feature_dims = (1, 17, 64, 129)
    for mask in ("keypad", "bool", "float"):
        for dropout in (0.0, 0.3):
            for dtype in DTYPES:
                for causal in (False, True):
                    for nq, nk in _pick(rng, [(a, b) for a in lengths for b in lengths if a <= 400 and b <= 400], 2):
                        add(name=f"feat-{mask}-p{dropout}-{dtype}-{'causal' if causal else 'full'}-Nq{nq}-Nk{nk}",
                            dtype=dtype, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, D=rng.choice(feature_dims), causal=causal,
                            mask=mask, mask_heads=rng.random() < 0.5, dropout_p=dropout,
                            layout=rng.choice(("contiguous", "bnhd", "strided")), threads=rng.choice((1, 2, 3)))
    for dropout in (0.3,):
        for nq, nk in _pick(rng, [(a, b) for a in lengths for b in lengths if a <= 600 and b <= 600], 8):
            add(name=f"dropout-Nq{nq}-Nk{nk}", dtype="float32", Hq=2, Hkv=1, Nq=nq, Nk=nk, D=rng.choice(HEAD_DIMS),
                causal=rng.random() < 0.5, dropout_p=dropout)
    # 4. Non-contiguous inputs and thread counts (the task split depends on them) on their own.
    for layout in ("bnhd", "strided"):
        for threads in (1, 2, 3):
            for nq, nk in _pick(rng, [(a, b) for a in lengths for b in lengths], 2):
                add(name=f"layout-{layout}-t{threads}-Nq{nq}-Nk{nk}", B=2, Hq=3, Hkv=3, Nq=nq, Nk=nk,
                    D=rng.choice(HEAD_DIMS[:8]), causal=rng.random() < 0.5, layout=layout, threads=threads)
    # 5. Varlen: empty and length-1 sequences next to boundary lengths, q and k lengths independent.
    edge = [0, 1] + [n for n in lengths if n <= 600]
    for causal in (False, True):
        for dtype in DTYPES:
            for dropout in (0.0, 0.3):
                lq = [rng.choice(edge) for _ in range(6)]
                lk = [rng.choice(edge) for _ in range(6)]
                lq[0], lk[1] = 0, 0  # an empty query sequence, an empty key sequence
                lq[2], lk[2] = 1, 1
                add(name=f"varlen-{dtype}-{'causal' if causal else 'full'}-p{dropout}-{len(cases)}", kind="varlen",
                    dtype=dtype, Hq=4, Hkv=2, D=rng.choice(feature_dims), causal=causal, dropout_p=dropout,
                    lens_q=lq, lens_k=lk, threads=rng.choice((1, 2, 3)))
    cases += cpu_variant_cases(t, lengths, rng, start=len(cases))
    cases += cpu_amx_cases(t, lengths, rng, start=len(cases))
    return cases


def cpu_amx_cases(t: dict, lengths: List[int], rng, start: int = 0) -> List[Case]:
    """The bf16 forward's AMX path (csrc/cpu/amx_blocks.h; on a CPU without AMX these run the FMA path).

    It takes bf16 calls whose head dims are whole tiles (D a multiple of amx_depth, Dv of amx_cols) and
    whose tasks have more rows than the decode path's (or a whole tile of them, when the tasks are as many
    as the threads): Nq x group rows on both sides of the 16-row tile and the 48-row micro-block, keys on
    both sides of the 16-column and 32-deep tiles and the key block, with every feature the row pass
    applies between the two tile products.
    """
    cases: List[Case] = []

    def add(**kw):
        cases.append(Case(**kw, seed=start + len(cases)))

    tiles = [t["amx_rows"], t["amx_depth"], t["amx_cols"], t["fwd_block_q"]]
    rows = [n for n in boundary_lengths(tiles, 2 * t["fwd_block_q"] + 1) if n > t["decode_max_rows"]]
    keys = sorted(set(boundary_lengths(tiles, 3 * t["amx_depth"] + 1)) | {n for n in lengths if n <= 2 * t["fwd_block_k"] + 1})
    dims = [(t["amx_depth"], t["amx_depth"]), (2 * t["amx_depth"], 2 * t["amx_depth"]),
            (3 * t["amx_depth"], 3 * t["amx_depth"]), (4 * t["amx_depth"], t["amx_cols"])]
    for D, Dv in dims:
        for causal in (False, True):
            for group in (1, 4):
                for n_rows in _pick(rng, rows, 2):
                    nq = -(-n_rows // group)  # rows = nq x group >= n_rows: past the decode path
                    nk = rng.choice(keys)
                    add(name=f"amx-D{D}-Dv{Dv}-{'causal' if causal else 'full'}-g{group}-Nq{nq}-Nk{nk}",
                        dtype="bfloat16", B=2, Hq=2 * group, Hkv=2, Nq=nq, Nk=nk, D=D, Dv=Dv, causal=causal,
                        alignment=rng.choice(("top_left", "bottom_right")), layout=rng.choice(("contiguous", "bnhd")))
    features = [dict(mask="keypad"), dict(mask="bool"), dict(mask="float", mask_heads=True), dict(dropout_p=0.3),
                dict(softcap=5.0), dict(alibi="heads"), dict(sinks=True), dict(window=[t["amx_cols"] + 1, 0], causal=True),
                dict(layout="strided"), dict(threads=3),
                dict(mask="bool", dropout_p=0.3, softcap=20.0, alibi="batch", sinks=True, window=[40, 7])]
    for kw in features:
        for _ in range(2):
            D, Dv = rng.choice(dims)
            nq, nk = rng.choice([n for n in rows if n > t["decode_max_rows"]]), rng.choice(keys)
            add(name=f"amx-{'-'.join(f'{k}{v}' for k, v in kw.items())}-D{D}-Nq{nq}-Nk{nk}", dtype="bfloat16",
                B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk, D=D, Dv=Dv, **kw)
    # Decode-shaped tasks (amx_rows to decode_max_rows rows: a few new tokens x the group's heads) take the
    # tiles when they are at least as many as the threads (else the decode path splits their keys): keys on
    # both sides of the key block, where the packers' prefetch stops at the task's last key. (B x Hkv = 4 x
    # threads: fwd_impl keeps each task's queries together.)
    task_rows = [n for n in boundary_lengths([t["amx_rows"]], t["decode_max_rows"]) if n >= t["amx_rows"]]
    block_keys = boundary_lengths([t["fwd_block_k"]], 2 * t["fwd_block_k"] + 1)
    for D, Dv in dims[1:3]:
        for nq in sorted({-(-n // 4) for n in task_rows}):  # 4 query heads per K/V head
            nk = rng.choice([n for n in block_keys if n > nq])
            add(name=f"amx-decode-D{D}-rows{4 * nq}-Nk{nk}", dtype="bfloat16", B=2, Hq=16, Hkv=4, Nq=nq, Nk=nk,
                D=D, Dv=Dv, causal=rng.choice((False, True)), alignment="bottom_right", threads=2,
                layout=rng.choice(("contiguous", "bnhd")))
    return cases


def window_sizes(t: dict) -> List[int]:
    """Window sides on the kernels' edges: 0, 1, and b - 1, b, b + 1 for the panel and block sizes."""
    sizes = {0, 1}
    for b in (t["micro_cols"], t["micro_cols_avx512"], t["bwd_block_q"], t["bwd_block_k"], t["fwd_block_k"]):
        sizes.update((b - 1, b, b + 1))
    return sorted(sizes)


def cpu_variant_cases(t: dict, lengths: List[int], rng, start: int = 0) -> List[Case]:
    """Windows, alignments, soft-cap, ALiBi and sinks on boundary lengths, alone and combined."""
    cases: List[Case] = []

    def add(**kw):
        cases.append(Case(**kw, seed=start + len(cases)))

    sides = window_sizes(t)
    short = [n for n in lengths if n <= 600]
    # 6. Windows: every side size, left-only, right-only and two-sided, causal and not, both alignments.
    for left in sides + [-1]:
        for right in (-1, 0, rng.choice(sides)):
            if left == -1 and right == -1:
                continue
            for alignment in ("top_left", "bottom_right"):
                nq, nk = rng.choice(short), rng.choice(short)
                add(name=f"window-{left}-{right}-{alignment}-Nq{nq}-Nk{nk}", Hq=2, Hkv=1, Nq=nq, Nk=nk,
                    D=rng.choice((16, 17, 64)), causal=rng.random() < 0.3, window=[left, right], alignment=alignment)
    # 7. Each logit variant alone and all of them at once, every dtype, masks and dropout, dense and GQA.
    combos = [dict(softcap=30.0), dict(softcap=2.0), dict(alibi="heads"), dict(alibi="batch"), dict(sinks=True),
              dict(alignment="bottom_right", causal=True),
              dict(softcap=5.0, alibi="batch", sinks=True, alignment="bottom_right", causal=True)]
    for combo in combos:
        for dtype in DTYPES:
            for mask, dropout in (("none", 0.0), (rng.choice(("keypad", "bool", "float")), rng.choice((0.0, 0.3)))):
                nq, nk = rng.choice(short), rng.choice(short)
                window = [rng.choice(sides), rng.choice((-1, 0, rng.choice(sides)))] if rng.random() < 0.5 else [-1, -1]
                kw = dict(dict(causal=False, alignment="top_left"), **combo)
                add(name=f"variant-{'-'.join(f'{k}{v}' for k, v in combo.items())}-{dtype}-{mask}-p{dropout}-"
                         f"w{window[0]}.{window[1]}-Nq{nq}-Nk{nk}", dtype=dtype, B=2, Hq=4, Hkv=2, Nq=nq, Nk=nk,
                    D=rng.choice((1, 17, 64, 129)), mask=mask, dropout_p=dropout, window=window,
                    layout=rng.choice(("contiguous", "bnhd", "strided")), **kw)
    # 8. Decode and chunked prefill: 1..3 new queries (and one block's worth) against a longer cache.
    for nq in (1, 2, 3, t["bwd_block_q"] + 1):
        for nk in _pick(rng, [n for n in lengths if n > nq], 3):
            window = rng.choice(([-1, -1], [rng.choice(sides), 0]))
            add(name=f"decode-Nq{nq}-Nk{nk}-w{window[0]}", B=2, Hq=8, Hkv=2, Nq=nq, Nk=nk, D=rng.choice((16, 64, 128)),
                causal=True, alignment="bottom_right", window=window, sinks=rng.random() < 0.5,
                dtype=rng.choice(DTYPES))
    # 8b. The decode path (tasks of at most decode_max_rows rows, in quads of decode_quad_rows): task row
    # counts (query heads per K/V head x new queries) on both sides of a quad and of the limit, key counts on
    # the decode key blocks' edges, head dims on its steps (D a multiple of 4, Dv of 8: 16 + 8 takes a half
    # register) and off them (the general path), key padding (the one mask it takes), sinks, windows, bf16.
    quad, limit, dblock = t["decode_quad_rows"], t["decode_max_rows"], t["decode_block_k"]
    row_counts = sorted({1, quad - 1, quad, quad + 1, limit - 1, limit, limit + 1})
    decode_nk = [n for n in boundary_lengths([dblock], 3 * dblock + 1) if n > 2]
    for rows in row_counts:
        for group, nq in sorted({(g, rows // g) for g in (1, 2, 3, 4, 8, 16, 17) if rows % g == 0}):
            nk = rng.choice(decode_nk)
            D, Dv = rng.choice(((4, 8), (12, 16), (24, 24), (64, 64), (128, 128), (132, 40), (17, 16), (64, 20)))
            mask = rng.choice(("none", "keypad"))
            causal = rng.random() < 0.5
            window = [rng.choice(sides), 0] if causal and rng.random() < 0.3 else [-1, -1]
            add(name=f"decodepath-rows{rows}-g{group}-Nq{nq}-Nk{nk}-D{D}.{Dv}-{mask}", B=2, Hq=2 * group, Hkv=2,
                Nq=nq, Nk=nk, D=D, Dv=Dv, causal=causal, alignment="bottom_right", window=window, mask=mask,
                sinks=rng.random() < 0.3, dtype=rng.choice(("float32", "bfloat16")),
                layout=rng.choice(("contiguous", "bnhd", "strided")), threads=rng.choice((1, 2, 3)))
    # The AVX2 values kernel takes V rows by chunks: of decode_values_chunk_bytes_one_quad for a task of one
    # quad (float and bf16), of decode_values_chunk_bytes_float for float V and more quads (bf16 then takes
    # the whole block): key counts on both sides of a chunk's edge, inside a block and past one, for head
    # dims whose chunks divide the block and not.
    for dtype, elem, rows, key in (("float32", 4, quad, "decode_values_chunk_bytes_one_quad"),
                                   ("bfloat16", 2, quad, "decode_values_chunk_bytes_one_quad"),
                                   ("float32", 4, 2 * quad + 1, "decode_values_chunk_bytes_float")):
        for Dv in (128, 40, 8):
            rows_per_chunk = max(1, t[key] // (elem * Dv))
            for nk in sorted({n for c in (rows_per_chunk, 2 * rows_per_chunk, dblock + rows_per_chunk)
                              for n in (c - 1, c, c + 1) if n > 0}):
                add(name=f"decodechunk-{dtype}-rows{rows}-Dv{Dv}-Nk{nk}", B=1, Hq=2 * rows, Hkv=2, Nq=1, Nk=nk,
                    D=rng.choice((4, 64, 128)), Dv=Dv, dtype=dtype, layout=rng.choice(("contiguous", "strided")),
                    threads=rng.choice((1, 2)))
    # Its strips: value head dims of whole wide strips, and of wide strips plus a last 8 or 16 columns
    # (and narrower than one wide strip), float and bf16; the AVX-512 kernel's strips likewise.
    for dtype, key in (("float32", "decode_values_strip_cols_float"), ("bfloat16", "decode_values_strip_cols_bf16"),
                       ("float32", "decode_values_strip_cols_avx512"), ("bfloat16", "decode_values_strip_cols_avx512")):
        wide = t[key]
        for Dv in sorted({8} | {d for w in (1, 2, 5) for d in (w * wide - 8, w * wide, w * wide + 8, w * wide + 16)
                          if d > 0 and d % 8 == 0}):
            add(name=f"decodestrip-{dtype}-{key.rsplit('_', 1)[1]}-Dv{Dv}", B=1, Hq=8, Hkv=2, Nq=2,
                Nk=rng.choice(decode_nk), D=rng.choice((4, 64, 128)), Dv=Dv, dtype=dtype,
                layout=rng.choice(("contiguous", "strided")), threads=rng.choice((1, 2)))
    # 8c. Flash-decoding: decode tasks fewer than the threads (one K/V head at batch 1, or varlen) split their
    # keys into parts of at least decode_min_split_blocks blocks, merged afterwards: key counts on both sides
    # of one and two parts' worth and of a part's edge, 2-4 threads, row counts up to the limit, the masks
    # and variants the decode path takes (a part that sees no key of a row must weigh nothing in the merge).
    part = t["decode_min_split_blocks"] * dblock
    split_nk = sorted({n for n in boundary_lengths([part, 2 * part, part + dblock], 3 * part + 1) if n > 2}
                      | {7 * part + 5})
    for nk in split_nk:
        for threads in (2, 3, 4):
            group, nq = rng.choice([(g, r // g) for r in (1, quad, limit) for g in (1, 2, 4, 8, 16, 32)
                                    if r % g == 0 and r // g <= 4])
            causal = rng.random() < 0.5
            window = [rng.choice(sides + [part // 2, part + 1]), 0] if causal and rng.random() < 0.4 else [-1, -1]
            add(name=f"flashdecode-t{threads}-g{group}-Nq{nq}-Nk{nk}-w{window[0]}", B=1, Hq=group, Hkv=1, Nq=nq, Nk=nk,
                D=rng.choice((16, 64, 128)), causal=causal, alignment="bottom_right", window=window,
                mask=rng.choice(("none", "keypad")), sinks=rng.random() < 0.4,
                dtype=rng.choice(("float32", "bfloat16")), layout=rng.choice(("contiguous", "bnhd", "strided")),
                threads=threads)
    # 9. Varlen with variants: empty and short sequences, per-sequence ALiBi slopes.
    edge = [0, 1] + short
    for combo in combos:
        lq = [rng.choice(edge) for _ in range(5)]
        lk = [rng.choice(edge) for _ in range(5)]
        lq[0], lk[1], lq[2], lk[2] = 0, 0, 1, 1
        kw = dict(dict(causal=False, alignment="top_left"), **combo)
        add(name=f"varlen-variant-{'-'.join(f'{k}{v}' for k, v in combo.items())}", kind="varlen", Hq=4, Hkv=2,
            D=rng.choice((16, 17, 64)), lens_q=lq, lens_k=lk, window=[rng.choice(sides), rng.choice((-1, 0, 5))],
            dropout_p=rng.choice((0.0, 0.3)), dtype=rng.choice(DTYPES), **kw)
    return cases


def triton_cases() -> List[Case]:
    """A sampled subset for Triton in its CPU interpreter (each program runs in NumPy: small shapes only)."""
    import random

    t = triton_tiling()
    rng = random.Random(99)
    lengths = boundary_lengths([t["interpret_block_m"], t["interpret_block_n"]], 2 * t["interpret_block_n"] + 1)
    pairs = [(a, b) for a in lengths for b in lengths]
    cases: List[Case] = []
    for causal in (False, True):
        for nq, nk in _pick(rng, pairs, 6):
            cases.append(Case(name=f"triton-Nq{nq}-Nk{nk}-{'causal' if causal else 'full'}", backend="triton",
                              Hq=2, Hkv=1, Nq=nq, Nk=nk, D=rng.choice((16, 17, 64)), causal=causal, seed=len(cases)))
    for mask, dropout, dtype in (("keypad", 0.0, "bfloat16"), ("bool", 0.3, "float32"), ("float", 0.0, "float16")):
        nq, nk = rng.choice(pairs)
        cases.append(Case(name=f"triton-{mask}-p{dropout}-{dtype}-Nq{nq}-Nk{nk}", backend="triton", dtype=dtype,
                          B=2, Hq=2, Hkv=1, Nq=nq, Nk=nk, D=32, causal=True, mask=mask, dropout_p=dropout,
                          seed=len(cases)))
    cases.append(Case(name="triton-varlen-empty", kind="varlen", backend="triton", Hq=2, Hkv=1, D=16, causal=True,
                      lens_q=[0, 1, 33, 31, 65], lens_k=[3, 0, 1, 64, 33], seed=len(cases)))
    # the variants: windows whose sides sit on the block edges, both alignments, with the logit variants
    block = t["interpret_block_n"]
    for left, right, alignment, extra in ((block - 1, 0, "bottom_right", {}), (block, 1, "top_left", {}),
                                          (block + 1, -1, "bottom_right", dict(softcap=3.0)),
                                          (-1, block, "top_left", dict(alibi="heads")),
                                          (1, 1, "bottom_right", dict(sinks=True, alibi="batch"))):
        nq, nk = rng.choice(pairs)
        cases.append(Case(name=f"triton-window{left}.{right}-{alignment}-Nq{nq}-Nk{nk}", backend="triton", B=2,
                          Hq=2, Hkv=1, Nq=nq, Nk=nk, D=16, window=[left, right], alignment=alignment,
                          seed=len(cases), **extra))
    cases.append(Case(name="triton-varlen-variants", kind="varlen", backend="triton", Hq=2, Hkv=1, D=16, causal=True,
                      window=[block, 0], alignment="bottom_right", softcap=5.0, alibi="batch", sinks=True,
                      lens_q=[0, 1, 33, 31, 65], lens_k=[3, 0, 1, 64, 70], seed=len(cases)))
    return cases


# ----------------------------------------------------------------------------------------------
# Checking one case (in the worker process)
# ----------------------------------------------------------------------------------------------
def _setup_imports():
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)


def _dtype(name):
    import torch

    return getattr(torch, name)


def _compare(name, ours, ref64, low, dtype, kind, allowance=0.0):
    """out/lse/grad of ours against the float64 reference: named tolerances, or the 2x rule (``low``)
    with ``allowance`` added to the floor (see _rounded_output_allowance)."""
    import conftest as C

    if kind == "lse":
        C.assert_close(name, ours, ref64, atol=C.LSE_ATOL[dtype], rtol=C.LSE_RTOL[dtype])
    elif dtype in C.LOW_PRECISION:
        C.assert_within_2x(name, ours, low, ref64, (C.FWD_FLOOR if kind == "fwd" else C.GRAD_FLOOR)[dtype] + allowance)
    else:
        atol, rtol = ((C.FWD_ATOL, C.FWD_RTOL) if kind == "fwd" else (C.GRAD_ATOL, C.GRAD_RTOL))
        C.assert_close(name, ours, ref64, atol=atol[dtype], rtol=rtol[dtype])


def _check_all(out, lse, grads, reference, dtype):
    """Compares out, lse and the gradients with ``reference(compute_dtype)`` -> (out, lse, grads, allowance)."""
    import torch

    import conftest as C

    ref, ref_lse, ref_grads, allowance = reference(torch.float64)
    low = reference(dtype) if dtype in C.LOW_PRECISION else (None, None, (None,) * len(grads), None)
    _compare("out", out, ref, low[0], dtype, "fwd")
    _compare("lse", lse, ref_lse, None, dtype, "lse")
    for name, g, r, lg, extra in zip(GRAD_NAMES, grads, ref_grads, low[2], allowance):
        _compare(name, g, r, lg, dtype, "grad", extra)


def _rounded_output_allowance(out, o64, lse64, leaves64, grad_out64, lse_of_out):
    """What the flash backward's one structural rounding costs each of dq, dk, dv, computed exactly.

    A flash backward takes delta = rowsum(dO * O) from the stored output O, rounded to bf16/fp16,
    where PyTorch's autograd uses the exact P V. With delta' = delta + e the float64 gradient becomes
    that of sum(O dO) - sum_i e_i lse_i (d lse_i / d s_ij = P_ij), so the difference of the two float64
    gradients is the error that rounding alone makes. Where PyTorch happens to be exact (one key, P = 1,
    dropout making O a rounded V / (1 - p): dq = dk = 0) the 2x rule would otherwise ask for exactness.
    ``lse_of_out`` maps the per-row sums of out's layout onto lse's.
    """
    import torch

    import conftest as C

    e = lse_of_out((grad_out64 * (out.detach().double() - o64.detach())).sum(-1))
    dead = torch.isneginf(lse64)
    loss = (o64 * grad_out64).sum() - (e.masked_fill(dead, 0) * lse64.masked_fill(dead, 0)).sum()
    flash = torch.autograd.grad(loss, leaves64, allow_unused=True, retain_graph=True)
    exact = torch.autograd.grad(o64, leaves64, grad_out64, allow_unused=True, retain_graph=True)
    return [0.0 if f is None or x is None else C.max_err(f, x) for f, x in zip(flash, exact)]


def _make_mask(case, rng_gen, device="cpu"):
    import torch

    B, Hq, Nq, Nk = case.B, case.Hq, case.Nq, case.Nk
    if case.mask == "none":
        return None
    if case.mask == "keypad":  # right padding of random length per batch (some batches keep every key)
        keep = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
        for b in range(B):
            keep[b, ..., int(torch.randint(1, Nk + 1, (1,), generator=rng_gen)):] = False
        return keep
    shape = (B, Hq if case.mask_heads else 1, Nq, Nk)
    keep = torch.rand(shape, generator=rng_gen) < 0.7
    keep[..., 0, :] = False  # the first query row sees no key at all (zeros, zero gradients)
    if case.mask == "bool":
        return keep
    bias = torch.randn(shape, dtype=torch.float64, generator=rng_gen).masked_fill(~keep, float("-inf"))
    return bias.to(_dtype(case.dtype))


def _variant_kwargs(case, gen, batch: int) -> dict:
    """fastattn.attention's variant keywords for a case (slopes and sinks drawn from ``gen``)."""
    import torch

    slopes = None
    if case.alibi != "none":
        shape = (case.Hq,) if case.alibi == "heads" else (batch, case.Hq)
        slopes = torch.rand(shape, generator=gen) * 0.5 + 0.01
    sinks = (torch.randn(case.Hq, generator=gen) * 2).requires_grad_(True) if case.sinks else None
    return dict(window_size=tuple(case.window), alignment=case.alignment, softcap=case.softcap,
                alibi_slopes=slopes, sinks=sinks)


GRAD_NAMES = ("dq", "dk", "dv", "dsinks")


def run_dense(case: Case) -> None:
    import torch

    import conftest as C
    import fastattn
    from fastattn.api import _draw_rng_state
    from fastattn.reference import attention_reference

    dtype = _dtype(case.dtype)
    gen = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    q, k, v = C.make_qkv(case.B, case.Hq, case.Hkv, case.Nq, case.Nk, case.D, case.Dv, dtype=dtype,
                         layout=case.layout)
    mask = _make_mask(case, gen)
    rng_state = None
    if case.dropout_p > 0:  # the (seed, offset) the API is about to draw
        torch.manual_seed(case.seed + 1)
        rng_state = _draw_rng_state(q.device, case.backend)
        torch.manual_seed(case.seed + 1)
    variants = _variant_kwargs(case, gen, case.B)
    out, lse = fastattn.attention(q, k, v, causal=case.causal, attn_mask=mask, dropout_p=case.dropout_p,
                                  backend=case.backend, return_lse=True, **variants)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen).to(dtype)
    inputs = (q, k, v) + ((variants["sinks"],) if case.sinks else ())
    grads = torch.autograd.grad(out, inputs, grad_out)

    def reference(cdt):
        leaves = [t.detach().to(cdt).requires_grad_(True) for t in inputs]
        m = mask.to(cdt) if mask is not None and mask.is_floating_point() else mask
        o, l = attention_reference(*leaves[:3], causal=case.causal, attn_mask=m, dropout_p=case.dropout_p,
                                   rng_state=rng_state, return_lse=True, compute_dtype=cdt,
                                   **dict(variants, sinks=leaves[3] if case.sinks else None))
        allowance = (_rounded_output_allowance(out, o, l, leaves, grad_out.double(), lambda rows: rows)
                     if cdt == torch.float64 and dtype in C.LOW_PRECISION else [0.0] * len(leaves))
        return o, l, torch.autograd.grad(o, leaves, grad_out.to(cdt)), allowance

    _check_all(out, lse, grads, reference, dtype)


def run_varlen(case: Case) -> None:
    import torch

    import conftest as C
    import fastattn
    from fastattn.api import _draw_rng_state
    from fastattn.reference import attention_reference

    dtype = _dtype(case.dtype)
    torch.manual_seed(case.seed)
    q, k, v = C.make_varlen(case.lens_q, case.lens_k, case.Hq, case.Hkv, case.D, case.Dv, dtype=dtype)
    cu_q, cu_k = C.cu_seqlens(case.lens_q), C.cu_seqlens(case.lens_k)
    rng_state = None
    if case.dropout_p > 0:
        torch.manual_seed(case.seed + 1)
        rng_state = _draw_rng_state(q.device, case.backend)
        torch.manual_seed(case.seed + 1)
    variants = _variant_kwargs(case, torch.Generator().manual_seed(case.seed), len(case.lens_q))
    out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max(case.lens_q), max(case.lens_k),
                                         causal=case.causal, dropout_p=case.dropout_p, backend=case.backend,
                                         return_lse=True, **variants)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    inputs = (q, k, v) + ((variants["sinks"],) if case.sinks else ())
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True) if out.numel() else (None,) * len(inputs)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    slopes = variants["alibi_slopes"]

    def reference(cdt):  # sequence by sequence, each with its own segment numbers (dropout)
        leaves = [t.detach().to(cdt).requires_grad_(True) for t in inputs]
        outs, lses = [], []
        for b in range(len(case.lens_q)):
            sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            per_seq = dict(variants, sinks=leaves[3] if case.sinks else None,
                           alibi_slopes=slopes[b] if slopes is not None and slopes.dim() == 2 else slopes)
            o, l = attention_reference(*(t[s].transpose(0, 1)[None] for t, s in zip(leaves, (sq, sk, sk))),
                                       causal=case.causal, dropout_p=case.dropout_p, rng_state=rng_state,
                                       return_lse=True, compute_dtype=cdt, batch_start=b, **per_seq)  # (1, H, n, D)
            outs.append(o[0].transpose(0, 1))
            lses.append(l[0])
        o, l = torch.cat(outs), torch.cat(lses, 1)
        allowance = [0.0] * len(leaves)
        if cdt == torch.float64 and dtype in C.LOW_PRECISION and o.numel():
            allowance = _rounded_output_allowance(out, o, l, leaves, grad_out.double(), lambda rows: rows.t())
        g = torch.autograd.grad(o, leaves, grad_out.to(cdt), allow_unused=True) if o.numel() else (None,) * len(leaves)
        return o, l, [torch.zeros_like(t) if x is None else x for x, t in zip(g, leaves)], allowance

    _check_all(out, lse, grads, reference, dtype)


def run_grid_row(case: Case, progress) -> None:
    """Nq = case.Nq against every Nk in 1..case.Nk: dense, one call per Nk, and all of them as one varlen
    batch; one batched float64 reference (keys past Nk hidden by a key-padding mask) checks both."""
    import torch

    import conftest as C
    import fastattn
    from fastattn.reference import attention_reference

    torch.manual_seed(case.seed)
    G, Nq, Hq, Hkv, D = case.Nk, case.Nq, case.Hq, case.Hkv, case.D
    q = torch.randn(G, Hq, Nq, D, dtype=torch.float64)  # q[i] goes with Nk = i + 1
    k = torch.randn(G, Hkv, G, D, dtype=torch.float64)
    v = torch.randn(G, Hkv, G, D, dtype=torch.float64)
    grad_out = torch.randn(G, Hq, Nq, D, dtype=torch.float64)
    q32, k32, v32, g32 = (t.float() for t in (q, k, v, grad_out))
    q64, k64, v64 = (t.to(torch.float32).double().requires_grad_(True) for t in (q, k, v))
    keep = torch.arange(G)[None, :] < torch.arange(1, G + 1)[:, None]  # (G, G): row i keeps keys < i + 1
    ref, ref_lse = attention_reference(q64, k64, v64, causal=case.causal, attn_mask=keep[:, None, None, :],
                                       return_lse=True)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), g32.double())
    fwd_tol = dict(atol=C.FWD_ATOL[torch.float32], rtol=C.FWD_RTOL[torch.float32])
    grad_tol = dict(atol=C.GRAD_ATOL[torch.float32], rtol=C.GRAD_RTOL[torch.float32])
    lse_tol = dict(atol=C.LSE_ATOL[torch.float32], rtol=C.LSE_RTOL[torch.float32])

    for i in range(G):
        nk = i + 1
        progress(f"dense Nk={nk}")
        # fresh exact-size tensors: a view into the big ones would hide an overrun from ASan
        qi, ki, vi = (t[i:i + 1, :, :n].clone().requires_grad_(True) for t, n in ((q32, Nq), (k32, nk), (v32, nk)))
        out, lse = fastattn.attention(qi, ki, vi, causal=case.causal, backend=case.backend, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (qi, ki, vi), g32[i:i + 1].clone())
        where = f" (Nq={Nq}, Nk={nk}, dense)"
        C.assert_close("out" + where, out, ref[i:i + 1], **fwd_tol)
        C.assert_close("lse" + where, lse, ref_lse[i:i + 1], **lse_tol)
        C.assert_close("dq" + where, dq, rq[i:i + 1], **grad_tol)
        C.assert_close("dk" + where, dk, rk[i:i + 1, :, :nk], **grad_tol)
        C.assert_close("dv" + where, dv, rv[i:i + 1, :, :nk], **grad_tol)

    progress("varlen")
    lens_k = list(range(1, G + 1))
    qp = q32.transpose(1, 2).reshape(G * Nq, Hq, D).clone().requires_grad_(True)  # (total_q, Hq, D)
    kp = torch.cat([k32[i, :, :i + 1].transpose(0, 1) for i in range(G)]).requires_grad_(True)  # (total_k, Hkv, D)
    vp = torch.cat([v32[i, :, :i + 1].transpose(0, 1) for i in range(G)]).requires_grad_(True)
    cu_q, cu_k = C.cu_seqlens([Nq] * G), C.cu_seqlens(lens_k)
    out, lse = fastattn.varlen_attention(qp, kp, vp, cu_q, cu_k, Nq, G, causal=case.causal, backend=case.backend,
                                         return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (qp, kp, vp), g32.transpose(1, 2).reshape(G * Nq, Hq, D))
    where = f" (Nq={Nq}, Nk=1..{G}, varlen)"
    C.assert_close("out" + where, out, ref.transpose(1, 2).reshape(G * Nq, Hq, D), **fwd_tol)
    C.assert_close("lse" + where, lse, ref_lse.transpose(0, 1).reshape(Hq, G * Nq), **lse_tol)
    C.assert_close("dq" + where, dq, rq.transpose(1, 2).reshape(G * Nq, Hq, D), **grad_tol)
    C.assert_close("dk" + where, dk, torch.cat([rk[i, :, :i + 1].transpose(0, 1) for i in range(G)]), **grad_tol)
    C.assert_close("dv" + where, dv, torch.cat([rv[i, :, :i + 1].transpose(0, 1) for i in range(G)]), **grad_tol)


def run_case(case: Case, progress=lambda what: None) -> None:
    """Raises AssertionError (or the kernel's own error) when the case fails."""
    import torch

    _setup_imports()
    if case.threads:
        torch.set_num_threads(case.threads)
    if case.kind == "selftest_crash":  # tests/test_sweep.py checks that the runner survives these
        os.kill(os.getpid(), signal.SIGSEGV)
    if case.kind == "selftest_hang":
        time.sleep(3600)
    if case.kind == "grid_row":
        run_grid_row(case, progress)
    elif case.kind == "varlen":
        run_varlen(case)
    else:
        run_dense(case)


# ----------------------------------------------------------------------------------------------
# Worker process and the runner that isolates it
# ----------------------------------------------------------------------------------------------
def worker_main() -> None:
    """Reads one JSON case per line on stdin; writes ``begin`` / ``step`` / ``ok`` / ``fail`` lines."""
    import traceback

    _setup_imports()
    import torch

    default_threads = torch.get_num_threads()
    out = sys.stdout

    def emit(**msg):
        out.write(json.dumps(msg) + "\n")
        out.flush()

    emit(event="ready")
    for line in sys.stdin:
        case = Case(**json.loads(line))
        emit(event="begin", name=case.name)
        try:
            run_case(case, progress=lambda what: emit(event="step", name=case.name, step=what))
            emit(event="ok", name=case.name)
        except Exception as e:  # a wrong result or an error the kernel raised: this case's failure
            emit(event="fail", name=case.name, error=f"{type(e).__name__}: {e}"[:4000],
                 trace=traceback.format_exc()[-2000:])
        torch.set_num_threads(default_threads)


@dataclass
class Result:
    name: str
    ok: bool
    error: str = ""
    seconds: float = 0.0


class IsolatedRunner:
    """Runs cases in a worker process; a case during which the worker dies or hangs is that case's failure."""

    def __init__(self, timeout_s: float = CASE_TIMEOUT_S, env: Optional[dict] = None):
        self.timeout_s = timeout_s
        self.env = env
        self.proc: Optional[subprocess.Popen] = None

    def _start(self):
        import tempfile

        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=self.env, bufsize=0)
        self._buffer = b""
        msg = self._read(max(self.timeout_s, STARTUP_TIMEOUT_S))  # startup is not a case: its own limit
        if msg is None or msg.get("event") != "ready":
            raise RuntimeError(f"sweep worker did not start: {self._death()}")

    def _read(self, timeout):
        """The next JSON line from the worker, or None when it died or went silent for ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:  # end of file: the worker is exiting; let it finish so that its status is known
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _death(self) -> str:
        """Why the worker stopped (signal or exit code) and the end of its stderr; kills a hung one."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            how = f"no answer within {self.timeout_s:.0f} s (hang?); killed"
        elif self.proc.returncode < 0:
            how = f"worker killed by {signal.Signals(-self.proc.returncode).name}"
        else:
            how = f"worker exited with code {self.proc.returncode}"
        self._stderr.seek(0)
        tail = self._stderr.read()[-3000:].decode(errors="replace").strip()
        self.proc = None
        return how + (f"; stderr:\n{tail}" if tail else "")

    def run(self, case: Case) -> Result:
        if self.proc is None:
            self._start()
        start = time.monotonic()
        step = "start"
        try:
            self.proc.stdin.write((json.dumps(asdict(case)) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return Result(case.name, False, f"worker gone before the case: {self._death()}")
        while True:
            msg = self._read(self.timeout_s)
            if msg is None:  # died or hung inside this case
                return Result(case.name, False, f"crashed in step '{step}': {self._death()}",
                              time.monotonic() - start)
            if msg["event"] == "step":
                step = msg["step"]
            elif msg["event"] == "ok":
                return Result(case.name, True, seconds=time.monotonic() - start)
            elif msg["event"] == "fail":
                return Result(case.name, False, msg["error"], time.monotonic() - start)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def run_cases(cases: List[Case], verbose: bool = False) -> Iterator[Result]:
    runner = IsolatedRunner()
    try:
        for case in cases:
            r = runner.run(case)
            if verbose or not r.ok:
                print(f"{'ok  ' if r.ok else 'FAIL'} {r.name} ({r.seconds:.2f} s){'' if r.ok else ': ' + r.error}",
                      flush=True)
            yield r
    finally:
        runner.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help="run as the isolated worker (reads cases on stdin)")
    ap.add_argument("--backend", default="cpu", choices=("cpu", "triton"), help="kernels to sweep (default cpu)")
    ap.add_argument("--only", choices=("grid", "boundary"), help="one part of the CPU sweep (default both)")
    ap.add_argument("-k", dest="match", help="only the cases whose name contains this string")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case, not only failures")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    _setup_imports()
    if args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        cases = triton_cases()
    else:
        cases = {"grid": cpu_grid_cases, "boundary": cpu_boundary_cases, None: cpu_cases}[args.only]()
    if args.match:
        cases = [c for c in cases if args.match in c.name]
    if args.list:
        for c in cases:
            print(c.name)
        print(f"{len(cases)} cases")
        return 0
    start = time.monotonic()
    results = list(run_cases(cases, args.verbose))
    failed = [r for r in results if not r.ok]
    print(f"sweep ({args.backend}): {len(results) - len(failed)} passed, {len(failed)} failed in "
          f"{time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

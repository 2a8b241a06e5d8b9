"""python -m fastattn.selftest: every backend on this machine against the reference, in about a minute.

The wheel's own parity check (the tests/ folder is not installed): for each available
backend and each feature it claims on the current device (dtypes, head dims, causal with
Nq < Nk and Nq > Nk, GQA/MQA, each mask kind, varlen with empty sequences, non-contiguous
inputs, dropout replayed from the same seed, the attention variants), one small case,
forward and backward, checked against ``fastattn.reference`` in float64 by the tests' rule
(float32: absolute + relative tolerance; fp16/bf16: our error <= 2x PyTorch's own error in
that dtype + a floor). One line per backend and feature: PASS, FAIL (with the error) or
"not served" (with the backend's own reason). Exit status 1 if anything failed.

    python -m fastattn.selftest [--device cuda|cpu] [--backend NAME ...] [--autotune] [--json FILE]

Triton runs with its fixed configs unless --autotune (autotuning every case's shape would
take minutes); under TRITON_INTERPRET=1 (no GPU) it runs in Triton's CPU interpreter.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch

# Tolerances as in tests/conftest.py (the tests' names): float64 / float32 absolute + relative,
# floors of the 2x rule for the low dtypes.
FWD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}
GRAD_TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (5e-5, 1e-4)}
FWD_FLOOR = {torch.bfloat16: 2e-3, torch.float16: 2e-4}
GRAD_FLOOR = {torch.bfloat16: 4e-3, torch.float16: 4e-4}
LOW = (torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class Case:
    """One check: a feature of a backend on a small problem."""
    feature: str
    dtype: torch.dtype
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    Nq: int = 37
    Nk: int = 45
    D: int = 64
    causal: bool = False
    mask: Optional[str] = None  # "key_padding", "bool", "float"
    dropout_p: float = 0.0
    layout: str = "contiguous"  # or "bnhd": (B, N, H, D) transposed
    varlen: Optional[tuple] = None  # (lens_q, lens_k)
    variants: dict = field(default_factory=dict)  # fastattn.attention's variant keywords

    def variant_names(self) -> tuple:
        names = []
        if self.variants.get("window_size", (-1, -1)) != (-1, -1):
            names.append("window")
        if self.variants.get("alignment") == "bottom_right":
            names.append("bottom_right")
        for key, name in (("softcap", "softcap"), ("alibi_slopes", "alibi"), ("sinks", "sinks")):
            if key in self.variants:
                names.append(name)
        return tuple(names)


@dataclass
class Result:
    backend: str
    feature: str
    status: str  # PASS, FAIL, NOT SERVED
    detail: str
    seconds: float = 0.0


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff).max().item()


def _compare(name: str, ours, ref64, low, dtype, grad: bool) -> str:
    """'' if within the rule, else what is wrong; appends the error to the report."""
    err = max_err(ours, ref64)
    if dtype in LOW:
        bound = 2 * max_err(low, ref64) + (GRAD_FLOOR if grad else FWD_FLOOR)[dtype]
        ok = err <= bound
    else:
        atol, rtol = (GRAD_TOL if grad else FWD_TOL)[dtype]
        bound = atol + rtol * ref64.detach().abs().max().item() if ref64.numel() else atol
        ok = err <= bound
    return "" if ok else f"{name} error {err:.3g} > {bound:.3g}"


def _inputs(case: Case, device: torch.device, generator: torch.Generator):
    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device=device, dtype=case.dtype)

    if case.varlen is not None:
        lens_q, lens_k = case.varlen
        q = randn(sum(lens_q), case.Hq, case.D)
        k, v = randn(sum(lens_k), case.Hkv, case.D), randn(sum(lens_k), case.Hkv, case.D)
    elif case.layout == "bnhd":
        q = randn(case.B, case.Nq, case.Hq, case.D).transpose(1, 2)
        k = randn(case.B, case.Nk, case.Hkv, case.D).transpose(1, 2)
        v = randn(case.B, case.Nk, case.Hkv, case.D).transpose(1, 2)
    else:
        q = randn(case.B, case.Hq, case.Nq, case.D)
        k = randn(case.B, case.Hkv, case.Nk, case.D)
        v = randn(case.B, case.Hkv, case.Nk, case.D)
    mask = None
    if case.mask is not None:
        shape = (case.B, 1, 1, case.Nk) if case.mask == "key_padding" else (case.B, 1, case.Nq, case.Nk)
        keep = torch.rand(shape, generator=generator) < 0.7
        keep[..., 0] = True
        if case.mask == "float":
            mask = torch.randn(shape, dtype=torch.float64, generator=generator).masked_fill(~keep, float("-inf"))
            mask = mask.to(device=device, dtype=case.dtype)
        else:
            mask = keep.to(device)
    variants = {}
    for key, value in case.variants.items():
        if key in ("alibi_slopes", "sinks"):  # per-head float tensors
            value = (torch.rand(case.Hq, dtype=torch.float64, generator=generator) * value).float().to(device)
        variants[key] = value
    return q, k, v, mask, variants


def run_case(backend: str, case: Case, device: torch.device) -> tuple:
    """(status, detail): PASS / FAIL with what differs."""
    import fastattn
    from fastattn import api
    from fastattn.reference import attention_reference, varlen_attention_reference

    generator = torch.Generator().manual_seed(1234)
    q, k, v, mask, variants = _inputs(case, device, generator)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    rng_state = None
    seed = 20261201
    if case.dropout_p > 0:  # the (seed, offset) the API will draw after this seed
        torch.manual_seed(seed)
        rng_state = api._draw_rng_state(device, backend).cpu()
        torch.manual_seed(seed)
    if case.varlen is not None:
        lens_q, lens_k = case.varlen
        cu_q = torch.tensor([0] + list(lens_q)).cumsum(0).to(torch.int32).to(device)
        cu_k = torch.tensor([0] + list(lens_k)).cumsum(0).to(torch.int32).to(device)
        out = fastattn.varlen_attention(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=case.causal,
                                        backend=backend, **variants)
    else:
        out = fastattn.attention(*leaves, causal=case.causal, attn_mask=mask, dropout_p=case.dropout_p,
                                 backend=backend, **variants)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=generator).to(device=device, dtype=case.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True) if out.numel() else (None,) * 3

    def reference(dtype_of_leaves, compute_dtype=None):
        ls = [t.detach().to(dtype_of_leaves).requires_grad_() for t in (q, k, v)]
        m = mask.to(dtype_of_leaves) if mask is not None and mask.is_floating_point() else mask
        if case.varlen is not None:
            if compute_dtype is not None:  # PyTorch in the low dtype: sequence by sequence
                outs = []
                cq, ck = cu_q.tolist(), cu_k.tolist()
                for b in range(len(case.varlen[0])):
                    sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
                    o = attention_reference(ls[0][sq].transpose(0, 1)[None], ls[1][sk].transpose(0, 1)[None],
                                            ls[2][sk].transpose(0, 1)[None], causal=case.causal,
                                            compute_dtype=compute_dtype, **variants)
                    outs.append(o[0].transpose(0, 1))
                o = torch.cat(outs)
            else:
                o = varlen_attention_reference(*ls, cu_q, cu_k, causal=case.causal, **variants)
        else:
            o = attention_reference(*ls, causal=case.causal, attn_mask=m, dropout_p=case.dropout_p,
                                    rng_state=rng_state, compute_dtype=compute_dtype, **variants)
        g = torch.autograd.grad(o, ls, grad_out.to(o.dtype), allow_unused=True) if o.numel() else (None,) * 3
        return o, [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, ls)]

    ref_out, ref_grads = reference(torch.float64)
    low_out, low_grads = reference(case.dtype, case.dtype) if case.dtype in LOW else (None, [None] * 3)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    problems = [_compare("out", out, ref_out, low_out, case.dtype, grad=False)]
    for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        problems.append(_compare(name, g, rg, lg, case.dtype, grad=True))
    problems = [p for p in problems if p]
    errors = f"out {max_err(out, ref_out):.1e}, dq {max_err(grads[0], ref_grads[0]):.1e}"
    return ("FAIL", "; ".join(problems)) if problems else ("PASS", errors)


def cases_for(backend: str, device: torch.device) -> list:
    from fastattn import dispatch

    cap = dispatch.CAPABILITIES[backend]
    dtypes = [d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64) if d in cap.dtypes]
    main = torch.float32 if torch.float32 in dtypes else dtypes[0]
    low = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), main)
    head_dims = [32, 64, 96, 128] if backend == "cuda" else [16, 64, 128, 256]
    cases = [Case(f"dtype {DTYPE_NAMES[d]}", d) for d in dtypes]
    cases += [Case(f"head dim {d}", low, D=d, Nq=20, Nk=33) for d in head_dims if d != 64]
    cases += [Case("causal, Nq < Nk", main, causal=True, Nq=29, Nk=70),
              Case("causal, Nq > Nk", low, causal=True, Nq=70, Nk=29),
              Case("GQA 4/2", main, Hq=4, Hkv=2), Case("MQA 4/1, causal", low, Hq=4, Hkv=1, causal=True),
              Case("key-padding mask", low, mask="key_padding"),
              Case("bool mask", main, mask="bool"), Case("float mask", main, mask="float"),
              Case("non-contiguous (B, N, H, D)", low, layout="bnhd", causal=True),
              Case("varlen, empty sequences", low, varlen=((5, 0, 33, 1), (7, 3, 40, 0)), Hq=4, Hkv=2),
              Case("varlen causal", main, varlen=((17, 30), (40, 30)), causal=True),
              Case("dropout replay", main, dropout_p=0.2, causal=True),
              Case("dropout replay, low precision", low, dropout_p=0.3, mask="key_padding"),
              Case("window (16, 0) + bottom-right", main, Nq=30, Nk=70, variants=dict(window_size=(16, 0),
                                                                                     alignment="bottom_right")),
              Case("softcap + ALiBi", low, variants=dict(softcap=5.0, alibi_slopes=0.5)),
              Case("sinks, GQA", main, Hq=4, Hkv=2, variants=dict(sinks=2.0))]
    return cases


def unserved(backend: str, case: Case, device: torch.device) -> Optional[str]:
    from fastattn import dispatch

    return dispatch.why_unsupported(backend, device, case.dtype, case.D, has_mask=case.mask is not None,
                                    mask_kind=case.mask, dropout=case.dropout_p > 0, varlen=case.varlen is not None,
                                    value_head_dim=case.D, variants=case.variant_names())


def run(device: torch.device, backends: list, out=None) -> list:
    out = sys.stdout if out is None else out
    results = []
    for backend in backends:
        for case in cases_for(backend, device):
            reason = unserved(backend, case, device)
            if reason is not None:
                results.append(Result(backend, case.feature, "NOT SERVED", reason))
            else:
                start = time.perf_counter()
                try:
                    status, detail = run_case(backend, case, device)
                except Exception as e:  # a backend that raises is a failure, with its message
                    status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if os.environ.get("FASTATTN_SELFTEST_TRACEBACK"):
                        traceback.print_exc()
                results.append(Result(backend, case.feature, status, detail, time.perf_counter() - start))
            r = results[-1]
            print(f"  {r.backend:<8} {r.feature:<34} {r.status:<10} {r.detail}", file=out, flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is visible)")
    parser.add_argument("--backend", action="append", default=None,
                        help="backend to check (repeatable; default: every available one but 'reference')")
    parser.add_argument("--autotune", action="store_true", help="let Triton autotune (slow: minutes)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if not args.autotune:
        os.environ.setdefault("FASTATTN_TRITON_AUTOTUNE", "0")

    import fastattn
    from fastattn import dispatch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    available = [b for b in fastattn.available_backends() if b != "reference"]
    backends = args.backend or [b for b in available if device.type in dispatch.backend_devices(b)]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"fastattn {fastattn.__version__} selftest: torch {torch.__version__}, device {device} ({gpu}), "
          f"backends {', '.join(backends) or 'none'}")
    start = time.perf_counter()
    results = run(device, backends)
    failed = [r for r in results if r.status == "FAIL"]
    passed = sum(r.status == "PASS" for r in results)
    print(f"{passed} passed, {len(failed)} failed, {sum(r.status == 'NOT SERVED' for r in results)} not served "
          f"in {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""What one benchmark row is made of: a case, a candidate, a mode, a timer.

Case        one attention problem (B, Hq, Hkv, N, D, causal, key padding, dropout, dtype; a sliding
            window; a few queries against a longer cache, aligned bottom-right)
Candidate   one implementation (fastattn backends, torch SDPA backends, the naive PyTorch
            expression, flash-attn, xformers), with a ``prepare`` step kept outside the timer
Modes       "fwd"      inference forward, under torch.no_grad()
            "bwd"      the backward half of a training step (forward untimed before it)
            "fwd_bwd"  a whole training step: forward with autograd + backward
            ("bwd" and "fwd_bwd" come from the same training steps: each step is timed in two spans)
Timers      wall clock on CPU (torch's CPU ops return when done); CUDA events on GPU (with an L2
            flush before each call), or triton.testing.do_bench when asked for
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

try:  # the package under test; the benchmark still runs SDPA and naive without it
    import fastattn
    from fastattn.reference import attention_reference
except ImportError as e:  # pragma: no cover - only before the package is built
    fastattn = None
    attention_reference = None
    FASTATTN_IMPORT_ERROR = e
else:
    FASTATTN_IMPORT_ERROR = None

MODES = ("fwd", "bwd", "fwd_bwd")
TRAIN_MODES = ("bwd", "fwd_bwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


# ---------------------------------------------------------------------------
# Cases and the FLOP formula
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One attention problem: q (B, Hq, Nq, D), k/v (B, Hkv, N, D).

    Self-attention (Nq == N) unless ``seqlen_q`` is set: then Nq new queries against a cache of
    N keys, aligned bottom-right (decoding, chunked prefill). ``window`` > 0: causal sliding-window
    attention, each query sees itself and the ``window`` keys before it.
    """

    batch: int
    heads: int  # query heads Hq
    seqlen: int  # N = Nq = Nk
    head_dim: int  # D (= Dv)
    kv_heads: int = 0  # Hkv; 0 means Hkv = Hq (no GQA)
    causal: bool = False
    key_padding: bool = False  # the last quarter of every sequence's keys masked out
    dropout_p: float = 0.0
    dtype: str = "float32"
    seqlen_q: int = 0  # Nq; 0 means Nq = N
    window: int = 0  # left window of a causal sliding window; 0 means none

    @property
    def hkv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def nq(self) -> int:
        return self.seqlen_q or self.seqlen

    @property
    def decode(self) -> bool:
        return self.nq != self.seqlen

    def attention_kwargs(self) -> dict:
        """fastattn.attention's keywords for the window and the alignment."""
        kw = {"causal": self.causal}
        if self.window:
            kw.update(causal=True, window_size=(self.window, 0))
        if self.decode:
            kw["alignment"] = "bottom_right"
        return kw

    def visible_pairs(self) -> int:
        """(query, key) pairs one head computes: Nq * N, fewer under causal and a window."""
        nq, nk = self.nq, self.seqlen
        if not (self.causal or self.window):
            return nq * nk
        offset = nk - nq if self.decode else 0
        total = 0
        for i in range(nq):
            d = i + offset
            lo = max(0, d - self.window) if self.window else 0
            total += max(0, min(nk, d + 1) - lo)
        return total

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def variant(self) -> str:
        parts = [name for name, on in (("gqa", self.hkv != self.heads), ("padding", self.key_padding),
                                       ("dropout", self.dropout_p > 0), (f"window{self.window}", self.window > 0),
                                       ("decode", self.decode)) if on]
        return "+".join(parts) or "plain"

    @property
    def label(self) -> str:
        heads = f"{self.heads}/{self.hkv}" if self.hkv != self.heads else f"{self.heads}"
        extra = "".join([" causal" if self.causal else "", " pad25%" if self.key_padding else "",
                         f" drop{self.dropout_p:g}" if self.dropout_p > 0 else "",
                         f" window{self.window}" if self.window else ""])
        n = f"Nq={self.nq} Nk={self.seqlen}" if self.decode else f"N={self.seqlen}"
        return f"B={self.batch} H={heads} {n} D={self.head_dim}{extra} {DTYPE_SHORT[self.dtype]}"

    def as_dict(self) -> dict:
        return {"batch": self.batch, "heads": self.heads, "kv_heads": self.hkv, "seqlen": self.seqlen,
                "head_dim": self.head_dim, "causal": self.causal, "key_padding": self.key_padding,
                "dropout_p": self.dropout_p, "dtype": self.dtype, "seqlen_q": self.nq, "window": self.window}


def attention_flops(case: Case, mode: str) -> float:
    """Floating-point operations of one call, written out.

    forward: two matmuls per head, q·kᵀ (2·Nq·Nk·D) and p·v (2·Nq·Nk·Dv):
        2·B·Hq·Nq·Nk·(D + Dv)  =  4·B·Hq·N²·D  when D == Dv and Nq == Nk,
    over the visible (query, key) pairs only: about half for causal, Nq·(window + 1) for a window.
    backward = 2.5× forward: five matmuls (recomputed q·kᵀ, dV = pᵀ·dO, dP = dO·vᵀ,
    dQ = dS·k, dK = dSᵀ·q) against the forward's two. fwd_bwd = 3.5× forward.
    Softmax, masking and dropout are not counted; key padding does not reduce the count.
    """
    B, H, D, Dv = case.batch, case.heads, case.head_dim, case.head_dim
    if case.causal and not case.window and not case.decode:
        pairs = case.seqlen * case.seqlen / 2  # the convention of flash-attention's plots
    else:
        pairs = case.visible_pairs()
    fwd = 2.0 * B * H * pairs * (D + Dv)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def kv_bytes(case: Case) -> int:
    """Bytes of K and V, what a decoding step must stream from memory at least once."""
    elem = torch.finfo(case.torch_dtype).bits // 8
    return 2 * case.batch * case.hkv * case.seqlen * case.head_dim * elem


def score_matrix_bytes(case: Case, elem_bytes: Optional[int] = None) -> int:
    """Bytes of one (B, Hq, Nq, N) matrix: what a non-fused implementation materialises."""
    elem = elem_bytes or torch.finfo(case.torch_dtype).bits // 8
    return case.batch * case.heads * case.nq * case.seqlen * elem


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
@dataclass
class Inputs:
    """Random inputs of one case, allocated once and shared by every candidate."""

    q: torch.Tensor  # (B, Hq, Nq, D), leaf, requires grad
    k: torch.Tensor  # (B, Hkv, N, D)
    v: torch.Tensor  # (B, Hkv, N, Dv)
    grad_out: torch.Tensor  # (B, Hq, Nq, Dv)
    key_keep: Optional[torch.Tensor]  # bool (B, 1, 1, N), True = may attend; None without padding


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, Hq, Hkv, N, D = case.batch, case.heads, case.hkv, case.seqlen, case.head_dim

    def randn(*shape):  # drawn on the CPU so every device sees the same numbers
        return torch.randn(*shape, generator=gen).to(device=device, dtype=case.torch_dtype)

    q = randn(B, Hq, case.nq, D).requires_grad_()
    k = randn(B, Hkv, N, D).requires_grad_()
    v = randn(B, Hkv, N, D).requires_grad_()
    grad_out = randn(B, Hq, case.nq, D)
    key_keep = None
    if case.key_padding:
        key_keep = torch.ones(B, 1, 1, N, dtype=torch.bool, device=device)
        key_keep[..., N - N // 4:] = False  # a quarter of the keys are padding
    return Inputs(q, k, v, grad_out, key_keep)


def combined_bool_mask(case: Case, inputs: Inputs) -> Optional[torch.Tensor]:
    """Causal (bottom-right for decode shapes), the window and key padding as one bool mask,
    for APIs that take one or the other."""
    N, device = case.seqlen, inputs.q.device
    mask = inputs.key_keep
    if case.causal or case.window:
        d = torch.arange(case.nq, device=device)[:, None] + (N - case.nq)  # each query's diagonal key
        j = torch.arange(N, device=device)[None, :]
        visible = j <= d  # (Nq, N)
        if case.window:
            visible &= j >= d - case.window
        mask = visible if mask is None else mask & visible  # (B, 1, Nq, N)
    return mask


REF_MAX_MATRIX_BYTES = 256 * 1024 * 1024  # the float64 check runs on a slice beyond this


@dataclass
class ReferenceSlice:
    """The float64 reference forward on the first ``batches`` x ``q_heads`` of a case."""

    out: torch.Tensor  # (batches, q_heads, N, Dv) float64
    batches: int
    q_heads: int
    scope: str  # "" when it covers the whole case, else e.g. "b<1 h<8"

    def max_abs_err(self, out_bhnd: torch.Tensor) -> float:
        got = out_bhnd[:self.batches, :self.q_heads].double()  # (b, hq, N, Dv)
        return (got - self.out).abs().max().item()


def reference_slice(case: Case, inputs: Inputs, max_matrix_bytes: int = REF_MAX_MATRIX_BYTES) -> ReferenceSlice:
    """float64 reference of as much of the case as keeps one score matrix under ``max_matrix_bytes``.

    The reference materialises (b, hq, N, N) in float64; at long N only batch 0 and the
    first k/v heads (with their groups of q heads) are checked.
    """
    group = case.heads // case.hkv
    per_kv_head = case.nq * case.seqlen * 8 * group  # bytes of one k/v head's scores, one batch element
    if case.batch * case.hkv * per_kv_head <= max_matrix_bytes:
        b, kv = case.batch, case.hkv
    else:
        b, kv = 1, max(1, min(case.hkv, max_matrix_bytes // per_kv_head))
    hq = kv * group
    mask = inputs.key_keep[:b] if inputs.key_keep is not None else None
    with torch.no_grad():
        kw = case.attention_kwargs()  # the reference takes fastattn.attention's variant keywords
        ref = attention_reference(inputs.q[:b, :hq].double(), inputs.k[:b, :kv].double(),
                                  inputs.v[:b, :kv].double(), attn_mask=mask, **kw)
    full = b == case.batch and kv == case.hkv
    return ReferenceSlice(ref, b, hq, "" if full else f"b<{b} h<{hq}")


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------
@dataclass
class Prepared:
    """A candidate bound to one case's inputs; everything here is built outside the timer."""

    call: Callable[[], torch.Tensor]  # one attention call
    leaves: tuple  # the tensors the backward differentiates (the call's inputs)
    grad_out: torch.Tensor  # laid out like call()'s output
    to_bhnd: Callable[[torch.Tensor], torch.Tensor] = lambda out: out  # output -> (B, Hq, N, Dv)


@dataclass(frozen=True)
class Candidate:
    name: str  # "fastattn:cpu", "sdpa:flash", "naive", "flash_attn", "xformers"
    family: str  # "fastattn", "sdpa", "naive" or "external"
    prepare: Callable[[Case, Inputs], Prepared]
    why_unsupported: Callable[[Case, torch.device], Optional[str]] = lambda case, device: None
    materialises: bool = False  # keeps (B, H, N, N) matrices: O(N²) memory


def naive_attention(q, k, v, scale: float, bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """The plain PyTorch expression users compare against, in the input dtype.

    q (B, Hq, N, D), k/v (B, Hkv, N, D); bias: float (.., N, N) added to the logits
    (-inf where masked). Materialises the (B, Hq, N, N) scores.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, N, D)
        v = v.repeat_interleave(group, dim=1)  # (B, Hq, N, Dv)
    scores = q @ k.transpose(-1, -2) * scale  # (B, Hq, N, N)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return probs @ v  # (B, Hq, N, Dv)


def _prepare_naive(case: Case, inputs: Inputs) -> Prepared:
    mask = combined_bool_mask(case, inputs)
    bias = None
    if mask is not None:  # the additive form "(+ mask)", built once outside the timer
        bias = torch.zeros(mask.shape, dtype=inputs.q.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    q, k, v = inputs.q, inputs.k, inputs.v
    scale = 1.0 / math.sqrt(case.head_dim)
    return Prepared(lambda: naive_attention(q, k, v, scale, bias, case.dropout_p), (q, k, v), inputs.grad_out)


def _fastattn_candidate(backend: str) -> Candidate:
    def prepare(case: Case, inputs: Inputs) -> Prepared:
        q, k, v, mask = inputs.q, inputs.k, inputs.v, inputs.key_keep

        kw = case.attention_kwargs()

        def call():
            return fastattn.attention(q, k, v, attn_mask=mask, dropout_p=case.dropout_p, backend=backend, **kw)

        return Prepared(call, (q, k, v), inputs.grad_out)

    def why_unsupported(case: Case, device: torch.device) -> Optional[str]:
        from fastattn import dispatch  # the package's own table says what a backend serves

        check = getattr(dispatch, "why_unsupported", None)
        if check is None:  # an older package: find out by calling it
            return None
        variants = (("window",) if case.window else ()) + (("bottom_right",) if case.decode and case.causal else ())
        return check(backend, device, case.torch_dtype, case.head_dim, has_mask=case.key_padding,
                     dropout=case.dropout_p > 0, mask_kind="key_padding" if case.key_padding else None,
                     **({"variants": variants} if variants else {}))

    materialises = backend == "reference"
    return Candidate(f"fastattn:{backend}", "fastattn", prepare, why_unsupported, materialises)


# torch SDPA backends by device, in the order they are listed
SDPA_BACKENDS = {
    "cpu": ("flash", "math"),  # "flash" is what SDPA picks by default on CPU
    "cuda": ("flash", "efficient", "cudnn", "math"),
}


def _sdpa_candidate(kind: str) -> Candidate:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp_backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kind]

    def prepare(case: Case, inputs: Inputs) -> Prepared:
        q, k, v = inputs.q, inputs.k, inputs.v
        gqa = case.hkv != case.heads
        # SDPA takes attn_mask or is_causal (top-left), not both: padding, windows and bottom-right
        # causal go in as the equivalent bool mask
        needs_mask = case.key_padding or case.window or (case.decode and case.causal)
        mask = combined_bool_mask(case, inputs) if needs_mask else None
        is_causal = case.causal and mask is None

        def call():
            with sdpa_kernel(sdp_backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=case.dropout_p,
                                                      is_causal=is_causal, enable_gqa=gqa)

        return Prepared(call, (q, k, v), inputs.grad_out)

    return Candidate(f"sdpa:{kind}", "sdpa", prepare, materialises=kind == "math")


def _flash_attn_candidate() -> Candidate:
    from flash_attn import flash_attn_func

    def prepare(case: Case, inputs: Inputs) -> Prepared:
        # flash-attn takes (B, N, H, D); the copies are made here, outside the timer
        q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
        grad_out = inputs.grad_out.transpose(1, 2).contiguous()  # (B, N, Hq, Dv)

        window = (case.window, 0) if case.window else (-1, -1)

        def call():  # causal and windows bottom-right aligned, as flash-attn defines them
            return flash_attn_func(q, k, v, dropout_p=case.dropout_p, causal=case.causal or bool(case.window),
                                   window_size=window)

        return Prepared(call, (q, k, v), grad_out, to_bhnd=lambda out: out.transpose(1, 2))

    def why_unsupported(case: Case, device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return "CUDA only"
        if case.dtype not in ("float16", "bfloat16"):
            return "fp16/bf16 only"
        if case.key_padding:
            return "key padding needs the varlen API"
        return None

    return Candidate("flash_attn", "external", prepare, why_unsupported)


def _xformers_candidate() -> Candidate:
    import xformers.ops as xops

    def prepare(case: Case, inputs: Inputs) -> Prepared:
        q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
        grad_out = inputs.grad_out.transpose(1, 2).contiguous()  # (B, N, Hq, Dv)
        bias = xops.LowerTriangularMask() if case.causal else None

        def call():
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=case.dropout_p)

        return Prepared(call, (q, k, v), grad_out, to_bhnd=lambda out: out.transpose(1, 2))

    def why_unsupported(case: Case, device: torch.device) -> Optional[str]:
        if case.key_padding:
            return "key padding not wired up (needs a BlockDiagonal / tensor bias)"
        if case.window or case.decode:
            return "windows and bottom-right causal not wired up (LowerTriangularFromBottomRight / local masks)"
        if case.hkv != case.heads:
            return "GQA needs the 5-D (B, N, G, H, D) layout"
        return None

    return Candidate("xformers", "external", prepare, why_unsupported)


def available_candidates(device: torch.device) -> list:
    """Every implementation that can be imported for ``device``, fastattn first."""
    cands = []
    if fastattn is not None:
        cands += [_fastattn_candidate(b) for b in fastattn.available_backends()]
    cands += [_sdpa_candidate(kind) for kind in SDPA_BACKENDS.get(device.type, ("math",))]
    cands.append(Candidate("naive", "naive", _prepare_naive, materialises=True))
    for factory in (_flash_attn_candidate, _xformers_candidate):
        try:
            cands.append(factory())
        except ImportError:
            pass
    return cands


def select_candidates(device: torch.device, patterns: Optional[list] = None) -> list:
    """Filter by name: "fastattn:cpu", a family ("sdpa", "fastattn"), or "naive". None keeps all."""
    cands = available_candidates(device)
    if not patterns:
        return cands
    chosen = [c for c in cands if c.name in patterns or c.family in patterns]
    unknown = [p for p in patterns if not any(p in (c.name, c.family) for c in cands)]
    if unknown:
        names = ", ".join(c.name for c in cands)
        raise SystemExit(f"--backends: {', '.join(unknown)} not available here (available: {names})")
    return chosen


def get_candidate(name: str, device: torch.device) -> Candidate:
    for c in available_candidates(device):
        if c.name == name:
            return c
    raise KeyError(f"no candidate {name!r} on {device}")


# ---------------------------------------------------------------------------
# Running one call
# ---------------------------------------------------------------------------
def run_forward(p: Prepared) -> torch.Tensor:
    with torch.no_grad():
        return p.call()


def run_train_step(p: Prepared):
    out = p.call()
    return torch.autograd.grad(out, p.leaves, p.grad_out)


def estimated_extra_bytes(cand: Candidate, case: Case, train: bool) -> int:
    """A rough upper bound, to skip calls that cannot fit (only the O(N²) ones matter)."""
    if not cand.materialises:
        return 0
    # scores, probabilities (+ dropout mask, + their gradients when training); the fastattn
    # reference and SDPA math compute in float32 at least
    elem = max(4, torch.finfo(case.torch_dtype).bits // 8)
    matrices = (6 if train else 3) + (2 if case.dropout_p > 0 else 0)
    return matrices * score_matrix_bytes(case, elem)


def last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports for cpu0 (its L3, usually), 0 when it reports none."""
    largest = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            largest = max(largest, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except ValueError:
            continue
    return largest


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not skip


# ---------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------
class WallClock:
    """CPU: torch's CPU ops are synchronous, so wall-clock marks bracket the work exactly.

    With ``flush_bytes``, a buffer that large (well beyond the last-level cache) is read before
    each call, so every candidate starts with its inputs in memory, not in the cache, whatever
    the previous candidate left there (the decode suite: the figure it compares with the copy
    bandwidth is bytes streamed from memory). Read, not written: written lines would be dirty,
    and writing them back would land in the next call's time.
    """

    def __init__(self, flush_bytes: int = 0):
        # float32: torch sums it at memory speed (an int8 sum runs ~100x slower)
        self._flush = torch.ones(flush_bytes // 4, dtype=torch.float32) if flush_bytes else None
        self.name = "wall clock, caches flushed before each call" if flush_bytes else "wall clock"

    def before_call(self):
        if self._flush is not None:
            self._flush.sum()

    def mark(self):
        return time.perf_counter()

    def sync(self):
        pass

    def seconds(self, a, b) -> float:
        return b - a


class CudaEventClock:
    """GPU: CUDA events around each call, read after one synchronize per repetition.

    The L2 cache is flushed before each call (as triton.testing.do_bench does), so a
    candidate does not profit from the inputs the previous one left in cache.
    """

    name = "CUDA events"

    def __init__(self, device: torch.device):
        self._flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)  # > any L2 to date

    def before_call(self):
        self._flush.zero_()

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self):
        torch.cuda.synchronize()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3


def timed_forward(p: Prepared, clock) -> dict:
    clock.before_call()
    with torch.no_grad():
        t0 = clock.mark()
        p.call()
        t1 = clock.mark()
    return {"fwd": (t0, t1)}


def timed_train_step(p: Prepared, clock) -> dict:
    clock.before_call()
    t0 = clock.mark()
    out = p.call()
    t1 = clock.mark()
    torch.autograd.grad(out, p.leaves, p.grad_out)
    t2 = clock.mark()
    return {"bwd": (t1, t2), "fwd_bwd": (t0, t2)}


def time_interleaved(prepared: dict, modes: tuple, clock, reps: int, min_reps: int = 3,
                     budget_s: Optional[float] = None, kinds: Optional[dict] = None) -> dict:
    """Median seconds per (candidate, mode), candidates run round-robin within each repetition.

    prepared: {name: Prepared}, already warmed up; kinds: {name: {"fwd", "train"}}, the
    calls each candidate can make (default: both). Within a repetition every candidate
    runs once per kind of call (forward, training step), so slow drift (thermals, other
    load) hits all of them alike. With ``budget_s``, stops after the first repetition
    whose cumulative time exceeds it, but never before ``min_reps``.
    Returns {(name, mode): {"median_s", "reps", "all_s"}}.
    """
    kinds = kinds or {name: {"fwd", "train"} for name in prepared}
    calls = []
    if "fwd" in modes:
        calls += [(name, timed_forward) for name in prepared if "fwd" in kinds[name]]
    if any(m in modes for m in TRAIN_MODES):
        calls += [(name, timed_train_step) for name in prepared if "train" in kinds[name]]
    samples = {}
    start = time.perf_counter()
    for rep in range(reps):
        spans = [(name, timed(prepared[name], clock)) for name, timed in calls]
        clock.sync()
        for name, marks in spans:
            for mode, (a, b) in marks.items():
                if mode in modes:
                    samples.setdefault((name, mode), []).append(clock.seconds(a, b))
        if budget_s is not None and rep + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    return {key: {"median_s": statistics.median(v), "reps": len(v), "all_s": v} for key, v in samples.items()}


def median_ci(values: list, confidence: float = 0.95) -> tuple:
    """(lo, hi): a distribution-free confidence interval for the median of ``values`` (order statistics:
    the k-th smallest and k-th largest, k the largest rank such that a Binomial(n, 1/2) falls below it with
    probability <= (1 - confidence) / 2). Too few values for that confidence: (min, max)."""
    xs = sorted(values)
    n, tail, k, below = len(xs), (1 - confidence) / 2, 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2 ** n  # P(Binomial(n, 1/2) <= k)
        if below > tail:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k > 0 else (xs[0], xs[-1])


def time_with_do_bench(prepared: dict, modes: tuple, kinds: Optional[dict] = None) -> dict:
    """GPU alternative: triton.testing.do_bench per (candidate, mode); not interleaved."""
    from triton.testing import do_bench

    kinds = kinds or {name: {"fwd", "train"} for name in prepared}
    results = {}
    for name, p in prepared.items():
        for mode in modes:
            if ("fwd" if mode == "fwd" else "train") not in kinds[name]:
                continue
            if mode == "fwd":
                fn = lambda p=p: run_forward(p)  # noqa: E731
            elif mode == "fwd_bwd":
                fn = lambda p=p: run_train_step(p)  # noqa: E731
            else:  # backward only, on one graph kept alive
                out = p.call()
                fn = lambda p=p, out=out: torch.autograd.grad(out, p.leaves, p.grad_out,  # noqa: E731
                                                              retain_graph=True)
            ms = do_bench(fn, return_mode="median")
            results[(name, mode)] = {"median_s": ms / 1e3, "reps": None, "all_s": []}
    return results


# ---------------------------------------------------------------------------
# The machine's own limits, measured in the run that they are compared with
# ---------------------------------------------------------------------------
def machine_rates(device: torch.device, reps: int = 15) -> dict:
    """{"copy_bytes_per_s": bytes read + written per second by a 256 MiB ``copy_`` (past every
    cache), "gemm_flops_per_s": a float32 ``torch.mm`` of n x n (2048 on a CPU, 8192 on a GPU)}: medians of ``reps``. A
    memory-bound kernel (decoding) is judged against the first, a compute-bound one (the
    training shapes' forward) against the second."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def median_s(fn, n: int) -> float:
        fn()
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    src = torch.rand(64 << 20, device=device)  # 256 MiB of float32
    dst = torch.empty_like(src)
    copy_s = median_s(lambda: dst.copy_(src), reps)
    del src, dst
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    gemm_s = median_s(lambda: torch.mm(a, b), max(3, reps // 3))
    return {"copy_bytes_per_s": 2 * (64 << 20) * 4 / copy_s, "gemm_flops_per_s": 2 * n ** 3 / gemm_s}


# ---------------------------------------------------------------------------
# Device description
# ---------------------------------------------------------------------------
def slug(text: str) -> str:
    out = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """``cpu-<cpu model>`` or ``cuda-<gpu name>``, slugged, for file names."""
    if device.type == "cuda":
        return "cuda-" + slug(torch.cuda.get_device_name(device))
    return "cpu-" + slug(cpu_model())


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Row:
    """One line of output: a (case, candidate, mode) measurement, or why there is none."""

    suite: str
    case: Case
    mode: str
    backend: str
    time_s: Optional[float] = None
    reps: Optional[int] = None
    flops_per_s: Optional[float] = None
    extra_peak_bytes: Optional[int] = None
    speedup_vs_naive: Optional[float] = None
    speedup_vs_sdpa: Optional[float] = None
    max_abs_err: Optional[float] = None
    kv_bytes_per_s: Optional[float] = None  # decode rows: K/V bytes / time (a floor on the bytes read)
    speedup_ci: Optional[tuple] = None  # paired rows: 95% CI (lo, hi) of the median per-repetition x SDPA
    err_scope: str = ""  # "" when max_abs_err covers the whole output, else e.g. "b<1 h<8"
    note: str = ""

    def as_dict(self) -> dict:
        d = {"suite": self.suite, "case": self.case.label, **self.case.as_dict(), "mode": self.mode,
             "backend": self.backend}
        for key in ("time_s", "reps", "flops_per_s", "extra_peak_bytes", "speedup_vs_naive", "speedup_vs_sdpa",
                    "max_abs_err", "kv_bytes_per_s", "speedup_ci", "err_scope", "note"):
            d[key] = getattr(self, key)
        d["flops"] = attention_flops(self.case, self.mode)
        return d


__all__ = ["Case", "Candidate", "Inputs", "Prepared", "Row", "MODES", "TRAIN_MODES", "DTYPES",
           "attention_flops", "kv_bytes", "machine_rates", "make_inputs", "naive_attention", "available_candidates",
           "select_candidates",
           "get_candidate", "time_interleaved", "median_ci", "time_with_do_bench", "WallClock", "CudaEventClock",
           "device_name", "default_device"]

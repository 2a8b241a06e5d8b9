"""End to end: BERT masked-language-model training steps and inference (suite ``bert``).

fastattn's bundled BERT (``fastattn.models.bert``) against HuggingFace's
``BertForMaskedLM`` with its ``sdpa`` and ``eager`` attention, all with the same
weights on the same batch:

  fastattn          our BERT: padding dropped before the encoder, ``varlen_attention``
                    on the packed tokens, MLM head only on the masked positions (training)
  fastattn:padded   our BERT on the padded batch (``fastattn.attention`` with a key-padding
                    mask): what the padding-free path saves
  ours:sdpa         our model code with torch's SDPA: what the attention kernel alone saves
  hf:sdpa, hf:eager transformers' BERT, when transformers is importable

A batch is BERT-like: B sequences of random token ids whose lengths are drawn
uniformly from [N/2, N] (a quarter of the positions are padding on average), 15% of
the real tokens masked for the MLM loss. Modes:
  infer  model.eval(), forward under no_grad, logits for every position
  train  model.train() (dropout on, as in pre-training), forward with labels, backward,
         AdamW step, zero_grad
tokens/s counts the real (non-padding) tokens. ``max err`` is the largest difference of
the inference logits (real positions) from ``hf:eager`` on the same weights.
On CUDA the models run under bf16 autocast (fp32 weights), as pre-training does.
"""
from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import memory
from .core import DTYPE_SHORT

MASK_TOKEN_ID = 103  # [MASK] in bert-base-uncased's vocabulary
MLM_PROBABILITY = 0.15
MODES = ("infer", "train")
REFERENCE = "hf:eager"  # the logits every candidate is compared with
BASELINE = "hf:sdpa"  # the speedup column: time(hf:sdpa) / time(row)


@dataclass(frozen=True)
class BertWorkload:
    """One model size on one batch shape."""

    preset: str  # fastattn.models.bert.PRESETS name
    batch: int
    seqlen: int
    dtype: str = "float32"  # "float32", or "bfloat16" = bf16 autocast over fp32 weights (CUDA)
    vocab_size: int = 30522

    @property
    def label(self) -> str:
        return f"BERT-{self.preset} B={self.batch} N={self.seqlen} ~25% pad {DTYPE_SHORT[self.dtype]}"

    def as_dict(self) -> dict:
        return {"model": f"bert-{self.preset}", "batch": self.batch, "seqlen": self.seqlen, "dtype": self.dtype,
                "vocab_size": self.vocab_size}


@dataclass
class ModelRow:
    """One (workload, candidate, mode) measurement of the end-to-end suite."""

    suite: str
    case: BertWorkload
    mode: str  # "infer" | "train"
    backend: str
    time_s: Optional[float] = None
    reps: Optional[int] = None
    tokens_per_s: Optional[float] = None
    extra_peak_bytes: Optional[int] = None
    speedup_vs_sdpa: Optional[float] = None  # against hf:sdpa
    max_abs_err: Optional[float] = None  # inference logits against hf:eager
    note: str = ""

    def as_dict(self) -> dict:
        d = {"suite": self.suite, "case": self.case.label, **self.case.as_dict(), "mode": self.mode,
             "backend": self.backend}
        for key in ("time_s", "reps", "tokens_per_s", "extra_peak_bytes", "speedup_vs_sdpa", "max_abs_err", "note"):
            d[key] = getattr(self, key)
        return d


# ---------------------------------------------------------------------------
# Batches and models
# ---------------------------------------------------------------------------
def make_batch(w: BertWorkload, device: torch.device, seed: int = 0) -> dict:
    """input_ids, attention_mask, token_type_ids, labels: (B, N); lengths uniform in [N/2, N]."""
    g = torch.Generator().manual_seed(seed)
    B, N = w.batch, w.seqlen
    lengths = torch.randint(max(1, N // 2), N + 1, (B,), generator=g)
    lengths[0] = N  # the longest sequence fills the batch, as in a real padded batch
    positions = torch.arange(N)
    attention_mask = (positions[None, :] < lengths[:, None]).long()  # (B, N)
    input_ids = torch.randint(1000, w.vocab_size, (B, N), generator=g) * attention_mask  # pad id 0
    masked = (torch.rand(B, N, generator=g) < MLM_PROBABILITY) & attention_mask.bool()
    masked[:, 0] |= ~masked.any(dim=1)  # at least one masked token per sequence
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    input_ids = torch.where(masked, torch.full_like(input_ids, MASK_TOKEN_ID), input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "token_type_ids": torch.zeros_like(input_ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def _hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


CANDIDATES = ("fastattn", "fastattn:padded", "ours:sdpa", "hf:sdpa", "hf:eager")


def build_models(w: BertWorkload, device: torch.device, names=CANDIDATES, seed: int = 0) -> tuple:
    """{name: model} with identical weights (copied from one HF model when transformers is present), and
    {name: reason} for the candidates that cannot be built here."""
    from fastattn.models.bert import BertForMaskedLM, preset_config

    torch.manual_seed(seed)
    config = preset_config(w.preset, vocab_size=w.vocab_size)
    models, skipped = {}, {}
    hf_model = None
    if _hf_available():
        from transformers import BertForMaskedLM as HFBertForMaskedLM

        hf_model = HFBertForMaskedLM(config.to_hf())
    for name in names:
        if name.startswith("hf:"):
            if hf_model is None:
                skipped[name] = "unsupported: transformers is not installed (pip install transformers)"
                continue
            m = copy.deepcopy(hf_model)
            impl = name.split(":")[1]
            if hasattr(m, "set_attn_implementation"):  # transformers >= 4.56
                m.set_attn_implementation(impl)
            else:
                m.config._attn_implementation = impl
        else:
            overrides = {"fastattn": dict(attn_implementation="fastattn", unpad=True),
                         "fastattn:padded": dict(attn_implementation="fastattn", unpad=False),
                         "ours:sdpa": dict(attn_implementation="sdpa")}[name]
            m = (BertForMaskedLM.from_hf(hf_model, **overrides) if hf_model is not None
                 else BertForMaskedLM(preset_config(w.preset, vocab_size=w.vocab_size, **overrides)))
            if hf_model is None and models:  # no HF model to copy from: copy the first of ours
                m.load_state_dict(next(iter(models.values())).state_dict())
        models[name] = m.to(device)
    return models, skipped


def _autocast(w: BertWorkload, device: torch.device):
    enabled = w.dtype != "float32"
    dtype = torch.bfloat16 if w.dtype == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def make_step(model, mode: str, batch: dict, w: BertWorkload, device: torch.device) -> Callable[[], object]:
    """A zero-argument callable running one inference forward or one training step."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), _autocast(w, device):
                return model(**inputs).logits

        return infer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train():
        with _autocast(w, device):
            loss = model(**inputs, labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return train


# ---------------------------------------------------------------------------
# Memory: one step in a fresh process (CPU) or from the allocator's peak (GPU)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BertMemoryJob:
    workload: BertWorkload
    candidates: tuple
    modes: tuple
    device: str = "cpu"
    threads: int = 0


def measure_memory_in_this_process(job: BertMemoryJob) -> dict:
    """{"peaks": {"candidate/mode": bytes or None}, "errors": {...}}: the extra peak of one step above the
    model, its optimizer state (after a warm-up step) and the batch. One candidate at a time, each freed
    before the next; on CPU this runs in a fresh process whose glibc returns freed buffers at once."""
    device = torch.device(job.device)
    batch = make_batch(job.workload, device)
    peaks, errors = {}, {}
    for name in job.candidates:
        models, skipped = build_models(job.workload, device, names=(name,))
        for mode in job.modes:
            key = f"{name}/{mode}"
            if name in skipped:
                peaks[key], errors[key] = None, skipped[name]
                continue
            step = make_step(models[name], mode, batch, job.workload, device)
            step()  # warm-up: code paths, optimizer state
            gc.collect()
            res = memory.peak_of_call(step, device)
            peaks[key], errors[key] = res["extra_peak_bytes"], res["error"]
            del step
        del models
        gc.collect()
    return {"peaks": peaks, "errors": errors, "error": None}


# ---------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_logit_error(logits, reference, attention_mask) -> float:
    real = attention_mask.bool()
    return (logits.float()[real] - reference.float()[real]).abs().max().item()


def run_workload(w: BertWorkload, modes: tuple, device: torch.device, reps: int, warmup: int, row_memory: bool,
                 threads: int, log: Callable[[str], None] = print) -> list:
    batch = make_batch(w, device)
    real_tokens = int(batch["attention_mask"].sum())
    models, notes = build_models(w, device)
    errors = {}
    if "infer" in modes and REFERENCE in models:
        ref_logits = make_step(models[REFERENCE], "infer", batch, w, device)()
        for name, model in models.items():
            errors[name] = max_logit_error(make_step(model, "infer", batch, w, device)(), ref_logits,
                                           batch["attention_mask"])
        del ref_logits
    all_peaks = {}
    if row_memory:  # first, in a fresh process (CPU), before this process holds the timing state
        res = memory.measure_job(measure_memory_in_this_process,
                                 BertMemoryJob(w, tuple(models), modes, str(device), threads), device)
        if res.get("error"):
            log(f"  memory of {w.label}: {res['error']}")
        all_peaks = res.get("peaks") or {}
        for key, err in (res.get("errors") or {}).items():
            if err:
                log(f"  memory of {key} on {w.label}: {err}")
    rows = []
    for mode in modes:
        steps = {}
        for name, model in models.items():
            try:
                steps[name] = make_step(model, mode, batch, w, device)
                for _ in range(warmup):
                    steps[name]()
            except Exception as e:  # report the candidate, keep the others
                notes[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                steps.pop(name, None)
        times = {name: [] for name in steps}
        for _ in range(reps):  # round-robin: drift hits every candidate alike
            for name, step in steps.items():
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        medians = {name: statistics.median(ts) for name, ts in times.items() if ts}
        peaks = {name: all_peaks.get(f"{name}/{mode}") for name in steps}
        base = medians.get(BASELINE)
        for name in CANDIDATES:
            row = ModelRow("bert", w, mode, name, note=notes.get(name, ""))
            if name in medians:
                row.time_s, row.reps = medians[name], len(times[name])
                row.tokens_per_s = real_tokens / medians[name]
                row.speedup_vs_sdpa = base / medians[name] if base else None
                row.extra_peak_bytes = peaks.get(name)
                row.max_abs_err = errors.get(name) if mode == "infer" else None
            rows.append(row)
        del steps
    del models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def default_workloads(device: torch.device) -> list:
    """CPU: BERT-mini (4 layers, hidden 256) at the two BERT pre-training lengths, fp32.
    CUDA: BERT-base at 128 and 512 under bf16 autocast."""
    if device.type == "cuda":
        return [BertWorkload("base", 64, 128, "bfloat16"), BertWorkload("base", 16, 512, "bfloat16")]
    return [BertWorkload("mini", 16, 128), BertWorkload("mini", 4, 512)]


def format_model_table(rows: list) -> str:
    lines = []
    current = None
    for r in rows:
        if r.case != current:
            current = r.case
            lines += ["", f"bert: {r.case.label}   (tokens/s of real tokens; x hf:sdpa = time(hf:sdpa) / time; "
                          f"max err = inference logits vs {REFERENCE})",
                      f"  {'mode':<6} {'backend':<16} {'time ms':>9} {'tokens/s':>10} {'extra MiB':>9} "
                      f"{'x hf:sdpa':>9} {'max err':>8} {'reps':>4}  note"]
        if r.time_s is None:
            lines.append(f"  {r.mode:<6} {r.backend:<16} {'—':>9} {'':>10} {'':>9} {'':>9} {'':>8} {'':>4}  {r.note}")
            continue

        def num(x, fmt, width):
            return f"{'—':>{width}}" if x is None else f"{x:{width}{fmt}}"

        lines.append(f"  {r.mode:<6} {r.backend:<16} {r.time_s * 1e3:9.1f} {r.tokens_per_s:10.0f} "
                     f"{num(r.extra_peak_bytes and r.extra_peak_bytes / 2**20, '.1f', 9)} "
                     f"{num(r.speedup_vs_sdpa, '.2f', 9)} {num(r.max_abs_err, '.1e', 8)} {r.reps:4d}  "
                     f"{r.note}".rstrip())
    return "\n".join(lines).lstrip("\n")

"""Tokens/s of the same BERT MLM step with each attention (``python -m fastattn.mlm.compare``).

    python -m fastattn.mlm.compare --model mini --packing line            # CPU, real padded batches
    python -m fastattn.mlm.compare --model base --max-seq-len 512 --packing pack --hf --device cuda

Variants, all from the same initial weights and fed the very same batches:
  fastattn          our model, padding-free (varlen) attention, MLM head on masked tokens only
  fastattn-padded   our model, padded batches through fastattn.attention with a key mask
  sdpa / eager      our model code with torch's attention (padded)
  hf-sdpa           transformers' BertForMaskedLM (attn_implementation="sdpa"), with --hf

Each variant runs ``--steps`` timed steps per round after ``--warmup`` untimed ones; rounds
are interleaved (A B C A B C ...) so drift of the machine hits every variant alike; the
figure is the median over rounds of real (non-padding) tokens per second. The first-step
loss of every variant is recorded too: same weights and batch, so they must agree.
Results go to ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from ..models.bert import BertForMaskedLM, build_bert
from .data import Batch

VARIANTS = ("fastattn", "fastattn-padded", "sdpa", "eager", "hf-sdpa")


@dataclass
class CompareConfig:
    model: str = "mini"
    max_seq_len: int = 128
    batch_size: int = 32
    packing: str = "line"  # "line": real padding (where unpadding matters); "pack": none
    variants: List[str] = field(default_factory=lambda: ["fastattn", "fastattn-padded", "sdpa", "eager"])
    hf: bool = False  # add transformers' BertForMaskedLM with sdpa
    mode: str = "train"  # "train" (forward + backward + AdamW) or "infer" (forward, no grad)
    steps: int = 5  # timed steps per round
    warmup: int = 2
    rounds: int = 5
    device: str = "auto"
    dtype: str = "auto"  # bf16 autocast on cuda, float32 on cpu
    threads: Optional[int] = None
    data: List[str] = field(default_factory=list)
    cache_dir: Optional[str] = None
    vocab_size: int = 8192
    seed: int = 0
    out: Optional[str] = None  # default benchmarks/results/bert-mlm-<device>-<date>


def build_variant(name: str, preset: str, vocab_size: int, max_seq_len: int, seed: int = 0, **overrides):
    """A BertForMaskedLM for one variant; same ``seed`` -> same weights for every variant."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    kw = dict(vocab_size=vocab_size, max_position_embeddings=max(512, max_seq_len), **overrides)
    if name == "hf-sdpa":
        ours = build_bert(preset, "sdpa", seed=seed, **kw)
        hf = ours.to_hf()
        hf.config._attn_implementation = "sdpa"
        return hf
    attn = "fastattn" if name.startswith("fastattn") else name
    return build_bert(preset, attn, unpad=name != "fastattn-padded", seed=seed, **kw)


def train_step(model, optimizer, batch: Batch, autocast=contextlib.nullcontext) -> float:
    """One MLM training step (forward, backward, optimizer) on ``batch``; returns the loss."""
    model.train()
    with autocast():
        out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


@torch.no_grad()
def inference_step(model, batch: Batch, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Forward pass in eval mode; returns the logits."""
    model.eval()
    with autocast():
        return model(batch.input_ids, attention_mask=batch.attention_mask).logits


def make_batches(cfg: CompareConfig, count: int) -> tuple:
    """``count`` masked training batches from the MLM corpus (default: Python's docs) and the vocab size."""
    from .. import train_mlm

    tcfg = train_mlm.TrainConfig(data=cfg.data, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
                                 packing=cfg.packing, batch_size=cfg.batch_size, seed=cfg.seed,
                                 **({"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}))
    data = train_mlm.prepare_data(tcfg, train_mlm.Dist())
    order = train_mlm.data_lib.SampleOrder(len(data.train), cfg.seed)
    from .masking import MaskingConfig

    batches = []
    for step in range(count):
        batches.extend(train_mlm.local_micro_batches(data, order, tcfg, MaskingConfig(), step, train_mlm.Dist()))
    return batches, data.info.vocab_size


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(cfg: CompareConfig) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    variants = list(cfg.variants) + (["hf-sdpa"] if cfg.hf and "hf-sdpa" not in cfg.variants else [])
    n_batches = cfg.warmup + cfg.steps
    batches, vocab = make_batches(cfg, n_batches)
    batches = [b.to(device) for b in batches]
    tokens = [b.num_tokens for b in batches]
    padded = [b.input_ids.numel() for b in batches]

    models, optims, first_loss = {}, {}, {}
    for name in variants:
        m = build_variant(name, cfg.model, vocab, cfg.max_seq_len, seed=cfg.seed).to(device)
        models[name] = m
        optims[name] = torch.optim.AdamW(m.parameters(), lr=1e-4)
        with torch.no_grad(), autocast():  # same weights, same batch: the losses must agree
            m.eval()
            first_loss[name] = float(m(batches[0].input_ids, attention_mask=batches[0].attention_mask,
                                       labels=batches[0].labels).loss)

    per_round = {name: [] for name in variants}
    for _ in range(cfg.rounds):
        for name in variants:  # interleaved: every round runs each variant once
            m, opt = models[name], optims[name]
            for b in batches[:cfg.warmup]:
                train_step(m, opt, b, autocast) if cfg.mode == "train" else inference_step(m, b, autocast)
            _sync(device)
            t0 = time.perf_counter()
            for b in batches[cfg.warmup:]:
                train_step(m, opt, b, autocast) if cfg.mode == "train" else inference_step(m, b, autocast)
            _sync(device)
            per_round[name].append(sum(tokens[cfg.warmup:]) / (time.perf_counter() - t0))

    base = "sdpa" if "sdpa" in variants else variants[0]
    results = {}
    for name in variants:
        tps = statistics.median(per_round[name])
        results[name] = {"tokens_per_s": tps, "tokens_per_s_rounds": per_round[name],
                         "ms_per_step": 1000 * sum(tokens[cfg.warmup:]) / cfg.steps / tps,
                         "speedup_vs_" + base: tps / statistics.median(per_round[base]),
                         "first_step_loss": first_loss[name]}
    return {"config": asdict(cfg), "date": datetime.date.today().isoformat(), "machine": machine_info(device),
            "padding_fraction": 1 - sum(tokens) / sum(padded), "real_tokens_per_batch": statistics.mean(tokens),
            "precision": "bf16 autocast" if use_bf16 else "float32", "results": results}


def machine_info(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["cpu_count"] = os.cpu_count()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def to_markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# BERT MLM {c['mode']} step, {c['model']} at sequence length {c['max_seq_len']}, batch {c['batch_size']}",
             "",
             f"{report['date']}, {report['machine'].get('gpu') or report['machine']['cpu']}, "
             f"{report['machine']['threads']} threads, torch {report['machine']['torch']}, {report['precision']}; "
             f"packing `{c['packing']}` ({100 * report['padding_fraction']:.0f}% of the padded batch is padding, "
             f"{report['real_tokens_per_batch']:.0f} real tokens per batch); median of {c['rounds']} interleaved "
             f"rounds of {c['steps']} steps.", "",
             "| variant | real tokens/s | ms/step | speed-up | first-step loss |", "|---|---:|---:|---:|---:|"]
    for name, r in report["results"].items():
        speed = next(v for k, v in r.items() if k.startswith("speedup_vs_"))
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.1f} | {speed:.2f}x | "
                     f"{r['first_step_loss']:.5f} |")
    base = next(k for k in next(iter(report["results"].values())) if k.startswith("speedup_vs_"))[len("speedup_vs_"):]
    lines += ["", f"Speed-up relative to `{base}`. Command: `python -m fastattn.mlm.compare "
              f"--model {c['model']} --max-seq-len {c['max_seq_len']} --batch-size {c['batch_size']} "
              f"--packing {c['packing']} --mode {c['mode']}{' --hf' if c['hf'] else ''}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    d = CompareConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, choices=["tiny", "mini", "small", "base", "large"])
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--packing", default=d.packing, choices=["line", "pack"])
    p.add_argument("--variants", nargs="+", default=d.variants, choices=list(VARIANTS))
    p.add_argument("--hf", action="store_true", help="add transformers' BertForMaskedLM (sdpa)")
    p.add_argument("--mode", default=d.mode, choices=["train", "infer"])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", nargs="*", default=[])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--out", default=None)
    cfg = CompareConfig(**vars(p.parse_args(argv)))
    report = compare(cfg)
    device = "gpu" if "gpu" in report["machine"] else "cpu"
    out = cfg.out or os.path.join("benchmarks", "results", f"bert-mlm-{device}-{report['date']}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    text = to_markdown(report)
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

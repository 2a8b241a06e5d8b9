"""Masked-language-model pre-training of the bundled BERT (``python -m fastattn.train_mlm``, ``fastattn-mlm``).

    fastattn-mlm --model tiny --steps 300                       # default corpus: Python's own docs
    fastattn-mlm --model mini --data my_texts/ --attn sdpa      # same run with torch's attention
    torchrun --nproc_per_node 2 -m fastattn.train_mlm ...       # DDP (NCCL on GPU, Gloo on CPU)

Writes to ``--out-dir``: metrics.jsonl (one row per log step and per evaluation),
loss.png, checkpoint.pt (``--resume`` continues from it), summary.json, and final/
(an HF-compatible BERT folder with its tokenizer). Every step is one optimizer update
over ``batch_size x grad_accum x world_size`` sequences; the loss is the summed
cross-entropy over all masked tokens of those sequences divided by their count
(not a mean of per-micro-batch means).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from .mlm import corpus as corpus_lib
from .mlm import data as data_lib
from .mlm import tokenizer as tokenizer_lib
from .mlm.masking import MaskingConfig
from .models.bert import ATTN_IMPLEMENTATIONS, PRESETS, BertForMaskedLM, preset_config


def default_cache_dir() -> str:
    return os.environ.get("FASTATTN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastattn", "mlm"))


@dataclass
class TrainConfig:
    """Everything a run depends on; the command line sets these fields one to one."""

    # data
    data: List[str] = field(default_factory=list)  # text files / folders; empty: Python's docs + docstrings
    cache_dir: str = field(default_factory=default_cache_dir)  # extracted corpus and trained tokenizers
    tokenizer: Optional[str] = None  # tokenizer.json / vocab.txt / folder; None: train a WordPiece
    vocab_size: int = 8192  # ~335k words of default corpus: 8k pieces keep most words whole
    max_seq_len: int = 128  # BERT's phase-1 length
    packing: str = "pack"  # "pack" (full windows, no padding) or "line" (one paragraph each, padded)
    eval_fraction: float = 0.05  # share of documents held out (~35 of the default corpus's 710)
    max_eval_sequences: int = 256
    # model
    model: str = "tiny"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    dropout: float = 0.1  # hidden and attention dropout, BERT's value
    attn: str = "fastattn"
    unpad: bool = True  # fastattn: run on packed real tokens (varlen) when a batch has padding
    # masking
    mask_prob: float = 0.15  # training rate; evaluation always masks 15% with a fixed seed
    whole_word: bool = False
    # optimisation
    batch_size: int = 32  # sequences per micro-batch per process
    grad_accum: int = 1
    steps: int = 300
    lr: float = 1e-3  # small BERTs tolerate a high rate (MosaicBERT uses 5e-4 for base)
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of the steps with a linear warmup (RoBERTa), then linear decay to 0
    beta2: float = 0.98  # RoBERTa's, steadier than 0.999 with large batches
    max_grad_norm: float = 1.0
    # running
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    compile: bool = False
    threads: Optional[int] = None  # CPU threads per process; None: cores / local processes
    out_dir: str = "runs/mlm"
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 0  # 0: checkpoint only at the end
    stop_at: Optional[int] = None  # end early at this step (with a checkpoint), schedule still for `steps`
    resume: bool = False
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        if self.model not in PRESETS:
            raise ValueError(f"--model must be one of {list(PRESETS)}, got {self.model!r}")
        if self.attn not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"--attn must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn!r}")
        if self.packing not in data_lib.PACKING_MODES:
            raise ValueError(f"--packing must be one of {data_lib.PACKING_MODES}, got {self.packing!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def model_config(self, vocab_size: int):
        overrides = dict(num_hidden_layers=self.num_layers, hidden_size=self.hidden_size,
                         num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return preset_config(self.model, vocab_size=vocab_size, max_position_embeddings=max(512, self.max_seq_len),
                             hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
                             attn_implementation=self.attn, unpad=self.unpad, **overrides)


# ---------------------------------------------------------------------------
# Distributed helpers (single process: world 1, rank 0, all no-ops)
# ---------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")  # where the tensors of collectives live (cuda for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_sum(self, values: List[float]) -> List[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.enabled:
            dist.barrier()


def _init_distributed(device_arg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
             local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if d.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    d.device = device if device.type == "cuda" else torch.device("cpu")
    return d, device


# ---------------------------------------------------------------------------
# Pieces of a run
# ---------------------------------------------------------------------------
@dataclass
class Data:
    tok: object
    info: tokenizer_lib.TokenizerInfo
    train: list
    eval_batches: list
    unigram_loss: float
    corpus_name: str
    corpus_words: int


def prepare_data(cfg: TrainConfig, d: Dist) -> Data:
    """Corpus, tokenizer, sequences and the fixed eval batches (rank 0 fills the caches first)."""
    for turn in ("first", "others"):
        if (turn == "first") == (d.rank == 0):
            corpus = corpus_lib.load_corpus(cfg.data, cfg.cache_dir, cfg.eval_fraction)
            tok = tokenizer_lib.get_tokenizer(corpus.train, cfg.cache_dir, corpus.fingerprint, cfg.vocab_size,
                                              cfg.tokenizer)
        d.barrier()
    info = tokenizer_lib.TokenizerInfo.from_tokenizer(tok)
    train = data_lib.build_sequences(tok, corpus.train, info, cfg.max_seq_len, cfg.packing)
    held_out = data_lib.build_sequences(tok, corpus.eval, info, cfg.max_seq_len, cfg.packing)
    held_out = held_out[:cfg.max_eval_sequences]
    batches = data_lib.eval_batches(held_out, info, cfg.batch_size)
    return Data(tok, info, train, batches, data_lib.unigram_cross_entropy(train, batches, info), corpus.name,
                corpus.words())


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW (no decay on biases and LayerNorm) with linear warmup then linear decay to 0."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, cfg.beta2),
                            eps=1e-6)
    warmup = max(1, int(round(cfg.warmup * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _mask_seed(seed: int, sample: int) -> int:
    """Seed of the masking of the sample-th sequence of the run (its place, not its batch)."""
    return seed * 1_000_003 + sample + 1


def local_micro_batches(data: Data, order: data_lib.SampleOrder, cfg: TrainConfig, masking: MaskingConfig,
                        step: int, d: Dist) -> List[data_lib.Batch]:
    """This process's micro-batches of one step.

    The samples of a step are the next ``batch_size x world x grad_accum`` of the run's order;
    micro-batch m of rank r takes slice r of the m-th group of ``batch_size x world``, so N
    processes (or k micro-batches) see and mask exactly what one process with an N (k) times
    larger batch does.
    """
    out = []
    for m in range(cfg.grad_accum):
        first = ((step * cfg.grad_accum + m) * d.world + d.rank) * cfg.batch_size
        samples = range(first, first + cfg.batch_size)
        out.append(data_lib.collate([data.train[order[i]] for i in samples], data.info, masking,
                                    [_mask_seed(cfg.seed, i) for i in samples]))
    return out


def train_step(model, optimizer, scheduler, micro_batches: List[data_lib.Batch], device, d: Dist,
               max_grad_norm: float, autocast) -> dict:
    """One optimizer update over the micro-batches of every process.

    The loss of each micro-batch is its summed cross-entropy divided by the number of masked
    tokens of the whole update (all micro-batches, all processes), so the gradient is that of
    the mean over every masked token; DDP's average over processes is undone by x world.
    A step without any masked token gives zero loss gradients (no NaN).
    """
    local_masked = sum(b.num_masked for b in micro_batches)
    total_masked, = d.all_sum([local_masked])
    scale = d.world / max(total_masked, 1.0)
    loss_sum = 0.0
    for i, b in enumerate(micro_batches):
        b = b.to(device)
        sync = contextlib.nullcontext() if (i == len(micro_batches) - 1 or not d.enabled) else model.no_sync()
        with sync, autocast():
            out = model(b.input_ids, attention_mask=b.attention_mask, labels=b.labels, loss_reduction="sum")
        (out.loss * scale).backward()
        loss_sum += float(out.loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = d.all_sum([loss_sum, sum(b.num_tokens for b in micro_batches)])
    return {"loss": loss_sum / max(total_masked, 1.0), "masked": total_masked, "tokens": tokens,
            "grad_norm": None if grad_norm is None else float(grad_norm)}


@torch.no_grad()
def evaluate(model: BertForMaskedLM, batches: List[data_lib.Batch], device, d: Dist, autocast) -> dict:
    """Mean cross-entropy, perplexity and accuracy over every masked token of the eval batches."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for b in batches[d.rank::d.world]:
        b = b.to(device)
        with autocast():
            out = model(b.input_ids, attention_mask=b.attention_mask, labels=b.labels, loss_reduction="sum")
        picked = b.labels != -100
        loss_sum += float(out.loss)
        correct += float((out.logits[picked].argmax(-1) == b.labels[picked]).sum())
        count += float(picked.sum())
    model.train(was_training)
    loss_sum, correct, count = d.all_sum([loss_sum, correct, count])
    loss = loss_sum / max(count, 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1.0)}


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(path: str, model, optimizer, scheduler, step: int, cfg: TrainConfig, d: Dist) -> None:
    """model, optimizer, scheduler, every process's RNG state and the step (written by rank 0)."""
    rng = _gather(_rng_state(), d)
    if d.rank == 0:
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng, "config": dataclasses.asdict(cfg)}
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
    d.barrier()


def load_checkpoint(path: str, model, optimizer, scheduler, d: Dist) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) != d.world:
        warnings.warn(f"checkpoint was written by {len(state['rng'])} processes, resuming with {d.world}: "
                      f"dropout draws will differ from the uninterrupted run")
    _set_rng_state(state["rng"][d.rank % len(state["rng"])])
    return int(state["step"])


def start_run(cfg, model, optimizer, scheduler, d: Dist):
    """The files of a run in cfg.out_dir and the step it starts at: 0, or with cfg.resume the checkpoint's
    step (whose metrics are kept, later ones dropped). Returns (start, checkpoint path, metrics path,
    write), ``write(row)`` appending a metrics row on rank 0."""
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    start = 0
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        start = load_checkpoint(ckpt_path, model, optimizer, scheduler, d)
    if d.rank == 0:
        rows = [json.loads(line) for line in open(metrics_path)] if cfg.resume and os.path.isfile(metrics_path) else []
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start)

    def write(row):
        if d.rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return start, ckpt_path, metrics_path, write


def plot_losses(metrics_path: str, png_path: str, unigram_loss: float) -> None:
    """Training and eval loss against the step, with the unigram baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss (masked tokens)", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (15% masked, fixed seed)")
    ax.axhline(unigram_loss, ls="--", c="gray", label=f"unigram baseline ({unigram_loss:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


class _Progress:
    """tqdm bar on rank 0 (loss, tokens/s, ETA); plain log lines when tqdm is missing or off."""

    def __init__(self, enabled: bool, bar: bool, total: int, initial: int):
        self.bar = None
        if enabled and bar and sys.stderr.isatty():  # no carriage-return lines in a log file
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="mlm", unit="step", dynamic_ncols=True)
            except ImportError:
                print("tqdm is not installed: progress as log lines (pip install tqdm)", file=sys.stderr)
        self.enabled = enabled

    def update(self, n: int, text: dict):
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(text, refresh=False)

    def log(self, text: str):
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a pre-training; returns the summary (also written to out_dir/summary.json)."""
    d, device = _init_distributed(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext  # bf16 on GPU; fp32 on CPU, where bf16 matmuls are slow
    os.makedirs(cfg.out_dir, exist_ok=True)
    main = d.rank == 0

    data = prepare_data(cfg, d)
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    model = BertForMaskedLM(cfg.model_config(data.info.vocab_size)).to(device)
    optimizer, scheduler = make_optimizer(model, cfg, cfg.steps)
    random.seed(cfg.seed + d.rank)
    torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout draws differ across processes

    start, ckpt_path, metrics_path, write = start_run(cfg, model, optimizer, scheduler, d)

    net = model
    if d.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    if cfg.compile:
        net = torch.compile(net)
    net.train()

    order = data_lib.SampleOrder(len(data.train), cfg.seed)
    masking = MaskingConfig(mask_prob=cfg.mask_prob, whole_word=cfg.whole_word)
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    progress = _Progress(main, cfg.progress, cfg.steps, start)
    n_params = sum(p.numel() for p in model.parameters())
    progress.log(f"corpus {data.corpus_name}: {data.corpus_words} words, {len(data.train)} train sequences, "
                 f"{sum(b.input_ids.shape[0] for b in data.eval_batches)} eval; vocab {data.info.vocab_size}; "
                 f"model {cfg.model} ({n_params / 1e6:.2f}M parameters), attn {cfg.attn}, {d.world} process(es) "
                 f"on {device}; unigram baseline {data.unigram_loss:.3f}")

    window = {"loss": 0.0, "masked": 0.0, "tokens": 0.0, "time": 0.0, "steps": 0}
    last_eval = None
    if start == 0:  # the starting point of the eval curve (the untrained model: about ln(vocab))
        write({"step": 0, **evaluate(model, data.eval_batches, device, d, autocast)})
    train_time = 0.0
    for step in range(start, end):
        batches = local_micro_batches(data, order, cfg, masking, step, d)
        t0 = time.perf_counter()
        stats = train_step(net, optimizer, scheduler, batches, device, d, cfg.max_grad_norm, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_time += dt
        for k in ("masked", "tokens"):
            window[k] += stats[k]
        window["loss"] += stats["loss"] * stats["masked"]
        window["time"] += dt
        window["steps"] += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            row = {"step": done, "loss": window["loss"] / max(window["masked"], 1.0),
                   "lr": scheduler.get_last_lr()[0], "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
                   "epoch": order.epoch_of(done * cfg.grad_accum * cfg.batch_size * d.world),
                   "grad_norm": stats["grad_norm"]}
            write(row)
            progress.update(window["steps"], {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"})
            window = {"loss": 0.0, "masked": 0.0, "tokens": 0.0, "time": 0.0, "steps": 0}
        if done % cfg.eval_every == 0 or done == end:
            last_eval = {"step": done, **evaluate(model, data.eval_batches, device, d, autocast)}
            write(last_eval)
            progress.log(f"step {done}: eval loss {last_eval['eval_loss']:.3f} (unigram {data.unigram_loss:.3f}), "
                         f"perplexity {last_eval['perplexity']:.1f}, accuracy {last_eval['accuracy']:.3f}")
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            save_checkpoint(ckpt_path, model, optimizer, scheduler, done, cfg, d)
    progress.close()

    summary = {"steps": end, "attn": cfg.attn, "model": cfg.model, "parameters": n_params, "world_size": d.world,
               "device": str(device), "unigram_loss": data.unigram_loss, "train_time_s": train_time,
               "final_eval": last_eval, "corpus": data.corpus_name, "corpus_words": data.corpus_words,
               "vocab_size": data.info.vocab_size, "ranks_in_sync": ranks_in_sync(model, d)}
    if main:
        model.save_pretrained(os.path.join(cfg.out_dir, "final"))
        tokenizer_lib.save_tokenizer(data.tok, os.path.join(cfg.out_dir, "final"))
        if cfg.plot:
            try:
                plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"), data.unigram_loss)
            except ImportError:
                warnings.warn("matplotlib is not installed: no loss.png (pip install matplotlib)")
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    del net  # DDP's reducer holds the process group (see finish_distributed)
    finish_distributed(d)
    return summary


def finish_distributed(d: Dist) -> None:
    """Wait for every process, then free the process group while the interpreter is whole.

    Call it after dropping the DistributedDataParallel wrapper. Its reducer holds the process group,
    inside reference cycles; left to the interpreter's shutdown, the group's Gloo threads are torn
    down during finalization, which can abort a process whose run had finished ("terminate called
    without an active exception", seen once in CI on rank 1 after its last step)."""
    gc.collect()
    d.barrier()
    if d.enabled:
        dist.destroy_process_group()


@torch.no_grad()
def ranks_in_sync(model: torch.nn.Module, d: Dist) -> bool:
    """True when every process holds bit-identical parameters (per-tensor float64 sums and norms)."""
    sig = [v for p in model.parameters() for v in (p.double().sum().item(), p.double().norm().item())]
    return all(s == sig for s in _gather(sig, d))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def parse_args(argv=None) -> TrainConfig:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="fastattn-mlm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    help_text = {  # every flag has one; argparse appends the default
        "data": "text files or folders (default: Python's bundled docs and stdlib docstrings)",
        "cache_dir": "where the extracted corpus and trained tokenizers are cached",
        "tokenizer": "tokenizer.json, vocab.txt or a folder with one (none: train a WordPiece on the data)",
        "vocab_size": "WordPiece vocabulary size when a tokenizer is trained",
        "max_seq_len": "tokens per sequence",
        "packing": "pack: full windows, no padding; line: one paragraph per sequence, padded",
        "eval_fraction": "share of the documents held out for evaluation",
        "max_eval_sequences": "evaluation sequences at most",
        "model": "BERT size preset (tiny = 2 layers, hidden 128; mini = 4 layers, hidden 256)",
        "num_layers": "override the preset's number of layers",
        "hidden_size": "override the preset's hidden size",
        "num_heads": "override the preset's attention heads",
        "intermediate_size": "override the preset's feed-forward size",
        "dropout": "hidden and attention dropout",
        "attn": "attention of the same model: fastattn, or torch's sdpa / eager for comparison",
        "unpad": "fastattn: drop padding tokens and run varlen attention (--no-unpad: padded + mask)",
        "mask_prob": "training masking rate (eval always masks 15%% with a fixed seed)",
        "whole_word": "mask whole words (all pieces of a word together)",
        "batch_size": "sequences per micro-batch per process",
        "grad_accum": "micro-batches per optimizer step",
        "steps": "optimizer steps (the learning-rate schedule spans them)",
        "lr": "peak learning rate (AdamW)",
        "weight_decay": "AdamW weight decay",
        "warmup": "fraction of the steps of linear warmup",
        "beta2": "AdamW beta2",
        "max_grad_norm": "gradient clipping norm",
        "seed": "random seed (data order, masking, initialisation)",
        "device": "auto: cuda if available, else cpu",
        "compile": "torch.compile the model",
        "threads": "CPU threads per process (default: cores / local processes)",
        "out_dir": "metrics.jsonl, loss.png, checkpoints and the final model go here",
        "log_every": "steps between log lines",
        "eval_every": "steps between evaluations",
        "save_every": "steps between checkpoints (0: only at the end)",
        "stop_at": "end at this step with a checkpoint (the schedule still spans --steps); --resume continues",
        "resume": "continue from the checkpoint in --out-dir",
        "progress": "progress bar (on a terminal; log lines otherwise)",
        "plot": "write loss.png",
    }
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in help_text]
    assert not missing, f"flags without help: {missing}"
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        h = help_text[f.name]
        if f.name == "data":
            p.add_argument(flag, nargs="*", default=[], help=h)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=h)
        elif f.name == "model":
            p.add_argument(flag, choices=list(PRESETS), default=default, help=h)
        elif f.name == "attn":
            p.add_argument(flag, choices=list(ATTN_IMPLEMENTATIONS), default=default, help=h)
        else:
            kind = {"Optional[int]": int, "Optional[str]": str}.get(str(f.type), type(default) if default is not None
                                                                       else str)
            p.add_argument(flag, type=kind, default=default, help=h)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    summary = train(parse_args(argv))
    if summary.get("final_eval") and int(os.environ.get("RANK", "0")) == 0:
        e = summary["final_eval"]
        print(f"done: {summary['steps']} steps, eval loss {e['eval_loss']:.3f} vs unigram "
              f"{summary['unigram_loss']:.3f}, accuracy {e['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

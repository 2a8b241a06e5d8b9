"""Fine-tuning of the bundled BERT's task heads: question answering, classification, tagging.

The loop of ``fastattn.train_mlm`` (AdamW with warmup and linear decay, clipping, DDP through
torchrun, checkpoints with every RNG state, metrics JSONL, a plot) on a task head loaded from a
local transformers-format checkpoint (ours from ``fastattn-mlm``, or any ``bert`` model).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import train_mlm as mlm_loop
from ..mlm import tokenizer as tokenizer_lib
from ..models.bert import (ATTN_IMPLEMENTATIONS, BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                           BertForTokenClassification)
from . import data as data_lib
from . import qa as qa_lib

TASKS = {"qa": BertForQuestionAnswering, "classification": BertForSequenceClassification,
         "tagging": BertForTokenClassification}


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; the command line sets these fields one to one."""

    task: str = "qa"  # "qa" (SQuAD v1.1/v2.0 JSON), "classification" (CSV/JSONL), "tagging" (CoNLL)
    model: str = ""  # a local transformers-format BERT folder (config.json + weights; tokenizer too, usually)
    train_file: str = ""
    eval_file: str = ""
    tokenizer: Optional[str] = None  # tokenizer.json / vocab.txt / folder; default: the model folder
    random_init: bool = False  # the checkpoint's config, fresh weights: the baseline of a pre-trained run
    # data
    max_seq_len: int = 0  # 0: 384 for qa (SQuAD's), 128 otherwise
    doc_stride: int = 128  # qa: context tokens between the starts of two windows of a long context
    max_answer_len: int = 30  # qa: longest answer span in tokens
    n_best: int = 20  # qa: start / end candidates per window in the span search
    null_threshold: Optional[float] = None  # qa v2.0: answer "" when null score - best span > this (default 0.0
    #                                         when the data has unanswerable questions, else never)
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    # model
    attn: str = "fastattn"
    unpad: bool = True
    dropout: Optional[float] = None  # overrides the checkpoint's hidden and attention dropout
    # optimisation
    batch_size: int = 16  # examples (qa: windows) per micro-batch per process
    epochs: float = 2.0
    steps: Optional[int] = None  # overrides epochs
    lr: float = 5e-5  # BERT's fine-tuning rates are 2e-5..5e-5; small models take more
    weight_decay: float = 0.01
    warmup: float = 0.1
    beta2: float = 0.999
    max_grad_norm: float = 1.0
    # running
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    out_dir: str = "runs/finetune"
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 0
    stop_at: Optional[int] = None  # end early at this step (with a checkpoint), schedule still for all steps
    resume: bool = False
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {list(TASKS)}, got {self.task!r}")
        if self.attn not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"--attn must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn!r}")
        if not self.max_seq_len:
            self.max_seq_len = 384 if self.task == "qa" else 128
        for name in ("batch_size", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class TaskData:
    train: list
    eval: list
    eval_examples: list  # qa: the QAExamples the eval features come from
    num_labels: int
    names: Optional[List[str]]  # class names (classification / tagging)
    regression: bool
    pad_id: int
    tok: object


def load_task_data(cfg: FinetuneConfig) -> TaskData:
    tok = tokenizer_lib.load_tokenizer(cfg.tokenizer or cfg.model)
    pad_id = tok.token_to_id("[PAD]") or 0
    if cfg.task == "qa":
        train_ex, eval_ex = qa_lib.read_squad(cfg.train_file), qa_lib.read_squad(cfg.eval_file)
        make = lambda ex: qa_lib.make_features(ex, tok, cfg.max_seq_len, cfg.doc_stride)
        return TaskData(make(train_ex), make(eval_ex), eval_ex, 2, None, False, pad_id, tok)
    if cfg.task == "tagging":
        train_s, eval_s = data_lib.read_conll(cfg.train_file), data_lib.read_conll(cfg.eval_file)
        names = sorted({lab for _, labels in train_s + eval_s for lab in labels})
        enc = lambda s: data_lib.encode_tagging(s, tok, names, cfg.max_seq_len)
        return TaskData(enc(train_s), enc(eval_s), [], len(names), names, False, pad_id, tok)
    train_r, eval_r = data_lib.read_table(cfg.train_file), data_lib.read_table(cfg.eval_file)
    names = data_lib.label_table([r[cfg.label_column] for r in train_r + eval_r])
    regression = names is None and any("." in str(r[cfg.label_column]) for r in train_r)
    num_labels = 1 if regression else (len(names) if names else 1 + max(int(r[cfg.label_column]) for r in train_r + eval_r))
    enc = lambda rows: data_lib.encode_classification(rows, tok, cfg.text_column, cfg.label_column,
                                                      cfg.text_pair_column, cfg.max_seq_len, names, regression)
    return TaskData(enc(train_r), enc(eval_r), [], num_labels, names, regression, pad_id, tok)


def build_model(cfg: FinetuneConfig, data: TaskData):
    cls = TASKS[cfg.task]
    overrides = dict(attn_implementation=cfg.attn, unpad=cfg.unpad)
    if cfg.task != "qa":
        overrides["num_labels"] = data.num_labels
        if data.names:
            overrides["id2label"] = dict(enumerate(data.names))
        if data.regression:
            overrides["problem_type"] = "regression"
    if cfg.dropout is not None:
        overrides.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    if cfg.random_init:
        with open(os.path.join(cfg.model, "config.json")) as f:
            return cls(BertConfig.from_dict(json.load(f), **overrides))
    with warnings.catch_warnings():  # the task head is new when fine-tuning a pre-trained encoder: expected
        warnings.filterwarnings("ignore", message=".*fresh initialisation")
        return cls.from_pretrained(cfg.model, **overrides)


def _collate(cfg: FinetuneConfig, items, pad_id: int) -> dict:
    if cfg.task == "qa":
        return qa_lib.collate(items, pad_id)
    return data_lib.collate(items, pad_id, tagging=cfg.task == "tagging")


def _forward(model, batch: dict, device, with_labels: bool = True):
    inputs = {k: v.to(device) for k, v in batch.items()}
    if not with_labels:
        for k in ("labels", "start_positions", "end_positions"):
            inputs.pop(k, None)
    return model(**inputs)


@torch.no_grad()
def evaluate(model, cfg: FinetuneConfig, data: TaskData, device, autocast) -> dict:
    """The task's metrics on the eval set (rank 0's view: every process evaluates all of it)."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(data.eval), cfg.batch_size):
        with autocast():
            o = _forward(model, _collate(cfg, data.eval[i:i + cfg.batch_size], data.pad_id), device, False)
        outs.append(o)
    model.train(was_training)
    if cfg.task == "qa":
        n = max(len(f.input_ids) for f in data.eval)
        cat = lambda name: torch.cat([torch.nn.functional.pad(getattr(o, name).float().cpu(),
                                                              (0, n - getattr(o, name).shape[1]), value=-math.inf)
                                      for o in outs])
        has_null = any(not e.answers for e in data.eval_examples)
        threshold = cfg.null_threshold if cfg.null_threshold is not None else (0.0 if has_null else None)
        preds = qa_lib.predict_answers(data.eval_examples, data.eval, cat("start_logits"), cat("end_logits"),
                                       cfg.n_best, cfg.max_answer_len, threshold)
        return qa_lib.squad_metrics(data.eval_examples, preds)
    if cfg.task == "tagging":
        n = max(len(x.input_ids) for x in data.eval)
        pred = torch.cat([torch.nn.functional.pad(o.logits.argmax(-1).cpu(), (0, n - o.logits.shape[1]))
                          for o in outs])
        gold = data_lib.collate(data.eval, data.pad_id, tagging=True)["labels"]
        gold = torch.nn.functional.pad(gold, (0, n - gold.shape[1]), value=-100)
        return data_lib.classification_metrics(pred, gold, data.num_labels)
    logits = torch.cat([o.logits.float().cpu() for o in outs])
    gold = torch.tensor([x.label for x in data.eval])
    if data.regression:
        return {"mse": float(((logits.squeeze(-1) - gold) ** 2).mean()), "count": len(data.eval)}
    return data_lib.classification_metrics(logits.argmax(-1), gold, data.num_labels)


def plot_curves(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in train], [r["loss"] for r in train])
    a.set(xlabel="step", ylabel="training loss")
    for key in ("f1", "exact", "accuracy", "macro_f1", "mse"):
        if evals and key in evals[0]["eval"]:
            b.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], marker="o", label=key)
    b.set(xlabel="step", ylabel="eval metric")
    b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def plot_runs(runs: List[tuple], png_path: str) -> None:
    """Runs side by side: training loss and the main eval metric (qa F1, accuracy, MSE) of each
    ``(label, metrics.jsonl)``, e.g. a pre-trained run beside its ``--random-init`` and ``--attn sdpa`` twins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for (label, path), style in zip(runs, ("-", "--", ":", "-.") * len(runs)):
        rows = [json.loads(line) for line in open(path)]
        train_rows, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval" in r]
        key = next(k for k in ("f1", "accuracy", "mse") if evals and k in evals[0]["eval"])
        a.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], style, label=label)
        b.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], style, marker="o", label=label)
        b.set(ylabel=f"eval {key}")
    a.set(xlabel="step", ylabel="training loss")
    b.set(xlabel="step")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def train(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a fine-tuning; returns the summary (also written to out_dir/summary.json)."""
    d, device = mlm_loop._init_distributed(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // d.local_world))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    os.makedirs(cfg.out_dir, exist_ok=True)
    main = d.rank == 0
    data = load_task_data(cfg)
    torch.manual_seed(cfg.seed)  # the same fresh head on every process
    model = build_model(cfg, data).to(device)
    per_step = cfg.batch_size * d.world
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(data.train) / per_step))
    optimizer, scheduler = mlm_loop.make_optimizer(model, cfg, steps)
    torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout draws differ across processes

    start, ckpt_path, metrics_path, write = mlm_loop.start_run(cfg, model, optimizer, scheduler, d)
    net = model
    if d.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    net.train()

    def order_of(epoch: int) -> List[int]:  # a fresh shuffle each epoch, the same on every process
        idx = list(range(len(data.train)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(idx)
        return idx

    progress = mlm_loop._Progress(main, cfg.progress, steps, start)
    progress.log(f"{cfg.task}: {len(data.train)} train / {len(data.eval)} eval items, {steps} steps of {per_step}; "
                 f"model {cfg.model} ({'random init' if cfg.random_init else 'pre-trained'}), attn {cfg.attn}, "
                 f"{d.world} process(es) on {device}")
    if start == 0:
        write({"step": 0, "eval": evaluate(model, cfg, data, device, autocast)})
    window = {"loss": 0.0, "items": 0, "time": 0.0, "steps": 0}
    last_eval, train_time = None, 0.0
    end = min(steps, cfg.stop_at) if cfg.stop_at is not None else steps
    for step in range(start, end):
        first = step * per_step
        epoch, offset = divmod(first, len(data.train))
        idx = order_of(epoch)[offset:offset + per_step]
        if len(idx) < per_step:  # an epoch's tail: fill up from the next epoch's order
            idx += order_of(epoch + 1)[:per_step - len(idx)]
        items = [data.train[i] for i in idx[d.rank::d.world]]
        t0 = time.perf_counter()
        with autocast():
            loss = _forward(net, _collate(cfg, items, data.pad_id), device).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        train_time += dt
        window["loss"] += loss.item() * len(items)
        window["items"] += len(items)
        window["time"] += dt
        window["steps"] += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            row = {"step": done, "loss": window["loss"] / max(window["items"], 1), "lr": scheduler.get_last_lr()[0],
                   "items_per_s": window["items"] * d.world / max(window["time"], 1e-9),
                   "epoch": done * per_step / len(data.train)}
            write(row)
            progress.update(window["steps"], {"loss": f"{row['loss']:.3f}"})
            window = {"loss": 0.0, "items": 0, "time": 0.0, "steps": 0}
        if done % cfg.eval_every == 0 or done == end:
            last_eval = {"step": done, "eval": evaluate(model, cfg, data, device, autocast)}
            write(last_eval)
            progress.log(f"step {done}: " + ", ".join(f"{k} {v:.2f}" for k, v in last_eval["eval"].items()))
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            mlm_loop.save_checkpoint(ckpt_path, model, optimizer, scheduler, done, cfg, d)
    progress.close()
    summary = {"task": cfg.task, "steps": steps, "attn": cfg.attn, "random_init": cfg.random_init,
               "train_items": len(data.train), "eval_items": len(data.eval), "train_time_s": train_time,
               "world_size": d.world, "device": str(device), "final_eval": last_eval}
    if main:
        model.save_pretrained(os.path.join(cfg.out_dir, "final"))
        tokenizer_lib.save_tokenizer(data.tok, os.path.join(cfg.out_dir, "final"))
        if cfg.plot:
            try:
                plot_curves(metrics_path, os.path.join(cfg.out_dir, "curves.png"))
            except ImportError:
                warnings.warn("matplotlib is not installed: no curves.png (pip install matplotlib)")
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    del net  # DDP's reducer holds the process group
    mlm_loop.finish_distributed(d)
    return summary

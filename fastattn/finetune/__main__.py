"""``python -m fastattn.finetune``: fine-tune, answer a question, or build the bundled QA / classification sets.

    python -m fastattn.finetune --task qa --model runs/mlm/final --train-file train.json --eval-file dev.json
    python -m fastattn.finetune answer --model runs/finetune/final --question "..." --context "..."
    python -m fastattn.finetune make-qa-data --out data/stdlib-qa
    python -m fastattn.finetune make-classification-data --out data/stdlib-topics
    python -m fastattn.finetune plot-runs --out runs.png pre-trained=runs/a random=runs/b
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .train import TASKS, FinetuneConfig, train

HELP = {  # every flag has one; argparse appends the default
    "task": "qa (SQuAD v1.1/v2.0 JSON), classification (CSV/JSONL), tagging (CoNLL)",
    "model": "local transformers-format BERT folder (ours from fastattn-mlm, or any bert checkpoint)",
    "train_file": "training data", "eval_file": "evaluation data",
    "tokenizer": "tokenizer.json / vocab.txt / folder (default: the model folder)",
    "random_init": "the checkpoint's config with fresh weights (the baseline of a pre-trained run)",
    "max_seq_len": "tokens per input (0: 384 for qa, 128 otherwise)",
    "doc_stride": "qa: context tokens between the starts of two windows of a long context",
    "max_answer_len": "qa: longest answer span, in tokens",
    "n_best": "qa: start and end candidates per window in the span search",
    "null_threshold": "qa v2.0: no answer when the null score beats the best span by more (default 0 when the "
                      "data has unanswerable questions)",
    "text_column": "classification: the text column", "text_pair_column": "classification: a second text column",
    "label_column": "classification: the label column (names, integers, or floats for regression)",
    "attn": "attention of the same model: fastattn, or torch's sdpa / eager for comparison",
    "unpad": "fastattn: run on the packed real tokens (varlen)",
    "dropout": "override the checkpoint's hidden and attention dropout",
    "batch_size": "examples (qa: windows) per step per process", "epochs": "passes over the training data",
    "steps": "optimizer steps (overrides --epochs)", "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay", "warmup": "fraction of the steps of linear warmup",
    "beta2": "AdamW beta2", "max_grad_norm": "gradient clipping norm", "seed": "random seed",
    "device": "auto: cuda if available, else cpu", "threads": "CPU threads per process",
    "out_dir": "metrics.jsonl, curves.png, checkpoint.pt, summary.json and final/ go here",
    "log_every": "steps between log lines", "eval_every": "steps between evaluations",
    "save_every": "steps between checkpoints (0: only at the end)",
    "stop_at": "end at this step with a checkpoint (the schedule still spans every step); --resume continues",
    "resume": "continue from --out-dir's checkpoint",
    "progress": "progress bar (on a terminal; log lines otherwise)", "plot": "write curves.png",
}


def parse_args(argv=None) -> FinetuneConfig:
    defaults = FinetuneConfig()
    p = argparse.ArgumentParser(prog="fastattn-finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(FinetuneConfig):
        flag, default, h = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), HELP[f.name]
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=h)
        elif f.name == "task":
            p.add_argument(flag, choices=list(TASKS), default=default, help=h)
        else:
            kind = {"Optional[int]": int, "Optional[str]": str, "Optional[float]": float}.get(
                str(f.type), type(default) if default is not None else str)
            p.add_argument(flag, type=kind, default=default, help=h, required=f.name in ("model", "train_file",
                                                                                        "eval_file"))
    return FinetuneConfig(**vars(p.parse_args(argv)))


def answer_main(argv) -> int:
    from ..mlm.tokenizer import load_tokenizer
    from ..models.bert import BertForQuestionAnswering
    from .qa import answer

    p = argparse.ArgumentParser(prog="fastattn-finetune answer", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="The answer to a question in a context (long contexts in windows)")
    p.add_argument("--model", required=True, help="a question-answering checkpoint folder (with its tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json / vocab.txt / folder (default: the model folder)")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--context", required=True, help="the text to find the answer in")
    p.add_argument("--max-seq-len", type=int, default=384, help="tokens per window")
    p.add_argument("--doc-stride", type=int, default=128, help="context tokens between two windows")
    p.add_argument("--max-answer-len", type=int, default=30, help="longest answer, in tokens")
    a = p.parse_args(argv)
    model = BertForQuestionAnswering.from_pretrained(a.model)
    result = answer(a.question, a.context, model, load_tokenizer(a.tokenizer or a.model), max_len=a.max_seq_len,
                    doc_stride=a.doc_stride, max_answer_len=a.max_answer_len)
    print(json.dumps(result))
    return 0


def make_qa_data_main(argv) -> int:
    from .synthetic import write_dataset

    p = argparse.ArgumentParser(prog="fastattn-finetune make-qa-data", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="SQuAD-format train.json / dev.json from the standard library's docstrings")
    p.add_argument("--out", required=True, help="folder for train.json and dev.json")
    p.add_argument("--unanswerable", type=float, default=0.0, help="share of contexts that get an unanswerable "
                   "question (SQuAD v2.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    for path in write_dataset(a.out, a.seed, a.unanswerable):
        print(path)
    return 0


def make_classification_data_main(argv) -> int:
    from .synthetic import write_topic_dataset

    p = argparse.ArgumentParser(prog="fastattn-finetune make-classification-data",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="train.csv / dev.csv (text, label): which stdlib package a docstring "
                                            "sentence comes from")
    p.add_argument("--out", required=True, help="folder for train.csv and dev.csv")
    p.add_argument("--seed", type=int, default=0, help="random seed (row order)")
    a = p.parse_args(argv)
    for path in write_topic_dataset(a.out, a.seed):
        print(path)
    return 0


def plot_runs_main(argv) -> int:
    import os

    from .train import plot_runs

    p = argparse.ArgumentParser(prog="fastattn-finetune plot-runs", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="training loss and eval metric of several runs in one figure")
    p.add_argument("--out", required=True, help="the .png to write")
    p.add_argument("runs", nargs="+", metavar="LABEL=DIR", help="a run's label and its --out-dir (its metrics.jsonl)")
    a = p.parse_args(argv)
    runs = []
    for item in a.runs:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"expected LABEL=DIR, got {item!r}")
        runs.append((label, os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path))
    plot_runs(runs, a.out)
    print(a.out)
    return 0


SUBCOMMANDS = {"answer": answer_main, "make-qa-data": make_qa_data_main,
               "make-classification-data": make_classification_data_main, "plot-runs": plot_runs_main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    summary = train(parse_args(argv))
    if summary.get("final_eval"):
        print("done:", json.dumps(summary["final_eval"]["eval"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

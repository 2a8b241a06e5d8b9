"""A SQuAD-format question-answering set and a sentence-classification set built from the Python standard
library, with no network.

Each context lists a few public stdlib functions and methods (of different modules) with the first sentence of their
docstrings ("json.dumps: Serialize obj to a JSON formatted str."), read with ``ast`` (nothing is
imported). Questions ask for either side of an entry:
  * "What does json.dumps do?"                        -> "Serialize obj to a JSON formatted str"
  * "Which function: serialize obj to a JSON formatted str?" -> "json.dumps"
and, with ``unanswerable`` > 0, about a function of another module (no answer: SQuAD v2.0).
Modules are split between train and dev, so dev questions are about functions never seen in training.

The classification set (``build_topic_rows``) asks which stdlib package a docstring sentence comes from
("Return the currently running event loop" -> asyncio), over the packages with enough public functions; the
split is by sentence, so a sentence shared by several methods sits on one side only.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import os
import random
import re
import sysconfig
from typing import List, Tuple

from .qa import QAExample, write_squad

_SENTENCE = re.compile(r"^([A-Z][^.]{10,120})\.(\s|$)")


def _held_out(key: str, fraction: float) -> bool:
    """The dev side of a split, by a stable hash of key (the same on every machine and run)."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 1000 < fraction * 1000


def stdlib_entries() -> List[Tuple[str, str, str]]:
    """(module, qualified name, first docstring sentence) of public stdlib functions and methods."""
    from fastattn.mlm.corpus import _stdlib_files

    root = sysconfig.get_paths()["stdlib"]
    out = []
    for path in _stdlib_files(root):
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        if any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        # module-level functions and the public methods of module-level classes
        functions = [(f"{module}.{n.name}", n) for n in tree.body if isinstance(n, ast.FunctionDef)]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")):
            functions += [(f"{module}.{cls.name}.{n.name}", n) for n in cls.body if isinstance(n, ast.FunctionDef)]
        for name, node in functions:
            if node.name.startswith("_"):
                continue
            m = _SENTENCE.match(" ".join((ast.get_docstring(node) or "").split()))
            if m and 4 <= len(m.group(1).split()) <= 20:
                out.append((module, name, m.group(1)))
    return out


def build_examples(seed: int = 0, per_context: int = 4, unanswerable: float = 0.0,
                   eval_fraction: float = 0.1) -> Tuple[List[QAExample], List[QAExample]]:
    """(train, dev) examples; the split is by module (a stable hash of its name)."""
    rng = random.Random(seed)
    splits = {False: [], True: []}  # held out -> entries
    for module, name, summary in stdlib_entries():
        held_out = _held_out(module, eval_fraction)
        splits[held_out].append((name, summary))
    train, dev = [], []
    for held_out, entries in splits.items():
        # entries of different modules side by side: one module's functions read too much alike
        rng.shuffle(entries)
        out = dev if held_out else train
        for c in range(0, len(entries) - 1, per_context):
            group = entries[c:c + per_context]
            parts, spans, pos = [], [], 0
            for name, summary in group:
                text = f"{name}: {summary}."
                spans.append((pos, name, pos + len(name) + 2, summary))
                parts.append(text)
                pos += len(text) + 1
            context = " ".join(parts)
            base = f"{'dev' if held_out else 'train'}-{c}"
            for k, (name_at, name, summary_at, summary) in enumerate(spans):
                out.append(QAExample(f"{base}-{k}-what", f"What does {name} do?", context,
                                     [{"text": summary, "answer_start": summary_at}]))
                out.append(QAExample(f"{base}-{k}-which", f"Which function: {summary[0].lower() + summary[1:]}?",
                                     context, [{"text": name, "answer_start": name_at}]))
            if unanswerable > 0 and rng.random() < unanswerable * len(group):
                other, _ = rng.choice(entries[:c] + entries[c + per_context:] or group)  # same split, not here
                if all(other != name for _, name, _, _ in spans):
                    out.append(QAExample(f"{base}-none", f"What does {other} do?", context, []))
    for ex in train + dev:  # the answers are where the context says
        for a in ex.answers:
            assert ex.context[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"], ex
    return train, dev


def write_dataset(out_dir: str, seed: int = 0, unanswerable: float = 0.0) -> Tuple[str, str]:
    """train.json and dev.json (SQuAD v2.0 format) under out_dir; returns their paths."""
    train, dev = build_examples(seed, unanswerable=unanswerable)
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "train.json"), os.path.join(out_dir, "dev.json")
    write_squad(train, paths[0])
    write_squad(dev, paths[1])
    return paths


def build_topic_rows(seed: int = 0, min_per_class: int = 40, eval_fraction: float = 0.2
                     ) -> Tuple[List[dict], List[dict]]:
    """(train, dev) rows ``{"text": sentence, "label": package}`` for the packages with >= min_per_class
    distinct sentences; a stable hash of the sentence decides its side."""
    by_package = {}
    for module, _, summary in stdlib_entries():
        if "." in module:  # a package's submodule: the package is the label
            by_package.setdefault(module.split(".")[0], set()).add(summary)
    train, dev = [], []
    for package, sentences in sorted(by_package.items()):
        if len(sentences) < min_per_class:
            continue
        for text in sorted(sentences):
            held_out = _held_out(text, eval_fraction)
            (dev if held_out else train).append({"text": text, "label": package})
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def write_topic_dataset(out_dir: str, seed: int = 0) -> Tuple[str, str]:
    """train.csv and dev.csv (columns text, label) under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "train.csv"), os.path.join(out_dir, "dev.csv")
    for rows, path in zip(build_topic_rows(seed), paths):
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return paths

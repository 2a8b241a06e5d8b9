"""A SQuAD-format question-answering set built from the Python standard library, with no network.

Each context lists a few public functions of one stdlib module with the first sentence of their
docstrings ("json.dumps: Serialize obj to a JSON formatted str."), read with ``ast`` (nothing is
imported). Questions ask for either side of an entry:
  * "What does json.dumps do?"                        -> "Serialize obj to a JSON formatted str"
  * "Which function: serialize obj to a JSON formatted str?" -> "json.dumps"
and, with ``unanswerable`` > 0, about a function of another module (no answer: SQuAD v2.0).
Modules are split between train and dev, so dev questions are about functions never seen in training.
"""
from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import sysconfig
from typing import List, Tuple

from .qa import QAExample, write_squad

_SENTENCE = re.compile(r"^([A-Z][^.]{10,120})\.(\s|$)")


def stdlib_entries() -> List[Tuple[str, str, str]]:
    """(module, qualified name, first docstring sentence) of public module-level stdlib functions."""
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
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node) or ""
                m = _SENTENCE.match(" ".join(doc.split()))
                if m and 4 <= len(m.group(1).split()) <= 20:
                    out.append((module, f"{module}.{node.name}", m.group(1)))
    return out


def build_examples(seed: int = 0, per_context: int = 4, unanswerable: float = 0.0,
                   eval_fraction: float = 0.1) -> Tuple[List[QAExample], List[QAExample]]:
    """(train, dev) examples; the split is by module (a stable hash of its name)."""
    rng = random.Random(seed)
    by_module = {}
    for module, name, summary in stdlib_entries():
        by_module.setdefault(module, []).append((name, summary))
    train, dev = [], []
    all_entries = [(m, e) for m, es in by_module.items() for e in es]
    for module in sorted(by_module):
        entries = by_module[module]
        held_out = int(hashlib.sha1(module.encode()).hexdigest(), 16) % 1000 < eval_fraction * 1000
        rng.shuffle(entries)
        for c in range(0, len(entries), per_context):
            group = entries[c:c + per_context]
            if len(group) < 2:
                continue
            parts, spans = [], []
            pos = 0
            for name, summary in group:
                text = f"{name}: {summary}."
                spans.append((pos, name, pos + len(name) + 2, summary))
                parts.append(text)
                pos += len(text) + 1
            context = " ".join(parts)
            out = dev if held_out else train
            for k, (name_at, name, summary_at, summary) in enumerate(spans):
                base = f"{module}-{c}-{k}"
                out.append(QAExample(f"{base}-what", f"What does {name} do?", context,
                                     [{"text": summary, "answer_start": summary_at}]))
                out.append(QAExample(f"{base}-which", f"Which function: {summary[0].lower() + summary[1:]}?",
                                     context, [{"text": name, "answer_start": name_at}]))
            if unanswerable > 0 and rng.random() < unanswerable * len(group):
                other_module, (other, _) = rng.choice(all_entries)
                if other_module != module:
                    out.append(QAExample(f"{module}-{c}-none", f"What does {other} do?", context, []))
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

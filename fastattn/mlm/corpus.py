"""Text for MLM pre-training: user text files, or a default corpus every Python install carries.

The default corpus needs no network and no extra package: the English reference
documentation shipped with the interpreter (``pydoc_data.topics``, ~65k words) plus
the docstrings of the standard library's modules, classes and functions (~270k words),
read with ``ast`` (nothing is imported or executed), cleaned, and cached as JSON lines.

A document is a string of paragraphs separated by newlines (one paragraph per line),
so "line by line" training takes one paragraph per sequence.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

# Standard-library folders whose docstrings are tests or vendored code, not documentation.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "__phello__"}
_MIN_WORDS = 4  # shorter paragraphs ("Return self.", "Deprecated.") teach little and skew the statistics


@dataclass
class Corpus:
    """train / eval documents and a fingerprint of where they came from (keys the caches)."""

    name: str
    train: List[str]
    eval: List[str]
    fingerprint: str

    def words(self) -> int:
        return sum(len(d.split()) for d in self.train) + sum(len(d.split()) for d in self.eval)


def clean_paragraphs(text: str) -> List[str]:
    """Paragraphs of a docstring or reST text: dedented, doctest lines dropped, each joined into one line."""
    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith((">>>", "... "))]
        para = " ".join(lines)
        para = re.sub(r"\s+", " ", para).strip()
        if len(para.split()) >= _MIN_WORDS:
            out.append(para)
    return out


def _python_docs_documents() -> List[str]:
    """One document per topic of the interpreter's own reference documentation."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds strip it
        warnings.warn("pydoc_data.topics is not available in this Python; the default corpus has only docstrings")
        return []
    docs = ["\n".join(clean_paragraphs(topics[name])) for name in sorted(topics)]
    return [d for d in docs if d]


def _stdlib_files(root: str) -> Iterable[str]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith(("test_", ".")))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                yield os.path.join(folder, name)


def _stdlib_docstring_documents() -> List[str]:
    """One document per module: its docstring and those of its classes and functions, in source order."""
    docs = []
    for path in _stdlib_files(sysconfig.get_paths()["stdlib"]):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # e.g. lib2to3 test data written for Python 2
        paras = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    paras.extend(clean_paragraphs(doc))
        if paras:
            docs.append("\n".join(paras))
    return docs


def python_docs_corpus(cache_dir: str) -> List[str]:
    """The default corpus's documents, extracted once per Python version and cached in ``cache_dir``."""
    version = "{}.{}.{}".format(*sys.version_info[:3])
    path = os.path.join(cache_dir, f"corpus-python-{version}.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    docs = _python_docs_documents() + _stdlib_docstring_documents()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)  # atomic: concurrent ranks may extract at the same time
    return docs


def text_file_documents(paths: Sequence[str]) -> List[str]:
    """Documents of text files or folders of them (read recursively); blank lines separate documents."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for folder, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(folder, n) for n in sorted(names) if not n.startswith("."))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"--data path {p!r} does not exist")
    docs = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            warnings.warn(f"skipping {path}: not UTF-8 text")
            continue
        for block in re.split(r"\n\s*\n", text):
            lines = [re.sub(r"\s+", " ", ln).strip() for ln in block.splitlines()]
            lines = [ln for ln in lines if ln]
            if lines:
                docs.append("\n".join(lines))
    if not docs:
        raise ValueError(f"no text found in --data {list(paths)}")
    return docs


def split_documents(docs: Sequence[str], eval_fraction: float) -> tuple:
    """(train, eval): a document goes to eval when a hash of its text falls below ``eval_fraction``.

    Stable across runs, machines and corpus growth (a document keeps its side).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    train, held_out = [], []
    for d in docs:
        h = int.from_bytes(hashlib.sha1(d.encode("utf-8")).digest()[:8], "big") / 2.0**64
        (held_out if h < eval_fraction else train).append(d)
    if not train or not held_out:  # tiny corpora: fall back to the last documents
        n_eval = max(1, int(round(len(docs) * eval_fraction)))
        if len(docs) < 2:
            raise ValueError("the corpus needs at least 2 documents to hold one out for evaluation")
        train, held_out = list(docs[:-n_eval]), list(docs[-n_eval:])
    return train, held_out


def load_corpus(data: Optional[Sequence[str]], cache_dir: str, eval_fraction: float = 0.05) -> Corpus:
    """The corpus of ``data`` (files/folders) or, when None/empty, the default Python-docs corpus."""
    if data:
        docs = text_file_documents(data)
        name = ",".join(os.path.basename(os.path.normpath(p)) for p in data)
    else:
        docs = python_docs_corpus(cache_dir)
        name = "python-docs"
    digest = hashlib.sha1()
    for d in docs:
        digest.update(d.encode("utf-8"))
        digest.update(b"\0")
    digest.update(repr(eval_fraction).encode())  # the split decides what a cached tokenizer was trained on
    train, held_out = split_documents(docs, eval_fraction)
    return Corpus(name=name, train=train, eval=held_out, fingerprint=digest.hexdigest()[:16])

"""Every Python code block of the README runs as printed, each in a fresh interpreter.

(The shell blocks are the quick start and install commands: CI runs `make test` itself, and the
benchmark command is run by hand before each stop.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        blocks.append((f"README.md:{line}", m.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("where, code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_readme_block_runs(where, code, tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{where} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"

"""pytest plugin: run transformers' own model tests with ``attn_implementation="fastattn"``.

Loaded with ``-p swap_in_fastattn_hf`` (tests/upstream/run.py --transformers-dir does that). At
start-up it registers fastattn's backend (``fastattn.integrations.huggingface.register()``) and
makes it the implementation a model gets wherever transformers would give it ``"sdpa"``: the
default (no ``attn_implementation`` asked for) and an explicit ``"sdpa"``; also the default of a
model that refuses sdpa but takes registered backends (``_supports_attention_backend``: GPT-OSS,
whose sinks sdpa cannot apply and fastattn can). So every test that runs
a model with torch's SDPA runs it on fastattn instead, as a user who writes
``attn_implementation="fastattn"`` would; tests that compare ``eager`` with ``sdpa`` compare
``eager`` with fastattn. ``eager``, ``flex_attention`` and the flash-attention names are left as
they are.

The hook is ``PreTrainedModel.get_correct_attn_implementation`` (transformers 5.x, where every
model picks its implementation through it); a transformers without it fails the run at start-up
rather than silently testing sdpa.

Calls to fastattn's attention function are counted and written, as JSON, to the file named by
``FASTATTN_UPSTREAM_CALLS`` (if set), so a run proves that our kernel ran.
``FASTATTN_UPSTREAM_SWAP=0`` loads the plugin without swapping (the baseline run on sdpa).
"""
from __future__ import annotations

import json
import os

import torch

CALLS = {"fastattn_attention_calls": 0}


def swap() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import PreTrainedModel

    from fastattn.integrations import huggingface

    name = huggingface.register()

    def counted_attention(*args, **kwargs):
        if not torch.compiler.is_compiling():  # a traced counter would guard the graph on its value (recompiles)
            CALLS["fastattn_attention_calls"] += 1
        return huggingface.attention_forward(*args, **kwargs)

    AttentionInterface.register(name, counted_attention)

    if not hasattr(PreTrainedModel, "get_correct_attn_implementation"):
        raise RuntimeError("swap_in_fastattn_hf needs transformers 5.x (PreTrainedModel.get_correct_attn_implementation)")
    choose = PreTrainedModel.get_correct_attn_implementation

    def get_correct_attn_implementation(self, requested_attention=None, is_init_check=False):
        chosen = choose(self, requested_attention, is_init_check)
        if chosen == "sdpa":
            return name  # sdpa's own checks passed: fastattn serves what sdpa would
        if requested_attention is None and chosen == "eager" and getattr(self, "_supports_attention_backend", False):
            return name  # sdpa refused (GPT-OSS: its sinks) but registered backends are allowed: a user's choice
        return chosen

    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation


def pytest_configure(config) -> None:
    if os.environ.get("FASTATTN_UPSTREAM_SWAP", "1") != "0":
        swap()


def pytest_report_header(config) -> str:
    swapped = os.environ.get("FASTATTN_UPSTREAM_SWAP", "1") != "0"
    return ("upstream harness: attn_implementation 'fastattn' wherever transformers would pick 'sdpa'" if swapped
            else "upstream harness: transformers baseline (sdpa, no swap)")


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("FASTATTN_UPSTREAM_CALLS")
    if path:
        with open(path, "w") as f:
            json.dump(CALLS, f)

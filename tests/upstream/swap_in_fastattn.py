"""pytest plugin: run PyTorch's own tests with fastattn's drop-ins in place of torch's.

Loaded with ``-p swap_in_fastattn`` (tests/upstream/run.py does that). Before any test module
is imported it replaces, as a user swapping them in would:

  * ``torch.nn.functional.scaled_dot_product_attention`` -> ``fastattn.scaled_dot_product_attention``
    (also what ``F.multi_head_attention_forward`` and ``TransformerEncoderLayer`` call, since they
    look the name up in torch.nn.functional at call time);
  * ``torch.nn.MultiheadAttention`` (and the names ``torch.nn.modules.activation`` and
    ``torch.nn.modules.transformer`` bind) -> ``fastattn.nn.MultiheadAttention``.

``FASTATTN_UPSTREAM_SWAP=0`` loads the plugin without swapping (the torch baseline run).
"""
from __future__ import annotations

import os

import torch

ORIGINAL_SDPA = torch.nn.functional.scaled_dot_product_attention
ORIGINAL_MHA = torch.nn.MultiheadAttention


def swap() -> None:
    import fastattn
    import fastattn.nn
    import torch.nn.modules.activation as activation
    import torch.nn.modules.transformer as transformer

    torch.nn.functional.scaled_dot_product_attention = fastattn.scaled_dot_product_attention
    for module in (torch.nn, activation, transformer):
        module.MultiheadAttention = fastattn.nn.MultiheadAttention


def pytest_configure(config) -> None:
    if os.environ.get("FASTATTN_UPSTREAM_SWAP", "1") != "0":
        swap()


def pytest_report_header(config) -> str:
    swapped = torch.nn.functional.scaled_dot_product_attention is not ORIGINAL_SDPA
    return f"upstream harness: {'fastattn drop-ins swapped in' if swapped else 'torch baseline (no swap)'}"

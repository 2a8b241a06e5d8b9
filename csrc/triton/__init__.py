"""Triton kernels of fastattn, installed as ``fastattn.triton_kernels``.

They live in csrc/ beside the C++ and CUDA kernels and are mapped into the
package by pyproject.toml (package-dir). Files, one kernel family each:
  tiles.py      the log2-domain logits tile (scale, causal, masks) shared by all kernels
  dropout.py    in-kernel Philox dropout with fastattn's counters (as csrc/philox.h)
  flash_fwd.py  forward kernel (out, lse)
  flash_bwd.py  backward: preprocess (delta), dK/dV kernel, dQ kernel
  autotune.py   block/warp/stage search space as data, interpreter config
  launch.py     launchers with the signatures of the torch.ops.fastattn ops
  compile_check.py  compiles the kernels for a GPU target without a GPU (python -m ...)

The backend is available when ``import triton`` works and either CUDA is
available (cuda tensors) or TRITON_INTERPRET=1 (Triton's interpreter, CPU
tensors; how the tests run without a GPU). Nothing here imports a kernel module
until the first call, because ``@triton.jit`` reads TRITON_INTERPRET when it decorates.
"""
import importlib.util
import os
from typing import Optional

import torch


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (blocked on purpose)
        return False


# Decided once, without importing triton: dispatch asks on every call, also inside torch.compile's
# tracing, where an import of a package that is not installed fails the whole graph.
TRITON_INSTALLED = _find_triton()


def interpreting() -> bool:
    """TRITON_INTERPRET=1 (read now): kernels run in Triton's CPU interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason() -> Optional[str]:
    """None if the Triton backend can run in this process, else why not."""
    if not TRITON_INSTALLED:
        return "triton is not installed (pip install triton)"
    if interpreting() or torch.cuda.is_available():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels in the CPU interpreter)"


def device_type() -> str:
    """The device whose tensors the kernels take here: "cpu" under the interpreter, else "cuda"."""
    return "cpu" if interpreting() else "cuda"

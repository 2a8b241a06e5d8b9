"""fastattn in the environments a new user has: without triton installed, and imported from the source
checkout in place. Each runs in a fresh interpreter (triton is blocked there with sys.modules["triton"] =
None, which makes ``import triton`` fail as if it were not installed)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TRITON = "import sys; sys.modules['triton'] = None\n"


def _run(code: str, cwd: str, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_info_without_triton(tmp_path):
    out = _run(NO_TRITON + "import runpy; runpy.run_module('fastattn.info', run_name='__main__')", str(tmp_path))
    assert "triton kernels             unavailable (triton is not installed" in out, out
    assert "backends: cpu, reference" in out, out


def test_compile_fullgraph_without_triton(tmp_path):
    """Nothing on the call path imports an optional package: dispatch knows once whether triton is there."""
    code = NO_TRITON + """
import torch, fastattn
q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
f = torch.compile(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                  fullgraph=True, backend="eager")
torch.testing.assert_close(f(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
print("compiled ok")
"""
    assert "compiled ok" in _run(code, str(tmp_path))


def test_compile_fullgraph_first_call_from_the_source_checkout():
    """fastattn imported from the checkout without an install (the editable finder removed): a first call
    compiled with fullgraph=True traces dispatch, where an import inside a function of a module not yet
    bound on its package (fastattn.triton_kernels, loaded by hand from csrc/triton there) failed the graph.
    Found by transformers' test_generate_compile_model_forward_fullgraph run with fastattn from PYTHONPATH."""
    code = """
import sys; sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import os, torch, fastattn
assert fastattn.__file__.startswith(os.getcwd()), fastattn.__file__
q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
mask = torch.rand(2, 1, 9, 9) > 0.3
mask[..., 0] = True
f = torch.compile(lambda q, k, v, m: fastattn.attention(q, k, v, attn_mask=m), fullgraph=True, backend="eager")
torch.testing.assert_close(f(q, k, v, mask), torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
print("compiled ok")
"""
    assert "compiled ok" in _run(code, REPO)


def test_info_from_the_source_checkout():
    """python -m fastattn.info run in the repository: ./fastattn comes first on sys.path. The Triton kernels
    (csrc/triton, mapped into the package only when installed) still load; the info does not crash."""
    out = _run("import runpy; runpy.run_module('fastattn.info', run_name='__main__')", REPO)
    assert "triton kernels" in out and "Traceback" not in out, out
    code = "import fastattn, fastattn.triton_kernels as t; print(t.__file__)"
    assert os.path.join("csrc", "triton") in _run(code, REPO)

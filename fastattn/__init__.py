"""fastattn: fused attention kernels for PyTorch (C++ CPU, Triton and CUDA), forward and backward.

    import fastattn
    out = fastattn.attention(q, k, v, causal=True)            # q (B, Hq, N, D), k/v (B, Hkv, N, D)
    out = fastattn.scaled_dot_product_attention(q, k, v)      # drop-in for torch's
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)  # packed sequences
    mha = fastattn.nn.MultiheadAttention(embed_dim, num_heads)  # drop-in for torch.nn's
    from fastattn.integrations import huggingface; huggingface.register()  # attn_implementation="fastattn"
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _load_source_triton_kernels() -> None:
    """fastattn.triton_kernels from csrc/triton when fastattn is imported from a source checkout in place
    (e.g. ``python -m fastattn.info`` run in the repository), where pyproject's package-dir mapping does
    not apply; an installed fastattn (editable or not) has it already."""
    if _importlib_util.find_spec(__name__ + ".triton_kernels") is not None:
        return
    source = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), _os.pardir, "csrc", "triton")
    init = _os.path.join(source, "__init__.py")
    if not _os.path.exists(init):
        return
    spec = _importlib_util.spec_from_file_location(__name__ + ".triton_kernels", init,
                                                   submodule_search_locations=[_os.path.abspath(source)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["triton_kernels"] = module  # as the import system binds a submodule on its package


_load_source_triton_kernels()

from .api import attention, scaled_dot_product_attention, varlen_attention  # noqa: E402
from .dispatch import available_backends  # noqa: E402
from . import nn  # noqa: E402  (torch only; fastattn.integrations (transformers) is imported on demand)

__version__ = "0.1.0"

__all__ = ["attention", "scaled_dot_product_attention", "varlen_attention", "available_backends", "nn", "__version__"]

"""fastattn: fused attention kernels for PyTorch (C++ CPU, Triton and CUDA), forward and backward.

    import fastattn
    out = fastattn.attention(q, k, v, causal=True)            # q (B, Hq, N, D), k/v (B, Hkv, N, D)
    out = fastattn.scaled_dot_product_attention(q, k, v)      # drop-in for torch's
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)  # packed sequences
    mha = fastattn.nn.MultiheadAttention(embed_dim, num_heads)  # drop-in for torch.nn's
    from fastattn.integrations import huggingface; huggingface.register()  # attn_implementation="fastattn"
"""
from .api import attention, scaled_dot_product_attention, varlen_attention
from .dispatch import available_backends
from . import nn  # torch only; fastattn.integrations (transformers) is imported on demand

__version__ = "0.1.0"

__all__ = ["attention", "scaled_dot_product_attention", "varlen_attention", "available_backends", "nn", "__version__"]

"""Drop-in ``torch.nn`` modules running on fastattn's fused kernels.

    import fastattn.nn
    mha = fastattn.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)  # same args as torch's
    n = fastattn.nn.replace_attention(model)  # swap every torch.nn.MultiheadAttention in place
"""
from .multihead_attention import MultiheadAttention, replace_attention

__all__ = ["MultiheadAttention", "replace_attention"]

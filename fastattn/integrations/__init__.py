"""Integrations with other libraries; each submodule imports its library only when imported itself.

    from fastattn.integrations import huggingface
    huggingface.register()  # transformers: attn_implementation="fastattn"
"""

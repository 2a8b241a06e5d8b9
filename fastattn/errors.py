"""Exception classes that code written for torch catches too.

fastattn's checks name the argument and the expected shape or dtype; torch raises
RuntimeError for the same mistakes in SDPA and AssertionError in MultiheadAttention.
Each class below derives from both the class our message means (ValueError / TypeError)
and the one torch uses, so ``except ValueError`` and ``except RuntimeError`` (or
``AssertionError`` for the module) all catch it.
"""


class InvalidArgumentError(ValueError, RuntimeError):
    """A bad shape or value (torch's SDPA raises RuntimeError for these)."""


class InvalidArgumentTypeError(TypeError, RuntimeError):
    """A bad type or dtype (torch's SDPA raises RuntimeError for these)."""


class MultiheadAttentionInputError(ValueError, AssertionError, RuntimeError):
    """A bad shape or value given to fastattn.nn.MultiheadAttention (torch's module asserts on
    dimensions and raises RuntimeError for shapes that its kernels then refuse)."""


class MultiheadAttentionTypeError(TypeError, AssertionError, RuntimeError):
    """A bad type or dtype given to fastattn.nn.MultiheadAttention (torch asserts)."""

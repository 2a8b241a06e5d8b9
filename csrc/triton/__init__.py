"""Triton kernels of fastattn, installed as ``fastattn.triton_kernels``.

They live in csrc/ beside the C++ and CUDA kernels and are mapped into the
package by pyproject.toml (package-dir). The forward/backward kernels are the
subject of the Triton issue; until they land this package holds no kernel and
``"triton"`` is not listed by ``fastattn.available_backends()``.
"""

"""What camelid's optional Triton kernels share: whether they can run here, and jitting them on first use.

Triton is optional: without it (or without a CUDA device) `available()` is False and every caller keeps its PyTorch
path. With TRITON_INTERPRET=1 the kernels run on CPU tensors through Triton's interpreter (what the tests do).
`triton.jit` picks the interpreter or the GPU compiler when it wraps a function, so kernels are wrapped on first use,
once per mode (`jit`), not at import: an importer need not set TRITON_INTERPRET before importing a kernel's module.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
except ImportError:  # the kernels' modules still import; available() says False
    triton = None


def interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Triton importable, and a CUDA device or Triton's CPU interpreter."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def jit(kernel):
    """`kernel` (a plain Python function written in triton.language) wrapped by triton.jit for the current mode."""
    return _jit(kernel, interpreting())


@functools.cache
def _jit(kernel, interpret: bool):
    del interpret  # the cache key only: triton.jit reads the variable itself
    return triton.jit(kernel)

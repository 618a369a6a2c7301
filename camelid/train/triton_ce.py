"""A Triton kernel for the fused loss's inner step: cross-entropy of a chunk of logits and its gradient, in place.

camelid/train/loss.py's LinearCrossEntropy turns each chunk of logits (n, V) into its loss and d loss / d logits =
softmax - one-hot right away. In PyTorch that is a chain of full passes over the chunk (an fp32 copy, max, subtract,
exp, sum, divide, mask, cast back): ~50 bytes of memory traffic per logit. This kernel does it in two passes over the
row, ~6 bytes per logit (bf16), keeping the softmax statistics in fp32:

    pass 1 (online softmax): m' = max(m, max(x_b)), s = s * exp(m - m') + sum(exp(x_b - m')), m = m'
    loss = m + log(s) - x[target]                       (0 for an ignored row)
    pass 2: x_b <- (exp(x_b - m) / s - [col == target]) (times 0 for an ignored row), stored in x's dtype

One program per row. The result is the PyTorch path's up to fp32 rounding (the two sum the exponentials in different
orders). Triton is optional: `usable` says whether this can run (CUDA, or Triton's CPU interpreter with
TRITON_INTERPRET=1, as the tests do); a kernel that fails to compile on the first call disables itself with a warning,
before it has written anything, and the caller keeps the PyTorch path.
"""

from __future__ import annotations

import logging

import torch

from camelid.triton_support import interpreting, jit

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the module imports, usable() says False
    triton = tl = None

log = logging.getLogger(__name__)
MAX_BLOCK = 8192  # vocabulary columns per loop iteration
_failed: list[str] = []  # the first launch's error, if it failed: the kernel is not tried again


def usable(tensor: torch.Tensor) -> bool:
    """Whether cross_entropy_grad_ can run on this tensor's device."""
    if triton is None or _failed:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        write_grad: bool = True) -> torch.Tensor | None:
    """Per-row cross-entropy (n,) in fp32 of logits (n, V) against labels (n,) (rows labelled ignore_index: 0), and,
    with `write_grad`, logits overwritten by d sum(loss) / d logits in their own dtype. None when the kernel cannot
    be compiled here (logits untouched; see the module docstring)."""
    if logits.dim() != 2 or logits.stride(1) != 1 or tuple(labels.shape) != logits.shape[:1]:
        raise ValueError(f"expected row-major logits (n, V) and labels (n,), got {tuple(logits.shape)} with strides "
                         f"{logits.stride()} and {tuple(labels.shape)}")
    n, vocab = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return losses
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    kernel = jit(_ce_grad_kernel)
    try:
        kernel[(n,)](logits, labels.contiguous(), losses, logits.stride(0), vocab, ignore_index,
                     BLOCK=block, WRITE_GRAD=write_grad, num_warps=8 if block >= 4096 else 4)
    except Exception as error:  # noqa: BLE001 - a kernel that does not compile costs speed, never the run
        _failed.append(f"{type(error).__name__}: {error}")
        log.warning("the Triton cross-entropy kernel failed (%s); the loss keeps its PyTorch path", _failed[0])
        return None
    return losses


def _ce_grad_kernel(logits_ptr, labels_ptr, loss_ptr, stride_row, vocab, ignore_index,
                    BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)
    cols = tl.arange(0, BLOCK)

    m = -float("inf")  # running maximum
    s = 0.0  # running sum of exp(x - m)
    for start in range(0, vocab, BLOCK):
        offsets = start + cols
        x = tl.load(base + offsets, mask=offsets < vocab, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    picked = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, m + tl.log(s) - picked, 0.0))

    if WRITE_GRAD:
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, vocab, BLOCK):
            offsets = start + cols
            inside = offsets < vocab
            x = tl.load(base + offsets, mask=inside, other=0.0).to(tl.float32)
            grad = tl.exp(x - m) / s
            grad = tl.where(offsets == target, grad - 1.0, grad) * keep
            tl.store(base + offsets, grad.to(logits_ptr.dtype.element_ty), mask=inside)

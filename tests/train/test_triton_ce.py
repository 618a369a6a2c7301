"""The Triton cross-entropy kernel of the fused loss (camelid/train/triton_ce.py), run on CPU through Triton's
interpreter, against torch's own cross-entropy and autograd (references we did not write), and the fused loss with
it against the fused loss without it."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from camelid.train import loss as loss_module  # noqa: E402
from camelid.train import triton_ce  # noqa: E402
from camelid.train.loss import IGNORE_INDEX, linear_cross_entropy  # noqa: E402
from triton_interpreter import interpreter  # noqa: E402,F401 (a fixture)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [5, 300, 1000])  # one block, and blocks with a ragged end (MAX_BLOCK made small)
def test_loss_and_gradient_equal_torch(interpreter, monkeypatch, dtype, vocab):
    monkeypatch.setattr(triton_ce, "MAX_BLOCK", 128)
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, vocab, (6,), generator=gen)
    labels[[1, 4]] = IGNORE_INDEX
    reference = logits.float().requires_grad_(True)
    per_row = F.cross_entropy(reference, labels, ignore_index=IGNORE_INDEX, reduction="none")
    per_row.sum().backward()

    work = logits.clone()
    losses = triton_ce.cross_entropy_grad_(work, labels, IGNORE_INDEX)
    torch.testing.assert_close(losses, per_row.detach(), rtol=1e-5, atol=1e-5)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=4e-3)
    torch.testing.assert_close(work.float(), reference.grad, **tolerance)
    assert work.dtype == dtype and not work[[1, 4]].any()  # ignored rows: zero gradient

    loss_only = logits.clone()
    torch.testing.assert_close(triton_ce.cross_entropy_grad_(loss_only, labels, IGNORE_INDEX, write_grad=False),
                               losses)
    assert torch.equal(loss_only, logits)  # without write_grad the logits stay as they were


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_with_the_kernel_equals_the_fused_loss_without(interpreter, monkeypatch, dtype):
    """linear_cross_entropy over several chunks: loss, hidden and weight gradients with the kernel == the PyTorch
    chunk path."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=gen).to(dtype)
    weight = (torch.randn(300, 16, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, 300, (20,), generator=gen)
    labels[3] = IGNORE_INDEX

    def run(use_kernel: bool):
        monkeypatch.setattr(triton_ce, "usable", lambda t: use_kernel)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = linear_cross_entropy(h, w, labels, chunk=7)
        out.backward()
        return out.detach(), h.grad, w.grad

    with_kernel, without = run(True), run(False)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(with_kernel, without):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)
    assert loss_module.triton_ce is triton_ce


def test_bad_shapes_are_one_clear_error(interpreter):
    with pytest.raises(ValueError, match="row-major logits"):
        triton_ce.cross_entropy_grad_(torch.randn(4, 10).T, torch.zeros(10, dtype=torch.long), IGNORE_INDEX)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA device")
def test_compiled_kernel_on_cuda_equals_torch():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 32000, generator=gen) * 4).to("cuda", torch.bfloat16)
    labels = torch.randint(0, 32000, (64,), generator=gen).cuda()
    labels[5] = IGNORE_INDEX
    reference = logits.float().requires_grad_(True)
    per_row = F.cross_entropy(reference, labels, ignore_index=IGNORE_INDEX, reduction="none")
    per_row.sum().backward()
    work = logits.clone()
    losses = triton_ce.cross_entropy_grad_(work, labels, IGNORE_INDEX)
    assert losses is not None, triton_ce._failed
    torch.testing.assert_close(losses, per_row.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(work.float(), reference.grad, rtol=1e-2, atol=4e-3)

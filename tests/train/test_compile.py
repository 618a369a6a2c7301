"""torch.compile for training: the activation memory budget drops cheap tensors, never recomputes a matmul, and
changes no number; a compiled training run follows the eager one."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from train_helpers import tiny_train_config

from camelid.config import get_preset
from camelid.model import Transformer
from camelid.train import TrainConfig, train
from camelid.train.compile import compile_for_training


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset("tiny").replace(num_hidden_layers=2))


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).float().logsumexp(-1).mean()


def _matmuls_and_grads(budget: float) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Matmul calls in the compiled forward and backward code, and the gradients of one step."""
    torch._dynamo.reset()
    model = _model()
    compiled = compile_for_training(model, budget)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    _, codes = run_and_get_code(lambda: _loss(compiled, ids).backward())
    counts = [len(re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\(", code)) for code in codes]
    return counts, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_budget_recomputes_no_matmul_and_changes_no_gradient():
    plain_counts, plain_grads = _matmuls_and_grads(1.0)
    counts, grads = _matmuls_and_grads(0.9)
    assert len(counts) == 2 and counts == plain_counts  # forward, backward: the same matmuls, none recomputed
    eager = _model()
    ids = torch.randint(0, eager.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    _loss(eager, ids).backward()
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [0, -0.5, 1.5])
def test_bad_budget_is_one_clear_error(budget):
    with pytest.raises(ValueError, match="activation_memory_budget must be in"):
        compile_for_training(_model(), budget)
    with pytest.raises(ValueError, match="activation_memory_budget must be in"):
        TrainConfig(activation_memory_budget=budget)


def test_compiled_training_run_follows_the_eager_one(prepared, tmp_path):
    """`compile: true` trains through compile_for_training; its losses track the eager run's (fp32, CPU)."""
    eager = train(tiny_train_config(prepared, tmp_path / "eager", max_steps=4))
    torch._dynamo.reset()
    compiled = train(tiny_train_config(prepared, tmp_path / "compiled", max_steps=4, compile=True))
    assert compiled.losses.keys() == eager.losses.keys()
    for step in eager.losses:
        assert compiled.losses[step] == pytest.approx(eager.losses[step], abs=1e-4)

"""torch.compile for training, with a memory budget for what the compiled forward keeps for backward.

A compiled training step is one joint forward + backward graph that AOTAutograd cuts in two: what the forward half
returns to the backward half is what stays in memory between them. By default (budget 1.0) the cut keeps the outputs
of the cheap elementwise ops the matmuls read: each RMSNorm's output (the q/k/v and gate/up input, h values per token
and layer, twice) and the gated product act(gate) * up (down_proj's input, i values). Below 1.0 the partitioner may
recompute ops in backward instead, cheapest runtime first: elementwise ops cost it no FLOPs, so they go before any
matmul. Measured on a LLaMA block (CPU, bf16; tests/train/test_compile.py): 0.9 recomputes exactly those three
tensors and no matmul (the backward graph has as many matmuls as at 1.0); on the TinyLlama shape a block then keeps
40,072 bytes a token, against 59,520 at 1.0 (48,256 eager, where recompute.py rebuilds down_proj's input;
camelid/plan/memory.py). Below ~0.7 matmuls start being recomputed.

The budget applies while our backend partitions the graph (when a shape is first compiled); torch's global
setting is never changed, so other compiled code in the process keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

DEFAULT_ACTIVATION_MEMORY_BUDGET = 0.9  # recompute norm outputs and the gated product, never a matmul (see above)


def check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise ValueError(f"activation_memory_budget must be in (0, 1] (1 = torch's default cut), got {budget}")


def budgeted_inductor(budget: float) -> Callable:
    """An inductor backend for torch.compile whose forward/backward cut runs under `budget`."""
    check_budget(budget)
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        with functorch_config.patch(activation_memory_budget=budget):  # the cut happens inside this call
            return compile_fx(graph, example_inputs)

    return backend


def compile_for_training(model: nn.Module, activation_memory_budget: float = DEFAULT_ACTIVATION_MEMORY_BUDGET
                         ) -> nn.Module:
    """torch.compile(model) with inductor; `activation_memory_budget` < 1 trades a little backward recompute for
    activation memory (1.0: torch's plain default)."""
    check_budget(activation_memory_budget)
    if activation_memory_budget == 1:
        return torch.compile(model)
    return torch.compile(model, backend=budgeted_inductor(activation_memory_budget))

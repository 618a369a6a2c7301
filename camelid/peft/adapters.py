"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small residual MLP on a sublayer's output.

    adapter(h) = h + up(act(down(h)))        down: H -> m, up: m -> H, both with bias; m = bottleneck_size

placed, in a pre-norm LLaMA block  x = x + attn(norm1(x));  x = x + ffn(norm2(x)),  on the sublayer outputs:
    houlsby   x = x + adapter_attn(attn(norm1(x)));  x = x + adapter_mlp(ffn(norm2(x)))
    pfeiffer  x = x + attn(norm1(x));                x = x + adapter_mlp(ffn(norm2(x)))
i.e. before each residual add, as in both papers. `up` starts at zero, so a fresh model is exactly its base and
the first steps move it away smoothly (Houlsby's near-identity initialisation); `down` gets a small normal init.

The adapters are new submodules of each block (`model.layers.N.attn_adapter`, `model.layers.N.mlp_adapter`), so
their keys are `model.layers.N.mlp_adapter.down.weight` etc., and a forward hook on the sublayer (`self_attn`,
`mlp` or Mixtral's `block_sparse_moe`) passes its output through them; Block.forward is untouched. Each hook's
handle is kept next to the sublayer's reference to its adapter (`sublayer.bottleneck_adapter.hook`). The adapters
compute in fp32 over a half-precision base (as LoRA's adapters do here).

PEFT has no bottleneck adapters, so the folder is ours: peft_type "CAMELID_BOTTLENECK", our keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from camelid.peft.shared import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, adapter_dtype, freeze, read_adapter_folder,
                                 write_adapter_folder)

PEFT_TYPE = "CAMELID_BOTTLENECK"
PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Bottleneck(nn.Module):
    def __init__(self, hidden_size: int, bottleneck_size: int, nonlinearity: str, init_std: float,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.nonlinearity = nonlinearity
        self.down = nn.Linear(hidden_size, bottleneck_size, device=device, dtype=dtype)  # (m, H)
        self.up = nn.Linear(bottleneck_size, hidden_size, device=device, dtype=dtype)  # (H, m)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = NONLINEARITIES[self.nonlinearity](self.down(h.to(self.down.weight.dtype)))  # (B, T, m)
        return h + self.up(z).to(h.dtype)  # the residual inside the adapter: zero `up` returns h itself

    def extra_repr(self) -> str:
        return f"bottleneck={self.down.out_features}, nonlinearity={self.nonlinearity}"


class _Ref:
    """Holds a module without registering it as a child: the adapter belongs to the block (its key is
    `model.layers.N.mlp_adapter...`), the sublayer only needs to reach it; `hook` is the handle of the sublayer's
    forward hook that runs it. Copied along by copy.deepcopy."""

    def __init__(self, module: nn.Module, hook: torch.utils.hooks.RemovableHandle):
        self.module, self.hook = module, hook


def _run_adapter(sublayer: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a block's sublayer: its output goes through the block's adapter."""
    return sublayer.bottleneck_adapter.module(output)


def _ffn_name(block: nn.Module) -> str:
    return "block_sparse_moe" if hasattr(block, "block_sparse_moe") else "mlp"


def bottleneck_adapters(model: nn.Module) -> dict[str, Bottleneck]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Bottleneck)}


def has_bottleneck(model: nn.Module) -> bool:
    return bool(bottleneck_adapters(model))


def _checked_blocks(model: nn.Module, bottleneck_size: int, placement: str, nonlinearity: str) -> nn.ModuleList:
    """The model's blocks, once the options are known to be valid for it (nothing is changed here)."""
    if isinstance(bottleneck_size, bool) or not isinstance(bottleneck_size, int) or bottleneck_size < 1:
        raise ValueError(f"bottleneck_size must be a positive integer, got {bottleneck_size!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"unknown adapter nonlinearity {nonlinearity!r}; choose one of {', '.join(NONLINEARITIES)}")
    if has_bottleneck(model):
        raise ValueError("this model already has bottleneck adapters")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        raise ValueError("bottleneck adapters need a camelid Transformer (model.model.layers)")
    return layers


def apply_bottleneck(model: nn.Module, bottleneck_size: int = 64, placement: str = "houlsby",
                     nonlinearity: str = "relu", init_std: float = 1e-2) -> nn.Module:
    """Freeze the model and add a bottleneck adapter after every block's attention and FFN (houlsby) or after the
    FFN only (pfeiffer)."""
    layers = _checked_blocks(model, bottleneck_size, placement, nonlinearity)
    freeze(model)
    hidden = model.config.hidden_size
    dtype = adapter_dtype(model.model.embed_tokens.weight)  # not o_proj's: quantized, its `weight` holds int codes
    for block in layers:
        device = block.self_attn.o_proj.weight.device
        for where in PLACEMENTS[placement]:
            sublayer = block.self_attn if where == "attn" else getattr(block, _ffn_name(block))
            adapter = Bottleneck(hidden, bottleneck_size, nonlinearity, init_std, device, dtype)
            block.add_module(f"{where}_adapter", adapter)
            sublayer.bottleneck_adapter = _Ref(adapter, sublayer.register_forward_hook(_run_adapter))
    model.bottleneck_config = {"bottleneck_size": bottleneck_size, "placement": placement,
                               "nonlinearity": nonlinearity}
    return model


def _expected_shapes(model: nn.Module, bottleneck_size: int, placement: str, nonlinearity: str) -> dict[str, tuple]:
    """Every tensor key and shape apply_bottleneck would give this model, without changing it."""
    layers = _checked_blocks(model, bottleneck_size, placement, nonlinearity)
    probe = Bottleneck(model.config.hidden_size, bottleneck_size, nonlinearity, 0.0, torch.device("meta"),
                       torch.float32)  # meta: shapes only, no memory
    return {f"model.layers.{i}.{where}_adapter.{key}": tuple(t.shape)
            for i in range(len(layers)) for where in PLACEMENTS[placement] for key, t in probe.state_dict().items()}


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under our names (`model.layers.0.mlp_adapter.down.weight`, ...)."""
    return {f"{name}.{key}": t for name, m in bottleneck_adapters(model).items() for key, t in m.state_dict().items()}


def save_bottleneck(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    if not has_bottleneck(model):
        raise ValueError("the model has no bottleneck adapters to save (apply_bottleneck or load_bottleneck first)")
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              **model.bottleneck_config}
    return write_adapter_folder(folder, config, bottleneck_state_dict(model))


def load_bottleneck(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a CAMELID_BOTTLENECK folder to `model`; every key and shape must match what its config builds, and
    is checked before the model is changed."""
    config, tensors = read_adapter_folder(folder, PEFT_TYPE)
    file = Path(folder) / WEIGHTS_FILE
    try:
        options = {k: config[k] for k in ("bottleneck_size", "placement", "nonlinearity")}
    except KeyError as e:
        raise AdapterError(f"{Path(folder) / CONFIG_FILE}: missing field {e.args[0]!r}") from None
    expected = _expected_shapes(model, **options)
    unknown, missing = sorted(tensors.keys() - expected.keys()), sorted(expected.keys() - tensors.keys())
    if unknown or missing:
        raise AdapterError(f"{file}: " + (f"unexpected tensor {unknown[0]!r}" if unknown else
                                          f"missing tensor {missing[0]!r}") + " for this model")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(f"{file}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the model expects "
                               f"{shape}")
    apply_bottleneck(model, **options)
    with torch.no_grad():
        for key, target in bottleneck_state_dict(model).items():
            target.copy_(tensors[key])
    return model

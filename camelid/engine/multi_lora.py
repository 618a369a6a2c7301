"""Multi-LoRA serving: many PEFT LoRA adapters on one base model, a different one per token row of the same batch.

    ml = MultiLoRA(model, max_adapters=8)
    ml.add("sql", "adapters/sql")           # a PEFT folder; loaded while the model serves other requests
    ml.set_token_slots(slots)               # (N,) one slot per row of the next forward's flattened (B*T) input
    logits = model(input_ids)               # every targeted Linear adds its row's adapter: y = W x + b + s B A x

Each targeted nn.Linear is swapped in place for a `MultiLoRALinear` that keeps the *same* weight and bias Parameters
under the same module name, so the state dict is still a plain HF checkpoint and the adapters live in non-persistent
buffers: per module, A stacked as (S, R, in) and B as (S, out, R) over S = max_adapters slots, each zero-padded to
the largest rank R loaded there. An adapter that does not target a module has no rank there and adds nothing.
Slot -1 is the base model. The slots of the next forward are state on this object (shared with its layers through
one `TokenSlots`), never a module-level global.

Batched matmul, segmented by slot (Punica's SGMV idea, in plain PyTorch): `set_token_slots` groups the rows by slot
once per forward (one host sync), then each layer runs, per adapter present, two skinny matmuls on its rows and
index_adds the result. We chose segments over a per-row gather of A[slot] / B[slot] because the gather materialises
an (N, R, in) copy of the adapter weights per layer (about 0.5 GB for a 2048-token prefill at r=16, in=4096), while a
batch rarely mixes more than a handful of adapters: the segment loop costs a few small kernels per adapter present
and exactly the FLOPs of running each adapter alone. Its shapes depend on the batch, so a CUDA-graph decode path
should run eagerly (or capture base-only graphs) whenever a batch has adapter rows.

A quantized base (a `camelid quantize` folder's camelid.quant.QuantLinear layers: int8 / int4 / nf4, the QLoRA
serving case) is wrapped too: the quantized layer's own forward computes the base output, its buffers and bias are
registered on the wrapper under the same names (the keys stay put, as LoRALinear does for QLoRA), the adapters are
kept in fp32 (as LoRALinear over a quantized base) and each delta is computed in the layer's compute dtype (else
the input's).

Only plain LoRA (and rsLoRA scaling) on Linear layers is batched: DoRA rescales the base output per adapter, so it
cannot share one base matmul, and an adapter that replaces base tensors (modules_to_save, trained biases) or puts a
LoRA on the embedding is refused too; merge such an adapter into its own checkpoint instead
(camelid.checkpoint.merge_adapter_folder).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from camelid.peft.adapter_io import LORA_PARTS, AdapterError, module_alpha, read_adapter
from camelid.quant import QuantLinear
from camelid.quant.linear import apply_keeping_dtypes

# Modules that never see one row per token: lm_head may get only the sampled rows (Transformer's logits_at), and a
# MoE expert only the tokens routed to it. An adapter on them could not be matched to its rows.
UNBATCHABLE = ("lm_head", ".experts.")


class TokenSlots:
    """The adapter slot of every row of the next forward, grouped by slot. Shared by one MultiLoRA and its layers."""

    def __init__(self):
        self.num_rows: int | None = None  # None: no slots set, every layer is its base Linear
        # (slot, row indices (n,) or None when that slot covers every row): one entry per adapter present
        self.segments: list[tuple[int, torch.Tensor | None]] = []


class MultiLoRALinear(nn.Module):
    """An nn.Linear (or a QuantLinear) whose rows each get their own LoRA update:
    y[i] = W x[i] + b + scale[s] * B[s] A[s] x[i], s = the slot of row i (no update for slot -1 or a slot with no
    adapter on this module)."""

    def __init__(self, base: nn.Linear | QuantLinear, max_adapters: int, token_slots: TokenSlots):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # a quantized base: held outside the module tree (its tensors are registered here instead, so the keys do
        # not gain a ".base"), and its format recorded as LoRALinear does, so quantized_layers() still finds it
        self.__dict__["quant_base"] = base if isinstance(base, QuantLinear) else None
        self.quant_format = (type(base), dict(base.options)) if isinstance(base, QuantLinear) else None
        if isinstance(base, QuantLinear):
            for name, buffer in base.named_buffers(recurse=False):  # the same tensors: no copy
                self.register_buffer(name, buffer)
            # adapters in fp32 over a quantized base (as LoRALinear); each delta is computed in the compute dtype
            factory = dict(device=base.weight.device, dtype=torch.float32)
        else:
            self.weight = base.weight  # the same Parameters: no copy, plain checkpoint keys
            factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.register_parameter("bias", base.bias)
        self.token_slots = token_slots
        # non-persistent: adapters come from their own folders, the model's state dict stays an HF checkpoint
        self.register_buffer("lora_A", torch.zeros(max_adapters, 0, self.in_features, **factory),
                             persistent=False)  # (S, R, in)
        self.register_buffer("lora_B", torch.zeros(max_adapters, self.out_features, 0, **factory),
                             persistent=False)  # (S, out, R)
        self.ranks: dict[int, int] = {}  # slot -> rank of its adapter here (absent: that adapter skips this module)
        self.scales: dict[int, float] = {}  # slot -> alpha / r (rsLoRA: alpha / sqrt(r))

    @torch.no_grad()
    def set_adapter(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Load A (r, in) and B (out, r) into `slot`, growing the padded rank R if r is larger."""
        r = A.shape[0]
        if r > self.lora_A.shape[1]:
            S, R = self.lora_A.shape[:2]
            grown_A = self.lora_A.new_zeros(S, r, self.in_features)
            grown_B = self.lora_B.new_zeros(S, self.out_features, r)
            grown_A[:, :R], grown_B[:, :, :R] = self.lora_A, self.lora_B
            self.lora_A, self.lora_B = grown_A, grown_B
        self.clear_adapter(slot)
        self.lora_A[slot, :r] = A.to(self.lora_A)
        self.lora_B[slot, :, :r] = B.to(self.lora_B)
        self.ranks[slot], self.scales[slot] = r, scale

    @torch.no_grad()
    def clear_adapter(self, slot: int) -> None:
        self.ranks.pop(slot, None)
        self.scales.pop(slot, None)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()

    def _apply(self, fn, recurse=True):
        if self.quant_base is None:
            return super()._apply(fn, recurse)
        # .to(dtype) / .half() moves the codes, scales and adapters but never casts them (see QuantLinear)
        return apply_keeping_dtypes(self, fn, lambda f: super(MultiLoRALinear, self)._apply(f, recurse))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b: the plain matmul, or the quantized layer's own forward (int8's fast path, ...)."""
        base = self.quant_base
        if base is None:
            return F.linear(x, self.weight, self.bias)
        # point it at the tensors registered here: .to(), load_state_dict(assign=True) ... replace those, not its own
        for name in base._buffers:
            base._buffers[name] = self._buffers[name]
        base._parameters["bias"] = self.bias
        return base(x)

    def delta_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype each LoRA delta is computed in: the quantized layer's compute dtype, else the input's."""
        if self.quant_base is not None and self.quant_base.compute_dtype is not None:
            return self.quant_base.compute_dtype
        return x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)  # (..., out)
        slots = self.token_slots
        if slots.num_rows is None or not self.ranks:
            return y
        flat_x, flat_y = x.reshape(-1, self.in_features), y.view(-1, self.out_features)  # (N, in), (N, out)
        if flat_x.shape[0] != slots.num_rows:
            raise RuntimeError(f"set_token_slots gave {slots.num_rows} rows, but this forward has "
                               f"{flat_x.shape[0]} (B*T) rows")
        dtype = self.delta_dtype(x)
        for slot, rows in slots.segments:
            r = self.ranks.get(slot)
            if r is None:  # this adapter does not target this module
                continue
            # the true rank, not the padded R: the same matmuls as the adapter alone (LoRALinear), row for row;
            # the casts are no-ops over a float base (adapters in its dtype), (r, in) copies over a quantized one
            x_s = (flat_x if rows is None else flat_x.index_select(0, rows)).to(dtype)  # (n, in)
            A, B = self.lora_A[slot, :r].to(dtype), self.lora_B[slot, :, :r].to(dtype)  # (r, in), (out, r)
            delta = (F.linear(F.linear(x_s, A), B) * self.scales[slot]).to(flat_y.dtype)  # (n, out)
            if rows is None:
                flat_y += delta
            else:  # in place: y is this layer's own fresh output, and a copy per adapter would cost N x out each
                flat_y.index_add_(0, rows, delta)
        return y

    def extra_repr(self) -> str:
        base = f", over {self.quant_format[0].method}" if self.quant_format is not None else ""
        return (f"{self.in_features}, {self.out_features}{base}, adapters in slots {sorted(self.ranks)}, "
                f"padded rank {self.lora_A.shape[1]}")


class MultiLoRA:
    """Up to `max_adapters` PEFT LoRA adapters served at once on `model` (changed in place, lazily: a Linear is
    wrapped when the first adapter that targets it is added). Slots are reused after `remove`."""

    def __init__(self, model: nn.Module, max_adapters: int = 8):
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1, got {max_adapters}")
        self.model, self.max_adapters = model, max_adapters
        self.token_slots = TokenSlots()
        self._slots: dict[str, int] = {}  # adapter name -> slot
        self._modules: dict[str, list[str]] = {}  # adapter name -> the module names it targets

    # ---- adapters ----------------------------------------------------------------------------------------------

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name`; None (the base model) is -1."""
        if name is None:
            return -1
        if name not in self._slots:
            raise ValueError(f"unknown adapter {name!r} (loaded: {', '.join(self._slots) or 'none'})")
        return self._slots[name]

    def add(self, name: str, folder: str | Path) -> int:
        """Load the PEFT LoRA folder `folder` as adapter `name` and return its slot. Everything is checked before
        the model is touched: a ValueError leaves the model and the loaded adapters as they were."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._slots:
            raise ValueError(f"adapter {name!r} is already loaded; remove it first to replace it")
        free = [s for s in range(self.max_adapters) if s not in self._slots.values()]
        if not free:
            raise ValueError(f"cannot add adapter {name!r}: all {self.max_adapters} adapter slots are in use "
                             f"(max_adapters={self.max_adapters}); remove one first")
        try:
            config, per_module = read_adapter(folder)
        except AdapterError as e:
            # e says why: a damaged file, a missing folder or a kind of adapter multi-LoRA does not take
            raise ValueError(f"adapter {name!r} cannot be loaded for multi-LoRA: {e}") from None
        if config.get("use_dora"):
            raise ValueError(f"adapter {name!r} ({folder}) is a DoRA adapter (use_dora=true), which is unsupported "
                             "for multi-LoRA; merge it into a checkpoint of its own instead")
        # what a request's rows cannot have to themselves: an embedding's LoRA, and whole tensors that replace the
        # base's (modules_to_save, trained biases), which every request would see
        embeddings = [m for m, parts in sorted(per_module.items()) if "lora_embedding_A" in parts]
        if embeddings:
            raise ValueError(f"adapter {name!r} ({folder}) has a LoRA on the embedding {embeddings[0]!r}, which is "
                             "unsupported for multi-LoRA; merge it into a checkpoint of its own instead")
        use_rslora = bool(config.get("use_rslora", False))
        modules = dict(self.model.named_modules())
        updates = []  # (module name, A, B, scale), all checked before any is applied
        for module_name, parts in sorted(per_module.items()):
            if not set(parts) & set(LORA_PARTS):  # a modules_to_save copy (of a norm, ...): not a LoRA at all
                self._refuse_whole(name, folder, module_name, parts)
            module = modules.get(module_name)
            if module is None:
                raise ValueError(f"adapter {name!r} ({folder}) targets {module_name!r}, which this model does not "
                                 f"have")
            if not isinstance(module, (nn.Linear, QuantLinear, MultiLoRALinear)):
                raise ValueError(f"adapter {name!r} ({folder}) targets {module_name!r}, a {type(module).__name__}; "
                                 "multi-LoRA wraps nn.Linear and quantized (QuantLinear) layers only")
            if module_name == UNBATCHABLE[0] or UNBATCHABLE[1] in module_name:
                raise ValueError(f"adapter {name!r} ({folder}) targets {module_name!r}, which is unsupported for "
                                 "multi-LoRA (it does not see one row per token: lm_head and MoE experts)")
            if set(parts) - set(LORA_PARTS):
                self._refuse_whole(name, folder, module_name, parts)
            A, B = parts["lora_A.weight"], parts["lora_B.weight"]  # (r, in), (out, r)
            r = A.shape[0]
            if A.shape != (r, module.in_features) or B.shape != (module.out_features, r):
                raise ValueError(f"adapter {name!r} ({folder}): {module_name} has lora_A {tuple(A.shape)} and "
                                 f"lora_B {tuple(B.shape)}; this model needs (r, {module.in_features}) and "
                                 f"({module.out_features}, r)")
            if r == 0:
                raise ValueError(f"adapter {name!r} ({folder}): {module_name} has rank 0")
            alpha = module_alpha(config, module_name)
            scale = alpha / math.sqrt(r) if use_rslora else alpha / r  # as LoRALinear, to the bit
            updates.append((module_name, A, B, scale))

        slot = free[0]
        for module_name, A, B, scale in updates:
            self._wrap(module_name).set_adapter(slot, A, B, scale)
        self._slots[name], self._modules[name] = slot, [u[0] for u in updates]
        return slot

    @staticmethod
    def _refuse_whole(name: str, folder, module_name: str, parts: dict) -> None:
        whole = ", ".join(f"{module_name}.{p}" for p in parts if p not in LORA_PARTS)
        raise ValueError(f"adapter {name!r} ({folder}) replaces the base tensor {whole} (modules_to_save, a "
                         "trained bias or trainable token rows), which every request would see; unsupported for "
                         "multi-LoRA: merge it into a checkpoint of its own instead")

    def remove(self, name: str) -> None:
        """Unload adapter `name`; its slot is free for the next `add`. Wrapped layers stay wrapped (cheap: a layer
        with no adapter runs its base Linear only)."""
        slot = self.slot(name)
        for module_name in self._modules.pop(name):
            self.model.get_submodule(module_name).clear_adapter(slot)
        del self._slots[name]

    def _wrap(self, module_name: str) -> MultiLoRALinear:
        module = self.model.get_submodule(module_name)
        if isinstance(module, MultiLoRALinear):
            return module
        wrapped = MultiLoRALinear(module, self.max_adapters, self.token_slots)
        parent, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped)
        return wrapped

    # ---- per-forward metadata ----------------------------------------------------------------------------------

    def token_slots_for(self, adapters: Sequence[str | None], rows: Sequence[int]) -> torch.Tensor:
        """The (sum(rows),) slot tensor for requests laid out one after another, request i with `rows[i]` token rows
        and adapter `adapters[i]` (None: the base model). ValueError for an unknown adapter name."""
        slots = torch.tensor([self.slot(a) for a in adapters], dtype=torch.long)
        return torch.repeat_interleave(slots, torch.tensor(rows, dtype=torch.long))

    def set_token_slots(self, slots: torch.Tensor | None) -> None:
        """Set the slot of every row of the next forward's flattened (B*T) input, -1 for the base model; None clears
        them (every forward is then the base model). They stay until the next call."""
        state = self.token_slots
        if slots is None:
            state.num_rows, state.segments = None, []
            return
        slots = torch.as_tensor(slots).reshape(-1)
        if slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token slots must be an integer tensor, got {slots.dtype}")
        device = next(self.model.parameters()).device
        present = torch.unique(slots).tolist()  # the one host sync per forward; every layer reuses the segments
        loaded = set(self._slots.values())
        unknown = [s for s in present if s != -1 and s not in loaded]
        if unknown:
            raise ValueError(f"token slot {unknown[0]} holds no adapter (loaded slots: {sorted(loaded)}, -1 = base)")
        adapters = [s for s in present if s != -1]
        if len(present) == 1 and adapters:  # one adapter on every row: no gather needed
            segments = [(adapters[0], None)]
        else:
            slots = slots.to(device)
            segments = [(s, torch.nonzero(slots == s).squeeze(1)) for s in adapters]
        state.num_rows, state.segments = slots.numel(), segments

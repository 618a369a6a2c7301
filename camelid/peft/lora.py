"""LoRA (Hu et al. 2021), rsLoRA scaling (Kalajdzievski 2023) and DoRA (Liu et al. 2024) on any nn.Linear, by name.

`apply_lora` swaps each targeted nn.Linear for a `LoRALinear` that holds the *same* weight and bias Parameters, so
nothing is copied and the base keeps its plain key (torchtune's layout). The adapter tensors are named as in PEFT's
saved files, which makes a PEFT folder a prefix away from our state dict:

    camelid state dict                                  PEFT adapter_model.safetensors
    model.layers.0.self_attn.q_proj.weight              (base: not in the adapter file)
    model.layers.0.self_attn.q_proj.lora_A.weight       base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    model.layers.0.self_attn.q_proj.lora_B.weight       base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight
    model.layers.0.self_attn.q_proj.lora_magnitude_vector   (DoRA) base_model.model.....q_proj.lora_magnitude_vector
    model.embed_tokens.lora_embedding_A                 base_model.model.model.embed_tokens.lora_embedding_A (r, vocab)

A targeted nn.Embedding becomes a `LoRAEmbedding` (PEFT's LoRA Embedding: y = W[x] + s * A.T[x] B.T, no dropout,
no DoRA).

Forward, with s = alpha / r (rsLoRA: alpha / sqrt(r)) and dropout on the adapter input only:
    LoRA:  y = W x + b + s * B A dropout(x)
    DoRA:  y = m / ||W + s B A||_row * (W x + s B A x) + b,   the row norm detached (DoRA paper section 4.3, as PEFT)
Init as PEFT: A kaiming-uniform(a=sqrt(5)), B zeros, m = ||W||_row, so a freshly wrapped model equals its base.
Adapter tensors are fp32 over an fp16 / bf16 base (as PEFT's autocast_adapter_dtype), else the base's dtype.

QLoRA (Dettmers et al. 2023): `apply_qlora(model, ...)` = `apply_lora(..., quantize_base="nf4")` first swaps each
targeted nn.Linear for an NF4Linear (camelid.quant.nf4: NF4 + double quantization), then wraps it. The LoRALinear
adopts the quantized layer's buffers under their own names (`q_proj.weight` holds the NF4 codes,
`q_proj.weight_absmax` ... the scales), so keys stay put and a QLoRA checkpoint is a quantized checkpoint plus
adapters. The base matmul runs in `compute_dtype` (bf16, as the paper) on a weight dequantized on the fly (and again
in backward: no full-precision copy is kept for autograd); the adapters stay fp32. A QLoRA adapter is an ordinary
PEFT LoRA folder: it loads onto the unquantized base too. Merging folds it into the dequantized weight.

peft -> quant is a deliberate sideways edge: QLoRA needs quant's formats (FORMATS, to quantize a base), its
layer type (QuantLinear, to wrap a quantized base), its backward-recomputing matmul (dequant_linear) and its
dtype-keeping _apply. quant imports nothing of peft; the module-name rule both use lives in quant (name_matches).

Merging: `merge_lora(model)` folds the adapters into the weights and puts plain nn.Linear modules back
(PEFT's merge_and_unload). `merge_lora(model, keep=True)` folds in place but keeps a copy of each original weight,
so `unmerge_lora(model)` restores the base bit for bit (subtracting B A again would not, in floating point).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from camelid.peft.shared import adapter_dtype, name_matches
from camelid.quant import FORMATS, QuantLinear, dequant_linear, float_dtype, quantized_layers
from camelid.quant.linear import Dequantize, apply_keeping_dtypes


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update. `weight` / `bias` are the base layer's own Parameters (frozen)."""

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # QLoRA: (format class, options) of a quantized base, whose buffers become ours under the same names
        self.quant_format: tuple[type[QuantLinear], dict] | None = None
        if isinstance(base, QuantLinear):
            if use_dora:
                raise ValueError("DoRA over a quantized base is not supported: use plain LoRA (QLoRA)")
            self.quant_format = (type(base), dict(base.options))
            self.compute_dtype = base.compute_dtype
            for name, buffer in base.named_buffers(recurse=False):
                self.register_buffer(name, buffer)
        else:
            self.weight = base.weight  # the same Parameters: no copy, plain keys
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # adapters in fp32 over a half-precision base (PEFT's autocast_adapter_dtype): small updates survive AdamW
        low = self.quant_format is not None or base.weight.dtype in (torch.float16, torch.bfloat16)
        factory = dict(device=base.weight.device, dtype=torch.float32 if low else base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(self.delta_weight()).to(factory["dtype"]))
        self.merged = False
        self.register_buffer("unmerged_weight", None, persistent=False)  # the original weight while merged (keep=True)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def _apply(self, fn, recurse=True):
        if self.quant_format is None:
            return super()._apply(fn, recurse)
        # a quantized base's codes and scales keep their dtypes through .to(dtype) / .half() (see QuantLinear)
        return apply_keeping_dtypes(self, fn, lambda f: super(LoRALinear, self)._apply(f, recurse))

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base layer's (out, in) weight; a quantized base is dequantized (to fp32 unless `dtype` says)."""
        if self.quant_format is None:
            return self.weight if dtype is None else self.weight.to(dtype)
        cls, options = self.quant_format
        return cls.dequantize_buffers(self, dtype or torch.float32, options)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, (out, in): what plain LoRA adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """||W + delta|| per output row (PEFT's DoRA norm: torch.linalg.norm over dim=1), without gradient."""
        with torch.no_grad():
            return torch.linalg.norm(self.weight + delta, dim=1).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_format is not None:
            dequantize: Dequantize = lambda dtype: self.base_weight(dtype)  # noqa: E731
            result = dequant_linear(x, dequantize, self.bias, self.compute_dtype)
        else:
            result = F.linear(x, self.weight, self.bias)
        if self.merged:
            return result
        dtype = result.dtype
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick the dtype: a cast here
            x = x.to(self.lora_A.weight.dtype)  # would make (and save for backward) one more copy per adapter
        xd = self.dropout(x)
        if not self.use_dora:
            # result + s B A xd as one matmul that accumulates into `result` (addmm, s as the GEMM's alpha): no
            # (..., out) update is written and then added, and backward scales only r-wide tensors, never the
            # output gradient. Saved for backward: A's output and B, as lora_B would save them.
            down = self.lora_A(xd)  # (..., r)
            flat = result.reshape(-1, self.out_features).to(down.dtype)  # (N, out); a no-op under autocast
            B = self.lora_B.weight.to(down.dtype)  # (out, r)
            flat = torch.addmm(flat, down.reshape(-1, self.r), B.t(), alpha=self.scaling)
            return flat.view(result.shape).to(dtype)
        lora = self.lora_B(self.lora_A(xd))  # (..., out)
        # DoRA: rescale the base output and the update by m / ||W + s B A||; the norm is a constant for backprop
        norm = self._weight_norm(self.delta_weight().detach())
        scale = self.lora_magnitude_vector / norm  # (out,)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = result if self.bias is None else result - self.bias
        else:  # with dropout active, the rescaled base term sees the dropped-out input too (as PEFT)
            base = F.linear(xd, self.weight)
        return (result + (scale - 1) * base + scale * lora * self.scaling).to(dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The single weight equal to this layer's (eval-mode) forward."""
        delta = self.delta_weight()
        if not self.use_dora:
            return self.base_weight(delta.dtype) + delta
        factor = (self.lora_magnitude_vector / self._weight_norm(delta)).view(-1, 1)
        return (factor * (self.weight + delta)).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, keep: bool = True) -> None:
        if self.merged:
            return
        if self.quant_format is not None:
            raise ValueError("a LoRA layer over a quantized base merges into a new float Linear only: "
                             "use merge_lora(model) without keep")
        new = self.merged_weight()
        if keep:
            self.unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.unmerged_weight is None:
            raise RuntimeError("this layer was merged without keep=True; its original weight is gone")
        self.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None
        self.merged = False

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (merging first if needed); over a quantized base, the
        dequantized weight plus the update (summed in the adapters' dtype, fp32 unless cast), stored in `dtype`
        (default fp32)."""
        if self.quant_format is not None:
            weight = self.merged_weight().to(dtype or torch.float32)
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().to(weight.dtype), requires_grad=False)
            return linear
        self.merge(keep=False)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        if self.quant_format is not None:
            kind = f"LoRA over {self.quant_format[0].method}"
        return (f"{self.in_features}, {self.out_features}, {kind} r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


class LoRAEmbedding(nn.Module):
    """An nn.Embedding plus a low-rank update, PEFT's LoRA Embedding: y = W[x] + s * A.T[x] B.T, with lora_embedding_A
    (r, num_embeddings) and lora_embedding_B (embedding_dim, r) as PEFT names and shapes them. `weight` is the base
    layer's own Parameter. No dropout (PEFT applies none to embeddings) and no DoRA."""

    use_dora = False

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = base.num_embeddings, base.embedding_dim, \
            base.padding_idx
        self.weight = base.weight
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.dropout_p = dropout  # recorded for save_adapter's config only
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        factory = dict(device=base.weight.device, dtype=adapter_dtype(base.weight))
        # PEFT's init: A zeros, B normal, so a fresh layer is its base
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, self.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.randn(self.embedding_dim, r, **factory))
        self.merged = False
        self.register_buffer("unmerged_weight", None, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        """s * (B A).T, (num_embeddings, embedding_dim): what LoRA adds to W."""
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.embedding(x, self.weight, self.padding_idx)
        if self.merged:
            return result
        down = F.embedding(x, self.lora_embedding_A.t(), self.padding_idx)  # (..., r)
        return result + ((down @ self.lora_embedding_B.t()) * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self, keep: bool = True) -> None:
        if self.merged:
            return
        if keep:
            self.unmerged_weight = self.weight.detach().clone()
        self.weight.copy_((self.weight.to(self.lora_embedding_A.dtype) + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    unmerge = LoRALinear.unmerge

    def to_plain(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """A plain nn.Embedding holding the merged weight (merging first if needed)."""
        self.merge(keep=False)
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        embedding.weight = self.weight
        return embedding

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, LoRA r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


# ---- acting on a model by module name ------------------------------------------------------------------------

def lora_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: str | Iterable[str] = ("q_proj", "v_proj"), use_rslora: bool = False,
               use_dora: bool = False, ranks: dict[str, int] | None = None,
               alphas: dict[str, float] | None = None, quantize_base: str | None = None,
               compute_dtype: torch.dtype | None = torch.bfloat16) -> nn.Module:
    """Wrap every nn.Linear named by `target_modules` (a list of names / name suffixes, or a regex over the full
    name, or "all-linear") in a LoRALinear, and every nn.Embedding it names in a LoRAEmbedding (not DoRA, not
    quantized), freeze every other parameter, and return the model (changed in place).
    `ranks` / `alphas` override r / alpha for given full module names (used when loading PEFT folders).
    `quantize_base` ("nf4" for QLoRA; "int8" / "int4" work too) quantizes each targeted layer first, its matmul
    then running in `compute_dtype` (None: the input's dtype). Layers already quantized (a `camelid quantize`
    folder) are wrapped as they are."""
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers; merge_lora it first")
    if quantize_base is not None and quantize_base not in FORMATS:
        raise ValueError(f"unknown quantize_base {quantize_base!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    linear_types = (nn.Linear, QuantLinear)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, linear_types) and n != "lm_head"}
    else:
        candidates = {n: m for n, m in model.named_modules() if n and name_matches(n, target_modules)}
    if not candidates:
        raise ValueError(f"target_modules {target_modules!r} match no module of this model "
                         f"(Linear layers are named like {_example_linear(model)!r})")
    wrong = [f"{n} ({type(m).__name__})" for n, m in candidates.items()
             if not isinstance(m, (*linear_types, nn.Embedding))]
    if wrong:
        raise ValueError(f"LoRA wraps nn.Linear and nn.Embedding layers only; target_modules {target_modules!r} also "
                         f"match {', '.join(wrong[:3])}")
    embeddings = [n for n, m in candidates.items() if isinstance(m, nn.Embedding)]
    if embeddings and (use_dora or quantize_base is not None):
        raise ValueError(f"{'DoRA' if use_dora else 'a quantized base'} on an embedding ({embeddings[0]}) is not "
                         "supported; leave it out of target_modules")
    # a weight shared with another module (lm_head tied to embed_tokens): merging would change both
    others = {id(p) for n, m in model.named_modules() if n not in candidates for p in m.parameters(recurse=False)}
    tied = [n for n, m in candidates.items() if isinstance(m, (nn.Linear, nn.Embedding)) and id(m.weight) in others]
    if tied:
        raise ValueError(f"{tied[0]} shares its weight with another module (tied embeddings); leave it out of "
                         "target_modules")
    for p in model.parameters():
        p.requires_grad_(False)
    if quantize_base is not None:  # check every shape before changing anything
        for name, linear in candidates.items():
            if isinstance(linear, nn.Linear):
                try:
                    FORMATS[quantize_base].check_options(linear.in_features, linear.out_features)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
    for name, linear in candidates.items():
        rank, scale = (ranks or {}).get(name, r), (alphas or {}).get(name, alpha)
        if isinstance(linear, nn.Embedding):
            model.set_submodule(name, LoRAEmbedding(linear, rank, scale, dropout, use_rslora), strict=True)
            continue
        if quantize_base is not None and isinstance(linear, nn.Linear):
            linear = FORMATS[quantize_base].from_linear(linear, compute_dtype=compute_dtype)
        layer = LoRALinear(linear, rank, scale, dropout, use_rslora, use_dora)
        model.set_submodule(name, layer, strict=True)
    return model


def apply_qlora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                target_modules: str | Iterable[str] = "all-linear", use_rslora: bool = False,
                compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """QLoRA: every targeted Linear quantized to NF4 (double quantization), a LoRA adapter over each, the base
    matmuls in bf16. The paper targets every linear layer, hence the default."""
    return apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                      use_rslora=use_rslora, quantize_base="nf4", compute_dtype=compute_dtype)


def _example_linear(model: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), "?")


def merge_lora(model: nn.Module, keep: bool = False) -> nn.Module:
    """Fold every adapter into its base weight. keep=False (default): put plain nn.Linear modules back, the model is
    a plain model again (state dict = HF checkpoint). keep=True: layers stay LoRALinear with a copy of the original
    weight, so `unmerge_lora` restores it exactly. A quantized base (QLoRA) becomes a Linear in the model's
    float dtype, the one its inputs come in."""
    dtype = float_dtype(model)
    for name, layer in lora_layers(model).items():
        if keep:
            layer.merge(keep=True)
        else:
            plain = layer.to_plain() if isinstance(layer, LoRAEmbedding) else layer.to_linear(dtype)
            model.set_submodule(name, plain, strict=True)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, keep=True)`: every base weight is bitwise the one before merging."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor (tied embeddings) counted once; a quantized
    layer's weight counts as its in x out parameters."""
    seen: set[int] = set()
    trainable = 0
    total = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features
                for n in quantized_layers(model))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under our (= PEFT's, minus the "base_model.model." prefix) names."""
    return {k: v for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k or k.endswith((".lora_magnitude_vector", ".lora_embedding_A",
                                                                ".lora_embedding_B"))}

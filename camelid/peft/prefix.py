"""Prefix tuning (Li & Liang 2021) and P-Tuning v2 (Liu et al. 2022): trainable keys and values put in front of
every layer's attention, so each real token also attends to P learned "virtual tokens". The two are one mechanism
(P-Tuning v2 = deep prefixes on every layer of a decoder), so `apply_ptuning_v2` is `apply_prefix`.

Nothing in the model changes: a `PrefixEncoder` is registered as `model.prefix_encoder`, and a forward pre-hook on
the Transformer hands every call a `PrefixedCache` whose first P slots are the prefix, with `start` moved past them
and the padding mask widened by P ones. This is what PEFT does with `past_key_values` (peft 0.21 PeftModelForCausalLM):

    prefix tensor (P, L * 2 * nkv * hd) -> view (P, L*2, nkv, hd): row 2l is layer l's keys, row 2l+1 its values
    prefix keys go into attention as they are: they are never rotated (RoPE acts on the real tokens' keys only)
    real tokens sit at positions P, P+1, ... (position_ids given by the caller are shifted by P, as PEFT does)
    attention_mask (B, T) -> (B, P + T) with ones in front; a 4D (packed) mask gets P visible key columns

With a KV cache (generation), the caller's cache keeps holding the real tokens only, from slot 0; the wrapper adds
the prefix in front of what it returns, so `camelid.generate` works unchanged.

`prefix_projection=True` is PEFT's reparameterisation: P embeddings of size nkv*hd through Linear-Tanh-Linear to
L*2*nkv*hd. Saved files hold the projected prefix only (as PEFT's `prompt_embeddings`), so a loaded adapter is a
plain prefix, in camelid as in PEFT.

The folder is PEFT's prompt-learning layout (shared.py's write_peft_folder / read_peft_folder, as prompt.py's).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from camelid.peft.shared import (CONFIG_FILE, PEFT_KEY, AdapterError, check_position_table, read_peft_folder,
                                 write_peft_folder)


class PrefixEncoder(nn.Module):
    """The learned prefix of every layer: forward() -> (P, L * 2 * nkv * hd), PEFT's layout."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_dim: int, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None, init: str = "random",
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_virtual_tokens, self.num_layers, self.kv_dim = num_virtual_tokens, num_layers, kv_dim
        self.prefix_projection = prefix_projection
        self.encoder_hidden_size = encoder_hidden_size or kv_dim
        out = num_layers * 2 * kv_dim
        factory = dict(device=device, dtype=dtype)
        if prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim, **factory)
            self.transform = nn.Sequential(nn.Linear(kv_dim, self.encoder_hidden_size, **factory), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, out, **factory))
            if init == "zero":  # PEFT's init_weights="zero": the prefix starts as all-zero keys and values
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out, **factory)  # N(0, 1), as PEFT
            if init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)  # (P, L*2*kv_dim)
        return self.embedding.weight

    def keys_values(self, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (L, nkv, P, hd)."""
        P = self.num_virtual_tokens
        kv = self().view(P, self.num_layers * 2, num_kv_heads, self.kv_dim // num_kv_heads)  # (P, 2L, nkv, hd)
        kv = kv.permute(1, 2, 0, 3)  # (2L, nkv, P, hd)
        return kv[0::2], kv[1::2]


class PrefixedCache:
    """A KV cache view: P fixed prefix slots, then the real tokens. `inner` (a camelid KVCache or None) stores the
    real tokens from its own slot 0; `start` as seen by the model counts the prefix slots too."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, inner=None):
        self.keys, self.values, self.inner = keys, values, inner  # (L, nkv, P, hd) each
        self.num_virtual_tokens = keys.shape[2]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, nkv, T, hd) written at slot `start` (>= P); returns prefix + every real key/value so far."""
        P = self.num_virtual_tokens
        if self.inner is not None:
            k, v = self.inner.update(layer, start - P, k, v)  # (B, nkv, S - P, hd)
        elif start != P:
            raise ValueError(f"without a KV cache the prefixed forward starts at slot {P}, got start={start}")
        B = k.shape[0]
        # torch.cat, not a write into a preallocated tensor: no in-place op, so activation checkpointing can replay it
        prefix_k = self.keys[layer].to(k.dtype).expand(B, -1, -1, -1)  # (B, nkv, P, hd)
        prefix_v = self.values[layer].to(v.dtype).expand(B, -1, -1, -1)
        return torch.cat((prefix_k, k), dim=2), torch.cat((prefix_v, v), dim=2)


def _prefix_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    encoder: PrefixEncoder = model.prefix_encoder
    P = encoder.num_virtual_tokens
    cache, start = kwargs.get("cache"), kwargs.get("start", 0)
    tokens = args[0] if args else kwargs.get("input_ids")
    T = tokens.shape[1] if tokens is not None else kwargs["input_embeds"].shape[1]
    check_position_table(model, start + P + T - 1, P)
    if cache is not None and hasattr(cache, "attend"):
        raise ValueError("prefix tuning runs with camelid.generate's KV cache, not the engine's paged cache")
    keys, values = encoder.keys_values(model.config.num_key_value_heads)
    kwargs = {**kwargs, "cache": PrefixedCache(keys, values, cache), "start": start + P}
    mask = kwargs.get("attention_mask")
    if mask is not None:
        B = mask.shape[0]
        if mask.dim() == 2:  # (B, S) padding mask over the real slots -> the prefix slots are always visible
            kwargs["attention_mask"] = torch.cat((mask.new_ones(B, P), mask), dim=1)
        else:  # (B, 1, T, S) packed-document mask: every document sees the prefix
            kwargs["attention_mask"] = torch.cat((mask.new_ones(*mask.shape[:3], P), mask), dim=3)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + P  # PEFT's _adjust_prompt_learning_kwargs
    return args, kwargs


def apply_prefix(model: nn.Module, num_virtual_tokens: int = 20, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None, init: str = "random") -> nn.Module:
    """Freeze the model and give every layer P trainable key/value prefixes (in place; returns the model).
    `prefix_projection` reparameterises them through an MLP of width `encoder_hidden_size` (default nkv * hd);
    init "random" (PEFT's default, N(0, 1)) or "zero" (PEFT's init_weights="zero")."""
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    if init not in ("random", "zero"):
        raise ValueError(f"unknown prefix init {init!r}: expected 'random' or 'zero'")
    if encoder_hidden_size is not None and encoder_hidden_size < 1:
        raise ValueError(f"encoder_hidden_size must be a positive integer, got {encoder_hidden_size!r}")
    if has_prefix(model):
        raise ValueError("the model already has a prefix (apply_prefix was called twice)")
    if getattr(model, "prompt_encoder", None) is not None:
        raise ValueError("the model already has a soft prompt; one virtual-token method at a time")
    c = model.config
    weight = model.lm_head.weight
    low = weight.dtype in (torch.float16, torch.bfloat16)  # trainable tensors in fp32 over a half-precision base
    for p in model.parameters():
        p.requires_grad_(False)
    model.prefix_encoder = PrefixEncoder(num_virtual_tokens, c.num_hidden_layers, c.num_key_value_heads * c.head_dim,
                                         prefix_projection, encoder_hidden_size, init, device=weight.device,
                                         dtype=torch.float32 if low else weight.dtype)
    model.prefix_encoder.hook_handle = model.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)
    return model


def has_prefix(model: nn.Module) -> bool:
    return isinstance(getattr(model, "prefix_encoder", None), PrefixEncoder)


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, under camelid names (`prefix_encoder.embedding.weight`, `prefix_encoder.transform...`)."""
    if not has_prefix(model):
        raise ValueError("the model has no prefix (apply_prefix or load_prefix first)")
    return {f"prefix_encoder.{k}": v for k, v in model.prefix_encoder.state_dict().items()}


def save_prefix(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """A PEFT PREFIX_TUNING folder; the file holds the (projected) prefix as `prompt_embeddings`, as PEFT saves it."""
    if not has_prefix(model):
        raise ValueError("the model has no prefix to save (apply_prefix or load_prefix first)")
    encoder: PrefixEncoder = model.prefix_encoder
    c = model.config
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "num_layers": c.num_hidden_layers,
        # PEFT's GQA rule: token_dim and num_attention_heads describe the key/value heads
        "token_dim": encoder.kv_dim,
        "num_attention_heads": c.num_key_value_heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": encoder.encoder_hidden_size,
        "prefix_projection": encoder.prefix_projection,
        "init_weights": None,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    with torch.no_grad():
        prefix = encoder().detach()
    return write_peft_folder(folder, config, prefix)


def load_prefix(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a PEFT PREFIX_TUNING folder (written by `peft` or `save_prefix`) to `model`: frozen base, trainable
    prefix holding the saved values."""
    config, prefix, file = read_peft_folder(folder, "PREFIX_TUNING")
    c = model.config
    expect = {"num_layers": c.num_hidden_layers, "token_dim": c.num_key_value_heads * c.head_dim,
              "num_attention_heads": c.num_key_value_heads, "num_transformer_submodules": 1}
    for field, want in expect.items():
        if config.get(field, want) != want:
            raise AdapterError(f"{file.parent / CONFIG_FILE}: {field}={config.get(field)!r}, this model needs {want}")
    P = int(config.get("num_virtual_tokens") or prefix.shape[0])
    want_shape = (P, c.num_hidden_layers * 2 * expect["token_dim"])
    if tuple(prefix.shape) != want_shape:
        raise AdapterError(f"{file}: {PEFT_KEY} has shape {tuple(prefix.shape)}, this model expects {want_shape}")
    apply_prefix(model, num_virtual_tokens=P)  # a saved prefix is already projected: load it as a plain one
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.copy_(prefix)
    return model


# P-Tuning v2 is deep prefix tuning: the same functions under the method's own name
apply_ptuning_v2, has_ptuning_v2, ptuning_v2_state_dict = apply_prefix, has_prefix, prefix_state_dict
save_ptuning_v2, load_ptuning_v2 = save_prefix, load_prefix

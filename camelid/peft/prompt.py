"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): P trainable "soft tokens" put in front of the
input embeddings. Prompt tuning learns the P embeddings directly (initialised at random, from sampled vocabulary
rows, or from the embeddings of a text); P-tuning produces them with a prompt encoder, an MLP or a bidirectional
LSTM + MLP over P learned inputs (PEFT's PromptEncoder, same module names).

Soft tokens live in the space the layers see: on Gemma (scale_embeddings) they are not scaled by sqrt(H) again,
and text / vocabulary init copies the scaled rows, as transformers 5 (which scales inside embed_tokens) and PEFT do.

Nothing in the model changes: a `SoftPrompt` is registered as `model.prompt_encoder`; a forward pre-hook turns
input_ids into input_embeds with the soft tokens in front, and a forward hook drops their P logits rows, so the
output stays (B, T, V) aligned with input_ids (what the training loop's loss expects). As PEFT does
(peft 0.21 PeftModelForCausalLM.forward):

    input_embeds = cat(soft prompt (P, H), embed_tokens(input_ids))       (B, P + T, H)
    attention_mask (B, T) -> (B, P + T) with ones in front; positions 0..P-1 for the soft tokens, then the real
    tokens from P on. PEFT's own output keeps the P extra rows: its logits[:, P:] are ours.
    Caller position_ids are shifted by P (PEFT drops them instead, which equals this without padding or packing);
    a 4D packed-document mask (B, 1, T, T) becomes (B, 1, P + T, P + T): the soft tokens see each other causally
    and every document sees them.

With a KV cache (camelid.generate), the first call (start == 0) also runs the soft tokens, so the cache must hold
P more slots than the real tokens: the hook grows the caller's KVCache by P slots then (once per cache, so a
reused cache does not keep growing), and every later call is shifted by P. Saved files hold the encoded prompt
(P, H) as PEFT's `prompt_embeddings`, for both methods; a loaded P-tuning adapter is therefore a plain soft prompt,
in camelid as in PEFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from camelid.peft.shared import AdapterError, check_position_table, read_peft_folder, write_peft_folder

ENCODER_TYPES = ("MLP", "LSTM")


class SoftPrompt(nn.Module):
    """forward() -> the P soft token embeddings (P, H). `encoder_type` None: the embedding is the prompt (prompt
    tuning, or a loaded P-tuning adapter); "MLP" / "LSTM": P-tuning's prompt encoder over the embedding."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int, peft_type: str, encoder_type: str | None = None,
                 encoder_hidden_size: int | None = None, encoder_num_layers: int = 2, encoder_dropout: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_virtual_tokens, self.peft_type, self.encoder_type = num_virtual_tokens, peft_type, encoder_type
        self.encoder_hidden_size = h = encoder_hidden_size or hidden_size
        self.encoder_num_layers, self.encoder_dropout = encoder_num_layers, encoder_dropout
        factory = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size, **factory)  # N(0, 1): PEFT's RANDOM init
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(hidden_size, h, num_layers=encoder_num_layers, dropout=encoder_dropout,
                                     bidirectional=True, batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **factory), nn.ReLU(),
                                          nn.Linear(2 * h, hidden_size, **factory))
        elif encoder_type == "MLP":  # always 3 layers, as PEFT (which ignores encoder_num_layers for the MLP)
            self.mlp_head = nn.Sequential(nn.Linear(hidden_size, h, **factory), nn.ReLU(), nn.Linear(h, h, **factory),
                                          nn.ReLU(), nn.Linear(h, hidden_size, **factory))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (P, H)
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(x[None])[0])[0]  # the LSTM reads the P inputs as one sequence
        if self.encoder_type == "MLP":
            return self.mlp_head(x)
        return x


def _embedding_scale(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Gemma's sqrt(H) input scale, rounded to the activation dtype as the forward rounds it."""
    return torch.tensor(model.config.hidden_size**0.5, dtype=dtype)


def _make_room(cache, P: int) -> None:
    """Give a camelid KVCache P more slots than its caller allocated for the real tokens, once: a cache reused for
    another generation already has them (`soft_prompt_slots` records how many were added). A fresh prefill
    overwrites every slot it reads, so zeros are fine."""
    extra = P - getattr(cache, "soft_prompt_slots", 0)
    if extra <= 0:
        return
    for layer in range(len(cache.k)):
        for store in (cache.k, cache.v):
            old = store[layer]  # (B, nkv, S, hd)
            store[layer] = old.new_zeros(*old.shape[:2], old.shape[2] + extra, old.shape[3])
    cache.max_seq_len += extra
    cache.soft_prompt_slots = P


def _prompt_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    prompt: SoftPrompt = model.prompt_encoder
    P = prompt.num_virtual_tokens
    kwargs = dict(kwargs)
    input_ids = args[0] if args else kwargs.get("input_ids")
    embeds = kwargs.get("input_embeds")
    if embeds is None:
        embeds = model.model.embed_tokens(input_ids)  # (B, T, H)
    cache, start = kwargs.get("cache"), kwargs.get("start", 0)
    if cache is not None and hasattr(cache, "attend"):
        raise ValueError("prompt tuning runs with camelid.generate's KV cache, not the engine's paged cache")
    B, T, _ = embeds.shape
    check_position_table(model, start + P + T - 1, P)
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if positions is not None:
        positions = positions.expand(B, T) + P
    if cache is None or start == 0:  # the soft tokens run in this call, in front of the real ones
        if cache is not None:
            _make_room(cache, P)
        soft = prompt().to(embeds.dtype)[None].expand(B, -1, -1)  # (B, P, H)
        if model.config.scale_embeddings:  # the forward scales input_embeds; soft tokens are already in model space
            soft = soft / _embedding_scale(model, embeds.dtype)
        embeds = torch.cat((soft, embeds), dim=1)  # (B, P + T, H)
        if positions is not None:
            positions = torch.cat((torch.arange(P, device=positions.device).expand(B, P), positions), dim=1)
        if mask is not None and mask.dim() == 2:
            mask = torch.cat((mask.new_ones(B, P), mask), dim=1)
        elif mask is not None:  # (B, 1, T, T) packed documents -> (B, 1, P + T, P + T)
            full = mask.new_zeros(B, mask.shape[1], P + T, P + T)
            full[..., :P, :P] = torch.ones(P, P, dtype=torch.bool, device=mask.device).tril()
            full[..., P:, :P] = True
            full[..., P:, P:] = mask
            mask = full
        if kwargs.get("logits_at") is not None:
            kwargs["logits_at"] = kwargs["logits_at"] + P
    else:  # later calls with a cache: the soft tokens already sit in its first P slots
        kwargs["start"] = start + P
        if mask is not None and mask.dim() == 2:
            mask = torch.cat((mask.new_ones(B, P), mask), dim=1)
        elif mask is not None:
            raise ValueError("prompt tuning with a KV cache takes a 2D padding mask, not a 4D mask")
    kwargs.update(input_embeds=embeds, attention_mask=mask, position_ids=positions)
    kwargs.pop("input_ids", None)
    return (), kwargs


def _prompt_forward_hook(model: nn.Module, args: tuple, kwargs: dict, logits: torch.Tensor) -> torch.Tensor:
    """Drop the soft tokens' rows so the logits line up with input_ids again."""
    ran_soft_tokens = kwargs.get("start", 0) == 0  # the pre-hook moved every later call past slot P
    if ran_soft_tokens and not kwargs.get("last_only") and kwargs.get("logits_at") is None:
        return logits[:, model.prompt_encoder.num_virtual_tokens:]
    return logits


def _attach(model: nn.Module, prompt: SoftPrompt) -> nn.Module:
    if getattr(model, "prompt_encoder", None) is not None:
        raise ValueError("the model already has a soft prompt (apply_prompt / apply_ptuning was called twice)")
    if getattr(model, "prefix_encoder", None) is not None:
        raise ValueError("the model already has a prefix; one virtual-token method at a time")
    for p in model.parameters():
        p.requires_grad_(False)
    model.prompt_encoder = prompt
    prompt.hook_handles = (model.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True),
                           model.register_forward_hook(_prompt_forward_hook, with_kwargs=True))
    return model


def _check_count(num_virtual_tokens) -> None:
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")


def _factory(model: nn.Module) -> dict:
    weight = model.model.embed_tokens.weight
    low = weight.dtype in (torch.float16, torch.bfloat16)  # trainable tensors in fp32 over a half-precision base
    return dict(device=weight.device, dtype=torch.float32 if low else weight.dtype)


def _init_ids(init: str, num_virtual_tokens: int, vocab_size: int, init_text: str | None, tokenizer,
              generator: torch.Generator | None) -> list[int] | None:
    """Token ids whose embeddings start the prompt (PEFT's SAMPLE_VOCAB / TEXT), or None for a random init."""
    if init == "random":
        return None
    if init == "vocab":
        return torch.randint(0, vocab_size, (num_virtual_tokens,), generator=generator).tolist()
    if init_text is None or tokenizer is None:
        raise ValueError("init='text' needs init_text and a tokenizer")
    ids = list(tokenizer.encode(init_text))
    if not ids:
        raise ValueError(f"init_text {init_text!r} encodes to no tokens")
    ids = ids * math.ceil(num_virtual_tokens / len(ids))  # PEFT: repeat a short text, cut a long one
    return ids[:num_virtual_tokens]


def apply_prompt(model: nn.Module, num_virtual_tokens: int = 20, init: str | None = None, init_text: str | None = None,
                 tokenizer=None, init_ids: Sequence[int] | None = None,
                 generator: torch.Generator | None = None) -> nn.Module:
    """Freeze the model and put P trainable soft tokens in front of every input (in place; returns the model).
    init: "random" (N(0, 1), PEFT's RANDOM), "vocab" (embeddings of random vocabulary tokens, SAMPLE_VOCAB) or
    "text" (embeddings of `tokenizer.encode(init_text)`, repeated or cut to P tokens, PEFT's TEXT); by default
    "text" when init_text is given, else "random". `init_ids` gives the token ids directly instead."""
    _check_count(num_virtual_tokens)
    if init is None:
        init = "text" if init_text is not None else "random"
    elif init_text is not None and init != "text":
        raise ValueError(f"init_text is only used with init='text', got init={init!r}")
    if init not in ("random", "vocab", "text"):
        raise ValueError(f"unknown prompt init {init!r}: expected 'random', 'vocab' or 'text'")
    embed = model.model.embed_tokens
    ids = list(init_ids) if init_ids is not None else _init_ids(init, num_virtual_tokens, embed.num_embeddings,
                                                               init_text, tokenizer, generator)
    if ids is not None and (len(ids) != num_virtual_tokens or min(ids) < 0 or max(ids) >= embed.num_embeddings):
        raise ValueError(f"init ids must be {num_virtual_tokens} token ids below {embed.num_embeddings}, got {ids}")
    prompt = SoftPrompt(num_virtual_tokens, embed.embedding_dim, "PROMPT_TUNING", **_factory(model))
    if ids is not None:
        with torch.no_grad():
            rows = embed.weight[torch.tensor(ids, device=embed.weight.device)]  # (P, H)
            if model.config.scale_embeddings:  # a token's input as the model sees it (transformers 5 / PEFT)
                rows = rows * _embedding_scale(model, rows.dtype)
            prompt.embedding.weight.copy_(rows)
    return _attach(model, prompt)


def apply_ptuning(model: nn.Module, num_virtual_tokens: int = 20, encoder_type: str = "MLP",
                  encoder_hidden_size: int | None = None, encoder_num_layers: int = 2,
                  encoder_dropout: float = 0.0) -> nn.Module:
    """Freeze the model and put P soft tokens, made by a trainable prompt encoder ("MLP" or "LSTM", width
    `encoder_hidden_size`, default the model's hidden size), in front of every input (in place; returns the model)."""
    _check_count(num_virtual_tokens)
    if encoder_type not in ENCODER_TYPES:
        raise ValueError(f"unknown P-tuning encoder_type {encoder_type!r}: expected one of {ENCODER_TYPES}")
    if encoder_hidden_size is not None and encoder_hidden_size < 1:
        raise ValueError(f"encoder_hidden_size must be a positive integer, got {encoder_hidden_size!r}")
    if encoder_num_layers < 1:
        raise ValueError(f"encoder_num_layers must be >= 1, got {encoder_num_layers!r}")
    embed = model.model.embed_tokens
    prompt = SoftPrompt(num_virtual_tokens, embed.embedding_dim, "P_TUNING", encoder_type, encoder_hidden_size,
                        encoder_num_layers, encoder_dropout, **_factory(model))
    return _attach(model, prompt)


def _soft_prompt(model: nn.Module, peft_type: str) -> SoftPrompt | None:
    prompt = getattr(model, "prompt_encoder", None)
    return prompt if isinstance(prompt, SoftPrompt) and prompt.peft_type == peft_type else None


def has_prompt(model: nn.Module) -> bool:
    return _soft_prompt(model, "PROMPT_TUNING") is not None


def has_ptuning(model: nn.Module) -> bool:
    return _soft_prompt(model, "P_TUNING") is not None


def _state_dict(model: nn.Module, peft_type: str, name: str) -> dict[str, torch.Tensor]:
    prompt = _soft_prompt(model, peft_type)
    if prompt is None:
        raise ValueError(f"the model has no {name} soft prompt (apply_{name} or load_{name} first)")
    return {f"prompt_encoder.{k}": v for k, v in prompt.state_dict().items()}


def prompt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors under camelid names: `prompt_encoder.embedding.weight`."""
    return _state_dict(model, "PROMPT_TUNING", "prompt")


def ptuning_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors under camelid names: `prompt_encoder.embedding.weight`, `prompt_encoder.mlp_head.*`,
    `prompt_encoder.lstm_head.*` (PEFT's PromptEncoder names)."""
    return _state_dict(model, "P_TUNING", "ptuning")


def _config(model: nn.Module, prompt: SoftPrompt, base_model_name_or_path: str | None) -> dict:
    c = model.config
    config = {
        "peft_type": prompt.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "token_dim": model.model.embed_tokens.embedding_dim,
        "num_attention_heads": c.num_attention_heads,
        "num_layers": c.num_hidden_layers,
        "num_transformer_submodules": 1,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    if prompt.peft_type == "PROMPT_TUNING":
        # the saved tensor is the trained prompt, whatever started it: PEFT re-runs no init when it loads
        config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                      tokenizer_kwargs=None)
    else:
        config.update(encoder_reparameterization_type=prompt.encoder_type or "MLP",
                      encoder_hidden_size=prompt.encoder_hidden_size, encoder_num_layers=prompt.encoder_num_layers,
                      encoder_dropout=prompt.encoder_dropout)
    return config


def _save(model: nn.Module, folder, base_model_name_or_path, peft_type: str, name: str) -> Path:
    prompt = _soft_prompt(model, peft_type)
    if prompt is None:
        raise ValueError(f"the model has no {name} soft prompt to save (apply_{name} or load_{name} first)")
    with torch.no_grad():
        embeddings = prompt().detach()  # (P, H): the encoder's output, as PEFT saves it
    return write_peft_folder(folder, _config(model, prompt, base_model_name_or_path), embeddings)


def save_prompt(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """A PEFT PROMPT_TUNING folder (`prompt_embeddings` (P, H))."""
    return _save(model, folder, base_model_name_or_path, "PROMPT_TUNING", "prompt")


def save_ptuning(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """A PEFT P_TUNING folder: the prompt encoder's output (P, H) as `prompt_embeddings`, which is all PEFT saves
    (the encoder itself is a training-time reparameterisation)."""
    return _save(model, folder, base_model_name_or_path, "P_TUNING", "ptuning")


def _load(model: nn.Module, folder, peft_type: str) -> nn.Module:
    config, embeddings, file = read_peft_folder(folder, peft_type)
    hidden = model.model.embed_tokens.embedding_dim
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{file}: num_transformer_submodules={config['num_transformer_submodules']}, "
                           "camelid models are decoders (1)")
    if embeddings.shape[1] != hidden or config.get("token_dim", hidden) != hidden:
        raise AdapterError(f"{file}: soft tokens of size {embeddings.shape[1]}, this model's embeddings are {hidden}")
    prompt = SoftPrompt(embeddings.shape[0], hidden, peft_type, **_factory(model))
    with torch.no_grad():
        prompt.embedding.weight.copy_(embeddings)
    return _attach(model, prompt)


def load_prompt(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a PEFT PROMPT_TUNING folder (from `peft` or `save_prompt`): frozen base, trainable soft prompt."""
    return _load(model, folder, "PROMPT_TUNING")


def load_ptuning(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a PEFT P_TUNING folder (from `peft` or `save_ptuning`). As in PEFT, the file holds the encoded prompt,
    so the loaded soft prompt has no encoder; it stays trainable directly."""
    return _load(model, folder, "P_TUNING")

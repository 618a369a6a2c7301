"""The one LLaMA-family model: RMSNorm, RoPE (+ llama3 / linear / dynamic scaling), ALiBi, learned and sinusoidal
positions, GQA attention over SDPA, SwiGLU / GeGLU MLP, Mixtral MoE, a preallocated KV cache, and for inference
`stack_projections` (q/k/v and gate/up as one matmul each over one stacked weight).

Module names are exactly the Hugging Face ones (`model.layers.0.self_attn.q_proj`, `lm_head`, ...), so a state dict
is a HF checkpoint with no key map, and PEFT adapters address the same module names.
Shapes: B batch, T query tokens, S key tokens (cache included), H hidden, nh / nkv query / key-value heads, hd head dim.

The engine's hook (camelid/engine/paged_attention.py): `cache` may also be a paged cache, any object with an
`attend(layer_idx, q, k, v)` method. The engine packs the tokens of many sequences into one row (B = 1, T = all
scheduled tokens) with explicit `position_ids`; each Attention then hands its rotated q, k, v to `cache.attend`, which
stores k, v in the sequence's blocks and attends each token to its own sequence only. The forward builds no mask
then (the paged cache knows the sequence boundaries), and `logits_at` picks the rows that need logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from camelid.config import ModelConfig
from camelid.recompute import gated_linear, plain_linear, recomputed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recomputed(self._norm, x, self.weight)  # backward keeps x alone (see camelid/recompute.py)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes x * rsqrt(mean(x^2) + eps) in fp32 for half inputs and rounds once, as the references
        # do by hand (bit for bit on CPU); on CUDA it is one fused kernel instead of six elementwise ones and a
        # reduction (a decode step at batch 1 is mostly such small kernels). `.to` guards autocast, which may
        # return fp32 here; it is free when the dtype already matches.
        if self.plus_one:  # Gemma scales by (1 + w) in fp32, then casts
            return (F.rms_norm(x.float(), x.shape[-1:], eps=self.eps) * (1.0 + weight.float())).to(x.dtype)
        return weight * F.rms_norm(x, x.shape[-1:], eps=self.eps).to(x.dtype)  # LLaMA casts back, then scales


# ---- position encodings --------------------------------------------------------------------------------------

def rope_inv_freq(config: ModelConfig, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (hd/2,) with the config's rope scaling. `seq_len` only matters for "dynamic"."""
    dim, base = config.head_dim, config.rope_theta
    scaling = config.rope_scaling or {}
    kind, factor = scaling.get("rope_type", "default"), float(scaling.get("factor", 1.0))
    if kind == "dynamic":  # NTK-aware: grow the base once the sequence outruns the trained context
        trained = config.max_position_embeddings  # as transformers: an original_max_position_embeddings key is ignored
        seq_len = max(seq_len, trained)
        base = base * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if kind == "linear":  # position interpolation: positions / factor
        inv_freq = inv_freq / factor
    elif kind == "llama3":  # Llama 3.1: slow down low frequencies only, blend in the middle band
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen = old_ctx / scaling["low_freq_factor"]
        high_wavelen = old_ctx / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(middle, smoothed, scaled)
    return inv_freq


def rope_cos_sin(config: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, hd) for the given positions, computed in fp32 then cast (as transformers does)."""
    seq_len = int(position_ids.max()) + 1 if config.rope_scaling and config.rope_scaling["rope_type"] == "dynamic" else 0
    inv_freq = rope_inv_freq(config, seq_len, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd): the "rotate half" layout of HF checkpoints
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, n, T, hd) rotated by position; cos/sin (B, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022), with BLOOM's rule for head counts that are not a power of two."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes)


def sinusoidal_embedding(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...). Returns (B, T, dim) fp32."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
    angles = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


# ---- KV cache --------------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys and values for every layer, each (B, nkv, max_seq_len, hd). Slot i holds token i of the
    (left-padded) batch; attention masks handle padding and sliding windows, so nothing is ever rolled or moved."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.max_seq_len = max_seq_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hd) at slots start..start+T; return every key/value so far (B, nkv, S, hd)."""
        end = start + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} tokens, asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ---- stacked projections (inference) ---------------------------------------------------------------------------

class StackedLinears:
    """Linears that read the same input (q/k/v, gate/up) with their weights stacked in one tensor, each Linear's
    weight (and bias) a view into it: one matmul instead of several, in the same memory. Set up by
    `stack_projections` for inference engines; a forward uses it only without autograd and while every member is
    still a plain hook-free nn.Linear (an adapter wrapping one, a hook, training: the members run one by one)."""

    def __init__(self, linears: list[nn.Linear]):
        self.sizes = [m.out_features for m in linears]
        self.weight = torch.cat([m.weight.detach() for m in linears])  # (sum of outs, in)
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
        start = 0
        for m, n in zip(linears, self.sizes):  # the members become views: the old weights are freed
            m.weight = nn.Parameter(self.weight[start:start + n], requires_grad=m.weight.requires_grad)
            if has_bias:
                m.bias = nn.Parameter(self.bias[start:start + n], requires_grad=m.bias.requires_grad)
            start += n

    @staticmethod
    def can_stack(linears: list[nn.Module]) -> bool:
        if not all(plain_linear(m) for m in linears):
            return False
        first = linears[0].weight
        return all(m.weight.dtype == first.dtype and m.weight.device == first.device and
                   m.in_features == linears[0].in_features and
                   (m.bias is None) == (linears[0].bias is None) for m in linears)

    def usable(self, members: list[nn.Module]) -> bool:
        """No autograd, every member a plain Linear, and each member's weight still lives in the stack (a member
        given a new weight since, by `load_state_dict(assign=True)` or `.to()`, makes the members run one by one).
        That last check reads storage addresses, which torch.compile cannot trace: compiled, it is skipped (the
        engine stacks before it compiles and never swaps weights afterwards)."""
        if torch.is_grad_enabled() or not all(plain_linear(m) for m in members):
            return False
        if torch.compiler.is_compiling():
            return True
        storage = self.weight.untyped_storage().data_ptr()
        return all(m.weight.untyped_storage().data_ptr() == storage for m in members)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The members' outputs side by side: (..., sum of outs)."""
        return F.linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.joined(x).split(self.sizes, dim=-1))


def stack_projections(model: nn.Module) -> int:
    """Stack every block's q/k/v and gate/up weights (StackedLinears) for inference; returns how many groups were
    stacked. Projections that are quantized, wrapped or hooked are left alone. Values do not change; what changes
    is where the weights live, so call it on a model that serves (camelid.LLM does), not on one that trains."""
    stacked = 0
    for module in model.modules():
        if isinstance(module, Attention) and module.qkv is None:
            group = [module.q_proj, module.k_proj, module.v_proj]
            if StackedLinears.can_stack(group):
                module.qkv, stacked = StackedLinears(group), stacked + 1
        elif isinstance(module, GatedMLP) and module.gate_up is None:
            group = [module.gate_proj, module.up_proj]
            if StackedLinears.can_stack(group):
                module.gate_up, stacked = StackedLinears(group), stacked + 1
    return stacked


# ---- blocks ------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        self.qkv: StackedLinears | None = None  # stack_projections: one matmul for q, k, v at inference

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        members = [self.q_proj, self.k_proj, self.v_proj]
        if self.qkv is not None and self.qkv.usable(members):
            # one matmul, and q and k rotated together as nh + nkv heads (half the RoPE kernels of a decode step)
            heads = self.qkv.joined(x).view(B, T, self.nh + 2 * self.nkv, self.hd).transpose(1, 2)
            qk, v = heads.split([self.nh + self.nkv, self.nkv], dim=1)  # (B, nh + nkv, T, hd), (B, nkv, T, hd)
            if rope is not None:
                qk = apply_rope(qk, *rope)
            q, k = qk.split([self.nh, self.nkv], dim=1)
        else:
            q, k, v = (m(x) for m in members)
            q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
            k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
            v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
            if rope is not None:  # rotate q and k only, after the projections
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None and hasattr(cache, "attend"):  # the engine's paged KV cache: it owns masking
            y = cache.attend(self.layer_idx, q, k, v)  # (B, nh, T, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)  # (B, nkv, S, hd)
        gqa = self.nkv != self.nh
        if gqa and mask is not None:
            # flash kernels take GQA natively but not a mask; with a mask, expanding k/v keeps SDPA off the slow path
            k, v = k.repeat_interleave(self.nh // self.nkv, 1), v.repeat_interleave(self.nh // self.nkv, 1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


def _activation(name: str):
    return {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}[name]


class GatedMLP(nn.Module):
    """SwiGLU (LLaMA) or GeGLU-tanh (Gemma): down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.gate_up: StackedLinears | None = None  # stack_projections: one matmul for gate and up at inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        members = [self.gate_proj, self.up_proj]
        if self.gate_up is not None and self.gate_up.usable(members):
            gate, up = self.gate_up(x)
        else:
            gate, up = (m(x) for m in members)
        return gated_linear(self.act, gate, up, self.down_proj)  # keeps gate and up only (recompute.py)


class Expert(nn.Module):
    """One Mixtral expert; w1 / w3 / w2 are the checkpoint names of gate / up / down."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_linear(self.act, self.w1(x), self.w3(x), self.w2)


class SparseMoE(nn.Module):
    """Mixtral MoE: router softmax over all experts, keep the top-k, renormalise them to sum to 1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # the tokens routed to expert e, and which of their k picks it was
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        if config.num_local_experts:
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = GatedMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)

    def forward(self, x, rope, mask, is_causal, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache, start)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, blocks and the final norm: the `model.` prefix of every HF checkpoint key."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        if config.position_encoding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.checkpointed_layers: set[int] = set()
        if config.position_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads), persistent=False)
        self.apply(self._init_module)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def tie_weights(self) -> None:
        """Share the output projection with the input embeddings (Gemma, small Qwen2). Call again after anything
        that re-creates parameters, such as `to_empty`."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers after a model built on the meta device is materialised."""
        if self.config.position_encoding == "alibi":
            self.alibi_slopes = alibi_slopes(self.config.num_attention_heads).to(self.lm_head.weight.device)

    def set_activation_checkpointing(self, layers: bool | Iterable[int] = True) -> None:
        """Recompute the activations of these blocks (all when True) in backward instead of storing them."""
        n = self.config.num_hidden_layers
        self.checkpointed_layers = set(range(n)) if layers is True else set() if layers is False else set(layers)

    def forward(self, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int = 0, last_only: bool = False,
                logits_at: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with `last_only`, or (B, R, V) at the R token indices `logits_at`.
        `return_hidden`: the final-norm hidden states (B, T|1|R, H) instead, without lm_head (a fused loss applies
        it chunk by chunk: camelid/train/loss.py).

        input_ids (B, T), or input_embeds (B, T, H) instead (soft prompts). With a cache, these are slots
        start..start+T. attention_mask: (B, S) with 1 for real tokens and 0 for padding over every slot up to
        start+T, or a ready boolean mask (B, 1, T, S) that is used as is (packed documents). position_ids (B, T)
        default to the count of real tokens before each one, so left padding does not shift positions.
        """
        c = self.config
        x = self.model.embed_tokens(input_ids) if input_embeds is None else input_embeds  # (B, T, H)
        B, T, _ = x.shape
        S = start + T
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            if padding is not None:
                position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
            else:
                position_ids = torch.arange(start, S, device=x.device)[None]  # (1, T): RoPE tables broadcast over B

        if c.scale_embeddings:  # Gemma: the normaliser is rounded to the activation dtype, as in the reference
            x = x * torch.tensor(c.hidden_size**0.5, dtype=x.dtype)
        if c.position_encoding == "learned":
            x = x + self.model.embed_positions(position_ids)
        elif c.position_encoding == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, c.hidden_size).to(x.dtype)
        rope = rope_cos_sin(c, position_ids, x.dtype) if c.position_encoding == "rope" else None
        if hasattr(cache, "attend"):  # a paged cache masks by itself (see the module docstring)
            mask, is_causal = None, False
        else:
            mask, is_causal = self._attention_mask(attention_mask, T, start, x.device, x.dtype)

        for i, layer in enumerate(self.model.layers):
            if i in self.checkpointed_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, mask, is_causal, cache, start, use_reentrant=False)
            else:
                x = layer(x, rope, mask, is_causal, cache, start)
        if logits_at is not None:
            x = x[:, logits_at]  # (B, R, H): only the rows that are sampled, so the vocab matmul skips the rest
        x = self.model.norm(x[:, -1:] if last_only else x)
        return x if return_hidden else self.lm_head(x)

    def _attention_mask(self, attention_mask: torch.Tensor | None, T: int, start: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        """(mask for SDPA or None, is_causal). None + is_causal is the fast path (plain causal training batches)."""
        c = self.config
        S = start + T
        window = c.sliding_window if c.sliding_window is not None and S > c.sliding_window else None
        if attention_mask is not None and attention_mask.dim() == 4:
            allowed = attention_mask.bool()  # (B, 1, T, S)
        elif attention_mask is None and window is None and c.position_encoding != "alibi" and (start == 0 or T == 1):
            return None, T > 1  # a fresh causal batch, or one decode token that sees every key
        else:  # padding, windows, ALiBi, or a chunk of new tokens after a cached prefix
            q_slot = torch.arange(start, S, device=device)[:, None]  # (T, 1)
            k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
            allowed = k_slot <= q_slot
            if window is not None:
                allowed = allowed & (k_slot > q_slot - window)
            allowed = allowed[None, None]  # (1, 1, T, S)
            if attention_mask is not None:
                # padding keys are hidden; a padding query still sees itself so no row is all -inf (NaN in SDPA)
                allowed = (allowed & attention_mask[:, None, None, :S].bool()) | (k_slot == q_slot)
        if c.position_encoding != "alibi":
            return allowed, False
        distance = (torch.arange(S, device=device)[None, :] - torch.arange(start, S, device=device)[:, None])
        bias = self.alibi_slopes.to(device)[:, None, None] * distance.float()  # (nh, T, S), <= 0 in the past
        return bias.to(dtype).masked_fill(~allowed, float("-inf")), False  # (B or 1, nh, T, S)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                total += p.numel()
        return total

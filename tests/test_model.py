"""Transformer: logits parity with transformers for every architecture, KV cache == full forward, masks, ALiBi,
MoE routing, activation checkpointing, and the camelid-only position encodings training."""

import pytest
import torch
import torch.nn.functional as F

from camelid.checkpoint import from_pretrained
from camelid.model import KVCache, SparseMoE, Transformer, alibi_slopes, stack_projections
from model_zoo import (ARCH_CONFIGS, COMMON, NATIVE_CONFIGS, SLIDING_WINDOW, VOCAB, perturb_, random_model,
                      tiny_config)

ATOL = 1e-4  # fp32 logits, max abs difference vs transformers


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
        ids[row, :T - n] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def assert_real_close(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, atol: float = ATOL) -> None:
    """Compare logits at real-token positions only (what padding positions hold is unspecified)."""
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=atol, rtol=0)


# ---- parity with transformers ------------------------------------------------------------------------------------

@torch.no_grad()
def test_parity_left_padding(pair):
    hf, model = pair
    ids, mask = left_padded([12, 7, 3])  # 12 > the mistral window of 4
    pos = positions(mask)  # HF does not derive positions from the mask; camelid does
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert_real_close(model(ids, attention_mask=mask), ref, mask)
    assert_real_close(model(ids, attention_mask=mask, position_ids=pos), ref, mask)


@torch.no_grad()
def test_parity_right_padding(pair):
    hf, model = pair
    ids, mask = left_padded([12, 7, 3], seed=1)
    ids, mask = ids.flip(-1), mask.flip(-1)  # real tokens first, then padding
    pos = positions(mask)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert_real_close(model(ids, attention_mask=mask), ref, mask)


@torch.no_grad()
def test_parity_long_sequence(pair):
    """80 tokens: 20 sliding windows of 4 for mistral, past max_position_embeddings (64) for dynamic rope."""
    hf, model = pair
    assert model.config.max_position_embeddings < 80
    ids = torch.randint(3, VOCAB, (2, 80), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_dynamic_rope_ignores_original_max_position_embeddings(transformers, tmp_path):
    """transformers' dynamic NTK scales against max_position_embeddings even when rope_parameters carry an
    original_max_position_embeddings; camelid used the latter (logits off by ~2 at 80 tokens before the fix)."""
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**COMMON, rope_scaling=scaling)).eval()
    perturb_(hf, seed=0)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.config.rope_scaling["original_max_position_embeddings"] == 16
    for T in (20, 80):  # past the 16 of the key, then past max_position_embeddings (64)
        ids = torch.randint(3, VOCAB, (1, T), generator=torch.Generator().manual_seed(T))
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_config_read_from_hf_folder(pair, arch):
    hf, model = pair
    c = model.config
    hf_head_dim = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    assert (c.head_dim, c.num_key_value_heads) == (hf_head_dim, hf.config.num_key_value_heads)
    if arch == "mistral":
        assert c.sliding_window == SLIDING_WINDOW
    if arch in ("linear", "dynamic", "llama3"):
        assert c.rope_scaling["rope_type"] == arch
    if arch == "gemma":
        assert c.head_dim != c.hidden_size // c.num_attention_heads
        assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- KV cache ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(ARCH_CONFIGS))
def native(request) -> Transformer:
    return random_model(tiny_config(**ARCH_CONFIGS[request.param]))


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_cache_equals_full_forward(native, padded):
    """Prefill, then two chunks of new tokens after the cached prefix (chunked prefill), then one token at a time."""
    lengths = [16, 11] if padded else [16, 16]
    ids, mask = left_padded(lengths, seed=3)
    full = native(ids, attention_mask=mask if padded else None)
    cache = KVCache(native.config, batch_size=2, max_seq_len=16)
    pieces, start = [], 0
    for size in (6, 4, 3, 1, 1, 1):  # 6 + 4 + 3 > the mistral window of 4
        end = start + size
        step_mask = mask[:, :end] if padded else None
        pieces.append(native(ids[:, start:end], attention_mask=step_mask, cache=cache, start=start))
        start = end
    assert_real_close(torch.cat(pieces, dim=1), full, mask)


@torch.no_grad()
def test_cache_overflow_raises():
    model = random_model(tiny_config())
    cache = KVCache(model.config, batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.ones(1, 5, dtype=torch.long), cache=cache)


@torch.no_grad()
def test_last_only_and_input_embeds(native):
    ids, mask = left_padded([9, 5], seed=4)
    full = native(ids, attention_mask=mask)
    torch.testing.assert_close(native(ids, attention_mask=mask, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5)
    embeds = native.model.embed_tokens(ids)
    torch.testing.assert_close(native(input_embeds=embeds, attention_mask=mask), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_4d_mask_packs_documents(native):
    """Two documents packed into one row with a block-diagonal causal mask == each document on its own.
    A 4D mask is used as is, so it carries the sliding window too."""
    a, b = torch.randint(3, VOCAB, (1, 5)), torch.randint(3, VOCAB, (1, 7))
    T = 12
    doc = torch.tensor([0] * 5 + [1] * 7)
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    if native.config.sliding_window is not None:
        allowed &= torch.ones(T, T, dtype=torch.bool).triu(-(native.config.sliding_window - 1))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    packed = native(torch.cat([a, b], dim=1), attention_mask=allowed[None, None], position_ids=pos)
    torch.testing.assert_close(packed[:, :5], native(a), atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[:, 5:], native(b), atol=ATOL, rtol=0)


@torch.no_grad()
def test_sliding_window_limits_what_a_token_sees():
    """Two layers of window 4 see 2 * 3 tokens back: changing token 0 changes positions <= 6 only."""
    model = random_model(tiny_config(**ARCH_CONFIGS["mistral"]))
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % VOCAB
    diff = (model(ids) - model(changed)).abs().amax(-1)[0]  # (T,)
    reach = 2 * (SLIDING_WINDOW - 1)
    assert (diff[:reach + 1] > 0).all()
    assert (diff[reach + 1:] == 0).all()


@torch.no_grad()
def test_left_padding_does_not_change_logits(native):
    """A prompt left-padded in a batch gets the logits it gets alone (positions count real tokens only)."""
    ids, mask = left_padded([10, 6], seed=6)
    batched = native(ids, attention_mask=mask)
    alone = native(ids[1:, 4:])
    torch.testing.assert_close(batched[1:, 4:], alone, atol=ATOL, rtol=0)


# ---- ALiBi, learned and sinusoidal positions -------------------------------------------------------------------

@pytest.mark.parametrize("num_heads", [4, 8, 12, 6, 16])
def test_alibi_slopes_match_bloom(num_heads, transformers):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)  # (nh, 1, 2): slope * position
    torch.testing.assert_close(alibi_slopes(num_heads), alibi[:, 0, 1], atol=0, rtol=1e-6)


def test_alibi_bias_is_linear_in_distance():
    model = random_model(tiny_config(**NATIVE_CONFIGS["alibi"]))
    mask, is_causal = model._attention_mask(None, 5, 0, torch.device("cpu"), torch.float32)
    assert not is_causal and mask.shape == (1, 4, 5, 5)
    slopes = alibi_slopes(4)
    torch.testing.assert_close(mask[0, :, 4, 1], -3 * slopes)
    torch.testing.assert_close(mask[0, :, 4, 4], torch.zeros(4))
    assert torch.isinf(mask[0, :, 1, 4]).all()  # the future stays hidden  # the future stays hidden


@pytest.mark.parametrize("name", list(NATIVE_CONFIGS))
def test_native_position_encodings_train(name):
    """Forward is finite and a tiny repeated batch is learned (loss falls well below its start)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(**NATIVE_CONFIGS[name])).train()
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", list(NATIVE_CONFIGS))
@torch.no_grad()
def test_positions_matter(name):
    """Without positions, one causal layer is blind to the order of the prefix; each encoding must break that."""
    model = random_model(tiny_config(**NATIVE_CONFIGS[name], num_hidden_layers=1))
    ids = torch.tensor([[5, 9, 17, 33]])
    swapped = torch.tensor([[9, 5, 17, 33]])
    assert torch.equal(model(ids), model(ids))
    # sinusoidal positions move the nearly uniform attention of a random model only a little: 1e-6 is far above noise
    assert (model(ids)[0, -1] - model(swapped)[0, -1]).abs().max() > 1e-6


# ---- MoE ---------------------------------------------------------------------------------------------------------

def test_moe_routing_matches_reference():
    """softmax over all experts, top-k, renormalised to sum to 1, weighted sum of the chosen experts."""
    config = tiny_config(**ARCH_CONFIGS["mixtral"])
    torch.manual_seed(0)
    moe = SparseMoE(config)
    x = torch.randn(3, 5, config.hidden_size)
    with torch.no_grad():
        out = moe(x)
        flat = x.reshape(-1, config.hidden_size)
        probs = moe.gate(flat).softmax(-1)
        weights, chosen = probs.topk(config.num_experts_per_tok, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(flat)))
        ref = torch.stack([sum(w * moe.experts[int(e)](t) for w, e in zip(ws, es))
                           for t, ws, es in zip(flat, weights, chosen)])
    torch.testing.assert_close(out.reshape(-1, config.hidden_size), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_moe_weights_sum_to_one(top_k):
    """With every expert identical, any routing that sums to 1 returns exactly that expert's output."""
    config = tiny_config(model_type="mixtral", num_local_experts=4, num_experts_per_tok=top_k)
    torch.manual_seed(0)
    moe = SparseMoE(config)
    with torch.no_grad():
        for expert in moe.experts[1:]:
            expert.load_state_dict(moe.experts[0].state_dict())
        x = torch.randn(2, 7, config.hidden_size)
        torch.testing.assert_close(moe(x), moe.experts[0](x), atol=1e-6, rtol=1e-5)


# ---- activation checkpointing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "mixtral", "gemma", "alibi"])
def test_activation_checkpointing_same_gradients(name):
    model = random_model(tiny_config(**ARCH_CONFIGS[name])).train()
    ids, mask = left_padded([12, 8], seed=8)

    def grads():
        model.zero_grad()
        logits = model(ids, attention_mask=mask)
        F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_activation_checkpointing(True)
    assert model.checkpointed_layers == {0, 1}
    checkpointed = grads()
    model.set_activation_checkpointing([1])
    assert model.checkpointed_layers == {1}
    partial = grads()
    model.set_activation_checkpointing(False)
    assert model.checkpointed_layers == set()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-7, rtol=1e-6, msg=n)
        torch.testing.assert_close(partial[n], plain[n], atol=1e-7, rtol=1e-6, msg=n)


def test_tied_embeddings_share_one_tensor():
    model = Transformer(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert Transformer(tiny_config()).lm_head.weight is not Transformer(tiny_config()).model.embed_tokens.weight


# ---- stacked projections (inference) ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "mixtral"])
def test_stacked_projections_give_the_same_logits_in_the_same_memory(name):
    """q/k/v and gate/up as one matmul each (biases too, Qwen2); the members become views of the stack, so the
    parameters take no more memory than before, and the logits are those of the separate matmuls."""
    model = random_model(tiny_config(**ARCH_CONFIGS[name])).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        before = model(ids)
    storages = lambda: {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()  # noqa: E731
                        for p in model.parameters()}
    nbytes = sum(storages().values())
    groups = stack_projections(model)
    layers = model.config.num_hidden_layers
    assert groups == (layers if name == "mixtral" else 2 * layers)  # Mixtral's experts are not a GatedMLP
    assert sum(storages().values()) == nbytes
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-6)
    assert stack_projections(model) == 0  # once is enough


def test_stacked_projections_step_aside_for_training_hooks_and_new_weights():
    """With autograd on, the members run (their weights get gradients); a hook on a member, or a member given a
    new weight, also makes them run one by one, so no effect is skipped and nothing stale is read."""
    model = random_model(tiny_config()).eval()
    reference = random_model(tiny_config()).eval()
    reference.load_state_dict(model.state_dict())
    stack_projections(model)
    ids = torch.randint(0, VOCAB, (1, 7))
    model(ids).sum().backward()
    reference(ids).sum().backward()
    attn, ref_attn = model.model.layers[0].self_attn, reference.model.layers[0].self_attn
    torch.testing.assert_close(attn.k_proj.weight.grad, ref_attn.k_proj.weight.grad)

    def halve(module, args, out):
        return out * 0.5
    for m in (attn, ref_attn):
        m.v_proj.register_forward_hook(halve)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids))
    mlp, ref_mlp = model.model.layers[1].mlp, reference.model.layers[1].mlp
    new = torch.randn_like(mlp.up_proj.weight)
    mlp.up_proj.weight, ref_mlp.up_proj.weight = torch.nn.Parameter(new), torch.nn.Parameter(new.clone())
    assert not mlp.gate_up.usable([mlp.gate_proj, mlp.up_proj])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids))


def test_quantized_or_wrapped_projections_are_not_stacked():
    from camelid.peft.lora import apply_lora
    model = random_model(tiny_config())
    apply_lora(model, r=2, target_modules=["q_proj", "up_proj"])
    assert stack_projections(model) == 0

"""Prefix tuning / P-Tuning v2, checked against the real `peft` library on a tiny random Llama (GQA: 4 query heads,
2 key/value heads), both directions, with and without the reparameterisation MLP; padding, packed documents,
activation checkpointing, greedy generation against transformers+peft, and training through the loop.

PEFT's layout (PeftModelForCausalLM): the prefix goes in as past_key_values, so its output has one row per real
token, (B, T, V), the same as camelid's; real tokens sit at positions P.. (PEFT adds P to given position_ids)."""

from __future__ import annotations

import json

import pytest
import torch
from model_zoo import NATIVE_CONFIGS, random_model, tiny_config
from vt_helpers import (LENGTHS, TOKENS, P, InstructionBatches, default_positions, hf_model, logits, mean,
                        padded, randomize_, train_config)

from camelid.checkpoint import from_pretrained
from camelid.generate import generate_ids
from camelid.peft import count_parameters
from camelid.peft.adapter_io import AdapterError
from camelid.peft.prefix import (apply_prefix, apply_ptuning_v2, has_prefix, load_prefix, prefix_state_dict,
                                 save_prefix)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
# llama: GQA; gemma: head_dim != hidden / heads, sqrt(H)-scaled embeddings, tied lm_head
ARCHS = ["llama", "gemma"]
VARIANTS = {"plain": {}, "projection": dict(prefix_projection=True, encoder_hidden_size=24)}


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(hf_checkpoint):
    return hf_checkpoint("llama")


def peft_model(peft, transformers, base, variant: str, seed: int = 3):
    """get_peft_model with a prefix of non-trivial random values (PEFT's own init, then noise)."""
    torch.manual_seed(seed)
    v = VARIANTS[variant]
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                     prefix_projection=v.get("prefix_projection", False),
                                     encoder_hidden_size=v.get("encoder_hidden_size"))
    model = peft.get_peft_model(hf_model(transformers, base), config)
    randomize_(model.prompt_encoder, seed)
    return model.eval()


def hf_logits(model, ids=TOKENS, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_camelid_prefix_loads_in_peft(variant, arch, hf_checkpoint, transformers, peft, tmp_path):
    base = hf_checkpoint(arch)
    torch.manual_seed(0)
    model = apply_prefix(from_pretrained(base), num_virtual_tokens=P, **VARIANTS[variant]).eval()
    ours = logits(model)
    assert (ours - logits(from_pretrained(base))).abs().max() > 0.5  # the prefix changes the output
    folder = save_prefix(model, tmp_path / "prefix", base_model_name_or_path=str(base))
    config = json.loads((folder / "adapter_config.json").read_text())
    c = model.config
    assert config["peft_type"] == "PREFIX_TUNING"
    assert config["token_dim"] == c.num_key_value_heads * c.head_dim  # PEFT's GQA rule: key/value heads only
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    reference = peft.PeftModel.from_pretrained(hf_model(transformers, base), folder).eval()
    theirs = hf_logits(reference)
    assert theirs.shape == ours.shape  # (B, T, V): past_key_values add no output rows
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_prefix_loads_in_camelid(variant, arch, hf_checkpoint, transformers, peft, tmp_path):
    base = hf_checkpoint(arch)
    reference = peft_model(peft, transformers, base, variant)
    theirs = hf_logits(reference)
    reference.save_pretrained(tmp_path / "peft")
    model = load_prefix(from_pretrained(base), tmp_path / "peft").eval()
    assert has_prefix(model)
    torch.testing.assert_close(logits(model), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_parameters_match_peft(variant, base, transformers, peft):
    reference = peft_model(peft, transformers, base, variant)
    model = apply_prefix(from_pretrained(base), num_virtual_tokens=P, **VARIANTS[variant])
    assert count_parameters(model) == reference.get_nb_trainable_parameters()
    assert sum(v.numel() for v in prefix_state_dict(model).values()) == count_parameters(model)[0]
    assert all(k.startswith("prefix_encoder.") for k in prefix_state_dict(model))
    model(TOKENS).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("prefix_encoder."), name


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_peft_and_unpadded_rows(side, base, transformers, peft, tmp_path):
    """A 2D padding mask: real-token logits equal PEFT's on the same padded batch (given camelid's default
    positions, which PEFT shifts by P as camelid does), and equal the short row run alone without padding."""
    reference = peft_model(peft, transformers, base, "plain")
    reference.save_pretrained(tmp_path / "peft")
    model = load_prefix(from_pretrained(base), tmp_path / "peft").eval()
    ids, mask = padded(side)
    ours = logits(model, ids, attention_mask=mask)
    theirs = hf_logits(reference, ids, attention_mask=mask, position_ids=default_positions(mask))
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-4)
    alone = logits(model, TOKENS[1:, :LENGTHS[1]])[0]
    torch.testing.assert_close(ours[1][real[1]], alone, rtol=0, atol=1e-4)


def test_packed_documents_each_see_the_prefix(base):
    """A 4D block-diagonal mask with per-document positions (SFT packing) = each document run alone."""
    torch.manual_seed(0)
    model = apply_prefix(from_pretrained(base), num_virtual_tokens=P).eval()
    a, b = TOKENS[0, :5], TOKENS[1, :7]
    ids = torch.cat((a, b))[None]  # (1, 12)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril())[None, None]
    positions = torch.cat((torch.arange(5), torch.arange(7)))[None]
    packed = logits(model, ids, attention_mask=mask, position_ids=positions)[0]
    torch.testing.assert_close(packed[:5], logits(model, a[None])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[5:], logits(model, b[None])[0], rtol=0, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(base):
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = apply_prefix(from_pretrained(base), num_virtual_tokens=P, prefix_projection=True)
        model.set_activation_checkpointing(checkpointed)
        model(TOKENS).float().pow(2).mean().backward()
        grads.append([p.grad for p in model.prefix_encoder.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_greedy_generation_matches_peft_generate(base, transformers, peft, tmp_path):
    """camelid.generate_ids (KV cache, `start`, left padding) with a prefix = transformers+peft greedy generate."""
    reference = peft_model(peft, transformers, base, "plain")
    reference.save_pretrained(tmp_path / "peft")
    model = load_prefix(from_pretrained(base), tmp_path / "peft").eval()
    prompts = [TOKENS[0, :8].tolist(), TOKENS[1, :5].tolist()]
    ours = generate_ids(model, prompts, max_new_tokens=10)
    ids, mask = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as camelid lays out a batch
        ids[row, 8 - len(prompt):], mask[row, 8 - len(prompt):] = torch.tensor(prompt), 1
    with torch.no_grad():
        out = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                                 do_sample=False, pad_token_id=0)
    assert ours == out[:, 8:].tolist()
    assert ours != generate_ids(from_pretrained(base), prompts, max_new_tokens=10)  # the prefix matters


def test_prefix_trains_through_the_loop(base, tmp_path):
    from camelid.train.loop import train

    torch.manual_seed(0)
    model = apply_ptuning_v2(from_pretrained(base), num_virtual_tokens=4, prefix_projection=True, init="zero")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(train_config(tmp_path / "run"), model=model, batches=InstructionBatches())
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert mean(losses[-5:]) < 0.6 * mean(losses[:5]), losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_prefix_is_checkpointed_and_resumes_exactly(base, tmp_path):
    """The prefix lives in the model's state dict, so the loop's checkpoints carry it: a run stopped after its
    step-5 checkpoint and resumed ends where the uninterrupted run ends."""
    from camelid.train.loop import train

    def crash_at_7(step, loss):
        if step == 7:
            raise RuntimeError("stop")
        return loss

    def run(out, loss_hook=None, **kw):
        torch.manual_seed(0)
        model = apply_prefix(from_pretrained(base), num_virtual_tokens=P, prefix_projection=True)
        result = train(train_config(out, max_steps=10, save_every=5, **kw), model=model,
                       batches=InstructionBatches(), loss_hook=loss_hook)
        return result, model

    full, full_model = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="stop"):
        run(tmp_path / "cut", loss_hook=crash_at_7)
    resumed, resumed_model = run(tmp_path / "cut", resume=True)
    assert resumed.losses[10] == full.losses[10]
    for a, b in zip(full_model.prefix_encoder.parameters(), resumed_model.prefix_encoder.parameters()):
        assert torch.equal(a, b)


def test_bad_options_and_folders(base, tmp_path):
    learned = apply_prefix(random_model(tiny_config(**NATIVE_CONFIGS["learned"])), num_virtual_tokens=P)
    learned(TOKENS)  # 12 + P positions fit the table of 64
    with pytest.raises(ValueError, match="learned position table"):
        learned(torch.zeros(1, 64 - P + 1, dtype=torch.long))
    model = from_pretrained(base)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        apply_prefix(model, num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init"):
        apply_prefix(model, num_virtual_tokens=2, init="xavier")
    with pytest.raises(ValueError, match="no prefix"):
        save_prefix(model, tmp_path / "none")
    with pytest.raises(FileNotFoundError):
        load_prefix(model, tmp_path / "missing")
    apply_prefix(model, num_virtual_tokens=2)
    with pytest.raises(ValueError, match="twice"):
        apply_prefix(model, num_virtual_tokens=2)
    folder = save_prefix(model, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 5}))
    with pytest.raises(AdapterError, match="num_layers"):
        load_prefix(from_pretrained(base), folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="peft_type"):
        load_prefix(from_pretrained(base), folder)

"""Prompt tuning and P-tuning (MLP and LSTM prompt encoders), checked against the real `peft` library on a tiny
random Llama, both directions; text / vocabulary init, padding, packed documents, greedy generation against
transformers+peft, and training through the loop.

PEFT's layout (PeftModelForCausalLM): the soft tokens are prepended to inputs_embeds, so its logits have P extra
rows in front, (B, P + T, V); its logits[:, P:] are camelid's (B, T, V)."""

from __future__ import annotations

import json

import pytest
import torch
from model_zoo import COMMON, NATIVE_CONFIGS, random_model, tiny_config
from vt_helpers import (LENGTHS, TOKENS, P, InstructionBatches, hf_model, logits, mean, padded, randomize_,
                        train_config)

from camelid.checkpoint import from_pretrained
from camelid.generate import generate_ids
from camelid.peft import count_parameters
from camelid.peft.adapter_io import AdapterError
from camelid.peft.prompt import (apply_prompt, apply_ptuning, has_prompt, has_ptuning, load_prompt, load_ptuning,
                                 prompt_state_dict, ptuning_state_dict, save_prompt, save_ptuning)
from camelid.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
# llama: GQA; gemma: head_dim != hidden / heads, sqrt(H)-scaled embeddings, tied lm_head
ARCHS = ["llama", "gemma"]
# method -> (camelid apply, save, load, has, its options)
METHODS = {
    "prompt": (apply_prompt, save_prompt, load_prompt, has_prompt, {}),
    "ptuning-mlp": (apply_ptuning, save_ptuning, load_ptuning, has_ptuning, dict(encoder_hidden_size=24)),
    "ptuning-lstm": (apply_ptuning, save_ptuning, load_ptuning, has_ptuning,
                     dict(encoder_type="LSTM", encoder_hidden_size=24)),
}


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(hf_checkpoint):
    return hf_checkpoint("llama")


def peft_config(peft, method: str, **extra):
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **extra)
    encoder = "LSTM" if method.endswith("lstm") else "MLP"
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=24,
                                    encoder_reparameterization_type=encoder, **extra)


def peft_model(peft, transformers, base, method: str, seed: int = 3):
    """get_peft_model, then noise on every prompt-encoder parameter (non-trivial random values)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf_model(transformers, base), peft_config(peft, method))
    randomize_(model.prompt_encoder, seed, std=0.3)
    return model.eval()


def hf_logits(model, ids=TOKENS, **kw) -> torch.Tensor:
    """PEFT's logits on the real-token rows (its first P rows belong to the soft tokens)."""
    with torch.no_grad():
        out = model(input_ids=ids, **kw).logits
    assert out.shape[1] == ids.shape[1] + P
    return out[:, P:]


def camelid_model(base, method: str, seed: int = 0):
    apply, _, _, _, options = METHODS[method]
    torch.manual_seed(seed)
    return apply(from_pretrained(base), num_virtual_tokens=P, **options).eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_camelid_prompt_loads_in_peft(method, arch, hf_checkpoint, transformers, peft, tmp_path):
    base = hf_checkpoint(arch)
    model = camelid_model(base, method)
    _, save, _, has, _ = METHODS[method]
    assert has(model)
    ours = logits(model)
    assert ours.shape == (*TOKENS.shape, 128)
    assert (ours - logits(from_pretrained(base))).abs().max() > 0.5  # the soft prompt changes the output
    folder = save(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if method == "prompt" else "P_TUNING")
    reference = peft.PeftModel.from_pretrained(hf_model(transformers, base), folder).eval()
    torch.testing.assert_close(ours, hf_logits(reference), rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_prompt_loads_in_camelid(method, arch, hf_checkpoint, transformers, peft, tmp_path):
    base = hf_checkpoint(arch)
    reference = peft_model(peft, transformers, base, method)
    theirs = hf_logits(reference)
    reference.save_pretrained(tmp_path / "peft")
    _, _, load, has, _ = METHODS[method]
    model = load(from_pretrained(base), tmp_path / "peft").eval()
    assert has(model)
    torch.testing.assert_close(logits(model), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_match_peft(method, base, transformers, peft):
    reference = peft_model(peft, transformers, base, method)
    model = camelid_model(base, method)
    assert count_parameters(model) == reference.get_nb_trainable_parameters()
    state = (prompt_state_dict if method == "prompt" else ptuning_state_dict)(model)
    assert sum(v.numel() for v in state.values()) == count_parameters(model)[0]
    # PEFT's module names under prompt_encoder.default. are ours under prompt_encoder.
    peft_names = {n.replace("prompt_encoder.default.", "prompt_encoder.")
                  for n, p in reference.named_parameters() if p.requires_grad}
    assert set(state) == peft_names
    model(TOKENS).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("prompt_encoder."), name


def test_right_padding_matches_peft_and_left_padding_matches_unpadded_rows(base, transformers, peft, tmp_path):
    """Right padding: PEFT's positions (slots) equal camelid's (real tokens before), so the batches agree.
    Left padding: PEFT drops position_ids for prompt tuning and counts pad slots as positions; camelid keeps
    positions as "real tokens before", so a left-padded row equals the same row run alone (checked here)."""
    reference = peft_model(peft, transformers, base, "prompt")
    reference.save_pretrained(tmp_path / "peft")
    model = load_prompt(from_pretrained(base), tmp_path / "peft").eval()
    alone = logits(model, TOKENS[1:, :LENGTHS[1]])[0]
    for side in ("right", "left"):
        ids, mask = padded(side)
        ours = logits(model, ids, attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(ours[1][real[1]], alone, rtol=0, atol=1e-4)
        if side == "right":
            theirs = hf_logits(reference, ids, attention_mask=mask)
            torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-4)


def test_packed_documents_each_see_the_soft_prompt(base):
    model = camelid_model(base, "ptuning-mlp")
    a, b = TOKENS[0, :5], TOKENS[1, :7]
    ids = torch.cat((a, b))[None]  # (1, 12)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril())[None, None]
    positions = torch.cat((torch.arange(5), torch.arange(7)))[None]
    packed = logits(model, ids, attention_mask=mask, position_ids=positions)[0]
    torch.testing.assert_close(packed[:5], logits(model, a[None])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[5:], logits(model, b[None])[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp"])
def test_greedy_generation_matches_peft_generate(method, base, transformers, peft, tmp_path):
    """camelid.generate_ids (the hook grows its KV cache by P slots at the prefill) = transformers+peft greedy
    generate. Prompts of equal length: with left padding PEFT's prompt-tuning positions count the pad slots."""
    reference = peft_model(peft, transformers, base, method)
    reference.save_pretrained(tmp_path / "peft")
    _, _, load, _, _ = METHODS[method]
    model = load(from_pretrained(base), tmp_path / "peft").eval()
    prompts = [TOKENS[0, :8].tolist(), TOKENS[1, :8].tolist()]
    ours = generate_ids(model, prompts, max_new_tokens=10)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(prompts), attention_mask=torch.ones(2, 8, dtype=torch.long),
                                 max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert ours == out[:, 8:].tolist()
    assert ours != generate_ids(from_pretrained(base), prompts, max_new_tokens=10)  # the soft prompt matters
    # a left-padded batch: each row generates what it generates alone
    short = TOKENS[1, :5].tolist()
    assert generate_ids(model, [prompts[0], short], max_new_tokens=6)[1] == generate_ids(model, [short], 6)[0]


def test_text_and_vocab_init_match_peft(transformers, peft, tmp_path):
    """init="text": the embeddings of the init text's tokens, repeated / cut to P, exactly as PEFT's TEXT init
    (which reads the same tokenizer folder through AutoTokenizer); init="vocab": rows of the embedding table."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Classify the sentiment of this review as positive or negative. " * 50)
    tokenizer = Tokenizer.train([corpus], 300, show_progress=False)
    tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**COMMON, "vocab_size": 320}))
    hf.save_pretrained(tmp_path / "base")
    for text, count in (("Classify the sentiment", 7), ("Classify the sentiment of this review", 2)):
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=count, prompt_tuning_init="TEXT",
                                         prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path / "tok"))
        reference = peft.get_peft_model(hf_model(transformers, tmp_path / "base"), config)
        model = apply_prompt(from_pretrained(tmp_path / "base"), num_virtual_tokens=count, init_text=text,
                             tokenizer=tokenizer)  # init="text" is implied by init_text
        torch.testing.assert_close(model.prompt_encoder.embedding.weight,
                                   reference.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    model = apply_prompt(from_pretrained(tmp_path / "base"), num_virtual_tokens=4, init="vocab",
                         generator=torch.Generator().manual_seed(0))
    table = model.model.embed_tokens.weight
    for row in model.prompt_encoder.embedding.weight:
        assert (table == row).all(-1).any()


@pytest.mark.parametrize("method, lr", [("prompt", 0.3), ("ptuning-mlp", 0.03), ("ptuning-lstm", 0.03)])
def test_method_trains_through_the_loop(method, lr, base, tmp_path):
    """30 steps on the synthetic instruction task, only the soft prompt training: the loss falls clearly
    (prompt tuning wants a large learning rate, as in Lester et al.; a frozen tiny random model is a weak
    substrate, so the bar is a 30% drop, measured ~40-50%)."""
    from camelid.train.loop import train

    apply, _, _, _, options = METHODS[method]
    torch.manual_seed(0)
    model = apply(from_pretrained(base), num_virtual_tokens=8, **options)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(train_config(tmp_path / "run", lr=lr), model=model, batches=InstructionBatches())
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5]), losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_bad_options_and_folders(base, tmp_path):
    learned = apply_prompt(random_model(tiny_config(**NATIVE_CONFIGS["learned"])), num_virtual_tokens=P)
    learned(TOKENS)  # 12 + P positions fit the table of 64
    with pytest.raises(ValueError, match="learned position table"):
        learned(torch.zeros(1, 64 - P + 1, dtype=torch.long))
    model = from_pretrained(base)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        apply_prompt(model, num_virtual_tokens=0)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        apply_ptuning(model, num_virtual_tokens=-2)
    with pytest.raises(ValueError, match="encoder_type"):
        apply_ptuning(model, num_virtual_tokens=2, encoder_type="GRU")
    with pytest.raises(ValueError, match="init"):
        apply_prompt(model, num_virtual_tokens=2, init="zeros")
    with pytest.raises(ValueError, match="tokenizer"):
        apply_prompt(model, num_virtual_tokens=2, init="text", init_text="hi")
    with pytest.raises(ValueError, match="init_text"):
        apply_prompt(model, num_virtual_tokens=2, init="vocab", init_text="hi")
    with pytest.raises(ValueError, match="no prompt"):
        save_prompt(model, tmp_path / "none")
    apply_prompt(model, num_virtual_tokens=2)
    with pytest.raises(ValueError, match="twice"):
        apply_ptuning(model, num_virtual_tokens=2)
    with pytest.raises(ValueError, match="no ptuning"):
        save_ptuning(model, tmp_path / "none")  # a prompt-tuning model is not a P-tuning one
    folder = save_prompt(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="peft_type"):
        load_ptuning(from_pretrained(base), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 5}))
    with pytest.raises(AdapterError, match="virtual tokens"):
        load_prompt(from_pretrained(base), folder)
    with pytest.raises(FileNotFoundError):
        load_prompt(from_pretrained(base), tmp_path / "missing")


def test_a_reused_kv_cache_grows_by_p_once(base):
    """camelid.generate-style calls (prefill at start 0, then one token) on one KVCache, three times over: the
    hook adds the P soft-token slots the first time only, and every round computes the same logits."""
    from camelid.model import KVCache

    model = apply_prompt(from_pretrained(base), num_virtual_tokens=P)
    randomize_(model.prompt_encoder, 1, std=0.3)
    ids = TOKENS[:1, :6]
    cache = KVCache(model.config, 1, 8)
    rounds = []
    with torch.no_grad():
        for _ in range(3):
            prefill = model(ids, cache=cache, start=0, last_only=True)
            step = model(ids[:, :1], cache=cache, start=6, last_only=True)
            assert cache.max_seq_len == 8 + P
            rounds.append(torch.cat((prefill, step), dim=1))
    torch.testing.assert_close(rounds[1], rounds[0], rtol=0, atol=0)
    torch.testing.assert_close(rounds[2], rounds[0], rtol=0, atol=0)

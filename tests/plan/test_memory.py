from __future__ import annotations

import pytest
import torch

from camelid import recompute
from camelid.config import get_preset, num_parameters
from camelid.model import Transformer
from camelid.peft.bitfit import apply_bitfit
from camelid.peft.lora import apply_lora
from camelid.train.compile import compile_for_training
from camelid.plan.memory import (NF4_BLOCK, activation_bytes_per_token_layer, estimate, num_param_tensors,
                                 quantized_params, trainable_params)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(autouse=True)
def inputs_only_on_cpu(monkeypatch):
    """The planner models the GPU, where RMSNorm and the gate product keep only their inputs (camelid/recompute.py):
    these CPU tests measure that path."""
    monkeypatch.setattr(recompute, "KEEP_INPUTS_ON_CPU", True)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = get_preset("tiny")
    model = Transformer(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return config, model


def test_full_weights_and_gradients_match_the_real_tensors(tiny):
    config, model = tiny
    est = estimate(config, "full", seq=16, batch=2, precision="fp32")
    assert num_parameters(config) == sum(p.numel() for p in model.parameters())
    assert est.terms["weights"] == _bytes(model.parameters())
    assert est.terms["gradients"] == _bytes(p.grad for p in model.parameters())
    assert est.terms["autocast_weight_copies"] == 0  # fp32: autocast is off


@pytest.mark.parametrize("optimizer, make", [
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)),
])
def test_optimizer_state_matches_a_real_optimizer_after_one_step(tiny, optimizer, make):
    config, model = tiny
    opt = make(list(model.parameters()))
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert len(opt.state) == num_param_tensors(config)
    assert estimate(config, "full", optimizer=optimizer).terms["optimizer"] == _bytes(state)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizers_keep_two_bytes_and_a_scale_per_256_values(optimizer):
    """torchao's AdamW8bit and bitsandbytes' PagedAdamW8bit (the two `--optimizer`s training takes) both keep two
    uint8 moments and one fp32 scale per block of 256 values of each."""
    from torchao.optim.subclass_8bit import OptimState8bit

    state = OptimState8bit.zeros((4096,), signed=True, block_size=256)
    per_value = (state.codes.numel() * state.codes.element_size() + state.scale.numel() * 4) / 4096
    est = estimate(get_preset("tiny"), "lora", optimizer=optimizer)
    assert est.terms["optimizer"] == pytest.approx(2 * per_value * est.trainable)


def test_every_training_optimizer_can_be_planned():
    """`--auto` hands the training config's optimizer to the planner: each one must be known there."""
    from camelid.train.config import OPTIMIZERS as TRAINING_OPTIMIZERS

    for optimizer in TRAINING_OPTIMIZERS:
        estimate(get_preset("tiny"), "qlora", optimizer=optimizer)


def test_trainable_counts_by_hand():
    c = get_preset("llama-2-7b")  # h = q = kv = 4096, i = 11008, 32 layers
    assert trainable_params(c, "lora") == 32 * 2 * 8 * (4096 + 4096)  # r=8 on q and v: 4,194,304
    assert trainable_params(c, "lora", lora_targets="all") == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))
    assert trainable_params(c, "dora") == 32 * 2 * (8 * 8192 + 4096)
    assert trainable_params(c, "prompt") == 20 * 4096
    assert trainable_params(c, "prefix") == 32 * 2 * 4096 * 20
    assert trainable_params(c, "ia3") == 32 * (2 * 4096 + 11008)


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True}, {"num_local_experts": 4, "num_experts_per_tok": 2}])
def test_bitfit_counts_the_biases_it_trains(overrides):
    """BitFit adds zero biases where LLaMA has none (camelid/peft/bitfit.py), so it trains on every model."""
    config = get_preset("tiny").replace(**overrides)
    model = apply_bitfit(Transformer(config))
    assert trainable_params(config, "bitfit") == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate(config, "bitfit").terms["gradients"] == 4 * trainable_params(config, "bitfit")


def test_qlora_weights_are_nf4_plus_double_quant_constants():
    c = get_preset("llama-2-7b")
    q = quantized_params(c)
    assert q == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    w = estimate(c, "qlora").terms["weights"]
    # 0.5 B per weight + 1 B absmax per 64 + 4 B per 256 absmaxes; embeddings + lm_head + norms in bf16; LoRA fp32
    assert w == pytest.approx(q * (0.5 + 1 / NF4_BLOCK + 4 / (64 * 256)) + 2 * (num_parameters(c) - q) + 4 * 4194304)


def test_checkpointing_and_sharding_reduce_the_right_terms():
    c = get_preset("llama-2-7b")
    plain, ckpt = estimate(c, "lora", seq=1024), estimate(c, "lora", seq=1024, checkpointing=True)
    assert ckpt.terms["activations"] < plain.terms["activations"] / 5
    assert ckpt.terms["weights"] == plain.terms["weights"]
    one, four = estimate(c, "full"), estimate(c, "full", gpus=4, strategy="zero3")
    for term in ("weights", "gradients", "optimizer"):
        assert four.terms[term] == pytest.approx(one.terms[term] / 4)
    z1 = estimate(c, "full", gpus=4, strategy="zero1")
    assert z1.terms["weights"] == one.terms["weights"]
    assert z1.terms["optimizer"] == pytest.approx(one.terms["optimizer"] / 4)


def test_inference_kv_cache():
    c = get_preset("llama-3-8b")  # 32 layers, 8 KV heads x 128 = 1024
    est = estimate(c, "inference", seq=128, batch=4, kv_context=8192)
    assert est.terms["kv_cache"] == 2 * 32 * 1024 * 8192 * 4 * 2
    assert "gradients" not in est.terms


@pytest.mark.parametrize("kw, needle", [
    ({"method": "sft"}, "unknown method"),
    ({"seq": 0}, "--seq must be a positive"),
    ({"batch": -1}, "--batch must be a positive"),
    ({"method": "lora", "kv_context": 4096}, "--kv-context is for --method inference"),
    ({"method": "inference", "checkpointing": True}, "--checkpointing is for training"),
    ({"optimizer": "adam"}, "unknown optimizer"),
    # llama-2-7b has 4096 positions, and `camelid pretrain` / `finetune` refuse a longer seq_len
    ({"seq": 8192}, "positions end at 4096"),
    ({"method": "inference", "seq": 512, "kv_context": 5000}, "positions end at 4096"),
])
def test_bad_input_is_one_clear_error(kw, needle):
    with pytest.raises(ValueError, match=needle):
        estimate(get_preset("llama-2-7b"), **kw)


def _saved_bytes_per_layer(method: str, dtype: torch.dtype = torch.float32, compiled: bool = False) -> float:
    """Bytes autograd saves for one block per token: a 2-layer minus a 1-layer tiny model (CPU). `compiled`: under
    camelid's torch.compile for training, whose compiled graph saves through the same hooks."""
    totals = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = Transformer(get_preset("tiny").replace(num_hidden_layers=layers)).to(dtype)
        if method == "lora":
            apply_lora(model, r=4, target_modules="all-linear", compute_dtype=None)
            model.to(dtype)
        forward = compile_for_training(model) if compiled else model
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):  # count each storage once (views share it), parameters not at all
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        embeds = torch.randn(2, 32, 64, dtype=dtype)
        if method == "prompt":  # frozen model, gradient flows to the input embeddings
            model.requires_grad_(False)
            embeds.requires_grad_(True)
        if compiled:
            forward(input_embeds=embeds)  # compiles; the measured call below reuses it
            seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(input_embeds=embeds)
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / (2 * 32)


@pytest.mark.parametrize("method, dtype", [("full", torch.float32), ("prompt", torch.float32),
                                           ("full", torch.bfloat16), ("prompt", torch.bfloat16),
                                           ("lora", torch.bfloat16)])
def test_activation_formula_matches_autograd_saved_tensors(method, dtype):
    """Exactly the bytes autograd keeps, fp32 and bf16 (bf16 weights: bf16-true training, or a frozen bf16 base)."""
    b = torch.empty((), dtype=dtype).element_size()
    per_token, _ = activation_bytes_per_token_layer(get_preset("tiny"), method, b=b, lora_targets="all", lora_r=4)
    assert per_token == _saved_bytes_per_layer(method, dtype)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_activation_formula_matches_the_compiled_graph(method):
    """Under torch.compile with camelid's budget (bf16): the norm outputs and down_proj's input are no longer kept."""
    tiny = get_preset("tiny")
    per_token, _ = activation_bytes_per_token_layer(tiny, method, b=2, lora_targets="all", compiled=True, lora_r=4)
    eager, _ = activation_bytes_per_token_layer(tiny, method, b=2, lora_targets="all", lora_r=4)
    assert per_token < eager
    assert per_token == _saved_bytes_per_layer(method, torch.bfloat16, compiled=True)


def test_loss_term_follows_the_training_loss():
    """The estimator mirrors camelid.train.loss: the fused loss on one GPU or DDP, the chunked one under sharding."""
    from camelid.plan import memory
    from camelid.train import loss

    assert (memory.CE_CHUNK, memory.FUSED_CHUNK_BYTES) == (loss.CE_CHUNK, loss.FUSED_CHUNK_BYTES)
    config = get_preset("tinyllama-1.1b")
    single = estimate(config, "full", seq=2048, batch=4)
    sharded = estimate(config, "full", seq=2048, batch=4, gpus=2, strategy="fsdp")
    assert "loss" in single.terms and "logits" not in single.terms
    assert "logits" in sharded.terms and "loss" not in sharded.terms
    assert single.terms["loss"] < sharded.terms["logits"]  # no (B S, V) logits kept


def test_bf16_true_terms_match_a_bf16_model_and_its_optimizer(tiny):
    """precision bf16-true: the weights, gradients and AdamW state terms are the bf16 tensors' real sizes."""
    config, model = tiny
    half = Transformer(config).to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    torch.nn.functional.cross_entropy(half(ids).flatten(0, 1).float(), ids.flatten()).backward()
    opt = torch.optim.AdamW(half.parameters(), lr=1e-3)
    opt.step()
    est = estimate(config, "full", seq=16, batch=2, precision="bf16-true")
    assert est.terms["weights"] == _bytes(half.parameters())
    assert est.terms["gradients"] == _bytes(p.grad for p in half.parameters())
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert est.terms["optimizer"] == _bytes(state)
    assert est.terms["autocast_weight_copies"] == 0
    mixed = estimate(config, "full", seq=16, batch=2, precision="bf16")
    assert est.total < mixed.total


def test_ddp_bucket_formula_says_the_gradient_bytes_it_counts():
    """DDP's buckets copy the gradients: 2 bytes a trainable parameter under bf16-true, and the formula says so."""
    config = get_preset("tiny")
    for precision, per_param in (("bf16", 4), ("bf16-true", 2)):
        est = estimate(config, "full", precision=precision, gpus=2, strategy="ddp")
        assert est.terms["ddp_buckets"] == per_param * est.trainable
        assert est.formulas["ddp_buckets"].startswith(f"{per_param} T ")


def test_peak_holds_the_larger_of_gradients_and_what_backward_frees():
    """Backward frees activations as it fills gradients: the peak counts the larger group, not both (summing them
    overestimated full fine-tuning by ~20% on an H100; benchmarks/memory_check.py)."""
    from camelid.plan.memory import FREED_BY_BACKWARD

    config = get_preset("tinyllama-1.1b")
    for kw in (dict(method="full", seq=512), dict(method="full", seq=2048), dict(method="lora", seq=1024),
               dict(method="full", seq=512, gpus=4, strategy="fsdp")):
        est = estimate(config, batch=4, **kw)
        freed = sum(v for k, v in est.terms.items() if k in FREED_BY_BACKWARD)
        rest = sum(v for k, v in est.terms.items() if k not in FREED_BY_BACKWARD and k != "gradients")
        assert freed > 0 and rest > 0
        assert est.total == pytest.approx(rest + max(est.terms["gradients"], freed))
        assert est.total < sum(est.terms.values())
    inference = estimate(config, "inference", seq=512, batch=4)
    assert inference.total == pytest.approx(sum(inference.terms.values()))  # nothing is freed by a backward


def test_qlora_at_fp32_keeps_its_float_parts_in_fp32():
    """A CPU run trains QLoRA at fp32 (the NF4 matmuls in bf16, the rest fp32): planned, not refused (--auto was)."""
    config = get_preset("tiny")
    fp32, bf16 = (estimate(config, "qlora", precision=p) for p in ("fp32", "bf16"))
    P, Q = fp32.parameters, quantized_params(config)
    assert fp32.terms["weights"] - bf16.terms["weights"] == pytest.approx(2 * (P - Q))

"""QLoRA: LoRA over an NF4 (double-quantized) base. Keys stay put, the base matmul runs in bf16, it trains through
the one training loop on CPU, and the adapter it writes is a plain PEFT LoRA folder that loads onto the unquantized
base (camelid and the `peft` library alike)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from model_zoo import random_model, tiny_config

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.peft import count_parameters, load_adapter, lora_layers, merge_lora
from camelid.peft.lora import apply_lora, apply_qlora
from camelid.quant import NF4Linear
from camelid.train import TrainConfig
from camelid.train.loop import train
from camelid.train.optim import build_low_memory_optimizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
# hidden 128: q_proj is one whole NF4 double-quantization unit (64 x 256 weights); k/v (64 x 128) are padded
CONFIG = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def perturb_adapters_(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


class PatternBatches:
    """Rows cut from one fixed random token cycle of length 11: a model that learns the cycle predicts every
    token after the first 11 of a row. Depends on nothing but the step (as the loop requires)."""

    def __init__(self, seq_len: int = 32, rows: int = 4):
        cycle = torch.randint(3, 128, (11,), generator=torch.Generator().manual_seed(1))
        self.rows = torch.stack([cycle.roll(-i).repeat(seq_len // 11 + 2)[: seq_len + 1] for i in range(rows)])

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[:, :-1], "labels": self.rows[:, 1:]}

    def eval_batches(self):
        return []


def loss_on(model, batches: PatternBatches) -> float:
    b = batches.batch(0, 0, 0, 1)
    with torch.no_grad():
        return F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten()).item()


def test_qlora_keeps_key_names_and_freezes_the_nf4_base():
    plain = random_model(tiny_config(**CONFIG))
    total = count_parameters(plain)[1]
    model = apply_qlora(random_model(tiny_config(**CONFIG)), r=4, alpha=8)
    keys = model.state_dict().keys()
    assert set(plain.state_dict()) <= set(keys)  # every base key is still there
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.uint8 and q.quant_format[0] is NF4Linear
    assert "model.layers.0.self_attn.q_proj.weight_absmax" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    trainable, total_q = count_parameters(model)
    assert total_q == total + trainable  # the NF4 weights count as the parameters they stand for
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in keys if ".lora_A." in n or ".lora_B." in n}
    assert len(lora_layers(model)) == 14  # all-linear but lm_head


def test_base_matmul_runs_in_bf16_and_adapters_in_fp32():
    model = apply_qlora(random_model(tiny_config(**CONFIG)), r=4, alpha=8)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 128)
    want = F.linear(x.bfloat16(), layer.base_weight(torch.bfloat16)).float()  # lora_B is zero at init
    assert torch.equal(layer(x), want)


def test_merge_into_the_dequantized_weight_equals_the_unmerged_forward():
    model = apply_lora(random_model(tiny_config(**CONFIG)), r=4, alpha=8, target_modules="all-linear",
                       quantize_base="nf4", compute_dtype=None)  # fp32 compute: merged must match to 1e-5
    perturb_adapters_(model)
    with torch.no_grad():
        unmerged = model(TOKENS)
        merge_lora(model)
        merged = model(TOKENS)
    assert not lora_layers(model) and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_dora_over_a_quantized_base_is_refused():
    with pytest.raises(ValueError, match="DoRA over a quantized base"):
        apply_lora(random_model(tiny_config(**CONFIG)), use_dora=True, quantize_base="nf4")
    with pytest.raises(ValueError, match="unknown quantize_base 'nf3'"):
        apply_lora(random_model(tiny_config(**CONFIG)), quantize_base="nf3")


def test_qlora_trains_through_the_loop_and_its_adapter_loads_onto_the_unquantized_base(tmp_path):
    base_dir = tmp_path / "base"
    save_pretrained(random_model(tiny_config(**CONFIG)), base_dir)
    batches = PatternBatches()
    model = apply_qlora(from_pretrained(base_dir), r=8, alpha=16)
    cfg = TrainConfig(model=str(base_dir), out=str(tmp_path / "run"), max_steps=20, micro_batch=4, seq_len=32,
                      lr=1e-2, warmup_steps=2, weight_decay=0.0, eval_every=0, sample_every=0, save_every=0,
                      tensorboard=False, log_every=1000, device="cpu", precision="fp32")
    result = train(cfg, model=model, batches=batches)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses

    final = result.final_dir
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and (final / "adapter_model.safetensors").is_file()
    base = from_pretrained(base_dir)
    before = loss_on(base, batches)
    load_adapter(base, final)  # the unquantized base
    after = loss_on(base, batches)
    qlora = loss_on(model.eval(), batches)
    assert after < 0.5 * before, (before, after)
    assert abs(after - qlora) < 0.1 * before, (after, qlora)  # NF4 + bf16 shift the loss only a little

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, final).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, base(TOKENS), rtol=1e-4, atol=1e-4)


def test_8bit_optimizers_need_cuda_with_a_clear_error():
    params = [torch.nn.Parameter(torch.zeros(4))]
    for name in ("adamw8bit", "paged_adamw8bit"):
        with pytest.raises(ValueError, match=f"optimizer '{name}' .* needs a CUDA device"):
            build_low_memory_optimizer(name, params, 1e-3, (0.9, 0.999), 1e-8, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown 8-bit optimizer 'adam4bit'"):
        build_low_memory_optimizer("adam4bit", params, 1e-3, (0.9, 0.999), 1e-8, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw8bit_steps_a_qlora_model_on_cuda():
    model = apply_qlora(random_model(tiny_config(**CONFIG)), r=4, alpha=8).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_low_memory_optimizer("adamw8bit", params, 1e-2, (0.9, 0.999), 1e-8, torch.device("cuda"))
    batches = PatternBatches()
    b = {k: v.cuda() for k, v in batches.batch(0, 0, 0, 1).items()}
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_qlora_run_checkpoints_and_resumes(tmp_path):
    """Step folders of a QLoRA run hold the NF4 base and the adapters (save_pretrained writes the quantized
    layers as they are); --resume loads them back into a fresh QLoRA model and goes on from there."""
    base_dir = tmp_path / "base"
    save_pretrained(random_model(tiny_config(**CONFIG)), base_dir)
    values = dict(model=str(base_dir), out=str(tmp_path / "run"), micro_batch=4, seq_len=32, lr=1e-2,
                  warmup_steps=1, weight_decay=0.0, eval_every=0, sample_every=0, save_every=3, tensorboard=False,
                  log_every=1000, device="cpu", precision="fp32")
    first = train(TrainConfig(**values, max_steps=3), model=apply_qlora(from_pretrained(base_dir), r=8, alpha=16),
                  batches=PatternBatches())
    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    config = json.loads((step / "config.json").read_text())["quantization_config"]
    assert config["method"] == "nf4" and "model.layers.0.self_attn.q_proj" in config["modules"]
    resumed = train(TrainConfig(**values, max_steps=5, resume=True),
                    model=apply_qlora(from_pretrained(base_dir), r=8, alpha=16), batches=PatternBatches())
    assert sorted(resumed.losses) == [4, 5]
    # restored adapters go on from where the first run stopped (fresh ones would start near the first loss)
    assert resumed.losses[4] < first.losses[3] < first.losses[1]


def test_a_lora_adapter_loads_onto_a_quantized_folder(tmp_path):
    """Serving a (Q)LoRA adapter over a `camelid quantize` folder: the adapter wraps the quantized layers and
    computes exactly what wrapping the in-memory quantized model with the same adapter tensors computes."""
    from camelid.peft import lora_state_dict, save_adapter
    from camelid.quant import quantize_model

    trained = apply_lora(random_model(tiny_config(**CONFIG)), r=4, alpha=8, target_modules="all-linear")
    perturb_adapters_(trained)
    save_adapter(trained, tmp_path / "adapter")
    save_pretrained(quantize_model(random_model(tiny_config(**CONFIG)), "nf4"), tmp_path / "nf4")
    loaded = load_adapter(from_pretrained(tmp_path / "nf4"), tmp_path / "adapter")
    assert loaded.model.layers[0].mlp.down_proj.quant_format[0] is NF4Linear

    reference = apply_lora(quantize_model(random_model(tiny_config(**CONFIG)), "nf4"), r=4, alpha=8,
                           target_modules="all-linear")
    reference.load_state_dict(lora_state_dict(trained), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), reference(TOKENS), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(loaded(TOKENS), from_pretrained(tmp_path / "nf4")(TOKENS), atol=1e-3)


def test_merging_qlora_in_a_bf16_model_gives_linears_in_the_model_dtype():
    # the merged Linear must take the bf16 activations of the rest of the model (an fp32 one cannot)
    model = apply_qlora(random_model(tiny_config(**CONFIG)).to(torch.bfloat16), r=4, alpha=8)
    perturb_adapters_(model)
    want_weight = model.model.layers[0].self_attn.q_proj.merged_weight().to(torch.bfloat16)
    with torch.no_grad():
        unmerged = model(TOKENS).float()
        merge_lora(model)
        merged = model(TOKENS).float()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, want_weight)
    # bf16 rounding of the merged weights, through 2 layers: ~2% (measured)
    assert (merged - unmerged).norm() / unmerged.norm() < 0.05

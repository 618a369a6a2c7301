"""`camelid finetune`: LoRA / full fine-tuning through the one training loop, PEFT folders, resume, chat."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_finetune_base

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.peft import load_adapter
from camelid.quant import quantize_model
from camelid.tokenizer import Tokenizer
from camelid.templates import recorded_template
from camelid.train.finetune import FinetuneSpec, apply_method, finetune, load_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random LLaMA with a byte-level BPE trained here, saved as a model folder, and 40 Alpaca records."""
    root = tmp_path_factory.mktemp("ft")
    folder, data = write_finetune_base(root)
    return root, folder, data


def _run(root, folder, data, name, method="lora", max_steps=30, resume=False, loss_hook=None, **train):
    spec, cfg = load_config(None, dict(base=str(folder), data=[str(data)], method=method, template="alpaca",
                                       target_modules="all-linear"),
                            dict(out=str(root / name), max_steps=max_steps, micro_batch=4, seq_len=96,
                                 eval_every=0, save_every=10, device="cpu", tensorboard=False,
                                 resume=resume, **{"lr": 1e-2, "precision": "fp32", **train}))
    return finetune(cfg, spec, log=lambda s: None, loss_hook=loss_hook)


def test_lora_lowers_loss_and_writes_peft_folder(base):
    root, folder, data = base
    result = _run(root, folder, data, "lora")
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    final = result.final_dir
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    assert (final / "tokenizer.json").is_file() and recorded_template(final) == "alpaca"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder.resolve())
    # only the adapters were trained: the base weights in the final checkpoint are bitwise the original ones
    original = load_file(folder / "model.safetensors")
    ckpt = load_file(root / "lora" / "checkpoints" / "step_00000030" / "model.safetensors")
    for k, v in original.items():
        assert torch.equal(ckpt[k], v), k
    # the adapter folder loads into the base, and it changes the logits
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    plain = from_pretrained(folder).eval()
    tuned = load_adapter(from_pretrained(folder), final).eval()
    with torch.no_grad():
        ours = tuned(ids)
        assert not torch.allclose(ours, plain(ids))
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, final).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_lora_resume_is_exact(base):
    root, folder, data = base
    whole = _run(root, folder, data, "whole", max_steps=20)
    def crash(step, loss):  # the run stops during step 11, after step 10's checkpoint
        if step == 11:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        _run(root, folder, data, "split", max_steps=20, loss_hook=crash)
    resumed = _run(root, folder, data, "split", max_steps=20, resume=True)
    assert sorted(resumed.losses) == list(range(11, 21))
    for s in range(11, 21):
        assert resumed.losses[s] == whole.losses[s], s
    a = load_file(whole.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_writes_model_folder(base):
    root, folder, data = base
    result = _run(root, folder, data, "full", method="full", max_steps=5)
    model = from_pretrained(result.final_dir)
    original = load_file(folder / "model.safetensors")
    assert not torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])
    assert recorded_template(result.final_dir) == "alpaca"


def test_spec_rejects_bad_input(base):
    _, folder, data = base
    with pytest.raises(ValueError, match="unknown method"):
        FinetuneSpec(base=str(folder), data=[str(data)], method="magic").validate()
    with pytest.raises(FileNotFoundError, match="no data file"):
        FinetuneSpec(base=str(folder), data=["nope.json:0.5"]).validate()
    for fraction in (-0.1, 1, 2):  # 2 held out all but one example, silently
        with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
            FinetuneSpec(base=str(folder), data=[str(data)], eval_fraction=fraction).validate()


@pytest.mark.parametrize("line, message", [("lora_r: eight", "lora_r must be int"),
                                           ("lora_dropout: [0.1]", "lora_dropout must be float"),
                                           ("pack: maybe", "pack must be bool"),
                                           ("target_modules: 5", "target_modules must be a string or a list of "
                                                                 "strings, got 5"),
                                           ("other_data: [[a.json]]", "data must be a string or a list")])
def test_yaml_values_of_the_wrong_type_are_one_line_errors(tmp_path, line, message):
    data = "" if line.startswith("other_data") else "data: [d.json]\n"
    (tmp_path / "ft.yaml").write_text(f"base: b\n{data}{line.removeprefix('other_')}\n")
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path / "ft.yaml", {}, {})


def test_yaml_numbers_written_as_strings_are_read(tmp_path):
    (tmp_path / "ft.yaml").write_text("base: b\ndata: d.json\nlora_r: '16'\nlora_alpha: 3.2e1\ntarget_modules: [q_proj]\n")
    spec, _ = load_config(tmp_path / "ft.yaml", {}, {})
    assert (spec.lora_r, spec.lora_alpha, spec.data, spec.target_modules) == (16, 32.0, ["d.json"], ["q_proj"])


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "camelid", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=120)


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.json", "--template", "alpaca"], "no data file at missing.json"),
    (["--template", "klingon"], "unknown chat template 'klingon'"),
    (["--template", "alpaca", "--method", "magic"], "unknown method 'magic'"),
    ([], "no chat_template"),
])
def test_cli_bad_input_is_one_line_exit_2(base, extra, message):
    root, folder, data = base
    args = ["finetune", "--base", folder, "--out", root / "bad", "--max-steps", 1]
    if "--data" not in extra:
        args += ["--data", data]
    proc = _cli(*args, *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_cli_finetune_then_chat(base):
    root, folder, data = base
    out = root / "cli"
    proc = _cli("finetune", "--base", folder, "--data", data, "--template", "alpaca", "--out", out,
                "--max-steps", 3, "--micro-batch", 2, "--seq-len", 96, "--device", "cpu", "--set", "tensorboard=false")
    assert proc.returncode == 0, proc.stderr
    assert "trainable of" in proc.stdout and (out / "final" / "adapter_config.json").is_file()
    chat = _cli("chat", "--model", folder, "--adapter", out / "final", "--max-new-tokens", 8, "--device", "cpu",
                stdin="hi\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert "bot> " in chat.stdout


def test_dora_and_yaml_config(base, tmp_path):
    root, folder, data = base
    yaml_file = tmp_path / "ft.yaml"
    yaml_file.write_text(f"base: {folder}\ndata: [{data}]\nmethod: dora\ntemplate: alpaca\nlora_r: 4\n"
                         f"target_modules: q_proj,v_proj\nout: {tmp_path / 'dora'}\nmax_steps: 3\nmicro_batch: 2\n"
                         "seq_len: 96\ndevice: cpu\ntensorboard: false\n")
    spec, cfg = load_config(yaml_file, {}, {})
    assert (spec.method, spec.lora_r, cfg.max_steps, cfg.model) == ("dora", 4, 3, str(folder.resolve()))
    result = finetune(cfg, spec, log=lambda s: None)
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert config["use_dora"] and config["r"] == 4
    load_adapter(from_pretrained(folder), result.final_dir)
    (tmp_path / "bad.yaml").write_text("methd: lora\n")
    with pytest.raises(ValueError, match="did you mean 'method'"):
        load_config(tmp_path / "bad.yaml", {}, {})


def test_auto_fits_the_method_to_the_device(base, capsys):
    """--auto sizes micro-batch and accumulation by the method's own memory estimate, keeping the step's sequences."""
    from camelid.config import ModelConfig
    from camelid.plan.fit import FRAGMENTATION
    from camelid.plan.memory import estimate

    root, folder, data = base
    config = ModelConfig.from_hf(folder)
    lora_at_2 = estimate(config, "lora", seq=96, batch=2, precision="fp32").total
    device = lora_at_2 * (1 + FRAGMENTATION) + 1  # LoRA fits micro-batch 2, not 4 (a CPU has no CUDA context)
    assert estimate(config, "lora", seq=96, batch=4, precision="fp32").total * (1 + FRAGMENTATION) > device
    notes = []
    spec, cfg = load_config(None, dict(base=str(folder), data=[str(data)], method="lora", template="alpaca",
                                       target_modules="all-linear"),
                            dict(out=str(root / "auto"), max_steps=2, micro_batch=4, grad_accum=1, seq_len=96,
                                 eval_every=0, device="cpu", precision="fp32", tensorboard=False, auto_fit=True,
                                 device_memory=f"{device}B"))
    result = finetune(cfg, spec, log=notes.append)
    assert any("auto-fit" in n and "(lora," in n and "micro_batch 2 x grad_accum 2" in n for n in notes), notes
    assert result.step == 2


def test_auto_plans_qlora_on_a_cpu(base):
    # a CPU's precision is fp32: the planner refused qlora there ("computes in bf16"), which the trainer runs
    root, folder, data = base
    notes = []
    spec, cfg = load_config(None, dict(base=str(folder), data=[str(data)], method="qlora", template="alpaca"),
                            dict(out=str(root / "auto-qlora"), max_steps=1, micro_batch=2, grad_accum=1, seq_len=96,
                                 eval_every=0, device="cpu", precision="auto", tensorboard=False, auto_fit=True,
                                 device_memory="4GB"))
    assert finetune(cfg, spec, log=notes.append).step == 1
    assert any("auto-fit" in n and "(qlora," in n for n in notes), notes


# method -> learning rate that moves it in 25 steps on the tiny model (soft prompts learn slowly on a frozen model)
METHOD_LR = {"lora": 1e-2, "qlora": 1e-2, "dora": 1e-2, "prefix": 3e-2, "ptuning-v2": 3e-2, "prompt": 0.3,
             "ptuning": 0.003, "adapter": 1e-2, "bitfit": 3e-2, "ia3": 0.1, "full": 3e-3}


def _answer_loss(model, tokenizer, data) -> float:
    """Mean answer-token loss of `model` on the first records of the training data (alpaca template)."""
    from camelid.data.sft import SFTBatches
    from camelid.templates import for_tokenizer
    from camelid.train.loss import count_targets, loss_fn

    batches = SFTBatches.from_files([str(data)], tokenizer, for_tokenizer(tokenizer, "alpaca"), seq_len=96,
                                    micro_batch=8, seed=0)
    batch = batches.batch(0, 0, 0, 1)
    with torch.no_grad():
        return float(loss_fn(model, batch)) / count_targets(batch)


@pytest.mark.parametrize("method", [m for m in METHOD_LR])
def test_every_method_trains_and_its_folder_reloads(base, method):
    """Each method: the loss falls through the one loop, and OUT/final applied to a fresh base (camelid.peft.load_adapter
    reads any kind by its peft_type; full is a model folder) scores the training answers better than the base."""
    from camelid.train.finetune import METHODS

    assert set(METHOD_LR) == set(METHODS)
    root, folder, data = base
    spec_values = dict(base=str(folder), data=[str(data)], method=method, template="alpaca")
    if method in ("lora", "qlora", "dora"):
        spec_values["target_modules"] = "all-linear"
    spec, cfg = load_config(None, spec_values, dict(out=str(root / f"m-{method}"), max_steps=25, micro_batch=4,
                                                    seq_len=96, eval_every=0, save_every=0, device="cpu",
                                                    precision="fp32", tensorboard=False, lr=METHOD_LR[method]))
    result = finetune(cfg, spec, log=lambda s: None)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, (method, losses)

    tokenizer = Tokenizer(folder)
    base_loss = _answer_loss(from_pretrained(folder), tokenizer, data)
    if method == "full":
        tuned = from_pretrained(result.final_dir)
    else:
        assert (result.final_dir / "adapter_config.json").is_file()
        assert not (result.final_dir / "model.safetensors").exists()  # the adapter alone, never base + adapter
        tuned = load_adapter(from_pretrained(folder), result.final_dir)
    assert _answer_loss(tuned, tokenizer, data) < 0.8 * base_loss, method
    assert recorded_template(result.final_dir) == "alpaca"


def test_full_keeps_fp32_master_weights_over_a_half_precision_base(base, tmp_path):
    """A bf16/fp16 checkpoint trains with fp32 weights under autocast: with fp16 weights the gradient scaler
    refuses to unscale fp16 gradients (the run died at step 1), and bf16 AdamW would lose small updates."""
    root, folder, data = base
    half = tmp_path / "half"
    save_pretrained(from_pretrained(folder).to(torch.float16), half)
    Tokenizer(folder).save(half)
    model = apply_method(from_pretrained(half), FinetuneSpec(base=str(half), data=[str(data)], method="full"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    result = _run(root, half, data, "full-fp16", method="full", max_steps=3, precision="fp16")
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())


def test_full_over_a_quantized_base_is_refused(base, tmp_path):
    """A quantized folder's Linear layers are frozen codes: `full` would train only the embeddings, norms and
    lm_head (42% of the tiny model) while saying it trains every weight."""
    root, folder, data = base
    quantized = tmp_path / "int8"
    save_pretrained(quantize_model(from_pretrained(folder), "int8"), quantized)
    with pytest.raises(ValueError, match="quantized"):
        apply_method(from_pretrained(quantized), FinetuneSpec(base=str(quantized), data=[str(data)], method="full"))


@pytest.mark.parametrize("method", ["bitfit", "ia3"])
def test_float_linear_methods_over_a_quantized_base_say_so(base, tmp_path, method):
    """BitFit and IA3 act on float nn.Linear layers; over an int8 folder BitFit said its default targets 'match no
    module of this model (Linear layers are named like 'lm_head')', which does not tell the user what is wrong."""
    root, folder, data = base
    quantized = tmp_path / "int8"
    save_pretrained(quantize_model(from_pretrained(folder), "int8"), quantized)
    with pytest.raises(ValueError, match=f"{method} needs float Linear layers, but .*int8 is quantized \\(int8\\)"):
        apply_method(from_pretrained(quantized), FinetuneSpec(base=str(quantized), data=[str(data)], method=method))


def test_options_the_model_refuses_fail_before_the_data_is_tokenized(base, monkeypatch):
    """A target that matches nothing, or a seq_len past the context, is reported before the (possibly long)
    tokenization of the data, which must not even start."""
    from camelid.data import sft

    root, folder, data = base
    monkeypatch.setattr(sft.SFTBatches, "from_files", lambda *a, **k: pytest.fail("the data was tokenized first"))
    cases = [(dict(target_modules=["no_such_proj"]), {}, "no_such_proj"), ({}, dict(seq_len=100_000), "context")]
    for spec_values, train_values, message in cases:
        spec, cfg = load_config(None, dict(base=str(folder), data=[str(data)], method="lora", template="alpaca",
                                           **spec_values),
                                dict(out=str(root / "early"), max_steps=1, device="cpu", **{"seq_len": 64, **train_values}))
        with pytest.raises(ValueError, match=message):
            finetune(cfg, spec, log=lambda line: None)


def _resume_run(root, folder, data, out, max_steps, resume=False, **spec):
    """`data`: a file, or a list of FILE[:ratio] specs."""
    spec, cfg = load_config(None, {"base": str(folder), "data": data if isinstance(data, list) else [str(data)], "template": "alpaca", **spec},
                            dict(out=str(root / out), max_steps=max_steps, micro_batch=4, seq_len=96, eval_every=0,
                                 save_every=2, device="cpu", tensorboard=False, precision="fp32", resume=resume))
    return finetune(cfg, spec, log=lambda s: None)


@pytest.mark.parametrize("first, change, message", [
    (dict(), dict(lora_alpha=64), "lora_alpha 16 -> 64"),
    (dict(), dict(lora_dropout=0.2), "lora_dropout 0.05 -> 0.2"),
    (dict(), dict(lora_r=4), "lora_r 8 -> 4"),
    (dict(), dict(target_modules="q_proj,k_proj,v_proj"), "target_modules ['q_proj', 'v_proj'] -> "
                                                          "['q_proj', 'k_proj', 'v_proj']"),
    (dict(), dict(method="dora"), "method 'lora' -> 'dora'"),
    (dict(), dict(template="mistral"), "template 'alpaca' -> 'mistral'"),
    (dict(), dict(pack=True), "pack False -> True"),
    (dict(), dict(eval_fraction=0.1), "eval_fraction 0.0 -> 0.1"),
    (dict(), dict(data_ratio=":0.5"), "data_mix [["),
    (dict(method="prefix", num_virtual_tokens=8), dict(num_virtual_tokens=4), "num_virtual_tokens 8 -> 4"),
    (dict(method="ptuning-v2"), dict(prefix_projection=True), "prefix_projection False -> True"),
    (dict(method="ptuning"), dict(encoder_type="lstm"), "encoder_type 'mlp' -> 'lstm'"),
    (dict(method="adapter", bottleneck_size=16), dict(adapter_placement="pfeiffer"),
     "adapter_placement 'houlsby' -> 'pfeiffer'"),
])
def test_resume_refuses_a_changed_method_template_or_data_setting(base, first, change, message):
    """What shapes the trained function or the data (the method and its hyper-parameters, the template, packing,
    the held-out share, the data mix) cannot change on --resume: one line naming old -> new, before anything runs."""
    root, folder, data = base
    out = f"fixed-{len(list(root.glob('fixed-*')))}"
    _resume_run(root, folder, data, out, max_steps=2, **first)
    change = dict(change)
    if "data_ratio" in change:  # the same file with another mixing ratio next to a second one
        change["data"] = [f"{data}{change.pop('data_ratio')}", str(data)]
    with pytest.raises(ValueError, match="--resume") as refused:
        _resume_run(root, folder, change.pop("data", data), out, max_steps=4, resume=True, **{**first, **change})
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (root / out / "checkpoints" / "step_00000004").exists()


def test_resume_accepts_the_same_settings_spelled_otherwise(base):
    """The method's default targets named explicitly, a list for a comma string, and another path to the same data
    file are the same run: it goes on, and bookkeeping (max_steps) may change."""
    root, folder, data = base
    _resume_run(root, folder, data, "spelled", max_steps=2)
    resumed = _resume_run(root, folder, data.parent / "." / data.name, "spelled", max_steps=4, resume=True,
                          target_modules=["q_proj", "v_proj"])
    assert sorted(resumed.losses) == [3, 4]

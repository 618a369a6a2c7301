"""What fine-tuning adds to the loop: a base model with a method applied (METHODS: LoRA, QLoRA, DoRA, prefix,
P-Tuning v2, prompt tuning, P-tuning, bottleneck adapters, BitFit, IA3, or full), and the SFT batch source. The loop itself is `camelid.train.loop.train`, called with that model and batch source.

    finetune(cfg, FinetuneSpec(base="models/llama", data=["alpaca.json"], method="lora", template="llama3"))

The method, the data files and the LoRA shape are checked before the base model is loaded; the context length and
the method's targets right after it, before the data is tokenized. The final folder is the method's adapter folder (camelid.peft.methods: PEFT format where PEFT has the method)
or a plain model folder (full), with the tokenizer
and TEMPLATE_FILE, which names the chat template so that `camelid chat --adapter` renders prompts as trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from camelid.checkpoint import from_pretrained
from camelid.config import ModelConfig
from camelid.data.sft import SFTBatches, parse_data_spec
from camelid.peft import adapters, apply_lora, bitfit, count_parameters, ia3, prefix, prompt
from camelid.quant import quantization_config
from camelid.templates import TEMPLATE_FILE, JinjaTemplate, for_tokenizer
from camelid.tokenizer import Tokenizer
from camelid.train.config import TrainConfig, coerce_value, auto_fit, check_keys, read_yaml_mapping
from camelid.train.loop import LossHook, TrainResult, resolve_precision, train
from camelid.train.pretrain import device_memory_bytes

METHODS = ("lora", "qlora", "dora", "prefix", "ptuning-v2", "prompt", "ptuning", "adapter", "bitfit", "ia3", "full")
PLAN_METHOD = {"ptuning-v2": "prefix", "ptuning": "prompt"}  # finetune method -> camelid.plan.memory method, where they differ
LORA_FAMILY = ("lora", "qlora", "dora")
# target_modules when none are given. QLoRA targets every linear layer, like the paper
DEFAULT_TARGETS = {"lora": ["q_proj", "v_proj"], "dora": ["q_proj", "v_proj"], "qlora": "all-linear",
                   "bitfit": "all-linear", "ia3": ia3.DEFAULT_TARGETS}


@dataclass
class FinetuneSpec:
    """The fine-tuning choices that are not TrainConfig keys (a `--config` YAML may hold both kinds)."""

    base: str = ""  # the base model folder
    data: list[str] = field(default_factory=list)  # "file[:ratio]" specs
    method: str = "lora"
    template: str | None = None  # a built-in template name; None = the tokenizer's own chat_template
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    # names / suffixes, a regex, or "all-linear"; None = the method's default (lora, dora: q_proj, v_proj; qlora and
    # bitfit: all-linear; ia3: k_proj, v_proj, down_proj)
    target_modules: str | list[str] | None = None
    num_virtual_tokens: int = 20  # prefix, ptuning-v2, prompt, ptuning
    prefix_projection: bool | None = None  # the reparameterisation MLP; None = on for prefix, off for ptuning-v2
    prompt_init_text: str | None = None  # prompt tuning: start the soft tokens from this text's embeddings
    encoder_type: str = "mlp"  # ptuning: mlp | lstm
    bottleneck_size: int = 64  # adapter
    adapter_placement: str = "houlsby"  # adapter: houlsby (after attention and FFN) | pfeiffer (after FFN)
    pack: bool = False
    eval_fraction: float = 0.0  # share of each dataset held out for eval_batches

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.base:
            raise ValueError("no base model: pass --base DIR")
        if not Path(self.base).is_dir():
            raise FileNotFoundError(f"no model folder at {self.base}")
        if not self.data:
            raise ValueError("no data: pass --data FILE[:ratio] (repeatable)")
        for spec in self.data:
            path, _ = parse_data_spec(spec)
            if not Path(path).is_file():
                raise FileNotFoundError(f"no data file at {path}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.method in LORA_FAMILY and (self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise ValueError(f"LoRA needs r >= 1, alpha > 0, 0 <= dropout < 1; got r={self.lora_r}, "
                             f"alpha={self.lora_alpha}, dropout={self.lora_dropout}")


def split_config(values: dict) -> tuple[dict, dict]:
    """A fine-tuning YAML mapping -> (FinetuneSpec keys, TrainConfig keys); unknown keys are errors."""
    spec_keys = {f.name for f in fields(FinetuneSpec)}
    train_keys = {f.name for f in fields(TrainConfig)}
    check_keys(values, spec_keys | train_keys, "config key")
    return ({k: v for k, v in values.items() if k in spec_keys},
            {k: v for k, v in values.items() if k not in spec_keys})


def load_config(path: str | Path | None, spec_flags: dict, train_flags: dict) -> tuple[FinetuneSpec, TrainConfig]:
    """The YAML file's values, then the flags on top, split into a FinetuneSpec and a TrainConfig."""
    values = read_yaml_mapping(path, "a fine-tuning config") if path is not None else {}
    spec_values, train_values = split_config(values)
    hints = typing.get_type_hints(FinetuneSpec)
    # each value as its field's type, as TrainConfig does: YAML reads 3.2e1 as a string, and `lora_r: eight` is
    # a one-line error, not a TypeError in validate (data and target_modules take a string or a list)
    spec = FinetuneSpec(**{k: _strings(k, v) if k in ("data", "target_modules") else coerce_value(k, v, hints[k])
                           for k, v in {**spec_values, **spec_flags}.items()})
    if isinstance(spec.data, str):
        spec.data = [spec.data]
    train_values = {"sample_every": 0, "warmup_steps": 0, **train_values, **train_flags}
    # the base folder is the run's model: `resume` compares it, and the final adapter names it
    cfg = TrainConfig.from_dict({**train_values, "model": str(Path(spec.base).resolve()) if spec.base else "", "data": ",".join(spec.data)})
    return spec, cfg


def _strings(name: str, value):
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")


def _targets(spec: FinetuneSpec, default):
    targets = spec.target_modules if spec.target_modules is not None else default
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t for t in targets.split(",") if t]
    return targets


def _prefix_projection(spec: FinetuneSpec) -> bool:
    return spec.prefix_projection if spec.prefix_projection is not None else spec.method == "prefix"


def fixed_on_resume(spec: FinetuneSpec) -> dict:
    """What a resumed run must keep besides TrainConfig's FIXED_ON_RESUME: the method and the options it uses (they
    shape the trained function), the template, packing, the held-out share and the data mix (they decide each
    step's examples). Defaults are filled in, so that naming a default is the same run."""
    m = spec.method
    settings = {"method": m, "template": spec.template, "pack": spec.pack, "eval_fraction": spec.eval_fraction,
                "data_mix": [[str(Path(path).resolve()), ratio] for path, ratio in map(parse_data_spec, spec.data)]}
    if m in LORA_FAMILY:
        settings.update(lora_r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout)
    if m in DEFAULT_TARGETS:
        settings["target_modules"] = _targets(spec, DEFAULT_TARGETS[m])
    if m in ("prefix", "ptuning-v2", "prompt", "ptuning"):
        settings["num_virtual_tokens"] = spec.num_virtual_tokens
    if m in ("prefix", "ptuning-v2"):
        settings["prefix_projection"] = _prefix_projection(spec)
    if m == "prompt":
        settings["prompt_init_text"] = spec.prompt_init_text
    if m == "ptuning":
        settings["encoder_type"] = spec.encoder_type
    if m == "adapter":
        settings.update(bottleneck_size=spec.bottleneck_size, adapter_placement=spec.adapter_placement)
    return settings


def apply_method(model, spec: FinetuneSpec, tokenizer: Tokenizer | None = None):
    """Freeze the base and add spec.method's trainable parameters (camelid.peft, one file per family); `full`
    trains every parameter. Bad options (a target that matches nothing, ...) raise ValueError here, before training."""
    m = spec.method
    if m == "full" and quantization_config(model) is not None:  # frozen codes: only embeddings, norms, lm_head train
        raise ValueError(f"full fine-tuning needs float weights, but {spec.base} is quantized "
                         f"({quantization_config(model)['method']}): fine-tune the original folder, or use "
                         "--method lora / qlora")
    if m in ("bitfit", "ia3") and quantization_config(model) is not None:  # they scale or add to float Linears
        raise ValueError(f"{m} needs float Linear layers, but {spec.base} is quantized "
                         f"({quantization_config(model)['method']}): fine-tune the original folder, or use "
                         "--method lora / qlora")
    if m == "full":  # fp32 master weights whatever the checkpoint's dtype: the loop autocasts the matmuls, and
        model.float()  # AdamW on bf16 weights loses small updates (fp16 ones even stop the gradient scaler)
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if m in LORA_FAMILY:
        # QLoRA: the targeted base layers are stored in NF4 (double-quantized) and computed in bf16
        return apply_lora(model, r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout,
                          target_modules=_targets(spec, DEFAULT_TARGETS[m]), use_dora=m == "dora",
                          quantize_base="nf4" if m == "qlora" else None)
    if m in ("prefix", "ptuning-v2"):
        return prefix.apply_prefix(model, num_virtual_tokens=spec.num_virtual_tokens,
                                   prefix_projection=_prefix_projection(spec))
    if m == "prompt":
        if spec.prompt_init_text is not None:
            return prompt.apply_prompt(model, spec.num_virtual_tokens, init_text=spec.prompt_init_text,
                                       tokenizer=tokenizer)
        # PEFT's default N(0, 1) init: larger than a small model's embeddings, which lets the soft tokens steer it
        # (rows copied from the vocabulary barely moved the loss of the tiny test model in 25 steps)
        return prompt.apply_prompt(model, spec.num_virtual_tokens, init="random")
    if m == "ptuning":
        return prompt.apply_ptuning(model, spec.num_virtual_tokens, encoder_type=spec.encoder_type.upper())
    if m == "adapter":
        return adapters.apply_bottleneck(model, bottleneck_size=spec.bottleneck_size, placement=spec.adapter_placement)
    if m == "bitfit":
        return bitfit.apply_bitfit(model, target_modules=_targets(spec, DEFAULT_TARGETS[m]))
    if m == "ia3":
        targets = _targets(spec, DEFAULT_TARGETS[m])
        # PEFT's split: the FFN's down_proj scales its input, every other target its output
        feedforward = [t for t in ("down_proj",) if targets == "all-linear" or t in targets]
        return ia3.apply_ia3(model, target_modules=targets, feedforward_modules=feedforward)
    raise ValueError(f"unknown method {m!r}; choose one of {', '.join(METHODS)}")


def finetune(cfg: TrainConfig, spec: FinetuneSpec, log: Callable[[str], None] = print,
             loss_hook: LossHook | None = None) -> TrainResult:
    """Load spec.base, apply spec.method, build the SFT batches with the chat template, and run the one loop.
    On --resume the method is applied before the loop loads the checkpoint, so the adapters are there to fill."""
    spec.validate()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, one report (rank 0's), not one per process
        log = lambda line: None  # noqa: E731
    tokenizer = Tokenizer(spec.base)
    template = for_tokenizer(tokenizer, spec.template)  # TemplateError: unknown name, or no chat_template to use
    template.check(tokenizer)
    if cfg.auto_fit:  # sizes micro_batch, so it comes before the batches; the loop then takes cfg as it is
        cfg = fit_to_device(cfg, spec, log)
    model = from_pretrained(spec.base, device="cpu")  # the loop moves it to cfg.device
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} is longer than the model's context "
                         f"({model.config.max_position_embeddings})")
    torch.manual_seed(cfg.seed)  # the adapters' random init: the same run gives the same adapters
    apply_method(model, spec, tokenizer)  # before the data: a target that matches nothing fails in seconds
    trainable, total = count_parameters(model)
    log(f"{spec.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    batches = SFTBatches.from_files(spec.data, tokenizer, template, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch,
                                    pack=spec.pack, seed=cfg.seed, eval_fraction=spec.eval_fraction)
    log(batches.report())  # numpy's generator: the torch seed above still starts the loop as it did
    result = train(cfg, model=model, batches=batches, tokenizer=tokenizer, loss_hook=loss_hook,
                   fixed_settings=fixed_on_resume(spec))
    if result.final_dir is not None:  # rank 0
        name = "model" if isinstance(template, JinjaTemplate) else template.name
        (result.final_dir / TEMPLATE_FILE).write_text(json.dumps({"template": name, "method": spec.method}) + "\n")
    return result


def fit_to_device(cfg: TrainConfig, spec: FinetuneSpec, log: Callable[[str], None]) -> TrainConfig:
    """`--auto`: the micro-batch, accumulation and checkpointing that camelid.plan.fit picks for this method and
    base model on this device, keeping micro_batch * grad_accum sequences per step."""
    wanted = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(wanted)
    config = ModelConfig.from_hf(spec.base)
    cfg, note = auto_fit(cfg, config, device_memory_bytes(cfg, device), resolve_precision(cfg.precision, device),
                         method=PLAN_METHOD.get(spec.method, spec.method), cuda=device.type == "cuda")
    log(note)
    return dataclasses.replace(cfg, auto_fit=False)

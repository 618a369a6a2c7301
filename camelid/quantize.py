"""`camelid quantize`: a model folder in, a quantized model folder out, with what it saved and what it cost.

A workflow (load, quantize, save, evaluate), so it sits above checkpoint and tokenizer; camelid.quant itself acts
on modules only.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from camelid.checkpoint import (from_pretrained, parse_device, refuse_non_empty, remove_model_files,
                                save_pretrained)
from camelid.quant import checked_linears, model_nbytes, options_for, quantization_config, quantize_model
from camelid.quant.gptq import gptq_quantizer
from camelid.quant.perplexity import perplexity
from camelid.templates import TEMPLATE_FILE
from camelid.tokenizer import FILES as TOKENIZER_FILES
from camelid.tokenizer import Tokenizer


@dataclass
class QuantizeReport:
    out: Path
    method: str
    options: dict
    layers: int
    bytes_before: int
    bytes_after: int
    ppl_before: float | None = None
    ppl_after: float | None = None

    def lines(self) -> list[str]:
        saved = self.bytes_before - self.bytes_after
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        out = [f"wrote {self.out}: {self.method}{opts}, {self.layers} Linear layers quantized",
               f"weights: {self.bytes_before:,} -> {self.bytes_after:,} bytes "
               f"({saved:,} saved, {self.bytes_after / self.bytes_before:.3f}x)"]
        if self.ppl_before is not None:
            change = 100 * (self.ppl_after / self.ppl_before - 1)
            out.append(f"perplexity on the eval text: {self.ppl_before:.4f} -> {self.ppl_after:.4f} ({change:+.2f}%)")
        return out


def eval_ids(tokenizer: Tokenizer, text_file: str | Path, max_tokens: int, what: str = "eval") -> torch.Tensor:
    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} text file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # the bare codec error names no file
        raise ValueError(f"{what} text {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    ids = tokenizer.encode(text, bos=False)[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def quantize_folder(model_dir: str | Path, out: str | Path, method: str, group_size: int = 128,
                    eval_text: str | Path | None = None, eval_tokens: int = 16384, eval_seq_len: int = 256,
                    calibration: str | Path | None = None, calibration_tokens: int = 8192,
                    progress: Callable[[str, int, int], None] | None = None, device: str = "cpu",
                    eval_progress: Callable[[str, int, int], None] | None = None,
                    overwrite: bool = False) -> QuantizeReport:
    """Load `model_dir` in fp32, quantize its Linear layers (lm_head and embeddings stay), save to `out` (with the
    tokenizer files), and measure bytes and, given `eval_text`, perplexity before and after. `calibration` (a text
    file) selects GPTQ for int4. `progress(layer, done, total)` follows the layers, `eval_progress(stage, done,
    total)` the windows of each perplexity pass (stage "before" / "after"). A non-empty `out` is refused unless
    `overwrite`."""
    model_dir, out = Path(model_dir), Path(out)
    options = options_for(method, group_size)
    if calibration is not None and method != "int4":
        raise ValueError(f"--calibration (GPTQ) applies to int4 only, not {method}")
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out} is the input folder; write the quantized model elsewhere")
    if out.exists() and not out.is_dir():  # checked now, not after all the work when saving fails
        raise ValueError(f"--out {out} is a file, not a folder")
    refuse_non_empty(out, overwrite, "quantized model")
    model = from_pretrained(model_dir, device=parse_device(device))  # in its stored dtype: the "before" bytes
    done = quantization_config(model)
    if done is not None:  # else select_linears would only say that no nn.Linear is left
        raise ValueError(f"{model_dir} is already quantized ({done['method']}); quantize the original folder")
    bytes_before, stored_dtype = model_nbytes(model), model.lm_head.weight.dtype
    model.float()  # quantize from fp32 (a bf16 -> fp32 cast is exact)
    # nothing to quantize, or a layer the format does not fit: fails here, before any work
    layers = len(checked_linears(model, method, options.get("group_size")))
    tokenizer = Tokenizer(model_dir) if (eval_text or calibration) else None
    ids = eval_ids(tokenizer, eval_text, eval_tokens) if eval_text else None
    seq_len = min(eval_seq_len, model.config.max_position_embeddings)
    if ids is not None and len(ids) < seq_len:  # perplexity reads whole windows: say so before any work
        raise ValueError(f"--eval-text {eval_text} gives {len(ids)} tokens (--eval-tokens {eval_tokens}); "
                         f"perplexity needs at least {seq_len} tokens")
    calib = eval_ids(tokenizer, calibration, calibration_tokens, "calibration") if calibration else None
    if calib is not None and len(calib) < seq_len:  # GPTQ reads whole windows too
        raise ValueError(f"--calibration {calibration} gives {len(calib)} tokens; GPTQ needs at least {seq_len}")

    def measure(m: torch.nn.Module, stage: str) -> float | None:
        report = (lambda done, total: eval_progress(stage, done, total)) if eval_progress else None
        return perplexity(m, ids, seq_len, progress=report) if ids is not None else None

    ppl_before = measure(model, "before")

    quantizer = None
    if calib is not None:
        quantizer = gptq_quantizer(model, calib, seq_len, group_size=options["group_size"])
    quantize_model(model, method, group_size=options.get("group_size"), quantizer=quantizer, progress=progress)
    # the tokenizer first: save_pretrained writes config.json last, so a crash never leaves a folder that loads as
    # a model but lacks its tokenizer
    out.mkdir(parents=True, exist_ok=True)
    remove_model_files(out)
    for name in (*TOKENIZER_FILES, TEMPLATE_FILE):  # the template a fine-tuned folder records: chat keeps using it
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    save_pretrained(model, out, dtype=stored_dtype)
    del model
    saved = from_pretrained(out, device=device)  # measured as the engine will load it
    bytes_after = model_nbytes(saved)
    ppl_after = measure(saved.float(), "after")
    return QuantizeReport(out, method, options, layers, bytes_before, bytes_after, ppl_before, ppl_after)

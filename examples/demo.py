"""The end-to-end demo behind `make demo`. Each stage prints what it did; later stages (pretraining on Shakespeare,
instruction tuning, serving) are added here as they land.

Stage 1 (core): build a small LLaMA, save it as a Hugging Face folder, load it back, check the logits survived the
round trip bit for bit, and stream text from it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import camelid
from camelid.cli import build_byte_tokenizer


def stage_core(out: Path) -> Path:
    print("== 1. core: build -> save -> load -> stream")
    torch.manual_seed(0)
    config = camelid.PRESETS["tiny"].replace(num_hidden_layers=4, max_position_embeddings=256)
    tokenizer = build_byte_tokenizer()
    config = config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model = camelid.Transformer(config).eval()
    folder = camelid.save_pretrained(model, out / "tiny-random", max_shard_size="500KB")
    tokenizer.save(folder)
    files = sorted(p.name for p in folder.iterdir())
    print(f"saved {model.num_parameters():,} parameters to {folder}: {', '.join(files)}")

    loaded = camelid.from_pretrained(folder)
    ids = torch.tensor([tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        same = torch.equal(model(ids), loaded(ids))
    print(f"reloaded: logits identical to the saved model: {same}")
    if not same:
        raise SystemExit("round trip changed the logits")

    prompt = "To be, or not to be"
    print(f"streaming 48 tokens from the (untrained, random) model after {prompt!r}:")
    start = time.perf_counter()
    pieces = list(camelid.stream(loaded, camelid.Tokenizer(folder), prompt, max_new_tokens=48, temperature=0.9, seed=0))
    print("  " + repr("".join(pieces)))
    print(f"  {len(pieces)} pieces in {time.perf_counter() - start:.2f} s (random weights print noise; "
          "the pretraining stage will make this readable)")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-out", help="where the demo writes its model folders")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage_core(out)
    print("demo finished")


if __name__ == "__main__":
    main()

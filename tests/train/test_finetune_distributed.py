"""PEFT fine-tuning on 2 CPU processes (gloo) trains exactly like one process with the same global batch, under DDP
and FSDP2: the same loss curve and val loss (the eval set sharded over the ranks), and the same adapter folder,
gathered from the shards and written by rank 0.

The 2-process runs share one torchrun launch (this file is its script, see `worker`): starting torch in two
processes costs more than the runs themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import eval_rows, sample_rows, step_rows, write_finetune_base

from camelid.checkpoint import from_pretrained
from camelid.peft import load_adapter
from camelid.train.finetune import finetune, load_config

STEPS = 6
# name -> (method, strategy): LoRA under both strategies; under fsdp, the virtual-token methods, whose parameters
# sit in FSDP's root unit and act through hooks (prefix: a cache wrapper that reaches every block; prompt: soft
# embeddings in, their logits sliced off), and bitfit, which adds parameters to the blocks' Linear layers
RUNS = {"lora-ddp": ("lora", "ddp"), "lora-fsdp": ("lora", "fsdp"), "prefix-fsdp": ("prefix", "fsdp"),
        "prompt-fsdp": ("prompt", "fsdp"), "bitfit-fsdp": ("bitfit", "fsdp")}


def run_config(root: Path, name: str, method: str, strategy: str, micro_batch: int):
    """One run's (FinetuneSpec, TrainConfig). fp32, no LoRA dropout: each rank draws its own dropout masks, so
    dropout would make 2 ranks differ from 1 process by design. lr 3e-3: the gradient summed as 2 all-reduced
    halves rounds differently from one batch's, and Adam's 1 / sqrt(v) magnifies that where a gradient is near
    zero (at lr 1e-2 the prefix differed by 3e-5 after 6 steps; at 3e-3 every tensor stays within 1e-6).
    6 of the 40 records are held out: 3 eval batches of 2 on 2 ranks, so under fsdp one rank runs a dropped forward."""
    spec, cfg = load_config(None, dict(base=str(root / "base"), data=[str(root / "alpaca.json")], method=method,
                                       template="alpaca", lora_dropout=0.0, num_virtual_tokens=4,
                                       eval_fraction=0.15),
                            dict(out=str(root / name), max_steps=STEPS, micro_batch=micro_batch, seq_len=96,
                                 lr=3e-3, eval_every=3, save_every=0, sample_every=3, sample_tokens=4,
                                 sample_prompt="What is", strategy=strategy, device="cpu", precision="fp32",
                                 tensorboard=False, log_every=1000))
    return spec, cfg


def worker(root: Path) -> None:
    """torchrun's entry (`python this_file.py ROOT`): every run of RUNS in one process group, 2 rows per rank;
    then rank0_outputs on models that differ per rank, each rank's outputs written to ROOT/outputs_RANK.json."""
    from camelid.train import distributed

    rank, _, _ = distributed.setup("cpu")  # the loop then leaves the group open between runs
    try:
        for name, (method, strategy) in RUNS.items():
            spec, cfg = run_config(root, name, method, strategy, micro_batch=2)
            finetune(cfg, spec, log=lambda s: None)
        torch.manual_seed(rank)
        layer, x = torch.nn.Linear(3, 4), torch.ones(1, 3)
        with torch.no_grad(), distributed.rank0_outputs(layer):
            shared = layer(x)
        own = layer(x).detach()
        (root / f"outputs_{rank}.json").write_text(json.dumps({"shared": shared.tolist(), "own": own.tolist()}))
    finally:
        distributed.teardown()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny random LLaMA (root/base) and 40 Alpaca records (root/alpaca.json)."""
    root = tmp_path_factory.mktemp("ftdist")
    write_finetune_base(root)
    return root


@pytest.fixture(scope="module")
def two_ranks(root):
    """Every run of RUNS on 2 processes; the folder that holds their outputs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=240)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))  # their tracebacks
    assert proc.returncode == 0, (ranks or proc.stderr)[-4000:]
    return root


@pytest.fixture(scope="module")
def single(root):
    """method -> the TrainResult of its run in one process, 4 rows per step (run once, when first asked for)."""
    results: dict = {}

    def get(method: str):
        if method not in results:
            spec, cfg = run_config(root, f"single-{method}", method, "none", micro_batch=4)
            results[method] = finetune(cfg, spec, log=lambda s: None)
        return results[method]

    return get


def logits(root: Path, adapter: Path) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        return load_adapter(from_pretrained(root / "base"), adapter).eval()(ids)  # (1, 6, V)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_match_one_process(two_ranks, single, name):
    out, ref = two_ranks / name, single(RUNS[name][0])
    rows = {r["step"]: r["loss"] for r in step_rows(out)}
    assert sorted(rows) == list(range(1, STEPS + 1))  # rank 0 alone writes metrics
    for step in rows:
        assert abs(rows[step] - ref.losses[step]) < 1e-5, (step, rows[step], ref.losses[step])
    # the eval set is split over the ranks, and the summed loss is the same number
    evals = eval_rows(out)
    assert evals == pytest.approx(eval_rows(ref.out), abs=1e-5) and sorted(evals) == [3, 6]
    assert abs(evals[6] - evals[3]) > 1e-4  # the adapter moved: matching is not two runs that did nothing
    assert [r["step"] for r in sample_rows(out)] == [3, 6]  # rank 0 logs; under fsdp every rank decodes

    # the adapter folder: gathered whole, the same tensors and the same logits as the single process's
    final = out / "final"
    assert json.loads((final / "camelid_template.json").read_text())["template"] == "alpaca"
    mine, want = load_file(final / "adapter_model.safetensors"), load_file(ref.final_dir / "adapter_model.safetensors")
    assert mine.keys() == want.keys()
    for key in want:
        assert mine[key].shape == want[key].shape, key
        torch.testing.assert_close(mine[key], want[key], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(two_ranks, final), logits(two_ranks, ref.final_dir), rtol=0, atol=1e-5)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary folder left by the atomic writes
    if RUNS[name][1] == "fsdp":  # the sharded checkpoint of the last step: one DCP shard file per rank
        assert len(list((out / "checkpoints" / f"step_{STEPS:08d}" / "dcp").glob("*.distcp"))) == 2


@pytest.mark.slow
def test_rank0_outputs_makes_every_rank_see_rank_0s(two_ranks):
    """What keeps a sharded sample decode in step: a forward returns rank 0's output on every rank."""
    r0, r1 = (json.loads((two_ranks / f"outputs_{rank}.json").read_text()) for rank in (0, 1))
    assert r0["own"] != r1["own"]  # the ranks' layers differ (seeded by rank)
    assert r0["shared"] == r1["shared"] == r0["own"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    # everything is written and checked by the tests above: skip interpreter shutdown, where gloo's threads once
    # aborted a finished rank (SIGABRT after its last file was written), failing the whole fixture
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

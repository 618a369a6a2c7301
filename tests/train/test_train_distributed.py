"""The distributed seam: 2 CPU processes under torchrun (gloo) train exactly like one process, under DDP and
FSDP2 (fsdp = ZeRO-3, zero2); the DCP checkpoints of a sharded run resume on another number of processes."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY_MODEL, eval_rows, sample_rows, step_rows, tiny_train_config, torchrun_pretrain

from camelid.checkpoint import from_pretrained
from camelid.train import TrainConfig, train
from camelid.train.distributed import setup, unwrap
from camelid.train.state import export_checkpoint

STEPS = 6
# 2 ranks x micro_batch 1 x grad_accum 2: the same global batch of 4 windows as the single process's 4 x 1
TWO_RANKS = ("--max-steps", str(STEPS), "--micro-batch", "1", "--grad-accum", "2", "--eval-every", "3")


@pytest.fixture(scope="module")
def single(prepared, tmp_path_factory):
    """The reference: one process, micro_batch 4, fp32, evaluated at steps 3 and 6."""
    return train(tiny_train_config(prepared, tmp_path_factory.mktemp("single"), max_steps=STEPS, eval_every=3))


def assert_losses_match(out, single, steps) -> None:
    rows = {r["step"]: r for r in step_rows(out)}
    assert sorted(rows) == list(range(1, STEPS + 1))  # one row per step: rank 0 alone writes metrics
    for step in steps:
        assert abs(rows[step]["loss"] - single.losses[step]) < 1e-5, step
        assert rows[step]["tokens"] == step * 4 * 32


def test_single_process_setup():
    assert setup("cpu")[:2] == (0, 1)


def test_strategy_config():
    assert TrainConfig(strategy="zero2", precision="bf16").strategy == "zero2"
    with pytest.raises(ValueError, match="none, ddp, fsdp, zero2"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ValueError, match="not fp16"):
        TrainConfig(strategy="fsdp", precision="fp16")


@pytest.mark.slow
def test_ddp_two_processes_match_one(prepared, tmp_path, single):
    """2 ranks x micro_batch 1 x grad_accum 2 (no_sync on the first micro-batch) == 1 process x micro_batch 4."""
    out = tmp_path / "ddp"
    proc = torchrun_pretrain(prepared, out, *TWO_RANKS, "--strategy", "ddp")
    assert proc.stdout.count("wrote") == 1  # rank 0 alone reports and saves
    assert_losses_match(out, single, range(1, STEPS + 1))
    assert eval_rows(out) == pytest.approx(eval_rows(single.out), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_sharded_two_processes_match_one(prepared, tmp_path, single, strategy):
    """FSDP2 on 2 ranks == 1 process, through accumulation, eval, collective sampling, DCP checkpoints and the
    gathered final folder; then the 2 ranks' step-3 checkpoint resumes in 1 process and matches again."""
    out = tmp_path / strategy
    proc = torchrun_pretrain(prepared, out, *TWO_RANKS, "--strategy", strategy, "--save-every", "3",
                             "--set", "sample_every=3")
    assert proc.stdout.count("wrote") == 1
    assert_losses_match(out, single, range(1, STEPS + 1))
    assert eval_rows(out) == pytest.approx(eval_rows(single.out), abs=1e-5)
    assert [r["step"] for r in sample_rows(out)] == [3, 6]  # every rank decodes, rank 0 alone logs

    # checkpoints: a DCP folder (one shard file per rank), no full safetensors; the final folder is gathered whole
    ckpt = out / "checkpoints" / "step_00000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").is_file()
    final, want = load_file(out / "final" / "model.safetensors"), load_file(single.final_dir / "model.safetensors")
    assert final.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(final[key], want[key], rtol=0, atol=1e-5)
    model = from_pretrained(out / "final")
    assert model.config.vocab_size == 320 and str(model.lm_head.weight.dtype) == "torch.float32"
    exported = load_file(export_checkpoint(out / "checkpoints" / "step_00000006", tmp_path / "exported")
                         / "model.safetensors")
    assert all(torch.equal(exported[k], final[k]) for k in final)  # the last checkpoint holds the final weights

    # 2 -> 1: drop the step-6 checkpoint, resume from the 2 ranks' step 3 in one process
    resumed_out = tmp_path / "resumed"
    shutil.copytree(out, resumed_out)
    shutil.rmtree(resumed_out / "checkpoints" / "step_00000006")
    resumed = train(tiny_train_config(prepared, resumed_out, max_steps=STEPS, eval_every=3, save_every=3,
                                      strategy=strategy, resume=True))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed.losses[step] - single.losses[step]) < 1e-5
    assert (resumed_out / "checkpoints" / "step_00000006" / "dcp" / ".metadata").is_file()  # DCP in 1 process too


@pytest.mark.slow
def test_one_process_dcp_checkpoint_resumes_on_two(prepared, tmp_path, single):
    """1 -> 2: strategy fsdp in one process writes DCP checkpoints (nothing is sharded, the format is the same);
    2 ranks resume from its step 3 and continue like the uninterrupted single process."""
    out = tmp_path / "run"
    first = train(tiny_train_config(prepared, out, max_steps=STEPS, eval_every=3, save_every=3, strategy="fsdp"))
    assert first.losses == single.losses  # one process: the strategy changes only the checkpoint format
    assert (out / "checkpoints" / "step_00000003" / "dcp" / ".metadata").is_file()
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    torchrun_pretrain(prepared, out, *TWO_RANKS, "--strategy", "fsdp", "--save-every", "3", "--resume")
    assert_losses_match(out, single, range(4, STEPS + 1))
    assert abs(eval_rows(out)[6] - eval_rows(single.out)[6]) < 1e-5


@pytest.mark.slow
def test_safetensors_checkpoint_of_a_tied_moe_model_resumes_under_fsdp(prepared, tmp_path):
    """A ddp run's checkpoint (safetensors + index-keyed optimizer.pt) loads into FSDP shards on 2 ranks. The model
    is Gemma-style tied (lm_head is embed_tokens: one parameter in FSDP's root unit) and MoE (an expert that gets
    no token on one rank still takes part in the reduce-scatter)."""
    shape = dict(tie_word_embeddings=True, num_local_experts=4, num_experts_per_tok=1)
    out = tmp_path / "run"
    first = train(tiny_train_config(prepared, out, max_steps=STEPS, save_every=3, strategy="ddp",
                                    model_overrides={**TINY_MODEL, **shape}))
    assert (out / "checkpoints" / "step_00000003" / "optimizer.pt").is_file()
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    flags = [arg for key, value in shape.items() for arg in ("--set", f"model_overrides.{key}={value}")]
    torchrun_pretrain(prepared, out, *TWO_RANKS, "--strategy", "fsdp", "--save-every", "3", "--resume", *flags)
    rows = {r["step"]: r["loss"] for r in step_rows(out)}
    for step in (4, 5, 6):
        assert abs(rows[step] - first.losses[step]) < 1e-5
    model = from_pretrained(out / "final")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_unwrap_plain_module():
    lin = torch.nn.Linear(2, 2)
    assert unwrap(lin) is lin


@pytest.mark.slow
def test_fsdp_bf16_true_two_processes(prepared, tmp_path):
    """bf16-true under FSDP2: bf16 shards, gradients reduced in fp32, a bf16 final folder; the losses follow one
    bf16-true process (bf16 rounding, not bit for bit: the reduce order differs)."""
    one = train(tiny_train_config(prepared, tmp_path / "one", max_steps=STEPS, eval_every=3, precision="bf16-true"))
    out = tmp_path / "fsdp"
    torchrun_pretrain(prepared, out, *TWO_RANKS, "--strategy", "fsdp", "--precision", "bf16-true")
    rows = {r["step"]: r["loss"] for r in step_rows(out)}
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step in rows:
        assert abs(rows[step] - one.losses[step]) < 0.02, step
    final = load_file(out / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_ddp_two_processes_untied_moe(prepared, tmp_path):
    """DDP on an MoE model looks for unused parameters (an expert may get no token); lm_head is then applied inside
    the forward (the chunked loss), or DDP would see the fused loss's lm_head gradient as a second one."""
    shape = dict(num_local_experts=4, num_experts_per_tok=2)
    one = train(tiny_train_config(prepared, tmp_path / "one", max_steps=STEPS, eval_every=3,
                                  model_overrides={**TINY_MODEL, **shape}))
    out = tmp_path / "ddp"
    flags = [arg for key, value in shape.items() for arg in ("--set", f"model_overrides.{key}={value}")]
    torchrun_pretrain(prepared, out, *TWO_RANKS, "--strategy", "ddp", *flags)
    rows = {r["step"]: r["loss"] for r in step_rows(out)}
    for step in range(1, STEPS + 1):
        assert abs(rows[step] - one.losses[step]) < 1e-5, step

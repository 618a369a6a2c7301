"""The loop: exact resume, accumulation equivalence, mixed precision, and a batch source of one's own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY_MODEL, optimizer_steps, step_rows, tiny_train_config

from camelid.checkpoint import from_pretrained
from camelid.config import get_preset
from camelid.model import Transformer
from camelid.train import train
from camelid.train.loss import loss_fn
from camelid.train.state import latest_checkpoint, list_checkpoints


class Crash(Exception):
    pass


def crash_at(step: int):
    def hook(s: int, loss: torch.Tensor) -> torch.Tensor:
        if s == step:
            raise Crash(f"killed at step {s}")
        return loss
    return hook


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_resume_is_bit_exact(prepared, tmp_path):
    """20 steps in one go == 10 steps, a crash, then --resume to 20: every loss and every weight identical."""
    settings = dict(max_steps=20, save_every=10, eval_every=5, warmup_steps=4)
    straight = train(tiny_train_config(prepared, tmp_path / "a", **settings))

    b = tmp_path / "b"
    with pytest.raises(Crash):  # steps 11 and 12 are logged, then the process "dies" in step 13
        train(tiny_train_config(prepared, b, **settings), loss_hook=crash_at(13))
    assert latest_checkpoint(b / "checkpoints").name == "step_00000010"
    resumed = train(tiny_train_config(prepared, b, resume=True, **settings))

    assert sorted(resumed.losses) == list(range(11, 21))
    rows_a, rows_b = step_rows(tmp_path / "a"), step_rows(b)
    assert [r["step"] for r in rows_b] == list(range(1, 21))  # the crashed run's steps 11-12 were dropped
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]  # exact, not approximate
    assert [r["lr"] for r in rows_a] == [r["lr"] for r in rows_b]
    assert (resumed.tokens_seen, resumed.best_val_loss) == (straight.tokens_seen, straight.best_val_loss)
    wa, wb = weights(straight.final_dir), weights(resumed.final_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_crash_mid_metrics_row(prepared, tmp_path):
    """A process killed while writing a metrics.jsonl row leaves half a line: --resume and `camelid plot` still work,
    and the torn row is dropped."""
    from camelid.train.metrics import read_metrics

    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(tiny_train_config(prepared, out, max_steps=8, save_every=4), loss_hook=crash_at(6))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 3.1')  # no newline: the kill came mid-write
    assert [r["step"] for r in read_metrics(out)][-1] == 5
    train(tiny_train_config(prepared, out, max_steps=8, save_every=4, resume=True))
    assert [r["step"] for r in step_rows(out)] == list(range(1, 9))


def test_grad_accumulation_equivalence(prepared, tmp_path):
    """micro_batch 4 x grad_accum 1 and 1 x 4 draw the same global batch and compute the same gradient.

    The gradients differ only by float summation order (~1e-7 relative). AdamW divides by sqrt(v) + eps, which
    turns that into update differences of up to lr * |dg| / eps on coordinates whose gradient is ~0, so this test
    uses eps = 1e-6 (the weights then agree to 1e-6; with 1e-8 a few coordinates drift by ~3e-6)."""
    settings = dict(max_steps=6, eval_every=3, eps=1e-6)
    one = train(tiny_train_config(prepared, tmp_path / "a", micro_batch=4, grad_accum=1, **settings))
    four = train(tiny_train_config(prepared, tmp_path / "b", micro_batch=1, grad_accum=4, **settings))
    assert one.best_val_loss == pytest.approx(four.best_val_loss, abs=1e-6)
    assert one.losses.keys() == four.losses.keys()
    for step in one.losses:
        assert one.losses[step] == pytest.approx(four.losses[step], abs=1e-6)
    wa, wb = weights(one.final_dir), weights(four.final_dir)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(prepared, tmp_path, precision):
    """bf16 autocast (and fp16 with a GradScaler) run on CPU, stay close to fp32, and learn."""
    ref = train(tiny_train_config(prepared, tmp_path / "fp32", max_steps=8))
    cfg = tiny_train_config(prepared, tmp_path / precision, max_steps=8, precision=precision, save_every=4)
    mixed = train(cfg)
    assert mixed.losses[1] == pytest.approx(ref.losses[1], abs=0.05)
    assert mixed.losses[8] < mixed.losses[1] - 0.2
    ckpt = latest_checkpoint(tmp_path / precision / "checkpoints")
    assert (ckpt / "scaler.pt").is_file() == (precision == "fp16")
    if precision == "fp16":  # an overflow at the initial 2**16 scale is skipped, not applied
        assert optimizer_steps(ckpt) >= 4


def test_bf16_true_trains_in_bf16_and_resumes_bit_exactly(prepared, tmp_path):
    """precision bf16-true: weights, gradients and AdamW state in bf16 (no fp32 master copy); it learns, and
    10 steps + resume + 10 equal 20 in one go, as in fp32."""
    settings = dict(max_steps=16, save_every=8, precision="bf16-true", lr=1e-2)
    seen = {}

    def spy(step, loss):  # the optimizer has run once by step 2: its state exists
        if step == 2:
            import gc
            # type(), not isinstance(): a dead weakref.proxy (torch.compile leaves some) raises on attribute access
            optimizers = [o for o in gc.get_objects() if type(o) is torch.optim.AdamW]
            seen["state"] = {t.dtype for o in optimizers for s in o.state.values() for k, t in s.items()
                             if k != "step"}
        return loss

    straight = train(tiny_train_config(prepared, tmp_path / "a", **settings), loss_hook=spy)
    assert seen["state"] == {torch.bfloat16}
    assert {t.dtype for t in weights(straight.final_dir).values()} == {torch.bfloat16}
    assert straight.losses[16] < straight.losses[1] - 0.2
    b = tmp_path / "b"
    with pytest.raises(Crash):
        train(tiny_train_config(prepared, b, **settings), loss_hook=crash_at(10))
    resumed = train(tiny_train_config(prepared, b, resume=True, **settings))
    assert [resumed.losses[s] for s in range(9, 17)] == [straight.losses[s] for s in range(9, 17)]
    wa, wb = weights(straight.final_dir), weights(resumed.final_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_are_model_folders_and_pruned(prepared, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_train_config(prepared, out, max_steps=12, save_every=3, eval_every=3, keep_last=2))
    kept = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert kept[-2:] == ["step_00000009", "step_00000012"] and len(kept) <= 3  # the last 2 + the best
    model = from_pretrained(out / "checkpoints" / kept[-1])
    assert model.config.vocab_size == 320  # the data's 300 tokens rounded up to a multiple of 64
    assert from_pretrained(result.final_dir).config.hidden_size == TINY_MODEL["hidden_size"]


class MaskedBatches:
    """A fine-tuning-like source: one fixed random global batch per step with some labels ignored (-100), cut
    into micro-batches and ranks the same way as PretrainBatches."""

    def __init__(self, micro_batch: int, grad_accum: int, vocab: int = 64, seq_len: int = 16, global_batch: int = 4):
        self.micro_batch, self.grad_accum, self.vocab, self.seq_len = micro_batch, grad_accum, vocab, seq_len
        self.global_batch = global_batch

    def _global(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, self.vocab, (self.global_batch, self.seq_len), generator=g)
        labels = torch.roll(x, -1, dims=1)
        # very uneven target counts per row: a per-micro-batch mean would weight them wrongly
        keep = torch.rand(self.global_batch, self.seq_len, generator=g) < torch.tensor([[0.1], [0.9], [0.5], [1.0]])
        return {"input_ids": x, "labels": torch.where(keep, labels, -100)}

    def batch(self, step: int, micro: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        chunk = rank * self.grad_accum + micro
        return {k: v[chunk * self.micro_batch:(chunk + 1) * self.micro_batch] for k, v in self._global(step).items()}

    def eval_batches(self):
        yield self._global(10_000)


def test_own_model_and_batch_source_with_masked_labels(tmp_path):
    """The loop knows nothing of pretraining: a model and batch source passed in, labels with -100 holes; the loss
    is normalised by the target tokens of the whole step, so 4 x 1 == 1 x 4 still holds."""
    config = get_preset("tiny").replace(vocab_size=64, **TINY_MODEL)
    results = []
    for micro, accum in ((4, 1), (1, 4)):
        torch.manual_seed(0)
        model = Transformer(config)
        cfg = tiny_train_config(None, tmp_path / f"{micro}x{accum}", micro_batch=micro, grad_accum=accum,
                                max_steps=4, seq_len=16, eval_every=2)
        results.append(train(cfg, model=model, batches=MaskedBatches(micro, accum)))
    a, b = results
    assert a.best_val_loss == pytest.approx(b.best_val_loss, abs=1e-6)
    for step in a.losses:
        assert a.losses[step] == pytest.approx(b.losses[step], abs=1e-6)
    assert (a.final_dir / "model.safetensors").is_file() and not (a.final_dir / "tokenizer.json").exists()


def test_chunked_loss_matches_one_piece():
    """loss_fn's chunked, checkpointed cross-entropy (the path for heads the fused loss cannot take): the same sum and
    the same gradients as one F.cross_entropy."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=64, **TINY_MODEL))
    batch = MaskedBatches(4, 1)._global(3)
    results = []
    for chunk in (10_000, 7):  # one piece; 64 tokens in 10 uneven chunks
        model.zero_grad()
        loss = loss_fn(model, batch, chunk=chunk, fused=False)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (whole, g1), (chunked, g2) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("change, message", [
    (dict(seq_len=16), "seq_len 32 -> 16"),
    (dict(seed=1), "seed 0 -> 1"),
    (dict(optimizer="lion"), "optimizer 'adamw' -> 'lion'"),
    (dict(model_overrides={**TINY_MODEL, "num_hidden_layers": 3}), "model_overrides"),
    (dict(micro_batch=2), "global batch was 4 x 1 x 1 process(es) = 4 sequences per step at step_00000002, "
                          "now 2 x 1 x 1 = 2"),
    (dict(grad_accum=2), "now 4 x 2 x 1 = 8"),
])
def test_resume_refuses_a_change_that_breaks_the_run(prepared, tmp_path, change, message):
    """A checkpoint continues bit for bit only with the same model, data windows and optimizer: a changed seq_len,
    seed, optimizer, model or global batch is refused before anything loads, naming the old and new values."""
    out = tmp_path / "run"
    train(tiny_train_config(prepared, out, max_steps=2, save_every=2))
    with pytest.raises(ValueError, match="--resume") as refused:
        train(tiny_train_config(prepared, out, max_steps=4, resume=True, **change))
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert [r["step"] for r in step_rows(out)] == [1, 2]  # nothing ran


def test_resume_accepts_a_legitimate_change_with_a_note(prepared, tmp_path, capsys):
    """More steps, another lr, or the same global batch split otherwise: the run goes on and says what changed."""
    out = tmp_path / "run"
    train(tiny_train_config(prepared, out, max_steps=2, save_every=2))
    capsys.readouterr()
    result = train(tiny_train_config(prepared, out, max_steps=4, resume=True, lr=1e-3, micro_batch=2, grad_accum=2))
    assert sorted(result.losses) == [3, 4]
    err = capsys.readouterr().err
    assert "changed since the checkpoint:" in err and "max_steps 2 -> 4" in err and "lr 0.003 -> 0.001" in err


def test_resume_drops_the_crashed_sessions_tensorboard_steps(prepared, tmp_path):
    """metrics.jsonl loses the rows after the checkpoint on resume; TensorBoard must too, or it shows those steps
    twice (two curves when the resumed run changed its lr)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(tiny_train_config(prepared, out, max_steps=8, save_every=4, tensorboard=True), loss_hook=crash_at(7))
    train(tiny_train_config(prepared, out, max_steps=8, save_every=4, tensorboard=True, resume=True, lr=1e-3))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


def test_resume_refuses_max_steps_below_the_checkpoints_step(prepared, tmp_path):
    """A checkpoint past the new max_steps cannot give that shorter run: refused, rather than rewriting final/ from
    the later step and reporting it as the run asked for."""
    out = tmp_path / "run"
    train(tiny_train_config(prepared, out, max_steps=4, save_every=2))
    final = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="--resume") as refused:
        train(tiny_train_config(prepared, out, max_steps=2, resume=True))
    assert "step_00000004 is at step 4, past max_steps 2" in str(refused.value) and "\n" not in str(refused.value)
    assert (out / "final" / "model.safetensors").read_bytes() == final

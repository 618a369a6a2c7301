"""The gradient noise scale: the estimator on synthetic gradients with a known answer, and the loop logging it."""

from __future__ import annotations

import pytest
import torch
from train_helpers import TINY_MODEL, step_rows, tiny_train_config

from camelid.config import get_preset
from camelid.model import Transformer
from camelid.train import TrainConfig, train
from camelid.train.gns import NoiseScale, unbiased_estimates


def test_unbiased_estimates_exact_on_expected_norms():
    # E|G_B|^2 = |G|^2 + tr(S)/B: with |G|^2 = 2, tr(S) = 64, B = 8 and 64 the expectations are 10 and 3
    assert unbiased_estimates(10.0, 3.0, 8, 64) == pytest.approx((2.0, 64.0))


def test_noise_scale_recovers_a_known_value_from_sampled_gradients():
    # per-example gradients G + N(0, sigma^2 I) in d dims: tr(Sigma) = d sigma^2, B_simple = d sigma^2 / |G|^2
    g = torch.Generator().manual_seed(0)
    d, sigma, b_small, b_big = 1000, 0.5, 16, 128
    G = torch.randn(d, generator=g) * 0.1  # |G|^2 ~ 10
    expected = d * sigma**2 / float(G @ G)
    est = NoiseScale(decay=0.99)
    for _ in range(400):
        examples = G + sigma * torch.randn(b_big, d, generator=g)
        small, big = examples[:b_small].mean(0), examples.mean(0)
        value = est.update(float(small @ small), float(big @ big), b_small, b_big)
    assert value == pytest.approx(expected, rel=0.1)


class CountingBatches:
    """Sequences that count up from a random start (mod vocab): learnable, so the true gradient is large next to
    the noise and |G|^2's estimate is positive from the first steps (pure random tokens can be all noise)."""

    def __init__(self, micro_batch: int, vocab: int = 64, seq_len: int = 16, same_micro: bool = False):
        self.micro_batch, self.vocab, self.seq_len, self.same_micro = micro_batch, vocab, seq_len, same_micro

    def batch(self, step: int, micro: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step * 1000 + (0 if self.same_micro else micro))
        start = torch.randint(0, self.vocab, (self.micro_batch, 1), generator=g)
        x = (start + torch.arange(self.seq_len + 1)) % self.vocab
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def eval_batches(self):
        return iter(())


def test_loop_logs_gns_and_critical_batch(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=64, **TINY_MODEL))
    cfg = tiny_train_config(None, tmp_path, micro_batch=2, grad_accum=4, max_steps=6, seq_len=16, measure_gns=True,
                            sample_every=0)
    train(cfg, model=model, batches=CountingBatches(2))
    rows = step_rows(tmp_path)
    logged = [r for r in rows if r.get("gns") is not None]
    assert len(logged) >= 3, rows
    for r in logged:  # 8 sequences of 16 targets a step: critical batch (sequences) = gns (tokens) / 16
        assert r["critical_batch"] == pytest.approx(r["gns"] / 16)


def test_identical_micro_batches_have_no_noise(tmp_path):
    """Every micro-batch the same: the micro-batch gradient (as the loop rescales it) equals the step's, so
    tr(Sigma) = 0. A wrong rescaling of micro-batch 0's gradient would show here as a non-zero noise scale."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=64, **TINY_MODEL))
    cfg = tiny_train_config(None, tmp_path, micro_batch=2, grad_accum=2, max_steps=3, seq_len=16, measure_gns=True,
                            sample_every=0)
    train(cfg, model=model, batches=CountingBatches(2, same_micro=True))
    values = [r["gns"] for r in step_rows(tmp_path)]
    assert values and all(abs(v) < 1e-3 for v in values), values


def test_measure_gns_needs_accumulation():
    with pytest.raises(ValueError, match="grad_accum >= 2"):
        TrainConfig(measure_gns=True, grad_accum=1)

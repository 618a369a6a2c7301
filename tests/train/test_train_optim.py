"""Learning-rate schedule, Lion, weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from camelid.config import get_preset
from camelid.model import Transformer
from camelid.train import Lion, TrainConfig, lr_at
from camelid.train.optim import build_optimizer, param_groups


def test_lr_schedule_endpoints():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(1, cfg) == pytest.approx(0.1)  # the first step already moves
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # end of warmup: the peak
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way down the cosine: (lr + min_lr) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)  # the last step: min_lr
    assert lr_at(500, cfg) == pytest.approx(0.1)  # past max_steps (a run extended on resume): stays at min_lr
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    no_warmup = TrainConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=4)
    assert lr_at(1, no_warmup) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(4, no_warmup) == pytest.approx(0.0)


def test_lion_matches_a_hand_computed_step():
    lr, b1, b2, wd = 0.1, 0.9, 0.99, 0.5
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    g1, g2 = [0.5, 0.3, -0.1], [-0.01, 0.3, 0.2]

    def sign(x):
        return (x > 0) - (x < 0)

    want, m = [1.0, -2.0, 0.5], [0.0, 0.0, 0.0]
    for g in (g1, g2):
        p.grad = torch.tensor(g)
        opt.step()
        update = [sign(b1 * mi + (1 - b1) * gi) for mi, gi in zip(m, g)]
        want = [w * (1 - lr * wd) - lr * u for w, u in zip(want, update)]
        m = [b2 * mi + (1 - b2) * gi for mi, gi in zip(m, g)]
        torch.testing.assert_close(p.detach(), torch.tensor(want), rtol=0, atol=1e-7)
    # the second step's first coordinate: the gradient is negative, the momentum wins (+)
    assert want[0] == pytest.approx((1.0 * 0.95 - 0.1) * 0.95 - 0.1)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(m), rtol=0, atol=1e-7)


@pytest.mark.parametrize("tied", [False, True])
def test_no_decay_for_norms_biases_and_embeddings(tied):
    config = get_preset("tiny").replace(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_key_value_heads=1, qkv_bias=True, tie_word_embeddings=tied)
    model = Transformer(config)
    decay, other = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and other["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in other["params"]}
    assert "model.embed_tokens.weight" in no_decay and "model.norm.weight" in no_decay
    assert "model.layers.0.self_attn.q_proj.bias" in no_decay
    assert "model.layers.0.self_attn.q_proj.weight" in {names[id(p)] for p in decay["params"]}
    assert ("lm_head.weight" in {names[id(p)] for p in decay["params"]}) == (not tied)
    assert sum(p.numel() for g in (decay, other) for p in g["params"]) == model.num_parameters()


def test_build_optimizer_on_cpu():
    model = nn.Linear(4, 4)
    adamw = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["foreach"]
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="lion"), torch.device("cpu")), Lion)

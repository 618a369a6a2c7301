"""Sampling: greedy, seeded sampling, and temperature / top-k / top-p / min-p / repetition penalty against
transformers' processors."""

import math

import pytest
import torch

from camelid.engine.sampling_params import SamplingParams
from camelid.sampling import Sampling, apply_repetition_penalty, filter_logits, next_token

V = 100


def random_logits(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def no_history(batch: int) -> torch.Tensor:
    return torch.zeros(batch, 0, dtype=torch.long)


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=math.nan), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
    dict(top_p=-0.2), dict(min_p=-0.1), dict(min_p=1.5), dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
])
def test_invalid_parameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Sampling(**bad)


def test_greedy_is_argmax():
    logits = random_logits()
    assert Sampling().greedy
    torch.testing.assert_close(next_token(logits, no_history(8), Sampling()), logits.argmax(-1))
    # greedy ignores top_k / top_p and the seed
    greedy = Sampling(top_k=5, top_p=0.5, seed=3)
    torch.testing.assert_close(next_token(logits, no_history(8), greedy), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.0, 1e-7, 1e-5, 0.5])
def test_one_greedy_threshold_for_generate_and_the_engine(temperature):
    """A temperature so small that logits / temperature would overflow is greedy, in both samplers alike."""
    assert Sampling(temperature=temperature).greedy == SamplingParams(temperature=temperature).greedy
    assert Sampling(temperature=temperature).greedy == (temperature < 1e-5)
    if temperature < 1e-5:
        logits = random_logits()
        torch.testing.assert_close(next_token(logits, no_history(8), Sampling(temperature=temperature, seed=0)),
                                   logits.argmax(-1))


def test_top_k_1_is_greedy():
    logits = random_logits(64)
    for seed in range(5):
        s = Sampling(temperature=1.5, top_k=1, seed=seed)
        torch.testing.assert_close(next_token(logits, no_history(64), s, s.generator(logits.device)), logits.argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = torch.zeros(64, V)  # flat: every draw is a fresh choice

    def draws(seed: int) -> list[list[int]]:
        s = Sampling(temperature=1.0, seed=seed)
        g = s.generator(torch.device("cpu"))
        return [next_token(logits, no_history(64), s, g).tolist() for _ in range(3)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert draws(2**64 + 1) == draws(1)  # any int seed, taken mod 2**64 as the engine takes it (not an overflow)
    first = draws(1)
    assert first[0] != first[1]  # the generator advances between steps
    assert Sampling().generator(torch.device("cpu")) is None


def test_samples_follow_the_tempered_distribution():
    base = torch.tensor([2.0, 1.0, 0.0, -1.0])
    logits = torch.full((20000, V), -math.inf)
    logits[:, :4] = base
    for temperature in (0.5, 1.0, 2.0):
        s = Sampling(temperature=temperature, seed=0)
        tokens = next_token(logits, no_history(len(logits)), s, s.generator(logits.device))
        freq = torch.bincount(tokens, minlength=V)[:4].float() / len(tokens)
        torch.testing.assert_close(freq, (base / temperature).softmax(-1), atol=0.015, rtol=0)


def test_top_p_keeps_the_smallest_set():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.79) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.999) == [True, True, True, True]
    assert kept(0.1) == [True, False, False, False]  # the most likely token always survives


def test_top_k_keeps_k():
    logits = random_logits()
    for k in (1, 5, 50, V, V + 10):
        kept = torch.isfinite(filter_logits(logits, top_k=k)).sum(-1)
        assert (kept == min(k, V)).all()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 0.9, 0.0), (1.0, 0, 0.5, 0.0), (1.0, 0, 0.05, 0.0), (1.0, 10, 1.0, 0.0), (1.0, 1, 1.0, 0.0),
    (1.0, 20, 0.8, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.1), (1.3, 15, 0.9, 0.05), (1.0, 0, 1.0, 1.0),
])
def test_filters_match_transformers(temperature, top_k, top_p, min_p, transformers):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = random_logits(16, seed=top_k)
    input_ids = torch.zeros(16, 1, dtype=torch.long)
    ref = TemperatureLogitsWarper(temperature)(input_ids, logits.clone())  # transformers' order: temperature,
    if top_k:  # top-k, top-p, min-p
        ref = TopKLogitsWarper(top_k)(input_ids, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(input_ids, ref)
    if min_p > 0.0:
        ref = MinPLogitsWarper(min_p)(input_ids, ref)
    ours = filter_logits(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty, transformers):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = random_logits(4)  # both signs, so both branches (multiply negatives, divide positives) run
    seen = torch.randint(0, V, (4, 30), generator=torch.Generator().manual_seed(1))  # with repeats
    ref = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), ref, atol=0, rtol=0)


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    seen = torch.tensor([[0, 0, 0]])  # applied once per token however often it was seen
    assert next_token(logits, seen, Sampling()).item() == 0
    assert next_token(logits, seen, Sampling(repetition_penalty=1.2)).item() == 1
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.2), torch.tensor([[2.5, 2.9, -1.0]]))


def test_sampled_tokens_stay_inside_the_filters():
    logits = random_logits(256, seed=5)
    allowed = torch.isfinite(filter_logits(logits, 0.8, 7, 0.9, 0.2))
    assert (allowed.sum(-1) < 7).any()  # min-p cuts some rows below top-k's 7
    s = Sampling(temperature=0.8, top_k=7, top_p=0.9, min_p=0.2, seed=0)
    tokens = next_token(logits, no_history(256), s, s.generator(logits.device))
    assert allowed.gather(1, tokens[:, None]).all()


def test_bf16_logits_are_upcast():
    logits = random_logits().bfloat16()
    assert next_token(logits, no_history(8), Sampling()).dtype == torch.long

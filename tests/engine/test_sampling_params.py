"""SamplingParams: the defaults of the contract, and a one-line ValueError naming the field for every bad value."""

import dataclasses
import json
import math

import pytest
import torch

from camelid.engine.sampler import make_generator, sample
from camelid.engine.sampling_params import SamplingParams

V = 50


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (1, 16, 1.0, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.seed, p.logprobs) == ([], [], False, None, None)
    assert not p.greedy and not p.uses_penalties
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(frequency_penalty=0.1).uses_penalties


def test_lists_are_not_shared_between_instances():
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


def test_stop_accepts_one_string_and_copies_lists():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    stops = ["a"]
    p = SamplingParams(stop=stops, stop_token_ids=(2, 3))
    stops.append("b")
    assert p.stop == ["a"] and p.stop_token_ids == [2, 3]
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []


@pytest.mark.parametrize("edge", [
    dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(top_p=1.0), dict(top_p=1e-9), dict(min_p=0.0), dict(min_p=1.0),
    dict(temperature=0), dict(temperature=0.0), dict(temperature=100.0), dict(repetition_penalty=0.5),
    dict(presence_penalty=-2.0), dict(presence_penalty=2), dict(frequency_penalty=-2.0), dict(frequency_penalty=2.0),
    dict(seed=0), dict(seed=-5), dict(seed=2**70), dict(logprobs=0), dict(logprobs=20), dict(n=4), dict(max_tokens=1),
    dict(stop_token_ids=[0]), dict(ignore_eos=True),
])
def test_edge_values_are_accepted(edge):
    """Every edge value is accepted and samples: a valid token id comes back for each of a few random rows (the
    argmax where the setting leaves one token: greedy, top_k=1, a tiny top_p, min_p=1)."""
    p = SamplingParams(**edge)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3
    prompts, outputs = [[1, 2, 3]] * 4, [[4, 4], [], [0], [7, 8, 9]]
    result = sample(logits, [p] * 4, [make_generator(p.seed, i, "cpu") for i in range(4)], prompts, outputs)
    tokens = result.token_ids
    assert tokens.dtype == torch.long and tokens.shape == (4,) and ((0 <= tokens) & (tokens < V)).all()
    if p.greedy or p.top_k == 1 or p.top_p < 1e-6 or p.min_p == 1.0:
        assert torch.equal(tokens, logits.argmax(-1))
    if p.logprobs is not None:
        assert result.logprobs.shape == (4,) and (result.logprobs <= 0).all()
        assert result.top_ids.shape == (4, min(p.logprobs, V)) if p.logprobs else result.top_ids is None


@pytest.mark.parametrize("bad", [
    dict(n=0), dict(n=-1), dict(n=1.5), dict(n=True),
    dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=2.0), dict(max_tokens=None),
    dict(temperature=-0.1), dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature="1"),
    dict(top_k=-2), dict(top_k=2.5),
    dict(top_p=0.0), dict(top_p=-0.1), dict(top_p=1.01), dict(top_p=math.nan),
    dict(min_p=-0.01), dict(min_p=1.5), dict(min_p=math.nan),
    dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0), dict(repetition_penalty=math.nan),
    dict(repetition_penalty=math.inf),
    dict(presence_penalty=2.5), dict(presence_penalty=-2.01), dict(presence_penalty=math.nan),
    dict(frequency_penalty=3.0), dict(frequency_penalty=-2.5), dict(frequency_penalty=math.nan),
    dict(stop=[""]), dict(stop=[3]), dict(stop=3), dict(stop_token_ids=5), dict(stop=["ok", None]),
    dict(stop_token_ids=[-1]), dict(stop_token_ids=["2"]), dict(stop_token_ids=[1.0]),
    dict(ignore_eos="yes"),
    dict(seed=1.5), dict(seed="7"),
    dict(logprobs=-1), dict(logprobs=1.0), dict(logprobs=True),
])
def test_bad_values_name_the_field(bad):
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got ") as err:
        SamplingParams(**bad)
    assert "\n" not in str(err.value)


def test_logit_bias_takes_json_token_ids_and_checks_its_range():
    assert SamplingParams(logit_bias={"5": 100, 7: -100.0}).logit_bias == {5: 100, 7: -100.0}  # JSON spells keys
    assert SamplingParams(logit_bias=None).logit_bias == {}
    for bad in ({5: 100.5}, {5: -101}, {"x": 1}, {"-3": 1}, {"\u00b2": 1}, {5: "1"}, {5: math.nan}, [5]):
        with pytest.raises(ValueError, match=r"^logit_bias must be "):
            SamplingParams(logit_bias=bad)


def test_logit_bias_survives_the_json_a_worker_receives():
    p = SamplingParams(logit_bias={5: 100, 7: -2.5}, stop=["x"])
    assert SamplingParams(**json.loads(json.dumps(dataclasses.asdict(p)))) == p

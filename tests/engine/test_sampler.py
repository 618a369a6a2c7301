"""The engine's batched sampler: greedy rows, per-row filters and penalties against hand-worked examples and
transformers' logits processors, seeded draws that do not depend on the batch, sampled frequencies, raw logprobs."""

import dataclasses
import math

import pytest
import torch

from camelid.engine.sampler import (apply_penalties, filter_rows, group_rows, make_generator, sample,
                                    token_counts)
from camelid.engine.sampling_params import SamplingParams
from camelid.sampling import Sampling, apply_min_p, apply_top_k, apply_top_p, next_token, penalize_seen

V = 50


def random_logits(rows: int, seed: int = 0, vocab: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def random_ids(rows: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(0, length + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(rows)]


def kept(logits: torch.Tensor) -> list[list[bool]]:
    return torch.isfinite(logits).tolist()


# ---- greedy -------------------------------------------------------------------------------------------------------

def test_all_greedy_is_argmax():
    logits = random_logits(16)
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.2, min_p=0.5, seed=1)] * 16  # filters do not matter
    assert group_rows(params, [None] * 16).all_greedy
    assert torch.equal(sample(logits, params).token_ids, logits.argmax(-1))
    assert torch.equal(sample(logits.bfloat16(), params).token_ids, logits.bfloat16().float().argmax(-1))


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = random_logits(12, seed=1)
    params = [SamplingParams(temperature=0 if i % 3 else 1.5, seed=i) for i in range(12)]
    groups = group_rows(params, [None] * 12)
    assert groups.greedy == [1, 2, 4, 5, 7, 8, 10, 11] and groups.random == [0, 3, 6, 9] and groups.seeded == []
    tokens = sample(logits, params).token_ids
    assert torch.equal(tokens[groups.greedy], logits[groups.greedy].argmax(-1))
    # a temperature so small that logits / temperature would overflow is treated as greedy
    tiny = [SamplingParams(temperature=1e-7)] * 12
    assert torch.equal(sample(logits, tiny).token_ids, logits.argmax(-1))


def test_greedy_still_applies_the_penalties():
    logits = torch.tensor([[3.0, 2.9, -1.0, 2.0]])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy], prompt_ids=[[0]], output_ids=[[]]).token_ids.item() == 0
    repeat = SamplingParams(temperature=0, repetition_penalty=1.2)  # 3.0 / 1.2 = 2.5 < 2.9
    assert sample(logits, [repeat], prompt_ids=[[0]], output_ids=[[]]).token_ids.item() == 1
    presence = SamplingParams(temperature=0, presence_penalty=1.0)  # prompt tokens do not count: 0 stays first
    assert sample(logits, [presence], prompt_ids=[[0]], output_ids=[[]]).token_ids.item() == 0
    strong = SamplingParams(temperature=0, presence_penalty=1.5)  # output tokens do: 1.5 and 1.4 < 2.0, once each
    assert sample(logits, [strong], prompt_ids=[[]], output_ids=[[0, 1, 1, 0]]).token_ids.item() == 3
    frequency = SamplingParams(temperature=0, frequency_penalty=0.6)  # 3 - 0.6 * 2 = 1.8 < 2.0 < 2.9 - 0.6 = 2.3
    assert sample(logits, [frequency], prompt_ids=[[]], output_ids=[[0, 0, 1]]).token_ids.item() == 1
    assert sample(logits, [frequency], prompt_ids=[[]], output_ids=[[0, 0, 1, 1]]).token_ids.item() == 3


# ---- filters: hand-worked examples ---------------------------------------------------------------------------------

def test_top_k_by_hand_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]] * 4)
    out = apply_top_k(logits, torch.tensor([2, 3, 0, -1]))  # ties with the k-th are kept; 0 and -1 are off
    assert kept(out) == [[False, True, False, True, False], [False, True, True, True, False], [True] * 5, [True] * 5]
    assert kept(apply_top_k(logits[:1], 1)) == [[False, True, False, True, False]]
    torch.testing.assert_close(out[0, [1, 3]], logits[0, [1, 3]], atol=0, rtol=0)  # survivors are untouched


def test_top_p_by_hand_per_row():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 5).log()
    out = apply_top_p(logits, torch.tensor([0.5, 0.79, 0.81, 0.999, 1.0], dtype=torch.float64))
    assert kept(out) == [[True, False, False, False], [True, True, False, False], [True, True, True, False],
                         [True] * 4, [True] * 4]
    assert kept(apply_top_p(logits[:1], 0.01)) == [[True, False, False, False]]  # the top token always survives


def test_min_p_by_hand_per_row():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4).log()
    out = apply_min_p(logits, torch.tensor([0.5, 0.2, 0.09, 0.0]))  # thresholds 0.25, 0.1, 0.045, 0
    assert kept(out) == [[True, True, False, False], [True, True, True, False], [True] * 4, [True] * 4]
    assert kept(apply_min_p(logits[:1], 1.0)) == [[True, False, False, False]]
    tied = torch.tensor([[1.0, 1.0, 0.0]])  # equal probabilities: a token exactly at the threshold is kept
    assert kept(apply_min_p(tied, 1.0)) == [[True, True, False]]


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0], [2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False], [False, False, True, False]])
    out = penalize_seen(logits, seen, torch.tensor([2.0, 0.5]))  # < 1 promotes: 0.5 / 0.5 = 1.0
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 1.0], [2.0, -1.0, 1.0, 1.0]]))


def test_presence_and_frequency_by_hand():
    logits = torch.zeros(2, 5)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams(presence_penalty=-1.0)]
    out = apply_penalties(logits, params, prompt_ids=[[2, 2, 4], [0]], output_ids=[[1, 1, 1, 3], [4]])
    torch.testing.assert_close(out, torch.tensor([[0, -(0.5 + 0.75), 0, -(0.5 + 0.25), 0], [0, 0, 0, 0, 1.0]]))


def test_token_counts_handles_empty_rows():
    counts = token_counts([[], [3, 3, 0], []], 4, torch.device("cpu"))
    assert counts.tolist() == [[0, 0, 0, 0], [1, 0, 0, 2], [0, 0, 0, 0]]
    assert token_counts([[]], 4, torch.device("cpu")).tolist() == [[0, 0, 0, 0]]


# ---- filters and penalties against transformers -------------------------------------------------------------------

ROW_SETTINGS = [  # (temperature, top_k, top_p, min_p), one batch row each
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.05), (0.5, 10, 0.8, 0.0),
    (1.0, 20, 0.95, 0.1), (2.0, 1, 1.0, 0.0), (0.9, 0, 0.3, 0.2), (1.0, -1, 0.6, 0.0), (1.1, 3, 0.99, 0.3),
    (1.0, V, 0.05, 0.0), (0.8, V + 5, 1.0, 0.9),
]


def hf_warp(transformers, logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    out = TemperatureLogitsWarper(temperature)(ids, logits.clone())  # transformers' order: temperature, k, p, min-p
    if top_k > 0:
        out = TopKLogitsWarper(top_k)(ids, out)
    if top_p < 1.0:
        out = TopPLogitsWarper(top_p)(ids, out)
    if min_p > 0.0:
        out = MinPLogitsWarper(min_p)(ids, out)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_chain_matches_transformers_row_by_row(seed, transformers):
    logits = random_logits(len(ROW_SETTINGS), seed=seed)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in ROW_SETTINGS]
    ours = filter_rows(logits, params)  # every row in one batch, each with its own settings
    for row, settings in enumerate(ROW_SETTINGS):
        ref = hf_warp(transformers, logits[row:row + 1], *settings)
        assert kept(ours[row:row + 1]) == kept(ref), settings
        torch.testing.assert_close(ours[row:row + 1], ref, atol=0, rtol=0)


@pytest.mark.parametrize("name,values", [("top_k", [1, 4, 9, 0, 30, -1]), ("top_p", [0.1, 0.5, 0.77, 0.9, 0.999, 1.0]),
                                         ("min_p", [0.0, 0.01, 0.1, 0.33, 0.8, 1.0])])
def test_each_filter_matches_transformers(name, values, transformers):
    from transformers.generation import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ours_fn = {"top_k": apply_top_k, "top_p": apply_top_p, "min_p": apply_min_p}[name]
    ref_cls = {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper, "min_p": MinPLogitsWarper}[name]
    off = {"top_k": (0, -1), "top_p": (1.0,), "min_p": (0.0,)}[name]  # transformers refuses these: no warper
    logits = random_logits(len(values), seed=7)
    ours = ours_fn(logits, torch.tensor(values, dtype=torch.float64 if name == "top_p" else None))
    ids = torch.zeros(1, 1, dtype=torch.long)
    for row, value in enumerate(values):
        ref = logits[row:row + 1] if value in off else ref_cls(value)(ids, logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], ref, atol=0, rtol=0)


def test_repetition_penalty_matches_transformers_over_prompt_and_output(transformers):
    from transformers.generation import RepetitionPenaltyLogitsProcessor

    penalties = [1.3, 0.7, 1.0, 2.0, 1.05]
    logits = random_logits(len(penalties), seed=3)  # both signs, so both branches run
    prompts, outputs = random_ids(len(penalties), 20, seed=4), random_ids(len(penalties), 15, seed=5)
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    ours = apply_penalties(logits, params, prompts, outputs)
    for row, penalty in enumerate(penalties):
        history = torch.tensor([prompts[row] + outputs[row] or [0]])
        ref = logits[row:row + 1] if not prompts[row] + outputs[row] else \
            RepetitionPenaltyLogitsProcessor(penalty)(history, logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], ref, atol=0, rtol=0)


def test_presence_and_frequency_follow_openai_formula():
    presence, frequency = [0.0, 0.4, -0.3, 1.5, 2.0], [0.7, 0.0, 0.2, -0.5, 2.0]
    logits = random_logits(5, seed=8)
    prompts, outputs = random_ids(5, 30, seed=9), random_ids(5, 30, seed=10)
    params = [SamplingParams(presence_penalty=p, frequency_penalty=f) for p, f in zip(presence, frequency)]
    ours = apply_penalties(logits, params, prompts, outputs)
    expected = logits.clone()
    for row in range(5):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c over the output
        for token in set(outputs[row]):
            count = outputs[row].count(token)
            expected[row, token] -= count * frequency[row] + (count > 0) * presence[row]
    torch.testing.assert_close(ours, expected)


def test_penalties_need_the_token_ids():
    with pytest.raises(ValueError, match="prompt_ids and output_ids"):
        sample(random_logits(1), [SamplingParams(frequency_penalty=1.0)])
    with pytest.raises(ValueError, match="2 rows of logits, 1 SamplingParams"):
        sample(random_logits(2), [SamplingParams()])


# ---- randomness -----------------------------------------------------------------------------------------------------

def seeded_run(target: SamplingParams, logits: torch.Tensor, row: int, others: list[SamplingParams],
               steps: int = 4) -> list[int]:
    """The tokens drawn for `target` placed at `row` of a batch with `others`, over several steps."""
    params = others[:row] + [target] + others[row:]
    generators = [make_generator(p.seed, 0, "cpu") for p in params]
    history = [[1, 2, 3] for _ in params]
    tokens = []
    for _ in range(steps):
        out = sample(logits, params, generators, prompt_ids=history, output_ids=[[] for _ in params])
        tokens.append(out.token_ids[row].item())
    return tokens


def test_seeded_draws_do_not_depend_on_the_batch():
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)
    alone = seeded_run(target, random_logits(1, seed=11, scale=1.0), 0, [])
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, seed=9), SamplingParams(),
              SamplingParams(min_p=0.2, repetition_penalty=1.3, presence_penalty=0.5, logprobs=3),
              SamplingParams(top_p=0.1)]
    for row in (0, 2, 5):
        logits = random_logits(6, seed=12)
        logits[row] = random_logits(1, seed=11, scale=1.0)[0]  # the same logits row for the target
        assert seeded_run(target, logits, row, others) == alone
    assert len(set(alone)) > 1  # the generator advances between steps
    other_seed = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=4321)
    assert seeded_run(other_seed, random_logits(1, seed=11, scale=1.0), 0, []) != alone


def test_n_samples_get_distinct_reproducible_streams():
    logits = torch.zeros(1, 1000)  # flat: every draw is a fresh choice

    def stream(seed: int, index: int) -> list[int]:
        g = make_generator(seed, index, "cpu")
        return [sample(logits, [SamplingParams(seed=seed)], [g]).token_ids.item() for _ in range(5)]

    streams = [stream(5, i) for i in range(4)]
    assert streams == [stream(5, i) for i in range(4)]
    assert len({tuple(s) for s in streams}) == 4
    assert stream(6, 0) != streams[0] and stream(6, 1) != streams[1]
    assert make_generator(None, 0, "cpu") is None


def test_seed_matches_the_reference_generate_sampler():
    """Sample 0 of a seeded request draws exactly as camelid.generate does with the same seed (one prompt)."""
    logits = random_logits(1, seed=13)
    reference = Sampling(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, seed=77)
    ref_gen = reference.generator(torch.device("cpu"))
    ours_gen = make_generator(77, 0, "cpu")
    params = [SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, seed=77)]
    for _ in range(6):
        assert sample(logits, params, [ours_gen]).token_ids.item() == next_token(logits, None, reference, ref_gen).item()


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * len(tokens)
    support = expected > 0
    assert observed[~support].sum() == 0, "drew a filtered-out token"
    stat = ((observed[support] - expected[support]) ** 2 / expected[support]).sum().item()
    return stat, int(support.sum()) - 1


def assert_fits(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    stat, dof = chi_square(tokens, probs)
    assert dof >= 1
    # mean dof, sd sqrt(2 dof): 6 sd is generous enough never to flake with these seeds and tight enough to catch a
    # wrong temperature or filter (those give statistics in the hundreds)
    assert stat < dof + 6 * math.sqrt(2 * dof) + 5, (stat, dof)


@pytest.mark.parametrize("settings", [(1.0, 0, 1.0, 0.0), (0.6, 6, 1.0, 0.0), (1.4, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.15),
                                      (0.8, 8, 0.9, 0.05)])
def test_sampled_frequencies_match_the_filtered_softmax(settings, transformers):
    base = random_logits(1, seed=21, vocab=12, scale=1.0)  # a small vocabulary: every kept token is seen often
    expected = hf_warp(transformers, base, *settings).softmax(-1)[0]
    temperature, top_k, top_p, min_p = settings
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    draws = 20000  # unseeded rows: one multinomial over the whole batch, from the batch generator
    tokens = sample(base.expand(draws, -1), [params] * draws, generator=torch.Generator().manual_seed(1)).token_ids
    assert_fits(tokens, expected)
    seeded = dataclasses.replace(params, seed=3)  # seeded rows: one generator, drawn step after step
    g = make_generator(3, 0, "cpu")
    tokens = torch.cat([sample(base, [seeded], [g]).token_ids for _ in range(3000)])
    assert_fits(tokens, expected)


def test_frequencies_catch_a_wrong_temperature():
    """The fit test itself can fail: draws at temperature 1 do not fit the temperature-0.5 distribution."""
    base = random_logits(1, seed=21, vocab=12, scale=1.0)
    tokens = sample(base.expand(20000, -1), [SamplingParams()] * 20000, generator=torch.Generator().manual_seed(1))
    stat, dof = chi_square(tokens.token_ids, (base / 0.5).softmax(-1)[0])
    assert stat > dof + 6 * math.sqrt(2 * dof) + 5


# ---- logprobs ---------------------------------------------------------------------------------------------------------

def test_logprobs_are_the_raw_log_softmax():
    logits = random_logits(5, seed=30)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.7, top_k=4, logprobs=0, seed=1),
              SamplingParams(), SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, logprobs=5),
              SamplingParams(temperature=0, logprobs=V + 10)]
    generators = [make_generator(p.seed, 0, "cpu") for p in params]
    out = sample(logits.bfloat16(), params, generators, prompt_ids=[[1, 2]] * 5, output_ids=[[2, 3, 3]] * 5)
    reference = logits.bfloat16().float().log_softmax(-1)  # before penalties, temperature and filters
    torch.testing.assert_close(out.logprobs, reference.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids.shape == (5, V) and torch.equal(out.top_ids[:, 0], reference.argmax(-1))
    torch.testing.assert_close(out.top_logprobs, reference.gather(1, out.top_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()  # most likely first
    entries = out.logprob_entries()
    assert [None if e is None else len(e["top"]) for e in entries] == [3, 0, None, 5, V]
    first = entries[0]
    assert first["token_id"] == logits[0].argmax().item() == max(first["top"], key=first["top"].get)
    assert first["logprob"] == pytest.approx(reference[0].max().item())
    for entry, row in zip(entries, reference):
        if entry is not None:
            assert entry["logprob"] == pytest.approx(row[entry["token_id"]].item())
            for token, value in entry["top"].items():
                assert value == pytest.approx(row[token].item())


def test_no_logprobs_unless_asked():
    out = sample(random_logits(3), [SamplingParams(temperature=0)] * 3)
    assert out.logprobs is None and out.top_ids is None and out.logprob_entries() == [None] * 3


# ---- logit_bias -------------------------------------------------------------------------------------------------------

def test_logit_bias_is_added_before_sampling_and_logprobs_stay_raw():
    logits = random_logits(3, seed=40)
    low = logits.argmin(-1).tolist()
    params = [SamplingParams(temperature=0, logit_bias={low[0]: 100}, logprobs=0),  # forces the least likely token
              SamplingParams(temperature=0, logit_bias={logits[1].argmax().item(): -100}),  # bans the most likely
              SamplingParams(temperature=0.8, seed=3, logit_bias={low[2]: 100.0, 7: -5})]
    out = sample(logits, params, [make_generator(p.seed, 0, "cpu") for p in params])
    assert out.token_ids[0] == low[0] and out.token_ids[2] == low[2]
    assert out.token_ids[1] == logits[1].topk(2).indices[1]  # the second most likely
    assert out.logprobs[0] == pytest.approx(logits[0].log_softmax(-1)[low[0]].item())  # the model's own
    # a small bias moves the greedy choice exactly as adding it to the logits by hand does
    bias = {3: 2.5, 9: -1.0}
    biased = logits.clone()
    biased[:, 3] += 2.5
    biased[:, 9] -= 1.0
    out = sample(logits, [SamplingParams(temperature=0, logit_bias=bias)] * 3)
    assert torch.equal(out.token_ids, biased.argmax(-1))
    assert torch.equal(logits, random_logits(3, seed=40))  # the caller's logits are untouched

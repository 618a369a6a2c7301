"""The engine end to end under random traffic (hypothesis), on a tiny random fp32 model with a trained tokenizer: a
random interleaving of add_request / step / abort, greedy and seeded requests, prompts sharing prefixes, n = 2, stop
strings and max_tokens, top-k / top-p / repetition penalty, logprobs and prompt_logprobs, callers' own request ids,
a KV cache small enough to preempt, chunked prefill, a small max_num_seqs, decode_steps > 1. Every completion that was
not aborted must equal camelid.generate run on it alone (completion i of a seeded request draws from
sample_seed(seed, i)); texts only ever grow; each request ends exactly once; an id in use is refused; no block is
leaked."""

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from camelid.engine import LLM, SamplingParams
from camelid.engine.sampler import sample_seed
from camelid.generate import generate
import model_zoo

STEMS = ["The quick brown fox jumps over the lazy dog.", "Llamas and alpacas live in the mountains;",
         "A camel walks across the desert, slowly, slowly."]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return model_zoo.text_model(tmp_path_factory.mktemp("corpus"), max_positions=32)


def prompt_text(stem: str, words: int, tail: str) -> str:
    return " ".join(stem.split()[:words]) + tail


request = st.fixed_dictionaries({
    "prompt": st.builds(prompt_text, st.sampled_from(STEMS), st.integers(1, 9), st.sampled_from(["", " on", " they"])),
    "seed": st.none() | st.integers(0, 2**70),  # None: greedy
    "n": st.integers(1, 2),
    "max_tokens": st.integers(1, 16),
    "stop": st.sampled_from([[], ["e"], ["an", " s"]]),
    "filters": st.sampled_from([{}, dict(top_k=5), dict(top_p=0.8, repetition_penalty=1.3)]),
    "logprobs": st.none() | st.integers(0, 2),
    "prompt_logprobs": st.none() | st.just(1),
    "id": st.none() | st.sampled_from(["2", "5", "job"]),  # the caller's own id (the first ones are counter ids)
})
action = st.one_of(st.tuples(st.just("add"), request), st.tuples(st.just("add"), request),
                   st.tuples(st.just("step"), st.integers(1, 4)), st.tuples(st.just("abort"), st.integers(0, 7)))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(actions=st.lists(action, min_size=3, max_size=14), block_size=st.sampled_from([2, 4]),
       extra_blocks=st.integers(0, 4), budget=st.integers(3, 40), prefix_caching=st.booleans(),
       max_num_seqs=st.integers(2, 5), decode_steps=st.sampled_from([1, 3]))
def test_random_interleaving_equals_generate_one_by_one(text_model, actions, block_size, extra_blocks, budget,
                                                        prefix_caching, max_num_seqs, decode_steps):
    model, tok = text_model
    # every request fits the model's 32 positions alone (as in generate), but a few at once overflow the cache
    num_blocks = model.config.max_position_embeddings // block_size + extra_blocks
    llm = LLM(model, tokenizer=tok, num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=budget,
              max_num_seqs=max_num_seqs, enable_prefix_caching=prefix_caching, cuda_graphs=decode_steps > 1,
              decode_steps=decode_steps)
    specs, last, ends, aborted = {}, {}, {}, set()
    delivered = set()  # ids whose final output step returned: free for a new request

    def step():
        for out in llm.step():
            previous = last.get(out.request_id)
            if previous is not None:
                for before, now in zip(previous.outputs, out.outputs):
                    assert now.text.startswith(before.text) and now.token_ids[:len(before.token_ids)] == \
                        before.token_ids
            last[out.request_id] = out
            if out.finished:
                assert out.request_id not in ends, "a request ended twice"
                ends[out.request_id] = out
                delivered.add(out.request_id)

    for kind, arg in actions:
        if kind == "add":
            params = SamplingParams(n=arg["n"], max_tokens=arg["max_tokens"], stop=arg["stop"], seed=arg["seed"],
                                    temperature=0 if arg["seed"] is None else 1.0, logprobs=arg["logprobs"],
                                    prompt_logprobs=arg["prompt_logprobs"], **arg["filters"])
            if arg["id"] is not None and arg["id"] in specs and arg["id"] not in delivered:
                with pytest.raises(ValueError, match="already in use"):
                    llm.add_request(arg["prompt"], params, request_id=arg["id"])
                continue
            request_id = llm.add_request(arg["prompt"], params, request_id=arg["id"])
            specs[request_id] = arg
            for seen in (ends, last):  # a reused id: only its new request counts
                seen.pop(request_id, None)
            delivered.discard(request_id)
            aborted.discard(request_id)
        elif kind == "step":
            for _ in range(arg):
                step()
        elif specs:
            request_id = list(specs)[arg % len(specs)]
            if request_id not in ends:
                aborted.add(request_id)
            llm.abort(request_id)
    for _ in range(500):
        if not llm.has_unfinished():
            break
        step()
    assert set(ends) == set(specs) and not llm.has_unfinished()
    stats = llm.stats()
    event(f"preempted: {stats['num_preemptions'] > 0}, prefix hit: {stats['prefix_cache_hit_tokens'] > 0}")
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_running"] == stats["num_waiting"] == 0

    for request_id, spec in specs.items():
        out = ends[request_id]
        assert [c.index for c in out.outputs] == list(range(spec["n"]))
        if spec["prompt_logprobs"] is not None and request_id not in aborted:  # scored whatever the cache did
            assert out.prompt_logprobs[0] is None
            assert [e["token_id"] for e in out.prompt_logprobs[1:]] == out.prompt_token_ids[1:]
        # an aborted request's completions that had already ended keep their reason (and must still be right)
        assert (request_id in aborted) == any(c.finish_reason == "abort" for c in out.outputs)
        for c in out.outputs:
            if c.finish_reason == "abort":
                continue
            sampling = {} if spec["seed"] is None else dict(temperature=1.0, seed=sample_seed(spec["seed"], c.index))
            expected = generate(model, tok, spec["prompt"], max_new_tokens=spec["max_tokens"], stop=spec["stop"],
                                **sampling, **spec["filters"])
            assert c.text == expected, (request_id, c.index, c.finish_reason)
            if spec["logprobs"] is not None:  # one entry per token, for that token, with its alternatives
                assert [e["token_id"] for e in c.logprobs] == c.token_ids
                assert all(len(e["top"]) >= spec["logprobs"] for e in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            event(f"finish: {c.finish_reason}, seeded: {spec['seed'] is not None}, n: {spec['n']}")

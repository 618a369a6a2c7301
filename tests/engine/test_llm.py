"""The engine end to end on tiny models: greedy outputs equal camelid.generate_ids (the static-cache oracle) and
transformers' generate under a KV budget small enough to force preemption; every architecture through the paged
attention (sliding window, ALiBi, MoE, ...); prefix caching; n > 1 with copy-on-write checked by teacher forcing;
seeded sampling; aborts; bad requests failing alone; no block leaked."""

import dataclasses
import random

import pytest
import torch

from camelid.checkpoint import save_pretrained
from camelid.engine import LLM, SamplingParams
from camelid.generate import generate, generate_ids
from camelid.monitor import weight_bytes
from camelid.quant import quantize_model
from model_zoo import ARCH_CONFIGS, random_model, text_model, tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def mixed_prompts(count: int, seed: int, low: int = 1, high: int = 40, vocab: int = 128) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_running"] == stats["num_waiting"] == 0
    assert not llm.has_unfinished()


def hf_greedy(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' greedy generate on one left-padded batch (EOS ignored): the new tokens of each row."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[:, longest:].tolist()


@pytest.fixture(scope="module")
def llama():
    return random_model(tiny_config())


# ---- correctness against the references ---------------------------------------------------------------------------

def test_64_prompts_under_preemption_equal_generate_ids_and_transformers(hf_checkpoint, transformers):
    path = hf_checkpoint("llama")
    prompts = mixed_prompts(64, seed=0)
    # 40 blocks of 4 tokens: room for ~4 of the 64 sequences at full length, so the scheduler must preempt
    llm = LLM(path, num_blocks=40, block_size=4, max_num_batched_tokens=64, device="cpu")
    outputs = llm.generate(prompts, GREEDY)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert_all_blocks_free(llm)
    ours = token_ids(outputs)
    assert all(len(t) == 16 for t in ours) and [o.outputs[0].finish_reason for o in outputs] == ["length"] * 64
    assert ours == [generate_ids(llm.model, [p], 16)[0] for p in prompts]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ours == hf_greedy(hf, prompts, 16)


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_every_architecture_through_paged_attention(name):
    """Sliding window (mistral), ALiBi, learned / sinusoidal positions, MoE, Gemma, rope scalings: greedy ids equal
    the oracle with tiny blocks, chunked prefill (a budget of 7 tokens) and preemption."""
    model = random_model(tiny_config(**ARCH_CONFIGS[name]))
    prompts = mixed_prompts(6, seed=1, high=20)
    llm = LLM(model, num_blocks=12, block_size=4, max_num_batched_tokens=7)
    ours = token_ids(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
    assert ours == [generate_ids(model, [p], 12)[0] for p in prompts]
    assert llm.stats()["num_preemptions"] > 0
    assert_all_blocks_free(llm)


def test_output_stops_at_the_context_length(llama):
    context = llama.config.max_position_embeddings
    llm = LLM(llama, num_blocks=64, block_size=8)
    out = llm.generate([[5] * (context - 3)], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"


def test_eos_and_stop_token_ids_end_a_request(llama):
    prompt = [5, 6, 7, 8]
    free = generate_ids(llama, [prompt], 16)[0]
    stop = free[5]
    llm = LLM(llama, num_blocks=32, block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == free[:free.index(stop) + 1] and out.finish_reason == "stop"
    eos_llm = LLM(random_model(tiny_config(eos_token_id=stop)), num_blocks=32, block_size=8)
    out = eos_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert out.token_ids == free[:free.index(stop) + 1] and out.finish_reason == "stop"


# ---- prefix caching ---------------------------------------------------------------------------------------------

def test_prefix_cache_hit_gives_identical_output(llama):
    shared = mixed_prompts(1, seed=3, low=33, high=33)[0]
    first, second = shared + [9, 10], shared + [11, 12, 13]
    llm = LLM(llama, num_blocks=32, block_size=8)
    a = token_ids(llm.generate([first], GREEDY))[0]
    assert llm.stats()["prefix_cache_hit_tokens"] == 0
    computed = llm.stats()["prompt_tokens_computed"]
    b = token_ids(llm.generate([second], GREEDY))[0]
    stats = llm.stats()
    assert stats["prefix_cache_hit_tokens"] == 32  # the 4 full blocks of the shared 33 tokens
    assert stats["prompt_tokens_computed"] - computed == len(second) - 32
    assert [a, b] == [generate_ids(llama, [p], 16)[0] for p in (first, second)]
    again = token_ids(llm.generate([first], GREEDY))[0]  # the whole prompt is cached but its last token
    assert again == a and llm.stats()["prefix_cache_hit_tokens"] == 32 + 32
    assert_all_blocks_free(llm)


def test_prefix_caching_off(llama):
    llm = LLM(llama, num_blocks=32, block_size=8, enable_prefix_caching=False)
    prompt = list(range(3, 30))
    assert token_ids(llm.generate([prompt, prompt], GREEDY)) == [generate_ids(llama, [prompt], 16)[0]] * 2
    assert llm.stats()["prefix_cache_hit_tokens"] == 0


# ---- n > 1, sampling, logprobs -----------------------------------------------------------------------------------

@torch.no_grad()
def teacher_forced_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion[i] | prompt + completion[:i]) from one cache-free forward: the model's own view."""
    ids = torch.tensor([prompt + completion])
    logprobs = model(ids)[0].float().log_softmax(-1)  # (T, V)
    return logprobs[len(prompt) - 1:-1].gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_n_completions_share_the_prompt_with_copy_on_write(llama):
    """n = 4 sampled completions of one prompt whose last block is half full: the siblings share it, then each
    copies it before writing. Were a copy missed, a sibling's keys would be overwritten and the logprobs the engine
    reports would stop matching a cache-free forward of that completion."""
    prompt = mixed_prompts(1, seed=4, low=13, high=13)[0]  # 1 full block + 5 of 8 slots
    llm = LLM(llama, num_blocks=40, block_size=8)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7, logprobs=0, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    completions = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and all(len(c) == 12 for c in completions)
    assert len({tuple(c) for c in completions}) == 4  # four different samples
    assert llm.stats()["prompt_tokens_computed"] == len(prompt)  # the prompt was computed once
    for c in out.outputs:
        reported = torch.tensor([e["logprob"] for e in c.logprobs])
        torch.testing.assert_close(reported, teacher_forced_logprobs(llama, prompt, c.token_ids), atol=1e-4, rtol=0)
    assert_all_blocks_free(llm)
    assert llm.generate([prompt], params)[0].outputs[2].token_ids == completions[2]  # seeded: reproducible


def test_n_greedy_completions_are_identical(llama):
    llm = LLM(llama, num_blocks=40, block_size=8)
    out = llm.generate([[4, 5, 6]], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [generate_ids(llama, [[4, 5, 6]], 10)[0]] * 3


def test_n_completions_under_memory_pressure(llama):
    """Siblings that cannot all hold their own copy preempt one another and recompute; every one still finishes
    with the oracle's tokens and no block leaks."""
    prompt = list(range(20, 30))
    llm = LLM(llama, num_blocks=7, block_size=4)  # 28 slots; 3 siblings of 20 tokens need up to 15 blocks
    params = [SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]
    outs = llm.generate([prompt, prompt[:7]], params)
    assert [c.token_ids for c in outs[0].outputs] == [generate_ids(llama, [prompt], 10)[0]] * 3
    assert outs[1].outputs[0].token_ids == generate_ids(llama, [prompt[:7]], 10)[0]
    assert llm.stats()["num_preemptions"] > 0
    assert_all_blocks_free(llm)


def test_max_num_seqs_counts_every_completion(llama):
    """Invariant: at most max_num_seqs sequences run in any step, the n completions of a request counted one by one
    (they branch off the prompt inside the step that computes it); a request of n > max_num_seqs is refused."""
    llm = LLM(llama, num_blocks=60, block_size=4, max_num_seqs=3)
    prompts = mixed_prompts(4, seed=11, high=12)
    params = [SamplingParams(n=n, temperature=0, max_tokens=6, ignore_eos=True) for n in (1, 3, 1, 2)]
    ids = [llm.add_request(p, q) for p, q in zip(prompts, params)]
    finished, most = {}, 0
    while llm.has_unfinished():
        finished.update({o.request_id: o for o in llm.step() if o.finished})
        most = max(most, llm.stats()["num_running"])
        assert llm.stats()["num_running"] <= 3
    assert most == 3
    for request_id, prompt, p in zip(ids, prompts, params):
        assert [c.token_ids for c in finished[request_id].outputs] == [generate_ids(llama, [prompt], 6)[0]] * p.n
    with pytest.raises(ValueError, match="n=4 completions exceed max_num_seqs=3"):
        llm.add_request([5, 6], SamplingParams(n=4))
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_lm_head(dtype):
    """int8 projections and lm_head (camelid.quant allows it): the KV cache takes the hidden states' dtype, not the
    int8 of the quantized lm_head's codes, and greedy ids equal camelid.generate_ids on the same model; the decode
    bandwidth counts the quantized codes and scales (buffers, not parameters)."""
    model = quantize_model(random_model(tiny_config()).to(dtype), "int8", modules=r".*(proj|lm_head)")
    prompts = mixed_prompts(4, seed=12, high=20)
    expected = [generate_ids(model, [p], 8)[0] for p in prompts]
    llm = LLM(model, num_blocks=30, block_size=4)
    assert llm.kv_dtype == dtype and llm.runner.cache.k[0].dtype == dtype
    assert token_ids(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))) == expected
    state = model.state_dict()
    embed = state["model.embed_tokens.weight"]
    assert llm.weight_bytes == weight_bytes(model) == sum(t.nbytes for t in state.values()) - embed.nbytes
    assert llm.stats()["decode_bandwidth_bytes_per_s"] > 0
    assert_all_blocks_free(llm)


def test_seeded_sampling_is_reproducible_and_batch_independent(llama):
    prompts = mixed_prompts(5, seed=5, high=20)

    def run(seed, others=()):
        llm = LLM(llama, num_blocks=64, block_size=8)
        params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=seed, ignore_eos=True)]
        params += [SamplingParams(temperature=0.8, max_tokens=5, ignore_eos=True)] * len(others)
        return token_ids(llm.generate([prompts[0], *others], params))[0]

    a = run(0)
    assert a == run(0) and a == run(0, others=prompts[1:])  # other (unseeded) requests in the batch change nothing
    assert a != run(1)


@pytest.mark.parametrize("seed", [3, 2**70])
def test_seeded_sample_equals_camelid_generate(llama, seed):
    prompt = [7, 8, 9, 10]
    llm = LLM(llama, num_blocks=32, block_size=8)
    ours = token_ids(llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=12, seed=seed, ignore_eos=True)))
    assert ours[0] == generate_ids(llama, [prompt], 12, temperature=1.0, seed=seed)[0]


def test_logprobs_top_alternatives(llama):
    llm = LLM(llama, num_blocks=32, block_size=8)
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    for entry, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids):
        assert entry["token_id"] == token and len(entry["top"]) == 3
        assert max(entry["top"], key=entry["top"].get) == token  # greedy: the chosen token is the most likely
    assert llm.generate([[3]], SamplingParams(max_tokens=2))[0].outputs[0].logprobs is None


def test_prompt_logprobs_equal_transformers_under_chunking_and_preemption(hf_checkpoint, transformers):
    """Each prompt token's logprob (the model's log-softmax at the position before it) and its top alternatives,
    against transformers' logits; with chunked prefills, a prefix already cached by another request (scoring
    computes the prompt anyway), preemption, and n = 2."""
    path = hf_checkpoint("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = mixed_prompts(12, seed=3, low=20, high=60)
    llm = LLM(path, num_blocks=40, block_size=4, max_num_batched_tokens=32, device="cpu")
    llm.generate([prompts[0]], GREEDY)  # its blocks are now in the prefix cache
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2, n=2)
    outputs = llm.generate(prompts, params)
    assert llm.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)  # (T, V)
        scored = out.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        for p, entry in enumerate(scored[1:], start=1):
            assert entry["token_id"] == prompt[p]
            assert entry["logprob"] == pytest.approx(expected[p - 1, prompt[p]].item(), abs=1e-4)
            top = expected[p - 1].topk(2)
            assert list(entry["top"]) == top.indices.tolist()
            assert list(entry["top"].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [o.outputs[0].token_ids for o in outputs] == [generate_ids(llm.model, [p], 8)[0] for p in prompts]
    assert llm.generate([[3, 4]], GREEDY)[0].prompt_logprobs is None
    assert_all_blocks_free(llm)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


# ---- the request lifecycle ---------------------------------------------------------------------------------------

def test_step_by_step_with_abort(llama):
    prompts = mixed_prompts(4, seed=6, high=20)
    llm = LLM(llama, num_blocks=20, block_size=4, max_num_batched_tokens=16)
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    seen: dict[str, list] = {i: [] for i in ids}
    for _ in range(3):
        for out in llm.step():
            seen[out.request_id].append(out)
    llm.abort(ids[1])
    llm.abort(ids[1])  # twice is harmless
    llm.abort("never-added")
    assert llm.stats()["num_free_blocks"] > 0
    while llm.has_unfinished():
        for out in llm.step():
            seen[out.request_id].append(out)
    aborted = seen[ids[1]][-1]
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    reference = [generate_ids(llama, [p], 16)[0] for p in prompts]
    for i in (0, 2, 3):
        last = seen[ids[i]][-1]
        assert last.finished and last.outputs[0].token_ids == reference[i]
        assert not any(o.finished for o in seen[ids[i]][:-1])
        counts = [len(o.outputs[0].token_ids) for o in seen[ids[i]]]
        assert counts == sorted(counts)  # cumulative
    assert_all_blocks_free(llm)


def test_generated_request_ids_skip_the_ids_callers_chose(llama):
    llm = LLM(llama, num_blocks=24, block_size=4)
    mine = llm.add_request([5, 6], GREEDY, request_id="2")  # the id the engine's counter gives next
    auto = llm.add_request([5, 6], GREEDY)
    assert auto != mine
    llm.add_request([5, 6], GREEDY, request_id="8")
    outputs = llm.generate([[7, 8], [9]], GREEDY)  # generate's own requests too
    assert {o.request_id for o in outputs}.isdisjoint({mine, auto, "8"})


def test_an_id_stays_in_use_until_step_returned_its_last_output(llama):
    """An aborted request's final output waits for the next step: a new request under its id before then would get
    that "abort" output as its own."""
    llm = LLM(llama, num_blocks=24, block_size=4)
    llm.add_request([5, 6], GREEDY, request_id="job")
    llm.abort("job")
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request([5, 6], GREEDY, request_id="job")
    assert [(o.request_id, o.outputs[0].finish_reason) for o in llm.step()] == [("job", "abort")]
    llm.add_request([5, 6], GREEDY, request_id="job")  # delivered: the id is free again
    assert llm.generate([[7]], GREEDY)[0].request_id != "job"
    out = llm.step()[0]  # the request generate stepped past, kept for this step
    assert out.request_id == "job" and out.finished and out.outputs[0].token_ids == generate_ids(llama, [[5, 6]], 16)[0]


def test_bad_requests_fail_alone_while_others_run(llama):
    prompts = mixed_prompts(3, seed=8, high=20)
    llm = LLM(llama, num_blocks=24, block_size=4, max_num_batched_tokens=8)
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    llm.step()
    llm.step()
    context = llm.max_model_len
    before = llm.stats()
    with pytest.raises(ValueError, match="context"):
        llm.add_request([5] * context, GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.add_request([5], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        llm.add_request([5], SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        llm.add_request([5], GREEDY, adapter="nope")
    with pytest.raises(ValueError, match="empty prompt"):
        llm.add_request([], GREEDY)
    with pytest.raises(ValueError, match="token id"):
        llm.add_request([5, 1000], GREEDY)
    for prompt in (None, 5):  # neither text nor token ids: a ValueError too, not a TypeError from inside
        with pytest.raises(ValueError, match="prompt must be"):
            llm.add_request(prompt, GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.add_request("text but no tokenizer", GREEDY)
    with pytest.raises(ValueError, match=r"logit_bias token id 1000 is outside the vocabulary"):
        llm.add_request([5], SamplingParams(logit_bias={1000: 5, 3: 1}))
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request([5], GREEDY, request_id=ids[0])
    after = llm.stats()
    assert after["num_waiting"] + after["num_running"] == before["num_waiting"] + before["num_running"]
    finished = {}
    while llm.has_unfinished():
        finished.update({o.request_id: o for o in llm.step() if o.finished})
    assert [finished[i].outputs[0].token_ids for i in ids] == [generate_ids(llama, [p], 16)[0] for p in prompts]
    with pytest.raises(ValueError, match="unknown adapter"):  # generate: one bad prompt withdraws the whole batch
        llm.generate([[3], [4]], GREEDY, adapter=[None, "x"])
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("run", ["generate", "stream"])
def test_generate_and_stream_keep_other_requests_outputs_for_step(llama, run):
    """A request queued with add_request that finishes while generate / stream drives the steps is not lost: the
    next step returns its output."""
    llm = LLM(llama, num_blocks=32, block_size=8)
    other = llm.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    if run == "generate":
        llm.generate([[6, 7]], GREEDY)
    else:
        list(llm.stream([6, 7], GREEDY))
    seen = []
    while llm.has_unfinished():
        seen += llm.step()
    assert [o.request_id for o in seen] == [other] and seen[0].finished
    assert seen[0].outputs[0].token_ids == generate_ids(llama, [[3, 4, 5]], 2)[0]
    assert_all_blocks_free(llm)


def test_kv_budget_in_bytes(llama):
    c = llama.config
    per_block = 2 * c.num_hidden_layers * 16 * c.num_key_value_heads * c.head_dim * 4  # fp32
    llm = LLM(llama, kv_cache_memory=per_block * 10 + 5)
    assert llm.stats()["num_blocks"] == 10 and llm.max_model_len == min(c.max_position_embeddings, 160)
    assert LLM(llama, kv_cache_memory="1MB").stats()["num_blocks"] == 10**6 // per_block
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(llama, kv_cache_memory=100)
    for block_size in (0, 2.5):  # checked before it divides the budget
        with pytest.raises(ValueError, match="block_size must be"):
            LLM(llama, block_size=block_size)


# ---- text: tokenizer, stop strings, stream ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A model folder with weights and a trained byte-level BPE tokenizer, as LLM(model_dir) loads it."""
    model, tok = text_model(tmp_path_factory.mktemp("corpus"), max_positions=128)
    folder = tmp_path_factory.mktemp("text-model")
    save_pretrained(model, folder)
    tok.save(folder)
    return folder


def test_text_generate_and_stream_equal_camelid_generate(text_folder):
    llm = LLM(text_folder, num_blocks=64, block_size=8)
    assert llm.tokenizer is not None
    prompts = ["The quick brown", "Llamas and", "A camel walks across the"]
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = llm.generate(prompts, params)
    expected = [generate(llm.model, llm.tokenizer, p, max_new_tokens=24) for p in prompts]
    assert [o.outputs[0].text for o in outputs] == expected
    assert any(len(t) > 10 for t in expected)
    assert "".join(llm.stream(prompts[2], params)) == expected[2]
    assert outputs[0].prompt_token_ids == llm.tokenizer.encode(prompts[0])
    assert_all_blocks_free(llm)


def test_stop_string_ends_the_request_early(text_folder):
    llm = LLM(text_folder, num_blocks=64, block_size=8)
    prompt = "Llamas and"
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    out = cut.outputs[0]
    assert out.text == full.text[:full.text.index(stop)] and out.finish_reason == "stop"
    assert len(out.token_ids) < len(full.token_ids)  # it stopped decoding, not just trimmed the text
    assert "".join(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                     stop=[stop]))) == out.text
    # decode_steps > 1: the stop string falls inside a several-token step; the tokens after it are dropped
    multi = LLM(text_folder, num_blocks=64, block_size=8, cuda_graphs=True, decode_steps=6)
    cut_multi = multi.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))
    assert (cut_multi[0].outputs[0].text, cut_multi[0].outputs[0].token_ids) == (out.text, out.token_ids)
    assert multi.stats()["generated_tokens"] == len(out.token_ids)
    assert_all_blocks_free(multi)


def test_stop_strings_inside_others_cut_at_the_earliest_in_the_text(text_folder):
    # stop=[" e", "x ee slow"]-like: the short one completes a token before the long one, which starts first and wins
    llm = LLM(text_folder, num_blocks=64, block_size=8)
    prompt, greedy = "Llamas and", dict(temperature=0, ignore_eos=True)
    full = llm.generate([prompt], SamplingParams(max_tokens=30, **greedy))[0].outputs[0]
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    i = next(i for i in range(len(pieces) - 2) if all(p.isascii() and p.isprintable() for p in pieces[i:i + 3])
             and full.text.find("".join(pieces[i:i + 3])) == full.text.find(pieces[i]) >= 0
             and full.text.find(pieces[i][-1]) == full.text.find(pieces[i]) + len(pieces[i]) - 1)
    start, longer, shorter = full.text.find(pieces[i]), "".join(pieces[i:i + 3]), pieces[i][-1]
    params = SamplingParams(max_tokens=30, stop=[shorter, longer], **greedy)
    out = llm.generate([prompt], params)[0].outputs[0]
    assert (out.text, out.finish_reason) == (full.text[:start], "stop")
    assert "".join(llm.stream(prompt, params)) == out.text
    # the long one never completes (max_tokens): the short one ends it, still a "stop"
    out = llm.generate([prompt], dataclasses.replace(params, max_tokens=i + 2))[0].outputs[0]
    assert (out.text, out.finish_reason) == (full.text[:start + len(pieces[i]) - 1], "stop")
    assert_all_blocks_free(llm)


def test_closing_a_stream_aborts_it(text_folder):
    llm = LLM(text_folder, num_blocks=64, block_size=8)
    pieces = llm.stream("The quick", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(pieces)
    pieces.close()
    assert_all_blocks_free(llm)

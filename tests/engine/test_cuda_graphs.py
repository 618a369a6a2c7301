"""Decode graphs (camelid/engine/cuda_graphs.py). On CPU nothing is captured, but the same padded static-buffer path
runs: its greedy tokens must equal the plain engine's and camelid.generate_ids, padding rows must write nothing but
the scratch block, and batches it cannot serve (prefill chunks, LoRA rows, too many rows) must run eagerly. The
CUDA test (skipped here) checks the captured graphs the same way."""

import random

import pytest
import torch

from camelid.engine import LLM, SamplingParams
from camelid.engine.cuda_graphs import capture_sizes, unsupported_reason
from camelid.engine.paged_attention import PagedKVCache
from camelid.engine.scheduler import ScheduledBatch
from camelid.engine.sequence import Sequence
from camelid.generate import generate_ids
from model_zoo import ARCH_CONFIGS, random_model, tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(count: int, seed: int, high: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 128) for _ in range(rng.randint(1, high))] for _ in range(count)]


def greedy(llm: LLM, batch: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(batch, params)]


@pytest.fixture(scope="module")
def llama():
    return random_model(tiny_config())


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(256)[-3:] == [224, 240, 256]
    with pytest.raises(ValueError, match="max_batch"):
        capture_sizes(0)


def test_static_path_equals_eager_under_preemption(llama):
    """Mixed lengths, a KV budget that forces preemption and batch sizes that need padding rows (max_num_seqs 11:
    sizes 1, 2, 4, 8, 11): the padded path gives the eager engine's tokens, which are generate_ids' tokens."""
    batch = prompts(24, seed=0)
    eager = LLM(llama, num_blocks=40, block_size=4, max_num_seqs=11, max_num_batched_tokens=48, cuda_graphs=False)
    padded = LLM(llama, num_blocks=40, block_size=4, max_num_seqs=11, max_num_batched_tokens=48, cuda_graphs=True)
    assert eager.runner.graphs is None and padded.runner.graphs.sizes == [1, 2, 4, 8, 11]
    ours = greedy(padded, batch)
    assert padded.stats()["num_preemptions"] > 0
    assert padded.runner.graphs.replays > 0
    assert ours == greedy(eager, batch) == [generate_ids(llama, [p], 12)[0] for p in batch]
    stats = padded.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] == 40  # the scratch block is not the manager's


def test_seeded_sampling_and_n_equal_eager(llama):
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, n=3, seed=7, ignore_eos=True)
    batch = prompts(5, seed=3)
    runs = []
    for graphs in (False, True):
        llm = LLM(llama, num_blocks=64, block_size=4, cuda_graphs=graphs)
        runs.append([[c.token_ids for c in o.outputs] for o in llm.generate(batch, params)])
    assert runs[0] == runs[1]


def test_compiled_decode_forward_equals_eager(llama):
    """LLM(compile=True): the padded decode forward under torch.compile (one graph, dynamic batch size) gives the
    eager engine's greedy tokens, under preemption and with padding rows."""
    torch._dynamo.reset()
    batch = prompts(16, seed=5)
    eager = LLM(llama, num_blocks=40, block_size=4, max_num_seqs=11, max_num_batched_tokens=48, cuda_graphs=False)
    compiled = LLM(llama, num_blocks=40, block_size=4, max_num_seqs=11, max_num_batched_tokens=48,
                   cuda_graphs=True, compile=True)
    assert compiled.runner.graphs.compiled
    assert greedy(compiled, batch) == greedy(eager, batch)
    assert compiled.runner.graphs.replays > 0 and compiled.stats()["num_preemptions"] > 0


# ---- several decode steps per engine step (LLM(decode_steps=K)) ---------------------------------------------------

def _count_multi_steps(llm: LLM) -> list[int]:
    """Record the number of decode steps of every run_steps call the engine makes."""
    calls, run_steps = [], llm.runner.run_steps

    def spy(batch, steps, limits):
        calls.append(steps)
        return run_steps(batch, steps, limits)
    llm.runner.run_steps = spy
    return calls


@pytest.mark.parametrize("steps", [3, 4])
def test_decode_steps_equal_single_steps_under_preemption(llama, steps):
    """K decode steps per engine step give the single-step tokens (and generate_ids'), with preemption, padding
    rows, and rows that reach max_tokens inside a K-step run; every block is free again after."""
    batch = prompts(24, seed=0)
    params = [SamplingParams(temperature=0, max_tokens=5 + i % 9, ignore_eos=True) for i in range(24)]
    single = LLM(llama, num_blocks=40, block_size=4, max_num_seqs=11, max_num_batched_tokens=48, cuda_graphs=True)
    multi = LLM(llama, num_blocks=40, block_size=4, max_num_seqs=11, max_num_batched_tokens=48, cuda_graphs=True,
                decode_steps=steps)
    calls = _count_multi_steps(multi)
    ours = [o.outputs[0].token_ids for o in multi.generate(batch, params)]
    assert calls and set(calls) == {steps} and multi.stats()["num_preemptions"] > 0
    assert ours == [o.outputs[0].token_ids for o in single.generate(batch, params)]
    assert ours == [generate_ids(llama, [p], q.max_tokens)[0] for p, q in zip(batch, params)]
    stats = multi.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and stats["generated_tokens"] == sum(map(len, ours))


def test_decode_steps_keep_seeded_sampling_stop_tokens_and_the_prefix_cache(llama):
    """Seeded sampling with n = 3 draws the same tokens; a stop token inside a K-step run ends the sequence there
    (the tokens after it are dropped); a repeated request hits the prefix cache the multi-step run filled."""
    batch = prompts(6, seed=3)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, n=3, seed=7, ignore_eos=True)
    free = generate_ids(llama, [batch[0]], 12)[0]
    stopped = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[6]])
    runs = []
    for steps in (1, 5):
        llm = LLM(llama, num_blocks=64, block_size=4, cuda_graphs=True, decode_steps=steps)
        outs = llm.generate(batch, sampled) + llm.generate(batch[:1], stopped)
        runs.append([[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs])
        hits = llm.stats()["prefix_cache_hit_tokens"]
        again = llm.generate(batch[:1], stopped)[0].outputs[0]
        assert llm.stats()["prefix_cache_hit_tokens"] > hits and again.token_ids == outs[-1].outputs[0].token_ids
    assert runs[0] == runs[1]
    assert runs[1][-1] == [(free[:free.index(free[6]) + 1], "stop")]


def test_rows_with_penalties_or_logprobs_take_single_steps(llama):
    llm = LLM(llama, num_blocks=64, block_size=4, cuda_graphs=True, decode_steps=4)
    calls = _count_multi_steps(llm)
    for params in (SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.3),
                   SamplingParams(temperature=0, max_tokens=6, logprobs=2)):
        out = llm.generate(prompts(3, seed=4), params)
        assert all(len(o.outputs[0].token_ids) == 6 for o in out)
    assert calls == []


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_decode_steps_is_one_clear_error(llama, bad):
    with pytest.raises(ValueError, match="decode_steps must be an integer >= 1"):
        LLM(llama, num_blocks=8, block_size=4, decode_steps=bad)


@pytest.mark.parametrize("name", ["mistral", "alibi", "gemma", "learned"])
def test_architectures_through_the_padded_path(name):
    model = random_model(tiny_config(**ARCH_CONFIGS[name]))
    batch = prompts(5, seed=1, high=20)
    llm = LLM(model, num_blocks=24, block_size=4, max_num_seqs=6, cuda_graphs=True)
    assert greedy(llm, batch) == [generate_ids(model, [p], 12)[0] for p in batch]
    assert llm.runner.graphs.replays > 0


def test_padding_rows_write_only_the_scratch_block(llama):
    """3 sequences in decode replay the size-4 path: the cache changes at their 3 new slots and in the scratch block,
    nowhere else."""
    llm = LLM(llama, num_blocks=32, block_size=4, max_num_seqs=4, cuda_graphs=True)
    for p in prompts(3, seed=5, high=9):
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while any(s.num_output_tokens == 0 for s in llm.scheduler.running) or llm.scheduler.waiting:
        llm.step()  # prefill everything (eager): the next step is decode-only
    cache, graphs = llm.runner.cache, llm.runner.graphs
    seqs = list(llm.scheduler.running)
    new_slots = {s.block_table[s.num_computed_tokens // 4] * 4 + s.num_computed_tokens % 4 for s in seqs}
    before = [k.clone() for k in cache.k]
    replays = graphs.replays
    llm.step()
    assert graphs.replays == replays + 1 and len(seqs) == 3
    scratch = set(range(graphs.scratch_block * 4, graphs.scratch_block * 4 + 4))
    for old, new in zip(before, cache.k):
        changed = (old != new).reshape(old.shape[0] * 4, -1).any(1).nonzero().flatten().tolist()  # flat slots
        assert set(changed) - scratch == new_slots


def test_batches_the_graphs_cannot_serve_run_eagerly(llama):
    """A prefill chunk, a single token that is not the sequence's last (a 1-token prefill chunk), an adapter row and
    more rows than the largest graph all go the eager way."""
    llm = LLM(llama, num_blocks=64, block_size=4, max_num_seqs=2, cuda_graphs=True)
    graphs = llm.runner.graphs

    def seq(tokens: int, computed: int, adapter: str | None = None) -> Sequence:
        s = Sequence(0, "r", 0, list(range(3, 3 + tokens)), GREEDY, adapter)
        s.num_computed_tokens = computed
        return s

    decode = seq(5, 4)
    assert graphs.can_run(ScheduledBatch([decode, seq(9, 8)], [1, 1]))
    assert not graphs.can_run(ScheduledBatch([decode, seq(9, 4)], [1, 5]))  # a prefill chunk
    assert not graphs.can_run(ScheduledBatch([decode, seq(9, 4)], [1, 1]))  # one prompt token, not the last
    assert not graphs.can_run(ScheduledBatch([decode, seq(5, 4, adapter="a")], [1, 1]))
    assert not graphs.can_run(ScheduledBatch([decode] * 3, [1] * 3))  # 3 rows, largest graph 2
    assert not graphs.can_run(ScheduledBatch([], []))


def test_lora_rows_run_eagerly_and_equal_running_alone(llama, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from camelid.checkpoint import save_pretrained
    base_dir = tmp_path / "base"
    save_pretrained(llama, base_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    tuned = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    batch = prompts(4, seed=9)
    adapters = [None, "a", None, "a"]
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    params = [GREEDY, short, GREEDY, short]  # once the adapter rows end, the base rows decode alone
    mixed = LLM(base_dir, adapters={"a": tmp_path / "adapter"}, num_blocks=64, block_size=4, cuda_graphs=True)
    together = [o.outputs[0].token_ids for o in mixed.generate(batch, params, adapter=adapters)]
    assert mixed.runner.graphs.replays > 0  # the base-only steps (after the adapter rows finish) replay
    multi = LLM(base_dir, adapters={"a": tmp_path / "adapter"}, num_blocks=64, block_size=4, cuda_graphs=True,
                decode_steps=3)
    calls = _count_multi_steps(multi)
    assert [o.outputs[0].token_ids for o in multi.generate(batch, params, adapter=adapters)] == together
    assert calls  # the base rows, once alone, took several steps at a time over the adapters' loaded layers
    alone = LLM(base_dir, adapters={"a": tmp_path / "adapter"}, num_blocks=64, block_size=4, cuda_graphs=False)
    assert together == [alone.generate([p], q, adapter=a)[0].outputs[0].token_ids
                        for p, q, a in zip(batch, params, adapters)]
    assert together[1] != alone.generate([batch[1]], short)[0].outputs[0].token_ids  # the adapter does change it


def test_unsupported_models_are_named(llama):
    cache = PagedKVCache(llama.config, 4, 16, torch.float32, torch.device("cpu"))
    assert "MoE" in unsupported_reason(random_model(tiny_config(**ARCH_CONFIGS["mixtral"])), cache)
    assert "dynamic" in unsupported_reason(random_model(tiny_config(**ARCH_CONFIGS["dynamic"])), cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_graphs_equal_eager_on_cuda():
    model = random_model(tiny_config()).to("cuda", torch.bfloat16)
    batch = prompts(40, seed=2)
    eager = LLM(model, num_blocks=256, block_size=16, max_num_seqs=32, cuda_graphs=False)
    graphed = LLM(model, num_blocks=256, block_size=16, max_num_seqs=32, cuda_graphs=True)
    if graphed.runner.graphs is None:
        pytest.skip(f"no graphs here: {unsupported_reason(model, graphed.runner.cache)}")
    assert graphed.runner.graphs.graphs  # captured, not the eager fallback
    assert greedy(graphed, batch) == greedy(eager, batch)
    assert graphed.runner.graphs.replays > 0

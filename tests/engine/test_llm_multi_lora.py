"""Multi-LoRA through the engine: one generate() over requests that mix three peft-made adapters and the base model,
greedy, gives each request exactly the tokens of camelid.generate_ids on the model with that adapter alone
(camelid.peft.load_adapter, itself checked against peft); adapters are added and removed while requests run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from camelid import generate_ids, save_pretrained
from camelid.checkpoint import from_pretrained
from camelid.engine import LLM, SamplingParams
from camelid.engine.multi_lora import MultiLoRALinear
from camelid.peft import load_adapter
from camelid.quant import quantize_model
from test_multi_lora import ADAPTERS, make_peft_adapter  # same folder: the peft adapter recipe

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation noise
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
# prompts of mixed lengths; each adapter (and the base) gets two of them
PROMPTS = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in (5, 17, 9, 30, 3, 12, 21, 7)]
REQUEST_ADAPTERS = ["a1", "a2", "a3", None, "a3", None, "a1", "a2"]


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(hf_checkpoint, transformers, peft, tmp_path_factory):
    """(base folder, {name: adapter folder}, reference(adapter, prompt) -> greedy tokens of that model alone)."""
    base = hf_checkpoint("llama")
    root = tmp_path_factory.mktemp("llm-multi-lora")
    folders = {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        folders[name] = root / name
        make_peft_adapter(peft, transformers, base, folders[name], seed=10 + i, **config)
    models = {None: from_pretrained(base), **{n: load_adapter(from_pretrained(base), f) for n, f in folders.items()}}
    cache: dict = {}

    def reference(adapter: str | None, prompt: list[int]) -> list[int]:
        key = (adapter, tuple(prompt))
        if key not in cache:
            cache[key] = generate_ids(models[adapter], [prompt], max_new_tokens=MAX_TOKENS)[0]
        return cache[key]

    return base, folders, reference


def test_mixed_adapter_batch_matches_each_adapter_alone(setup):
    base, folders, reference = setup
    llm = LLM(base, adapters=folders, num_blocks=64, block_size=4)
    outputs = llm.generate(PROMPTS, GREEDY, adapter=REQUEST_ADAPTERS)
    expected = [reference(a, p) for a, p in zip(REQUEST_ADAPTERS, PROMPTS)]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # the comparison has teeth: the same prompt gives different tokens under different adapters
    assert len({tuple(reference(a, PROMPTS[0])) for a in [None, *ADAPTERS]}) == 4
    assert llm.stats()["num_free_blocks"] == 64  # every block back (prefix-cached ones are free to evict)


def run_to_end(llm, request_ids) -> dict[str, list[int]]:
    done = {}
    while len(done) < len(request_ids):
        for out in llm.step():
            if out.finished and out.request_id in request_ids:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def test_add_and_remove_adapters_while_requests_run(setup):
    base, folders, reference = setup
    llm = LLM(base, adapters={"a1": folders["a1"]}, num_blocks=64, block_size=4)
    expected = {llm.add_request(PROMPTS[0], GREEDY, adapter="a1"): reference("a1", PROMPTS[0]),
                llm.add_request(PROMPTS[1], GREEDY): reference(None, PROMPTS[1])}
    with pytest.raises(ValueError, match="unknown adapter 'a2'"):
        llm.add_request(PROMPTS[2], GREEDY, adapter="a2")
    for _ in range(3):
        llm.step()
    llm.add_adapter("a2", folders["a2"])  # mid-flight: the running requests keep their own adapters
    llm.add_adapter("a3", folders["a3"])
    expected[llm.add_request(PROMPTS[3], GREEDY, adapter="a3")] = reference("a3", PROMPTS[3])
    for _ in range(2):
        llm.step()
    assert llm.stats()["num_running"] == 3
    llm.remove_adapter("a2")  # unused: goes at once, the three running requests are untouched
    with pytest.raises(ValueError, match="unknown adapter 'a2'"):
        llm.add_request(PROMPTS[2], GREEDY, adapter="a2")
    with pytest.raises(ValueError, match="'a3' is in use"):
        llm.remove_adapter("a3")
    assert run_to_end(llm, set(expected)) == expected

    # a name reloaded with other weights: its new requests follow the new weights, not the old slot or the
    # prefix-cached KV blocks computed under the old adapter for this very prompt
    llm.remove_adapter("a3")
    llm.add_adapter("a3", folders["a2"])
    [out] = llm.generate([PROMPTS[3]], GREEDY, adapter="a3")
    assert out.outputs[0].token_ids == reference("a2", PROMPTS[3]) != reference("a3", PROMPTS[3])


def test_adapters_over_a_quantized_folder(setup, tmp_path):
    """Serving QLoRA-style: the engine over a `camelid quantize`d folder (int8) with two adapters gives each request
    the greedy tokens of generate_ids on that quantized model with its adapter loaded alone."""
    base, folders, _ = setup
    quantized = tmp_path / "int8"
    save_pretrained(quantize_model(from_pretrained(base), "int8"), quantized)
    names = ["a1", "a2"]
    models = {None: from_pretrained(quantized), **{n: load_adapter(from_pretrained(quantized), folders[n])
                                                    for n in names}}
    adapters = ["a1", None, "a2", "a2", "a1", None]
    prompts = PROMPTS[:len(adapters)]
    expected = [generate_ids(models[a], [p], max_new_tokens=MAX_TOKENS)[0] for a, p in zip(adapters, prompts)]
    # the comparison has teeth: the same prompt gives different tokens under different adapters
    assert len({tuple(generate_ids(models[a], [prompts[0]], max_new_tokens=MAX_TOKENS)[0])
                for a in [None, *names]}) == 3
    llm = LLM(quantized, adapters={n: folders[n] for n in names}, num_blocks=64, block_size=4)
    assert isinstance(llm.model.get_submodule("model.layers.0.self_attn.q_proj"), MultiLoRALinear)
    outputs = llm.generate(prompts, GREEDY, adapter=adapters)
    assert [o.outputs[0].token_ids for o in outputs] == expected


# ---- random traffic (hypothesis) ------------------------------------------------------------------------------------

_add = st.tuples(st.just("add"), st.sampled_from([9, 13]), st.sampled_from([None, "x", "y"]))  # prompt length, name
_step = st.tuples(st.just("step"), st.integers(1, 14), st.none())
_reload = st.tuples(st.just("reload"), st.sampled_from(["x", "y"]), st.sampled_from(list(ADAPTERS)))  # name, weights
LORA_ACTIONS = st.lists(st.one_of(_add, _add, _step, _reload), min_size=2, max_size=12)


def test_random_traffic_with_reloaded_adapters_matches_each_adapter_alone(setup):
    """Prompts that share prefixes under several adapters, names reloaded with other weights between steps, a cache
    small enough to evict and preempt: each request gets the tokens of its adapter's weights at add time alone (a
    prefix-cached block computed under other weights is never reused)."""
    base, folders, reference = setup

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(actions=LORA_ACTIONS, num_blocks=st.integers(8, 20))
    @example(actions=[("add", 13, "x"), ("step", 14, None), ("reload", "x", "a3"), ("add", 13, "x")], num_blocks=20)
    def run(actions, num_blocks):
        llm = LLM(base, adapters={"x": folders["a1"], "y": folders["a2"]}, num_blocks=num_blocks, block_size=4,
                  max_num_batched_tokens=16)
        source = {None: None, "x": "a1", "y": "a2"}  # name -> the weights it holds now
        expected, adapter_of, done = {}, {}, {}

        def step():
            done.update({o.request_id: o.outputs[0].token_ids for o in llm.step() if o.finished})

        for kind, a, b in actions:
            if kind == "add":
                prompt = PROMPTS[3][:a]
                request_id = llm.add_request(prompt, GREEDY, adapter=b)
                expected[request_id], adapter_of[request_id] = reference(source[b], prompt), b
            elif kind == "step":
                for _ in range(a):
                    step()
            elif any(name == a and r not in done for r, name in adapter_of.items()):
                with pytest.raises(ValueError, match="in use"):
                    llm.remove_adapter(a)
            else:
                if b == source[a]:  # reloads always change the weights
                    b = next(name for name in ADAPTERS if name != b)
                llm.remove_adapter(a)
                llm.add_adapter(a, folders[b])
                source[a] = b
        while llm.has_unfinished():
            step()
        assert done == expected
        assert llm.stats()["num_free_blocks"] == num_blocks

    run()

"""LocalBackend without HTTP: chat rendering with the tokenizer's own template (checked against transformers'
apply_chat_template), stops, errors before the first chunk, abort on close, and no cross-talk between requests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time

import pytest

from camelid.engine import SamplingParams
from camelid.serve.backend import BackendError, LocalBackend
from model_zoo import FIXTURES
from server_zoo import TEMPLATE, save_parrot_model

LLAMA3 = FIXTURES / "tokenizers" / "llama3"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


def run(coro):
    return asyncio.run(coro)


async def collect(backend, model="tiny", prompt=None, messages=None, rid="r", **params):
    chunks = [c async for c in backend.generate(model, prompt, messages, SamplingParams(**params), rid)]
    return "".join(c.text for c in chunks), chunks


@pytest.fixture(scope="module")
def backend(chat_model_dir):
    b = LocalBackend.load(chat_model_dir, name="tiny", template=TEMPLATE)
    yield b
    run(b.close())


def test_chat_params_get_the_templates_stops_and_completions_do_not(chat_model_dir, backend):
    _, chat = backend._prepare("tiny", None, CHAT, SamplingParams(stop=["!!"]))
    im_end = backend.tokenizer.token_to_id("<|im_end|>")
    assert im_end in chat.stop_token_ids and chat.stop == ["!!"]
    _, plain = backend._prepare("tiny", "Hello", None, SamplingParams())
    assert plain.stop_token_ids == [] and plain.stop == []
    vicuna = LocalBackend(backend.llm, "v", template="vicuna")  # a template that stops on text too
    _, params = vicuna._prepare("v", None, CHAT, SamplingParams())
    assert "USER:" in params.stop and backend.tokenizer.eos_id in params.stop_token_ids
    run(vicuna.close())


def test_errors_come_before_the_first_chunk(backend):
    cases = [(dict(model="nope", messages=CHAT), 404, "model"),
             (dict(prompt="x" * 300), 400, "prompt"),
             (dict(prompt="x" * 200, max_tokens=100), 400, "max_tokens"),
             (dict(messages=[{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]), 400,
              "messages"),
             (dict(prompt=[1, 10_000]), 400, "prompt")]
    for kwargs, status, param in cases:
        with pytest.raises(BackendError) as e:
            run(collect(backend, **kwargs))
        assert (e.value.status, e.value.param) == (status, param), e.value.message
    s = backend.stats()
    assert s["num_waiting"] == s["num_running"] == 0


def test_closing_the_iterator_aborts_the_request(backend):
    async def start_then_leave():
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)  # cannot finish by itself early
        chunks = backend.generate("tiny", "Once upon a time", None, params, "leaver")
        first = await chunks.__anext__()
        assert first.finish_reason is None
        assert backend.stats()["num_free_blocks"] < backend.stats()["num_blocks"]  # the request holds KV blocks
        await chunks.aclose()

    before = backend.stats()["generated_tokens"]
    run(start_then_leave())
    deadline = time.monotonic() + 10
    while (s := backend.stats())["num_free_blocks"] != s["num_blocks"] or s["num_running"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.01)
    assert s["generated_tokens"] - before < 200


def test_concurrent_requests_get_their_own_outputs(backend):
    prompts = [f"Camel number {i} walks" for i in range(6)]
    alone = [run(collect(backend, prompt=p, rid=f"a{i}", max_tokens=12, temperature=0)) for i, p in enumerate(prompts)]

    async def together():
        return await asyncio.gather(*(collect(backend, prompt=p, rid=f"b{i}", max_tokens=12, temperature=0)
                                      for i, p in enumerate(prompts)))

    batched = run(together())
    assert [t for t, _ in batched] == [t for t, _ in alone]
    assert len({t for t, _ in alone}) > 1  # the prompts really lead to different texts
    for text, chunks in batched:
        assert chunks[-1].finish_reason in ("length", "stop")
        assert chunks[-1].completion_tokens == sum(len(c.token_ids) for c in chunks)


def test_n_completions_are_indexed(backend):
    text, chunks = run(collect(backend, prompt="Sand", max_tokens=6, temperature=1.0, n=3, seed=1))
    assert {c.index for c in chunks} == {0, 1, 2}
    assert all(sum(1 for c in chunks if c.index == i and c.finish_reason) == 1 for i in range(3))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """A tiny model on the real Llama 3 tokenizer, built to answer <|eot_id|> at once: every layer's output
    projection is zero (the last hidden state is the token's embedding), every embedding has a large component 0, and
    only <|eot_id|>'s output row reads it."""
    if not (LLAMA3 / "tokenizer_config.json").is_file():
        pytest.skip("the Llama 3 tokenizer fixture is missing")
    folder = tmp_path_factory.mktemp("llama3-tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA3 / name, folder / name)
    from camelid.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    return save_parrot_model(folder, tokenizer, tokenizer.token_to_id("<|eot_id|>"))


def test_the_tokenizers_own_chat_template_is_used(llama3_dir, transformers):
    backend = LocalBackend.load(llama3_dir, name="l3", kv_cache_memory="4MB")  # no --template: the tokenizer's own
    try:
        reference = transformers.AutoTokenizer.from_pretrained(llama3_dir)
        expected = reference.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert backend.chat_ids("l3", CHAT) == list(expected)
        assert backend.count_chat_tokens("l3", CHAT) == len(expected)
        text, chunks = run(collect(backend, "l3", messages=CHAT, max_tokens=8, temperature=0))
        # the answer ends at the template's end of turn: one token, not shown as text
        assert text == "" and chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 1
        assert chunks[-1].token_ids == [backend.tokenizer.token_to_id("<|eot_id|>")]
        params = backend._prepare("l3", None, CHAT, SamplingParams())[1]
        assert dataclasses.asdict(params)["stop_token_ids"] == sorted(
            {backend.tokenizer.token_to_id("<|eot_id|>"), backend.tokenizer.eos_id})
    finally:
        run(backend.close())


def test_an_engine_failure_ends_requests_and_refuses_new_ones(chat_model_dir):
    backend = LocalBackend.load(chat_model_dir, name="tiny", template=TEMPLATE)

    def broken_step():
        raise RuntimeError("simulated engine bug")
    backend.llm.step = broken_step
    with pytest.raises(BackendError) as e:
        run(collect(backend, prompt="Hello"))
    assert e.value.status == 500 and "simulated engine bug" in e.value.message
    with pytest.raises(BackendError) as e:  # no hang: later requests are refused at once
        run(collect(backend, prompt="Hello"))
    assert e.value.status == 503
    assert not backend.healthy()
    run(backend.close())


def test_a_request_whose_output_cannot_be_sent_fails_alone(chat_model_dir):
    """Turning one request's output into chunks fails (a formatting bug, a token the tokenizer lacks): that request
    gets a 500 and its blocks back, the engine keeps serving the others."""
    backend = LocalBackend.load(chat_model_dir, name="tiny", template=TEMPLATE)
    real = backend._dispatch

    def dispatch(output):
        if output.request_id == "doomed":
            raise RuntimeError("simulated dispatch bug")
        real(output)
    backend._dispatch = dispatch
    try:
        with pytest.raises(BackendError) as e:
            run(asyncio.wait_for(collect(backend, prompt="Hello", max_tokens=4, rid="doomed"), 10))
        assert e.value.status == 500 and "simulated dispatch bug" in e.value.message
        text, chunks = run(asyncio.wait_for(collect(backend, prompt="Hello", max_tokens=4, rid="fine"), 10))
        assert chunks[-1].completion_tokens == 4 and backend.healthy()
        stats = backend.llm.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]
    finally:
        run(backend.close())


def test_a_failure_outside_step_also_ends_requests_and_refuses_new_ones(chat_model_dir):
    """Any other error of the engine thread (not only in step(): here its stats) marks the backend failed: no
    request waits forever."""
    backend = LocalBackend.load(chat_model_dir, name="tiny", template=TEMPLATE)
    where = "stats"

    def broken(*args):
        raise RuntimeError(f"simulated {where} bug")
    backend.llm.stats = broken

    async def within(coro):
        return await asyncio.wait_for(coro, 10)

    with pytest.raises(BackendError) as e:
        run(within(collect(backend, prompt="Hello", max_tokens=4)))
    assert e.value.status in (500, 503) and f"simulated {where} bug" in e.value.message
    with pytest.raises(BackendError) as e:
        run(within(collect(backend, prompt="Hello", max_tokens=4)))
    assert e.value.status == 503 and not backend.healthy()
    run(backend.close())


def test_an_add_behind_a_stop_is_refused_not_left_waiting(chat_model_dir):
    """close() racing a request: its add lands in the queue behind the stop (here: in the same batch)."""
    import threading

    backend = LocalBackend.load(chat_model_dir, name="tiny", template=TEMPLATE)
    gate, real = threading.Event(), backend.llm.has_unfinished
    held = threading.Event()

    def has_unfinished():
        if not gate.is_set():
            held.set()
            gate.wait(10)  # the engine thread waits here until both commands are queued
        return real()

    backend.llm.has_unfinished = has_unfinished
    backend._commands.put(("abort", "nobody"))  # wakes the idle thread, which then blocks in has_unfinished
    assert held.wait(10)

    async def add_after_stop():
        backend._commands.put(("stop",))  # as close() puts it, after this request passed its check
        chunks = backend.generate("tiny", "Hello", None, SamplingParams(max_tokens=4), "late")
        pending = asyncio.ensure_future(chunks.__anext__())
        await asyncio.sleep(0.3)  # the add is queued behind the stop
        gate.set()
        return await asyncio.wait_for(pending, 10)

    with pytest.raises(BackendError) as e:
        run(add_after_stop())
    assert e.value.status == 503
    backend._thread.join(10)
    assert not backend._thread.is_alive()
    with pytest.raises(BackendError) as e:  # and after the stop, a request is refused at once
        run(collect(backend, prompt="Hello"))
    assert e.value.status == 503


def test_device_counters_are_sampled_at_most_once_a_second(backend, monkeypatch):
    """Monitor.sample() measures CPU use since its last call: heartbeats and scrapes must share one window."""
    calls = []
    monkeypatch.setattr(backend._monitor, "sample", lambda: calls.append(1) or {"cpu_percent": 42.0, "gpu_util": None})
    monkeypatch.setattr(backend, "_device_at", float("-inf"))
    first = backend.stats()
    assert [backend.stats() for _ in range(5)] and len(calls) == 1
    assert first["device_cpu_percent"] == 42.0 and "device_gpu_util" not in first
    monkeypatch.setattr(backend, "_device_at", time.monotonic() - 1.5)  # a second later: a fresh sample
    backend.stats()
    assert len(calls) == 2


def test_prompts_are_tokenized_off_the_event_loop(backend, monkeypatch):
    import threading

    threads, prepare = [], backend._prepare

    def recording(*args):
        threads.append(threading.current_thread())
        return prepare(*args)
    monkeypatch.setattr(backend, "_prepare", recording)
    run(collect(backend, prompt="Hello", max_tokens=2))
    assert threads and threads[0] is not threading.main_thread()


def test_a_model_folder_serves_with_the_template_it_was_tuned_with(chat_model_dir, tmp_path):
    """A full fine-tune's final/ (or a merged model) records its chat template, as `camelid chat` reads it; an
    explicit --template still wins."""
    from camelid.templates import TEMPLATE_FILE

    folder = shutil.copytree(chat_model_dir, tmp_path / "tuned")
    (folder / TEMPLATE_FILE).write_text(json.dumps({"template": "vicuna"}))
    for template, expected in ((None, "vicuna"), ("chatml", "chatml")):
        backend = LocalBackend.load(folder, name="t", template=template, kv_cache_memory="4MB")
        try:
            assert backend._template("t").name == expected
        finally:
            run(backend.close())


def test_logprobs_of_ids_past_the_tokenizer_or_without_one_leave_the_engine_serving(chat_model_dir, tmp_path):
    """A model's vocabulary padded past its tokenizer's (as `camelid init --preset tiny` makes, and many checkpoints
    ship): a token the tokenizer cannot spell has no bytes. A folder without a tokenizer cannot spell any: 400. Either
    used to kill the engine thread, and every later request got 503."""
    from camelid.tokenizer import Tokenizer

    folder = tmp_path / "padded"
    folder.mkdir()
    tokenizer = Tokenizer(chat_model_dir)
    padding = tokenizer.vocab_size + 7  # an id the model has and the tokenizer lacks: greedy picks it
    save_parrot_model(folder, tokenizer, padding, vocab_size=tokenizer.vocab_size + 32)
    bare = LocalBackend.load(folder, name="bare", kv_cache_memory="4MB")  # no tokenizer.json yet
    try:
        with pytest.raises(BackendError) as e:
            run(collect(bare, "bare", prompt=[3, 4], max_tokens=2, logprobs=1))
        assert (e.value.status, e.value.param) == (400, "logprobs") and bare.healthy()
    finally:
        run(bare.close())
    tokenizer.save(folder)
    backend = LocalBackend.load(folder, name="padded", kv_cache_memory="4MB")
    try:
        _, chunks = run(collect(backend, "padded", prompt="Hi", max_tokens=2, temperature=0, logprobs=3))
        entries = [e for c in chunks for e in c.logprobs]
        assert len(entries) == 2 and entries[0]["bytes"] == [] and entries[0]["token"] == ""
        assert entries[0]["top_logprobs"][0]["bytes"] == [] and len(entries[0]["top_logprobs"]) == 3
        assert backend.healthy()
    finally:
        run(backend.close())

"""LocalBackend without HTTP: chat rendering with the tokenizer's own template (checked against transformers'
apply_chat_template), stops, errors before the first chunk, abort on close, and no cross-talk between requests."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time

import pytest
import torch

from camelid.checkpoint import save_pretrained
from camelid.engine import SamplingParams
from camelid.model import Transformer
from camelid.serve.backend import BackendError, LocalBackend
from model_zoo import FIXTURES, tiny_config
from server_zoo import TEMPLATE

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
        chunks = backend.generate("tiny", "Once upon a time", None, SamplingParams(max_tokens=200, temperature=0),
                                  "leaver")
        first = await chunks.__anext__()
        assert backend.stats()["num_free_blocks"] < backend.stats()["num_blocks"] or first.finish_reason
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
    eot = tokenizer.token_to_id("<|eot_id|>")
    config = tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, hidden_size=32,
                         intermediate_size=32, num_hidden_layers=1, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eot, 0] = 1.0
    save_pretrained(model, folder)
    return folder


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
    run(backend.close())

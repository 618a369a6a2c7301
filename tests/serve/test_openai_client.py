"""The official openai client against a real server (uvicorn on a loopback port) over the engine."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from camelid.checkpoint import from_pretrained
from camelid.generate import generate_ids
from camelid.templates import get_template
from camelid.tokenizer import Tokenizer
from server_zoo import TEMPLATE

HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the camel."}]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    """The reference generator (static KV cache, no engine) and the tokenizer."""
    return from_pretrained(chat_model_dir), Tokenizer(chat_model_dir)


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["context_length"] == 256
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-model")


def test_completion_matches_reference_generator(client, reference):
    model, tokenizer = reference
    r = client.completions.create(model="tiny", prompt="The camel walks", max_tokens=12, temperature=0)
    ids = tokenizer.encode("The camel walks")
    expected = generate_ids(model, [ids], 12, stop_ids=tokenizer.stop_ids, temperature=0)[0]
    assert r.choices[0].text == tokenizer.decode(expected)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == len(ids) + len(expected)
    assert r.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")


def test_chat_uses_the_template_and_matches_reference(client, reference):
    model, tokenizer = reference
    tpl = get_template(TEMPLATE)
    prompt = tpl.encode_prompt(tokenizer, HELLO)
    stops = set(tpl.stop_token_ids(tokenizer)) | set(tokenizer.stop_ids)
    expected = generate_ids(model, [prompt], 10, stop_ids=stops, temperature=0)[0]
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tokenizer.decode(expected)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(expected)


def _reference_logprobs(model, ids: list[int], num_prompt: int, k: int) -> list[tuple[float, list[int]]]:
    """Per generated token: its log-softmax under the reference model and the k most likely ids."""
    import torch

    with torch.no_grad():
        logprobs = model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    rows = logprobs[num_prompt - 1:len(ids) - 1]
    return [(row[t].item(), row.topk(k).indices.tolist()) for row, t in zip(rows, ids[num_prompt:])]


def _ids_of(tokenizer, token_bytes: list[bytes]) -> list[int]:
    """The ids of tokens given by their bytes (each token of this tokenizer is one byte or one special token)."""
    by_bytes = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size)}
    return [by_bytes[b] for b in token_bytes]


def test_chat_logprobs_match_the_reference_model(client, reference):
    model, tokenizer = reference
    prompt = get_template(TEMPLATE).encode_prompt(tokenizer, HELLO)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = _ids_of(tokenizer, [bytes(e.bytes) for e in content])
    assert len(content) == r.usage.completion_tokens
    for entry, (logprob, top) in zip(content, _reference_logprobs(model, prompt + ids, len(prompt), 3)):
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tokenizer.token_bytes(i) for i in top]
    text = b"".join(bytes(e.bytes) for e in content if not e.token.startswith("<|")).decode("utf-8", "replace")
    assert text == r.choices[0].message.content
    # streamed: the same entries, spread over the chunks
    streamed = [e for chunk in client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8,
                                                              temperature=0, logprobs=True, top_logprobs=3,
                                                              stream=True)
                for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]  # values within float noise: the second
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)  # reuses KV
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, top_logprobs=2)


def test_completion_logprobs_match_the_reference_model(client, reference):
    model, tokenizer = reference
    prompt = tokenizer.encode("The camel walks")
    r = client.completions.create(model="tiny", prompt="The camel walks", max_tokens=10, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ids = generate_ids(model, [prompt], 10, stop_ids=tokenizer.stop_ids, temperature=0)[0]  # greedy, as served
    spelled = [tokenizer.token_bytes(i) for i in ids]  # part of a character: "bytes:\\xe4", as OpenAI spells it
    assert lp.tokens == [b.decode() if b.isascii() else "bytes:" + "".join(f"\\x{c:02x}" for c in b) for b in spelled]
    assert lp.text_offset == [len(b"".join(spelled[:i]).decode("utf-8", "replace")) for i in range(len(ids))]
    for logprob, top, (expected, expected_top) in zip(lp.token_logprobs, lp.top_logprobs,
                                                      _reference_logprobs(model, prompt + ids, len(prompt), 2),
                                                      strict=True):
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert list(top.values()) == pytest.approx(sorted(top.values(), reverse=True)) and max(top.values()) == logprob
        assert len(top) == 2
    streamed = [t for c in client.completions.create(model="tiny", prompt="The camel walks", max_tokens=10,
                                                      temperature=0, logprobs=2, stream=True)
                for choice in c.choices if choice.logprobs for t in choice.logprobs.tokens]
    assert streamed == lp.tokens


def test_echo_scores_the_prompt_as_lm_eval_asks(client, reference):
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, one new token. The prompt's tokens come first,
    the first without a logprob, each other with the reference model's log-softmax at the position before it."""
    model, tokenizer = reference
    prompt = tokenizer.encode("The camel walks far")
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = _reference_logprobs(model, prompt + [generate_ids(model, [prompt], 1)[0][0]], 1, 1)
    assert lp.token_logprobs[1:] == pytest.approx([value for value, _ in expected], abs=1e-4)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    spelled = b"".join(tokenizer.token_bytes(i) for i in prompt).decode("utf-8", "replace")
    assert r.choices[0].text.startswith(spelled) and r.usage.prompt_tokens == len(prompt)
    assert lp.text_offset[:2] == [0, len(tokenizer.token_bytes(prompt[0]).decode("utf-8", "replace"))]
    # streamed: the same tokens and values; a text prompt without logprobs is echoed as given
    events = [c.choices[0] for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=1,
                                                               temperature=0, logprobs=1, echo=True, stream=True)
              if c.choices]
    assert [t for e in events if e.logprobs for t in e.logprobs.tokens] == lp.tokens
    assert "".join(e.text for e in events) == r.choices[0].text
    plain = client.completions.create(model="tiny", prompt="Camels", max_tokens=6, temperature=0)
    echoed = client.completions.create(model="tiny", prompt="Camels", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Camels" + plain.choices[0].text and echoed.choices[0].logprobs is None


def test_streamed_chat_equals_non_streamed(client):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model="tiny", prompt="Camels store fat", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices) == whole


def test_n_two_samples_two_choices(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    texts = [c.message.content for c in r.choices]
    assert texts[0] != texts[1]  # two independent samples of 8 random-model tokens
    # the same seed gives the same pair again
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, n=2, seed=3)
    assert [c.message.content for c in again.choices] == texts
    # usage counts the tokens of both choices, the prompt once
    single = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    assert r.usage.completion_tokens == sum(8 if c.finish_reason == "length" else 0 for c in r.choices) or \
        any(c.finish_reason == "stop" for c in r.choices)


def test_stop_string_cuts_the_text(client):
    kwargs = dict(model="tiny", prompt="The camel walks", max_tokens=24, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable() and text[i:i + 2].strip())
    r = client.completions.create(**kwargs, stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_errors_raise_the_clients_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 400, max_tokens=4)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=-0.5)
    assert e.value.body["param"] == "temperature"


def test_a_parameter_given_as_none_means_its_default(client):
    """The client sends an explicit None as null, and OpenAI's parameters are nullable (the client's types say
    Optional): null is the default, not a 400."""
    unset = dict(temperature=None, top_p=None, n=None, presence_penalty=None, frequency_penalty=None, seed=None,
                 stop=None, stream=None)
    chat = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, logprobs=None,
                                          top_logprobs=None, **unset)
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    legacy = client.completions.create(model="tiny", prompt="The camel walks", max_tokens=None, echo=None,
                                       logprobs=None, **unset)
    assert len(legacy.choices) == 1 and legacy.usage.completion_tokens <= 16  # OpenAI's default max_tokens


def test_client_disconnect_aborts_and_frees_blocks(server, slow_engine):
    backend = server.backend
    before = backend.stats()
    assert before["num_free_blocks"] == before["num_blocks"]
    body = {"model": "tiny", "prompt": "A long story:", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        mid = backend.stats()
        assert mid["num_free_blocks"] < mid["num_blocks"]  # the request holds KV blocks while it streams
    # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 10
    while (s := backend.stats())["num_free_blocks"] != s["num_blocks"] or s["num_running"]:
        assert time.monotonic() < deadline, f"blocks not freed after the client left: {s}"
        time.sleep(0.02)
    generated = s["generated_tokens"] - before["generated_tokens"]
    assert generated < 200  # aborted, not run to max_tokens
    metrics = httpx.get(server.url + "/metrics").text
    assert "camelid_kv_blocks_used 0" in metrics
    # the serving monitor: decode bandwidth from the engine's decode steps, and the device's (here CPU) counters
    gauges = dict(line.split() for line in metrics.splitlines() if line and not line.startswith("#") and "{" not in line)
    assert float(gauges["camelid_decode_bandwidth_bytes_per_second"]) > 0
    assert float(gauges["camelid_device_rss_gb"]) > 0 and "camelid_device_cpu_percent" in gauges


@pytest.fixture
def slow_engine(server, monkeypatch):
    """Each engine step takes >= 10 ms, so a 220-token request surely outlives a client that leaves early."""
    llm = server.backend.llm
    step = llm.step

    def slow_step():
        time.sleep(0.01)
        return step()
    monkeypatch.setattr(llm, "step", slow_step)  # the engine thread looks the method up at every step


def test_a_plain_request_whose_client_gives_up_is_aborted_too(server, slow_engine):
    backend = server.backend
    before = backend.stats()["generated_tokens"]
    body = {"model": "tiny", "prompt": "Another long story:", "max_tokens": 220, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client hangs up after 0.3 s
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    deadline = time.monotonic() + 10
    while (s := backend.stats())["num_free_blocks"] != s["num_blocks"] or s["num_running"]:
        assert time.monotonic() < deadline, f"blocks not freed after the client left: {s}"
        time.sleep(0.02)
    assert s["generated_tokens"] - before < 220


def test_openapi_schema_lists_the_endpoints(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/sessions", "/v1/sessions/{session_id}",
                 "/health", "/metrics"):
        assert path in paths
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    page = httpx.get(server.url + "/")  # the web chat page, when its files are installed
    assert page.status_code == 200 and "<html" in page.text.lower() or page.json()["error"]["message"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers name
def test_a_lora_adapter_is_its_own_model(start_server, chat_model_dir, reference, transformers, tmp_path):
    peft = pytest.importorskip("peft")
    import torch

    from camelid.peft import load_adapter

    # a PEFT adapter made by peft itself, with non-zero B so it changes the output
    hf = transformers.AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32)
    lora = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    lora.save_pretrained(tmp_path / "camel-lora")

    server = start_server(adapters={"camel-lora": str(tmp_path / "camel-lora")})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny", "camel-lora"]
    _, tokenizer = reference
    tpl = get_template(TEMPLATE)
    prompt = tpl.encode_prompt(tokenizer, HELLO)
    stops = set(tpl.stop_token_ids(tokenizer)) | set(tokenizer.stop_ids)
    tuned = load_adapter(from_pretrained(chat_model_dir), tmp_path / "camel-lora")
    expected = tokenizer.decode(generate_ids(tuned, [prompt], 10, stop_ids=stops, temperature=0)[0])
    answers = {m: client.chat.completions.create(model=m, messages=HELLO, max_tokens=10, temperature=0)
               .choices[0].message.content for m in ("tiny", "camel-lora")}
    assert answers["camel-lora"] == expected
    assert answers["camel-lora"] != answers["tiny"]
    server.stop()


def test_completion_text_offsets_count_the_text_of_a_sentencepiece_model(tmp_path):
    """A SentencePiece decoder drops the leading space of the first token ("▁Paris" is "Paris" in the text, as
    Hugging Face decodes it): text_offset counts the characters of the text the choice holds, not of the bytes."""
    from camelid.serve.app import create_app
    from camelid.serve.backend import LocalBackend
    from model_zoo import FIXTURES
    from server_zoo import ServerThread, save_parrot_model

    if not (FIXTURES / "tokenizers" / "llama2" / "tokenizer.json").is_file():
        pytest.skip("the Llama 2 tokenizer fixture is missing")
    tokenizer = Tokenizer(FIXTURES / "tokenizers" / "llama2")
    save_parrot_model(tmp_path, tokenizer, tokenizer.token_to_id("\u2581Paris"), context=64)
    tokenizer.save(tmp_path)
    server = ServerThread(create_app(LocalBackend.load(tmp_path, name="sp", kv_cache_memory="4MB")))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kwargs = dict(model="sp", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=1)
        choice = client.completions.create(**kwargs).choices[0]
        assert choice.text == "Paris Paris Paris" and choice.logprobs.tokens == [" Paris"] * 3
        assert choice.logprobs.text_offset == [0, 5, 11]  # "Paris", " Paris", " Paris"
        streamed = [o for c in client.completions.create(**kwargs, stream=True)
                    for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
        assert streamed == [0, 5, 11]
    finally:
        server.stop()


def test_logit_bias_forces_and_bans_tokens(client, reference):
    _, tokenizer = reference
    camel = tokenizer.encode("Z", bos=False)[0]
    kwargs = dict(model="tiny", max_tokens=6, temperature=1.0, logit_bias={str(camel): 100})
    assert client.completions.create(prompt="The camel walks", **kwargs).choices[0].text == "Z" * 6
    assert client.chat.completions.create(messages=HELLO, **kwargs).choices[0].message.content == "Z" * 6
    # -100 bans the greedy first token; the logprobs stay the model's own
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=1, temperature=0, logprobs=True, top_logprobs=1)
    greedy = client.chat.completions.create(**kwargs).choices[0].logprobs.content[0]
    first = _ids_of(tokenizer, [bytes(greedy.bytes)])[0]
    banned = client.chat.completions.create(**kwargs, logit_bias={str(first): -100}).choices[0].logprobs.content[0]
    assert banned.token != greedy.token and banned.top_logprobs[0].token == greedy.token
    assert banned.logprob < greedy.logprob
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", logit_bias={"100000": 1})  # past the vocabulary
    assert e.value.body["param"] == "logit_bias"


def test_best_of_returns_the_candidates_with_the_highest_cumulative_logprob(client):
    kwargs = dict(model="tiny", prompt="The camel walks", max_tokens=6, temperature=1.0, seed=11)
    # the same seed draws the same 5 candidates (sample i uses the request's stream i): score them by hand
    candidates = client.completions.create(**kwargs, n=5, logprobs=0).choices
    ranked = sorted(candidates, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert len({c.text for c in candidates}) > 1
    r = client.completions.create(**kwargs, n=2, best_of=5)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [c.text for c in ranked[:2]]
    assert all(c.logprobs is None for c in r.choices)  # not asked for: used for the choice only
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in candidates)  # every candidate's
    with_logprobs = client.completions.create(**kwargs, best_of=5, logprobs=1).choices
    assert len(with_logprobs) == 1 and with_logprobs[0].logprobs.tokens == ranked[0].logprobs.tokens
    for bad in (dict(n=3, best_of=2), dict(best_of=2, stream=True), dict(best_of=0)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**kwargs, **bad})
        assert e.value.body["param"] == "best_of"


UNSUPPORTED = [  # (endpoint, kwargs, the parameter the 400 names): features this server lacks are refused, not ignored
    ("chat", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    ("chat", dict(tool_choice="required"), "tool_choice"),
    ("chat", dict(functions=[{"name": "f", "parameters": {}}]), "functions"),
    ("chat", dict(function_call={"name": "f"}), "function_call"),
    ("chat", dict(response_format={"type": "json_object"}), "response_format"),
    ("chat", dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
     "response_format"),
    ("chat", dict(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}), "audio"),
    ("chat", dict(web_search_options={}), "web_search_options"),
    ("chat", dict(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), "messages"),
    ("completions", dict(suffix="the end."), "suffix"),
    # best_of is a completions parameter (vLLM took it on chat too): on chat it would return plain samples
    ("chat", dict(extra_body={"best_of": 3}), "best_of"),
    # a tool result answers a tool call this server can never make; the call itself would be dropped unread
    ("chat", dict(messages=[*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]), "messages"),
    ("chat", dict(messages=[*HELLO, {"role": "function", "name": "f", "content": "42"}]), "messages"),
    ("chat", dict(messages=[*HELLO, {"role": "assistant", "content": None, "function_call": {
        "name": "f", "arguments": "{}"}}, {"role": "user", "content": "go on"}]), "messages"),
    # a refusal is something an assistant says: in a user message it was dropped unread
    ("chat", dict(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                         {"type": "refusal", "refusal": "no"}]}]), "messages"),
    ("chat", dict(stop=["a", "b", "c", "d", "e"]), "stop"),  # OpenAI's limit: 4
    ("completions", dict(stop=["a", "b", "c", "d", "e"]), "stop"),
]


@pytest.mark.parametrize("endpoint,kwargs,param", UNSUPPORTED, ids=[p for _, _, p in UNSUPPORTED])
def test_unsupported_features_are_refused_naming_the_parameter(client, endpoint, kwargs, param):
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    base = dict(messages=HELLO) if endpoint == "chat" else dict(prompt="The camel walks")
    with pytest.raises(openai.BadRequestError) as e:
        create(model="tiny", max_tokens=4, **{**base, **kwargs})
    assert e.value.body["param"] == param


def test_an_assistant_refusal_part_is_read_as_its_text(client):
    """OpenAI's assistant content may hold refusal parts: they are what the assistant said, not dropped."""
    as_part = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help with that."}]},
               {"role": "user", "content": "why?"}]
    as_text = [*as_part[:1], {"role": "assistant", "content": "I cannot help with that."}, as_part[2]]
    usage = [client.chat.completions.create(model="tiny", messages=m, max_tokens=1).usage.prompt_tokens
             for m in (as_part, as_text)]
    assert usage[0] == usage[1]


def test_parameters_that_ask_for_nothing_are_accepted(client):
    """What a client sends by default or harmlessly: no tools, tool_choice none, plain-text format, four stops,
    and the bookkeeping fields (user, metadata, store, service_tier)."""
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, tools=[], tool_choice="none",
                                       response_format={"type": "text"}, modalities=["text"],
                                       stop=["a", "b", "c", "d"], user="u", metadata={"k": "v"}, store=False,
                                       service_tier="auto")
    assert len(r.choices) == 1
    assert client.completions.create(model="tiny", prompt="The camel", max_tokens=4, suffix="").choices

"""Bad input gets a 4xx with OpenAI's error body (message, type, param), never a 500; API keys; body limit."""

from __future__ import annotations

import json

import httpx
import pytest

KEY_A, KEY_B = "key-alice", "key-bob"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    db = tmp_path_factory.mktemp("errors-db") / "chats.db"
    return start_server(api_keys=[KEY_A, KEY_B], db=f"sqlite:///{db}", max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as client:
        yield client


def check_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


BAD_BODIES = [  # (endpoint, body, status, param)
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "model"),  # missing field
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "four"}, 400, "max_tokens"),  # wrong types
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": 42}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes please"}, 400, "stream"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-17"}, 404, "model"),  # unknown model
    ("/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * 300}, 400, "prompt"),  # longer than the context (256)
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * 200, "max_tokens": 100}, 400, "max_tokens"),  # sum > ctx
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10_000}, 400, "max_tokens"),  # over the context
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 256}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 999999]}, 400, "prompt"),  # token id outside the vocab
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),  # OpenAI's limit: 20
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2, "stream": True}, 400, "top_logprobs"),  # without logprobs
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, 400, "logit_bias"),  # OpenAI's range: [-100, 100]
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),  # a digit
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"\u0663": 1}}, 400, "logit_bias"),  # too
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"99999": 1}, "stream": True}, 400, "logit_bias"),  # vocab
    # OpenAI refuses stream_options without stream, and a JSON boolean where a number goes (pydantic's lax mode
    # took true as 1)
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": False, "stream_options": {}}, 400,
     "stream_options"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": True}}, 400, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "temperature": True}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": True}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": True}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "seed": False}, 400, "seed"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": True}, 400, "presence_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "frequency_penalty": False}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, True]}, 400, "prompt"),
    # nor is a string of digits, which pydantic's lax mode took as the number
    ("/v1/chat/completions", {**CHAT, "temperature": "0.5"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "16"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": "2"}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": "7"}, 400, "seed"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD_BODIES, ids=[f"{i}" for i in range(len(BAD_BODIES))])
def test_bad_bodies_get_openai_errors(http, endpoint, body, status, param):
    check_error(http.post(endpoint, json=body), status, param)


@pytest.mark.parametrize("param,value", [("temperature", "NaN"), ("top_p", "NaN"), ("presence_penalty", "-Infinity"),
                                         ("repetition_penalty", "Infinity")])
def test_non_finite_numbers_are_named_as_such(http, param, value):
    # Python's JSON reader takes NaN / Infinity; a NaN passed every range check's message ("less than or equal to 2")
    body = json.dumps(CHAT)[:-1] + f', "{param}": {value}}}'
    error = check_error(http.post("/v1/chat/completions", content=body,
                                  headers={"content-type": "application/json"}), 400, param)
    assert "finite" in error["message"], error


SURROGATE = "\ud800"  # a lone UTF-16 surrogate: valid JSON ("\\ud800"), not Unicode: no tokenizer or database takes it
NOT_TEXT = [  # (endpoint, body, param)
    ("/v1/completions", {"model": "tiny", "prompt": SURROGATE}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a" + SURROGATE]}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a" + SURROGATE}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                  "text": SURROGATE}]}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "session_id": SURROGATE}, "session_id"),
    ("/v1/sessions", {"system_prompt": SURROGATE}, "system_prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages"),
]


@pytest.mark.parametrize("endpoint,body,param", NOT_TEXT, ids=[f"{i}" for i in range(len(NOT_TEXT))])
def test_text_that_is_not_a_string_of_unicode_is_a_400(http, endpoint, body, param):
    # json.dumps escapes the surrogate as JSON allows (httpx's json= would refuse to encode it)
    r = http.post(endpoint, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    check_error(r, 400, param)


@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_when_streaming_is_still_a_status_code(http, stream):
    r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10_000, "stream": stream})
    check_error(r, 400, "max_tokens")
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 300, "stream": stream})
    check_error(r, 400, "prompt")


def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                  headers={"Content-Type": "application/json"})
    assert "JSON" in check_error(r, 400)["message"]
    r = http.post("/v1/chat/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    check_error(r, 400)


def test_oversized_body_gets_413(http):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}
    check_error(http.post("/v1/chat/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit must hold for a streamed body too
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'
    check_error(http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_unknown_route_and_method(http):
    check_error(http.get("/v1/nothing-here"), 404)
    check_error(http.get("/v1/chat/completions"), 405)


def test_paths_that_match_no_route_are_one_metrics_label(server, http):
    """A client picks the path: one it made up must not become a label value of its own (a new Prometheus series
    each, and a quote or newline in it would write lines of its own into /metrics)."""
    for path in ("/v1/made-up", "/v1/completions-x", "/v1/sessions/a/b%22%7D%201%0Acamelid_injected%201%0A%23"):
        check_error(http.get(path), 404)
    check_error(http.post("/v1/completions", content=b"x" * 100_000), 413)  # refused before routing: still named
    metrics = httpx.get(server.url + "/metrics").text
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in metrics.splitlines()
                 if line.startswith("camelid_requests_total")}
    assert "/v1/completions" in endpoints and "other" in endpoints
    assert not any("made-up" in e or "-x" in e or "/b" in e for e in endpoints), endpoints
    assert "camelid_injected" not in metrics


def test_api_keys(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY_A}):
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert check_error(r, 401)["type"] == "authentication_error"
        check_error(httpx.get(server.url + "/v1/models", headers=headers), 401)
        check_error(httpx.get(server.url + "/v1/sessions", headers=headers), 401)
    for key in (KEY_A, KEY_B):
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_another_users_session_is_not_found(server, http):
    sid = http.post("/v1/sessions", json={"title": "alice's"}).json()["id"]
    bob = {"Authorization": f"Bearer {KEY_B}"}
    check_error(httpx.get(f"{server.url}/v1/sessions/{sid}", headers=bob), 404)
    check_error(httpx.patch(f"{server.url}/v1/sessions/{sid}", json={"title": "mine"}, headers=bob), 404)
    check_error(httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=bob), 404)
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "session_id": sid}, headers=bob)
    check_error(r, 404, "session_id")
    assert httpx.get(server.url + "/v1/sessions", headers=bob).json()["data"] == []
    assert http.get(f"/v1/sessions/{sid}").json()["title"] == "alice's"  # untouched
    check_error(http.post("/v1/sessions", json={"model": "gpt-17"}), 404, "model")


def test_a_misspelt_session_field_is_refused_not_ignored(http):
    # the sessions API is camelid's own (no client sends extra fields): a typo would silently change nothing
    sid = http.post("/v1/sessions", json={"title": "typos"}).json()["id"]
    check_error(http.post("/v1/sessions", json={"sytem_prompt": "Be brief."}), 400, "sytem_prompt")
    check_error(http.patch(f"/v1/sessions/{sid}", json={"system_promt": "Be brief."}), 400, "system_promt")
    assert http.get(f"/v1/sessions/{sid}").json()["system_prompt"] is None


def test_no_500_was_ever_sent(server, http):
    # one request of each kind first, so the test stands alone (run by itself, or after any other selection)
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert http.post("/v1/chat/completions", json={**CHAT, "temperature": -1}).status_code == 400
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 300}).status_code == 400
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 100_000}).status_code == 413
    metrics = httpx.get(server.url + "/metrics").text
    statuses = {line.split('status="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith("camelid_requests_total")}
    assert "200" in statuses and "400" in statuses and "401" in statuses and "413" in statuses
    assert not any(s.startswith("5") for s in statuses), metrics
    assert json.loads(http.get("/v1/models").text)["data"][0]["id"] == "tiny"


def test_a_failed_engine_answers_503_and_health_says_so(start_server):
    """One engine error: the requests end, later ones get 503 at once (no hang), and /health stops answering 200
    so a load balancer (or the cluster's controller) sends the traffic elsewhere."""
    server = start_server()
    assert httpx.get(server.url + "/health").status_code == 200

    def broken_step():
        raise RuntimeError("simulated engine bug")
    server.backend.llm.step = broken_step
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
    check_error(httpx.post(server.url + "/v1/completions", json=body, timeout=10), 500)
    for stream in (False, True):
        error = check_error(httpx.post(server.url + "/v1/completions", json={**body, "stream": stream}, timeout=10),
                            503)
        assert "simulated engine bug" in error["message"]
    check_error(httpx.get(server.url + "/health"), 503)

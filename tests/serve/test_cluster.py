"""Scale-out, FastChat style, on loopback: a real controller (`camelid controller`) and two real worker processes
(`camelid worker`, each running the engine over a tiny model). Workers register and heartbeat; RemoteBackend routes to
the least-loaded one; a worker that goes silent is dropped and comes back; a worker killed mid-request fails exactly
its own requests with a clear error while the other's finish; a hung worker ends its request after the chunk timeout.

The tests share one cluster (starting a worker costs seconds) and repair it as they go: a test that needs two live
workers starts replacements for the ones an earlier test killed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from camelid.engine import LLM, SamplingParams
from camelid.serve.backend import BackendError
from camelid.serve.controller import CLUSTER_TOKEN_HEADER, Controller, create_controller_app
from camelid.serve.remote import RemoteBackend
from server_zoo import TEMPLATE, FakeBackend, ServerThread, make_chat_model

HEARTBEAT_TIMEOUT = 3.0  # the controller drops a worker silent this long (workers beat every 0.5 s)
TOKEN = "cluster-secret"  # the real cluster runs with a cluster token, as a multi-machine one must
AUTH = {CLUSTER_TOKEN_HEADER: TOKEN}
MODEL = "tiny"
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)  # ~seconds of decoding: time to act mid-request
SHORT = SamplingParams(max_tokens=4, ignore_eos=True)  # always ends with "length" (sampling may hit EOS otherwise)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.controller = subprocess.Popen([sys.executable, "-m", "camelid", "controller", "--port", str(port),
                                            "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--cluster-token", TOKEN])
        self.procs: dict[str, subprocess.Popen] = {}  # the workers start meanwhile: they retry until it answers
        self.count = 0

    def live(self) -> dict[str, dict]:
        assert self.controller.poll() is None, "the controller exited"
        try:
            return {w["name"]: w for w in httpx.get(f"{self.url}/workers", headers=AUTH).json()["data"]}
        except httpx.TransportError:  # still starting
            return {}

    def wait_for(self, condition, timeout: float, what: str) -> float:
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)
        return time.monotonic() - start

    def ensure_workers(self, n: int) -> list[str]:
        """Start workers until n are alive and registered; their names, in start order."""
        for name in [k for k, p in self.procs.items() if p.poll() is not None or k not in self.live()]:
            self.kill(name)
        while len(self.procs) < n:
            self.count += 1
            name, port = f"w{self.count}", free_port()
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "camelid", "worker", "--controller", self.url, "--model", str(self.model_dir),
                 "--model-name", MODEL, "--template", TEMPLATE, "--port", str(port), "--name", name,
                 "--kv-cache-memory", "16MB", "--heartbeat-interval", "0.5"],
                env={**os.environ, "OMP_NUM_THREADS": "1", "CAMELID_CLUSTER_TOKEN": TOKEN})
        self.wait_for(lambda: set(self.procs) <= set(self.live()), 90, f"workers {list(self.procs)} to register")
        return list(self.procs)

    def address(self, name: str) -> str:
        return self.live()[name]["address"]

    def status(self, name: str) -> dict:
        return httpx.get(f"{self.address(name)}/worker/status", headers=AUTH).json()

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        self.controller.kill()
        self.controller.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(make_chat_model(tmp_path_factory.mktemp("cluster") / MODEL, context=512))
    yield c
    c.close()


async def run(backend: RemoteBackend, prompt: str, params: SamplingParams, started: asyncio.Event | None = None,
              request_id: str = "r", model: str = MODEL) -> tuple[str, list]:
    """(text, finish reasons) of one request; `started` is set at its first chunk."""
    text, reasons = "", []
    async for chunk in backend.generate(model, prompt, None, params, request_id):
        if started is not None:
            started.set()
        text += chunk.text
        if chunk.finish_reason:
            reasons.append(chunk.finish_reason)
    return text, reasons


async def start_many(backend: RemoteBackend, n: int) -> list[asyncio.Task]:
    """n long requests, returned once each has streamed its first chunk (all are in flight on some worker)."""
    events = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(run(backend, f"request {i}", LONG, events[i], f"r{i}")) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
    return tasks


# ---- the controller's rules, on a fake clock -----------------------------------------------------------------------

def test_controller_routes_to_least_loaded_and_expires_silent_workers():
    now = [0.0]
    c = Controller(heartbeat_timeout=3.0, clock=lambda: now[0])
    c.register("a", "http://a/", [{"id": "m"}, {"id": "lora"}])
    c.register("b", "http://b", [{"id": "m"}], queue_length=5)
    assert c.pick("nope") is None
    assert c.pick("lora").name == "a"  # only a serves the adapter
    assert c.workers["a"].address == "http://a"
    # a burst between heartbeats: a's picks count as load until b (5 queued) is the lighter one
    assert [c.pick("m").name for _ in range(6)] == ["a", "a", "a", "a", "a", "b"]
    assert c.heartbeat("b", queue_length=0)
    assert [c.pick("m", reserve=False).name for _ in range(2)] == ["b", "b"]
    assert sorted(m["id"] for m in c.models()) == ["lora", "m"]
    now[0] = 2.0
    assert c.heartbeat("a", queue_length=1)
    now[0] = 3.5  # b's last heartbeat was at 0: older than the timeout
    assert set(c.live_workers()) == {"a"}
    assert not c.heartbeat("b", 0)  # the worker learns it was dropped and registers again
    assert c.drop("a") and not c.drop("a")
    assert c.pick("m") is None and c.models() == []


def test_a_live_workers_name_is_not_taken_by_another_address():
    """Two workers given the same --name: the second must not silently replace the first (whose heartbeats would
    then keep the impostor's entry alive while the first never gets a request again)."""
    from fastapi.testclient import TestClient

    now = [0.0]
    c = Controller(heartbeat_timeout=3.0, clock=lambda: now[0])
    c.register("a", "http://a", [{"id": "m"}])
    with pytest.raises(ValueError, match="http://a"):
        c.register("a", "http://b", [{"id": "other"}])
    assert c.workers["a"].address == "http://a"
    c.register("a", "http://a/", [{"id": "m"}])  # the same worker again (it restarted): fine
    assert not c.heartbeat("a", 0, address="http://b")  # a heartbeat from elsewhere is not the registered worker's
    assert c.heartbeat("a", 0, address="http://a")
    now[0] = 3.5  # once the first one has gone silent, the name is free
    c.register("a", "http://b", [{"id": "other"}])
    assert c.workers["a"].address == "http://b"

    client = TestClient(create_controller_app())
    assert client.post("/register", json={"name": "w", "address": "http://x", "models": []}).status_code == 200
    r = client.post("/register", json={"name": "w", "address": "http://y", "models": []})
    assert r.status_code == 409 and "http://x" in r.json()["detail"]


def test_a_registration_without_model_ids_is_refused():
    """One malformed registration (a card with no "id") made every /pick and /models of the controller a 500."""
    from fastapi.testclient import TestClient

    client = TestClient(create_controller_app(), raise_server_exceptions=False)
    assert client.post("/register", json={"name": "ok", "address": "http://ok",
                                          "models": [{"id": "m", "context_length": 8}]}).status_code == 200
    assert client.post("/register", json={"name": "bad", "address": "http://bad",
                                          "models": [{"name": "m"}]}).status_code == 422
    assert client.post("/pick", json={"model": "m"}).json()["name"] == "ok"
    assert client.get("/models").json()["data"] == [{"id": "m", "context_length": 8}]


# ---- a real cluster ------------------------------------------------------------------------------------------------

def test_workers_register_and_load_is_spread(cluster):
    names = cluster.ensure_workers(2)
    live = cluster.live()
    assert all(live[n]["models"][0]["id"] == MODEL for n in names)
    assert [m["id"] for m in httpx.get(f"{cluster.url}/models", headers=AUTH).json()["data"]] == [MODEL]
    # without the cluster token neither the controller nor a worker answers (a worker's port bypasses API keys)
    assert httpx.get(f"{cluster.url}/models").status_code == 401
    body = {"model": MODEL, "prompt": "Hello", "request_id": "x"}
    assert httpx.post(f"{cluster.address(names[0])}/worker/generate", json=body).status_code == 401

    async def main():
        backend = RemoteBackend(cluster.url, cluster_token=TOKEN)
        try:
            # greedy output through the cluster equals the engine run directly on the same folder
            text, reasons = await run(backend, "Hello", SamplingParams(max_tokens=12, temperature=0))
            reference = LLM(str(cluster.model_dir), kv_cache_memory="4MB").generate(
                ["Hello"], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
            assert (text, reasons) == (reference.text, [reference.finish_reason])

            tasks = await start_many(backend, 4)
            loads = {n: cluster.status(n)["queue_length"] for n in names}
            assert sum(loads.values()) == 4 and min(loads.values()) >= 1, loads  # both workers got requests
            # closing the streams (the client went away) aborts the requests on the workers and frees their KV blocks
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            cluster.wait_for(lambda: all(cluster.status(n)["queue_length"] == 0 for n in names), 10, "aborts")
            for n in names:
                cluster.wait_for(lambda n=n: (s := cluster.status(n)["stats"])["num_free_blocks"] == s["num_blocks"],
                                 10, f"{n} to free its KV blocks")
            with pytest.raises(BackendError) as e:
                await run(backend, "Hello", SamplingParams(max_tokens=4), model="no-such-model")
            assert e.value.status == 404 and e.value.param == "model"
            # bad input is refused by the worker's engine side before the first chunk, as the same BackendError
            with pytest.raises(BackendError) as e:
                await run(backend, "x" * 600, SamplingParams(max_tokens=4))
            assert e.value.status == 400 and "context" in e.value.message
        finally:
            await backend.close()

    asyncio.run(main())


def test_openai_server_in_front_of_the_cluster(cluster):
    """`camelid serve --controller URL`: the OpenAI API over RemoteBackend, driven by the official client."""
    openai = pytest.importorskip("openai")
    from camelid.serve.app import create_app

    cluster.ensure_workers(2)
    server = ServerThread(create_app(RemoteBackend(cluster.url, cluster_token=TOKEN)))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        messages = [{"role": "user", "content": "Hi there"}]
        full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        pieces = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert streamed == full.choices[0].message.content and full.usage.completion_tokens > 0
        scored = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=2)  # built by the worker's tokenizer
        content = scored.choices[0].logprobs.content
        assert len(content) == scored.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
        assert scored.choices[0].message.content == full.choices[0].message.content
        legacy = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0, logprobs=1)
        lp = legacy.choices[0].logprobs  # text_offset counted by the worker, which knows its tokenizer
        assert len(lp.text_offset) == len(lp.tokens) == legacy.usage.completion_tokens and lp.text_offset[0] == 0
        echoed = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1, temperature=0, logprobs=1,
                                           echo=True)  # a token-id prompt scored and spelled by the worker
        lp = echoed.choices[0].logprobs
        assert len(lp.tokens) == 4 and lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])
        # logit_bias crosses to the worker as JSON (its token ids become strings) and still forces the token;
        # best_of picks among the candidates the worker scored
        forced = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, logit_bias={"70": 100})
        assert forced.choices[0].text == "bbb"  # the byte-level tokenizer: id 70 is "b"
        best = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, best_of=3, seed=1)
        assert len(best.choices) == 1 and best.usage.completion_tokens == 9
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logit_bias={"99999": 1})
        assert e.value.body["param"] == "logit_bias"
        assert client.models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
        # /metrics sums the workers' engine counters (sent with their heartbeats)
        blocks = sum(w["stats"]["num_blocks"] for w in cluster.live().values())
        assert blocks > 0 and f"camelid_kv_blocks_total {blocks:g}\n" in httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()


def test_silent_worker_is_dropped_and_rejoins(cluster):
    first, second = cluster.ensure_workers(2)
    proc = cluster.procs[first]
    proc.send_signal(signal.SIGSTOP)  # alive but silent: no heartbeats, no answers
    try:
        waited = cluster.wait_for(lambda: first not in cluster.live(), HEARTBEAT_TIMEOUT + 5, f"{first} to expire")
        assert waited <= HEARTBEAT_TIMEOUT + 5

        async def main():
            backend = RemoteBackend(cluster.url, cluster_token=TOKEN, chunk_timeout=5)
            try:  # every request now goes to the live worker (the frozen one would time out)
                results = await asyncio.gather(*(run(backend, f"q{i}", SHORT, request_id=f"q{i}")
                                                 for i in range(3)))
                assert all(reasons == ["length"] for _, reasons in results)
            finally:
                await backend.close()

        asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGCONT)
    # its next heartbeat is answered known=false, and it registers again
    cluster.wait_for(lambda: first in cluster.live(), 10, f"{first} to register again")


def test_killed_worker_fails_its_requests_and_traffic_moves(cluster):
    victim, survivor = cluster.ensure_workers(2)

    async def main():
        backend = RemoteBackend(cluster.url, cluster_token=TOKEN)
        try:
            tasks = await start_many(backend, 4)
            on_victim = cluster.status(victim)["queue_length"]
            assert 1 <= on_victim <= 3
            killed_at = time.monotonic()
            cluster.kill(victim)
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            errors = [r for r in results if isinstance(r, BaseException)]
            # exactly the victim's requests fail, at once and with a message naming it; the others finish normally
            assert len(errors) == on_victim, results
            assert all(isinstance(e, BackendError) and e.status == 502 and victim in e.message for e in errors)
            assert all(reasons == ["length"] for r in results if not isinstance(r, BaseException)
                       for _, reasons in [r])
            assert time.monotonic() - killed_at < 60
            assert set(cluster.live()) == {survivor}  # dropped at once, not after the heartbeat timeout
            text, reasons = await run(backend, "after", SHORT)
            assert reasons == ["length"]
        finally:
            await backend.close()

    asyncio.run(main())


def test_hung_worker_ends_its_request_with_an_error(cluster):
    names = cluster.ensure_workers(1)
    chunk_timeout = 2.0

    async def main():
        backend = RemoteBackend(cluster.url, cluster_token=TOKEN, chunk_timeout=chunk_timeout)
        try:
            started = asyncio.Event()
            task = asyncio.create_task(run(backend, "hang", LONG, started))
            await asyncio.wait_for(started.wait(), 60)
            for name in names:  # freeze every worker: the one running the request goes silent mid-stream
                cluster.procs[name].send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            with pytest.raises(BackendError) as e:
                await asyncio.wait_for(task, chunk_timeout + 30)
            assert e.value.status == 502 and "sent nothing" in e.value.message
            assert time.monotonic() - stopped_at < chunk_timeout + 5
        finally:
            await backend.close()

    try:
        asyncio.run(main())
    finally:
        for name in names:
            cluster.procs[name].send_signal(signal.SIGCONT)
            cluster.kill(name)


def test_adapter_flags_are_checked():
    from camelid.cli.cluster_verbs import parse_adapters

    assert parse_adapters(["a=x/y", "b=z=w"]) == {"a": "x/y", "b": "z=w"}
    for bad in (["a"], ["=x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="--adapter"):
            parse_adapters(bad)


# ---- the cluster token, failed workers, /metrics: in-process, over scripted backends --------------------------------

async def _answer(prompt: str):
    from camelid.serve.backend import Chunk

    yield Chunk(0, f"echo {prompt}", [1], "stop", 1, 1)


async def _failed_engine(prompt: str):
    from camelid.serve.backend import BackendError

    raise BackendError(503, "the engine stopped after an error: simulated", type="server_error")
    yield  # an async generator


def test_the_cluster_token_guards_the_controller_and_the_workers():
    from fastapi.testclient import TestClient

    from camelid.serve.worker import create_worker_app

    controller = TestClient(create_controller_app(cluster_token=TOKEN))
    worker = TestClient(create_worker_app(FakeBackend(_answer), "w", "http://w", cluster_token=TOKEN))
    register = {"name": "evil", "address": "http://attacker", "models": [{"id": MODEL}]}
    calls = [(controller, "POST", "/register", register), (controller, "POST", "/drop", {"name": "w"}),
             (controller, "POST", "/pick", {"model": MODEL}), (controller, "GET", "/workers", None),
             (controller, "POST", "/heartbeat", {"name": "w"}), (controller, "GET", "/models", None),
             (worker, "POST", "/worker/generate", {"model": MODEL, "prompt": "hi", "request_id": "r"}),
             (worker, "POST", "/worker/count_chat_tokens", {"model": MODEL, "messages": []}),
             (worker, "GET", "/worker/status", None)]
    for headers in ({}, {CLUSTER_TOKEN_HEADER: "wrong"}, {CLUSTER_TOKEN_HEADER: TOKEN[:-1]}):
        for client, method, path, body in calls:
            assert client.request(method, path, json=body, headers=headers).status_code == 401, (path, headers)
    assert controller.get("/workers", headers=AUTH).json()["data"] == []  # "evil" never registered
    for client, method, path, body in calls:
        assert client.request(method, path, json=body, headers=AUTH).status_code == 200, path
    assert controller.get("/health").status_code == 200  # probes need no token


def test_a_worker_answers_health_without_the_token():
    """SERVING.md: a worker whose engine failed answers /health with 503 (a load balancer's or k8s' probe)."""
    from fastapi.testclient import TestClient

    from camelid.serve.worker import create_worker_app

    backend = FakeBackend(_answer)
    worker = TestClient(create_worker_app(backend, "w", "http://w", cluster_token=TOKEN))
    assert worker.get("/health").status_code == 200
    backend.ok = False
    r = worker.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "failed"


@pytest.mark.parametrize("verb", [["worker", "--model", "/no/such"], ["serve", "--db", "none"]])
@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:21001", "ftp://h:1", "http://", "http://h:abc", "http://h:99999"])
def test_a_malformed_controller_url_is_a_flag_error(verb, url, capsys, monkeypatch):
    """Not a URL at all is a typo, not a controller that is still starting: refuse it at once (the worker would
    load its model, then retry forever; the server would answer every request with a 503)."""
    import uvicorn

    from camelid.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("the server started"))

    assert main([*verb, "--controller", url]) == 2
    err = capsys.readouterr().err
    assert "--controller" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags", [["--address", "10.0.0.2:21002"], ["--host", "0.0.0.0"]])
def test_a_worker_needs_an_address_the_server_can_reach(flags, capsys):
    """--address without http:// (every request routed there would fail), or --host 0.0.0.0 with no --address (the
    controller would tell the server to call http://0.0.0.0:PORT): refused before the model loads."""
    from camelid.cli import main

    argv = ["worker", "--controller", "http://127.0.0.1:21001", "--model", "/no/such", "--cluster-token", "t"]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert "--address" in err and err.count("\n") == 1


@pytest.mark.parametrize("verb", [["controller"], ["worker", "--controller", "http://x", "--model", "/no/such"]])
def test_a_public_host_needs_a_cluster_token(verb, capsys, monkeypatch):
    from camelid.cli import main

    monkeypatch.delenv("CAMELID_CLUSTER_TOKEN", raising=False)
    assert main([*verb, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--cluster-token" in err and err.count("\n") == 1


def test_a_failed_worker_is_skipped_and_leaves_the_controller():
    """A worker whose engine failed refuses with 503 before any chunk: RemoteBackend tries the next worker. And the
    failed worker unregisters and stops heartbeating, so nothing is routed to it again."""
    from camelid.serve.worker import create_worker_app

    controller = ServerThread(create_controller_app(heartbeat_timeout=30, cluster_token=TOKEN))
    broken, good = FakeBackend(_failed_engine), FakeBackend(_answer)
    workers = []

    def live() -> set[str]:
        return {w["name"] for w in httpx.get(f"{controller.url}/workers", headers=AUTH).json()["data"]}
    try:
        for name, backend in (("broken", broken), ("good", good)):  # registered first: picked first on a tie
            port = free_port()
            app = create_worker_app(backend, name, f"http://127.0.0.1:{port}", controller.url,
                                    heartbeat_interval=0.1, cluster_token=TOKEN)
            workers.append(ServerThread(app, port))
            deadline = time.monotonic() + 10
            while name not in live():
                assert time.monotonic() < deadline, f"{name} did not register"
                time.sleep(0.05)

        async def ask():
            backend = RemoteBackend(controller.url, cluster_token=TOKEN)
            try:
                return await run(backend, "hi", SamplingParams(max_tokens=4))
            finally:
                await backend.close()

        assert asyncio.run(ask()) == ("echo hi", ["stop"])
        assert broken.calls == 1 and good.calls == 1

        broken.ok = False  # its backend reports the failure: the heartbeat loop says goodbye
        deadline = time.monotonic() + 10
        while "broken" in live():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # five heartbeat intervals: it does not register again
        assert live() == {"good"}
    finally:
        for server in [*workers, controller]:
            server.stop()


def test_a_worker_that_dies_before_answering_is_skipped():
    """kill -9 of an idle worker: a request sent in that instant is accepted by the kernel, then the connection
    drops before any response (ReadError / RemoteProtocolError, not ConnectError). Nothing ran: try another worker."""
    from camelid.serve.worker import create_worker_app

    controller = ServerThread(create_controller_app(heartbeat_timeout=30, cluster_token=TOKEN))
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead.listen()
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"

    def hang_up() -> None:  # reads the request, then the process is gone
        conn, _ = dead.accept()
        conn.recv(65536)
        conn.close()
    threading.Thread(target=hang_up, daemon=True).start()
    good = FakeBackend(_answer)
    worker = None
    try:
        httpx.post(f"{controller.url}/register", headers=AUTH,  # first: picked first on a tie
                   json={"name": "dead", "address": dead_url, "models": [{"id": MODEL}]}).raise_for_status()
        port = free_port()
        worker = ServerThread(create_worker_app(good, "good", f"http://127.0.0.1:{port}", controller.url,
                                                heartbeat_interval=0.1, cluster_token=TOKEN), port)

        async def ask():
            backend = RemoteBackend(controller.url, cluster_token=TOKEN)
            try:
                for _ in range(100):  # until "good" has registered
                    if len(httpx.get(f"{controller.url}/workers", headers=AUTH).json()["data"]) == 2:
                        break
                    await asyncio.sleep(0.05)
                return await run(backend, "hi", SamplingParams(max_tokens=4))
            finally:
                await backend.close()

        assert asyncio.run(ask()) == ("echo hi", ["stop"])
        names = {w["name"] for w in httpx.get(f"{controller.url}/workers", headers=AUTH).json()["data"]}
        assert names == {"good"} and good.calls == 1
    finally:
        dead.close()
        for server in [s for s in (worker, controller) if s is not None]:
            server.stop()


def test_chat_token_counts_skip_a_dead_worker():
    """A chat request without max_tokens first counts its prompt's tokens on a worker: one killed a moment ago (not
    yet expired at the controller) must not fail the request when another worker serves the model."""
    from camelid.serve.worker import create_worker_app

    controller = ServerThread(create_controller_app(heartbeat_timeout=30, cluster_token=TOKEN))
    worker = None
    try:
        httpx.post(f"{controller.url}/register", headers=AUTH,  # first: picked first on a tie
                   json={"name": "dead", "address": f"http://127.0.0.1:{free_port()}", "models": [{"id": MODEL}]})
        port = free_port()
        worker = ServerThread(create_worker_app(FakeBackend(_answer), "good", f"http://127.0.0.1:{port}",
                                                controller.url, heartbeat_interval=0.1, cluster_token=TOKEN), port)
        deadline = time.monotonic() + 10
        while len(httpx.get(f"{controller.url}/workers", headers=AUTH).json()["data"]) < 2:
            assert time.monotonic() < deadline, "good did not register"
            time.sleep(0.05)

        async def count():
            backend = RemoteBackend(controller.url, cluster_token=TOKEN)
            try:
                return await backend.count_chat_tokens(MODEL, [{"role": "user", "content": "hello"}])
            finally:
                await backend.close()

        assert asyncio.run(count()) == 5
    finally:
        for server in [s for s in (worker, controller) if s is not None]:
            server.stop()


def test_a_heartbeat_slower_than_the_controllers_timeout_is_reported(caplog):
    """--heartbeat-interval >= the controller's --heartbeat-timeout: the worker is dropped and registers again on
    each beat, and requests meanwhile find no worker. Silent before; now the worker says why."""
    from camelid.serve.worker import create_worker_app

    controller = ServerThread(create_controller_app(heartbeat_timeout=0.2, cluster_token=TOKEN))
    port = free_port()
    worker = ServerThread(create_worker_app(FakeBackend(_answer), "w", f"http://127.0.0.1:{port}", controller.url,
                                            heartbeat_interval=0.3, cluster_token=TOKEN), port)
    try:
        deadline = time.monotonic() + 10
        while "--heartbeat-timeout 0.2 s" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        time.sleep(0.7)  # two more drops and re-registrations
        assert caplog.text.count("--heartbeat-timeout") == 1  # said once, not on every one
    finally:
        worker.stop()
        controller.stop()


def test_a_models_last_worker_failing_mid_request_is_a_503():
    """The only worker of a model dies just before a request reaches it: the request was valid a moment ago, the
    model is only out of capacity until the worker is back. A 503 (retried by clients), not 404 model_not_found."""
    controller = ServerThread(create_controller_app(heartbeat_timeout=30, cluster_token=TOKEN))

    async def ask() -> list[BackendError]:
        backend = RemoteBackend(controller.url, cluster_token=TOKEN)
        errors = []
        try:
            for call in (lambda: run(backend, "hi", SHORT),
                         lambda: backend.count_chat_tokens(MODEL, [{"role": "user", "content": "hi"}])):
                httpx.post(f"{controller.url}/register", headers=AUTH, json={
                    "name": "dead", "address": f"http://127.0.0.1:{free_port()}", "models": [{"id": MODEL}]})
                with pytest.raises(BackendError) as e:
                    await call()
                errors.append(e.value)
        finally:
            await backend.close()
        return errors
    try:
        for error in asyncio.run(ask()):
            assert error.status == 503 and "no live worker serves the model 'tiny'" in error.message
    finally:
        controller.stop()


def test_a_cluster_with_no_live_worker_answers_503_so_clients_retry():
    """Every worker gone (restarting, say): the model is not unknown, the cluster is out of capacity for a moment. A
    503 is what the openai client retries; a 404 model_not_found ("this server has: ") tells it to give up."""
    from fastapi.testclient import TestClient

    from camelid.serve.app import create_app

    controller = ServerThread(create_controller_app(cluster_token=TOKEN))
    try:
        with TestClient(create_app(RemoteBackend(controller.url, cluster_token=TOKEN))) as client:
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            for path, body in (("/v1/completions", {"model": MODEL, "prompt": "hi"}), ("/v1/chat/completions", chat),
                               ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": True})):
                r = client.post(path, json=body)
                assert r.status_code == 503, r.text
                assert "no live worker" in r.json()["error"]["message"]
            assert client.get("/v1/models").json()["data"] == []
    finally:
        controller.stop()


def test_a_server_without_the_cluster_token_says_so():
    """`camelid serve --controller` given no (or another) cluster token: the controller answers 401, and the error
    must say that, not that the controller is unreachable (it is up: the operator would look in the wrong place)."""
    controller = ServerThread(create_controller_app(cluster_token=TOKEN))

    async def ask() -> list[str]:
        backend = RemoteBackend(controller.url, cluster_token="wrong")
        try:
            with pytest.raises(BackendError) as listing:
                await asyncio.to_thread(backend.models)
            with pytest.raises(BackendError) as generating:
                await run(backend, "hi", SHORT)
            return [listing.value.message, generating.value.message]
        finally:
            await backend.close()
    try:
        for message in asyncio.run(ask()):
            assert "401" in message and "cluster token" in message and "unreachable" not in message
    finally:
        controller.stop()


def test_remote_stats_add_counters_and_take_the_largest_device_gauge():
    controller = ServerThread(create_controller_app(cluster_token=TOKEN))
    try:
        per_worker = [{"num_blocks": 100, "num_free_blocks": 40, "block_size": 16, "generated_tokens": 7,
                       "device_gpu_temp_c": 60.0, "device_gpu_util": 90.0, "device_gpu_mem_total_gb": 80.0},
                      {"num_blocks": 50, "num_free_blocks": 50, "block_size": 16, "generated_tokens": 5,
                       "device_gpu_temp_c": 70.0, "device_gpu_util": 10.0, "device_gpu_mem_total_gb": 80.0}]
        for i, stats in enumerate(per_worker):
            httpx.post(f"{controller.url}/register", headers=AUTH, json={
                "name": f"w{i}", "address": f"http://w{i}", "models": [{"id": MODEL}], "stats": stats})
        backend = RemoteBackend(controller.url, cluster_token=TOKEN)
        s = backend.stats()
        asyncio.run(backend.close())
        assert (s["num_blocks"], s["num_free_blocks"], s["generated_tokens"]) == (150, 90, 12)
        assert (s["device_gpu_temp_c"], s["device_gpu_util"], s["device_gpu_mem_total_gb"]) == (70.0, 90.0, 80.0)
        assert "block_size" not in s and s["num_workers"] == 2
    finally:
        controller.stop()


def test_worker_flags_reach_the_engine(monkeypatch, capsys):
    from camelid.cli import main
    from camelid.serve.backend import LocalBackend

    def load(model_dir, adapters, **kwargs):
        raise ValueError(f"would load {model_dir} with {adapters} and max_num_seqs={kwargs.get('max_num_seqs')}, "
                         f"decode_steps={kwargs.get('decode_steps')}")
    monkeypatch.setattr(LocalBackend, "load", load)
    argv = ["worker", "--controller", "http://x", "--model", "m", "--adapter", "a=x", "--max-num-seqs", "4",
            "--decode-steps", "8"]
    assert main(argv) == 2
    assert "would load m with {'a': 'x'} and max_num_seqs=4, decode_steps=8" in capsys.readouterr().err
    assert main([*argv[:-1], "0"]) == 2  # checked before anything loads
    assert "--decode-steps must be >= 1" in capsys.readouterr().err

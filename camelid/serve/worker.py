"""A worker of a FastChat-style cluster: one Backend (a LocalBackend over camelid.engine.LLM) behind a small HTTP API,
registered with the controller and heartbeating its load.

HTTP API:
  POST /worker/generate  {model, prompt | messages, params: {SamplingParams fields}, request_id}
        -> 200, newline-delimited JSON: one Chunk per line, or one {"error": {message, type, param, code, status}}
           line (bad input, or a failure mid-stream), and an empty line every `keepalive_interval` seconds of silence
           so the caller can tell a busy worker (blank lines keep coming) from a dead one (nothing comes).
           The status line is sent before the first token: a request that waits in the queue is not mistaken for a hang.
           Closing the connection aborts the request in the engine.
  POST /worker/count_chat_tokens {model, messages} -> {"count": int}
  GET  /worker/status -> {name, address, models, queue_length, stats}   (what it registers and heartbeats)
  GET  /health -> {"status": "ok", ...} | 503 once its engine has failed  (no token needed: for probes)

With a cluster token, every /worker/* request must carry it (header X-Camelid-Cluster-Token; else 401), and the worker
sends it to the controller. A worker whose engine failed unregisters and stops heartbeating: nothing is routed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from camelid.engine import SamplingParams
from camelid.serve.backend import BackendError
from camelid.serve.controller import cluster_headers, require_cluster_token

__all__ = ["Worker", "create_worker_app"]

log = logging.getLogger(__name__)


class GenerateRequest(BaseModel):
    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    params: dict = {}
    request_id: str


class CountRequest(BaseModel):
    model: str
    messages: list[dict]


def error_line(e: BackendError) -> str:
    return json.dumps({"error": e.to_dict()}) + "\n"


def refusal(response: httpx.Response) -> str:
    """The controller's reason for a 4xx/5xx ({"detail": ...} from FastAPI), else the status line."""
    try:
        return f"{response.status_code} {response.json()['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}"


class Worker:
    """The worker's state: its backend, its name/address for the controller, and the count of requests in flight
    (its load, reported with each heartbeat)."""

    def __init__(self, backend, name: str, address: str, controller_url: str | None,
                 heartbeat_interval: float = 1.0, keepalive_interval: float = 1.0, cluster_token: str | None = None):
        self.backend, self.name, self.address = backend, name, address.rstrip("/")
        self.controller_url = controller_url.rstrip("/") if controller_url else None
        self.heartbeat_interval, self.keepalive_interval = heartbeat_interval, keepalive_interval
        self.headers = cluster_headers(cluster_token)
        self.in_flight = 0

    def healthy(self) -> bool:
        return getattr(self.backend, "healthy", lambda: True)()

    async def stats(self) -> dict:
        # LocalBackend.stats() may read NVML / /proc: not on the event loop that streams the tokens
        return await asyncio.to_thread(self.backend.stats)

    async def generate_lines(self, req: GenerateRequest) -> AsyncIterator[str]:
        """The NDJSON body of /worker/generate. The engine call runs in its own task so that silence can be filled
        with keepalive lines without cancelling (and so breaking) the backend's async generator."""
        self.in_flight += 1
        stream, pending = None, None
        try:
            params = SamplingParams(**req.params)
            stream = self.backend.generate(req.model, req.prompt, req.messages, params, req.request_id)
            while True:
                pending = asyncio.ensure_future(anext(stream))
                while not (await asyncio.wait({pending}, timeout=self.keepalive_interval))[0]:
                    yield "\n"
                try:
                    chunk, pending = pending.result(), None
                except StopAsyncIteration:
                    pending = None
                    return
                yield json.dumps(chunk.to_dict()) + "\n"
        except BackendError as e:
            yield error_line(e)
        except (ValueError, TypeError) as e:  # SamplingParams validation: the server checks first, this is a backstop
            yield error_line(BackendError(400, str(e)))
        except Exception as e:  # noqa: BLE001  an engine failure must reach the caller as an error line, not a cut
            log.exception("request %s failed", req.request_id)
            yield error_line(BackendError(500, f"worker {self.name}: {e}", type="server_error"))
        finally:
            # the client went away (or we are done): stop the engine work for this request
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, BackendError):
                    await pending
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()
            self.in_flight -= 1

    async def registration(self) -> dict:
        return {"name": self.name, "address": self.address, "models": self.backend.models(),
                "queue_length": self.in_flight, "stats": await self.stats()}

    async def heartbeat_loop(self) -> None:
        """Register, then heartbeat every `heartbeat_interval` s. A controller that does not know us (it restarted,
        or dropped us after a missed beat) answers known=false and we register again; an unreachable one is retried.
        Once the backend has failed we unregister and stop: the controller must not route requests here."""
        registered, warned, slow_warned = False, False, False
        async with httpx.AsyncClient(base_url=self.controller_url, timeout=2.0, headers=self.headers) as client:
            while True:
                if not self.healthy():
                    log.error("worker %s: its engine failed; leaving the controller %s", self.name,
                              self.controller_url)
                    await self.unregister()
                    return
                try:
                    if not registered:
                        r = await client.post("/register", json=await self.registration())
                        r.raise_for_status()
                        registered, warned = True, False
                        log.info("worker %s registered with %s", self.name, self.controller_url)
                        timeout = r.json().get("heartbeat_timeout")
                        if timeout is not None and self.heartbeat_interval >= timeout and not slow_warned:
                            # dropped before each heartbeat: out of the controller for a moment every interval
                            log.warning("worker %s: --heartbeat-interval %g s is not shorter than the controller's "
                                        "--heartbeat-timeout %g s: it will drop this worker between heartbeats",
                                        self.name, self.heartbeat_interval, timeout)
                            slow_warned = True
                    else:
                        r = await client.post("/heartbeat", json={"name": self.name, "address": self.address,
                                                                  "queue_length": self.in_flight,
                                                                  "stats": await self.stats()})
                        r.raise_for_status()
                        registered = r.json()["known"]
                        if not registered:
                            continue  # register again at once
                except httpx.HTTPStatusError as e:  # a wrong token (401), a name taken by another worker (409)
                    if not warned:
                        log.warning("worker %s: the controller %s refused it: %s; retrying", self.name,
                                    self.controller_url, refusal(e.response))
                        warned = True
                except (httpx.HTTPError, ValueError, KeyError) as e:  # down, restarting, or not a controller
                    if not warned:
                        log.warning("worker %s: controller %s unreachable (%s); retrying", self.name,
                                    self.controller_url, e)
                        warned = True
                await asyncio.sleep(self.heartbeat_interval)

    async def unregister(self) -> None:
        """A clean shutdown says goodbye, so no request is routed here in the seconds before the heartbeat expires."""
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(base_url=self.controller_url, timeout=1.0, headers=self.headers) as client:
                await client.post("/drop", json={"name": self.name})


def create_worker_app(backend, name: str, address: str, controller_url: str | None = None,
                      heartbeat_interval: float = 1.0, keepalive_interval: float = 1.0,
                      cluster_token: str | None = None) -> FastAPI:
    """The worker's FastAPI app. With `controller_url` it registers and heartbeats while it runs; the backend is
    closed on shutdown. With `cluster_token`, /worker/* answers 401 to a request without it."""
    worker = Worker(backend, name, address, controller_url, heartbeat_interval, keepalive_interval, cluster_token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(worker.heartbeat_loop()) if worker.controller_url else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await worker.unregister()
            await backend.close()

    app = FastAPI(title=f"camelid worker {name}", lifespan=lifespan)
    app.state.worker = worker
    guarded = [Depends(require_cluster_token(cluster_token))]

    @app.post("/worker/generate", dependencies=guarded)
    async def generate(req: GenerateRequest) -> StreamingResponse:
        return StreamingResponse(worker.generate_lines(req), media_type="application/x-ndjson")

    @app.post("/worker/count_chat_tokens", dependencies=guarded)
    async def count_chat_tokens(req: CountRequest):
        try:
            if inspect.iscoroutinefunction(backend.count_chat_tokens):
                count = await backend.count_chat_tokens(req.model, req.messages)
            else:  # rendering and tokenizing a long chat: not on the event loop
                count = await asyncio.to_thread(backend.count_chat_tokens, req.model, req.messages)
        except BackendError as e:
            return JSONResponse(status_code=e.status, content={"error": e.to_dict()})
        return {"count": count}

    @app.get("/worker/status", dependencies=guarded)
    async def status() -> dict:
        return await worker.registration()

    @app.get("/health")
    async def health():
        """For probes (no token needed): 503 once the engine has failed."""
        if not worker.healthy():
            return JSONResponse(status_code=503, content={"status": "failed", "name": worker.name})
        return {"status": "ok", "name": worker.name, "in_flight": worker.in_flight}

    return app

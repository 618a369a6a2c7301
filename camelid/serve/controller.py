"""The controller of a FastChat-style cluster: it knows which workers are alive, what they serve and how busy they are.

Workers register (name, address, models) and heartbeat their load every second or so; a worker whose last heartbeat is
older than `heartbeat_timeout` seconds is dropped. The OpenAI server (RemoteBackend) asks `POST /pick {model}` for the
least-loaded live worker serving a model, then talks to that worker directly: no generated token passes through here.

HTTP API (JSON):
  POST /register  {name, address, models: [{id, context_length, ...}], queue_length, stats}
                  -> {"ok": true, "heartbeat_timeout": s} | 409 when a live worker at another address has that name
  POST /heartbeat {name, address?, queue_length, stats} -> {"known": bool}  (false: register again, e.g. after a
                  restart)
  POST /pick      {model, reserve?} -> {name, address} | 404 when no live worker serves that model
  POST /drop      {name}  -> {"dropped": bool}           (a client saw the worker fail: stop routing to it at once)
  GET  /workers   -> {"data": [{name, address, models, queue_length, stats, last_heartbeat_age}]}
  GET  /models    -> {"data": [model dict, ...]}                (the union over live workers, one entry per name)

A cluster token (a shared secret) guards the cluster: with one, every call above except GET /health needs the header
X-Camelid-Cluster-Token (else 401), so nobody else can register an address to receive users' prompts, drop workers,
or call a worker's /worker/generate behind the OpenAI server's API keys. The workers and RemoteBackend send it.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

__all__ = ["CLUSTER_TOKEN_ENV", "CLUSTER_TOKEN_HEADER", "Controller", "WorkerInfo", "cluster_headers",
           "create_controller_app", "require_cluster_token"]

CLUSTER_TOKEN_HEADER = "X-Camelid-Cluster-Token"
CLUSTER_TOKEN_ENV = "CAMELID_CLUSTER_TOKEN"
SERVER_KEEP_ALIVE_S = 30  # how long the controller and workers keep an idle connection open (uvicorn's default: 5 s)


def cluster_headers(token: str | None) -> dict[str, str]:
    """The headers a member of the cluster sends with each call."""
    return {CLUSTER_TOKEN_HEADER: token} if token else {}


def require_cluster_token(token: str | None):
    """A FastAPI dependency: 401 unless the request carries `token` (no token: everything is allowed)."""
    async def check(request: Request) -> None:
        if not token:
            return
        sent = request.headers.get(CLUSTER_TOKEN_HEADER, "")
        if not hmac.compare_digest(sent.encode(), token.encode()):  # constant time: no timing leak of the token
            raise HTTPException(401, f"missing or wrong cluster token (header {CLUSTER_TOKEN_HEADER})")
    return check


@dataclass
class WorkerInfo:
    name: str
    address: str                      # base URL, e.g. http://127.0.0.1:21002
    models: list[dict]
    queue_length: int = 0             # the worker's own count of requests in flight (from its last heartbeat)
    stats: dict = field(default_factory=dict)  # its engine's counters (KV blocks, tokens...), for the server's /metrics
    picked_since_heartbeat: int = 0   # routed to it since then: spreads a burst that comes between two heartbeats
    last_heartbeat: float = field(default_factory=time.monotonic)

    @property
    def model_names(self) -> set[str]:
        return {m["id"] for m in self.models}

    @property
    def load(self) -> int:
        return self.queue_length + self.picked_since_heartbeat


class Controller:
    """The registry itself, free of HTTP so it reads (and tests) as plain code. Expiry is checked lazily on each call:
    with no background task there is nothing to start or stop."""

    def __init__(self, heartbeat_timeout: float = 4.0, clock=time.monotonic):
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}

    def register(self, name: str, address: str, models: list[dict], queue_length: int = 0,
                 stats: dict | None = None) -> None:
        """ValueError when a live worker at another address has this name: two workers given the same --name would
        otherwise share one entry (the first never routed to again, the second's load overwritten by the first's)."""
        address = address.rstrip("/")
        holder = self.live_workers().get(name)
        if holder is not None and holder.address != address:
            raise ValueError(f"the worker name {name!r} is taken by the live worker at {holder.address}: give each "
                             f"worker its own --name")
        self.workers[name] = WorkerInfo(name, address, models, queue_length, dict(stats or {}),
                                        last_heartbeat=self.clock())

    def heartbeat(self, name: str, queue_length: int, stats: dict | None = None, address: str | None = None) -> bool:
        worker = self.live_workers().get(name)
        if worker is None or (address is not None and address.rstrip("/") != worker.address):
            return False
        worker.queue_length, worker.picked_since_heartbeat, worker.last_heartbeat = queue_length, 0, self.clock()
        worker.stats = dict(stats or {})
        return True

    def drop(self, name: str) -> bool:
        return self.workers.pop(name, None) is not None

    def live_workers(self) -> dict[str, WorkerInfo]:
        now = self.clock()
        for name in [n for n, w in self.workers.items() if now - w.last_heartbeat > self.heartbeat_timeout]:
            del self.workers[name]
        return self.workers

    def pick(self, model: str, reserve: bool = True) -> WorkerInfo | None:
        """The least-loaded live worker serving `model` (ties go to the one registered first)."""
        candidates = [w for w in self.live_workers().values() if model in w.model_names]
        if not candidates:
            return None
        worker = min(candidates, key=lambda w: w.load)
        worker.picked_since_heartbeat += reserve
        return worker

    def models(self) -> list[dict]:
        seen: dict[str, dict] = {}
        for worker in self.live_workers().values():
            for m in worker.models:
                seen.setdefault(m["id"], m)
        return list(seen.values())


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")  # context_length, owned_by...: passed on to /v1/models as sent
    id: str  # a card without one would fail every /pick and /models (500) until that worker expired


class RegisterRequest(BaseModel):
    name: str
    address: str
    models: list[ModelCard]
    queue_length: int = 0
    stats: dict = {}


class HeartbeatRequest(BaseModel):
    name: str
    address: str | None = None  # told apart from another worker that took the name while this one was silent
    queue_length: int = 0
    stats: dict = {}


class PickRequest(BaseModel):
    model: str
    reserve: bool = True  # count the pick as load until the next heartbeat (false: a quick lookup, e.g. token counts)


class DropRequest(BaseModel):
    name: str


def create_controller_app(heartbeat_timeout: float = 4.0, cluster_token: str | None = None) -> FastAPI:
    controller = Controller(heartbeat_timeout)  # async endpoints: all run on the event loop, so no locks are needed
    app = FastAPI(title="camelid controller")
    app.state.controller = controller
    guarded = [Depends(require_cluster_token(cluster_token))]

    @app.post("/register", dependencies=guarded)
    async def register(req: RegisterRequest) -> dict:
        try:
            controller.register(req.name, req.address, [m.model_dump() for m in req.models], req.queue_length,
                                req.stats)
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        return {"ok": True, "heartbeat_timeout": controller.heartbeat_timeout}

    @app.post("/heartbeat", dependencies=guarded)
    async def heartbeat(req: HeartbeatRequest) -> dict:
        return {"known": controller.heartbeat(req.name, req.queue_length, req.stats, req.address)}

    @app.post("/pick", dependencies=guarded)
    async def pick(req: PickRequest):
        worker = controller.pick(req.model, req.reserve)
        if worker is None:
            return JSONResponse(status_code=404, content={"error": {
                "message": f"no live worker serves the model '{req.model}'", "type": "invalid_request_error",
                "param": "model", "code": "model_not_found"}})
        return {"name": worker.name, "address": worker.address}

    @app.post("/drop", dependencies=guarded)
    async def drop(req: DropRequest) -> dict:
        return {"dropped": controller.drop(req.name)}

    @app.get("/workers", dependencies=guarded)
    async def workers() -> dict:
        now = controller.clock()
        return {"data": [{"name": w.name, "address": w.address, "models": w.models, "queue_length": w.queue_length,
                          "stats": w.stats, "last_heartbeat_age": round(now - w.last_heartbeat, 3)}
                         for w in controller.live_workers().values()]}

    @app.get("/models", dependencies=guarded)
    async def models() -> dict:
        return {"data": controller.models()}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "workers": len(controller.live_workers())}

    return app

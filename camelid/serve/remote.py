"""RemoteBackend: the Backend interface over a cluster. Each request asks the controller for the least-loaded live
worker serving its model, then streams that worker's newline-delimited JSON chunks.

A worker that cannot be reached before the request started, that drops or ignores it before answering (killed as it
arrived), or that refuses it with a 503 before its first chunk (its engine failed, or it is shutting down), is dropped
and another one is picked. A worker that stops
answering mid-request (connection reset, or nothing at all, not even the keepalive blank lines it sends every second,
for `chunk_timeout` seconds) is dropped and the request ends with a BackendError naming the worker: never a hang.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from camelid.engine.sampling_params import SamplingParams
from camelid.serve.backend import Backend, BackendError, Chunk, params_to_dict
from camelid.serve.controller import cluster_headers

__all__ = ["RemoteBackend"]

log = logging.getLogger(__name__)

# < controller.SERVER_KEEP_ALIVE_S (and uvicorn's default 5 s): an idle pooled connection is closed by us first
CLIENT_KEEP_ALIVE_S = 2.0

# worker stats that add up over a cluster (a gauge of requests or blocks, a token counter); the others (block_size,
# device_* temperatures, utilisation, memory totals) do not: device_* is reported as the largest over the workers
ADDITIVE_STATS = ("num_waiting", "num_running", "num_blocks", "num_free_blocks", "prefix_cache_hit_tokens",
                  "prompt_tokens_computed", "generated_tokens", "num_preemptions", "decode_bandwidth_bytes_per_s")


class _Retry(Exception):
    """The picked worker refused the request before doing anything: drop it, try another."""


class RemoteBackend(Backend):
    def __init__(self, controller_url: str, connect_timeout: float = 2.0, chunk_timeout: float = 10.0,
                 max_attempts: int = 3, cluster_token: str | None = None) -> None:
        self.controller_url = controller_url.rstrip("/")
        self.max_attempts = max_attempts
        # read = the longest silence allowed between two lines of a worker's stream (workers send keepalives)
        timeout = httpx.Timeout(connect=connect_timeout, read=chunk_timeout, write=chunk_timeout, pool=connect_timeout)
        headers = cluster_headers(cluster_token)  # to the controller and to the workers alike
        # pooled connections expire well before the servers close idle ones (uvicorn: 5 s, ours: SERVER_KEEP_ALIVE_S):
        # a request sent on a connection the server is closing at that moment fails unread with a ReadError
        limits = httpx.Limits(keepalive_expiry=CLIENT_KEEP_ALIVE_S)
        self._client = httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits)
        # models() and stats() are synchronous in the interface
        self._sync_client = httpx.Client(timeout=timeout, headers=headers, limits=limits)
        self._counters = {"requests": 0, "worker_failures": 0}

    # ---- the controller ---------------------------------------------------------------------------------------------

    def _controller_error(self, e: httpx.HTTPError) -> BackendError:
        return BackendError(503, f"the controller at {self.controller_url} is unreachable: {e}", type="server_error")

    def models(self) -> list[dict[str, Any]]:
        try:
            r = self._sync_client.get(f"{self.controller_url}/models")
        except httpx.HTTPError as e:
            raise self._controller_error(e) from None
        if r.status_code != 200:  # up, but refusing: a 401 is a cluster token that differs from the controller's
            raise BackendError(503, f"the controller answered {r.status_code}: {r.text[:200]}", type="server_error")
        return r.json()["data"]

    async def _pick(self, model: str, reserve: bool = True, retry: bool = False) -> dict[str, str]:
        """{name, address} of the least-loaded live worker serving `model`; BackendError 404 when there is none (503
        on a `retry`: we just dropped its last worker, so the model is known and only out of capacity for now)."""
        try:
            r = await self._client.post(f"{self.controller_url}/pick", json={"model": model, "reserve": reserve})
        except httpx.HTTPError as e:
            raise self._controller_error(e) from None
        if r.status_code == 404 and retry:
            raise BackendError(503, f"{r.json()['error']['message']} right now (its last worker just failed): retry "
                               f"shortly", type="server_error", code="no_live_worker")
        if r.status_code == 404:
            raise BackendError(404, r.json()["error"]["message"], param="model", code="model_not_found")
        if r.status_code != 200:
            raise BackendError(503, f"the controller answered {r.status_code}: {r.text[:200]}", type="server_error")
        return r.json()

    async def _drop(self, worker: dict[str, str], reason: Exception) -> None:
        self._counters["worker_failures"] += 1
        log.warning("dropping worker %s at %s: %r", worker["name"], worker["address"], reason)
        try:
            await self._client.post(f"{self.controller_url}/drop", json={"name": worker["name"]})
        except httpx.HTTPError:
            pass  # the controller drops it anyway once its heartbeats stop

    # ---- the Backend interface --------------------------------------------------------------------------------------

    async def generate(self, model: str, prompt: str | list[int] | None, messages: list[dict] | None,
                       params: SamplingParams, request_id: str) -> AsyncIterator[Chunk]:
        self._counters["requests"] += 1
        body = {"model": model, "prompt": prompt, "messages": messages, "params": params_to_dict(params),
                "request_id": request_id}
        for attempt in range(1, self.max_attempts + 1):
            worker = await self._pick(model, retry=attempt > 1)
            url = f"{worker['address']}/worker/generate"
            finished, started, yielded = 0, False, False
            try:
                # Closing this generator (the client went away) leaves the `async with`, which closes the connection:
                # the worker sees the disconnect and aborts the request in its engine.
                async with self._client.stream("POST", url, json=body) as response:
                    started = True
                    if response.status_code != 200:
                        text = (await response.aread()).decode(errors="replace")[:200]
                        error = BackendError(502, f"worker {worker['name']} answered {response.status_code}: {text}",
                                             type="server_error")
                        if response.status_code == 503:
                            raise _Retry(error)
                        raise error
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue  # keepalive: the worker is alive, the request is waiting or running
                        try:
                            data = json.loads(line)
                        except ValueError:
                            raise httpx.RemoteProtocolError(f"not a JSON line: {line[:80]!r}") from None
                        if "error" in data:
                            error = BackendError.from_dict(data["error"])
                            if error.status == 503 and not yielded:  # its engine failed: nothing was done yet
                                raise _Retry(error)
                            raise error
                        chunk = Chunk(**data)
                        finished += chunk.finish_reason is not None
                        yielded = True
                        yield chunk
                if finished < params.n:
                    raise httpx.RemoteProtocolError("the stream ended before every completion finished")
                return
            except _Retry as e:
                error = e.args[0]
                await self._drop(worker, error)
                if attempt == self.max_attempts:
                    raise BackendError(503, f"no worker serving {model!r} took the request (last: {worker['name']}: "
                                       f"{error.message})", type="server_error") from None
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                # nothing reached the worker: drop it and try another one
                await self._drop(worker, e)
                if attempt == self.max_attempts:
                    raise BackendError(503, f"no worker serving {model!r} could be reached (last: {worker['name']} "
                                       f"at {worker['address']}: {e})", type="server_error") from None
            except httpx.TransportError as e:
                await self._drop(worker, e)
                if not started and attempt < self.max_attempts:
                    # no response at all (it died as the request arrived, or hangs): the worker sends its status
                    # line before it starts the engine, so nothing ran there and the caller saw nothing: try another
                    continue
                what = "stopped answering" if started else "failed"
                if isinstance(e, httpx.ReadTimeout):
                    what = "sent nothing for too long"
                raise BackendError(502, f"worker {worker['name']} at {worker['address']} {what} during the request: "
                                   f"{type(e).__name__}: {e}", type="server_error") from None

    async def count_chat_tokens(self, model: str, messages: list[dict]) -> int:
        for attempt in range(1, self.max_attempts + 1):  # a count changes nothing: any worker may (re)do it
            worker = await self._pick(model, reserve=False, retry=attempt > 1)
            try:
                r = await self._client.post(f"{worker['address']}/worker/count_chat_tokens",
                                            json={"model": model, "messages": messages})
                break
            except httpx.TransportError as e:
                await self._drop(worker, e)
                if attempt == self.max_attempts:
                    raise BackendError(502, f"worker {worker['name']} at {worker['address']} failed: {e}",
                                       type="server_error") from None
        if r.status_code != 200:
            raise BackendError.from_dict({**r.json().get("error", {}), "status": r.status_code})
        return r.json()["count"]

    def stats(self) -> dict[str, float]:
        """The engine counters of the live workers (as of their last heartbeat) summed, their device_* gauges at
        the largest (the hottest, busiest card), plus ours. A controller that is down is reported, not raised:
        /metrics stays up."""
        out: dict[str, float] = {f"remote_{k}": v for k, v in self._counters.items()}
        try:
            workers = self._sync_client.get(f"{self.controller_url}/workers").json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {**out, "controller_up": 0}
        for worker in workers:
            for key, value in worker.get("stats", {}).items():
                if not isinstance(value, (int, float)):
                    continue
                if key in ADDITIVE_STATS:
                    out[key] = out.get(key, 0) + value
                elif key.startswith("device_"):
                    out[key] = max(out.get(key, value), value)
        return {**out, "controller_up": 1, "num_workers": len(workers),
                "requests_in_flight": sum(w["queue_length"] for w in workers)}

    async def close(self) -> None:
        await self._client.aclose()
        self._sync_client.close()

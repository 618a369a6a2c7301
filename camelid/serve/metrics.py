"""The server's Prometheus metrics: request counters by endpoint and status, token counters, and the engine's own
gauges and counters (LocalBackend.stats, or summed over a controller's workers), rendered for GET /metrics."""

from __future__ import annotations

from collections import Counter
from typing import Any

# the API's endpoints: a request for any other path is counted as "other" (the client picks the path)
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/sessions", "/health", "/metrics")


class Metrics:
    """Counters for /metrics (per app, not module-level)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.in_flight = 0

    def render(self, backend_stats: dict[str, Any]) -> str:
        lines = ["# HELP camelid_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE camelid_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'camelid_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')

        def metric(name: str, kind: str, help: str, value: float) -> None:
            lines.extend([f"# HELP camelid_{name} {help}", f"# TYPE camelid_{name} {kind}",
                          f"camelid_{name} {value:g}"])

        metric("prompt_tokens_total", "counter", "Prompt tokens of finished and running requests.", self.prompt_tokens)
        metric("generation_tokens_total", "counter", "Generated tokens sent to clients.", self.generation_tokens)
        metric("requests_in_flight", "gauge", "Generation requests being served now.", self.in_flight)
        s = backend_stats
        gauges = {"num_requests_waiting": ("num_waiting", "Requests queued in the engine, not yet running."),
                  "num_requests_running": ("num_running", "Requests in the engine's running batch."),
                  "kv_blocks_total": ("num_blocks", "KV cache blocks in the engine's pool."),
                  "kv_blocks_free": ("num_free_blocks", "KV cache blocks free.")}
        for name, (key, help) in gauges.items():
            if key in s:
                metric(name, "gauge", help, float(s[key]))
        if "num_blocks" in s and "num_free_blocks" in s:
            metric("kv_blocks_used", "gauge", "KV cache blocks in use.", float(s["num_blocks"] - s["num_free_blocks"]))
            if s["num_blocks"]:
                metric("kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.",
                       (s["num_blocks"] - s["num_free_blocks"]) / s["num_blocks"])
        counters = {"prefix_cache_hit_tokens": "Prompt tokens served from the prefix cache.",
                    "prompt_tokens_computed": "Prompt tokens the engine computed (cache misses).",
                    "generated_tokens": "Tokens the engine generated.",
                    "num_preemptions": "Requests preempted for lack of KV blocks."}
        for key, help in counters.items():
            if key in s:
                metric(f"engine_{key}_total", "counter", help, float(s[key]))
        if "decode_bandwidth_bytes_per_s" in s:
            metric("decode_bandwidth_bytes_per_second", "gauge", "Memory bandwidth achieved by recent decode steps "
                   "(weights + KV cache read per step / step time).", float(s["decode_bandwidth_bytes_per_s"]))
        for key in sorted(k for k in s if k.startswith("device_")):  # camelid.monitor: GPU via NVML, else CPU / RSS
            metric(key, "gauge", f"camelid.monitor's {key.removeprefix('device_')} of the serving device (behind "
                   "a controller: the largest over its workers).", float(s[key]))
        return "\n".join(lines) + "\n"


class CountRequests:
    """Count every HTTP response by endpoint (the route's path template) and status."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            template = getattr(scope.get("route"), "path", None)
            # the raw path only when it is an endpoint's own (a 413 comes before routing): the client picks it, and
            # every value is a new Prometheus series (with a quote or newline, lines of its own in /metrics)
            path = template or scope["path"]
            known = path.startswith(ENDPOINTS) if template else path in ENDPOINTS
            endpoint = path if known or path == "/" else "other"
            self.metrics.requests[(endpoint, status)] += 1

"""ASGI middleware: the request-body limit (413) and request metrics (count and latency per route)."""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


async def _send_error(send: Callable, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, by Content-Length or while reading."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over {self.limit} bytes: send a smaller spec (the limit is SCDD_MAX_BODY_BYTES)"
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_error(send, 413, message)
        chunks, size, more = [], 0, True
        while more:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            chunks.append(event.get("body", b""))
            size += len(chunks[-1])
            more = event.get("more_body", False)
            if size > self.limit:
                return await _send_error(send, 413, message)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Metrics:
    """Prometheus metrics of one app (its own registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("scdd_http_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("scdd_http_request_seconds", "Time to the response's first byte", ["method", "route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.queue_depth = Gauge("scdd_queue_depth", "Jobs queued, not yet dispatched", registry=self.registry)
        self.jobs = Gauge("scdd_jobs", "Jobs by state", ["state"], registry=self.registry)
        self.redis_memory = Gauge("scdd_redis_used_memory_bytes", "Memory Redis uses (INFO memory used_memory)",
                                  registry=self.registry)
        self.redis_maxmemory = Gauge("scdd_redis_maxmemory_bytes", "Redis maxmemory (0: no limit)",
                                     registry=self.registry)


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def timed_send(event: dict) -> None:
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            await send(event)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()

"""Request counts and a latency histogram per endpoint, written in the Prometheus text format by hand.

A pure ASGI middleware (no per-request task or body copy, unlike Starlette's BaseHTTPMiddleware)
times each request from its first byte in to its last byte out. Requests are labelled by the
route's template (`/items/{item_id}`, not `/items/42`), so a client cannot grow the label set; a
path that matches no route counts as `other`. Counters are per worker process: with
`--workers N`, Prometheus sees whichever worker answered a scrape (label the scrape by instance,
or run one worker per port).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from starlette.routing import Match

# Seconds; dense below 0.1 s, the search latency goal.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
PREFIX = "embedlab_http"


class HttpMetrics:
    """Thread-safe counters: requests by (method, endpoint, status), durations by endpoint."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._bucket_counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self.values: dict[str, tuple[str, str, Callable[[], float]]] = {}   # name -> (type, help, reader)

    def add_value(self, name: str, kind: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge or counter kept elsewhere, read at each scrape."""
        if kind not in ("gauge", "counter"):
            raise ValueError(f"{name}: a value is a gauge or a counter, not {kind!r}")
        self.values[name] = (kind, help_text, read)

    def observe(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        slot = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._requests[(method, endpoint, status)] += 1
            counts = self._bucket_counts.setdefault(endpoint, [0] * (len(self.buckets) + 1))
            counts[slot] += 1
            self._sums[endpoint] += seconds
            self._counts[endpoint] += 1

    def request_count(self, method: str, endpoint: str, status: int) -> int:
        with self._lock:
            return self._requests.get((method, endpoint, status), 0)

    def render(self) -> str:
        with self._lock:
            requests = dict(self._requests)
            buckets = {k: list(v) for k, v in self._bucket_counts.items()}
            sums, counts = dict(self._sums), dict(self._counts)
        lines = [f"# HELP {PREFIX}_requests_total HTTP requests answered, by method, route and status.",
                 f"# TYPE {PREFIX}_requests_total counter"]
        for (method, endpoint, status), n in sorted(requests.items()):
            lines.append(f'{PREFIX}_requests_total{{method="{method}",endpoint="{_escape(endpoint)}",'
                         f'status="{status}"}} {n}')
        name = f"{PREFIX}_request_duration_seconds"
        lines += [f"# HELP {name} Time from the request's arrival to the end of its response, by route.",
                  f"# TYPE {name} histogram"]
        for endpoint in sorted(buckets):
            label = f'endpoint="{_escape(endpoint)}"'
            cumulative = 0
            for bound, n in zip(self.buckets, buckets[endpoint]):
                cumulative += n
                lines.append(f'{name}_bucket{{{label},le="{bound:g}"}} {cumulative}')
            lines.append(f'{name}_bucket{{{label},le="+Inf"}} {counts[endpoint]}')
            lines.append(f"{name}_sum{{{label}}} {sums[endpoint]:.6f}")
            lines.append(f"{name}_count{{{label}}} {counts[endpoint]}")
        for name, (kind, help_text, read) in sorted(self.values.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Times every HTTP request and records it under its route template."""

    def __init__(self, app, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500   # stays 500 if the app fails before sending a response start

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.observe(scope["method"], route_template(scope), status, time.perf_counter() - start)


def route_template(scope) -> str:
    """The matching route's path template; 'other' for paths no route serves."""
    router = scope.get("app").router if scope.get("app") is not None else None
    partial = None   # a path served under another method (answered 405)
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return _template(route)
        if match == Match.PARTIAL and partial is None:
            partial = _template(route)
    return partial or "other"


def _template(route) -> str:
    """'/items/{item_id}/image' (the path without its converters, as the OpenAPI schema names it)."""
    return getattr(route, "path_format", None) or getattr(route, "path", "other")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

"""The control plane's Prometheus metrics on prometheus_client, and the HTTP endpoint that serves them
(`GET /metrics`, behind bearer tokens when --metrics-auth-token-file is given).

Metrics carries the constant labels (model_name) that every series has, which
prometheus_client leaves to each metric's labels. Values that another object already
keeps (the scheduler's queue lengths, its preemption count) are read at scrape time, so
they can never be stale.
"""
from __future__ import annotations

import copy
import threading
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

from controlplane.ops.auth import BearerTokens

# `_created` series would double every counter and histogram for a start timestamp no dashboard of ours reads
prometheus_client.disable_created_metrics()


class LabelledCounter:
    """A counter with labels beyond the constant ones: `.labels(finished_reason="stop").inc()`."""

    def __init__(self, counter: Counter, const_labels: dict[str, str]):
        self._counter, self._const = counter, const_labels

    def labels(self, **labels: str):
        return self._counter.labels(**self._const, **labels)


class _CounterReader(Collector):
    """A counter that other objects keep (plain ints they increment), read at scrape time: one read per label
    set (one per data plane, say)."""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...]):
        self.name, self.help, self.label_names = name, help_text, label_names
        self.reads: dict[tuple[str, ...], Callable[[], float]] = {}

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.help, labels=list(self.label_names))

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        for values, read in list(self.reads.items()):
            family.add_metric(list(values), read())
        yield family


class Metrics:
    """A prometheus_client registry whose every series carries `const_labels`. `labelled(labels)` is a view
    of the same registry whose series carry those labels too (one series per data plane under one name)."""

    def __init__(self, const_labels: dict[str, str] | None = None):
        self.registry = CollectorRegistry()
        self.const_labels = dict(const_labels or {})
        self._families: dict[str, tuple[str, tuple[str, ...], object]] = {}  # name -> (kind, label names, metric)
        self._lock = threading.Lock()

    def labelled(self, labels: dict[str, str]) -> "Metrics":
        view = copy.copy(self)  # the registry, families and lock are shared
        view.const_labels = {**self.const_labels, **labels}
        return view

    def _family(self, name: str, kind: str, label_names: tuple[str, ...], make: Callable[[], object]):
        with self._lock:
            if name not in self._families:
                self._families[name] = (kind, label_names, make())
            known_kind, known_labels, metric = self._families[name]
        if (known_kind, known_labels) != (kind, label_names):
            raise ValueError(f"metric {name} is registered as a {known_kind} of labels {known_labels} and as a "
                             f"{kind} of labels {label_names}")
        return metric

    def counter(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        """`name` ends in _total, as exposed. Without label_names, the counter itself (`.inc()`)."""
        names = (*self.const_labels, *label_names)
        counter = self._family(name, "counter", names,
                               lambda: Counter(name, help_text, names, registry=self.registry))
        if label_names:
            return LabelledCounter(counter, self.const_labels)
        return counter.labels(**self.const_labels)

    def histogram(self, name: str, help_text: str, buckets: tuple[float, ...]):
        names = tuple(self.const_labels)
        histogram = self._family(name, "histogram", names,
                                 lambda: Histogram(name, help_text, names, registry=self.registry, buckets=buckets))
        return histogram.labels(**self.const_labels)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge read from `read()` at scrape time."""
        names = tuple(self.const_labels)
        gauge = self._family(name, "gauge", names, lambda: Gauge(name, help_text, names, registry=self.registry))
        gauge.labels(**self.const_labels).set_function(read)

    def counter_reader(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        names = tuple(self.const_labels)

        def make() -> _CounterReader:
            reader = _CounterReader(name, help_text, names)
            self.registry.register(reader)
            return reader

        self._family(name, "counter_reader", names, make).reads[tuple(self.const_labels.values())] = read

    def render(self) -> str:
        """The text exposition format, as /metrics serves it."""
        return generate_latest(self.registry).decode()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):  # scrapes every few seconds would flood the log
        pass


UNAUTHORIZED = b"this endpoint requires a bearer token: send the header `Authorization: Bearer <token>`\n"
NOT_FOUND = b"only /metrics is served here\n"


def metrics_app(registry: CollectorRegistry, tokens: list[str]):
    """prometheus_client's WSGI app at /metrics alone, behind `tokens` when there are any."""
    exposition = make_wsgi_app(registry)
    checker = BearerTokens(tokens) if tokens else None

    def app(environ, start_response):
        def reply(status: str, body: bytes, headers: list[tuple[str, str]] = ()):
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), *headers])
            return [body]

        if environ.get("PATH_INFO") != "/metrics":
            return reply("404 Not Found", NOT_FOUND)
        if checker is not None and checker.problem(environ.get("HTTP_AUTHORIZATION", "")) is not None:
            return reply("401 Unauthorized", UNAUTHORIZED, [("WWW-Authenticate", "Bearer")])
        return exposition(environ, start_response)

    return app


class MetricsServer:
    """Serves metrics at GET /metrics on its own daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int, tokens: list[str] | None = None):
        self._http = make_server(host, port, metrics_app(metrics.registry, tokens or []), _ThreadingWSGIServer,
                                 handler_class=_QuietHandler)
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

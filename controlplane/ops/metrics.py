"""A small Prometheus registry: counters, gauges and histograms, rendered in the text exposition format 0.0.4,
and the HTTP endpoint that serves them (`GET /metrics`).

Written here rather than taken from prometheus_client because the control plane needs
only this much. Writers (the engine thread) and the scraper (the HTTP thread) share a
lock per metric, so a scrape never sees a histogram's count without its sum.
"""
from __future__ import annotations

import bisect
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        self.name = name
        self.help = help_text
        self.label_names = label_names
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self, const: dict[str, str]) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        super().__init__(name, help_text, label_names)
        self._values: dict[tuple[str, ...], float] = {} if label_names else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot go down")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self, const: dict[str, str]) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels({**const, **dict(zip(self.label_names, key))})} {_number(v)}"
                for key, v in items]


class Gauge(_Metric):
    """A gauge read from `read()` at scrape time, so it can never be stale."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        super().__init__(name, help_text)
        self.read = read

    def samples(self, const: dict[str, str]) -> list[str]:
        return [f"{self.name}{_labels(const)} {_number(self.read())}"]


class CounterReader(Gauge):
    """A counter that another object keeps (a plain int it increments), read at scrape time."""

    kind = "counter"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        super().__init__(name, help_text)
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"{name}: buckets must increase strictly")
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def samples(self, const: dict[str, str]) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, cumulative = [], 0
        for bound, n in zip((*self.buckets, math.inf), counts):
            cumulative += n
            lines.append(f"{self.name}_bucket{_labels({**const, 'le': _number(bound)})} {cumulative}")
        lines.append(f"{self.name}_sum{_labels(const)} {_number(total)}")
        lines.append(f"{self.name}_count{_labels(const)} {cumulative}")
        return lines


class Registry:
    """Metrics by name; `labelled(labels)` gives a view whose metrics render under the same names with those
    labels added (one series per data plane), so several objects may register a metric of one name."""

    def __init__(self, const_labels: dict[str, str] | None = None):
        self.const_labels = dict(const_labels or {})
        self._families: dict[str, list[tuple[_Metric, dict[str, str]]]] = {}
        self._lock = threading.Lock()

    def add(self, metric, labels: dict[str, str] | None = None):
        labels = dict(labels or {})
        with self._lock:
            family = self._families.setdefault(metric.name, [])
            if any(existing == labels for _, existing in family):
                raise ValueError(f"metric {metric.name} is registered twice")
            if family and family[0][0].kind != metric.kind:
                raise ValueError(f"metric {metric.name} is registered as {family[0][0].kind} and {metric.kind}")
            family.append((metric, labels))
        return metric

    def labelled(self, labels: dict[str, str]) -> "LabelledRegistry":
        return LabelledRegistry(self, labels)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            families = [list(f) for f in self._families.values()]
        for family in families:
            lines += family[0][0].header()
            for metric, labels in family:
                lines += metric.samples({**self.const_labels, **labels})
        return "\n".join(lines) + "\n"


class LabelledRegistry:
    def __init__(self, parent: Registry, labels: dict[str, str]):
        self.parent, self.labels = parent, labels

    def add(self, metric):
        return self.parent.add(metric, self.labels)


class MetricsServer:
    """Serves registry.render() at GET /metrics on its own daemon thread."""

    def __init__(self, registry: Registry, host: str, port: int):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds would flood the log
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

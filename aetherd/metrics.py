"""Prometheus metrics (prometheus-client), one registry per daemon.

Counters are updated where things happen (frames, bytes, error codes, connections).
State that services already hold (sessions, watches, ports, tasks, transcript size) is
read at scrape time: any service with a `metrics()` method returning `Sample`s is
exported, so a service adds metrics without touching this module.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("aetherd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_CHANNEL = re.compile(r'"channel":"([A-Za-z0-9_.-]{1,32})"')
_CHANNEL_BYTES = re.compile(rb'"channel":"([A-Za-z0-9_.-]{1,32})"')
KNOWN_CHANNELS = frozenset(
    {"terminal", "files", "agent", "ports", "config", "activity", "error", "unknown"}
)
# `*_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client


@dataclass(frozen=True)
class Sample:
    """One value a service reports at scrape time."""

    name: str
    help: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)
    kind: str = "gauge"  # or "counter"


def channel_of(text: str | bytes) -> str:
    """The `channel` of a serialized frame, text or UTF-8 (only the first bytes are looked at)."""
    if isinstance(text, bytes):
        found = _CHANNEL_BYTES.search(text, 0, 256)
        name = found.group(1).decode("ascii") if found is not None else None
    else:
        match = _CHANNEL.search(text, 0, 256)
        name = match.group(1) if match is not None else None
    if name is None:
        return "unknown"
    return name if name in KNOWN_CHANNELS else "other"


class _ServiceCollector(Collector):
    def __init__(self, sources: Callable[[], Iterable[object]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for source in self._sources():
            try:
                samples = list(source.metrics())  # type: ignore[attr-defined]
            except Exception:
                log.exception("metrics of %s failed", type(source).__name__)
                continue
            for sample in samples:
                family = families.get(sample.name)
                if family is None:
                    cls = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                    family = cls(sample.name, sample.help, labels=sorted(sample.labels))
                    families[sample.name] = family
                family.add_metric([sample.labels[k] for k in sorted(sample.labels)], sample.value)
        yield from families.values()


class Metrics:
    """The daemon's metrics. Plain methods, cheap enough for every frame."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._sources: list[object] = []
        self.frames = Counter(
            "aetherd_frames",
            "WebSocket frames by channel and direction",
            ["channel", "direction"],
            registry=self.registry,
        )
        self.frame_bytes = Counter(
            "aetherd_frame_bytes",
            "WebSocket frame bytes by channel and direction",
            ["channel", "direction"],
            registry=self.registry,
        )
        self.errors = Counter(
            "aetherd_errors",
            "Error replies and error frames by code",
            ["code"],
            registry=self.registry,
        )
        self.connections_opened = Counter(
            "aetherd_connections_opened", "WebSocket connections accepted", registry=self.registry
        )
        self.connections_dropped = Counter(
            "aetherd_connections_dropped",
            "Connections dropped by the server, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "aetherd_request_seconds",
            "Handler time by channel",
            ["channel"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
        self.registry.register(_ServiceCollector(lambda: list(self._sources)))

    def add_source(self, source: object) -> None:
        """Export `source.metrics()` at every scrape."""
        self._sources.append(source)

    def frame_in(self, channel: str, size: int) -> None:
        """Count one client frame."""
        label = channel if channel in KNOWN_CHANNELS else "other"
        self.frames.labels(label, "in").inc()
        self.frame_bytes.labels(label, "in").inc(size)

    def frame_out(self, text: str | bytes) -> None:
        """Count one server frame (its length in characters, or in bytes when encoded)."""
        label = channel_of(text)
        self.frames.labels(label, "out").inc()
        self.frame_bytes.labels(label, "out").inc(len(text))

    def error(self, code: str) -> None:
        """Count one error sent to a client."""
        self.errors.labels(code).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

"""Prometheus metrics, one set per daemon; prometheus-client is imported at the first scrape.

Counters are updated where things happen (frames, bytes, error codes, connections).
State that services already hold (sessions, watches, ports, tasks, transcript size) is
read at scrape time: any service with a `metrics()` method returning `Sample`s is
exported, so a service adds metrics without touching this module.

The counters and the histogram here are plain numbers in dicts, updated on the event
loop; `render()` turns them into prometheus-client metric families and its text
exposition, byte for byte what prometheus-client's own `Counter` and `Histogram` print
(tests/test_metrics.py compares them). An idle daemon that is never scraped therefore
never imports prometheus-client (30 modules; docs/performance.md, Start-up).
"""

from __future__ import annotations

import bisect
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("aetherd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_CHANNEL = re.compile(r'"channel":"([A-Za-z0-9_.-]{1,32})"')
_CHANNEL_BYTES = re.compile(rb'"channel":"([A-Za-z0-9_.-]{1,32})"')
KNOWN_CHANNELS = frozenset(
    {"terminal", "files", "agent", "ports", "config", "activity", "error", "unknown"}
)


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


class _Child:
    """One labelled series of a `_Counter` or `_Histogram` (prometheus-client's `labels()`)."""

    __slots__ = ("_key", "_parent")

    def __init__(self, parent: _Counter | _Histogram, key: tuple[str, ...]) -> None:
        self._parent = parent
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` to a counter's series."""
        self._parent.add(self._key, amount)

    def observe(self, value: float) -> None:
        """Count one observation of a histogram's series."""
        self._parent.add(self._key, value)


class _Counter:
    """A counter kept as numbers keyed by label values; `collect()` gives its family."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def labels(self, *values: str) -> _Child:
        """The series of these label values (created at its first increment)."""
        return _Child(self, tuple(str(v) for v in values))

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` to an unlabelled counter."""
        self.add((), amount)

    def add(self, key: tuple[str, ...], amount: float) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def collect(self) -> list[Metric]:
        """The metric family, as prometheus-client's `Counter.collect()` gives it."""
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in self.values.copy().items():  # copy: render() runs in a thread
            family.add_metric(list(key), value)
        return [family]


class _Histogram:
    """A histogram kept as per-bucket counts and a sum for each label value."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        buckets: Iterable[float],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = (*sorted(float(b) for b in buckets), float("inf"))
        self._lock = threading.Lock()  # one series' counts and sum change together
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def labels(self, *values: str) -> _Child:
        """The series of these label values (created at its first observation)."""
        return _Child(self, tuple(str(v) for v in values))

    def add(self, key: tuple[str, ...], value: float) -> None:
        """Count `value` in the series `key` (the label values, already strings)."""
        index = bisect.bisect_left(self.bounds, value)  # the first bound >= value
        with self._lock:
            found = self.series.get(key)
            if found is None:
                found = self.series[key] = ([0] * len(self.bounds), [0.0])
            found[0][min(index, len(self.bounds) - 1)] += 1
            found[1][0] += value

    def collect(self) -> list[Metric]:
        """The metric family, as prometheus-client's `Histogram.collect()` gives it."""
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [(key, list(counts), total[0]) for key, (counts, total) in self.series.items()]
        for key, counts, total in series:
            cumulative, buckets = 0, []
            for bound, count in zip(self.bounds, counts, strict=True):
                cumulative += count
                # Unannotated in prometheus_client.
                le = floatToGoString(bound)  # type: ignore[no-untyped-call]
                buckets.append((le, cumulative))
            family.add_metric(list(key), buckets, total)
        return [family]


def _service_families(sources: Iterable[object]) -> Iterator[Metric]:
    """The families of every source's `metrics()` samples, read now."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for source in sources:
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
        self._sources: list[object] = []
        self.frames = _Counter(
            "aetherd_frames",
            "WebSocket frames by channel and direction",
            ["channel", "direction"],
        )
        self.frame_bytes = _Counter(
            "aetherd_frame_bytes",
            "WebSocket frame bytes by channel and direction",
            ["channel", "direction"],
        )
        self.errors = _Counter(
            "aetherd_errors",
            "Error replies and error frames by code",
            ["code"],
        )
        self.connections_opened = _Counter(
            "aetherd_connections_opened", "WebSocket connections accepted"
        )
        self.connections_dropped = _Counter(
            "aetherd_connections_dropped",
            "Connections dropped by the server, by reason",
            ["reason"],
        )
        self.request_seconds = _Histogram(
            "aetherd_request_seconds",
            "Handler time by channel",
            ["channel"],
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
        self._own: tuple[_Counter | _Histogram, ...] = (
            self.frames,
            self.frame_bytes,
            self.errors,
            self.connections_opened,
            self.connections_dropped,
            self.request_seconds,
        )

    def add_source(self, source: object) -> None:
        """Export `source.metrics()` at every scrape."""
        self._sources.append(source)

    def frame_in(self, channel: str, size: int) -> None:
        """Count one client frame."""
        label = channel if channel in KNOWN_CHANNELS else "other"
        self.frames.add((label, "in"), 1.0)
        self.frame_bytes.add((label, "in"), size)

    def frame_out(self, text: str | bytes) -> None:
        """Count one server frame (its length in characters, or in bytes when encoded)."""
        label = channel_of(text)
        self.frames.add((label, "out"), 1.0)
        self.frame_bytes.add((label, "out"), len(text))

    def error(self, code: str) -> None:
        """Count one error sent to a client."""
        self.errors.add((code,), 1.0)

    def collect(self) -> Iterator[Metric]:
        """Every metric family: the counters above, then the services' samples."""
        for metric in self._own:
            yield from metric.collect()
        yield from _service_families(list(self._sources))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self))
        return generate_latest(registry)


class _Families:
    """The registry's one collector: all of `Metrics.collect()`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()

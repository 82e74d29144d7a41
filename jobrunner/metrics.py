"""Counters and histograms of one process, rendered in the Prometheus text format."""

import bisect
import threading
from collections.abc import Iterable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, doc: str, labels: Iterable[str] = ()):
        self.name, self.doc, self.label_names = name, doc, tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1) -> None:
        with self._lock:
            self._values[label_values] = self._values.get(label_values, 0) + amount

    def value(self, *label_values: str) -> float:
        return self._values.get(label_values, 0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        lines += [f"{self.name}{_labels(self.label_names, key)} {value:g}" for key, value in items]
        return lines


class Histogram:
    def __init__(self, name: str, doc: str, labels: Iterable[str] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.doc, self.label_names, self.buckets = name, doc, tuple(labels), buckets
        self._series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts..., count, sum]
        self._lock = threading.Lock()

    def observe(self, value: float, *label_values: str) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            series = self._series.setdefault(label_values, [0] * (len(self.buckets) + 1) + [0.0])
            series[index] += 1
            series[-1] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((key, list(series)) for key, series in self._series.items())
        for key, series in items:
            cumulative = 0
            for bound, count in zip((*self.buckets, float("inf")), series):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                bucket_labels = _labels(self.label_names, key, 'le="' + le + '"')
                lines.append(f"{self.name}_bucket{bucket_labels} {cumulative}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {series[-1]:g}")
        return lines


def render_gauges(name: str, doc: str, label: str, values: dict[str, float]) -> list[str]:
    """One gauge, a value per label value, read at scrape time (from the database: the same for every process)."""
    lines = [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
    return lines + [f"{name}{_labels((label,), (key,))} {value:g}" for key, value in sorted(values.items())]


class Registry:
    def __init__(self):
        self._metrics: list[Counter | Histogram] = []

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        metric = Counter(name, doc, labels)
        self._metrics.append(metric)
        return metric

    def histogram(self, name: str, doc: str, labels: Iterable[str] = ()) -> Histogram:
        metric = Histogram(name, doc, labels)
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for metric in self._metrics for line in metric.render()) + "\n"

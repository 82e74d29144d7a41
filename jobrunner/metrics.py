"""Counters and histograms in the Prometheus text format, summed across every process of one supervisor.

Each process counts in its own `ServiceMetrics` and a `Publisher` writes them,
at most a second late, to `<directory>/<pid>.json`. When a child dies, the
supervisor folds its file into `retired.json` (`retire`), so totals never go
down when a child is replaced. A server answering /metrics adds them all up
(`collect`). A child killed with SIGKILL loses what it counted in its last second.
"""

import bisect
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

from .models import ArchivedJob, QueuedJob

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    """Whole numbers in full (`:g` would print 1234567 as 1.23457e+06), others as Python's shortest repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


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

    def snapshot(self) -> list:
        with self._lock:
            return [[list(key), value] for key, value in self._values.items()]

    def add(self, snapshot: list) -> None:
        for key, value in snapshot:
            self.inc(*key, amount=value)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        lines += [f"{self.name}{_labels(self.label_names, key)} {_number(value)}" for key, value in items]
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

    def snapshot(self) -> list:
        with self._lock:
            return [[list(key), list(series)] for key, series in self._series.items()]

    def add(self, snapshot: list) -> None:
        with self._lock:
            for key, values in snapshot:
                series = self._series.setdefault(tuple(key), [0] * (len(self.buckets) + 1) + [0.0])
                for index, value in enumerate(values):
                    series[index] += value

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
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-1])}")
        return lines


def render_gauges(name: str, doc: str, label: str, values: dict[str, float]) -> list[str]:
    """One gauge, a value per label value, read at scrape time (from the database: the same for every process)."""
    lines = [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
    return lines + [f"{name}{_labels((label,), (key,))} {_number(value)}" for key, value in sorted(values.items())]


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

    def snapshot(self) -> dict[str, list]:
        """Every value, by metric name, as JSON can carry it."""
        return {metric.name: metric.snapshot() for metric in self._metrics}

    def add(self, snapshot: dict[str, list]) -> None:
        """Add another process's values (metrics this registry does not have are ignored)."""
        by_name = {metric.name: metric for metric in self._metrics}
        for name, values in snapshot.items():
            if name in by_name:
                by_name[name].add(values)


class ServiceMetrics(Registry):
    """Every metric jobrunner has; each process counts the events it sees."""

    def __init__(self):
        super().__init__()
        by_type = ("name",)
        self.http_requests = self.counter("jobrunner_http_requests_total", "HTTP requests answered, by route and status", ("route", "status"))
        self.http_latency = self.histogram("jobrunner_http_request_duration_seconds", "HTTP request latency, by route", ("route",))
        self.enqueued = self.counter("jobrunner_jobs_enqueued_total", "jobs enqueued (PUTs, repeated ones included, and replays), by job type", by_type)
        self.claimed = self.counter("jobrunner_jobs_claimed_total", "jobs claimed by a worker to be sent, by job type", by_type)
        self.dispatched = self.counter("jobrunner_jobs_dispatched_total", "jobs the downstream accepted (2xx), by job type", by_type)
        self.succeeded = self.counter("jobrunner_jobs_succeeded_total", "jobs archived succeeded, by job type", by_type)
        self.failed = self.counter("jobrunner_jobs_failed_total", "jobs archived failed (no attempt left, or not retryable), by job type", by_type)
        self.retried = self.counter("jobrunner_jobs_retried_total", "failed attempts queued again with back-off, by job type", by_type)
        self.expired = self.counter("jobrunner_jobs_expired_total", "jobs archived expired before they were sent, by job type", by_type)
        self.cancelled = self.counter("jobrunner_jobs_cancelled_total", "queued jobs cancelled, by job type", by_type)
        self.timed_out = self.counter("jobrunner_jobs_timed_out_total", "sent jobs with no callback within job_timeout, failed by a worker, by job type", by_type)
        self.stuck = self.counter("jobrunner_jobs_stuck_archived_total", "in-progress jobs failed by the watcher after stuck_job_timeout, by job type", by_type)
        self.heartbeats = self.counter("jobrunner_heartbeats_total", "heartbeats that pushed a sent job's callback deadline forward, by job type", by_type)
        self.claim_errors = self.counter("jobrunner_claim_errors_total", "failed claims of a job type's jobs (other types go on), by job type", by_type)
        self.rate_limited = self.counter(
            "jobrunner_rate_limited_waits_total",
            "claims of a rate-limited type that left due jobs for want of a token (the type then waits for its next one), by job type",
            by_type,
        )
        self.claim_latency = self.histogram("jobrunner_claim_duration_seconds", "time to claim a batch of one type's jobs, by job type", by_type)
        self.downstream_latency = self.histogram("jobrunner_downstream_request_duration_seconds", "downstream POST latency, whatever its outcome, by job type", by_type)
        self.downstream_errors = self.counter(
            "jobrunner_downstream_errors_total",
            "downstream POSTs not accepted, by job type and kind: unavailable (503), http_4xx, http_5xx, http_3xx, connect, timeout, cut_off",
            ("name", "kind"),
        )
        self.schedule_ticks = self.counter("jobrunner_schedule_ticks_enqueued_total", "jobs enqueued for a schedule's ticks, by schedule", ("schedule",))
        self.schedule_misfires = self.counter(
            "jobrunner_schedule_misfires_skipped_total", "missed ticks that got no job of their own (the misfire policy), by schedule", ("schedule",)
        )
        self.schedule_errors = self.counter("jobrunner_schedule_errors_total", "rounds in which a schedule could not be evaluated, by schedule", ("schedule",))
        self.restarts = self.counter("jobrunner_child_restarts_total", "children that died and were started again, by kind", ("kind",))
        self.reloads = self.counter("jobrunner_reloads_total", "SIGHUP reloads, by result: ok, rejected (bad config), failed (the new children did not start)", ("result",))

    def include_job_types(self, names: list[str]) -> None:
        """Every per-type counter shows each type, at 0 until its first event (increase() cannot see a first sample)."""
        for metric in self._metrics:
            if isinstance(metric, Counter) and metric.label_names == ("name",):
                for name in names:
                    metric.inc(name, amount=0)

    def include_schedules(self, names: list[str]) -> None:
        """Every per-schedule counter shows each schedule, at 0 until its first event."""
        for metric in (self.schedule_ticks, self.schedule_misfires, self.schedule_errors):
            for name in names:
                metric.inc(name, amount=0)

    def outcome(self, job: QueuedJob | ArchivedJob) -> None:
        """Count what a callback, a failure or a cancel made of a job: queued again, or archived."""
        if isinstance(job, QueuedJob):
            self.retried.inc(job.name)
        else:
            getattr(self, job.status).inc(job.name)  # succeeded, failed, expired, cancelled: a counter each, of that name


# --- across processes ---

RETIRED = "retired.json"
PUBLISH_INTERVAL = 1.0  # seconds
KEEP_RETIRED_NAMES = 1000  # more than any scrape can span: a file retired that long ago is long gone


class Publisher:
    """Write one process's metrics to its own file in `directory`: on `publish()`, and every `every` seconds from a thread.

    The file's name is unique to this process (its pid and a random tag: a pid
    is reused). It is rewritten when the counts changed, or when it went
    missing (something cleaning up old files).
    """

    def __init__(self, registry: Registry, directory: str, every: float | None = PUBLISH_INTERVAL):
        self.registry, self.every = registry, every
        self.directory = Path(directory)
        self.path = self.directory / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        self._written: dict | None = None
        self._failing = False  # logged once per run of failures
        self._lock = threading.Lock()  # the thread and the callers of publish() share one temporary file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-publisher", daemon=True) if every else None
        if self._thread:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.publish()

    def publish(self) -> None:
        with self._lock:
            snapshot = self.registry.snapshot()
            if snapshot == self._written and self.path.exists():
                return
            try:
                _write_json(self.path, snapshot)
            except OSError as error:  # the directory gone, a full disk: /metrics lags, the process goes on
                if not self._failing:
                    log.warning("could not publish metrics to %s: %s; trying again", self.path, error)
                self._failing = True
                return
            self._written, self._failing = snapshot, False

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.publish()


def collect(directory: Path) -> ServiceMetrics:
    """Every process's metrics summed: the live processes' files and the retired ones.

    The live files are read before retired.json: a file retired in between is
    then named in retired.json, and skipped, so nothing counts twice. A server
    publishes its own counts just before: every server then answers the same
    sum of files, each of which only grows, so totals never go down between
    scrapes, whichever server answers them.
    """
    files = {}
    for path in directory.glob("*-*.json"):
        snapshot = _read_json(path)
        if snapshot is not None:
            files[path.name] = snapshot
    retired = _read_json(directory / RETIRED) or {"files": [], "metrics": {}}
    total = ServiceMetrics()
    total.add(retired["metrics"])
    skip = set(retired["files"])
    for name, snapshot in files.items():
        if name not in skip:
            total.add(snapshot)
    return total


def retire(directory: Path, pid: int) -> None:
    """Fold a dead process's file into retired.json, then remove it (the supervisor, after reaping `pid`).

    No process of ours can hold `pid` again before it is reaped, so every file of
    that pid is the dead process's. A failure is logged: the counts lag, the
    supervisor goes on.
    """
    try:
        for path in directory.glob(f"{pid}-*.json"):
            snapshot = _read_json(path)
            retired = _read_json(directory / RETIRED) or {"files": [], "metrics": {}}
            total = ServiceMetrics()
            total.add(retired["metrics"])
            total.add(snapshot or {})
            names = [*retired["files"], path.name][-KEEP_RETIRED_NAMES:]
            _write_json(directory / RETIRED, {"files": names, "metrics": total.snapshot()})
            path.unlink()
    except OSError as error:
        log.warning("could not fold the metrics of pid %d into %s: %s", pid, RETIRED, error)


def _write_json(path: Path, value) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, separators=(",", ":")))
    os.replace(temporary, path)  # readers see the old file or the new one, never half of one


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None

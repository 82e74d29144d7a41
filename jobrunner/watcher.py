"""The watcher process: periodic maintenance that no request or worker triggers.

Every `stuck_job_interval` it fails jobs stuck in progress (a worker that died
with jobs in flight), archives due jobs that expired, deletes archived jobs
past the retention, and tidies jobrunner's side tables: the attempts kept for
jobs that are archived now, heartbeat deadlines no job holds any more, and type errors no worker refreshes any more. It is the safety net behind the workers' own callback
timeout, so its own timeout is longer.
"""

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from datetime import datetime, timedelta

from . import services, store
from .errors import JobrunnerError
from .metrics import ServiceMetrics
from .outages import OutageLog

log = logging.getLogger(__name__)

BATCH = 1000
# A type still failing is recorded again at least every ~12 s (the longest claim
# back-off); an error older than this was left by a worker that stopped.
STALE_TYPE_ERROR = timedelta(minutes=2)


@dataclasses.dataclass(frozen=True)
class Round:
    stuck: int = 0
    expired: int = 0
    deleted: int = 0

    def changed_something(self) -> bool:
        return bool(self.stuck or self.expired or self.deleted)


class Watcher:
    def __init__(self, config, connection: Callable[[], ContextManager[store.Connection]], counted: ServiceMetrics | None = None):
        self.connection = connection
        self.metrics = counted or ServiceMetrics()
        self.interval = config.stuck_job_interval
        # A job is stuck stuck_job_timeout after its claim: job_timeout (the type's own, when
        # it has one, or the last heartbeat's deadline) and the same margin behind the workers.
        self.job_timeout = timedelta(seconds=config.job_timeout)
        self.margin = timedelta(seconds=config.stuck_job_timeout) - self.job_timeout
        self.retention = timedelta(days=config.archive_retention_days) if config.archive_retention_days else None

    def run_once(self, now: datetime | None = None) -> Round:
        """One round; what it changed."""
        with self.connection() as conn:
            stuck = services.archive_stuck_jobs(conn, self.job_timeout, now, self.margin)
            for job in stuck:
                self.metrics.stuck.inc(job.name)
                self.metrics.outcome(job)
            expired = _repeat(lambda: self._archive_expired(conn, now))
            _repeat(lambda: store.delete_attempts_of_archived_jobs(conn, BATCH))
            _repeat(lambda: store.delete_past_deadlines(conn, BATCH))
            store.delete_stale_type_errors(conn, STALE_TYPE_ERROR, now)
            deleted = 0
            if self.retention is not None:
                for job_type in store.list_job_types(conn):
                    deleted += _repeat(lambda: store.delete_old_archived_jobs(conn, job_type.name, self.retention, BATCH, now))
        return Round(len(stuck), expired, deleted)

    def _archive_expired(self, conn: store.Connection, now: datetime | None) -> int:
        names = store.archive_expired_jobs(conn, BATCH, now)
        for name in names:
            self.metrics.expired.inc(name)
        return len(names)

    def run(self, stop: threading.Event) -> None:
        """`run_once` every interval, anchored to the start so that the rounds never drift."""
        started = time.monotonic()
        outage = OutageLog("watcher round", log, "trying again next round until it recovers")
        while not stop.is_set():
            try:
                done = self.run_once()
                outage.recovered()
                if done.changed_something():
                    log.info("watcher: %d stuck jobs failed, %d expired jobs archived, %d old archived jobs deleted", done.stuck, done.expired, done.deleted)
            except JobrunnerError as error:  # unreachable, or a statement refused: a restart would meet it again
                outage.failed(error)
            # the next tick of the grid that started with the first round; a late round skips ticks
            stop.wait(self.interval - (time.monotonic() - started) % self.interval)


def _repeat(batch) -> int:
    """Run a batch statement until it does less than a full batch; the total it did."""
    total = 0
    while True:
        done = batch()
        total += done
        if done < BATCH:
            return total


def run(config, stop: threading.Event, counted: ServiceMetrics | None = None) -> None:
    def connection():
        # one connection per round, closed after it: the watcher holds none while it waits
        timeout = max(2, round(config.db_timeout))
        return contextlib.closing(
            store.connect(config.database_url, "watcher", connect_timeout=timeout, prepared_statements=config.prepared_statements)
        )

    Watcher(config, connection, counted).run(stop)

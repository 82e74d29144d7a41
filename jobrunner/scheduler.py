"""The scheduler: one per host, a thread of the watcher process, that turns schedules' due ticks into jobs.

It sleeps until the earliest next tick, by the database's clock (asked after each
round), or until a schedule changes (NOTIFY jobrunner_schedules), and then runs
`schedules.enqueue_due_ticks`. Every host's scheduler may do so at once: the
schedules' row locks and the ticks' job ids make one job per tick (schedules.py).

At its start it makes the config file's schedules the config-owned ones
(`schedules.reconcile`); the supervisor does so too before it starts, and on
SIGHUP, where a bad declaration is refused, but this covers a database that was
down at that moment. It holds one connection (to JOBRUNNER_LISTEN_DATABASE_URL when
set: LISTEN needs a session), and, when the database goes away, logs it once and
tries again with back-off.
"""

import dataclasses
import logging
import threading
import time

from . import schedules, store
from .errors import DatabaseUnavailable, JobrunnerError
from .metrics import ServiceMetrics
from .outages import OutageLog

log = logging.getLogger(__name__)

SAFETY_WAIT = 60.0  # seconds: the longest sleep, should a notification be lost
WAIT_SLICE = 0.5  # seconds: how often a wait looks at the stop event
MAX_BACKOFF = 30.0


@dataclasses.dataclass(frozen=True)
class Round:
    enqueued: int = 0
    skipped: int = 0
    failed: int = 0
    more: bool = False  # schedules are still due: run again at once


class Scheduler:
    def __init__(self, config, counted: ServiceMetrics | None = None):
        self.config = config
        self.metrics = counted or ServiceMetrics()
        self.reconciled = not config.config_file  # no config file: the config-owned schedules are left as they are
        self._reconcile_failures = 0

    def run_once(self, conn: store.Connection, now=None) -> Round:
        """Reconcile if not yet done, then one transaction's worth of due ticks; what it did."""
        if not self.reconciled:
            self._reconcile(conn, now)
        fired = schedules.enqueue_due_ticks(conn, now=now)
        for one in fired:
            self.metrics.schedule_ticks.inc(one.name, amount=one.enqueued)
            self.metrics.schedule_misfires.inc(one.name, amount=one.skipped)
            if one.error is not None:
                self.metrics.schedule_errors.inc(one.name)
                if one.first_failure:  # logged once per run of failures, by whichever host met it first
                    log.error("schedule %r cannot be evaluated, trying again with back-off (the others go on): %s", one.name, one.error)
        more = len(fired) == schedules.DUE_BATCH or any(not one.complete for one in fired)
        return Round(sum(f.enqueued for f in fired), sum(f.skipped for f in fired), sum(f.error is not None for f in fired), more)

    def _reconcile(self, conn: store.Connection, now) -> None:
        try:
            done = schedules.reconcile(conn, self.config.schedules, now)
        except DatabaseUnavailable:
            raise
        except JobrunnerError as error:  # e.g. a job type deleted since the supervisor checked: the ticks go on meanwhile
            if self._reconcile_failures == 0:
                log.error("the config file's schedules could not be applied, trying again each round: %s", error)
            self._reconcile_failures += 1
            return
        self.reconciled = True
        for name in done.not_owned:
            log.warning("schedule %r in the config file exists and was made through the API: left alone (mark it config_owned to hand it over)", name)

    def run(self, stop: threading.Event) -> None:
        """Rounds until `stop`, each woken by the earliest next tick or a change of the schedules."""
        outage = OutageLog("scheduler", log)
        listener: store.Listener | None = None
        backoff = 1.0
        try:
            while not stop.is_set():
                try:
                    if listener is None:
                        listener = self._listen()
                    wait = self._round(listener)
                    outage.recovered()
                    backoff = 1.0
                    _wait(listener, stop, wait)
                except Exception as error:  # unreachable, a statement refused, or a bug (logged with its traceback): once, then tried again
                    # a thread that ended here would leave this host without a scheduler while its watcher goes on
                    outage.failed(error)
                    if listener is not None:
                        listener.close()
                        listener = None
                    stop.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            if listener is not None:
                listener.close()

    def _listen(self) -> store.Listener:
        url = self.config.listen_database_url or self.config.database_url
        return store.Listener(
            url,
            "scheduler",
            prepared_statements=self.config.prepared_statements,
            listen=store.LISTEN_SCHEDULES,
            connect_timeout=max(2, round(self.config.db_timeout)),  # a stop is not held up by a database that does not answer
        )

    def _round(self, listener: store.Listener) -> float:
        """One round on the listening connection; how long to sleep after it."""
        done = self.run_once(listener.connection)
        if done.enqueued or done.skipped:
            log.debug("scheduler: %d jobs enqueued, %d missed ticks skipped", done.enqueued, done.skipped)
        if done.more:
            return 0.0
        due_in = schedules.next_due_in(listener.connection)
        return SAFETY_WAIT if due_in is None else min(due_in, SAFETY_WAIT)


def _wait(listener: store.Listener, stop: threading.Event, seconds: float) -> None:
    """Until `seconds` have passed, a schedule changed, or `stop`."""
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0 or listener.wait(min(remaining, WAIT_SLICE)):
            return


def run(config, stop: threading.Event, counted: ServiceMetrics | None = None) -> None:
    Scheduler(config, counted).run(stop)

"""A worker process: claim due jobs of every type and hand them to dispatch threads — woken, not polling.

One claim loop (this module's `Worker.run`), a small pool of dispatch threads
making blocking downstream POSTs, one connection pool and one LISTEN connection.
Postgres decides what may run: a claim never takes more than a type's free
slots, counted across every process and host. Notifications say when a type
may have work (a job enqueued, a slot freed, a type created or changed); a
safety poll that slows down while idle (`get_sleep_duration`) covers lost
ones, and a timer wakes the loop when a delayed job comes due. Callbacks are
never polled per job: a sent job waits in the database, and one statement per
tick fails those whose callback is overdue.

Each claimed job goes to its type's handler (`plugins.JobHandler`: the built-in
`delivery.HttpDelivery`, or an application's), which returns an outcome; the
loop records every outcome the same way (`_record`), and a certain one the
database did not take is tried again until it answers.

Errors stay with the type they happen to: a claim of one type that fails is
logged once, counted, recorded for the dashboard and backed off for that type
alone, while the others flow; only an unreachable database stops every type.
No type holds every dispatch thread (`_share`), so a slow downstream of one type
never keeps another's jobs waiting.
"""

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from . import plugins, services, store
from .delivery import HttpDelivery
from .downstream import Downstream
from .errors import DatabaseUnavailable, JobAlreadyArchived, JobNameMismatch, JobrunnerError, StaleCallback, UnknownJob
from .metrics import ServiceMetrics
from .models import QueuedJob, format_job_id
from .outages import OutageLog
from .outcomes import OUTCOMES, Accepted, Failed, Outcome

log = logging.getLogger(__name__)

MAX_CLAIM = 100  # jobs claimed per type per statement
FAILURE_BACKOFF_FACTOR = 2  # failures back off by doubling even when sleep_factor is 1 (a steady poll)
POLL_WHILE_DEAF = 1.0  # seconds between polls while the LISTEN connection is down
EVERY_TYPE = "*"  # a wake-up for all types: poll the database
STOP = None
IDLE_SLEEP_BASE = timedelta(milliseconds=10)
IDLE_SLEEP_MAX_MULTIPLIER = 2**10
# what a handler's outcome meets when the job was called back or timed out meanwhile
MOVED_ON = (StaleCallback, JobAlreadyArchived, UnknownJob, JobNameMismatch)


def get_sleep_duration(sleep_factor: float, failed_attempts: int) -> timedelta:
    """How long an idle worker sleeps after `failed_attempts` empty claims in a row.

    10 ms x sleep_factor^failed_attempts, the multiplier capped at 2^10, jittered
    uniformly by x0.8-1.2 so that idle workers do not wake in step. A
    sleep_factor of 0 means no sleep.
    """
    if sleep_factor <= 0:
        return timedelta(0)
    if sleep_factor > 1 and failed_attempts * math.log(sleep_factor) >= math.log(IDLE_SLEEP_MAX_MULTIPLIER):
        multiplier = IDLE_SLEEP_MAX_MULTIPLIER
    else:
        multiplier = min(sleep_factor**failed_attempts, IDLE_SLEEP_MAX_MULTIPLIER)
    return IDLE_SLEEP_BASE * multiplier * random.uniform(0.8, 1.2)


class Worker:
    def __init__(self, config, stop: threading.Event | None = None, counted: ServiceMetrics | None = None):
        self.config = config
        self.stop_event = stop or threading.Event()
        self.metrics = counted or ServiceMetrics()
        self.pool = store.Pool(
            config.database_url, config.worker_pool_size, config.db_timeout, name="worker", prepared_statements=config.prepared_statements
        )
        self.timeout = timedelta(seconds=config.job_timeout)  # a type's own job_timeout, when set, is read in SQL
        self._shortest_timeout = config.job_timeout  # of the default and the types' (see _poll)
        self.downstream = Downstream(config.downstream_url, config.downstream_password, config.downstream_timeout, config.signing_secrets)
        self.http = HttpDelivery(self.pool, self.downstream, self.stop_event, self.metrics)
        self.default_handler, self.handlers = plugins.build_handlers(config, self.http)
        # an application's default handler may pace the safety poll (`sleep`, optional); else the built-in pacing
        self._poll_interval = getattr(self.default_handler, "sleep", None) or self._idle_interval
        self.dispatch = ThreadPoolExecutor(config.dispatch_threads, thread_name_prefix="dispatch")
        self._free = config.dispatch_threads  # dispatch threads not busy with a POST
        self._busy: dict[str, int] = {}  # job type -> its dispatch threads busy (or reserved by its claim)
        self._share = config.dispatch_threads  # most threads one type may hold (see _poll)
        self._free_lock = threading.Lock()
        self._starved: set[str] = set()  # types not claimed for want of a dispatch thread
        self._wakes: queue.SimpleQueue = queue.SimpleQueue()
        self._due_at: dict[str, float] = {}  # job type -> monotonic time it has (or will have) due jobs
        self._polls = 0  # the safety poll slows down with each one, to every ~10 s
        self._next_poll = 0.0
        self._next_stuck_check = 0.0
        self._deaf = True  # no LISTEN connection yet
        self._db_outage = OutageLog("worker database access", log)
        self._overdue_outage = OutageLog("failing overdue jobs", log)
        self._type_outages: dict[str, OutageLog] = {}  # job type -> its claims' current outage
        self._held_until: dict[str, float] = {}  # job type -> monotonic time its back-off ends
        self._limits: dict[str, tuple] = {}  # rate-limited type -> (per_second, burst) at the last poll
        self._tokens_at: dict[str, float] = {}  # rate-limited type -> monotonic time of its next token
        self._paused: set[str] = set()  # types of concurrency 0 at the last poll
        self._unsent: list[QueuedJob] = []  # claimed, never sent, the claim's commit unanswered

    # --- the loop ---

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Claim and dispatch until stopped; `ready` is called after the first round that reached the database."""
        listener = threading.Thread(target=self._listen, name="listen")
        listener.start()
        try:
            while not self.stop_event.is_set():
                self.run_once()
                if ready and not self._db_outage.failures:
                    ready()
                    ready = None
                self._wait()
        finally:
            self.stop_event.set()  # also when the loop died: the listener must end too
            self.dispatch.shutdown(wait=True)  # in-flight POSTs finish
            self._release_unsent_before_stopping()
            self.downstream.close()
            listener.join()
            self.pool.close()

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler): no new claims; in-flight POSTs finish."""
        self.stop_event.set()
        self._wakes.put(STOP)

    def run_once(self) -> int:
        """Poll, fail overdue jobs and claim what is due, as far as each is due now; how many jobs were claimed."""
        now = time.monotonic()
        try:
            if self._unsent:
                self._release_unsent()
            if now >= self._next_poll:
                self._poll(now)
            if now >= self._next_stuck_check:
                self._fail_overdue_jobs_alone(now)
            claimed = sum(self._claim_alone(name, now) for name in self._due_names(now))
            self._db_outage.recovered()
        except JobrunnerError as error:  # unreachable, or refusing: keep trying, slower and slower
            self._db_outage.failed(error)
            retry_at = now + self._backoff(min(self._db_outage.failures, 10))
            # Nothing is tried before then, not even a type that is due: a database that
            # refuses at once (a standby, a read-only setting) would otherwise be asked again at once.
            self._next_poll = retry_at
            self._next_stuck_check = max(self._next_stuck_check, retry_at)
            for name in self._due_at:
                self._held_until[name] = max(self._held_until.get(name, 0.0), retry_at)
            return 0
        return claimed

    def _poll(self, now: float) -> None:
        with self._connection() as conn:
            states = store.poll_job_types(conn)
            policies = store.job_type_policies(conn)
        self.http.policies = policies  # a new dict, swapped whole: a POST reads the old one or the new one
        self._shortest_timeout = min([self.config.job_timeout, *(p.job_timeout for p in policies.values() if p.job_timeout is not None)])
        # only these types' claims read their rate limit: the others' cost what they did before
        limits = {name: (policy.rate_per_second, policy.rate_burst) for name, policy in policies.items() if policy.rate_per_second}
        # a wait for a token under a limit that changed (10/s after 1/day) ends: the next claim says how long
        self._tokens_at = {name: at for name, at in self._tokens_at.items() if limits.get(name) == self._limits.get(name)}
        self._limits = limits
        self._due_at = {
            state.name: now + max(0.0, state.next_due_in)
            for state in states
            if state.next_due_in is not None and state.concurrency > 0
        }
        # a paused type's enqueues wake no claim; its resume changes the type, which polls again
        self._paused = {state.name for state in states if state.concurrency == 0}
        # One type alone may use every thread; with others to serve, at most half, so
        # that a type whose downstream hangs leaves the other half to the rest.
        serving = sum(1 for state in states if state.concurrency > 0)
        self._share = self.config.dispatch_threads if serving <= 1 else max(1, self.config.dispatch_threads // 2)
        self._polls += 1
        interval = self._poll_interval(self._polls)
        self._next_poll = now + (min(interval, POLL_WHILE_DEAF) if self._deaf else interval)

    def _due_names(self, now: float) -> list[str]:
        return [name for name in list(self._due_at) if self._due_time(name) <= now]

    def _due_time(self, name: str) -> float:
        """When the type is next to be claimed: when due, and not before its back-off ends or its next token.

        A notification makes a type due now, but never before its next token: a
        rate-limited type's enqueues and callbacks wake no claim that could take nothing.
        """
        return max(self._due_at[name], self._held_until.get(name, 0.0), self._tokens_at.get(name, 0.0))

    def _release_unsent(self) -> None:
        """Queue again the jobs of a claim whose commit got no answer: they were never sent."""
        with self._connection() as conn:
            released = services.release_unsent_jobs(conn, self._unsent)
        log.warning(
            "%d claimed jobs were never sent (the claim's commit got no answer); %d had been claimed and are queued again",
            len(self._unsent), len(released),
        )
        self._unsent = []

    def _release_unsent_before_stopping(self) -> None:
        """One last try (the stop cuts the wait for a connection short) for a claim whose commit got no answer."""
        if not self._unsent:
            return
        try:
            self._release_unsent()
        except JobrunnerError as error:
            ids = ", ".join(job.job_id for job in self._unsent)
            log.error("stopping with claimed jobs never sent, left in progress until the overdue check fails them (%s): %s", error, ids)

    def _fail_overdue_jobs_alone(self, now: float) -> None:
        """Fail overdue jobs; an error other than an outage is logged once and never stops the claims."""
        try:
            self._fail_overdue_jobs(now)
            self._overdue_outage.recovered()
        except DatabaseUnavailable:
            raise
        except Exception as error:  # its own outage: the claims go on
            self._overdue_outage.failed(error)
            self._next_stuck_check = now + self._backoff(min(self._overdue_outage.failures, 10))

    def _fail_overdue_jobs(self, now: float) -> None:
        # every tenth of the shortest job_timeout (the default's or a type's), at most every 10 s
        self._next_stuck_check = now + min(max(self._shortest_timeout / 10, 0.05), 10.0)
        with self._connection() as conn:
            failed = services.archive_stuck_jobs(conn, self.timeout)
        for job in failed:
            self.metrics.timed_out.inc(job.name)
            self.metrics.outcome(job)
        if failed:
            log.info("%d jobs not called back within their job_timeout (or heartbeat) counted as failed", len(failed))

    def _claim_alone(self, name: str, now: float) -> int:
        """Claim one type's due jobs; any error but an outage stays with this type (see `_type_failed`)."""
        try:
            claimed = self._claim(name, now)
        except DatabaseUnavailable:
            raise  # the database: every type's outage
        except Exception as error:  # this type's alone: the others are claimed all the same
            self._type_failed(name, now, error)
            return 0
        if name in self._type_outages:
            self._type_recovered(name)
        return claimed

    def _type_failed(self, name: str, now: float, error: Exception) -> None:
        """Log the first failure of the type's outage, count every one, back the type off, tell the dashboard."""
        outage = self._type_outages.setdefault(name, OutageLog(f"claiming {name!r} jobs", log))
        outage.failed(error)
        self.metrics.claim_errors.inc(name)
        self._held_until[name] = now + self._backoff(min(outage.failures, 10))
        try:
            with self._connection() as conn:
                store.record_type_error(conn, name, "claim", str(error))
        except JobrunnerError:
            pass  # the log has it; the dashboard learns at the next failure

    def _type_recovered(self, name: str) -> None:
        self._type_outages.pop(name).recovered()
        self._held_until.pop(name, None)
        try:
            with self._connection() as conn:
                store.clear_type_error(conn, name)
        except JobrunnerError:
            pass  # the watcher deletes a type error no worker refreshes

    def _claim(self, name: str, now: float) -> int:
        limit = self._take_threads(MAX_CLAIM, name)
        if limit == 0:
            self._due_at.pop(name, None)  # the next free dispatch thread wakes it (no spinning till then)
            return 0
        claimed = 0
        started = time.perf_counter()
        try:
            with self._connection() as conn:
                claim = services.claim(conn, name, limit, rate_limited=name in self._limits)
            claimed = len(claim.jobs)
        except store.ClaimOutcomeUnknown as error:
            self._unsent += error.jobs  # handed back once the database answers (run_once)
            raise
        finally:
            self._give_back_threads(name, limit - claimed)
        for job in claim.quarantined:
            log.error("job %s (%s) cannot be read (%s): archived as failed, never sent", format_job_id(job.id), job.name, job.reason)
            self.metrics.failed.inc(job.name)
        self.metrics.claim_latency.observe(time.perf_counter() - started, name)
        if claim.jobs:
            self.metrics.claimed.inc(name, amount=len(claim.jobs))
        if claim.expired:
            self.metrics.expired.inc(name, amount=len(claim.expired))
        if claim.rate_limited:
            self.metrics.rate_limited.inc(name)
        if claim.next_token_in is None:
            self._tokens_at.pop(name, None)
        else:
            self._tokens_at[name] = time.monotonic() + claim.next_token_in  # from the claim's end, not the round's start
        for job in claim.jobs:
            self.dispatch.submit(self._dispatch, job)
        if len(claim.jobs) == limit:
            self._due_at[name] = now  # there may be more
        elif claim.next_due_in is not None and claim.next_due_in > 0:
            self._due_at[name] = now + claim.next_due_in
        else:
            # nothing queued, or due jobs wait for a free slot: a callback will say when
            self._due_at.pop(name, None)
        return len(claim.jobs)

    def _dispatch(self, job: QueuedJob) -> None:
        try:
            self._record(job, self._attempt(job))
        except Exception:
            log.exception("job %s (%s): unexpected error", job.job_id, job.name)  # a bug: the executor would swallow it
        finally:
            self._give_back_threads(job.name, 1)

    def _attempt(self, job: QueuedJob) -> Outcome:
        """One attempt by the type's handler; raising, or returning what is not an outcome, is a failed attempt."""
        handler = self.handlers.get(job.name, self.default_handler)
        try:
            outcome = handler.do_work(job)
        except Exception:
            log.exception("job %s (%s): the worker raised; counted as a failed attempt, retried while attempts remain", job.job_id, job.name)
            return Failed(retryable=True)
        if outcome is None:
            return Accepted()  # it will be reported by other means, as an accepted POST is by its callback
        if not isinstance(outcome, OUTCOMES):
            log.error("job %s (%s): the worker returned %r, not Succeeded(), Failed() or None; counted as a failed attempt", job.job_id, job.name, outcome)
            return Failed(retryable=True)
        return outcome

    def _record(self, job: QueuedJob, outcome: Outcome) -> None:
        """Record the outcome (`services.record_outcome`), the one way for every handler.

        An outcome is a fact (it succeeded, it never arrived, it was answered with an
        error): when the database does not take it, it is tried again with back-off
        until the database answers, the job has moved on, or the worker stops. Lost,
        the job would wait for the overdue check, which cannot tell that it never arrived.
        """
        failures = 0
        while True:
            try:
                # no `stop` in the wait: stopping, the outcomes in hand are still recorded
                with self.pool.connection() as conn:
                    result = services.record_outcome(conn, job, outcome)
                break
            except MOVED_ON as error:
                log.info("job %s (%s): %s not recorded, the job moved on meanwhile: %s", job.job_id, job.name, outcome, error)
                return
            except DatabaseUnavailable as error:
                failures += 1
                if failures == 1:
                    log.warning("job %s (%s): could not record %s: %s; trying again until the database answers", job.job_id, job.name, outcome, error)
                if self.stop_event.wait(self._backoff(min(failures, 10))):
                    log.warning("job %s (%s): stopping before %s was recorded; the overdue check will settle the job", job.job_id, job.name, outcome)
                    return
            except JobrunnerError as error:
                # the job stays in progress: its callback, or the overdue check, settles it
                log.warning("job %s (%s): could not record the outcome: %s", job.job_id, job.name, error)
                return
        if failures:
            log.warning("job %s (%s): %s recorded after %d failed tries", job.job_id, job.name, outcome, failures)
        if result is not None:
            self.metrics.outcome(result)

    def _connection(self):
        """A pooled connection for the claim loop: a stop ends the wait for one (the database may be down)."""
        return self.pool.connection(stop=self.stop_event)

    def _backoff(self, failures: int) -> float:
        """Seconds to wait after `failures` failed tries: 10 ms doubling, up to ~10 s, whatever sleep_factor says."""
        return get_sleep_duration(FAILURE_BACKOFF_FACTOR, failures).total_seconds()

    def _idle_interval(self, polls: int) -> float:
        """Seconds between safety polls after `polls` of them: sleep_factor paces the idle poll."""
        return get_sleep_duration(self.config.sleep_factor, polls).total_seconds()

    def _take_threads(self, wanted: int, name: str) -> int:
        """Reserve up to `wanted` free threads for a claim of `name`, within the type's share."""
        with self._free_lock:
            busy = self._busy.get(name, 0)
            taken = max(0, min(wanted, self._free, self._share - busy))
            self._free -= taken
            self._busy[name] = busy + taken
            if not taken:
                self._starved.add(name)
            return taken

    def _give_back_threads(self, name: str, count: int) -> None:
        if not count:
            return
        with self._free_lock:
            self._free += count
            self._busy[name] -= count
            starved, self._starved = self._starved, set()
        for waiting in starved:
            self._wakes.put(waiting)

    # --- waking up ---

    def _wait(self) -> None:
        """Sleep until a notification, the next due job, the next poll or tick, or stop."""
        now = time.monotonic()
        deadline = min([self._next_poll, self._next_stuck_check, *map(self._due_time, self._due_at)])
        try:
            wake = self._wakes.get(timeout=max(0.0, deadline - now))
        except queue.Empty:
            return
        while True:
            self._note(wake)
            try:
                wake = self._wakes.get_nowait()
            except queue.Empty:
                return

    def _note(self, wake: str | None) -> None:
        if wake is STOP:
            return
        now = time.monotonic()
        if wake == EVERY_TYPE:
            self._next_poll = now
        elif wake not in self._paused:
            self._due_at[wake] = now

    def _listen(self) -> None:
        """Turn notifications into wake-ups; reconnect with back-off when the connection fails."""
        outage = OutageLog("LISTEN connection", log)
        listener = None
        while not self.stop_event.is_set():
            try:
                if listener is None:
                    listener = store.Listener(
                        self.config.listen_database_url or self.config.database_url,
                        name="worker-listen",
                        prepared_statements=self.config.prepared_statements,
                    )
                    self._deaf = False
                    self._wakes.put(EVERY_TYPE)  # anything missed while deaf
                    outage.recovered()
                for channel, payload in listener.wait(timeout=1.0):
                    self._wakes.put(EVERY_TYPE if channel == store.TYPES_CHANNEL else payload)
            except JobrunnerError as error:
                self._deaf = True
                outage.failed(error)
                if listener is not None:
                    listener.close()
                    listener = None
                self.stop_event.wait(self._backoff(min(outage.failures + 5, 10)))
        if listener is not None:
            listener.close()


def run(config, stop: threading.Event, ready: Callable[[], None] | None = None, counted: ServiceMetrics | None = None) -> None:
    """The worker process's body: run until `stop` is set; `ready` is called once it has reached the database."""
    worker = Worker(config, stop, counted)
    stopper = threading.Thread(target=lambda: (stop.wait(), worker.stop()), daemon=True)
    stopper.start()
    worker.run(ready)

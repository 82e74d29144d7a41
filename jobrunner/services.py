"""The job lifecycle rules: the only code that changes a job's state.

Mediation layer between the server, the workers and the watcher on one side and
the store on the other: everything that is not decoding a request, turning an
error into a response, or SQL belongs here. A timed-out job, a stuck job and a
failed callback all take the same path (`_fail`), so they obey the same rules.

`now` is for tests that pin the instant; production passes nothing and the
database clock decides.
"""

import base64
import dataclasses
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from . import store
from .downstream import Delivery, Downstream, error_kind
from .errors import (
    DatabaseUnavailable,
    InvalidField,
    JobAlreadyArchived,
    JobIdInUse,
    JobNameMismatch,
    JobrunnerError,
    NotCancellable,
    NotPaused,
    NotReplayable,
    StaleCallback,
    UnknownJob,
    UnknownJobType,
)
from .models import (
    ARCHIVED_STATUSES,
    AT_MOST_ONCE,
    CANCELLED,
    EXPIRED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    QUEUED_STATUSES,
    SUCCEEDED,
    ArchivedJob,
    JobType,
    QueuedJob,
    format_job_id,
    new_job_id,
    validate_attempts,
    validate_concurrency,
    validate_delivery_strategy,
    validate_job_type_name,
)
from .metrics import ServiceMetrics
from .store import Claim, Connection

# How long a dispatched job may wait for its callback before it counts as failed.
DEFAULT_TIMEOUT = timedelta(minutes=5)
# Base of the back-off between resends of a job the downstream answered 503 to.
UNAVAILABLE_SLEEP_FACTOR = timedelta(milliseconds=500)
# Retry back-off is 2^k seconds, capped (Rickover's overflowed past 2^33).
MAX_RETRY_DELAY = timedelta(days=1)

log = logging.getLogger(__name__)

IDLE_SLEEP_BASE = timedelta(milliseconds=10)
IDLE_SLEEP_MAX_MULTIPLIER = 2**10
STUCK_JOBS_BATCH = 100
MAX_PAGE = 500


# --- job types ---------------------------------------------------------------


def create_job_type(conn: Connection, name: Any, delivery_strategy: Any, attempts: Any, concurrency: Any) -> JobType:
    validate_job_type_name(name)
    validate_delivery_strategy(delivery_strategy)
    validate_attempts(attempts)
    validate_concurrency(concurrency)
    return store.create_job_type(conn, name, delivery_strategy, attempts, concurrency)


def get_job_type(conn: Connection, name: str) -> JobType:
    job_type = store.get_job_type(conn, name)
    if job_type is None:
        raise UnknownJobType(name)
    return job_type


def list_job_types(conn: Connection) -> list[JobType]:
    return store.list_job_types(conn)


def list_job_types_with_counts(conn: Connection, now: datetime | None = None) -> list[store.JobTypeCounts]:
    """Every job type with its queued, in-progress and due-now counts."""
    return store.list_job_types_with_counts(conn, now)


def update_job_type(conn: Connection, name: str, attempts: Any = None, concurrency: Any = None) -> JobType:
    """Change a type's attempts (for jobs enqueued from now on) and concurrency (from the next claim on)."""
    if attempts is None and concurrency is None:
        raise InvalidField("request", "give attempts, concurrency or both")
    if attempts is not None:
        validate_attempts(attempts)
    if concurrency is not None:
        validate_concurrency(concurrency)
    with store.transaction(conn):
        updated = store.update_job_type(conn, name, attempts, concurrency)
        if updated is None:
            raise UnknownJobType(name)
        if concurrency is not None:
            store.forget_concurrency(conn, name)  # set by hand: a later resume must not undo it
    return updated


def pause_job_type(conn: Connection, name: str) -> JobType:
    """Concurrency 0: nothing more is sent (jobs in flight finish); the old concurrency is kept for resume."""
    with store.transaction(conn):
        store.remember_concurrency(conn, name)
        paused = store.update_job_type(conn, name, None, 0)
        if paused is None:
            raise UnknownJobType(name)
    return paused


def resume_job_type(conn: Connection, name: str, concurrency: Any = None) -> JobType:
    """Give a paused type back its concurrency (or `concurrency`); a type that is not paused is left as it is."""
    if concurrency is not None:
        validate_concurrency(concurrency)
        if concurrency == 0:
            raise InvalidField("concurrency", "must be at least 1 to resume")
    with store.transaction(conn):
        job_type = get_job_type(conn, name)
        remembered = store.forget_concurrency(conn, name)
        concurrency = concurrency or remembered
        if concurrency is None:
            if job_type.concurrency == 0:
                raise NotPaused(name)
            return job_type
        return store.update_job_type(conn, name, None, concurrency)


@dataclasses.dataclass(frozen=True)
class Overview:
    """What the dashboard shows, read in one go."""

    now: datetime  # the database's
    types: list[store.JobTypeCounts]
    paused: dict[str, int]  # paused type -> the concurrency a resume gives back
    archived: dict[tuple[str, str], tuple[int, int]]  # (type, status) -> (last hour, last day)
    per_minute: list[tuple[datetime, str, int]]  # last hour, all types: (minute, status, jobs archived)
    recent_failures: list[ArchivedJob]  # failed and expired in the last day, newest first
    waiting: list[QueuedJob]  # queued and not yet sent (cancellable), soonest first
    type_errors: dict[str, store.JobTypeError]  # types whose claims fail right now (the others go on)


def overview(conn: Connection, limit: int = 20, now: datetime | None = None) -> Overview:
    """Read in one transaction, so that every part is counted up to the same now()."""
    hour: dict[tuple[str, str], int] = {}
    minutes: dict[tuple[datetime, str], int] = {}
    with store.transaction(conn):
        for name, minute, status, count in store.archived_per_minute(conn, now):
            hour[name, status] = hour.get((name, status), 0) + count
            minutes[minute, status] = minutes.get((minute, status), 0) + count
        day = {(name, status): count for name, status, count in store.archived_last_day(conn, now)}
        return Overview(
            now=store.database_now(conn, now),
            types=store.list_job_types_with_counts(conn, now),
            paused=store.paused_job_types(conn),
            archived={key: (hour.get(key, 0), count) for key, count in day.items()},
            per_minute=sorted((minute, status, count) for (minute, status), count in minutes.items()),
            recent_failures=store.recent_failures(conn, limit, now),
            waiting=store.waiting_jobs(conn, limit),
            type_errors=store.type_errors(conn),
        )


# --- jobs --------------------------------------------------------------------


def enqueue(
    conn: Connection,
    job_id: UUID,
    name: str,
    data: Any,
    run_after: datetime | None = None,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> QueuedJob:
    """Queue a job; idempotent: enqueueing a queued id again returns the stored job unchanged.

    `run_after` defaults to now. An `expires_at` in the past is accepted: the job is
    archived as expired when it comes due, and never sent.
    """
    _require_aware("run_after", run_after)
    _require_aware("expires_at", expires_at)
    job = store.enqueue_job(conn, job_id, name, data, run_after, expires_at, now)
    if job is not None:
        return job
    queued = store.get_queued_job(conn, job_id)
    if queued is not None:
        if queued.name != name:
            raise JobIdInUse(format_job_id(job_id), queued.name)
        return queued
    archived = store.get_archived_job(conn, job_id)
    if archived is not None:
        raise JobAlreadyArchived(format_job_id(job_id), archived.status)
    raise UnknownJobType(name)


class GroupCommit:
    """Runs one store function for the items of many threads at once: one transaction per batch.

    Under load the database then does one round trip and one commit per batch
    instead of one per item, which is what bounds the throughput of enqueues and
    callbacks. `submit` answers the function's result for its item, or None when
    the batch did not handle it (or the database refused the batch): the caller
    then does it alone, the slow way, which also says exactly why.
    """

    def __init__(self, pool: store.Pool, handle_batch: Callable[[Connection, list], list], name: str, max_batch: int = 200):
        self._pool = pool
        self._handle_batch = handle_batch
        self._max_batch = max_batch
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Any:
        request = _Request(item)
        self._requests.put(request)
        with request.done:  # released by the batch thread when the request is done
            pass
        if isinstance(request.error, DatabaseUnavailable):
            raise request.error
        return request.result

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            batch = [self._requests.get()]
            while len(batch) < self._max_batch and not self._requests.empty():
                batch.append(self._requests.get())
            stopping = None in batch
            batch = [request for request in batch if request is not None]
            if batch:
                self._handle(batch)
            if stopping:
                return

    def _handle(self, batch: list["_Request"]) -> None:
        try:
            # one transaction with the read-back: a row that cannot be decoded leaves the whole batch undone
            with self._pool.connection() as conn, store.transaction(conn):
                results = self._handle_batch(conn, [request.item for request in batch])
            for request, result in zip(batch, results):
                request.result = result
        except Exception as error:  # the callers go the slow way; none is left waiting
            if not isinstance(error, JobrunnerError):
                log.exception("%s: batch failed", self._thread.name)
            for request in batch:
                request.error = error
        finally:
            for request in batch:
                request.done.release()


def _acquired_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclasses.dataclass
class _Request:
    item: Any
    result: Any = None
    error: Exception | None = None
    # held until the request is done: a bare lock, because an Event's set() (a
    # Condition's notify in Python) was 15% of the server's CPU in a drain
    done: threading.Lock = dataclasses.field(default_factory=_acquired_lock)


class EnqueueBatcher:
    """`enqueue` for many threads at once, through a GroupCommit."""

    def __init__(self, pool: store.Pool):
        self._pool = pool
        self._group = GroupCommit(pool, store.enqueue_jobs, "enqueue-batcher")

    def enqueue(
        self, job_id: UUID, name: str, data: Any, run_after: datetime | None = None, expires_at: datetime | None = None
    ) -> QueuedJob:
        _require_aware("run_after", run_after)
        _require_aware("expires_at", expires_at)
        job = self._group.submit(store.NewJob(job_id, name, data, run_after, expires_at))
        if job is not None:
            return job
        with self._pool.connection() as conn:
            return enqueue(conn, job_id, name, data, run_after, expires_at)

    def close(self) -> None:
        self._group.close()


class CallbackBatcher:
    """`handle_status_callback` for many threads at once: `succeeded` callbacks share a transaction."""

    def __init__(self, pool: store.Pool):
        self._pool = pool
        self._group = GroupCommit(pool, store.archive_succeeded_jobs, "callback-batcher")

    def handle_status_callback(
        self, job_id: UUID, name: str, status: str, attempt: int, retryable: bool = True
    ) -> QueuedJob | ArchivedJob:
        if status == SUCCEEDED:
            archived = self._group.submit((job_id, name))
            if archived is not None:
                return archived
        with self._pool.connection() as conn:
            return handle_status_callback(conn, job_id, name, status, attempt, retryable)

    def close(self) -> None:
        self._group.close()


def get_job(conn: Connection, job_id: UUID, name: str | None = None) -> QueuedJob | ArchivedJob:
    """The queued job, else the archived one; `name`, when given, must be the job's type."""
    job = store.get_queued_job(conn, job_id) or store.get_archived_job(conn, job_id)
    if job is None:
        raise UnknownJob(format_job_id(job_id))
    if name is not None and job.name != name:
        raise JobNameMismatch(format_job_id(job_id), name, job.name)
    return job


def replay(
    conn: Connection, job_id: UUID, name: str | None = None, new_id: UUID | None = None, now: datetime | None = None
) -> QueuedJob | ArchivedJob:
    """Enqueue an archived job again, with its data and expires_at, under `new_id` (or a fresh id).

    With `new_id` a replay is idempotent, like an enqueue: replaying again with the
    same id answers the job the first replay made, queued or archived since, so
    a double click makes one job. An id held by any other job is JobIdInUse.
    """
    job = get_job(conn, job_id, name)
    if isinstance(job, QueuedJob):
        raise NotReplayable(job.job_id, job.status)
    if new_id is None:
        return store.enqueue_job(conn, new_job_id(), job.name, job.data, None, job.expires_at, now)
    if new_id == job.id:
        raise JobIdInUse(format_job_id(new_id), job.name)
    try:
        made = store.enqueue_job(conn, new_id, job.name, job.data, None, job.expires_at, now)
    except JobAlreadyArchived:  # archived while we inserted: read below
        made = None
    if made is not None:
        return made
    # ON CONFLICT waited for a concurrent replay's insert to commit: read what it made
    earlier = store.get_queued_job(conn, new_id) or store.get_archived_job(conn, new_id)
    if earlier is None:
        raise UnknownJobType(job.name)  # the type was deleted
    if (earlier.name, earlier.data, earlier.expires_at) != (job.name, job.data, job.expires_at):
        raise JobIdInUse(format_job_id(new_id), earlier.name)
    return earlier


def cancel(conn: Connection, job_id: UUID, name: str | None = None, now: datetime | None = None) -> ArchivedJob:
    """Archive a queued job that has not been sent as `cancelled`; it never reaches the downstream.

    A claim racing with this either skips the row (SKIP LOCKED) or wins, and then
    the job is in progress and can no longer be cancelled.
    """
    job = get_job(conn, job_id, name)
    if isinstance(job, QueuedJob):
        with store.transaction(conn):  # with the read-back, as a succeeded callback
            archived = store.archive_job(conn, job_id, job.name, CANCELLED, 0, expected_status=QUEUED, now=now)
        if archived is not None:
            return archived
        job = get_job(conn, job_id, name)
    if isinstance(job, QueuedJob):
        raise NotCancellable(job.job_id, job.status)
    raise JobAlreadyArchived(job.job_id, job.status)


def list_jobs(
    conn: Connection, name: str, status: str | None = None, limit: int = 50, cursor: str | None = None
) -> tuple[list[QueuedJob | ArchivedJob], str | None]:
    """A page of a type's queued and archived jobs, newest first, and the cursor of the next page (None at the end)."""
    get_job_type(conn, name)
    if status is not None and status not in QUEUED_STATUSES + ARCHIVED_STATUSES:
        raise InvalidField("status", f"must be one of {', '.join(QUEUED_STATUSES + ARCHIVED_STATUSES)}, not {status!r}")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidField("limit", f"must be from 1 to {MAX_PAGE}, not {limit}")
    after = None if cursor is None else _decode_cursor(cursor)
    jobs = store.list_jobs(conn, name, None if status is None else [status], limit, after)
    return jobs, (_encode_cursor(jobs[-1]) if len(jobs) == limit else None)


def _encode_cursor(job: QueuedJob | ArchivedJob) -> str:
    text = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, job_uuid = text.split("|")
        return datetime.fromisoformat(created_at), UUID(job_uuid)
    except ValueError:
        raise InvalidField("cursor", "is not a cursor this server handed out") from None


def claim(conn: Connection, name: str, limit: int, now: datetime | None = None) -> Claim:
    """Move up to `limit` due jobs of one type to in-progress, never past its concurrency.

    Jobs whose expires_at has passed are archived as expired instead.
    """
    return store.claim_jobs(conn, name, limit, now)


# --- outcomes ----------------------------------------------------------------


def handle_status_callback(
    conn: Connection,
    job_id: UUID,
    name: str,
    status: str,
    attempt: int,
    retryable: bool = True,
    now: datetime | None = None,
) -> QueuedJob | ArchivedJob:
    """Record a job's outcome: the archived job, or the queued job when it will be retried.

    `succeeded` archives whatever the attempt (Rickover's clients rely on it). A
    `failed` callback must name the attempt in progress; otherwise it is stale.
    """
    if status == SUCCEEDED:
        # one transaction with the read-back: a row that cannot be decoded leaves the job as it was
        with store.transaction(conn):
            archived = store.archive_job(conn, job_id, name, SUCCEEDED, attempts_used=0, now=now)
            if archived is None:
                raise _not_queued(conn, job_id, name)
            return archived
    if status != FAILED:
        raise InvalidField("status", f"must be {SUCCEEDED!r} or {FAILED!r}, not {status!r}")
    with store.transaction(conn):
        locked = store.lock_job(conn, job_id)
        if locked is None or locked.job.name != name:
            raise _not_queued(conn, job_id, name)
        return _fail(conn, locked, attempt, retryable, now)


def archive_stuck_jobs(conn: Connection, older_than: timedelta, now: datetime | None = None) -> list[QueuedJob | ArchivedJob]:
    """Fail every in-progress job not updated within `older_than`, as a failed retryable callback would.

    Returns what became of each job it failed. Jobs are locked first, so a real callback
    racing with this either waits and then finds the job moved on (stale), or
    wins and the job is no longer stuck. A job that cannot be failed is logged
    and skipped (its own savepoint), so it never holds up the others.
    """
    failed: list[QueuedJob | ArchivedJob] = []
    while True:
        with store.transaction(conn):
            stuck = store.lock_stuck_jobs(conn, older_than, STUCK_JOBS_BATCH, now)
            handled = [result for locked in stuck if (result := _fail_stuck(conn, locked, now)) is not None]
        failed += handled
        if len(stuck) < STUCK_JOBS_BATCH or not handled:
            return failed


def _fail_stuck(conn: Connection, locked: store.LockedJob, now: datetime | None) -> QueuedJob | ArchivedJob | None:
    try:
        with store.transaction(conn):
            return _fail(conn, locked, locked.job.attempts, retryable=True, now=now)
    except JobrunnerError as error:
        if isinstance(error, DatabaseUnavailable):
            raise
        log.error("could not fail stuck job %s: %s", locked.job.job_id, error)
        return None


def record_not_delivered(conn: Connection, job: QueuedJob, now: datetime | None = None) -> QueuedJob | ArchivedJob:
    """The downstream certainly never received this attempt (refused, unreachable, 503).

    Handled as a failed retryable callback, except that an `at_most_once` job is
    retried too while attempts remain: it never reached the downstream.
    """
    return _record_failed_post(conn, job, delivered=False, now=now)


def record_rejected(conn: Connection, job: QueuedJob, now: datetime | None = None) -> QueuedJob | ArchivedJob:
    """The downstream answered this attempt with an error (not a 503): handled as a failed retryable callback.

    An answer proves the request arrived, and it may have been acted on: an
    `at_most_once` job is archived failed, an `at_least_once` one retried with back-off.
    """
    return _record_failed_post(conn, job, delivered=True, now=now)


def _record_failed_post(conn: Connection, job: QueuedJob, delivered: bool, now: datetime | None) -> QueuedJob | ArchivedJob:
    with store.transaction(conn):
        locked = store.lock_job(conn, job.id)
        if locked is None or locked.job.name != job.name:
            raise _not_queued(conn, job.id, job.name)
        return _fail(conn, locked, job.attempts, retryable=True, now=now, delivered=delivered)


def is_in_progress(conn: Connection, job: QueuedJob) -> bool:
    """Whether `job` is still in progress at the attempt it was claimed for (not called back, nor timed out)."""
    current = store.get_queued_job(conn, job.id)
    return current is not None and current.status == IN_PROGRESS and current.attempts == job.attempts


def expire_in_progress(conn: Connection, job: QueuedJob, now: datetime | None = None) -> ArchivedJob | None:
    """Archive a claimed job as expired if its expires_at has passed (by the database's clock) before it was sent."""
    return store.archive_job(
        conn, job.id, job.name, EXPIRED, 0, expected_attempts=job.attempts, expected_status=IN_PROGRESS, only_if_expired=True, now=now
    )


def _fail(
    conn: Connection,
    locked: store.LockedJob,
    attempt: int,
    retryable: bool,
    now: datetime | None,
    delivered: bool = True,
) -> QueuedJob | ArchivedJob:
    """Retry or archive a failed attempt; the job is locked by the caller's transaction."""
    job = locked.job
    if job.status != IN_PROGRESS or job.attempts != attempt:
        raise StaleCallback(job.job_id, attempt, job.attempts, job.status)
    remaining = job.attempts - 1
    guard = {"expected_attempts": attempt, "now": now}
    if not retryable or remaining <= 0 or (delivered and locked.delivery_strategy == AT_MOST_ONCE):
        result = store.archive_job(conn, job.id, job.name, FAILED, 1, expected_status=IN_PROGRESS, **guard)
    else:
        result = store.retry_job(conn, job.id, delay=retry_delay(locked.total_attempts, remaining), **guard)
    if result is None:
        # The id was archived already (Rickover's two-statement archive could leave a job
        # both queued and archived): the queued copy is gone now, the first outcome stands.
        result = store.get_archived_job(conn, job.id)
        if result is None:
            raise StaleCallback(job.job_id, attempt, job.attempts, job.status)
    return result


def _not_queued(conn: Connection, job_id: UUID, name: str) -> JobrunnerError:
    """Why a callback found no queued job of that id and type."""
    try:
        job = get_job(conn, job_id, name)
    except (UnknownJob, JobNameMismatch) as error:
        return error
    return JobAlreadyArchived(job.job_id, job.status)


def _require_aware(field: str, value: datetime | None) -> None:
    if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
        raise InvalidField(field, "must be a timestamp with a time zone")


# --- the default worker: POST to the downstream ----------------------------------

UNAVAILABLE_RESENDS = 3


class JobProcessor:
    """The default Worker (plugins.Worker): POST each claimed job to the downstream; its callback, or the timeout, decides.

    `timeout` is how long a sent job may wait for its callback; `sleep_factor`
    how fast an idle worker's safety poll slows down (`get_sleep_duration`).
    """

    def __init__(
        self,
        pool: store.Pool,
        downstream: Downstream,
        stop: threading.Event,
        timeout: timedelta = DEFAULT_TIMEOUT,
        sleep_factor: float = 2.0,
        counted: ServiceMetrics | None = None,
    ):
        self.pool, self.downstream, self.stop = pool, downstream, stop
        self.timeout, self.sleep_factor = timeout, sleep_factor
        self.metrics = counted or ServiceMetrics()

    def do_work(self, job: QueuedJob) -> None:
        """Send one attempt and record what is certain; the callback (or the timeout) reports the outcome."""
        outcome, reason = self._post(job)
        for resend in range(UNAVAILABLE_RESENDS):
            # 503: the downstream is busy; try again soon without using an attempt
            if outcome is not Delivery.UNAVAILABLE:
                break
            if self.stop.wait(UNAVAILABLE_SLEEP_FACTOR.total_seconds() * 2**resend):
                break
            if not self._still_to_send(job):
                return
            outcome, reason = self._post(job)
        if outcome in (Delivery.NOT_DELIVERED, Delivery.UNAVAILABLE, Delivery.REJECTED):
            self._record_failed_post(job, outcome, reason)
        elif outcome is Delivery.MAYBE_DELIVERED:
            log.info("job %s (%s) may have been delivered (%s): waiting for its callback", job.job_id, job.name, reason)

    def _still_to_send(self, job: QueuedJob) -> bool:
        """Before a resend: the job is still in progress at this attempt, and not expired.

        A proxy may answer 503 while the downstream works on the job and calls back:
        once the job is archived or moved on, it is not sent again.
        """
        with self.pool.connection() as conn:
            if not is_in_progress(conn, job):
                log.info("job %s (%s) was settled while the downstream answered 503: not sent again", job.job_id, job.name)
                return False
            if job.expires_at is not None and job.expires_at <= datetime.now(timezone.utc):
                expired = expire_in_progress(conn, job)
                if expired is not None:
                    self.metrics.outcome(expired)
                    return False
        return True

    def _record_failed_post(self, job: QueuedJob, outcome: Delivery, reason: str) -> None:
        if outcome is Delivery.REJECTED:
            log.info("job %s (%s) rejected by the downstream: %s", job.job_id, job.name, reason)
            record = record_rejected
        else:
            log.info("job %s (%s) not delivered: %s", job.job_id, job.name, reason)
            record = record_not_delivered
        try:
            with self.pool.connection() as conn:
                self.metrics.outcome(record(conn, job))
        except (StaleCallback, JobAlreadyArchived, UnknownJob, JobNameMismatch):
            pass  # a callback came first after all

    def _post(self, job: QueuedJob) -> tuple[Delivery, str]:
        started = time.perf_counter()
        outcome, reason = self.downstream.post(job)
        self.metrics.downstream_latency.observe(time.perf_counter() - started, job.name)
        if outcome is Delivery.ACCEPTED:
            self.metrics.dispatched.inc(job.name)
        else:
            self.metrics.downstream_errors.inc(job.name, error_kind(outcome, reason))
        return outcome, reason

    def sleep(self, failed_attempts: int) -> float:
        """Seconds of idle back-off after `failed_attempts` empty polls (`get_sleep_duration`)."""
        return get_sleep_duration(self.sleep_factor, failed_attempts).total_seconds()


# --- timing ------------------------------------------------------------------


def retry_delay(total_attempts: int, remaining_attempts: int) -> timedelta:
    """2^(attempts used) seconds: 2 s after the first failure, then 4 s, 8 s, ... capped."""
    exponent = max(0, total_attempts - remaining_attempts)
    if exponent >= math.log2(MAX_RETRY_DELAY.total_seconds()):
        return MAX_RETRY_DELAY
    return timedelta(seconds=2**exponent)


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

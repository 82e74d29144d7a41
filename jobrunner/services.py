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
import hmac
import importlib
import logging
import math
import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from . import policies, store
from .errors import (
    CallbackForbidden,
    DatabaseUnavailable,
    InvalidField,
    JobAlreadyArchived,
    JobIdInUse,
    JobNameMismatch,
    JobrunnerError,
    NotCancellable,
    NotInProgress,
    NotPaused,
    NotReplayable,
    StaleCallback,
    UnknownJob,
    UnknownJobType,
)
from .models import (
    ARCHIVED_STATUSES,
    AT_MOST_ONCE,
    DEFAULT_POLICY,
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
    RetryPolicy,
    Schedule,
    format_job_id,
    new_job_id,
    validate_attempts,
    validate_concurrency,
    validate_data,
    validate_delivery_strategy,
    validate_job_type_name,
    validate_priority,
)
from .outcomes import (
    Accepted,
    ExpiredMeanwhile,
    Failed,
    MaybeDelivered,
    NotDelivered,
    Outcome,
    Rejected,
    SettledMeanwhile,
    Succeeded,
)
from .store import Claim, Connection

NO_RETRY_POLICY = RetryPolicy()

# How long a dispatched job may wait for its callback before it counts as failed.
DEFAULT_TIMEOUT = timedelta(minutes=5)
# Retry back-off is 2^k seconds, capped (Rickover's overflowed past 2^33).
MAX_RETRY_DELAY = timedelta(days=1)
# A type's own retry settings, when it sets only some (see backoff_bounds).
DEFAULT_MIN_BACKOFF = 2.0  # seconds: Rickover's first wait
DEFAULT_MAX_DOUBLINGS = 16  # Cloud Tasks' default
MAX_EXPONENT = 512  # 2^512 x any min_backoff passes any max_backoff, and stays a float

log = logging.getLogger(__name__)

# Rickover's services package held these too: they stay one import away from the
# seed's `services.X`, though they live with the HTTP delivery and the worker's pacing
# now. Loaded on first use, because those modules import this one.
_MOVED = {
    "JobProcessor": "delivery",
    "UNAVAILABLE_SLEEP_FACTOR": "delivery",
    "get_sleep_duration": "worker",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)


STUCK_JOBS_BATCH = 100
MAX_HEARTBEAT_EXTEND = timedelta(seconds=policies.MAX_JOB_TIMEOUT)  # a heartbeat asks for at most the longest job_timeout
MAX_PAGE = 500


# --- job types ---------------------------------------------------------------


def create_job_type(
    conn: Connection, name: Any, delivery_strategy: Any, attempts: Any, concurrency: Any, settings: Mapping[str, Any] | None = None
) -> JobType:
    """A new type; `settings` are its delivery settings (see policies), saved with it or not at all."""
    validate_job_type_name(name)
    validate_delivery_strategy(delivery_strategy)
    validate_attempts(attempts)
    validate_concurrency(concurrency)
    policy = policies.apply(DEFAULT_POLICY, settings or {})
    with store.transaction(conn):
        job_type = store.create_job_type(conn, name, delivery_strategy, attempts, concurrency)
        if policy != DEFAULT_POLICY:  # a type without settings has no row
            store.save_job_type_policy(conn, name, policy)
    return dataclasses.replace(job_type, policy=policy)


def get_job_type(conn: Connection, name: str) -> JobType:
    job_type = store.get_job_type(conn, name)
    if job_type is None:
        raise UnknownJobType(name)
    return _with_policy(conn, job_type)


def _with_policy(conn: Connection, job_type: JobType) -> JobType:
    return dataclasses.replace(job_type, policy=store.job_type_policy(conn, job_type.name))


def list_job_types(conn: Connection) -> list[JobType]:
    return store.list_job_types(conn)


def list_job_types_with_counts(conn: Connection, now: datetime | None = None) -> list[store.JobTypeCounts]:
    """Every job type, with its settings, and its queued, in-progress and due-now counts."""
    counts = store.list_job_types_with_counts(conn, now)
    found = store.job_type_policies(conn)
    return [dataclasses.replace(c, job_type=dataclasses.replace(c.job_type, policy=found.get(c.job_type.name, DEFAULT_POLICY))) for c in counts]


def update_job_type(
    conn: Connection, name: str, attempts: Any = None, concurrency: Any = None, settings: Mapping[str, Any] | None = None
) -> JobType:
    """Change a type's attempts (for jobs enqueued from now on), concurrency (from the next claim on)
    and delivery settings (a merge patch: see policies); all of it or nothing."""
    if attempts is None and concurrency is None and not settings:
        raise InvalidField("request", "give attempts, concurrency or both (or a delivery setting)")
    if attempts is not None:
        validate_attempts(attempts)
    if concurrency is not None:
        validate_concurrency(concurrency)
    with store.transaction(conn):
        # its row lock makes a concurrent change wait, then read what this one saved
        updated = store.update_job_type(conn, name, attempts, concurrency)
        if updated is None:
            raise UnknownJobType(name)
        if concurrency is not None:
            store.forget_concurrency(conn, name)  # set by hand: a later resume must not undo it
        policy = store.job_type_policy(conn, name)
        if settings:
            policy = policies.apply(policy, settings)
            store.save_job_type_policy(conn, name, policy)
    return dataclasses.replace(updated, policy=policy)


def pause_job_type(conn: Connection, name: str) -> JobType:
    """Concurrency 0: nothing more is sent (jobs in flight finish); the old concurrency is kept for resume."""
    with store.transaction(conn):
        store.remember_concurrency(conn, name)
        paused = store.update_job_type(conn, name, None, 0)
        if paused is None:
            raise UnknownJobType(name)
        return _with_policy(conn, paused)


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
        return _with_policy(conn, store.update_job_type(conn, name, None, concurrency))


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
    schedules: list[tuple[Schedule, str | None]]  # every schedule and the status of its last job
    backing_off: dict[str, int]  # type -> its jobs waiting out a retry's back-off
    rate_limited: set[str]  # types whose due jobs wait for a token of their rate limit


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
            types=list_job_types_with_counts(conn, now),
            paused=store.paused_job_types(conn),
            archived={key: (hour.get(key, 0), count) for key, count in day.items()},
            per_minute=sorted((minute, status, count) for (minute, status), count in minutes.items()),
            recent_failures=store.recent_failures(conn, limit, now),
            waiting=store.waiting_jobs(conn, limit),
            type_errors=store.type_errors(conn),
            schedules=store.list_schedules(conn),
            backing_off=store.backing_off_jobs(conn, now),
            rate_limited=store.rate_limited_types(conn, now),
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
    priority: int = 0,
) -> QueuedJob:
    """Queue a job; idempotent: enqueueing a queued id again returns the stored job unchanged.

    `run_after` defaults to now. An `expires_at` in the past is accepted: the job is
    archived as expired when it comes due, and never sent. Of a type's due jobs,
    those of a higher `priority` are claimed first.
    """
    validate_new_job(data, run_after, expires_at, priority)
    job = store.enqueue_job(conn, job_id, name, data, run_after, expires_at, now, priority)
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


def enqueue_many(conn: Connection, jobs: list[store.NewJob]) -> list[QueuedJob | None]:
    """Queue many jobs in one statement (the server's group commit, `batching`), their times checked by the caller.

    None for each job the batch did not insert (an id queued or archived already,
    an unknown type): `enqueue` it alone, which answers the stored job or says why.
    """
    return store.enqueue_jobs(conn, jobs)


def validate_new_job(data: Any, run_after: datetime | None, expires_at: datetime | None, priority: int = 0) -> None:
    """A new job's data must be readable back; its run_after and expires_at, when given, timestamps
    with a time zone; its priority a smallint."""
    validate_data(data)
    _require_aware("run_after", run_after)
    _require_aware("expires_at", expires_at)
    validate_priority(priority)


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
    """Enqueue an archived job again, with its data, expires_at and priority, under `new_id` (or a fresh id).

    With `new_id` a replay is idempotent, like an enqueue: replaying again with the
    same id answers the job the first replay made, queued or archived since, so
    a double click makes one job. An id held by any other job is JobIdInUse.
    """
    job = get_job(conn, job_id, name)
    if isinstance(job, QueuedJob):
        raise NotReplayable(job.job_id, job.status)
    if new_id is None:
        return store.enqueue_job(conn, new_job_id(), job.name, job.data, None, job.expires_at, now, job.priority)
    if new_id == job.id:
        raise JobIdInUse(format_job_id(new_id), job.name)
    try:
        made = store.enqueue_job(conn, new_id, job.name, job.data, None, job.expires_at, now, job.priority)
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


def claim(conn: Connection, name: str, limit: int, now: datetime | None = None, rate_limited: bool = False) -> Claim:
    """Move up to `limit` due jobs of one type to in-progress, never past its concurrency.

    Jobs whose expires_at has passed are archived as expired instead. With
    `rate_limited` (the type had a rate limit when the caller last looked), never
    past its rate limit either: without, a claim costs the same as before rate limits.
    """
    return store.claim_jobs(conn, name, limit, now, rate_limited)


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
        locked = store.lock_job(conn, job_id, now)
        if locked is None or locked.job.name != name:
            raise _not_queued(conn, job_id, name)
        return _fail(conn, locked, attempt, retryable, now)


def succeed_many(conn: Connection, callbacks: list[tuple[UUID, str, str | None]]) -> list[ArchivedJob | None]:
    """Archive many jobs `succeeded` in one statement (the server's group commit): (job id, type, token presented) each.

    None for each the batch did not archive (not queued, another type, a repeat,
    not the type's callback token): `check_callback_token` and
    `handle_status_callback` it alone, which say why.
    """
    tokens = store.callback_tokens(conn, {name for _, name, _ in callbacks})
    allowed = [_token_accepted(tokens.get(name), presented) for _, name, presented in callbacks]
    archived = iter(store.archive_succeeded_jobs(conn, [(job_id, name) for (job_id, name, _), ok in zip(callbacks, allowed) if ok]))
    return [next(archived) if ok else None for ok in allowed]


def check_callback_token(conn: Connection, name: str, presented: str | None) -> None:
    """Raise CallbackForbidden unless callbacks for `name` need no token or `presented` is its token.

    For the HTTP callbacks of downstreams (docs/security.md); a worker in this
    process records its outcomes without one.
    """
    if not _token_accepted(store.callback_tokens(conn, [name]).get(name), presented):
        raise CallbackForbidden(name)


def _token_accepted(expected: str | None, presented: str | None) -> bool:
    # constant time: how long a wrong token takes tells nothing of the right one
    return expected is None or hmac.compare_digest(expected.encode(), (presented or "").encode("utf-8", "replace"))


def heartbeat(
    conn: Connection,
    job_id: UUID,
    name: str,
    attempt: int,
    extend: float | None,
    default_timeout: timedelta,
    callback_token: str | None = None,
    now: datetime | None = None,
) -> tuple[QueuedJob, datetime]:
    """The downstream is still at work on `attempt`: its callback deadline becomes now + `extend` seconds.

    `extend` defaults to the type's job_timeout (else `default_timeout`); the
    overdue check and the watcher count from the new deadline. A type with a
    callback token needs it (`callback_token`: the one presented), as a
    callback does. A heartbeat for another attempt, or for a job queued or
    archived, changes nothing and says why. Returns the job (updated_at: now)
    and its deadline.
    """
    if extend is not None and not 0 < extend <= MAX_HEARTBEAT_EXTEND.total_seconds():
        raise InvalidField("extend", f"must be more than 0 and at most {MAX_HEARTBEAT_EXTEND.total_seconds():.0f} seconds, not {extend!r}")
    check_callback_token(conn, name, callback_token)
    beat = store.heartbeat(conn, job_id, name, attempt, None if extend is None else timedelta(seconds=extend), default_timeout, now)
    if beat is not None:
        return beat
    job = get_job(conn, job_id, name)  # unknown, or of another type
    if isinstance(job, ArchivedJob):
        raise JobAlreadyArchived(job.job_id, job.status)
    if job.status != IN_PROGRESS:
        raise NotInProgress(job.job_id)
    raise StaleCallback(job.job_id, attempt, job.attempts, job.status, "a heartbeat")


def archive_stuck_jobs(
    conn: Connection, older_than: timedelta, now: datetime | None = None, margin: timedelta = timedelta(0)
) -> list[QueuedJob | ArchivedJob]:
    """Fail every in-progress job past its deadline and `margin`, as a failed retryable callback would.

    The deadline is the last heartbeat's, else `older_than` after the claim (the
    type's own job_timeout instead, when it has one); `margin` is the watcher's
    lag behind the workers. Returns what became of each job it failed. Jobs are locked first, so a real callback
    racing with this either waits and then finds the job moved on (stale), or
    wins and the job is no longer stuck. A job that cannot be failed is logged
    and skipped (its own savepoint), so it never holds up the others.
    """
    failed: list[QueuedJob | ArchivedJob] = []
    while True:
        with store.transaction(conn):
            stuck = store.lock_stuck_jobs(conn, older_than, STUCK_JOBS_BATCH, now, margin)
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
        locked = store.lock_job(conn, job.id, now)
        if locked is None or locked.job.name != job.name:
            raise _not_queued(conn, job.id, job.name)
        return _fail(conn, locked, job.attempts, retryable=True, now=now, delivered=delivered)


def release_unsent_jobs(conn: Connection, jobs: list[QueuedJob]) -> list[UUID]:
    """Queue again claimed jobs never sent because the claim's COMMIT got no answer (store.ClaimOutcomeUnknown); no attempt used.

    The ids of those that had been claimed (the others' claim never committed).
    """
    return store.release_unsent_jobs(conn, jobs)


def record_outcome(conn: Connection, job: QueuedJob, outcome: Outcome, now: datetime | None = None) -> QueuedJob | ArchivedJob | None:
    """Record what one attempt of `job` came to: the job as it is now, or None when there is nothing to record.

    The one place where an attempt's outcome, from the HTTP delivery or an
    application's handler, becomes a change of the job's state; an application's
    `Succeeded`/`Failed` takes the path of an HTTP callback. Raises as those paths
    do (StaleCallback, JobAlreadyArchived...) when the job has moved on meanwhile.
    """
    if isinstance(outcome, Succeeded):
        return handle_status_callback(conn, job.id, job.name, SUCCEEDED, job.attempts, now=now)
    if isinstance(outcome, Failed):
        return handle_status_callback(conn, job.id, job.name, FAILED, job.attempts, outcome.retryable, now=now)
    if isinstance(outcome, NotDelivered):
        return record_not_delivered(conn, job, now)
    if isinstance(outcome, Rejected):
        return record_rejected(conn, job, now)
    if isinstance(outcome, ExpiredMeanwhile):
        # not yet expired by the database's clock (a moment behind the worker's): the 503s stand
        return expire_in_progress(conn, job, now) or record_not_delivered(conn, job, now)
    if isinstance(outcome, (Accepted, MaybeDelivered, SettledMeanwhile)):
        return None  # its callback, or the timeout, settles it (or has)
    raise TypeError(f"not an outcome: {outcome!r}")


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
    """Retry or archive a failed attempt; the job is locked by the caller's transaction.

    Archived `failed` when not retryable, out of attempts, an at_most_once job that
    may have arrived, or past its type's max_retry_duration since it was created.
    """
    job = locked.job
    if job.status != IN_PROGRESS or job.attempts != attempt:
        raise StaleCallback(job.job_id, attempt, job.attempts, job.status)
    remaining = job.attempts - 1
    guard = {"expected_attempts": attempt, "now": now}
    out_of_time = locked.retry.max_duration is not None and locked.now - job.created_at >= timedelta(seconds=locked.retry.max_duration)
    if not retryable or remaining <= 0 or out_of_time or (delivered and locked.delivery_strategy == AT_MOST_ONCE):
        result = store.archive_job(conn, job.id, job.name, FAILED, 1, expected_status=IN_PROGRESS, **guard)
    else:
        result = store.retry_job(conn, job.id, delay=retry_delay(locked.total_attempts, remaining, locked.retry), **guard)
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


# --- timing ------------------------------------------------------------------


def retry_delay(total_attempts: int, remaining_attempts: int, retry: RetryPolicy = NO_RETRY_POLICY) -> timedelta:
    """The wait before the next attempt, after `total_attempts - remaining_attempts` were used.

    A type that sets none of min_backoff, max_backoff, max_doublings keeps
    Rickover's 2^(attempts used) seconds: 2 s after the first failure, then 4 s,
    8 s, ... capped at a day. One that sets any waits a random time between
    `backoff_bounds` (full jitter: retries of many jobs failed at once spread out).
    """
    exponent = max(0, total_attempts - remaining_attempts)
    if (retry.min_backoff, retry.max_backoff, retry.max_doublings) != (None, None, None):
        return timedelta(seconds=random.uniform(*backoff_bounds(retry, max(1, exponent))))
    if exponent >= math.log2(MAX_RETRY_DELAY.total_seconds()):
        return MAX_RETRY_DELAY
    return timedelta(seconds=2**exponent)


def backoff_bounds(retry: RetryPolicy, attempts_used: int) -> tuple[float, float]:
    """Seconds (low, high) the wait after the `attempts_used`-th failed attempt (1, 2, ...) is drawn from.

        low  = min_backoff
        high = min(max_backoff, min_backoff * 2^min(attempts_used - 1, max_doublings)), at least low

    So the ceiling doubles from min_backoff after each failure, max_doublings times
    at most, and never passes max_backoff. Unset ones default to Rickover's first
    wait (2 s, or max_backoff if less), a day, and 16 doublings (Cloud Tasks').
    """
    high_cap = MAX_RETRY_DELAY.total_seconds() if retry.max_backoff is None else retry.max_backoff
    low = min(DEFAULT_MIN_BACKOFF, high_cap) if retry.min_backoff is None else retry.min_backoff
    doublings = DEFAULT_MAX_DOUBLINGS if retry.max_doublings is None else retry.max_doublings
    exponent = max(0, min(attempts_used - 1, doublings, MAX_EXPONENT))
    return low, max(low, min(high_cap, math.ldexp(low, exponent)))

"""handle_status_callback(): succeeded archives, failed retries with back-off or archives; stale ones change nothing."""

from datetime import datetime, timedelta, timezone

import pytest
from conftest import make_type, new_id
from freezegun import freeze_time

from jobrunner import batching, outcomes, services, store
from jobrunner.errors import InvalidField, JobAlreadyArchived, JobNameMismatch, StaleCallback, UnknownJob
from jobrunner.models import FAILED, IN_PROGRESS, QUEUED, SUCCEEDED, ArchivedJob, QueuedJob


def dispatch(conn, name="email", data=None, now=None):
    """Enqueue one job and claim it: it is then in progress, as after a POST to the downstream."""
    job = services.enqueue(conn, new_id(), name, data if data is not None else {"to": "a@example.com"}, now=now)
    [claimed] = services.claim(conn, name, limit=1, now=now).jobs
    assert claimed.id == job.id
    return claimed


def frozen_now():
    return datetime.now(timezone.utc)


def test_succeeded_archives_and_removes_the_queued_row_in_one_step(conn):
    make_type(conn)
    job = dispatch(conn, data={"k": [1, 2]})

    archived = services.handle_status_callback(conn, job.id, "email", "succeeded", 3)

    assert isinstance(archived, ArchivedJob)
    assert (archived.status, archived.attempts, archived.data, archived.name) == (SUCCEEDED, 3, {"k": [1, 2]}, "email")
    assert services.get_job(conn, job.id) == archived
    assert conn.execute("SELECT count(*) FROM queued_jobs").fetchone()[0] == 0


def test_succeeded_archives_whatever_its_attempt_even_a_never_dispatched_job(conn):
    # Rickover's clients rely on this: a success from any attempt ends the job, and it
    # is also how a queued job is cancelled.
    make_type(conn)
    queued = services.enqueue(conn, new_id(), "email", {})
    archived = services.handle_status_callback(conn, queued.id, "email", "succeeded", 0)
    assert archived.status == SUCCEEDED
    assert archived.attempts == 3  # what was stored, not the caller's number


def test_repeated_succeeded_callback_changes_nothing_and_says_so(conn):
    make_type(conn)
    job = dispatch(conn)
    first = services.handle_status_callback(conn, job.id, "email", "succeeded", 3)

    with pytest.raises(JobAlreadyArchived, match="already archived as succeeded"):
        services.handle_status_callback(conn, job.id, "email", "succeeded", 3)
    with pytest.raises(JobAlreadyArchived):
        services.handle_status_callback(conn, job.id, "email", "failed", 3)
    assert services.get_job(conn, job.id) == first


def test_failed_with_attempts_left_requeues_with_exponential_backoff(conn):
    make_type(conn, attempts=4)
    with freeze_time("2026-03-01 12:00:00", tz_offset=0) as clock:
        job = dispatch(conn, now=frozen_now())
        delays = []
        for attempt in (4, 3, 2):
            failed_at = frozen_now()
            retried = services.handle_status_callback(conn, job.id, "email", "failed", attempt, now=failed_at)
            assert isinstance(retried, QueuedJob)
            assert (retried.status, retried.attempts) == (QUEUED, attempt - 1)
            delays.append(retried.run_after - failed_at)
            # not due a moment before its run_after, due at it
            clock.tick(retried.run_after - failed_at - timedelta(milliseconds=1))
            assert services.claim(conn, "email", limit=1, now=frozen_now()).jobs == []
            clock.tick(timedelta(milliseconds=1))
            [job] = services.claim(conn, "email", limit=1, now=frozen_now()).jobs

    assert delays == [timedelta(seconds=2), timedelta(seconds=4), timedelta(seconds=8)]
    last = services.handle_status_callback(conn, job.id, "email", "failed", 1)
    assert isinstance(last, ArchivedJob)
    assert (last.status, last.attempts) == (FAILED, 0)


def test_failed_not_retryable_archives_at_once(conn):
    make_type(conn, attempts=5)
    job = dispatch(conn)
    archived = services.handle_status_callback(conn, job.id, "email", "failed", 5, retryable=False)
    assert (archived.status, archived.attempts) == (FAILED, 4)


def test_failed_at_most_once_job_is_archived_not_retried(conn):
    make_type(conn, "charge", strategy="at_most_once", attempts=1)
    job = dispatch(conn, "charge")
    archived = services.handle_status_callback(conn, job.id, "charge", "failed", 1)
    assert (archived.status, archived.attempts) == (FAILED, 0)


def test_failed_callback_for_another_attempt_is_stale_and_changes_nothing(conn):
    make_type(conn, attempts=3)
    job = dispatch(conn)
    services.handle_status_callback(conn, job.id, "email", "failed", 3)  # now queued with 2 left
    before = services.get_job(conn, job.id)

    with pytest.raises(StaleCallback, match="attempt 3 is stale"):
        services.handle_status_callback(conn, job.id, "email", "failed", 3)  # a duplicate of the first
    with pytest.raises(StaleCallback):
        services.handle_status_callback(conn, job.id, "email", "failed", 7)
    assert services.get_job(conn, job.id) == before


def test_failed_callback_for_a_job_not_in_progress_is_stale(conn):
    # Rickover requeued it, pulling a job scheduled for later forward to now + 2 s.
    make_type(conn)
    later = datetime(2030, 1, 1, tzinfo=timezone.utc)
    queued = services.enqueue(conn, new_id(), "email", {}, run_after=later)
    with pytest.raises(StaleCallback, match="is queued"):
        services.handle_status_callback(conn, queued.id, "email", "failed", 3)
    assert services.get_job(conn, queued.id).run_after == later


def test_callback_with_the_wrong_type_or_an_unknown_job_changes_nothing(conn):
    make_type(conn, "email")
    make_type(conn, "sms")
    job = dispatch(conn)
    for status in ("succeeded", "failed"):
        with pytest.raises(JobNameMismatch, match="'email', not 'sms'"):
            services.handle_status_callback(conn, job.id, "sms", status, 3)
        with pytest.raises(UnknownJob):
            services.handle_status_callback(conn, new_id(), "email", status, 3)
    assert services.get_job(conn, job.id).status == IN_PROGRESS


def test_unknown_status_is_refused(conn):
    make_type(conn)
    job = dispatch(conn)
    with pytest.raises(InvalidField, match="status"):
        services.handle_status_callback(conn, job.id, "email", "done", 3)


def test_retry_backoff_uses_the_types_total_attempts_and_is_capped():
    assert services.retry_delay(total_attempts=5, remaining_attempts=4) == timedelta(seconds=2)
    assert services.retry_delay(total_attempts=5, remaining_attempts=1) == timedelta(seconds=16)
    assert services.retry_delay(total_attempts=255, remaining_attempts=1) == services.MAX_RETRY_DELAY
    # attempts lowered below what a job still has: no negative exponent
    assert services.retry_delay(total_attempts=2, remaining_attempts=5) == timedelta(seconds=1)


# --- a row that cannot be read back: nothing is changed, so the error answered is true ---------

# Year 10000 in UTC: PostgreSQL stores it, Python cannot hold it (an old database, a manual UPDATE).
UNREADABLE_TIMESTAMP = "9999-12-31T23:59:59-01:00"


def make_unreadable(conn, job):
    conn.execute("UPDATE queued_jobs SET expires_at = %s WHERE id = %s", (UNREADABLE_TIMESTAMP, job.id))


def where_is(conn, job) -> tuple[int, int]:
    """(queued rows, archived rows) of the job, counted without reading its columns."""
    queued = conn.execute("SELECT count(*) FROM queued_jobs WHERE id = %s", (job.id,)).fetchone()[0]
    archived = conn.execute("SELECT count(*) FROM archived_jobs WHERE id = %s", (job.id,)).fetchone()[0]
    return queued, archived


def test_a_succeeded_callback_whose_archived_row_cannot_be_read_changes_nothing(conn):
    make_type(conn)
    job = dispatch(conn)
    make_unreadable(conn, job)

    with pytest.raises(InvalidField, match="too large"):
        services.handle_status_callback(conn, job.id, "email", "succeeded", 3)

    assert where_is(conn, job) == (1, 0)  # still in progress: the error answered is not a lie


def test_a_batch_of_succeeded_callbacks_with_a_row_that_cannot_be_read_changes_nothing(conn, db_url):
    make_type(conn)
    job = dispatch(conn)
    make_unreadable(conn, job)
    pool = store.Pool(db_url, 2, timeout=5)
    batcher = batching.CallbackBatcher(pool)
    try:
        with pytest.raises(InvalidField, match="too large"):
            batcher.handle_status_callback(job.id, "email", "succeeded", 3)
    finally:
        batcher.close()
        pool.close()
    assert where_is(conn, job) == (1, 0)


def test_a_cancel_whose_archived_row_cannot_be_read_changes_nothing(conn):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {})
    make_unreadable(conn, job)

    with pytest.raises(InvalidField, match="too large"):
        services.cancel(conn, job.id)

    assert where_is(conn, job) == (1, 0)


# --- record_outcome: every handler's outcome, recorded one way -------------------------

OUTCOME_CASES = [
    # (outcome, delivery strategy) -> (status after, attempts after)
    (outcomes.Succeeded(), "at_most_once", SUCCEEDED, 2),
    (outcomes.Failed(), "at_least_once", QUEUED, 1),
    (outcomes.Failed(retryable=False), "at_least_once", FAILED, 1),
    (outcomes.NotDelivered("refused"), "at_most_once", QUEUED, 1),  # it never arrived: at_most_once retried too
    (outcomes.Rejected("HTTP 500"), "at_most_once", FAILED, 1),  # it arrived: never again
    (outcomes.Rejected("HTTP 500"), "at_least_once", QUEUED, 1),
]


@pytest.mark.parametrize("outcome, strategy, status, attempts", OUTCOME_CASES, ids=[f"{c[0]!r}-{c[1]}" for c in OUTCOME_CASES])
def test_each_outcome_that_settles_an_attempt_is_recorded_by_its_rule(conn, outcome, strategy, status, attempts):
    make_type(conn, strategy=strategy, attempts=2)
    job = dispatch(conn)

    recorded = services.record_outcome(conn, job, outcome)

    assert (recorded.status, recorded.attempts) == (status, attempts)
    assert services.get_job(conn, job.id) == recorded


@pytest.mark.parametrize("outcome", [outcomes.Accepted(), outcomes.MaybeDelivered("TimeoutError"), outcomes.SettledMeanwhile()])
def test_an_outcome_that_waits_for_the_callback_changes_nothing(conn, outcome):
    make_type(conn, strategy="at_most_once", attempts=2)
    job = dispatch(conn)

    assert services.record_outcome(conn, job, outcome) is None
    assert services.get_job(conn, job.id) == job


def test_expired_meanwhile_archives_expired_or_if_not_yet_by_the_database_clock_counts_as_not_delivered(conn):
    make_type(conn, strategy="at_most_once", attempts=2)
    past, future = datetime.now(timezone.utc) - timedelta(minutes=1), datetime.now(timezone.utc) + timedelta(hours=1)
    expired = services.enqueue(conn, new_id(), "email", {}, expires_at=past + timedelta(seconds=1), now=past)
    [claimed] = services.claim(conn, "email", limit=1, now=past).jobs  # claimed before it expired
    assert claimed.id == expired.id
    assert services.record_outcome(conn, claimed, outcomes.ExpiredMeanwhile()).status == "expired"

    later = services.enqueue(conn, new_id(), "email", {}, expires_at=future)
    [claimed] = services.claim(conn, "email", limit=1).jobs
    assert claimed.id == later.id
    recorded = services.record_outcome(conn, claimed, outcomes.ExpiredMeanwhile())
    assert (recorded.status, recorded.attempts) == (QUEUED, 1)


def test_an_outcome_for_a_job_that_moved_on_is_refused_as_a_late_callback_is(conn):
    make_type(conn, attempts=2)
    job = dispatch(conn)
    services.handle_status_callback(conn, job.id, "email", "failed", job.attempts)

    with pytest.raises(StaleCallback):
        services.record_outcome(conn, job, outcomes.NotDelivered("refused"))
    services.handle_status_callback(conn, job.id, "email", "succeeded", 1)
    with pytest.raises(JobAlreadyArchived):
        services.record_outcome(conn, job, outcomes.Succeeded())

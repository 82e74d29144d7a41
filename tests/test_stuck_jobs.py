"""archive_stuck_jobs(): in-progress jobs not updated in time are failed like a retryable callback, never clobbering a real one."""

from datetime import datetime, timedelta, timezone

from conftest import enqueue_many, make_type, new_id
from freezegun import freeze_time

from jobrunner import services, store
from jobrunner.models import FAILED, IN_PROGRESS, QUEUED, SUCCEEDED

TIMEOUT = timedelta(minutes=5)


def now():
    return datetime.now(timezone.utc)


def test_only_jobs_in_progress_longer_than_the_timeout_are_failed(conn):
    make_type(conn, "email", attempts=3, concurrency=10)
    make_type(conn, "charge", strategy="at_most_once", attempts=1)
    with freeze_time("2026-06-01 08:00:00", tz_offset=0) as clock:
        services.enqueue(conn, new_id(), "email", {}, now=now())
        services.enqueue(conn, new_id(), "charge", {}, now=now())
        [stuck_email] = services.claim(conn, "email", limit=1, now=now()).jobs
        [stuck_charge] = services.claim(conn, "charge", limit=1, now=now()).jobs
        clock.tick(timedelta(minutes=3))
        [recent] = services.claim(conn, "email", limit=1, now=enqueue_and_now(conn)).jobs
        never_claimed = services.enqueue(conn, new_id(), "email", {}, run_after=now() - timedelta(hours=1))
        clock.tick(timedelta(minutes=2, seconds=1))

        assert len(services.archive_stuck_jobs(conn, TIMEOUT, now=now())) == 2

        retried = services.get_job(conn, stuck_email.id)
        assert (retried.status, retried.attempts, retried.run_after) == (QUEUED, 2, now() + timedelta(seconds=2))
        archived = services.get_job(conn, stuck_charge.id)
        assert (archived.status, archived.attempts) == (FAILED, 0)
        assert services.get_job(conn, recent.id).status == IN_PROGRESS
        assert services.get_job(conn, never_claimed.id).status == QUEUED
        assert len(services.archive_stuck_jobs(conn, TIMEOUT, now=now())) == 0


def enqueue_and_now(conn):
    services.enqueue(conn, new_id(), "email", {}, now=now())
    return now()


def test_more_stuck_jobs_than_one_batch_are_all_failed(conn):
    make_type(conn, concurrency=250)
    enqueue_many(conn, "email", 250)
    claimed_at = now()
    assert len(services.claim(conn, "email", limit=250, now=claimed_at).jobs) == 250

    assert len(services.archive_stuck_jobs(conn, TIMEOUT, now=claimed_at + TIMEOUT + timedelta(seconds=1))) == 250
    assert conn.execute("SELECT count(*) FROM queued_jobs WHERE status = 'queued' AND attempts = 2").fetchone()[0] == 250


def test_a_callback_in_flight_is_not_clobbered(conn, connect):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {})
    claimed_at = now()
    services.claim(conn, "email", limit=1, now=claimed_at)
    late = claimed_at + TIMEOUT * 2

    callback = connect()
    with callback.transaction():
        assert store.lock_job(callback, job.id) is not None  # the callback holds the job...
        assert len(services.archive_stuck_jobs(conn, TIMEOUT, now=late)) == 0  # ...so the watcher skips it
        services.handle_status_callback(callback, job.id, "email", "succeeded", 3)

    assert len(services.archive_stuck_jobs(conn, TIMEOUT, now=late)) == 0
    assert services.get_job(conn, job.id).status == SUCCEEDED


def test_a_late_callback_after_the_watcher_failed_the_job_is_stale(conn):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {})
    claimed_at = now()
    services.claim(conn, "email", limit=1, now=claimed_at)
    assert len(services.archive_stuck_jobs(conn, TIMEOUT, now=claimed_at + TIMEOUT * 2)) == 1

    try:
        services.handle_status_callback(conn, job.id, "email", "failed", 3)
    except services.StaleCallback:
        pass
    else:
        raise AssertionError("a failed callback for the timed-out attempt must be stale")
    assert services.get_job(conn, job.id).attempts == 2


def test_a_job_left_both_queued_and_archived_by_rickover_is_cleaned_up_without_holding_up_others(conn):
    make_type(conn, "charge", strategy="at_most_once", attempts=1, concurrency=5)
    jobs = [services.enqueue(conn, new_id(), "charge", {"n": n}) for n in range(2)]
    claimed_at = now()
    assert len(services.claim(conn, "charge", limit=5, now=claimed_at).jobs) == 2
    # what Rickover's insert-then-delete archive leaves when it dies between the two
    conn.execute(
        "INSERT INTO archived_jobs (id, name, attempts, status, data) VALUES (%s, 'charge', 1, 'succeeded', '{}')",
        (jobs[0].id,),
    )

    assert len(services.archive_stuck_jobs(conn, TIMEOUT, now=claimed_at + TIMEOUT * 2)) == 2

    assert conn.execute("SELECT count(*) FROM queued_jobs").fetchone()[0] == 0
    assert services.get_job(conn, jobs[0].id).status == SUCCEEDED  # the first outcome stands
    assert services.get_job(conn, jobs[1].id).status == FAILED

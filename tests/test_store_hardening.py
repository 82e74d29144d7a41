"""The store keeps what it promises when the data does not: an enqueue reads back what it stored, a type's
change of attempts leaves queued jobs' back-off alone, a claim whose commit is cut hands its jobs back."""

from datetime import datetime, timedelta, timezone

import pytest
from conftest import make_type, new_id, utcnow

from jobrunner import batching, services, store
from jobrunner.errors import InvalidField
from jobrunner.models import QUEUED
from jobrunner.watcher import Watcher

# Each a valid aware datetime in Python, stored by Postgres, and not readable back (outside years 1-9999 in UTC).
AFTER_YEAR_9999 = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1)))
BEFORE_YEAR_1 = datetime(1, 1, 1, 0, 0, 0, tzinfo=timezone(timedelta(hours=1)))


def stored_jobs(conn):
    return conn.execute("SELECT count(*) FROM queued_jobs").fetchone()[0]


@pytest.mark.parametrize(
    "field, fields",
    [
        ("expires_at", {"expires_at": AFTER_YEAR_9999}),
        ("run_after", {"run_after": BEFORE_YEAR_1}),
        ("run_after", {"run_after": AFTER_YEAR_9999}),
    ],
)
def test_an_enqueue_that_cannot_be_read_back_stores_nothing_and_names_the_field(conn, field, fields):
    make_type(conn)
    with pytest.raises(InvalidField) as raised:
        services.enqueue(conn, new_id(), "email", {}, **fields)
    assert raised.value.field == field
    assert stored_jobs(conn) == 0


def test_a_batch_enqueue_that_cannot_be_read_back_stores_nothing_and_each_job_learns_why(conn, db_url):
    make_type(conn)
    pool = store.Pool(db_url, 2, timeout=5)
    try:
        batch = [
            store.NewJob(new_id(), "email", {"n": 1}, None, None),
            store.NewJob(new_id(), "email", {"n": 2}, None, AFTER_YEAR_9999),
        ]
        with pytest.raises(InvalidField):
            with pool.connection() as batch_conn:
                store.enqueue_jobs(batch_conn, batch)
        assert stored_jobs(conn) == 0
        # the server's path: the batch fails, each job goes alone and learns which field
        batcher = batching.EnqueueBatcher(pool)
        try:
            with pytest.raises(InvalidField) as raised:
                batcher.enqueue(new_id(), "email", {}, expires_at=AFTER_YEAR_9999)
        finally:
            batcher.close()
        assert raised.value.field == "expires_at"
        assert stored_jobs(conn) == 0
    finally:
        pool.close()


# --- a type's attempts changed while jobs wait ------------------------------------------


def fail_once(conn, job, now):
    [claimed] = services.claim(conn, job.name, 1, now=now).jobs
    assert claimed.id == job.id
    return services.handle_status_callback(conn, job.id, job.name, "failed", claimed.attempts, now=now)


def test_raising_a_paused_types_attempts_keeps_the_back_off_of_its_queued_jobs(conn):
    make_type(conn, attempts=3)
    services.pause_job_type(conn, "email")
    waiting = services.enqueue(conn, new_id(), "email", {})
    services.update_job_type(conn, "email", attempts=20)
    services.resume_job_type(conn, "email")
    now = utcnow()

    retried = fail_once(conn, waiting, now)

    assert (retried.status, retried.attempts) == (QUEUED, 2)
    assert retried.run_after == now + timedelta(seconds=2)  # one attempt used: 2 s, not 2^18 s (capped at a day)
    # a job enqueued after the change counts from the new total
    later = services.enqueue(conn, new_id(), "email", {}, run_after=now - timedelta(seconds=1))
    assert fail_once(conn, later, now).run_after == now + timedelta(seconds=2)


def test_lowering_attempts_twice_keeps_the_total_each_job_was_enqueued_with(conn):
    make_type(conn, attempts=5, concurrency=10)
    now = utcnow()
    first = services.enqueue(conn, new_id(), "email", {}, run_after=now - timedelta(seconds=3))
    services.update_job_type(conn, "email", attempts=4)
    second = services.enqueue(conn, new_id(), "email", {}, run_after=now - timedelta(seconds=2))
    services.update_job_type(conn, "email", attempts=2)

    assert fail_once(conn, first, now).run_after == now + timedelta(seconds=2)
    # a microsecond later, so that the first is due before the second again (a tie's order is the ids')
    a_moment = timedelta(microseconds=1)
    assert fail_once(conn, second, now + a_moment).run_after == now + a_moment + timedelta(seconds=2)
    # the second failure of the first job: two of its five attempts used
    assert fail_once(conn, first, now + timedelta(seconds=2)).run_after == now + timedelta(seconds=2 + 4)


def test_a_stuck_job_is_retried_with_the_back_off_of_its_own_total(conn):
    make_type(conn, attempts=3)
    now = utcnow()
    job = services.enqueue(conn, new_id(), "email", {}, run_after=now - timedelta(seconds=1))
    services.claim(conn, "email", 1, now=now)
    services.update_job_type(conn, "email", attempts=30)
    later = now + timedelta(minutes=10)

    [retried] = services.archive_stuck_jobs(conn, timedelta(minutes=5), now=later)

    assert (retried.id, retried.run_after) == (job.id, later + timedelta(seconds=2))


def test_the_kept_totals_of_archived_jobs_are_deleted_by_the_watcher(conn, db_url):
    from jobrunner.config import load_config

    make_type(conn, attempts=3, concurrency=10)
    jobs = [services.enqueue(conn, new_id(), "email", {}) for _ in range(3)]
    services.update_job_type(conn, "email", attempts=5)
    assert conn.execute("SELECT count(*) FROM jobrunner_job_attempts").fetchone()[0] == 3
    for job in jobs[:2]:
        services.handle_status_callback(conn, job.id, "email", "succeeded", 3)
    pool = store.Pool(db_url, 1, timeout=5)
    try:
        Watcher(load_config({}), pool.connection).run_once()
    finally:
        pool.close()
    assert conn.execute("SELECT id FROM jobrunner_job_attempts").fetchall() == [(jobs[2].id,)]


def test_a_type_error_is_recorded_counted_across_workers_and_cleared(conn):
    make_type(conn)
    store.record_type_error(conn, "email", "claim", "first")
    store.record_type_error(conn, "email", "claim", "second")
    error = store.type_errors(conn)["email"]
    assert (error.stage, error.message, error.failures) == ("claim", "second", 2)
    assert error.since <= error.last_at
    assert store.delete_stale_type_errors(conn, timedelta(minutes=2)) == 0
    assert store.delete_stale_type_errors(conn, timedelta(minutes=2), now=utcnow() + timedelta(minutes=3)) == 1
    store.record_type_error(conn, "email", "claim", "again")
    store.clear_type_error(conn, "email")
    assert store.type_errors(conn) == {}

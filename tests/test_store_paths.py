"""One path per fact in the store (issue 19, item 3): one job is a batch of one, the archive
is entered by one statement, and "next due" is computed once, on the clock the caller gives."""

from datetime import datetime, timedelta, timezone

from conftest import make_type, new_id

from jobrunner import services, store
from jobrunner.models import EXPIRED, QUEUED, SUCCEEDED

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_a_batch_holding_a_job_with_null_data_is_enqueued_as_one_batch(conn):
    make_type(conn)
    jobs = [store.NewJob(new_id(), "email", None, None, None), store.NewJob(new_id(), "email", {"n": 1}, None, None)]

    inserted = store.enqueue_jobs(conn, jobs)

    assert [(job.id, job.data) for job in inserted] == [(jobs[0].id, None), (jobs[1].id, {"n": 1})]


def test_a_batch_enqueue_takes_the_callers_now(conn):
    make_type(conn)
    [job] = store.enqueue_jobs(conn, [store.NewJob(new_id(), "email", {}, None, None)], now=T0)

    assert (job.run_after, job.created_at, job.updated_at) == (T0, T0, T0)


def test_one_enqueue_and_a_batch_store_the_same_row(conn):
    make_type(conn)
    later = T0 + timedelta(hours=1)
    one = store.enqueue_job(conn, new_id(), "email", {"b": 1, "a": [2]}, later, later + timedelta(days=1), now=T0)
    [batched] = store.enqueue_jobs(conn, [store.NewJob(new_id(), "email", {"b": 1, "a": [2]}, later, later + timedelta(days=1))], now=T0)

    assert (one.run_after, one.expires_at, one.created_at, one.data) == (batched.run_after, batched.expires_at, batched.created_at, batched.data)
    assert one == services.get_job(conn, one.id) and batched == services.get_job(conn, batched.id)


def test_polling_the_types_takes_the_callers_now(conn):
    make_type(conn)
    services.enqueue(conn, new_id(), "email", {}, run_after=T0 + timedelta(seconds=30), now=T0)

    [state] = store.poll_job_types(conn, now=T0)

    assert state.next_due_in == 30.0
    assert services.claim(conn, "email", 5, now=T0).next_due_in == 30.0


def test_the_watcher_archives_an_expired_job_whose_data_it_cannot_read(conn):
    make_type(conn, concurrency=0)  # paused: no claim quarantines it first
    job = services.enqueue(conn, new_id(), "email", {}, expires_at=T0 - timedelta(seconds=1), now=T0 - timedelta(seconds=2))
    conn.execute("UPDATE queued_jobs SET data = (repeat('[', 5000) || repeat(']', 5000))::jsonb WHERE id = %s", [job.id])

    assert store.archive_expired_jobs(conn, 100, now=T0) == ["email"]

    assert conn.execute("SELECT status::text FROM archived_jobs WHERE id = %s", [job.id]).fetchone() == (EXPIRED,)


def test_a_batch_of_outcomes_answers_each_job_once_and_leaves_the_others(conn):
    make_type(conn)
    first, second = (services.enqueue(conn, new_id(), "email", {"n": n}) for n in range(2))
    unknown = new_id()

    archived = store.archive_jobs(conn, [(first.id, "email"), (first.id, "email"), (second.id, "sms"), (unknown, "email")], SUCCEEDED)

    assert [job and (job.id, job.status) for job in archived] == [(first.id, SUCCEEDED), None, None, None]
    assert services.get_job(conn, second.id).status == QUEUED

"""Enqueue (idempotent), get (queued, then archived) and replay."""

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from conftest import count_rows, enqueue_while_archiving, make_type, new_id, run_concurrently, utcnow, wait_until

from jobrunner import services
from jobrunner.errors import (
    InvalidField,
    JobAlreadyArchived,
    JobIdInUse,
    JobNameMismatch,
    NotReplayable,
    UnknownJob,
    UnknownJobType,
)
from jobrunner.models import EXPIRED, QUEUED, SUCCEEDED, ArchivedJob, QueuedJob


def test_enqueue_stores_the_job_with_the_types_attempts(conn):
    make_type(conn, attempts=4)
    job_id = new_id()
    run_after = datetime(2030, 5, 1, tzinfo=timezone.utc)
    expires_at = run_after + timedelta(days=1)

    job = services.enqueue(conn, job_id, "email", {"to": ["a", "b"], "n": 1.5}, run_after=run_after, expires_at=expires_at)

    assert isinstance(job, QueuedJob)
    assert (job.id, job.name, job.attempts, job.status) == (job_id, "email", 4, QUEUED)
    assert (job.run_after, job.expires_at, job.data) == (run_after, expires_at, {"to": ["a", "b"], "n": 1.5})
    assert job.job_id == f"job_{job_id}"
    assert services.get_job(conn, job_id) == job


def test_run_after_defaults_to_the_database_now(conn):
    make_type(conn)
    before = conn.execute("SELECT now()").fetchone()[0]
    job = services.enqueue(conn, new_id(), "email", None)
    assert job.run_after >= before
    assert job.data is None
    assert job.expires_at is None


@pytest.mark.parametrize("data", [None, 0, "text", [1, "two"], True, {"nested": {"deep": [None]}}])
def test_any_json_value_is_data(conn, data):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", data)
    stored = services.get_job(conn, job.id).data
    # compared as JSON text: in Python True == 1 and 0 == False
    assert (json.dumps(job.data), json.dumps(stored)) == (json.dumps(data), json.dumps(data))  # the answer and what was stored


def test_enqueue_is_idempotent_on_the_id(conn):
    make_type(conn)
    job_id = new_id()
    first = services.enqueue(conn, job_id, "email", {"v": 1})
    again = services.enqueue(conn, job_id, "email", {"v": 2}, run_after=utcnow() + timedelta(days=3))
    assert again == first
    assert count_rows(conn, "queued_jobs") == 1


def test_enqueue_refuses_unknown_type_archived_id_and_id_of_another_type(conn):
    make_type(conn, "email")
    make_type(conn, "sms")
    with pytest.raises(UnknownJobType, match="'nope'"):
        services.enqueue(conn, new_id(), "nope", {})

    job = services.enqueue(conn, new_id(), "email", {})
    with pytest.raises(JobIdInUse, match=r"already used by another job \(type 'email'\)"):
        services.enqueue(conn, job.id, "sms", {})

    services.handle_status_callback(conn, job.id, "email", "succeeded", 3)
    with pytest.raises(JobAlreadyArchived, match="already archived as succeeded"):
        services.enqueue(conn, job.id, "email", {})
    with pytest.raises(JobAlreadyArchived):
        services.enqueue(conn, job.id, "sms", {})


def test_bad_data_and_naive_times_are_refused_with_the_field_named(conn):
    make_type(conn)
    with pytest.raises(InvalidField, match="Invalid data"):
        services.enqueue(conn, new_id(), "email", {"nul": "a\u0000b"})
    with pytest.raises(InvalidField, match="Invalid data: is not JSON"):
        services.enqueue(conn, new_id(), "email", {"when": datetime.now()})
    with pytest.raises(InvalidField, match="Invalid data: is not JSON"):
        services.enqueue(conn, new_id(), "email", float("nan"))
    with pytest.raises(InvalidField, match="run_after"):
        services.enqueue(conn, new_id(), "email", {}, run_after=datetime(2030, 1, 1))
    with pytest.raises(InvalidField, match="expires_at"):
        services.enqueue(conn, new_id(), "email", {}, expires_at="tomorrow")
    assert count_rows(conn, "queued_jobs") == 0


def test_a_job_enqueued_already_expired_is_accepted_and_archived_expired_when_due(conn):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {}, expires_at=utcnow() - timedelta(hours=1))
    assert job.status == QUEUED
    claim = services.claim(conn, "email", limit=5)
    assert (claim.jobs, [j.id for j in claim.expired]) == ([], [job.id])
    assert services.get_job(conn, job.id).status == EXPIRED


def test_get_checks_the_type_name_for_queued_and_archived_jobs(conn):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {})
    assert services.get_job(conn, job.id, "email") == job
    with pytest.raises(JobNameMismatch):
        services.get_job(conn, job.id, "sms")
    services.handle_status_callback(conn, job.id, "email", "succeeded", 3)
    assert isinstance(services.get_job(conn, job.id, "email"), ArchivedJob)
    with pytest.raises(JobNameMismatch):
        services.get_job(conn, job.id, "sms")
    with pytest.raises(UnknownJob, match="job_"):
        services.get_job(conn, new_id())


def test_replay_enqueues_an_archived_job_under_a_new_id(conn):
    make_type(conn, attempts=2)
    expires_at = utcnow() + timedelta(hours=2)
    job = services.enqueue(conn, new_id(), "email", {"x": 1}, expires_at=expires_at)
    [claimed] = services.claim(conn, "email", limit=1).jobs
    services.handle_status_callback(conn, claimed.id, "email", "failed", 2, retryable=False)

    replayed = services.replay(conn, job.id, "email")

    assert replayed.id != job.id
    assert (replayed.name, replayed.data, replayed.expires_at, replayed.attempts, replayed.status) == ("email", {"x": 1}, expires_at, 2, QUEUED)
    assert services.get_job(conn, job.id).status == "failed"  # the original is unchanged


def test_a_jobs_priority_stays_through_a_retry_into_the_archive_and_a_replay(conn):
    make_type(conn, attempts=2)
    job = services.enqueue(conn, new_id(), "email", {"x": 1}, priority=-7)
    [claimed] = services.claim(conn, "email", limit=1).jobs
    retried = services.handle_status_callback(conn, claimed.id, "email", "failed", 2)
    conn.execute("UPDATE queued_jobs SET run_after = now()")  # due again without waiting out the back-off
    [claimed] = services.claim(conn, "email", limit=1).jobs
    archived = services.handle_status_callback(conn, claimed.id, "email", "failed", 1)

    replayed = services.replay(conn, job.id, "email")
    chosen = services.replay(conn, job.id, "email", new_id=new_id())

    assert [job.priority, retried.priority, claimed.priority, archived.priority] == [-7] * 4
    assert (archived.status, services.get_job(conn, job.id).priority) == ("failed", -7)
    assert [replayed.priority, chosen.priority, services.get_job(conn, replayed.id).priority] == [-7] * 3


@pytest.mark.parametrize("priority", [True, 1.5, "1", 32768, -32769, None])
def test_a_priority_that_is_not_a_smallint_is_refused_naming_it(conn, priority):
    make_type(conn)
    with pytest.raises(InvalidField, match="priority"):
        services.enqueue(conn, new_id(), "email", {}, priority=priority)
    assert count_rows(conn, "queued_jobs") == 0


def test_replaying_an_expired_job_archives_the_new_one_as_expired(conn):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {}, expires_at=utcnow() - timedelta(seconds=1))
    services.claim(conn, "email", limit=1)
    replayed = services.replay(conn, job.id)
    claim = services.claim(conn, "email", limit=1)
    assert [j.id for j in claim.expired] == [replayed.id]


def test_only_archived_jobs_can_be_replayed(conn):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {})
    with pytest.raises(NotReplayable, match="still queued"):
        services.replay(conn, job.id)
    services.claim(conn, "email", limit=1)
    with pytest.raises(NotReplayable, match="still in-progress"):
        services.replay(conn, job.id)
    services.handle_status_callback(conn, job.id, "email", "succeeded", 3)
    assert services.replay(conn, job.id).status == QUEUED
    with pytest.raises(JobNameMismatch):
        services.replay(conn, job.id, "sms")
    with pytest.raises(UnknownJob):
        services.replay(conn, new_id())
    assert services.get_job(conn, job.id).status == SUCCEEDED


def test_enqueue_racing_the_archive_of_the_same_id_never_leaves_it_both_queued_and_archived(conn, connect):
    """A client re-sends its PUT while a succeeded callback is archiving the job."""
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {})
    client = connect()

    outcome = enqueue_while_archiving(conn, connect, job, lambda: services.enqueue(client, job.id, "email", {}))

    assert isinstance(outcome, JobAlreadyArchived), outcome
    assert count_rows(conn, "queued_jobs") == 0
    assert services.get_job(conn, job.id).status == SUCCEEDED


# --- replay with a client-chosen id: a double click makes one job ------------------


def archived_job(conn, data=None):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", data if data is not None else {"x": 1})
    return services.cancel(conn, job.id)


def test_a_replay_with_a_new_id_given_twice_makes_one_job_and_answers_it_both_times(conn):
    job = archived_job(conn)
    chosen = new_id()

    first = services.replay(conn, job.id, "email", new_id=chosen)
    again = services.replay(conn, job.id, "email", new_id=chosen)

    assert first.id == chosen and (first.name, first.data, first.status) == ("email", {"x": 1}, QUEUED)
    assert again == first
    assert count_rows(conn, "queued_jobs") == 1


def test_a_replay_repeated_after_its_job_was_archived_answers_the_archived_job(conn):
    job = archived_job(conn)
    chosen = new_id()
    services.replay(conn, job.id, new_id=chosen)
    services.handle_status_callback(conn, chosen, "email", "succeeded", 3)

    again = services.replay(conn, job.id, new_id=chosen)

    assert (again.id, again.status) == (chosen, SUCCEEDED)
    assert count_rows(conn, "queued_jobs") == 0


def test_a_replay_to_an_id_another_job_holds_is_refused_and_changes_nothing(conn):
    job = archived_job(conn)
    make_type(conn, "sms")
    other_data = services.enqueue(conn, new_id(), "email", {"x": 2})
    other_type = services.enqueue(conn, new_id(), "sms", {"x": 1})
    other_archived = services.cancel(conn, services.enqueue(conn, new_id(), "email", {"x": 3}).id)

    for taken in (other_data.id, other_type.id, other_archived.id, job.id):
        with pytest.raises(JobIdInUse):
            services.replay(conn, job.id, new_id=taken)
    assert count_rows(conn, "queued_jobs") == 2


def test_two_replays_racing_with_one_new_id_make_one_job(conn, connect):
    """A double click on Replay: the second waits for the first's insert, then answers the same job."""
    job = archived_job(conn)
    chosen = new_id()
    first, second = connect(), connect()

    with ThreadPoolExecutor(1) as thread, first.transaction():
        made = services.replay(first, job.id, new_id=chosen)
        answer = thread.submit(services.replay, second, job.id, new_id=chosen)
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        wait_until(lambda: conn.execute(waiting).fetchone()[0] > 0, "the second replay to wait on the first")

    assert answer.result(timeout=10) == made  # raises the second replay's error, if any
    assert count_rows(conn, "queued_jobs") == 1


def test_replays_in_many_threads_with_one_new_id_make_one_job(conn, connect):
    job = archived_job(conn)
    chosen = new_id()
    connections = [connect() for _ in range(4)]

    answers = run_concurrently([lambda c=connection: services.replay(c, job.id, new_id=chosen).id for connection in connections])

    assert answers == [chosen] * len(connections)
    assert count_rows(conn, "queued_jobs") == 1

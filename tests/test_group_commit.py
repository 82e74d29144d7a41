"""Group commit (the HTTP server's path): one transaction for many concurrent PUTs or callbacks, same answers as alone."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from conftest import count_rows, enqueue_while_archiving, make_type, new_id, run_concurrently

from jobrunner import batching, services, store
from jobrunner.errors import InvalidField, JobAlreadyArchived, JobIdInUse, UnknownJob, UnknownJobType
from jobrunner.models import SUCCEEDED, ArchivedJob


def answer_or_error(call):
    """What `call` returns, or the error it raised: an error is an answer under test here."""
    try:
        return call()
    except Exception as error:  # the outcome under test
        return error


@pytest.fixture
def pool(db_url):
    connection_pool = store.Pool(db_url, 4, timeout=5)
    yield connection_pool
    connection_pool.close()


@pytest.fixture
def batcher(pool):
    enqueuer = batching.EnqueueBatcher(pool)
    yield enqueuer
    enqueuer.close()


def test_one_batch_inserts_many_jobs_and_skips_a_repeated_id(conn):
    make_type(conn, attempts=4)
    repeated = new_id()
    later = datetime(2031, 1, 1, tzinfo=timezone.utc)
    jobs = [store.NewJob(new_id(), "email", {"n": n}, None, None) for n in range(5)]
    jobs += [store.NewJob(repeated, "email", {"first": True}, later, later + timedelta(days=1)),
             store.NewJob(repeated, "email", {"second": True}, None, None)]

    inserted = store.enqueue_jobs(conn, jobs)

    assert [job.id for job in inserted[:6]] == [job.id for job in jobs[:6]]
    assert inserted[6] is None  # the repeat: enqueued alone later, it gets the stored job
    assert inserted[5].data == {"first": True}
    assert (inserted[5].run_after, inserted[5].attempts) == (later, 4)
    assert count_rows(conn, "queued_jobs") == 6
    assert services.get_job(conn, repeated) == inserted[5]


def test_jobs_of_unknown_types_and_archived_ids_are_left_out_of_a_batch(conn):
    make_type(conn)
    archived = services.enqueue(conn, new_id(), "email", {})
    services.handle_status_callback(conn, archived.id, "email", "succeeded", 3)
    fresh = new_id()
    jobs = [store.NewJob(archived.id, "email", {}, None, None), store.NewJob(new_id(), "nope", {}, None, None),
            store.NewJob(fresh, "email", {}, None, None)]
    assert [job and job.id for job in store.enqueue_jobs(conn, jobs)] == [None, None, fresh]


def test_concurrent_enqueues_each_get_their_own_answer(conn, batcher):
    make_type(conn, "email")
    make_type(conn, "sms")
    taken = services.enqueue(conn, new_id(), "sms", {})
    cases = {new_id(): ("email", {"ok": n}) for n in range(30)}
    cases[new_id()] = ("email", {"bad": "nul\u0000"})
    cases[new_id()] = ("nope", {})
    cases[taken.id] = ("email", {})
    answers = run_concurrently([
        lambda job_id=job_id, case=case: answer_or_error(lambda: batcher.enqueue(job_id, *case)) for job_id, case in cases.items()
    ])
    outcomes = dict(zip(cases, answers))

    kinds = {job_id: type(outcome).__name__ for job_id, outcome in outcomes.items()}
    assert list(kinds.values()).count("QueuedJob") == 30
    assert {kinds[job_id] for job_id, (name, data) in cases.items() if "bad" in data} == {InvalidField.__name__}
    assert {kinds[job_id] for job_id, (name, _) in cases.items() if name == "nope"} == {UnknownJobType.__name__}
    assert kinds[taken.id] == JobIdInUse.__name__
    for job_id, (name, data) in cases.items():
        if kinds[job_id] == "QueuedJob":
            assert (outcomes[job_id].name, outcomes[job_id].data) == (name, data)
    assert count_rows(conn, "queued_jobs") == 31


def test_a_batch_racing_the_archive_of_the_same_id_is_undone(conn, connect, batcher):
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {})

    outcome = enqueue_while_archiving(conn, connect, job, lambda: batcher.enqueue(job.id, "email", {}))

    assert isinstance(outcome, JobAlreadyArchived), outcome
    assert count_rows(conn, "queued_jobs") == 0
    assert services.get_job(conn, job.id).status == SUCCEEDED


def test_naive_timestamps_are_refused_before_batching(batcher):
    with pytest.raises(InvalidField, match="run_after"):
        batcher.enqueue(uuid.uuid4(), "email", {}, run_after=datetime(2030, 1, 1))


@pytest.fixture
def callbacks(pool):
    batcher = batching.CallbackBatcher(pool)
    yield batcher
    batcher.close()


def test_one_batch_archives_succeeded_jobs_and_answers_each_in_order(conn):
    make_type(conn, "email")
    make_type(conn, "sms")
    jobs = [services.enqueue(conn, new_id(), "email", {"n": n}) for n in range(4)]
    items = [(job.id, "email") for job in jobs] + [(jobs[0].id, "email"), (jobs[1].id, "sms"), (new_id(), "email")]

    archived = store.archive_succeeded_jobs(conn, items)

    assert [a and (a.id, a.status, a.data) for a in archived[:4]] == [(j.id, SUCCEEDED, j.data) for j in jobs]
    assert archived[4:] == [None, None, None]  # a repeat, another type's name, an unknown job
    assert count_rows(conn, "queued_jobs") == 0


def test_concurrent_callbacks_each_get_their_own_answer(conn, callbacks):
    make_type(conn, concurrency=100)
    jobs = [services.enqueue(conn, new_id(), "email", {}) for _ in range(40)]
    claimed = services.claim(conn, "email", limit=100).jobs
    assert len(claimed) == 40
    cases = [(job.id, "succeeded") for job in jobs[:30]] + [(job.id, "failed") for job in jobs[30:]]
    cases += [(jobs[0].id, "succeeded"), (new_id(), "succeeded")]
    outcomes = run_concurrently([
        lambda job_id=job_id, status=status: answer_or_error(lambda: callbacks.handle_status_callback(job_id, "email", status, 3))
        for job_id, status in cases
    ])

    # the threads start together: either of the two callbacks for jobs[0] go first: one archives it, the other is told so
    first, repeat = sorted([outcomes[0], outcomes[40]], key=lambda outcome: isinstance(outcome, JobAlreadyArchived))
    assert isinstance(first, ArchivedJob) and first.status == SUCCEEDED
    assert isinstance(repeat, JobAlreadyArchived) and repeat.status == SUCCEEDED
    assert all(isinstance(o, ArchivedJob) and o.status == SUCCEEDED for o in outcomes[1:30])
    assert [(o.status, o.attempts) for o in outcomes[30:40]] == [("queued", 2)] * 10
    assert isinstance(outcomes[41], UnknownJob)
    assert count_rows(conn, "archived_jobs", "succeeded") == 30

"""claim(): due jobs move to in-progress, oldest first, never past the type's concurrency."""

import random
import threading
from datetime import timedelta

from conftest import enqueue_many, make_type, new_id, utcnow

from jobrunner import services
from jobrunner.models import EXPIRED, IN_PROGRESS, QUEUED


def test_claim_moves_due_jobs_to_in_progress_oldest_first(conn):
    make_type(conn, concurrency=10)
    now = utcnow()
    queued = [services.enqueue(conn, new_id(), "email", {"n": n}, run_after=now - timedelta(seconds=10 - n)) for n in range(4)]

    claim = services.claim(conn, "email", limit=3, now=now)

    assert [job.id for job in claim.jobs] == [job.id for job in queued[:3]]
    assert all(job.status == IN_PROGRESS and job.updated_at == now for job in claim.jobs)
    assert claim.expired == []
    assert services.get_job(conn, queued[3].id).status == QUEUED


def test_claim_never_takes_a_job_before_its_run_after(conn):
    make_type(conn)
    now = utcnow()
    later = services.enqueue(conn, new_id(), "email", {}, run_after=now + timedelta(seconds=30))

    assert services.claim(conn, "email", limit=5, now=now).jobs == []
    assert [job.id for job in services.claim(conn, "email", limit=5, now=now + timedelta(seconds=30)).jobs] == [later.id]


def test_claim_never_exceeds_concurrency_and_frees_slots_as_jobs_finish(conn):
    make_type(conn, concurrency=2)
    enqueue_many(conn, "email", 5)

    first = services.claim(conn, "email", limit=10)
    assert len(first.jobs) == 2
    assert services.claim(conn, "email", limit=10).jobs == []

    services.handle_status_callback(conn, first.jobs[0].id, "email", "succeeded", first.jobs[0].attempts)
    assert len(services.claim(conn, "email", limit=10).jobs) == 1


def test_concurrency_zero_pauses_a_type_and_raising_it_resumes_without_restart(conn):
    make_type(conn, concurrency=0)
    enqueue_many(conn, "email", 3)
    assert services.claim(conn, "email", limit=10).jobs == []

    services.update_job_type(conn, "email", concurrency=2)
    assert len(services.claim(conn, "email", limit=10).jobs) == 2


def test_claim_only_takes_jobs_of_the_named_type(conn):
    make_type(conn, "email")
    make_type(conn, "sms")
    enqueue_many(conn, "sms", 2)
    assert services.claim(conn, "email", limit=10).jobs == []
    assert len(services.claim(conn, "sms", limit=10).jobs) == 2


def test_claim_archives_expired_jobs_instead_of_returning_them(conn):
    make_type(conn)
    now = utcnow()
    expired = services.enqueue(conn, new_id(), "email", {"old": True}, run_after=now - timedelta(seconds=2), expires_at=now - timedelta(seconds=1))
    fresh = services.enqueue(conn, new_id(), "email", {}, run_after=now, expires_at=now + timedelta(hours=1))

    claim = services.claim(conn, "email", limit=10, now=now)

    assert [job.id for job in claim.jobs] == [fresh.id]
    assert [job.id for job in claim.expired] == [expired.id]
    archived = services.get_job(conn, expired.id)
    assert (archived.status, archived.attempts, archived.data, archived.expires_at) == (EXPIRED, 3, {"old": True}, expired.expires_at)


def test_expired_jobs_are_archived_even_when_no_slot_is_free(conn):
    make_type(conn, concurrency=0)
    now = utcnow()
    expired = services.enqueue(conn, new_id(), "email", {}, expires_at=now - timedelta(seconds=1))
    waiting = services.enqueue(conn, new_id(), "email", {})

    claim = services.claim(conn, "email", limit=10)

    assert (claim.jobs, [job.id for job in claim.expired]) == ([], [expired.id])
    assert services.get_job(conn, waiting.id).status == QUEUED


def test_expired_jobs_do_not_use_up_the_claim_limit(conn):
    make_type(conn, concurrency=5)
    now = utcnow()
    for _ in range(3):
        services.enqueue(conn, new_id(), "email", {}, run_after=now - timedelta(seconds=5), expires_at=now - timedelta(seconds=1))
    fresh = services.enqueue(conn, new_id(), "email", {}, run_after=now)

    claim = services.claim(conn, "email", limit=1, now=now)

    assert [job.id for job in claim.jobs] == [fresh.id]
    assert len(claim.expired) == 3


def test_claim_of_unknown_type_claims_nothing(conn):
    assert services.claim(conn, "nope", limit=10).jobs == []


def _claim_until_empty(conn, name, barrier, claimed, errors):
    """One racer: wait for the others, then claim in random batch sizes until nothing is left."""
    try:
        barrier.wait()
        while True:
            batch = services.claim(conn, name, limit=random.randint(1, 4)).jobs
            if not batch:
                return
            claimed.extend(job.id for job in batch)
    except Exception as error:  # reported by the test, not lost in the thread
        errors.append(error)


def test_eight_connections_racing_never_exceed_concurrency_nor_claim_twice(conn, connect):
    """Each round, 8 threads on 8 connections race for the free slots; exactly the free slots are taken."""
    concurrency = 3
    make_type(conn, concurrency=concurrency)
    enqueue_many(conn, "email", 200)
    racers = [connect() for _ in range(8)]
    in_progress = []
    ever_claimed = []

    for _round in range(40):
        claimed, errors = [], []
        barrier = threading.Barrier(len(racers))
        threads = [threading.Thread(target=_claim_until_empty, args=(c, "email", barrier, claimed, errors)) for c in racers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a racer hung"

        assert errors == []
        assert len(claimed) == len(set(claimed)), "a job was claimed twice in one round"
        assert len(claimed) == concurrency - len(in_progress), "claims did not fill exactly the free slots"
        in_progress.extend(claimed)
        ever_claimed.extend(claimed)
        assert _count_in_progress(conn) == concurrency
        # free a random number of slots for the next round
        for job_id in random.sample(in_progress, random.randint(1, concurrency)):
            in_progress.remove(job_id)
            services.handle_status_callback(conn, job_id, "email", "succeeded", 3)

    assert len(ever_claimed) == len(set(ever_claimed)), "a job was claimed twice"


def _count_in_progress(conn):
    return conn.execute("SELECT count(*) FROM queued_jobs WHERE status = 'in-progress'").fetchone()[0]

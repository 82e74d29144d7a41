"""Promises of docs/lifecycle.md and docs/api.md that a one-line change used to break unnoticed.

Each test names the promise; scripts/mutations.py lists the mutation it kills.
"""

import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone

import downstream_stub as stub
import pytest
from conftest import make_type, running_server, running_worker, wait_until

from jobrunner import services

EMAIL = {"name": "email", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 5}
CONCURRENT = 20


def database_now(conn) -> datetime:
    return conn.execute("SELECT now()").fetchone()[0]


# --- expiry while 503s are resent (docs/lifecycle.md: "expired before a resend") ---------


def test_a_job_that_expires_while_its_503s_are_resent_is_archived_expired_and_not_sent_again(api, downstream, db_url):
    assert api.post("/v1/jobs", EMAIL).status == 201
    downstream.policy = lambda post: stub.UNAVAILABLE
    job_id = f"job_{uuid.uuid4()}"
    # resends wait 0.5 s, then 1 s, then 2 s: the job expires between the first POST and the second
    expires_in = 1.0
    with running_worker(db_url, downstream.url):
        expires_at = datetime.now(timezone.utc) + timedelta(seconds=expires_in)
        expires_at_monotonic = time.monotonic() + expires_in
        assert api.put(f"/v1/jobs/email/{job_id}", {"data": {}, "expires_at": expires_at.isoformat()}).status == 202
        wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json["status"] == "expired", "the job to be archived expired", 15)
        archived = api.get(f"/v1/jobs/{job_id}").json
    posts = downstream.posts_for(job_id)
    assert posts, "the job expired before its first POST: the machine was too slow for this test to mean anything"
    late = [post.at - expires_at_monotonic for post in posts if post.at > expires_at_monotonic + 0.25]
    assert late == [], f"POSTed {late} s after it expired"
    # archived as it expired, not counted a failed delivery first (which would use an attempt)
    assert [post.attempts for post in posts] + [archived["attempts"]] == [3] * (len(posts) + 1)


# --- group commit (docs/scaling.md: concurrent PUTs and callbacks share a transaction) ----

RECORD_TXIDS = """
CREATE TABLE test_txids (txid bigint NOT NULL);
CREATE FUNCTION test_record_txid() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN INSERT INTO test_txids VALUES (txid_current()); RETURN NULL; END $$;
CREATE TRIGGER test_record_txid AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION test_record_txid();
"""


def send_concurrently(requests) -> list:
    """Run each request in its own thread at once; their answers (a thread's error fails the test)."""
    answers, errors = [], []
    start = threading.Barrier(len(requests))

    def send(request):
        try:
            start.wait(10)
            answers.append(request())
        except Exception as error:  # reported below, with the others
            errors.append(error)

    threads = [threading.Thread(target=send, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    return threads, answers, errors


def held_until_queued(conn, table: str, send) -> tuple[list, list]:
    """Lock `table` against inserts, `send()` the requests, wait for the first batch to block, then let go.

    While the first batch waits on the lock the others queue behind it, so a
    group commit must put them in one transaction.
    """
    with conn.transaction():
        conn.execute(f"LOCK TABLE {table} IN SHARE MODE")
        threads, answers, errors = send()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        wait_until(lambda: conn.execute(waiting).fetchone()[0] > 0, "the first batch to wait on the lock")
        wait_until(lambda: waiting_in_group_commit() == len(threads), "every request to wait in the group commit")
    for thread in threads:
        thread.join(timeout=30)
    assert not [thread for thread in threads if thread.is_alive()], "a request got no answer in 30 s"
    assert errors == []
    return answers


def waiting_in_group_commit() -> int:
    """Threads of this process (the server under test runs in it) inside a group commit's `submit`."""
    return sum(
        any(frame.f_code.co_name == "submit" and "jobrunner" in frame.f_code.co_filename for frame, _ in traceback.walk_stack(top))
        for top in sys._current_frames().values()
    )


def distinct_txids(conn) -> int:
    return conn.execute("SELECT count(DISTINCT txid) FROM test_txids").fetchone()[0]


@pytest.fixture
def patient_api(db_url):
    """A server whose database wait outlasts the test's lock (the default 2 s could give up first)."""
    with running_server(db_url, db_timeout="30") as client:
        yield client


def test_concurrent_puts_share_transactions(patient_api, conn):
    api = patient_api
    assert api.post("/v1/jobs", EMAIL).status == 201
    conn.execute(RECORD_TXIDS.format(table="queued_jobs"))
    conn.commit()
    puts = [lambda: api.put(f"/v1/jobs/email/job_{uuid.uuid4()}", {"data": {}}) for _ in range(CONCURRENT)]
    answers = held_until_queued(conn, "queued_jobs", lambda: send_concurrently(puts))
    assert [answer.status for answer in answers] == [202] * CONCURRENT
    assert conn.execute("SELECT count(*) FROM test_txids").fetchone()[0] == CONCURRENT
    # the batch that waited on the lock, then one with all the others
    assert distinct_txids(conn) <= 2, "concurrent PUTs were not committed together"


def test_concurrent_succeeded_callbacks_share_transactions(patient_api, conn):
    api = patient_api
    assert api.post("/v1/jobs", EMAIL).status == 201
    ids = [f"job_{uuid.uuid4()}" for _ in range(CONCURRENT)]
    for job_id in ids:
        assert api.put(f"/v1/jobs/email/{job_id}", {"data": {}}).status == 202
    conn.execute(RECORD_TXIDS.format(table="archived_jobs"))
    conn.commit()
    callbacks = [lambda job_id=job_id: api.post(f"/v1/jobs/email/{job_id}", {"status": "succeeded", "attempt": 3}) for job_id in ids]
    answers = held_until_queued(conn, "archived_jobs", lambda: send_concurrently(callbacks))
    assert [answer.status for answer in answers] == [200] * CONCURRENT
    assert conn.execute("SELECT count(*) FROM test_txids").fetchone()[0] == CONCURRENT
    assert distinct_txids(conn) <= 2, "concurrent callbacks were not committed together"


# --- the production path: the database's clock decides (now=None) ------------------------


def claimed(conn, **type_settings):
    make_type(conn, **type_settings)
    services.enqueue(conn, uuid.uuid4(), "email", {})
    [job] = services.claim(conn, "email", 1).jobs
    return job


def test_a_retry_backs_off_from_the_database_clock(conn):
    job = claimed(conn, attempts=3)
    before = database_now(conn)
    conn.commit()
    retried = services.handle_status_callback(conn, job.id, "email", "failed", job.attempts)
    after = database_now(conn)
    conn.commit()
    assert retried.status == "queued"
    # the first failure waits 2 s (services.retry_delay), counted from the database's now()
    assert before + timedelta(seconds=2) <= retried.run_after <= after + timedelta(seconds=2)
    assert services.claim(conn, "email", 1).jobs == []  # not due yet, by the database's clock


def test_stuck_jobs_are_found_by_the_database_clock(conn):
    stuck = claimed(conn, attempts=3)
    conn.execute("UPDATE queued_jobs SET updated_at = now() - interval '10 minutes' WHERE id = %s", (stuck.id,))
    services.enqueue(conn, uuid.uuid4(), "email", {})
    [recent] = services.claim(conn, "email", 1).jobs
    conn.execute("UPDATE queued_jobs SET updated_at = now() - interval '4 minutes' WHERE id = %s", (recent.id,))
    conn.commit()

    failed = services.archive_stuck_jobs(conn, timedelta(minutes=5))

    assert [job.id for job in failed] == [stuck.id]
    assert services.get_job(conn, stuck.id).status == "queued"  # retried: attempts remain
    assert services.get_job(conn, recent.id).status == "in-progress"

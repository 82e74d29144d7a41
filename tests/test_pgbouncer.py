"""jobrunner through a real PgBouncer (the machine's: Debian 12 ships 1.18), in transaction and in session mode.

The pools go through PgBouncer; each worker's LISTEN connection goes to PostgreSQL
directly (JOBRUNNER_LISTEN_DATABASE_URL), as docs/scaling.md says. In transaction
mode psycopg's prepared statements are off (JOBRUNNER_PREPARED_STATEMENTS=off): PgBouncer
before 1.22 hands each transaction any server session, where a statement prepared
in another is missing. In session mode they stay on, the default.
"""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import API_PASSWORD, API_USER, DOWNSTREAM_PASSWORD, running_server, wait_until, worker_processes
from downstream_stub import DownstreamStub
from pgbouncer_cluster import PgBouncer, find_pgbouncer

from jobrunner import services, store, watcher
from jobrunner.config import load_config
from jobrunner.errors import DatabaseError

if not find_pgbouncer() and not os.environ.get("CI"):
    pytest.skip("pgbouncer not installed (scripts/ensure-pgbouncer installs it; in CI this fails)", allow_module_level=True)

PREPARED_STATEMENTS = {"transaction": "off", "session": "on"}  # what each mode needs, and the default where it works
TYPES = {"mail": ("at_least_once", 3), "charge": ("at_most_once", 2)}  # name: (strategy, concurrency)


@pytest.fixture(scope="module", params=["transaction", "session"])
def bouncer(request, pg_server):
    pgbouncer = PgBouncer(pg_server, request.param).start()
    yield pgbouncer
    pgbouncer.stop()


def run_cli(*args, env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "JOBRUNNER_", "DOWNSTREAM", "PORT"))}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "jobrunner", *args], capture_output=True, text=True, env=environment, timeout=60)


def put_job(api, name: str) -> tuple[str, float]:
    """Enqueue one job over HTTP; its id and when it was answered."""
    job_id = f"job_{uuid.uuid4()}"
    response = api.put(f"/v1/jobs/{name}/{job_id}", {"data": {"to": "someone"}})
    assert response.status == 202, response.body
    return job_id, time.monotonic()


def archived(conn, job_ids) -> dict[str, str]:
    ids = [uuid.UUID(job_id.removeprefix("job_")) for job_id in job_ids]
    rows = conn.execute("SELECT id, status::text FROM archived_jobs WHERE id = ANY(%s)", (ids,)).fetchall()
    return {f"job_{job_id}": status for job_id, status in rows}


def test_the_whole_lifecycle_runs_through_pgbouncer(bouncer, db_url, conn):
    pooled = bouncer.url(db_url)
    prepared = PREPARED_STATEMENTS[bouncer.pool_mode]
    # small pools: each connection runs each statement often, past psycopg's threshold for preparing it (5)
    with running_server(pooled, prepared_statements=prepared, server_pool_size="2") as api:
        downstream = DownstreamStub(api.port, (API_USER, API_PASSWORD), DOWNSTREAM_PASSWORD, hold=0.05)
        try:
            for name, (strategy, concurrency) in TYPES.items():
                created = api.post("/v1/jobs", {"name": name, "delivery_strategy": strategy, "attempts": 3, "concurrency": concurrency})
                assert created.status == 201, created.body
            # a safety poll every ~10 s once idle: only a notification sends a job sooner
            settings = {"listen_database_url": db_url, "prepared_statements": prepared, "sleep_factor": "100", "worker_pool_size": "2"}
            with worker_processes(2, pooled, downstream.url, **settings):
                jobs = [put_job(api, name)[0] for name in TYPES for _ in range(20)]
                wait_until(lambda: len(archived(conn, jobs)) == len(jobs), "every job archived", timeout=60)
                assert set(archived(conn, jobs).values()) == {"succeeded"}
                assert store.type_errors(conn) == {}  # no claim failed
                # two processes claimed under each type's concurrency, and reached it
                assert downstream.max_in_flight == {name: concurrency for name, (_, concurrency) in TYPES.items()}
                charges = [job_id for job_id in jobs if downstream.posts_for(job_id)[0].name == "charge"]
                assert all(len(downstream.posts_for(job_id)) == 1 for job_id in charges)  # at_most_once: sent once

                replayed = api.post(f"/v1/jobs/mail/{jobs[0]}/replay")
                assert replayed.status == 201, replayed.body
                replay_id = replayed.json["id"]
                wait_until(lambda: archived(conn, [replay_id]) == {replay_id: "succeeded"}, "the replayed job to succeed", timeout=30)

                # long idle by now: each job is sent well before the next poll
                for _ in range(3):
                    job_id, enqueued = put_job(api, "mail")
                    post = wait_until(lambda: downstream.posts_for(job_id), "the job to be sent", timeout=30)[0]
                    assert post.at - enqueued < 1.5, f"sent {post.at - enqueued:.2f} s after its enqueue: no notification woke the workers"
                    time.sleep(1.5)  # spread the probes out: one poll could explain only one of them
            assert downstream.callback_errors == []
        finally:
            downstream.close()


def test_the_watcher_fails_a_stuck_job_through_pgbouncer(bouncer, db_url, conn):
    pooled = bouncer.url(db_url)
    services.create_job_type(conn, "mail", "at_least_once", 1, 1)
    job = services.enqueue(conn, uuid.uuid4(), "mail", {})
    conn.execute("UPDATE queued_jobs SET status = 'in-progress', updated_at = now() - interval '1 hour' WHERE id = %s", (job.id,))
    config = load_config({}, overrides={"database_url": pooled, "prepared_statements": PREPARED_STATEMENTS[bouncer.pool_mode],
                                        "stuck_job_interval": "0.2", "stuck_job_timeout": "60", "job_timeout": "30"})
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(config, stop))
    thread.start()
    try:
        wait_until(lambda: archived(conn, [f"job_{job.id}"]), "the watcher to fail the stuck job", timeout=15)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert archived(conn, [f"job_{job.id}"]) == {f"job_{job.id}": "failed"}


def test_transaction_mode_with_prepared_statements_on_is_refused_at_start_and_named(bouncer, db_url):
    env = {"DATABASE_URL": bouncer.url(db_url), "JOBRUNNER_USERS": "ops:pw", "DOWNSTREAM_URL": "http://127.0.0.1:1"}
    result = run_cli("check-config", "--production", env=env)
    if bouncer.pool_mode == "session":
        assert result.returncode == 0, result.stderr  # a session keeps its prepared statements
        return
    assert result.returncode == 2, result.stderr
    assert "JOBRUNNER_PREPARED_STATEMENTS" in result.stderr and "transaction mode" in result.stderr, result.stderr
    for command in ("run", "work"):
        started = run_cli(command, env={**env, "PORT": "0", "JOBRUNNER_HOST": "127.0.0.1"})
        assert started.returncode == 2 and "JOBRUNNER_PREPARED_STATEMENTS" in started.stderr, (command, started.stderr)
    assert run_cli("check-config", "--production", env={**env, "JOBRUNNER_PREPARED_STATEMENTS": "off"}).returncode == 0


def test_transaction_mode_breaks_prepared_statements_under_concurrency(bouncer, db_url):
    """Why the setting exists: with psycopg's default, statements fail at random in transaction mode."""
    if bouncer.pool_mode != "transaction":
        pytest.skip("session mode keeps a session's prepared statements")
    errors = []

    def ping_repeatedly(prepared_statements: bool):
        connection = store.connect(bouncer.url(db_url), prepared_statements=prepared_statements)
        try:
            for _ in range(100):
                try:
                    store.ping(connection)
                except DatabaseError as error:
                    errors.append((prepared_statements, str(error)))
        finally:
            connection.close()

    for prepared_statements in (True, False):
        threads = [threading.Thread(target=ping_repeatedly, args=(prepared_statements,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert {prepared for prepared, _ in errors} == {True}, errors[:3]  # some with, none without
    assert "prepared statement" in errors[0][1]

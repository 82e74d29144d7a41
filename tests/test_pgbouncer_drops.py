"""A pooler that drops its server connections mid-transaction (issue 18, bad input).

`jobrunner run` (a server, two workers, the watcher) works through a real PgBouncer in
transaction mode (JOBRUNNER_PREPARED_STATEMENTS=off, LISTEN direct, as docs/scaling.md
says) while jobs flow; then every server connection PgBouncer holds is dropped, several
times, while statements run on them: by the database (pg_terminate_backend of every
backend but the direct LISTEN ones, what a failover or an administrator does) or by
PgBouncer itself (its admin console's KILL, which also drops its clients' connections).
What must hold: every job ends within the short timeouts set here, an at_most_once job
is never sent twice, no child exits (so none is restarted, let alone in a loop), and the
log says what happened in a warning.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict
import pytest
from conftest import API_PASSWORD, API_USER, DOWNSTREAM_PASSWORD, Api, free_port, wait_until
from downstream_stub import DownstreamStub
from pgbouncer_cluster import PgBouncer, find_pgbouncer

from jobrunner import store

if not find_pgbouncer() and not os.environ.get("CI"):
    pytest.skip("pgbouncer not installed (scripts/ensure-pgbouncer installs it; in CI this fails)", allow_module_level=True)

TYPES = {"mail": ("at_least_once", 4), "charge": ("at_most_once", 4)}  # name: (strategy, concurrency)
JOBS_PER_TYPE = 60
DROPS = 20  # rounds of dropping every server connection, while jobs flow
# A job whose callback was lost ends after the job timeout (3 s), by the worker that sent
# it. The watcher's stuck rescue (30 s) is for jobs whose worker died, and none dies
# here: a job it had to fail is a claim a live worker lost track of.
TIMEOUTS = {"JOBRUNNER_JOB_TIMEOUT": "3", "JOBRUNNER_STUCK_JOB_INTERVAL": "0.1", "JOBRUNNER_STUCK_JOB_TIMEOUT": "30",
            "JOBRUNNER_DOWNSTREAM_TIMEOUT": "1", "JOBRUNNER_DB_TIMEOUT": "2"}


class AdminBouncer(PgBouncer):
    """A PgBouncer whose admin console (database `pgbouncer`) the cluster's user may use."""

    def _write_config(self) -> None:
        super()._write_config()
        user = self.server.get("user") or "postgres"
        path = self.workdir / "pgbouncer.ini"
        # A KILL that lands on a server login counts as a failed login, after which PgBouncer
        # opens no server connection for server_login_retry (15 s by default): every client
        # waits that long. Shorter here to keep the test short; the flow survives either.
        path.write_text(path.read_text() + f"admin_users = {user}\nserver_login_retry = 2\n")

    def admin(self, command: str) -> None:
        user = self.server.get("user") or "postgres"
        # the console speaks the simple query protocol only, and has no transactions
        with psycopg.connect(host="127.0.0.1", port=self.port, dbname="pgbouncer", user=user,
                             password=self.server.get("password", ""), autocommit=True, prepare_threshold=None) as console:
            console.execute(command)


@pytest.fixture
def bouncer(pg_server):
    pgbouncer = AdminBouncer(pg_server, "transaction").start()
    yield pgbouncer
    pgbouncer.stop()


class Service:
    """A running `jobrunner run`; its log goes to a file, read while it runs."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process, self.log_path, self.port = process, log_path, None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        """comm name -> pid of each live child."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid and fields[0] != "Z":
                found[name] = int(pid)
        return found


def _answers(port: int) -> bool:
    try:
        return Api(port).get("/healthz", auth=None).status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_service(pooled_url: str, direct_url: str, downstream_url: str):
    workdir = Path(tempfile.mkdtemp(prefix="jobrunner-drops-"))
    port = free_port()
    log_path = workdir / "jobrunner.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBRUNNER_", "DATABASE_URL", "DOWNSTREAM", "PORT", "PG_"))}
    env.update(
        DATABASE_URL=pooled_url,
        JOBRUNNER_LISTEN_DATABASE_URL=direct_url,
        JOBRUNNER_PREPARED_STATEMENTS="off",
        JOBRUNNER_USERS=f"{API_USER}:{API_PASSWORD}",
        DOWNSTREAM_URL=downstream_url,
        DOWNSTREAM_WORKER_AUTH=DOWNSTREAM_PASSWORD,
        JOBRUNNER_HOST="127.0.0.1",
        PORT=str(port),
        JOBRUNNER_WORKERS="2",
        JOBRUNNER_GRACEFUL_TIMEOUT="10",
        JOBRUNNER_DATA_DIR=str(workdir / "data"),
        PG_SERVER_POOL_SIZE="4",
        PG_WORKER_POOL_SIZE="3",
        **TIMEOUTS,
    )
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "jobrunner", "run"], env=env, stderr=log_file, stdout=log_file)
    service = Service(process, log_path)
    try:
        service.port = port
        wait_until(lambda: _answers(port) or process.poll() is not None, "the server to answer", timeout=30)
        assert process.poll() is None, service.log()
        wait_until(lambda: len(service.children()) == 4, "the four children", timeout=30)
        yield service
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for path in sorted(workdir.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        workdir.rmdir()


def terminate_pooled_backends(db_url: str) -> int:
    """pg_terminate_backend every backend of the database but this one and the direct LISTEN connections."""
    with store.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            " AND application_name NOT LIKE 'jobrunner-worker-listen%'").fetchall()
        conn.commit()
    return len(rows)


def busy_pooled_backends(db_url: str) -> int:
    with store.connect(db_url) as conn:
        count = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND state <> 'idle' AND application_name NOT LIKE 'jobrunner-worker-listen%'").fetchone()[0]
        conn.rollback()
    return count


def archived(db_url: str) -> dict[str, str]:
    with store.connect(db_url) as conn:
        rows = conn.execute("SELECT id, status::text FROM archived_jobs").fetchall()
        conn.rollback()
    return {f"job_{job_id}": status for job_id, status in rows}


def queued(db_url: str) -> list[tuple]:
    with store.connect(db_url) as conn:
        rows = conn.execute("SELECT id, name, status::text, attempts FROM queued_jobs").fetchall()
        conn.rollback()
    return rows


def put_jobs(api: Api, name: str, count: int) -> list[str]:
    """Enqueue over HTTP; a PUT answered 503 while the pooler drops connections is retried, as a client would."""
    job_ids = []
    for _ in range(count):
        job_id = f"job_{uuid.uuid4()}"
        wait_until(lambda: api.put(f"/v1/jobs/{name}/{job_id}", {"data": {"n": 1}}).status == 202, f"PUT {job_id} accepted", timeout=60)
        job_ids.append(job_id)
    return job_ids


@pytest.mark.parametrize("drop", ["pg_terminate_backend", "pgbouncer KILL"])
def test_a_pooler_dropping_connections_mid_transaction_is_survived(bouncer, db_url, drop):
    downstream = DownstreamStub(0, (API_USER, API_PASSWORD), DOWNSTREAM_PASSWORD, hold=0.05)
    try:
        with running_service(bouncer.url(db_url), db_url, downstream.url) as service:
            api = Api(service.port)
            downstream.api_port = service.port
            for name, (strategy, concurrency) in TYPES.items():
                created = api.post("/v1/jobs", {"name": name, "delivery_strategy": strategy, "attempts": 5, "concurrency": concurrency})
                assert created.status == 201, created.body
            children = service.children()
            jobs: list[str] = []
            enqueuing = threading.Thread(target=lambda: [jobs.extend(put_jobs(api, name, JOBS_PER_TYPE)) for name in TYPES])
            enqueuing.start()
            try:
                wait_until(lambda: len(archived(db_url)) >= 10, "jobs to flow", timeout=30)
                for _ in range(DROPS):
                    # mid-flight: wait until statements are running on pooled connections, then drop them all
                    wait_until(lambda: busy_pooled_backends(db_url) > 0, "a statement on a pooled connection", timeout=30, interval=0.001)
                    if drop == "pg_terminate_backend":
                        assert terminate_pooled_backends(db_url) > 0
                    else:
                        dbname = conninfo_to_dict(db_url)["dbname"]
                        bouncer.admin(f"KILL {dbname}")
                        bouncer.admin(f"RESUME {dbname}")  # KILL leaves the database paused
                    time.sleep(0.3)  # let the flow resume before the next round
            finally:
                enqueuing.join(timeout=120)
            assert len(jobs) == len(TYPES) * JOBS_PER_TYPE

            # every job ends: callbacks lost to a drop wait out the 3 s job timeout
            wait_until(lambda: set(jobs) <= set(archived(db_url)), "every job archived", timeout=120, interval=0.2)
            statuses = archived(db_url)
            assert queued(db_url) == []
            never_sent = [job_id for job_id in jobs if not downstream.posts_for(job_id)]
            assert never_sent == [], f"jobs archived {[statuses[job_id] for job_id in never_sent[:3]]} without ever being sent"
            mail = [job_id for job_id in jobs if downstream.posts_for(job_id)[0].name == "mail"]
            charges = [job_id for job_id in jobs if job_id not in mail]
            assert {statuses[job_id] for job_id in mail} == {"succeeded"}  # attempts enough to ride out the drops
            sent_twice = [job_id for job_id in charges if len(downstream.posts_for(job_id)) > 1]
            assert sent_twice == [], f"at_most_once jobs sent twice: {sent_twice[:3]}"

            # no child died: the same four processes (a crash would show as a new pid and a supervisor warning)
            assert service.children() == children, service.log()[-3000:]
            log = service.log()
            assert "exited with code" not in log, log[-3000:]
            assert "Traceback" not in log, log[-3000:]
            assert not re.search(r"watcher: [1-9]\d* stuck jobs failed", log), log[-3000:]  # no claim lost track of
            assert re.search(r"WARNING.*(connection|server closed|terminat|database)", log, re.IGNORECASE), log[-3000:]
            assert api.get("/healthz", auth=None).status == 200
    finally:
        downstream.close()

"""Failover for real: `jobrunner run` on a multi-host DATABASE_URL (`host=a,b`, target_session_attrs=read-write)
while jobs flow; the primary is stopped hard (pg_ctl stop -m immediate) and the standby promoted.

Measured and asserted: the seconds until enqueues succeed again, acknowledged
enqueues lost (none with synchronous replication), jobs in flight at the switch
ending (none stuck, at_most_once never sent twice), and the pools and LISTEN
connections following the new primary without a restart. With asynchronous
replication, what a standby had not received when the primary died is lost: shown too.
"""

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import API_PASSWORD, API_USER, DOWNSTREAM_PASSWORD, Api, free_port, wait_until
from downstream_stub import DownstreamStub, Post
from failover_cluster import Pair

from jobrunner import services, store
from jobrunner.cli import migrate

TYPES = {"mail": ("at_least_once", 5), "charge": ("at_most_once", 3)}  # name: (strategy, concurrency)
WORKERS = 2
HOLD = 0.2  # the downstream's work before it calls back: jobs are at the downstream when the primary dies


class RetryingDownstream(DownstreamStub):
    """Calls back like a real downstream: again, with a pause, while the queue's API is unreachable or answers 5xx."""

    def _call_back(self, post: Post, status: str) -> None:
        time.sleep(self.hold)  # the downstream's work; not a wait for a condition
        self._count(post.name, -1)
        deadline = time.monotonic() + 60
        retried = False
        while time.monotonic() < deadline:
            try:
                answer = self._send_callback(post, status)
            except (OSError, http.client.HTTPException):
                answer = None
            if answer == 200 or (retried and answer == 400):  # a retry may find it done
                return
            if answer is not None and answer < 500:
                self.callback_errors.append(f"{post.job_id}: {answer}")
                return
            retried = True
            time.sleep(0.1)
        self.callback_errors.append(f"{post.job_id}: API unreachable")


@contextlib.contextmanager
def jobrunner_run(database_url: str, downstream_port: int, api_port: int, log: Path):
    """`jobrunner run` as a real process tree (supervisor, server, workers, watcher); SIGTERM on exit."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "JOBRUNNER_", "DOWNSTREAM", "PORT", "PG_"))}
    environment.update({
        "DATABASE_URL": database_url, "JOBRUNNER_USERS": f"{API_USER}:{API_PASSWORD}", "JOBRUNNER_HOST": "127.0.0.1",
        "PORT": str(api_port), "DOWNSTREAM_URL": f"http://127.0.0.1:{downstream_port}", "DOWNSTREAM_WORKER_AUTH": DOWNSTREAM_PASSWORD,
        "JOBRUNNER_WORKERS": str(WORKERS), "JOBRUNNER_DB_TIMEOUT": "2", "JOBRUNNER_DOWNSTREAM_TIMEOUT": "2",
        "JOBRUNNER_JOB_TIMEOUT": "5", "JOBRUNNER_STUCK_JOB_TIMEOUT": "8", "JOBRUNNER_STUCK_JOB_INTERVAL": "1",
        "JOBRUNNER_GRACEFUL_TIMEOUT": "5", "JOBRUNNER_LOG_LEVEL": "WARNING",
    })
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "jobrunner", "run"], env=environment, stdout=output, stderr=output, cwd="/")
        try:
            api = Api(api_port)
            wait_until(lambda: process.poll() is not None or healthy(api), "jobrunner run to serve", timeout=30)
            assert process.poll() is None, log.read_text()
            yield process, api
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def healthy(api: Api) -> bool:
    try:
        return api.get("/healthz").status == 200
    except OSError:
        return False


def children(pid: int) -> list[int]:
    return sorted(int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


class Enqueuer:
    """PUTs jobs one after another, each retried until answered 202 (an enqueue under its own id is idempotent)."""

    def __init__(self, api: Api):
        self.api = api
        self.acknowledged: dict[str, str] = {}  # job id -> type
        self.answers: list[tuple[float, float, int | None]] = []  # (started, answered, status) of every try
        self.stop = threading.Event()
        self.errors: list[BaseException] = []  # raised by finish()
        self.thread = threading.Thread(target=self._run, name="enqueuer")
        self.thread.start()

    def _run(self) -> None:
        try:
            self._enqueue_until_stopped()
        except BaseException as error:  # raised in the test's thread by finish()
            self.errors.append(error)

    def _enqueue_until_stopped(self) -> None:
        names = list(TYPES)
        n = 0
        while not self.stop.is_set():
            name, job_id = names[n % len(names)], f"job_{uuid.uuid4()}"
            while not self.stop.is_set() and not self._put(name, job_id):
                time.sleep(0.05)  # the pace of retries, not a wait for a condition
            n += 1
            self.stop.wait(0.03)  # about 25 jobs/s, below what the types' concurrency lets through (8 / HOLD)

    def _put(self, name: str, job_id: str) -> bool:
        started = time.monotonic()
        try:
            status = self.api.put(f"/v1/jobs/{name}/{job_id}", {"data": {"n": 1}}).status
        except (OSError, http.client.HTTPException):
            status = None
        self.answers.append((started, time.monotonic(), status))
        if status == 202:
            self.acknowledged[job_id] = name
        return status == 202

    def first_success_after(self, instant: float) -> float:
        """When the first enqueue tried after `instant` was acknowledged."""
        return wait_until(lambda: next((answered for started, answered, status in list(self.answers) if started > instant and status == 202), None),
                          "an enqueue to succeed after the switch", timeout=30)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the enqueuer's last PUT did not end"
        if self.errors:
            raise self.errors[0]


def stored(conn) -> tuple[dict[str, str], dict[str, str]]:
    """(queued job id -> status, archived job id -> status) on the database of `conn`."""
    queued = {f"job_{job_id}": status for job_id, status in conn.execute("SELECT id, status::text FROM queued_jobs")}
    archived = {f"job_{job_id}": status for job_id, status in conn.execute("SELECT id, status::text FROM archived_jobs")}
    return queued, archived


def jobrunner_connections(conn) -> dict[str, int]:
    rows = conn.execute(
        "SELECT split_part(application_name, ':', 1), count(*) FROM pg_stat_activity WHERE application_name LIKE 'jobrunner-%%' GROUP BY 1"
    ).fetchall()
    return dict(rows)


def listening(conn) -> int:
    """The workers' LISTEN connections to this server that have run their LISTEN statement."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'jobrunner-worker-listen%%' AND query LIKE 'LISTEN%%'"
    return conn.execute(query).fetchone()[0]


@pytest.fixture
def synchronous_pair():
    pair = Pair(synchronous=True)
    yield pair
    pair.stop()


def test_a_hard_failover_to_a_synchronous_standby_loses_no_acknowledged_job_and_nothing_restarts(synchronous_pair, tmp_path):
    pair = synchronous_pair
    migrate(pair.url())
    api_port = free_port()
    downstream = RetryingDownstream(api_port, (API_USER, API_PASSWORD), DOWNSTREAM_PASSWORD, hold=HOLD)
    try:
        with jobrunner_run(pair.url(), downstream.server.server_address[1], api_port, tmp_path / "jobrunner.log") as (process, api):
            run_started = time.monotonic()
            for name, (strategy, concurrency) in TYPES.items():
                assert api.post("/v1/jobs", {"name": name, "delivery_strategy": strategy, "attempts": 3, "concurrency": concurrency}).status == 201
            before = children(process.pid)
            enqueuer = Enqueuer(api)
            wait_until(lambda: len(downstream.posts) >= 40, "jobs to flow", timeout=20)

            pair.a.crash()
            crashed = time.monotonic()  # pg_ctl has seen the primary gone
            pair.b.promote()
            promoted = time.monotonic()
            at_the_downstream = sum(crashed - HOLD < post.at < crashed for post in list(downstream.posts))  # their callbacks come after
            recovered = enqueuer.first_success_after(crashed)
            wait_until(lambda: sum(post.at > recovered for post in list(downstream.posts)) >= 40, "jobs to flow again", timeout=30)
            enqueuer.finish()

            new_primary = store.connect(pair.direct(pair.b))
            try:
                # every pool and every LISTEN connection is on the new primary, in the same processes
                connected = wait_until(lambda: (c := jobrunner_connections(new_primary)).get("jobrunner-worker-listen") == WORKERS and c,
                                       "the LISTEN connections on the new primary", timeout=30)
                assert connected.get("jobrunner-server", 0) >= 1 and connected.get("jobrunner-worker", 0) >= 1, connected
                assert children(process.pid) == before, "a child was restarted"

                queued, archived = wait_until(lambda: (s := stored(new_primary))[0] == {} and s, "no job left queued or in progress", timeout=30)
                lost = [job_id for job_id in enqueuer.acknowledged if job_id not in archived]
                sent_twice = [job_id for job_id, name in enqueuer.acknowledged.items() if name == "charge" and len(downstream.posts_for(job_id)) > 1]
                not_succeeded = {job_id: archived[job_id] for job_id, name in enqueuer.acknowledged.items() if name == "mail" and archived.get(job_id) != "succeeded"}

                # A notification sends a job at once; a worker that missed it would wait for a poll. Polls come
                # 10 ms x 2^n apart after n polls (at most 1 s apart while deaf), so once the workers have
                # run 10 s they are >= 4 s apart (~10 s by now): ten jobs each sent within 2.5 s are not
                # a poll's luck. The listeners must have LISTENed on the new primary, not only connected.
                wait_until(lambda: listening(new_primary) == WORKERS, "the workers to LISTEN on the new primary", timeout=30)
                wait_until(lambda: time.monotonic() - run_started > 10, "the workers' safety poll to slow down", timeout=15)
                latencies = []
                for _ in range(10):
                    job_id = f"job_{uuid.uuid4()}"
                    enqueued = time.monotonic()
                    assert api.put(f"/v1/jobs/mail/{job_id}", {"data": {}}).status == 202
                    latencies.append(wait_until(lambda: downstream.posts_for(job_id), "the job to be sent", timeout=30)[0].at - enqueued)
            finally:
                new_primary.close()
        print(f"\nfailover: {len(enqueuer.acknowledged)} enqueues acknowledged, {len(downstream.posts)} POSTs; "
              f"promoted {promoted - crashed:.2f} s after the crash; enqueues succeeded again {recovered - crashed:.2f} s after the crash "
              f"({recovered - promoted:.2f} s after the promotion); {at_the_downstream} jobs at the downstream at the crash; lost {len(lost)}; at_most_once sent twice {len(sent_twice)}; "
              f"dispatch after the switch {', '.join(f'{s:.3f}' for s in latencies)} s")
        assert at_the_downstream > 0  # the switch caught jobs in flight
        assert lost == []
        assert sent_twice == []
        assert not_succeeded == {}
        assert recovered - crashed < 15
        assert max(latencies) < 2.5, latencies
        assert downstream.callback_errors == []
    finally:
        downstream.close()


def test_with_asynchronous_replication_what_the_standby_had_not_received_is_lost():
    pair = Pair(synchronous=False)
    try:
        migrate(pair.url())
        primary, standby = store.connect(pair.direct(pair.a)), store.connect(pair.direct(pair.b))
        services.create_job_type(primary, "mail", "at_least_once", 3, 1)
        received = [services.enqueue(primary, uuid.uuid4(), "mail", {}).id for _ in range(10)]
        caught_up = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
        position = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        wait_until(lambda: standby.execute(caught_up, (position,)).fetchone()[0], "the standby to replay the first jobs")
        # the standby falls behind (here: cut off; under load: a network hiccup, a slow disk)
        standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
        standby.execute("SELECT pg_reload_conf()")
        wait_until(lambda: not primary.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0], "the standby to stop streaming")
        unreceived = [services.enqueue(primary, uuid.uuid4(), "mail", {}).id for _ in range(10)]  # each committed and acknowledged
        primary.close()
        pair.a.crash()
        pair.b.promote()
        standby.close()
        with contextlib.closing(store.connect(pair.url())) as conn:
            kept = {row[0] for row in conn.execute("SELECT id FROM queued_jobs")}
        assert kept == set(received)  # every acknowledged job the standby had not received is gone
        assert not kept & set(unreceived)
    finally:
        pair.stop()


def test_a_standby_that_refuses_writes_answers_503_and_names_it_not_500():
    """DATABASE_URL on a standby (no target_session_attrs, or a name not yet moved): the database is there but
    read-only. That is an unavailable database for jobrunner (503, retry later), never a bug (500)."""
    from conftest import running_server

    pair = Pair(synchronous=False)
    try:
        migrate(pair.url())
        with running_server(pair.direct(pair.b)) as api:
            response = api.post("/v1/jobs", {"name": "mail", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 1})
            assert response.status == 503, response.body
    finally:
        pair.stop()

"""Heartbeats: a downstream still working on a job pushes its callback deadline, and the stuck-job clock, forward."""

import contextlib
import json
import threading
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import API_PASSWORD, API_USER, make_type, new_id, running_service, wait_until
from freezegun import freeze_time
from test_delivery_policy import set_policy

from jobrunner import services, store
from jobrunner.client import ApiError, Client
from jobrunner.config import load_config
from jobrunner.errors import InvalidField, JobAlreadyArchived, JobNameMismatch, NotInProgress, StaleCallback, UnknownJob
from jobrunner.models import FAILED, IN_PROGRESS, QUEUED, SUCCEEDED
from jobrunner.watcher import Watcher

DEFAULT_TIMEOUT = timedelta(minutes=5)  # the workers' job_timeout in these tests
T0 = datetime(2026, 6, 1, 8, tzinfo=timezone.utc)


def now() -> datetime:
    return datetime.now(timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def claim_one(conn, name: str = "email"):
    services.enqueue(conn, new_id(), name, {}, now=now())
    [job] = services.claim(conn, name, limit=1, now=now()).jobs
    return job


def beat(conn, job, extend=None):
    return services.heartbeat(conn, job.id, job.name, job.attempts, extend, DEFAULT_TIMEOUT, now=now())


def overdue(conn) -> set[str]:
    """The names of the jobs the workers' overdue check fails now."""
    return {job.name for job in services.archive_stuck_jobs(conn, DEFAULT_TIMEOUT, now=now())}


def deadlines(conn) -> int:
    return conn.execute("SELECT count(*) FROM jobrunner_job_deadlines").fetchone()[0]


# --- the deadline a heartbeat sets -----------------------------------------------------------


def test_a_heartbeat_pushes_the_deadline_by_the_types_job_timeout_or_the_default(conn):
    make_type(conn, "plain")
    make_type(conn, "short")
    set_policy(conn, "short", job_timeout=60)
    with freeze_time(T0) as clock:
        jobs = [claim_one(conn, "plain"), claim_one(conn, "short")]
        clock.move_to(at(50))
        answers = {job.name: beat(conn, job) for job in jobs}
        assert {name: (job.updated_at, deadline) for name, (job, deadline) in answers.items()} == {
            "plain": (at(50), at(350)),
            "short": (at(50), at(110)),
        }
        failed = {}
        for seconds in (61, 109, 111, 301, 349, 351):
            clock.move_to(at(seconds))
            failed |= {name: seconds for name in overdue(conn)}
    assert failed == {"short": 111, "plain": 351}  # without the heartbeat: 61 and 301


@pytest.mark.parametrize("extend, failed_after", [(3600, 3605), (10, 15)])
def test_a_heartbeat_with_extend_sets_the_deadline_that_many_seconds_ahead(conn, extend, failed_after):
    """Longer than job_timeout for a long step, or shorter: the deadline is what the downstream asks for."""
    make_type(conn)
    with freeze_time(T0) as clock:
        job = claim_one(conn)
        clock.move_to(at(5))
        assert beat(conn, job, extend)[1] == at(5 + extend)
        clock.move_to(at(failed_after - 0.001))
        assert overdue(conn) == set()
        clock.move_to(at(failed_after + 0.001))
        assert overdue(conn) == {"email"}


def test_the_watcher_counts_from_the_heartbeat_with_its_margin(conn):
    """job_timeout 300 s, stuck_job_timeout 420 s: a job heartbeated at 50 s is stuck after 50 + 3600 + 120 s."""
    make_type(conn)
    config = load_config({}, overrides={"job_timeout": "300", "stuck_job_timeout": "420"})
    watcher = Watcher(config, lambda: contextlib.nullcontext(conn))
    with freeze_time(T0) as clock:
        job = claim_one(conn)
        clock.move_to(at(50))
        beat(conn, job, 3600)
        stuck = {}
        for seconds in (421, 3769, 3771):
            clock.move_to(at(seconds))
            stuck[seconds] = watcher.run_once(now()).stuck
    assert stuck == {421: 0, 3769: 0, 3771: 1}


def test_a_deadline_holds_for_its_attempt_only(conn):
    """A long extend for attempt 3 does not carry over to attempt 2: it is counted from its own claim again."""
    make_type(conn)
    with freeze_time(T0) as clock:
        job = claim_one(conn)
        beat(conn, job, 86400)
        retried = services.handle_status_callback(conn, job.id, "email", FAILED, 3, now=now())
        clock.move_to(retried.run_after)
        [again] = services.claim(conn, "email", limit=1, now=now()).jobs
        clock.tick(DEFAULT_TIMEOUT + timedelta(seconds=1))
        [failed] = services.archive_stuck_jobs(conn, DEFAULT_TIMEOUT, now=now())
    assert (again.attempts, failed.id, failed.attempts) == (2, job.id, 1)


def test_a_heartbeat_changes_nothing_in_the_job_but_its_updated_at(conn):
    make_type(conn)
    with freeze_time(T0) as clock:
        job = claim_one(conn)
        clock.move_to(at(42))
        beaten, _ = beat(conn, job)
    assert beaten == services.get_job(conn, job.id)
    assert (beaten.status, beaten.attempts, beaten.run_after, beaten.updated_at) == (IN_PROGRESS, 3, job.run_after, at(42))


# --- heartbeats refused: each says why, and changes nothing ----------------------------------


def refused(conn, job_id, name, attempt, extend=None):
    before = (services.get_job(conn, job_id) if name else None, deadlines(conn))
    with pytest.raises(Exception) as raised:
        services.heartbeat(conn, job_id, name, attempt, extend, DEFAULT_TIMEOUT)
    if name:
        assert (services.get_job(conn, job_id), deadlines(conn)) == before
    return raised.value


def test_a_heartbeat_for_another_attempt_a_queued_job_an_archived_one_or_an_unknown_one_is_refused(conn):
    make_type(conn)
    make_type(conn, "sms")
    sent = claim_one(conn)
    done = claim_one(conn)
    services.handle_status_callback(conn, done.id, "email", SUCCEEDED, 3)
    queued = services.enqueue(conn, new_id(), "email", {})

    assert isinstance(refused(conn, sent.id, "email", 2), StaleCallback)
    assert "a heartbeat for attempt 4 is stale" in str(refused(conn, sent.id, "email", 4))
    assert isinstance(refused(conn, queued.id, "email", 3), NotInProgress)
    assert isinstance(refused(conn, done.id, "email", 3), JobAlreadyArchived)
    assert isinstance(refused(conn, sent.id, "sms", 3), JobNameMismatch)
    assert isinstance(refused(conn, new_id(), None, 3), UnknownJob)
    for extend in (0, -1, 604800.5):
        error = refused(conn, sent.id, "email", 3, extend)
        assert isinstance(error, InvalidField) and error.field == "extend"
    assert deadlines(conn) == 0


def test_a_heartbeat_that_loses_the_race_with_the_overdue_check_is_refused(conn, connect):
    """The overdue check holds the job: the heartbeat waits for it, then finds the job queued again, and changes nothing."""
    make_type(conn)
    job = claim_one(conn)
    checker, beating = connect(), connect()
    outcome = []
    with checker.transaction():
        [locked] = store.lock_stuck_jobs(checker, timedelta(0), 10, now=now() + timedelta(seconds=1))
        heartbeat = threading.Thread(target=lambda: outcome.append(refused_quietly(beating, job)))
        heartbeat.start()
        wait_until(lambda: waiting_for_a_lock(conn), "the heartbeat to wait for the overdue check's lock")
        services._fail_stuck(checker, locked, None)
    heartbeat.join(timeout=10)
    assert [type(error) for error in outcome] == [NotInProgress]
    assert services.get_job(conn, job.id).status == QUEUED and deadlines(conn) == 0


def refused_quietly(conn, job) -> Exception | None:
    try:
        beat(conn, job)
    except Exception as error:
        return error
    return None


def waiting_for_a_lock(conn) -> bool:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0] > 0


def test_the_watcher_deletes_deadlines_no_job_holds(conn):
    make_type(conn)
    kept, finished = claim_one(conn), claim_one(conn)
    beat(conn, kept)
    beat(conn, finished)
    services.handle_status_callback(conn, finished.id, "email", SUCCEEDED, 3)
    Watcher(load_config({}), lambda: contextlib.nullcontext(conn)).run_once()
    assert conn.execute("SELECT id FROM jobrunner_job_deadlines").fetchall() == [(kept.id,)]


def test_the_client_heartbeats_and_reports_a_refusal(api, conn):
    make_type(conn)
    client = Client(f"http://127.0.0.1:{api.port}", API_USER, API_PASSWORD)
    queued = client.enqueue("email", {})
    with pytest.raises(ApiError) as refusal:
        client.heartbeat("email", queued["id"], 3)
    assert (refusal.value.status, refusal.value.id) == (400, "job_not_in_progress")
    [sent] = services.claim(conn, "email", limit=1).jobs
    answer = client.heartbeat("email", sent.job_id, 3, extend=600)
    deadline = datetime.fromisoformat(answer["deadline"].replace("Z", "+00:00"))
    updated_at = datetime.fromisoformat(answer["updated_at"].replace("Z", "+00:00"))
    assert (answer["status"], deadline - updated_at) == (IN_PROGRESS, timedelta(seconds=600))


def test_a_type_with_a_callback_token_takes_heartbeats_that_carry_it_only(api, conn):
    make_type(conn)
    set_policy(conn, "email", callback_token="t0ken-for-email")
    job = claim_one(conn)
    client = Client(f"http://127.0.0.1:{api.port}", API_USER, API_PASSWORD)
    for wrong in (None, "t0ken-for-sms"):
        with pytest.raises(ApiError) as refusal:
            client.heartbeat("email", job.job_id, 3, callback_token=wrong)
        assert (refusal.value.status, refusal.value.id) == (403, "forbidden")
    assert services.get_job(conn, job.id) == job and deadlines(conn) == 0
    assert client.heartbeat("email", job.job_id, 3, callback_token="t0ken-for-email")["status"] == IN_PROGRESS


# --- a real service, and a downstream that heartbeats through a long job ---------------------


class HeartbeatingDownstream:
    """Answers 202 at once, then works `work` seconds, heartbeating every `every` seconds (if it does), then calls back."""

    def __init__(self, work: float, every: float):
        self.work, self.every = work, every
        self.api_port = 0
        self.posts: list[tuple[str, str, int]] = []  # (type, job id, attempts)
        self.heartbeats: list[tuple[str, dict]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        downstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name, job_id = self.path.split("/")[-2:]
                downstream.posts.append((name, job_id, body["attempts"]))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                threading.Thread(target=downstream._run, args=(name, job_id, body["attempts"]), daemon=True).start()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _run(self, name: str, job_id: str, attempt: int) -> None:
        client = Client(f"http://127.0.0.1:{self.api_port}", API_USER, API_PASSWORD)
        for _ in range(round(self.work / self.every)):
            if self._stop.wait(self.every):  # the job's work, a step at a time
                return
            if name.startswith("heartbeat"):
                try:
                    self.heartbeats.append((job_id, client.heartbeat(name, job_id, attempt)))
                except ApiError as error:
                    self.errors.append(f"{job_id}: {error}")
                    return
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/v1/jobs/{name}/{job_id}",
            data=json.dumps({"status": "succeeded", "attempt": attempt}).encode(),
            headers={"Authorization": client._headers["Authorization"], "Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except OSError as error:  # a stale attempt's callback: 400
            self.errors.append(f"{job_id}: callback {error}")

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_downstream_that_heartbeats_keeps_a_long_job_past_its_job_timeout(db_url, conn):
    """Two types with a job_timeout of 1 s, jobs that take 3 s: the one that heartbeats is sent once and
    succeeds; the other is timed out and sent again (0.2 s later, its back-off). /metrics counts the heartbeats per type."""
    make_type(conn, "heartbeating", attempts=2)
    set_policy(conn, "heartbeating", job_timeout=1.0)
    make_type(conn, "silent", attempts=2)
    set_policy(conn, "silent", job_timeout=1.0, retry_min_backoff=0.2, retry_max_backoff=0.2)
    downstream = HeartbeatingDownstream(work=3.0, every=0.4)
    try:
        with running_service(db_url, downstream.url, "workers = 1\n") as service:
            downstream.api_port = service.port
            client = Client(f"http://127.0.0.1:{service.port}", API_USER, API_PASSWORD)
            long_job = client.enqueue("heartbeating", {"steps": 7})
            silent_job = client.enqueue("silent", {"steps": 7})
            wait_until(lambda: client.get(long_job["id"])["status"] == "succeeded", "the heartbeating job to succeed", timeout=20)
            wait_until(lambda: len([p for p in downstream.posts if p[0] == "silent"]) == 2, "the silent job to be sent again")
            beats = len(downstream.heartbeats)
            metric = f'jobrunner_heartbeats_total{{name="heartbeating"}} {beats}'
            wait_until(lambda: metric in service.api.get("/metrics").body.decode(), metric, timeout=5)
    finally:
        downstream.close()
    assert [p for p in downstream.posts if p[0] == "heartbeating"] == [("heartbeating", long_job["id"], 2)]
    assert [p[1:] for p in downstream.posts if p[0] == "silent"] == [(silent_job["id"], 2), (silent_job["id"], 1)]
    assert beats >= 5 and not [error for error in downstream.errors if long_job["id"] in error]
    assert all(answer["status"] == IN_PROGRESS and answer["deadline"] for _, answer in downstream.heartbeats)

"""One type's trouble stays with that type: a row the code cannot read, a claim that fails, a slow downstream, a lost commit.

A real worker in a thread, the real server and database, and the downstream stub.
"""

import logging
import socket
import threading
import time

import downstream_stub as stub
import pytest
from conftest import create_type, enqueue, free_port, running_worker, wait_for_status, wait_until
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from jobrunner import store

POISONS = {
    # Postgres stores each of these; Python cannot read it back
    "expires_at after year 9999": "UPDATE queued_jobs SET expires_at = '9999-12-31T23:59:59-01:00' WHERE name = 'aaa'",
    "run_after before year 1": "UPDATE queued_jobs SET run_after = '0001-01-01T00:00:00+01:00' WHERE name = 'aaa'",
    "data nested too deep": "UPDATE queued_jobs SET data = (repeat('[', 5000) || repeat(']', 5000))::jsonb WHERE name = 'aaa'",
}


def archived_status(conn, job_id):
    row = conn.execute("SELECT status::text FROM archived_jobs WHERE id = %s", [job_id.removeprefix("job_")]).fetchone()
    return row and row[0]


@pytest.mark.parametrize("poison", POISONS)
def test_a_row_the_code_cannot_read_is_archived_failed_once_and_other_types_keep_flowing(api, downstream, db_url, conn, caplog, poison):
    create_type(api, "aaa")  # sorts first: its claim comes first in every round
    create_type(api, "bbb")
    poisoned = enqueue(api, "aaa")
    conn.execute(POISONS[poison])
    caplog.set_level(logging.INFO, logger="jobrunner")
    with running_worker(db_url, downstream.url):
        others = [enqueue(api, "bbb", data={"n": n}) for n in range(5)]
        for job_id in others:
            wait_for_status(api, job_id, "succeeded")
        wait_until(lambda: archived_status(conn, poisoned) == "failed", "the unreadable job to be archived failed")
        healthy = enqueue(api, "aaa")
        wait_for_status(api, healthy, "succeeded")  # the type itself goes on
    assert downstream.posts_for(poisoned) == []
    lines = [record.getMessage() for record in caplog.records if poisoned in record.getMessage()]
    assert len(lines) == 1 and "cannot be read" in lines[0], lines
    assert api.get(f"/v1/jobs/{poisoned}").json["status"] == "failed"  # and the archived row can be read


REFUSE_AAA = """
CREATE FUNCTION refuse_aaa() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.name = 'aaa' AND NEW.status = 'in-progress' THEN
        RAISE EXCEPTION 'claims of aaa are refused';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER refuse_aaa BEFORE UPDATE ON queued_jobs FOR EACH ROW EXECUTE FUNCTION refuse_aaa();
"""


def test_a_type_whose_claim_fails_is_backed_off_logged_once_counted_and_shown_while_others_flow(api, downstream, db_url, conn, caplog):
    create_type(api, "aaa")
    create_type(api, "bbb")
    conn.execute(REFUSE_AAA)
    refused = enqueue(api, "aaa")
    caplog.set_level(logging.INFO, logger="jobrunner")
    with running_worker(db_url, downstream.url) as worker:
        others = [enqueue(api, "bbb", data={"n": n}) for n in range(5)]
        for job_id in others:
            wait_for_status(api, job_id, "succeeded")
        wait_until(lambda: worker.metrics.claim_errors.value("aaa") >= 1, "the failed claim to be counted")
        first_failure = time.monotonic()
        errors = wait_until(lambda: store.type_errors(conn).get("aaa"), "the type's error to be recorded")
        assert errors.stage == "claim" and "claims of aaa are refused" in errors.message
        wait_until(lambda: time.monotonic() - first_failure > 3, "3 s of failing claims", timeout=5)
        tries = worker.metrics.claim_errors.value("aaa")
        # growing back-off (10 ms x 2^n): about 8 tries in 3 s, not hundreds
        assert 2 <= tries <= 15, tries
        assert worker.metrics.claim_errors.value("bbb") == 0
        assert status_of_queued(conn, refused) == "queued"
        conn.execute("DROP TRIGGER refuse_aaa ON queued_jobs")
        wait_for_status(api, refused, "succeeded", timeout=30)
        wait_until(lambda: "aaa" not in store.type_errors(conn), "the type's error to be cleared")
    failed_lines = [r.getMessage() for r in caplog.records if "aaa" in r.getMessage() and "failed:" in r.getMessage()]
    assert len(failed_lines) == 1, failed_lines
    assert any("aaa" in r.getMessage() and "recovered" in r.getMessage() for r in caplog.records)
    assert "jobrunner_claim_errors_total" in worker.metrics.render()


def status_of_queued(conn, job_id):
    row = conn.execute("SELECT status::text FROM queued_jobs WHERE id = %s", [job_id.removeprefix("job_")]).fetchone()
    return row and row[0]


def test_a_type_whose_downstream_hangs_never_holds_every_dispatch_thread(api, downstream, db_url):
    create_type(api, "slow", concurrency=40)
    create_type(api, "fast")
    downstream.policy = lambda post: stub.HANG if post.name == "slow" else stub.ACCEPT
    for n in range(40):
        enqueue(api, "slow", data={"n": n})
    with running_worker(db_url, downstream.url, dispatch_threads="4", downstream_timeout="30"):
        wait_until(lambda: len([post for post in downstream.posts if post.name == "slow"]) >= 2, "the slow type's POSTs to hang")
        started = time.monotonic()
        fast = enqueue(api, "fast")
        try:
            wait_until(lambda: downstream.posts_for(fast), "the other type's POST", timeout=20)
        finally:
            downstream._release_hangs.set()  # the hanging POSTs end: the worker can stop
        waited = downstream.posts_for(fast)[0].at - started
    assert waited < 5, waited
    hanging = len([post for post in downstream.posts if post.name == "slow" and post.at < started + waited])
    assert hanging <= 2  # half of the 4 threads


# --- a claim whose commit answer is lost ---------------------------------------------


class CommitCutter:
    """A TCP proxy to Postgres that, once armed, cuts the connection of the first claim at its COMMIT.

    A claim is recognised by its answer (rows in status in-progress). With `committed`
    the COMMIT reaches the server (the claim commits) and the client never hears back;
    otherwise the connection is closed before the COMMIT is sent (nothing commits).
    """

    def __init__(self, db_url, committed=True):
        params = conninfo_to_dict(db_url)
        host, port = params.get("host", "localhost"), int(params.get("port", 5432))
        self.upstream = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") else (socket.AF_INET, (host, port))
        self.committed = committed
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = make_conninfo(db_url, host="127.0.0.1", port=self.listener.getsockname()[1])
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(self.upstream[0])
            server.connect(self.upstream[1])
            self._sockets += [client, server]
            claimed = threading.Event()
            threading.Thread(target=self._pump_to_server, args=(client, server, claimed), daemon=True).start()
            threading.Thread(target=self._pump_to_client, args=(server, client, claimed), daemon=True).start()

    def _pump_to_client(self, server, client, claimed):
        while data := self._recv(server):
            if b"in-progress" in data:
                claimed.set()
            try:
                client.sendall(data)
            except OSError:
                return

    def _pump_to_server(self, client, server, claimed):
        while data := self._recv(client):
            if b"COMMIT" in data or b"ROLLBACK" in data:
                if self.armed.is_set() and not self.cut.is_set() and claimed.is_set():
                    self.cut.set()
                    if self.committed:
                        server.sendall(data)
                    client.shutdown(socket.SHUT_RDWR)  # the client never hears the answer
                    if not self.committed:
                        server.shutdown(socket.SHUT_RDWR)  # the server rolls back
                    return
                claimed.clear()
            try:
                server.sendall(data)
            except OSError:
                return

    @staticmethod
    def _recv(sock):
        try:
            return sock.recv(65536)
        except OSError:
            return b""


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not committed"])
def test_a_claim_whose_commit_answer_is_lost_is_sent_once_never_failed_unsent(api, downstream, db_url, committed):
    create_type(api, "charge", strategy="at_most_once", attempts=1)
    proxy = CommitCutter(db_url, committed)
    try:
        with running_worker(proxy.url, downstream.url, listen_database_url=db_url, job_timeout="2", db_timeout="2"):
            wait_for_status(api, enqueue(api, "charge"), "succeeded")  # the worker is up
            proxy.armed.set()
            job_id = enqueue(api, "charge")
            wait_until(proxy.cut.is_set, "the claim's commit to be cut")
            archived = wait_for_status(api, job_id, "succeeded", timeout=20)
    finally:
        proxy.close()
    assert archived["attempts"] == 1
    assert len(downstream.posts_for(job_id)) == 1


def test_a_worker_whose_database_is_down_hears_a_stop_while_it_waits_for_a_connection():
    unreachable = f"postgresql://jobrunner@127.0.0.1:{free_port()}/jobrunner?connect_timeout=1"
    with running_worker(unreachable, "http://127.0.0.1:9", db_timeout="8") as worker:
        wait_until(lambda: worker.pool._pool.get_stats().get("requests_waiting", 0) >= 1, "the worker to wait for a connection")
        started = time.monotonic()
    stopped_after = time.monotonic() - started
    assert stopped_after < 4, stopped_after  # not the pool's whole 8 s wait (margin for a loaded machine)

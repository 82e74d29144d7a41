"""jobrunner.client against the real server: every call, paging, errors, and retries of what is safe to repeat."""

import http.client
import http.server
import socket
import threading
import uuid

import pytest
from conftest import API_PASSWORD, API_USER, free_port

from jobrunner import server
from jobrunner.client import ApiError, Client, Unreachable
from jobrunner.config import load_config


@pytest.fixture
def client(api):
    return Client(f"http://127.0.0.1:{api.port}", API_USER, API_PASSWORD)


def test_job_types_are_created_listed_read_and_updated(client):
    created = client.create_type("email", "at_least_once", attempts=3, concurrency=5)
    assert (created["name"], created["attempts"], created["concurrency"]) == ("email", 3, 5)
    assert [t["name"] for t in client.types()] == ["email"]
    assert client.update_type("email", concurrency=0)["concurrency"] == 0
    assert client.type("email")["concurrency"] == 0
    assert client.update_type("email", concurrency=4)["concurrency"] == 4
    assert client.pause("email")["concurrency"] == 0
    assert client.resume("email")["concurrency"] == 4
    assert client.resume("email", concurrency=6)["concurrency"] == 6


def test_schedules_are_created_read_changed_run_and_deleted(client):
    client.create_type("email", "at_least_once", 3, 0)
    created = client.create_schedule("nightly", "email", {"report": "daily"}, cron="0 2 * * *", time_zone="Europe/Berlin", misfire="once")
    assert (created["cron"], created["time_zone"], created["misfire"], created["data"]) == ("0 2 * * *", "Europe/Berlin", "once", {"report": "daily"})
    assert [s["name"] for s in client.schedules()] == ["nightly"]
    assert client.update_schedule("nightly", interval_seconds=300)["interval_seconds"] == 300
    assert client.pause_schedule("nightly")["paused"] is True
    assert client.resume_schedule("nightly")["paused"] is False
    job = client.run_schedule("nightly")
    assert client.schedule("nightly")["last_job_id"] == job["id"]
    with pytest.raises(ApiError) as refused:
        client.create_schedule("bad", "email", interval_seconds=0)
    assert (refused.value.status, refused.value.title) == (400, "Invalid interval_seconds: must be a whole number of seconds from 1 to 316224000, not 0")
    assert client.delete_schedule("nightly")["name"] == "nightly"
    with pytest.raises(ApiError) as missing:
        client.schedule("nightly")
    assert missing.value.status == 404


def test_enqueue_makes_an_id_and_is_idempotent_under_a_given_one(client):
    client.create_type("email", "at_least_once", 3, 0)  # paused: the jobs stay queued
    job = client.enqueue("email", {"to": "a@example.com"})
    assert job["id"].startswith("job_") and job["status"] == "queued"
    assert client.get(job["id"])["data"] == {"to": "a@example.com"}
    chosen = f"job_{uuid.uuid4()}"
    first = client.enqueue("email", {"n": 1}, id=chosen, run_after="2030-01-01T00:00:00Z")
    again = client.enqueue("email", {"n": 1}, id=chosen)
    assert first["id"] == again["id"] == chosen
    assert len(list(client.jobs("email"))) == 2


def test_cancel_then_replay(client):
    client.create_type("email", "at_least_once", 3, 0)
    job = client.enqueue("email", {"n": 7})
    assert client.cancel(job["id"])["status"] == "cancelled"
    replayed = client.replay(job["id"])
    assert replayed["id"] != job["id"] and replayed["data"] == {"n": 7} and replayed["status"] == "queued"


def test_a_replay_under_a_chosen_id_is_done_once(client):
    client.create_type("email", "at_least_once", 3, 0)
    job = client.enqueue("email", {"n": 8})
    client.cancel(job["id"])
    chosen = f"job_{uuid.uuid4()}"
    first = client.replay(job["id"], new_id=chosen)
    again = client.replay(job["id"], new_id=chosen)  # a retry after a lost answer, or a double click
    assert first["id"] == again["id"] == chosen
    assert [j["id"] for j in client.jobs("email", status="queued")] == [chosen]


def test_jobs_come_page_after_page_newest_first_up_to_the_limit(client):
    client.create_type("email", "at_least_once", 3, 0)
    ids = [client.enqueue("email", {"n": n})["id"] for n in range(7)]
    assert [job["id"] for job in client.jobs("email", page_size=3)] == ids[::-1]
    assert [job["id"] for job in client.jobs("email", limit=5, page_size=2)] == ids[::-1][:5]
    assert list(client.jobs("email", status="failed")) == []


def test_errors_carry_the_servers_status_and_id(client):
    with pytest.raises(ApiError) as error:
        client.enqueue("nosuchtype", {})
    assert (error.value.status, error.value.id) == (404, "job_type_not_found")
    with pytest.raises(ApiError) as error:
        Client(client.url, API_USER, "wrong").types()
    assert error.value.status == 401


def test_a_read_is_retried_until_the_server_comes_up(db_url):
    port = free_port()
    config = load_config({}, overrides={"database_url": db_url, "users": f"{API_USER}:{API_PASSWORD}"})
    stop, listening = threading.Event(), []

    def serve_later():
        listening.append(socket.create_server(("127.0.0.1", port)))
        server.serve(config, listening[0], stop)

    serving = threading.Thread(target=serve_later)
    coming_up = threading.Timer(0.3, serving.start)  # the server starts while the client is already trying
    coming_up.start()
    try:
        assert Client(f"http://127.0.0.1:{port}", API_USER, API_PASSWORD).types() == []  # refused, then answered
    finally:
        coming_up.join()
        stop.set()
        serving.join(timeout=30)
        listening[0].close()
    assert not serving.is_alive(), "the server did not stop"


def test_an_unreachable_server_is_reported_after_the_retries():
    with pytest.raises(Unreachable):
        Client(f"http://127.0.0.1:{free_port()}", timeout=1).get(f"job_{uuid.uuid4()}")


class ScriptedProxy:
    """An HTTP proxy in front of the real server; `script(n, method, path, forward)` answers request n (from 0).

    `forward()` sends the request on to the server and returns (status, body);
    the script returns what the client gets, so it can lose an answer the server gave.
    """

    def __init__(self, api_port: int, script):
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                number = len(proxy.requests)
                proxy.requests.append((self.command, self.path))

                def forward():
                    connection = http.client.HTTPConnection("127.0.0.1", api_port, timeout=30)
                    try:
                        connection.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                        answer = connection.getresponse()
                        return answer.status, answer.read()
                    finally:
                        connection.close()

                status, answer = script(number, self.command, self.path, forward)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_PUT = do_POST = do_any

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


UNAVAILABLE = (503, b'{"id": "service_unavailable", "title": "busy"}')


@pytest.fixture
def proxied(api):
    proxies = []

    def make(script):
        proxies.append(ScriptedProxy(api.port, script))
        return Client(proxies[-1].url, API_USER, API_PASSWORD), proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def test_a_503_is_retried_for_a_request_safe_to_repeat_and_not_for_others(client, proxied):
    client.create_type("email", "at_least_once", 3, 0)
    retrying, proxy = proxied(lambda n, method, path, forward: UNAVAILABLE if n < 2 else forward())
    assert [t["name"] for t in retrying.types()] == ["email"]  # answered on the third try
    assert len(proxy.requests) == 3

    once, proxy = proxied(lambda n, method, path, forward: UNAVAILABLE)
    with pytest.raises(ApiError) as error:
        once.pause("email")  # a change that is not known to be safe to repeat: the 503 is the answer
    assert (error.value.status, error.value.id, error.value.retried) == (503, "service_unavailable", False)
    assert len(proxy.requests) == 1
    assert client.type("email")["concurrency"] == 0


def test_an_enqueue_whose_answer_was_lost_and_whose_job_already_ran_returns_the_archived_job(client, proxied, api):
    client.create_type("email", "at_least_once", 3, 0)

    def lose_the_first_answer(n, method, path, forward):
        status, body = forward()
        if n == 0:
            assert status == 202, body
            job_id = path.rsplit("/", 1)[1]
            api.post(f"/v1/jobs/email/{job_id}", {"status": "succeeded", "attempt": 3})  # it runs meanwhile
            return UNAVAILABLE  # a proxy timing out: the client never learns the PUT was done
        return status, body

    retrying, proxy = proxied(lose_the_first_answer)
    job = retrying.enqueue("email", {"n": 1})
    assert (job["status"], job["data"]) == ("succeeded", {"n": 1})
    assert [method for method, _ in proxy.requests] == ["PUT", "PUT", "GET"]  # the retry met 409, then the job was read


def test_job_already_archived_on_a_first_enqueue_is_an_error(client):
    client.create_type("email", "at_least_once", 3, 0)
    job = client.enqueue("email", {"n": 1})
    client.cancel(job["id"])
    with pytest.raises(ApiError) as error:
        client.enqueue("email", {"n": 1}, id=job["id"])  # not a retry: the id was reused by the caller
    assert (error.value.status, error.value.id, error.value.retried) == (400, "job_already_archived", False)

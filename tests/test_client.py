"""jobrunner.client against the real server: every call, paging, errors, and retries of what is safe to repeat."""

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


def test_an_unreachable_server_is_reported_after_the_retries():
    with pytest.raises(Unreachable):
        Client(f"http://127.0.0.1:{free_port()}", timeout=1).get(f"job_{uuid.uuid4()}")

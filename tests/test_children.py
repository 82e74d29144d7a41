"""The child-kind registry: the supervisor wants what it lists, and the wrapper does each child's common work."""

import os
import signal
import socket
import threading

import pytest
from conftest import API_PASSWORD, API_USER, make_type, new_id, running_worker, wait_until

from jobrunner import metrics, services
from jobrunner.children import KINDS, ChildContext, ChildKind, child_name
from jobrunner.config import load_config
from jobrunner.models import ArchivedJob
from jobrunner.supervisor import Supervisor
from jobrunner.systemd import Notifier


@pytest.fixture
def api_socket():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def supervisor_of(config, sockets: dict) -> Supervisor:
    return Supervisor(config, sockets, lambda: config, Notifier({}))


def test_the_supervisor_wants_each_registered_kind_as_often_as_the_config_says(api_socket):
    config = load_config({}, overrides={"users": "a:b", "servers": "2", "workers": "3"})
    assert supervisor_of(config, {"api": api_socket}).wanted(config) == [
        ("server", 1), ("server", 2), ("watcher", 1), ("worker", 1), ("worker", 2), ("worker", 3),
    ]
    # the example downstream runs only where the supervisor holds its socket (development)
    with socket.create_server(("127.0.0.1", 0)) as downstream:
        wanted = supervisor_of(config, {"api": api_socket, "downstream": downstream}).wanted(config)
    assert wanted[-1] == ("downstream", 1)
    assert list(KINDS) == ["server", "watcher", "worker", "downstream"]


def test_child_names_number_workers_always_and_other_kinds_from_the_second():
    names = [child_name(kind, number) for kind, number in (("server", 1), ("server", 2), ("watcher", 1), ("worker", 1), ("downstream", 1))]
    assert names == ["server", "server-2", "watcher", "worker-1", "downstream"]


# --- a kind added with one entry and one run function --------------------------------


def _probe(config, stop, ready, context) -> None:
    """Counts one stuck job of type "probe" (so that the published file says who counted), then serves until stopped."""
    context.metrics.stuck.inc("probe")
    assert set(context.sockets) == {"api"}
    ready()
    stop.wait()


def _crashing_probe(config, stop, ready, context) -> None:
    context.metrics.stuck.inc("probe")
    raise RuntimeError("the probe's bug")


@pytest.fixture
def probe_supervisor(monkeypatch, api_socket, tmp_path):
    """A supervisor (never run: the test calls its verbs) whose registry has a "probe" kind; its metrics in tmp_path."""
    monkeypatch.setitem(KINDS, "probe", ChildKind("probe", _probe, count=lambda config: 2))
    config = load_config({}, overrides={"users": "a:b", "workers": "0", "graceful_timeout": "10"})
    supervisor = supervisor_of(config, {"api": api_socket})
    supervisor.metrics_dir = str(tmp_path)
    spawned = []
    yield supervisor, spawned
    for child in spawned:
        child.process.kill()
        child.process.join(10)


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as comm:
        return comm.read().strip()


def test_a_kind_added_to_the_registry_is_wanted_named_ready_counted_and_stopped_by_the_wrapper(probe_supervisor, tmp_path):
    supervisor, spawned = probe_supervisor
    assert ("probe", 1) in supervisor.wanted(supervisor.config) and ("probe", 2) in supervisor.wanted(supervisor.config)

    child = supervisor.spawn("probe", 2, supervisor.config, 1)
    spawned.append(child)
    wait_until(child.ready.is_set, "the probe to say it is ready", timeout=30)
    assert _comm(child.process.pid) == "jr-probe-2"

    # the wrapper reset the signals: SIGINT belongs to the supervisor, SIGTERM stops gracefully
    os.kill(child.process.pid, signal.SIGINT)
    os.kill(child.process.pid, signal.SIGTERM)
    child.process.join(30)
    assert child.process.exitcode == 0

    # the wrapper's publisher wrote the kind's counts when it stopped
    assert metrics.collect(tmp_path).stuck.value("probe") == 1


def test_a_kind_that_raises_exits_non_zero_with_its_counts_published(probe_supervisor, monkeypatch, tmp_path):
    supervisor, spawned = probe_supervisor
    monkeypatch.setitem(KINDS, "probe", ChildKind("probe", _crashing_probe, count=lambda config: 1))
    child = supervisor.spawn("probe", 1, supervisor.config, 1)
    spawned.append(child)
    child.process.join(30)
    assert child.process.exitcode == 1
    assert not child.ready.is_set()
    assert metrics.collect(tmp_path).stuck.value("probe") == 1



# --- the kinds' run functions, as the wrapper calls them ---------------------------


def test_the_server_and_development_downstream_kinds_take_a_job_through_on_the_supervisors_sockets(db_url, conn):
    config = load_config({}, overrides={"database_url": db_url, "users": f"{API_USER}:{API_PASSWORD}", "db_timeout": "2"})
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as api, socket.create_server(("127.0.0.1", 0)) as downstream:
        context = ChildContext(metrics.ServiceMetrics(), None, {"api": api, "downstream": downstream})
        ready = {"server": threading.Event(), "downstream": threading.Event()}
        threads = [threading.Thread(target=KINDS[kind].run, args=(config, stop, ready[kind].set, context)) for kind in ready]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: all(event.is_set() for event in ready.values()), "the server and the downstream to be ready", timeout=30)
            make_type(conn)
            job = services.enqueue(conn, new_id(), "email", {"to": "someone"})
            with running_worker(db_url, f"http://127.0.0.1:{downstream.getsockname()[1]}"):
                # the downstream's callback reached the server through the "api" socket
                wait_until(lambda: isinstance(services.get_job(conn, job.id), ArchivedJob), "the job to be called back", timeout=30)
            assert services.get_job(conn, job.id).status == "succeeded"
            assert context.metrics.http_requests.value("record_status", "200") == 1  # counted where the wrapper said
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), "a kind did not stop"

"""`jobrunner run` as a real process tree: children, signals, reloads, crash loops, systemd notifications."""

import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import downstream_stub as stub
import pytest
from conftest import Service, count_rows, free_port, live_children, run_concurrently, running_service, wait_until
from downstream_stub import DownstreamStub

from jobrunner import store
from jobrunner.config import load_config
from jobrunner.supervisor import Child, Supervisor
from jobrunner.systemd import Notifier


def setup_type(service: Service, downstream: DownstreamStub, concurrency: int = 5) -> None:
    downstream.api_port = service.port
    response = service.api.post("/v1/jobs", {"name": "email", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": concurrency})
    assert response.status == 201, response.body


def enqueue(service: Service, count: int = 1) -> list[str]:
    ids = [f"job_{uuid.uuid4()}" for _ in range(count)]
    for job_id in ids:
        assert service.api.put(f"/v1/jobs/email/{job_id}", {"data": {}}).status == 202
    return ids


def succeeded(db_url: str) -> int:
    with store.connect(db_url) as conn:
        return count_rows(conn, "archived_jobs", "succeeded")


def test_run_starts_its_children_serves_and_stops_gracefully_on_sigterm(db_url, detached_downstream):
    with running_service(db_url, detached_downstream.url) as service:
        assert set(service.children()) == {"jr-server", "jr-watcher", "jr-worker-1", "jr-worker-2"}
        setup_type(service, detached_downstream)
        enqueue(service, 5)
        wait_until(lambda: succeeded(db_url) == 5, "5 jobs to succeed")

        service.signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0
        assert service.notified("STOPPING=1")


def test_each_connection_names_its_process_and_the_waiting_watcher_holds_only_its_schedulers(db_url, detached_downstream):
    config = "workers = 2\nserver_pool_size = 3\nworker_pool_size = 2\n"
    with running_service(db_url, detached_downstream.url, config) as service:
        children = service.children()
        # the watcher's rounds hold none between them; its scheduler holds one, to LISTEN for schedule changes
        expected = {f"jobrunner-server:{children['jr-server']}": 3, f"jobrunner-scheduler:{children['jr-watcher']}": 1}
        for worker in ("jr-worker-1", "jr-worker-2"):
            expected[f"jobrunner-worker:{children[worker]}"] = 2
            expected[f"jobrunner-worker-listen:{children[worker]}"] = 1
        conn = store.connect(db_url)
        try:
            query = ("SELECT application_name, count(*) FROM pg_stat_activity"
                     " WHERE datname = current_database() AND application_name LIKE 'jobrunner-%' GROUP BY 1")
            wait_until(lambda: dict(conn.execute(query).fetchall()) == expected, f"connections {expected}")
        finally:
            conn.close()


@pytest.mark.parametrize("victim", ["jr-server", "jr-worker-1", "jr-watcher"])
def test_a_killed_child_is_replaced_and_jobs_keep_flowing(db_url, detached_downstream, victim):
    # a job the killed worker had claimed but not sent waits out the callback timeout, then is retried
    with running_service(db_url, detached_downstream.url, JOBRUNNER_JOB_TIMEOUT="2") as service:
        setup_type(service, detached_downstream)
        enqueue(service, 10)
        old_pid = service.children()[victim]
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: service.children().get(victim) not in (None, old_pid), f"{victim} to be replaced")
        wait_until(lambda: service.api.get("/healthz", auth=None).status == 200, "the API to answer")
        enqueue(service, 10)
        wait_until(lambda: succeeded(db_url) == 20, "all 20 jobs to succeed", timeout=30)
        service.signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0


def test_sighup_applies_a_new_config_with_new_children_and_no_failed_request(db_url, detached_downstream):
    with running_service(db_url, detached_downstream.url) as service:
        setup_type(service, detached_downstream)
        before = service.children()
        failures, requests, enqueued = [], [0], []
        hammering = threading.Event()

        def hammer():
            while not hammering.is_set():
                try:
                    response = service.api.get("/v1/jobs/email")
                    job_id = f"job_{uuid.uuid4()}"
                    put = service.api.put(f"/v1/jobs/email/{job_id}", {"data": {}})
                except OSError as error:  # a refused or dropped connection is a failed request too
                    failures.append(repr(error))
                    continue
                requests[0] += 2
                failures.extend(r.status for r in (response, put) if r.status not in (200, 202))
                if put.status == 202:
                    enqueued.append(job_id)

        client = threading.Thread(target=hammer)
        client.start()
        try:
            wait_until(lambda: requests[0] > 20, "the client to get going")
            with open(service.config_path, "w") as file:
                file.write("[jobrunner]\nworkers = 3\n")
            service.signal(signal.SIGHUP)
            wait_until(lambda: "jr-worker-3" in service.children(), "a third worker")
            wait_until(lambda: not set(before.values()) & set(service.children().values()), "the old generation to retire")
            settled = requests[0]
            wait_until(lambda: requests[0] > settled + 20, "more requests after the reload")
        finally:
            hammering.set()
            client.join(timeout=30)
        assert not client.is_alive(), "the client's last request did not end"
        assert failures == []
        wait_until(lambda: sum(n.count("READY=1") for n in service.notifications) == 2, "READY=1 after the reload")
        assert service.notified("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for n in service.notifications for line in n.split("\n"))
        assert set(service.children()) == {"jr-server", "jr-watcher", "jr-worker-1", "jr-worker-2", "jr-worker-3"}
        # no job lost: every job enqueued before, during and after the reload succeeds
        wait_until(lambda: succeeded(db_url) == len(enqueued), f"all {len(enqueued)} jobs to succeed", timeout=60)


@pytest.mark.parametrize("line, named", [
    ("log_level = LOUD", ["JOBRUNNER_LOG_LEVEL (log_level"]),
    # a signing secret too short to sign with: the running generation keeps signing with the old ones
    ("signing_secrets = whsec_c2hvcnQ=", ["JOBRUNNER_SIGNING_SECRETS (signing_secrets", "bytes of key, not 5"]),
    # each valid alone, they contradict each other
    ("stuck_job_timeout = 300", ["JOBRUNNER_STUCK_JOB_TIMEOUT (stuck_job_timeout", "JOBRUNNER_JOB_TIMEOUT (job_timeout"]),
])
def test_sighup_with_a_broken_config_keeps_the_running_one(db_url, detached_downstream, line, named):
    with running_service(db_url, detached_downstream.url) as service:
        before = service.children()
        with open(service.config_path, "a") as file:
            file.write(line + "\n")
        service.signal(signal.SIGHUP)
        service.wait_for_log("the new configuration is invalid, keeping the running one")
        assert all(name in service.log() for name in named), service.log()
        # the running generation goes on: the same children, serving
        assert service.children() == before
        assert service.api.get("/healthz", auth=None).status == 200
        service.signal(signal.SIGTERM)
        assert service.wait_for_exit(15) == 0
        assert not service.notified("RELOADING=1")


def test_sigterm_with_jobs_in_flight_exits_0_in_time_and_loses_nothing(db_url, detached_downstream):
    detached_downstream.policy = lambda post: stub.HANG
    # a graceful timeout far above the bound: a stop that waits it out is told from one that does not
    with running_service(db_url, detached_downstream.url, JOBRUNNER_GRACEFUL_TIMEOUT="30") as service:
        setup_type(service, detached_downstream, concurrency=3)
        enqueue(service, 6)
        wait_until(lambda: len(detached_downstream.posts) == 3, "3 POSTs in flight")
        started = time.monotonic()
        service.signal(signal.SIGTERM)
        assert service.wait_for_exit(30) == 0
        stopped_in = time.monotonic() - started
        assert stopped_in < 10, f"stopped {stopped_in:.1f} s after SIGTERM: the in-flight POSTs (1 s timeout) were waited out"
    conn = store.connect(db_url)
    rows = dict(conn.execute("SELECT status::text, count(*) FROM queued_jobs GROUP BY 1").fetchall())
    conn.close()
    assert rows == {"in-progress": 3, "queued": 3}  # the sent ones wait for a callback or the timeout


def test_children_exit_by_themselves_when_the_supervisor_is_killed(db_url, detached_downstream):
    with running_service(db_url, detached_downstream.url) as service:
        children = service.children()
        os.kill(service.process.pid, signal.SIGKILL)
        service.process.wait(timeout=5)
        wait_until(lambda: not any(_alive(pid) for pid in children.values()), "every child to exit", timeout=15)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ttin_and_ttou_add_and_remove_a_worker(db_url, detached_downstream):
    with running_service(db_url, detached_downstream.url) as service:
        service.signal(signal.SIGTTIN)
        wait_until(lambda: "jr-worker-3" in service.children(), "a third worker")
        # one at a time: two of the same signal sent at once may arrive as one
        service.signal(signal.SIGTTOU)
        wait_until(lambda: "jr-worker-3" not in service.children(), "the third worker to go")
        service.signal(signal.SIGTTOU)
        wait_until(lambda: set(service.children()) == {"jr-server", "jr-watcher", "jr-worker-1"}, "one worker left")


def test_several_servers_share_the_listening_socket_and_one_serves_while_another_restarts(db_url, detached_downstream):
    # a graceful timeout far above the bound: a server blocked until it is killed is told from one that stops
    config = "workers = 1\nservers = 2\nserver_pool_size = 2\n"
    with running_service(db_url, detached_downstream.url, config, JOBRUNNER_GRACEFUL_TIMEOUT="30") as service:
        children = service.children()
        assert set(children) == {"jr-server", "jr-server-2", "jr-watcher", "jr-worker-1"}
        setup_type(service, detached_downstream)
        os.kill(children["jr-server"], signal.SIGKILL)
        enqueue(service, 5)  # at once: the other server accepts on the same socket
        wait_until(lambda: succeeded(db_url) == 5, "5 jobs to succeed")
        wait_until(lambda: service.children().get("jr-server") not in (None, children["jr-server"]), "a new jr-server")

        # a burst of connections that then stay open, as a client with a pool of kept-alive ones makes: each
        # wakes both servers and one accepts it; the other must not be left blocked in accept(), deaf to its stop
        def connect():
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
            assert service.api.request("GET", "/healthz", auth=None, conn=conn).status == 200
            return conn

        kept = run_concurrently([connect] * 32)  # released together
        started = time.monotonic()
        service.signal(signal.SIGTERM)
        assert service.wait_for_exit(45) == 0
        stopped_in = time.monotonic() - started
        assert stopped_in < 10, f"stopped {stopped_in:.1f} s after SIGTERM: a server hung until the graceful timeout"
        for conn in kept:
            conn.close()


def test_a_child_that_keeps_dying_at_start_makes_the_supervisor_give_up(db_url, detached_downstream):
    with running_service(db_url, detached_downstream.url) as service:
        killed = set()

        def kill_the_watcher_again():
            pid = service.children().get("jr-watcher")
            if pid and pid not in killed:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
            return service.process.poll() is not None

        wait_until(kill_the_watcher_again, "the supervisor to give up", timeout=40)
        assert service.process.returncode == 1
        assert len(killed) == 5
        assert "watcher died 5 times within 5 s of starting" in service.log()


def test_a_reload_whose_children_cannot_reach_the_database_keeps_the_old_generation(db_url, detached_downstream):
    config = f"workers = 1\ndatabase_url = {db_url}\nstart_timeout = 3\n"
    with running_service(db_url, detached_downstream.url, config=config) as service:
        setup_type(service, detached_downstream)
        before = service.children()
        with open(service.config_path, "w") as file:
            file.write("[jobrunner]\nworkers = 1\nstart_timeout = 3\ndatabase_url = postgresql:///nowhere?host=/nonexistent\n")
        service.signal(signal.SIGHUP)
        wait_until(lambda: sum(n.count("READY=1") for n in service.notifications) == 2, "the abandoned reload to end", timeout=20)
        wait_until(lambda: service.children() == before, "only the old generation to be left")
        enqueue(service, 2)
        wait_until(lambda: succeeded(db_url) == 2, "the old generation to go on working")
        service.signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0
        assert "the new generation did not start and reach the database; keeping the old one" in service.log()


def test_the_children_module_does_not_import_the_supervisor():
    # the arrows point one way: the supervisor starts children, children know nothing of it
    code = "import sys, jobrunner.children; print('jobrunner.supervisor' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def child_pids(service: Service) -> dict[int, str]:
    """pid -> comm name of each live child (two generations share names during a reload)."""
    return {pid: name for name, pid in live_children(service.process.pid)}


def test_sigterm_during_a_reload_that_cannot_reach_the_database_stops_at_once(db_url, detached_downstream):
    # the default start timeout (60 s) is longer than systemd's TimeoutStopSec: a stop must not wait for it
    config = f"workers = 1\ndatabase_url = {db_url}\n"
    with running_service(db_url, detached_downstream.url, config=config) as service:
        old = child_pids(service)
        with open(service.config_path, "w") as file:
            file.write(f"[jobrunner]\nworkers = 1\ndatabase_url = postgresql://nobody@127.0.0.1:{free_port()}/nowhere\n")
        service.signal(signal.SIGHUP)
        wait_until(lambda: len(child_pids(service)) == 2 * len(old), "the new generation to be started")

        # while the reload waits, a child of the running generation that dies is still replaced
        victim = next(pid for pid, name in old.items() if name == "jr-watcher")
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: sorted(child_pids(service).values()).count("jr-watcher") == 2 and victim not in child_pids(service),
                   "the killed watcher to be replaced during the reload")

        both_generations = child_pids(service)
        started = time.monotonic()
        service.signal(signal.SIGTERM)
        assert service.process.wait(timeout=90) == 0
        stopped_in = time.monotonic() - started
        assert stopped_in < 8, f"stopped {stopped_in:.1f} s after SIGTERM"
        assert not [pid for pid in both_generations if _alive(pid)]


def _deaf_to_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def _idle_child(supervisor, kind: str) -> "Child":
    process = supervisor.context.Process(target=_deaf_to_sigterm, daemon=True)
    process.start()
    child = Child(kind, 1, supervisor.generation, process, supervisor.context.Event(), time.monotonic())
    supervisor.children.append(child)
    return child


def test_a_retiring_child_past_the_graceful_timeout_is_killed_and_logged_once(caplog):
    config = load_config({}, overrides={"users": "a:b", "workers": "0", "graceful_timeout": "1"})
    with socket.create_server(("127.0.0.1", 0)) as sock:
        supervisor = Supervisor(config, {"api": sock}, lambda: config, Notifier({}))
        children = [_idle_child(supervisor, kind) for kind in ("server", "watcher", "server")]
        stubborn = children[-1]
        stubborn.retiring_since = time.monotonic() - 2
        try:
            with caplog.at_level(logging.WARNING, logger="jobrunner.supervisor"):
                # the loop may pass several times before the kernel has finished the child off and it is reaped
                for _ in range(3):
                    supervisor.manage_children()
            wait_until(lambda: stubborn.process.exitcode is not None, "the stubborn child to be killed")
            assert stubborn.process.exitcode == -signal.SIGKILL
            assert [record.getMessage() for record in caplog.records] == ["server did not stop within 1 s: killing it"]
        finally:
            for child in children:
                child.process.kill()
                child.process.join(5)

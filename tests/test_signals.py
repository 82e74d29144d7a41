"""`jobrunner run`'s signals and systemd notifications, as supervisor.py's table promises them.

A child is made deaf with SIGSTOP: it then outlives any graceful timeout, which
shows whether the supervisor waited (graceful) or killed at once (fast).
"""

import os
import signal
import time

import pytest
from conftest import running_service, wait_until

STOPPED_CHILD = "jr-watcher"


def stop_a_child(service) -> int:
    """SIGSTOP the watcher: it cannot stop gracefully any more, only be killed."""
    pid = wait_until(lambda: service.children().get(STOPPED_CHILD), "the watcher to run")
    os.kill(pid, signal.SIGSTOP)
    return pid


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_child_outliving_the_graceful_timeout_is_killed_after_it(db_url, detached_downstream, signum):
    graceful = 3
    with running_service(db_url, detached_downstream.url, "workers = 1\n", JOBRUNNER_GRACEFUL_TIMEOUT=str(graceful)) as service:
        deaf = stop_a_child(service)
        started = time.monotonic()
        service.signal(signum)
        assert service.wait_for_exit(graceful + 20) == 0
        took = time.monotonic() - started
        log = service.log()
    assert "stopping gracefully" in log
    assert took >= graceful - 0.1, f"stopped after {took:.1f} s: the graceful timeout of {graceful} s was not given"
    assert "watcher did not stop within the graceful timeout: killing it" in log
    assert gone(deaf)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_term_or_int_during_a_graceful_stop_stops_fast(db_url, detached_downstream, second):
    graceful = 60  # far longer than the test may take: only the fast stop can end it in time
    with running_service(db_url, detached_downstream.url, "workers = 1\n", JOBRUNNER_GRACEFUL_TIMEOUT=str(graceful)) as service:
        deaf = stop_a_child(service)
        service.signal(signal.SIGTERM)
        service.wait_for_log("stopping gracefully")
        service.signal(second)
        assert service.wait_for_exit(20) == 0
        log = service.log()
    assert "second signal: stopping fast" in log
    assert gone(deaf)


def test_sigquit_stops_fast_without_waiting_for_the_graceful_timeout(db_url, detached_downstream):
    with running_service(db_url, detached_downstream.url, "workers = 1\n", JOBRUNNER_GRACEFUL_TIMEOUT="60") as service:
        children = service.children()
        deaf = stop_a_child(service)
        service.signal(signal.SIGQUIT)
        assert service.wait_for_exit(20) == 0
        log = service.log()
    assert "stopping fast" in log and "stopping gracefully" not in log
    assert gone(deaf) and all(gone(pid) for pid in children.values())


def test_watchdog_pings_are_sent_at_half_the_watchdog_interval(db_url, detached_downstream):
    # WATCHDOG_USEC of 1 s: a ping every 0.5 s (systemd's advice: half the interval)
    with running_service(db_url, detached_downstream.url, "workers = 1\n", WATCHDOG_USEC="1000000") as service:
        first = service.notified_count("WATCHDOG=1")
        wait_until(lambda: service.notified_count("WATCHDOG=1") >= first + 4, "four more WATCHDOG=1 pings", timeout=15)
        service.signal(signal.SIGTERM)
        assert service.wait_for_exit(30) == 0


def test_no_watchdog_pings_without_watchdog_usec(db_url, detached_downstream):
    with running_service(db_url, detached_downstream.url, "workers = 1\n") as service:
        service.signal(signal.SIGTERM)
        assert service.wait_for_exit(30) == 0
        assert service.notified("STOPPING=1")
        assert service.notified_count("WATCHDOG=1") == 0


def test_sighup_keeps_a_restart_only_setting_and_applies_the_rest(db_url, detached_downstream, tmp_path):
    with running_service(db_url, detached_downstream.url, "workers = 1\n") as service:
        port = service.port
        with open(service.config_path, "w") as file:
            file.write(f"[jobrunner]\nworkers = 2\ndata_dir = {tmp_path}\n")
        service.signal(signal.SIGHUP)
        service.wait_for_log("SIGHUP: reloaded (generation 2)", timeout=30)
        log = service.log()
        assert "SIGHUP: data_dir can only change with a restart; keeping the running value" in log
        wait_until(lambda: sum(name.startswith("jr-worker") for name in service.children()) == 2, "two workers after the reload")
        assert service.api.get("/healthz", auth=None).status == 200  # the same port: the listening socket is kept
        assert service.port == port
        service.signal(signal.SIGTERM)
        assert service.wait_for_exit(30) == 0

"""/metrics covers the whole service: every process's counts, added up, surviving restarts and reloads."""

import json
import os
import re
import signal
import uuid
from datetime import datetime, timedelta, timezone

import downstream_stub as stub
import pytest
from conftest import Service, running_service, wait_until

from jobrunner import metrics

SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, labels, value = SAMPLE.match(line).groups()
            pairs = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
            samples[name, pairs] = float(value)
    return samples


def sample(samples: dict, metric: str, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


# --- one registry, and several processes' files ---------------------------------


def write(directory, name: str, registry) -> None:
    (directory / name).write_text(json.dumps(registry.snapshot()))


def test_counts_from_live_and_retired_processes_add_up_and_never_go_down(tmp_path):
    server, worker, dead = metrics.ServiceMetrics(), metrics.ServiceMetrics(), metrics.ServiceMetrics()
    server.enqueued.inc("email", amount=3)
    worker.claimed.inc("email", amount=2_000_000)
    worker.claim_latency.observe(0.003, "email")
    dead.claimed.inc("email", amount=5)
    dead.claim_latency.observe(20.0, "email")
    write(tmp_path, "1000-aa.json", server)
    write(tmp_path, "1001-bb.json", worker)
    write(tmp_path, "1002-cc.json", dead)

    before = parse(metrics.collect(tmp_path).render())
    metrics.retire(tmp_path, 1002)
    after = parse(metrics.collect(tmp_path).render())

    assert not (tmp_path / "1002-cc.json").exists()
    for samples in (before, after):
        assert sample(samples, "jobrunner_jobs_enqueued_total", name="email") == 3
        assert sample(samples, "jobrunner_jobs_claimed_total", name="email") == 2_000_005
        assert sample(samples, "jobrunner_claim_duration_seconds_count", name="email") == 2
        assert sample(samples, "jobrunner_claim_duration_seconds_bucket", name="email", le="0.005") == 1
        assert sample(samples, "jobrunner_claim_duration_seconds_bucket", name="email", le="+Inf") == 2
    assert "jobrunner_jobs_claimed_total{name=\"email\"} 2000005\n" in metrics.collect(tmp_path).render()


def test_a_file_both_retired_and_still_present_counts_once_and_a_reused_pid_counts_again(tmp_path):
    dead = metrics.ServiceMetrics()
    dead.claimed.inc("email")
    write(tmp_path, "1002-cc.json", dead)
    metrics.retire(tmp_path, 1002)
    write(tmp_path, "1002-cc.json", dead)  # as if the supervisor died between writing retired.json and the unlink
    write(tmp_path, "1002-dd.json", dead)  # a new process that got pid 1002 again

    samples = parse(metrics.collect(tmp_path).render())

    assert sample(samples, "jobrunner_jobs_claimed_total", name="email") == 2


def test_the_publisher_writes_what_changed_again_if_its_file_goes_and_once_more_on_close(tmp_path):
    registry = metrics.ServiceMetrics()
    publisher = metrics.Publisher(registry, str(tmp_path), every=0.01)
    registry.dispatched.inc("email")
    wait_until(lambda: publisher.path.exists() and "dispatched" in publisher.path.read_text(), "the first snapshot")
    publisher.path.unlink()  # a tmp cleaner
    wait_until(publisher.path.exists, "the file to be written again")
    registry.dispatched.inc("email")
    publisher.close()

    assert sample(parse(metrics.collect(tmp_path).render()), "jobrunner_jobs_dispatched_total", name="email") == 2


def test_a_publisher_that_cannot_write_says_so_once_and_catches_up(tmp_path, caplog):
    registry = metrics.ServiceMetrics()
    publisher = metrics.Publisher(registry, str(tmp_path / "gone"), every=None)
    registry.claimed.inc("email")
    publisher.publish()
    publisher.publish()
    assert caplog.text.count("could not publish metrics") == 1
    (tmp_path / "gone").mkdir()
    publisher.close()
    assert json.loads(publisher.path.read_text())["jobrunner_jobs_claimed_total"] == [[["email"], 1]]


def test_retiring_into_a_directory_that_is_gone_is_logged_not_fatal(tmp_path, caplog):
    metrics.retire(tmp_path / "gone", 1002)  # nothing to fold
    write(tmp_path, "1002-cc.json", metrics.ServiceMetrics())
    (tmp_path / metrics.RETIRED).mkdir()  # retired.json cannot be written
    metrics.retire(tmp_path, 1002)
    assert "could not fold the metrics of pid 1002" in caplog.text


# --- the real service -------------------------------------------------------------


@pytest.fixture
def downstream(detached_downstream):
    """The stub a `jobrunner run` sends to; its API port is set once the service runs."""
    return detached_downstream


def scrape(service: Service) -> dict:
    response = service.api.get("/metrics")
    assert response.status == 200, response.body
    return parse(response.body.decode())


def put(service: Service, name: str, data: dict, **fields) -> None:
    response = service.api.put(f"/v1/jobs/{name}/job_{uuid.uuid4()}", {"data": data, **fields})
    assert response.status == 202, response.body


EXPECTED = {
    ("jobrunner_jobs_enqueued_total", "email"): 6,
    ("jobrunner_jobs_enqueued_total", "sms"): 1,
    ("jobrunner_jobs_claimed_total", "email"): 6,  # the flaky job twice, the expired one never
    ("jobrunner_jobs_claimed_total", "sms"): 1,
    ("jobrunner_jobs_dispatched_total", "email"): 5,
    ("jobrunner_jobs_dispatched_total", "sms"): 1,
    ("jobrunner_jobs_succeeded_total", "email"): 5,
    ("jobrunner_jobs_retried_total", "email"): 1,
    ("jobrunner_jobs_failed_total", "sms"): 1,
    ("jobrunner_jobs_expired_total", "email"): 1,
    ("jobrunner_downstream_request_duration_seconds_count", "email"): 6,
}


def differences(samples: dict) -> dict:
    """Expected counts not (or not yet) reached: {(metric, type): (expected, seen)}."""
    seen = {key: sample(samples, key[0], name=key[1]) for key in EXPECTED}
    return {key: (value, seen[key]) for key, value in EXPECTED.items() if seen[key] != value}


def wait_for_expected(service: Service) -> None:
    try:
        wait_until(lambda: not differences(scrape(service)), "every count", timeout=20)
    except AssertionError:
        raise AssertionError(f"counts differ (expected, seen): {differences(scrape(service))}") from None


@pytest.mark.parametrize("servers", [2])
def test_metrics_add_up_every_process_and_survive_a_kill_and_reloads(db_url, downstream, servers):
    posts_of_flaky = []

    def policy(post):
        if post.body["data"].get("flaky"):
            posts_of_flaky.append(post)
            return stub.ERROR_500 if len(posts_of_flaky) == 1 else stub.ACCEPT
        return stub.ACCEPT_AND_FAIL if post.name == "sms" else stub.ACCEPT

    downstream.policy = policy
    with running_service(db_url, downstream.url, JOBRUNNER_SERVERS=str(servers)) as service:
        downstream.api_port = service.port
        api = service.api
        for name, attempts in (("email", 2), ("sms", 1)):
            assert api.post("/v1/jobs", {"name": name, "delivery_strategy": "at_least_once", "attempts": attempts, "concurrency": 5}).status == 201
        for n in range(4):
            put(service, "email", {"n": n})
        put(service, "email", {"flaky": True})  # a 500, then retried after 2 s
        put(service, "sms", {})  # the downstream calls back failed; no attempt left
        past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
        put(service, "email", {}, expires_at=past)

        wait_for_expected(service)
        samples = scrape(service)
        assert sample(samples, "jobrunner_downstream_errors_total", name="email", kind="http_5xx") == 1
        # the series alerts watch are there before their first event, at 0
        assert ("jobrunner_jobs_failed_total", frozenset({("name", "email")})) in samples
        assert ("jobrunner_jobs_timed_out_total", frozenset({("name", "sms")})) in samples
        assert ("jobrunner_reloads_total", frozenset({("result", "rejected")})) in samples
        assert ("jobrunner_child_restarts_total", frozenset({("kind", "worker")})) in samples
        # counted once the answer is sent, after the job is archived: waited for, not assumed
        wait_until(lambda: sample(scrape(service), "jobrunner_http_requests_total", route="record_status", status="200") == 6, "6 callbacks counted")
        assert sample(samples, "jobrunner_claim_duration_seconds_count", name="sms") >= 1  # empty claims count too

        worker = service.children()["jr-worker-1"]
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: service.children().get("jr-worker-1") not in (None, worker), "worker-1 to be replaced")
        wait_until(lambda: sample(scrape(service), "jobrunner_child_restarts_total", kind="worker") == 1, "the restart counted")

        service.signal(signal.SIGHUP)
        wait_until(lambda: sample(scrape(service), "jobrunner_reloads_total", result="ok") == 1, "the reload counted")
        with open(service.config_path, "a") as file:
            file.write("log_level = LOUD\n")
        service.signal(signal.SIGHUP)
        wait_until(lambda: sample(scrape(service), "jobrunner_reloads_total", result="rejected") == 1, "the bad reload counted")

        # whichever server answers, nothing counted before the kill and the reload went missing
        for _ in range(6):
            assert differences(scrape(service)) == {}



def test_without_a_directory_for_the_metrics_the_service_still_runs(db_url, downstream, tmp_path):
    with running_service(db_url, downstream.url, RUNTIME_DIRECTORY=str(tmp_path / "missing")) as service:
        assert scrape(service)  # this server's own counts, and the queue's gauges
        os.kill(service.children()["jr-worker-1"], signal.SIGKILL)  # retiring it must not fail either
        wait_until(lambda: sample(scrape(service), "jobrunner_database_up") == 1 and "jr-worker-1" in service.children(), "a new worker-1")
        service.signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0
        stderr = service.log()
    assert "no directory for the metrics" in stderr


def test_the_metrics_live_in_the_runtime_directory_and_go_with_the_service(db_url, downstream, tmp_path):
    with running_service(db_url, downstream.url, RUNTIME_DIRECTORY=str(tmp_path)) as service:
        [directory] = tmp_path.iterdir()
        wait_until(lambda: len(list(directory.glob("*-*.json"))) >= 2, "the supervisor's and the server's files")
        service.signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0
    assert list(tmp_path.iterdir()) == []

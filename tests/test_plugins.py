"""Pluggable workers and authorizers, named by import path: the same lifecycle as HTTP jobs, the same 401/403 answers."""

import base64
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import datetime

import pytest
from conftest import (
    Api,
    create_type,
    enqueue,
    running_server,
    running_service,
    running_worker,
    status_of,
    wait_for_status,
    wait_until,
)
from plugins_for_tests import ScriptedWorker, TokenAuthorizer

import jobrunner
from jobrunner import plugins, server
from jobrunner.config import ConfigError, load_config
from jobrunner.errors import Unauthorized

TESTS = os.path.dirname(__file__)
SCRIPTED = "email=plugins_for_tests:ScriptedWorker"
UNREACHABLE_DOWNSTREAM = "http://127.0.0.1:9"  # never used: every type here has its own worker


def timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def scripted(api, db_url, request):
    """A worker process (in a thread) serving `email` in-process; the ScriptedWorker it made.

    job_timeout is 1 s, for the timeout test; a test marked `patient` gets 60 s.
    """
    ScriptedWorker.made.clear()
    create_type(api, attempts=3, concurrency=2)
    job_timeout = "60" if request.node.get_closest_marker("patient") else "1"
    with running_worker(db_url, UNREACHABLE_DOWNSTREAM, job_workers=SCRIPTED, job_timeout=job_timeout) as worker:
        [made] = ScriptedWorker.made
        yield made, worker
        made.release.set()


def test_success_is_recorded_as_a_succeeded_callback(api, scripted):
    made, worker = scripted
    job_id = enqueue(api, data={"do": "succeed"})
    archived = wait_for_status(api, job_id, "succeeded")
    assert made.calls == [(job_id, 3)]
    assert archived["attempts"] == 3
    wait_until(lambda: worker.metrics.succeeded.value("email") == 1, "the success counted")  # after the commit


def test_a_retryable_failure_is_retried_with_back_off_until_it_succeeds(api, scripted):
    made, worker = scripted
    job_id = enqueue(api, data={"do": "fail"})
    wait_until(lambda: made.calls == [(job_id, 3)] and status_of(api, job_id) == "queued", "the first attempt to fail")
    queued = api.get(f"/v1/jobs/{job_id}").json
    # measured from the failure's record, not from this test's clock: a slow test does not shorten it
    delay = timestamp(queued["run_after"]) - timestamp(queued["updated_at"])
    assert queued["attempts"] == 2 and 1.5 <= delay.total_seconds() <= 2.5, delay  # 2^1 s after the first failure
    wait_until(lambda: len(made.calls) == 3, "the attempts to run out", timeout=15)
    archived = wait_for_status(api, job_id, "failed")
    assert [attempt for _, attempt in made.calls] == [3, 2, 1]
    assert archived["attempts"] == 0
    wait_until(lambda: (worker.metrics.retried.value("email"), worker.metrics.failed.value("email")) == (2, 1), "retries and failure counted")


def test_a_failure_that_is_not_retryable_is_archived_at_once(api, scripted):
    made, _ = scripted
    job_id = enqueue(api, data={"do": "fail_for_good"})
    archived = wait_for_status(api, job_id, "failed")
    assert made.calls == [(job_id, 3)] and archived["attempts"] == 2


def test_a_worker_that_raises_makes_a_retryable_failure_logged_once_and_the_process_goes_on(api, scripted, caplog):
    made, _ = scripted
    with caplog.at_level(logging.ERROR, logger="jobrunner.worker"):
        job_id = enqueue(api, data={"do": "raise"})
        wait_until(lambda: made.calls and status_of(api, job_id) == "queued", "the attempt to fail")
    assert api.get(f"/v1/jobs/{job_id}").json["attempts"] == 2
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info and "the mail server is down" in caplog.text
    next_job = enqueue(api, data={"do": "succeed"})
    wait_for_status(api, next_job, "succeeded")  # the worker process lives on


def test_a_job_that_outlasts_job_timeout_is_failed_and_retried_and_its_late_report_is_refused(api, scripted):
    made, worker = scripted
    job_id = enqueue(api, data={"do": "hang_first"})
    wait_until(lambda: status_of(api, job_id) == "queued" and made.calls, "the hanging attempt to time out", timeout=10)
    wait_until(lambda: worker.metrics.timed_out.value("email") == 1, "the timeout counted")
    made.release.set()  # the hung attempt now reports Failed for attempt 3: stale
    archived = wait_for_status(api, job_id, "succeeded")  # attempt 2, after the back-off
    assert made.calls == [(job_id, 3), (job_id, 2)] and archived["attempts"] == 2


@pytest.mark.patient  # blocked jobs must not time out and be sent again while the test waits
def test_in_process_jobs_keep_to_the_type_concurrency(api, scripted):
    made, _ = scripted
    ids = [enqueue(api, data={"do": "block"}) for _ in range(5)]
    wait_until(lambda: made.running == 2, "two jobs to run")
    assert api.get("/v1/jobs").json["job_types"][0]["in_progress"] == 2
    made.release.set()
    for job_id in ids:
        wait_for_status(api, job_id, "succeeded")
    assert made.most_running == 2


def test_a_jobrunner_error_or_a_wrong_return_value_from_a_worker_is_a_retryable_failure(api, db_url, caplog):
    create_type(api)
    with caplog.at_level(logging.ERROR, logger="jobrunner.worker"):
        with running_worker(db_url, UNREACHABLE_DOWNSTREAM, job_workers="email=plugins_for_tests:ReturnsNonsense"):
            ours = enqueue(api, data={"do": "raise_ours"})
            nonsense = enqueue(api, data={})
            for job_id in (ours, nonsense):
                wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json["attempts"] == 2, f"{job_id} to be retried")
    assert f"the worker returned {jobrunner.Succeeded!r}" in caplog.text
    assert "a jobrunner error from the application's code" in caplog.text


def test_types_without_their_own_worker_go_to_the_default_one(api, db_url, downstream):
    ScriptedWorker.made.clear()
    create_type(api, name="email")
    create_type(api, name="sms")
    with running_worker(db_url, downstream.url, job_workers=SCRIPTED):
        in_process = enqueue(api, name="email", data={"do": "succeed"})
        posted = enqueue(api, name="sms")
        wait_for_status(api, in_process, "succeeded")
        wait_for_status(api, posted, "succeeded")
    assert [post.job_id for post in downstream.posts] == [posted]
    assert ScriptedWorker.made[0].calls == [(in_process, 3)]


# --- import paths in the configuration -----------------------------------------


@pytest.mark.parametrize(
    "setting, env, value, reason",
    [
        ("job_workers", "JOBRUNNER_JOB_WORKERS", "email=no_such_module:factory", "cannot import 'no_such_module'"),
        ("job_workers", "JOBRUNNER_JOB_WORKERS", "email=plugins_for_tests:missing", "has no 'missing'"),
        ("job_workers", "JOBRUNNER_JOB_WORKERS", "email=plugins_for_tests:NOT_CALLABLE", "is not callable"),
        ("job_workers", "JOBRUNNER_JOB_WORKERS", "email", "job_type=package.module:factory"),
        ("default_worker", "JOBRUNNER_DEFAULT_WORKER", "plugins_for_tests", "package.module:factory"),
        ("authorizer", "JOBRUNNER_AUTHORIZER", "plugins_for_tests.nope:Auth", "cannot import"),
        ("default_worker", "JOBRUNNER_DEFAULT_WORKER", "plugin_that_fails_on_import:x", "KeyError: 'a setting this module needs"),
    ],
)
def test_a_bad_import_path_fails_at_start_naming_the_setting(setting, env, value, reason):
    with pytest.raises(ConfigError) as raised:
        load_config({env: value})
    assert str(raised.value).startswith(f"{env} ({setting}, from ${env}): ")
    assert reason in str(raised.value)


def test_jobrunner_run_refuses_a_bad_path_and_says_which_setting():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBRUNNER_", "DATABASE_URL"))}
    env.update(PYTHONPATH=TESTS, JOBRUNNER_JOB_WORKERS="email=plugins_for_tests:missing")
    result = subprocess.run([sys.executable, "-m", "jobrunner", "run"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "JOBRUNNER_JOB_WORKERS (job_workers" in result.stderr and "has no 'missing'" in result.stderr


@pytest.mark.parametrize("path", ["plugins_for_tests:missing", "plugin_that_fails_on_import:x"])
def test_sighup_with_a_bad_import_path_keeps_the_running_config(db_url, detached_downstream, path):
    with running_service(db_url, detached_downstream.url, PYTHONPATH=TESTS) as service:
        before = service.children()
        with open(service.config_path, "a") as file:
            file.write(f"job_workers = email={path}\n")
        service.signal(signal.SIGHUP)
        service.wait_for_log("the new configuration is invalid, keeping the running one")
        assert "JOBRUNNER_JOB_WORKERS (job_workers" in service.log()
        # the running generation goes on: the same children, serving
        assert service.children() == before
        assert service.api.get("/healthz", auth=None).status == 200
        service.signal(signal.SIGTERM)
        assert service.wait_for_exit(15) == 0


def test_a_worker_named_in_the_config_file_serves_its_type_in_jobrunner_run(db_url, detached_downstream):
    config = "workers = 1\njob_workers = email=plugins_for_tests:ScriptedWorker\n"
    with running_service(db_url, detached_downstream.url, config, PYTHONPATH=TESTS) as service:
        create_type(service.api)
        job_id = enqueue(service.api, data={"do": "succeed"})
        wait_for_status(service.api, job_id, "succeeded")
    assert detached_downstream.posts == []


# --- authorizers ------------------------------------------------------------------

# One request for every route that needs credentials (the test fails if a route is added without one here).
AUTHENTICATED = [
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/email"),
    ("POST", "/v1/jobs/email"),
    ("GET", "/v1/jobs/email/jobs"),
    ("GET", "/v1/jobs/job_8b9a3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"),
    ("GET", "/v1/jobs/email/job_8b9a3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"),
    ("POST", "/v1/jobs/email/job_8b9a3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"),
    ("PUT", "/v1/jobs/email/job_8b9a3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"),
    ("POST", "/v1/jobs/email/job_8b9a3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d/replay"),
    ("POST", "/v1/jobs/email/job_8b9a3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d/cancel"),
    ("POST", "/v1/jobs/email/pause"),
    ("POST", "/v1/jobs/email/resume"),
    ("POST", "/v1/jobs/email/job_8b9a3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d/heartbeat"),
    ("GET", "/v1/schedules"),
    ("POST", "/v1/schedules"),
    ("GET", "/v1/schedules/nightly"),
    ("POST", "/v1/schedules/nightly"),
    ("DELETE", "/v1/schedules/nightly"),
    ("POST", "/v1/schedules/nightly/pause"),
    ("POST", "/v1/schedules/nightly/resume"),
    ("POST", "/v1/schedules/nightly/run"),
]


def handler_of(method: str, path: str) -> str:
    for pattern, methods in server.ROUTES:
        if pattern.fullmatch(path):
            return methods[method]
    raise AssertionError(f"no route for {path}")


def test_the_list_covers_every_authenticated_route():
    every = {(method, name) for _, methods in server.ROUTES for method, name in methods.items() if name not in server.PUBLIC_ROUTES}
    assert {(method, handler_of(method, path)) for method, path in AUTHENTICATED} == every


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_configured_authorizer_decides_for_every_authenticated_route(db_url):
    TokenAuthorizer.calls.clear()
    with running_server(db_url, authorizer="plugins_for_tests:TokenAuthorizer") as api:
        for method, path in AUTHENTICATED:
            wrong = api.request(method, path, b"{}", auth=None, headers=basic("robot", "token-2"))
            forbidden = api.request(method, path, b"{}", auth=None, headers=basic("intruder", "x"))
            allowed = api.request(method, path, b"{}", auth=None, headers=basic("robot", "token-1"))
            assert (wrong.status, wrong.json["id"], wrong.json["title"]) == (401, "unauthorized", "unknown token"), path
            assert wrong.headers["www-authenticate"] == 'Basic realm="jobrunner"'
            assert (forbidden.status, forbidden.json["id"]) == (403, "forbidden"), path
            assert allowed.status not in (401, 403), (method, path, allowed.body)
        assert api.get("/v1/jobs").status == 401  # the configured users no longer count
        assert api.get("/healthz", auth=None).status == 200
    assert TokenAuthorizer.calls.count(("robot", "token-2")) == len(AUTHENTICATED)


def test_an_authorizer_that_returns_instead_of_raising_never_lets_a_request_through(db_url):
    with running_server(db_url, authorizer="plugins_for_tests:ReturnsItsVerdict") as api:
        for user in ("robot", "someone"):
            response = api.get("/v1/jobs", auth=(user, "x"))
            assert (response.status, response.json["id"]) == (401, "unauthorized")


def test_an_embedded_server_takes_an_authorizer_object(db_url):
    config = load_config({}, overrides={"database_url": db_url, "host": "127.0.0.1", "port": "0"})
    built = server.build(config, authorizer=TokenAuthorizer(config))
    thread = threading.Thread(target=built.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        api = Api(built.server_address[1])
        assert api.get("/v1/jobs", auth=("robot", "token-1")).status == 200
        assert api.get("/v1/jobs", auth=("robot", "nope")).status == 401
    finally:
        built.stop()
        thread.join(10)
    assert not thread.is_alive(), "the embedded server did not stop"


def test_the_built_in_authorizer_checks_the_configured_users():
    users = plugins.ConfiguredUsers((("admin", "s3cret:pass"), ("ops", "other")))
    users.authorize("admin", "s3cret:pass")
    for user, password in (("admin", "s3cret"), ("admin", ""), ("nobody", "s3cret:pass"), ("ops", "s3cret:pass")):
        with pytest.raises(Unauthorized):
            users.authorize(user, password)


def test_the_public_names_are_importable_and_the_client_needs_no_driver():
    for name in jobrunner.__all__:
        assert getattr(jobrunner, name) is not None
    code = "import sys, jobrunner.client; assert 'psycopg' not in sys.modules, 'the client imported psycopg'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.match(r"<function run", repr(jobrunner.run))


def test_an_embedded_server_without_users_or_authorizer_is_refused(db_url):
    config = load_config({}, overrides={"database_url": db_url, "host": "127.0.0.1", "port": "0"})
    with pytest.raises(ConfigError, match="JOBRUNNER_USERS"):
        server.build(config)

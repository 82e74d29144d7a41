"""The command line's client commands against the real server, as a person and a script would run them."""

import base64
import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import API_PASSWORD, API_USER, free_port


@pytest.fixture
def jr(api):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env.update(JOBRUNNER_URL=f"http://127.0.0.1:{api.port}", JOBRUNNER_API_USER=API_USER, JOBRUNNER_API_PASSWORD=API_PASSWORD)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobrunner", *args], capture_output=True, text=True, env=env, timeout=60)

    return run


def test_types_are_created_listed_paused_and_resumed(jr):
    created = jr("types", "create", "email", "--attempts", "4", "--concurrency", "2")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "created email: at_least_once, 4 attempts, concurrency 2"
    listing = jr("types", "list")
    assert listing.stdout.split("\n")[1].split() == ["email", "at_least_once", "4", "2", "0", "0", "0"]
    assert jr("types", "pause", "email").stdout.strip() == "email paused (concurrency 0)"
    assert json.loads(jr("types", "list", "--json").stdout)[0]["concurrency"] == 0
    assert jr("types", "resume", "email").stdout.strip() == "email resumed: concurrency 2"
    assert jr("types", "update", "email", "--concurrency", "0").stdout.strip() == "email: 4 attempts, concurrency 0"
    not_paused = jr("types", "resume", "email")
    assert not_paused.returncode == 1 and "409 not_paused" in not_paused.stderr
    assert jr("types", "resume", "email", "--concurrency", "3").stdout.strip() == "email resumed: concurrency 3"


def test_schedules_are_created_listed_run_changed_paused_and_deleted(jr):
    jr("types", "create", "email", "--concurrency", "0")
    created = jr("schedules", "create", "nightly", "--job-type", "email", "--cron", "0 2 * * *", "--time-zone", "Europe/Berlin", "--data", '{"r": 1}')
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("nightly (active): email 0 2 * * * Europe/Berlin; next ")
    listed = jr("schedules", "list").stdout.splitlines()
    assert listed[0].split()[:3] == ["NAME", "JOB", "TYPE"] and listed[1].split()[:2] == ["nightly", "email"]
    job = json.loads(jr("schedules", "run", "nightly", "--json").stdout)
    assert job["data"] == {"r": 1} and job["status"] == "queued"
    assert f"last job {job['id']} queued" in jr("schedules", "get", "nightly").stdout
    assert jr("schedules", "pause", "nightly").stdout.startswith("nightly (paused)")
    assert "every 60 s" in jr("schedules", "update", "nightly", "--every", "60").stdout
    refused = jr("schedules", "create", "other", "--job-type", "email", "--every", "0")
    assert refused.returncode == 1 and "Invalid interval_seconds" in refused.stderr
    assert jr("schedules", "delete", "nightly").returncode == 0
    assert jr("schedules", "get", "nightly").returncode == 1


def test_a_job_is_enqueued_read_cancelled_and_replayed(jr):
    jr("types", "create", "email", "--concurrency", "0")
    job = json.loads(jr("enqueue", "email", "--data", '{"to": "a@example.com"}', "--json").stdout)
    assert job["status"] == "queued"
    shown = jr("job", "get", job["id"])
    assert shown.stdout.startswith(f"{job['id']} email queued") and '"to": "a@example.com"' in shown.stdout
    assert jr("job", "cancel", job["id"]).stdout.startswith(f"{job['id']} email cancelled")
    replayed = json.loads(jr("job", "replay", job["id"], "--json").stdout)
    assert replayed["id"] != job["id"] and replayed["data"] == {"to": "a@example.com"}
    listed = jr("jobs", "list", "email").stdout.splitlines()
    assert [line.split()[:2] for line in listed[1:]] == [[replayed["id"], "queued"], [job["id"], "cancelled"]]


def test_a_jobs_priority_is_enqueued_and_listed(jr):
    jr("types", "create", "email", "--concurrency", "0")
    urgent = json.loads(jr("enqueue", "email", "--data", "{}", "--priority", "-5", "--json").stdout)
    assert urgent["priority"] == -5
    listed = jr("jobs", "list", "email").stdout.splitlines()
    assert listed[0].split()[:3] == ["ID", "STATUS", "PRIORITY"] and listed[1].split()[:3] == [urgent["id"], "queued", "-5"]
    assert jr("enqueue", "email", "--data", "{}", "--priority", "high").returncode == 2


def test_a_bulk_replay_replays_every_matching_job_and_says_how_many(jr):
    jr("types", "create", "email", "--concurrency", "0")
    ids = [json.loads(jr("enqueue", "email", "--data", f'{{"n": {n}}}', "--json").stdout)["id"] for n in range(3)]
    for job_id in ids:
        jr("job", "cancel", job_id)
    result = jr("replay", "email", "--status", "cancelled", "--since", "1h", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(pair["replayed"] for pair in json.loads(result.stdout)) == sorted(ids)
    assert len(json.loads(jr("jobs", "list", "email", "--status", "queued", "--json").stdout)) == 3


def test_exit_codes_say_what_went_wrong(jr):
    refused = jr("enqueue", "nosuchtype", "--data", "{}")
    assert refused.returncode == 1 and "404 job_type_not_found" in refused.stderr
    assert jr("enqueue", "email", "--data", "{not json").returncode == 2
    assert jr("replay", "email", "--status", "failed", "--since", "soon").returncode == 2
    unreachable = jr("types", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3 and "cannot reach the API" in unreachable.stderr


@contextlib.contextmanager
def recording_api():
    """An HTTP server that answers GET /v1/jobs with no types and keeps each request's Authorization header."""
    authorizations = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            authorizations.append(self.headers.get("Authorization"))
            body = json.dumps({"job_types": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    recorder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=recorder.serve_forever)
    thread.start()
    try:
        yield recorder.server_address[1], authorizations
    finally:
        recorder.shutdown()
        thread.join()
        recorder.server_close()


def test_the_development_password_is_sent_only_to_the_development_service(tmp_path):
    (tmp_path / ".jobrunner").mkdir()
    (tmp_path / ".jobrunner" / "api-password").write_text("dev-secret")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    development = "Basic " + base64.b64encode(b"admin:dev-secret").decode()
    with recording_api() as (port, authorizations):
        def types_list(url):
            result = subprocess.run([sys.executable, "-m", "jobrunner", "types", "list", "--url", url],
                                    capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
            assert result.returncode == 0, result.stderr
            return authorizations[-1]

        # the development service serves elsewhere: this --url is someone else
        (tmp_path / ".jobrunner" / "api-url").write_text(f"http://127.0.0.1:{free_port()}")
        assert types_list(f"http://127.0.0.1:{port}") != development
        (tmp_path / ".jobrunner" / "api-url").unlink()  # no development service running
        assert types_list(f"http://127.0.0.1:{port}") != development
        (tmp_path / ".jobrunner" / "api-url").write_text(f"http://127.0.0.1:{port}")
        assert types_list(f"http://127.0.0.1:{port}") == development
        assert types_list(f"http://localhost:{port}/") == development

"""The applications under examples/ (docs/library.md), run as their users run them: real processes, a real database, HTTP on loopback."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from conftest import API_PASSWORD, API_USER, Api, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# what the examples read: none of it may leak in from the environment the tests run in
OWN_ENVIRONMENT = ("JOBRUNNER_", "DATABASE_URL", "DOWNSTREAM", "PORT", "NOTIFY_SOCKET", "API_TOKENS", "WELCOME_")


class Example:
    """A running example: its process, and its stderr (the log) read line by line as it comes."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="example-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def logged(self, text: str) -> bool:
        return text in self.log

    def port(self, pattern: str) -> int:
        """The port the example announces in its log once it serves (`pattern` holds one group: the port)."""
        wait_until(lambda: re.search(pattern, self.log) or self.process.poll() is not None, "the example to serve", timeout=15)
        found = re.search(pattern, self.log)
        assert found, f"exited with {self.process.returncode}:\n{self.log}"
        return int(found.group(1))

    def stop(self) -> int:
        """SIGTERM, then the exit status (a graceful stop must take a few seconds at most)."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        """The exit status, once the process has exited and its log has been read to the end."""
        code = self.process.wait(timeout=15)
        self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()
        self.process.stderr.close()


@contextlib.contextmanager
def running(args: list[str], **environment: str):
    """`python args...` with a clean jobrunner environment plus `environment`; killed if the test left it running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_ENVIRONMENT)}
    env.update(JOBRUNNER_HOST="127.0.0.1", PORT="0", JOBRUNNER_GRACEFUL_TIMEOUT="10", **environment)
    process = subprocess.Popen([sys.executable, *args], env=env, stderr=subprocess.PIPE, text=True, cwd=EXAMPLES.parent)
    example = Example(process)
    try:
        yield example
    finally:
        example.close()


def job_status(api: Api, name: str, job_id: str) -> tuple[str, int]:
    job = api.get(f"/v1/jobs/{name}/{job_id}").json
    return job["status"], job["attempts"]


# --- examples/welcome_emails.py: an in-process worker -----------------------------


def test_welcome_emails_sends_in_process_retries_a_raising_attempt_and_fails_bad_data_at_once(db_url, tmp_path):
    outbox = tmp_path / "mail" / "outbox.txt"  # no such directory yet: writing the outbox raises OSError
    with running(
        ["examples/welcome_emails.py"],
        DATABASE_URL=db_url,
        JOBRUNNER_USERS=f"{API_USER}:{API_PASSWORD}",
        JOBRUNNER_WORKERS="1",
        WELCOME_OUTBOX=str(outbox),
    ) as app:
        api = Api(app.port(r"listening on (\d+)"))
        created = api.post("/v1/jobs", {"name": "welcome_email", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 2})
        assert created.status == 201, created.body

        ada = f"job_{uuid.uuid4()}"
        assert api.put(f"/v1/jobs/welcome_email/{ada}", {"data": {"to": "ada@example.com", "name": "Ada"}}).status == 202
        # the first attempt raised: a failed attempt, queued again with one attempt fewer, its traceback logged
        wait_until(lambda: job_status(api, "welcome_email", ada) == ("queued", 2), "the raising attempt to be retried")
        wait_until(lambda: app.logged("the worker raised") and app.logged("FileNotFoundError"), "the traceback in the log")

        outbox.parent.mkdir()  # the transient error goes away: the retry succeeds
        wait_until(lambda: job_status(api, "welcome_email", ada)[0] == "succeeded", "the retry to succeed", timeout=10)
        assert outbox.read_text() == "To: ada@example.com\nSubject: Welcome, Ada!\n\nHello Ada, and welcome aboard.\n\n"

        no_address = f"job_{uuid.uuid4()}"
        assert api.put(f"/v1/jobs/welcome_email/{no_address}", {"data": {"name": "Bob"}}).status == 202
        # archived failed after one attempt (3 -> 2 remaining), no retry
        wait_until(lambda: job_status(api, "welcome_email", no_address) == ("failed", 2), "the job without an address to fail")

        # a type the application has no worker for: the default worker fails it at once
        other = f"job_{uuid.uuid4()}"
        assert api.post("/v1/jobs", {"name": "invoice", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 1}).status == 201
        assert api.put(f"/v1/jobs/invoice/{other}", {"data": {}}).status == 202
        wait_until(lambda: job_status(api, "invoice", other) == ("failed", 2), "the job of another type to fail")
        wait_until(lambda: app.logged("no worker for job type 'invoice'"), "the refusal in the log")

        assert app.stop() == 0, app.log
    assert outbox.read_text().count("To: ") == 1
    assert app.log.count("the worker raised") == 1


def test_welcome_emails_workers_named_in_the_environment_of_jobrunner_run(db_url, tmp_path):
    outbox = tmp_path / "outbox.txt"
    with running(
        ["-m", "jobrunner", "run"],
        DATABASE_URL=db_url,
        JOBRUNNER_USERS=f"{API_USER}:{API_PASSWORD}",
        JOBRUNNER_JOB_WORKERS="welcome_email=welcome_emails:WelcomeEmails",
        JOBRUNNER_DEFAULT_WORKER="welcome_emails:NoOtherWork",
        JOBRUNNER_WORKERS="1",
        WELCOME_OUTBOX=str(outbox),
        PYTHONPATH=str(EXAMPLES),
    ) as service:
        api = Api(service.port(r"listening on (\d+)"))
        assert api.post("/v1/jobs", {"name": "welcome_email", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 2}).status == 201
        job_id = f"job_{uuid.uuid4()}"
        assert api.put(f"/v1/jobs/welcome_email/{job_id}", {"data": {"to": "ada@example.com", "name": "Ada"}}).status == 202
        wait_until(lambda: job_status(api, "welcome_email", job_id)[0] == "succeeded", "the job to succeed")
        assert outbox.read_text().startswith("To: ada@example.com\n")
        assert service.stop() == 0, service.log


def test_welcome_emails_without_api_users_exits_2_naming_the_setting(db_url):
    with running(["examples/welcome_emails.py"], DATABASE_URL=db_url) as app:
        assert app.wait() == 2
    assert "JOBRUNNER_USERS (users): no API users configured" in app.log


# --- examples/token_auth.py: a custom Authorizer ----------------------------------

TOKENS = """\
# client   token                                   (disabled: known, but refused)
billing    b3Jk3vV0x2cQq9Yw1mJ8fT4sZr6nL0pA
reports    Qm9uZ2lsZS1yZXBvcnRzLXRva2VuLTIwMjQ     disabled
"""


def check_tokens(api: Api) -> None:
    assert api.get("/v1/jobs", auth=("billing", "b3Jk3vV0x2cQq9Yw1mJ8fT4sZr6nL0pA")).status == 200
    for auth in (("billing", "wrong"), ("nobody", "b3Jk3vV0x2cQq9Yw1mJ8fT4sZr6nL0pA"), (API_USER, API_PASSWORD)):
        wrong = api.get("/v1/jobs", auth=auth)
        assert (wrong.status, wrong.json["id"]) == (401, "unauthorized"), auth
        assert wrong.headers["www-authenticate"] == 'Basic realm="jobrunner"'
    disabled = api.get("/v1/jobs", auth=("reports", "Qm9uZ2lsZS1yZXBvcnRzLXRva2VuLTIwMjQ"))
    assert (disabled.status, disabled.json["id"], disabled.json["title"]) == (403, "forbidden", "Client 'reports' is disabled")
    assert "www-authenticate" not in disabled.headers  # known: asking again for credentials would not help
    anonymous = api.get("/v1/jobs", auth=None)
    assert (anonymous.status, anonymous.json["id"]) == (401, "unauthorized")


def test_token_auth_serves_the_api_from_its_own_process_until_sigterm(db_url, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    with running(["examples/token_auth.py"], DATABASE_URL=db_url, API_TOKENS_FILE=str(tokens)) as app:
        api = Api(app.port(r"serving the API on 127\.0\.0\.1:(\d+)"))
        check_tokens(api)
        assert app.stop() == 0, app.log


def test_token_auth_named_in_the_configuration_of_jobrunner_run(db_url, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    with running(
        ["-m", "jobrunner", "run"],
        DATABASE_URL=db_url,
        JOBRUNNER_AUTHORIZER="token_auth:from_config",
        JOBRUNNER_USERS=f"{API_USER}:{API_PASSWORD}",  # replaced by the authorizer: refused below
        JOBRUNNER_WORKERS="0",
        API_TOKENS_FILE=str(tokens),
        PYTHONPATH=str(EXAMPLES),
    ) as service:
        api = Api(service.port(r"listening on (\d+)"))
        check_tokens(api)
        assert service.stop() == 0, service.log

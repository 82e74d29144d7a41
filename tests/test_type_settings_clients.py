"""A job type's delivery settings through the Python client and the command line, against the real server."""

import base64
import json
import os
import subprocess
import sys

import pytest
from conftest import API_PASSWORD, API_USER

from jobrunner.client import ApiError, Client

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()


@pytest.fixture
def client(api):
    return Client(f"http://127.0.0.1:{api.port}", API_USER, API_PASSWORD)


@pytest.fixture
def jr(api):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env.update(JOBRUNNER_URL=f"http://127.0.0.1:{api.port}", JOBRUNNER_API_USER=API_USER, JOBRUNNER_API_PASSWORD=API_PASSWORD)

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobrunner", *args], capture_output=True, text=True, env=env, timeout=60, input=stdin)

    return run


def test_the_client_creates_updates_and_clears_settings(client):
    created = client.create_type(
        "email", "at_least_once", 3, 5,
        downstream_url="https://mail.example/hooks", job_timeout=1800, retry={"min_backoff": 1, "max_backoff": 600},
        rate_limit={"per_second": 0.5}, callback_token="c" * 24, signing_secrets=(SECRET, OTHER_SECRET),
    )
    assert (created["downstream_url"], created["job_timeout"], created["rate_limit"]) == ("https://mail.example/hooks", 1800.0, {"per_second": 0.5, "burst": None})
    assert created["callback_token_set"] is True and created["signing_secrets_set"] == 2
    changed = client.update_type("email", concurrency=2, retry={"max_doublings": 4}, job_timeout=None)
    assert changed["retry"] == {"min_backoff": 1.0, "max_backoff": 600.0, "max_doublings": 4, "max_retry_duration": None}
    assert changed["job_timeout"] is None and changed["downstream_url"] == "https://mail.example/hooks"  # None clears; not given: left
    assert client.type("email") == changed
    with pytest.raises(ApiError) as refused:
        client.update_type("email", rate_limit={"per_second": 0})
    assert refused.value.status == 400 and "rate_limit.per_second" in refused.value.title
    with pytest.raises(TypeError, match="rate_limt"):
        client.update_type("email", rate_limt={"per_second": 1})


def test_the_command_line_sets_lists_shows_and_clears_settings(jr):
    created = jr(
        "types", "create", "email", "--downstream-url", "https://mail.example", "--job-timeout", "30m", "--retry-max-backoff", "1h",
        "--retry-max-doublings", "5", "--rate-limit-per-second", "0.5", "--callback-token", "-", "--signing-secret", SECRET,
        stdin="token-from-stdin-0123\n",
    )
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == (
        "created email: at_least_once, 3 attempts, concurrency 5; to https://mail.example, callback within 30m, "
        "retry max 1h 5 doublings, 0.5/s, callback token, signed (1 secret)"
    )
    jr("types", "create", "sms")
    listing = jr("types", "list").stdout.splitlines()
    assert listing[0].split()[-1] == "SETTINGS" and listing[2].split()[-1] == "-"
    assert listing[1].startswith("email") and listing[1].endswith("signed (1 secret)")
    shown = jr("types", "get", "email", "--json")
    assert json.loads(shown.stdout)["job_timeout"] == 1800.0 and "token-from-stdin" not in shown.stdout
    lines = {line.split()[0]: line.split()[1:] for line in jr("types", "get", "email").stdout.splitlines()[1:]}
    assert lines["retry.max_backoff"] == ["3600.0"] and lines["callback_token_set"] == ["true"] and lines["downstream_timeout"] == ["-"]
    cleared = jr("types", "update", "email", "--job-timeout", "none", "--signing-secret", "none", "--rate-limit-burst", "4", "--json")
    answer = json.loads(cleared.stdout)
    assert (answer["job_timeout"], answer["signing_secrets_set"], answer["rate_limit"]) == (None, 0, {"per_second": 0.5, "burst": 4})


def test_the_command_line_says_what_is_wrong(jr):
    jr("types", "create", "email")
    nothing = jr("types", "update", "email")
    assert nothing.returncode == 2 and "give --attempts, --concurrency or a setting" in nothing.stderr
    refused = jr("types", "update", "email", "--retry-min-backoff", "90", "--retry-max-backoff", "60")
    assert refused.returncode == 1 and "Invalid retry.min_backoff" in refused.stderr
    not_a_duration = jr("types", "update", "email", "--job-timeout", "soon")
    assert not_a_duration.returncode == 2 and "--job-timeout" in not_a_duration.stderr

"""Standard Webhooks signatures: the specification's vectors, what breaks a signature, rotation, the setting."""

import http.client
import io
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import downstream_stub as stub
import pytest
from conftest import API_PASSWORD, API_USER, DOWNSTREAM_PASSWORD, count_rows, running_service, wait_until
from downstream_stub import DownstreamStub

from jobrunner import signing, store
from jobrunner.client import WebhookVerificationError, verify_webhook
from jobrunner.config import ConfigError, effective_settings, load_config
from jobrunner.downstream import Delivery, Downstream
from jobrunner.models import QueuedJob

# The published test vectors of the Standard Webhooks reference libraries
# (github.com/standard-webhooks/standard-webhooks: libraries/python/tests/test_webhooks.py,
# test_sign_function and the invalid/multi-signature cases; the same values are in
# libraries/javascript/src/webhook.test.ts and libraries/go/webhook_test.go).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_PAYLOAD = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
VECTOR_WRONG_SIGNATURES = (
    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",  # the last character changed
    "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
    "v1,dawfeoifkpqwoekfpqoekf",
    "v1,",
    "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",  # the right digest under another scheme's name
)
# the reference tests' secrets needing no, one and two padding characters, each given without them
UNPADDED_SECRETS = ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBr")

SECRET_A = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="  # 32 bytes
SECRET_B = "whsec_" + "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI="
SECRET_C = "whsec_" + "Q0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0M="


def vector_headers(signature: str = VECTOR_SIGNATURE) -> dict:
    return {"webhook-id": VECTOR_MSG_ID, "webhook-timestamp": str(VECTOR_TIMESTAMP), "webhook-signature": signature}


# --- the specification's vectors ------------------------------------------------


def test_signing_the_vector_gives_its_published_signature():
    assert signing.sign([VECTOR_SECRET], VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD) == vector_headers()


def test_the_vector_verifies_with_or_without_the_whsec_prefix():
    for secret in (VECTOR_SECRET, VECTOR_SECRET.removeprefix("whsec_")):
        verify_webhook(secret, vector_headers(), VECTOR_PAYLOAD, now=VECTOR_TIMESTAMP)


@pytest.mark.parametrize("wrong", VECTOR_WRONG_SIGNATURES)
def test_a_wrong_signature_from_the_vectors_is_refused(wrong):
    with pytest.raises(WebhookVerificationError, match="no valid signature"):
        verify_webhook(VECTOR_SECRET, vector_headers(wrong), VECTOR_PAYLOAD, now=VECTOR_TIMESTAMP)


def test_one_valid_signature_among_several_verifies():
    mixed = " ".join([*VECTOR_WRONG_SIGNATURES[1:3], VECTOR_SIGNATURE, VECTOR_WRONG_SIGNATURES[1]])
    verify_webhook(VECTOR_SECRET, vector_headers(mixed), VECTOR_PAYLOAD, now=VECTOR_TIMESTAMP)


@pytest.mark.parametrize("unpadded", UNPADDED_SECRETS)
def test_a_secret_without_its_base64_padding_reads_as_the_padded_one(unpadded):
    padded = unpadded + "=" * (-len(unpadded) % 4)
    headers = signing.sign([padded], VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD)
    for secret in (unpadded, "whsec_" + unpadded):
        verify_webhook(secret, headers, VECTOR_PAYLOAD, now=VECTOR_TIMESTAMP)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_refused(missing):
    headers = vector_headers()
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify_webhook(VECTOR_SECRET, headers, VECTOR_PAYLOAD, now=VECTOR_TIMESTAMP)


@pytest.mark.parametrize("stamp", ["hello", "", "1614265330.0", "-1614265330", "١٦١٤٢٦٥٣٣٠"])
def test_a_timestamp_that_is_not_whole_seconds_is_refused(stamp):
    headers = {**vector_headers(), "webhook-timestamp": stamp}
    with pytest.raises(WebhookVerificationError):
        verify_webhook(VECTOR_SECRET, headers, VECTOR_PAYLOAD, now=VECTOR_TIMESTAMP)


# --- sign, then verify ------------------------------------------------------------


def test_a_signed_request_verifies_and_any_change_breaks_it():
    body = b'{"data":{"to":"someone@example.com"},"attempts":3}'
    headers = signing.sign([SECRET_A], "job_6740b44e-13b9-475d-af06-979627e0e0d6-3", 1_700_000_000, body)
    verify_webhook(SECRET_A, headers, body, now=1_700_000_000)
    verify_webhook(SECRET_A, headers, body.decode(), now=1_700_000_000)  # a str body is its UTF-8 bytes
    changed = {
        "body": (SECRET_A, headers, body.replace(b"3}", b"2}")),
        "timestamp": (SECRET_A, {**headers, "webhook-timestamp": "1700000001"}, body),
        "id": (SECRET_A, {**headers, "webhook-id": headers["webhook-id"][:-1] + "2"}, body),
        "secret": (SECRET_B, headers, body),
    }
    for what, (secret, sent, received) in changed.items():
        with pytest.raises(WebhookVerificationError, match="no valid signature"):
            verify_webhook(secret, sent, received, now=1_700_000_000)
            pytest.fail(f"a changed {what} verified")


def test_header_names_are_read_in_any_case_from_a_dict_or_an_http_message():
    headers = signing.sign([SECRET_A], "msg_1", 1_700_000_000, b"{}")
    verify_webhook(SECRET_A, {name.title(): value for name, value in headers.items()}, b"{}", now=1_700_000_000)
    raw = "".join(f"{name.upper()}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    message = http.client.parse_headers(io.BytesIO(raw.encode()))
    verify_webhook(SECRET_A, message, b"{}", now=1_700_000_000)


def test_the_timestamp_must_be_within_the_tolerance_either_way():
    headers = signing.sign([SECRET_A], "msg_1", 1_700_000_000, b"{}")
    for now in (1_700_000_000 - 300, 1_700_000_000 + 300):
        verify_webhook(SECRET_A, headers, b"{}", now=now)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify_webhook(SECRET_A, headers, b"{}", now=1_700_000_301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify_webhook(SECRET_A, headers, b"{}", now=1_699_999_699)
    verify_webhook(SECRET_A, headers, b"{}", tolerance=3600, now=1_700_003_600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify_webhook(SECRET_A, headers, b"{}", tolerance=10, now=1_700_000_011)


def test_without_now_the_clock_of_this_host_decides():
    fresh = signing.sign([SECRET_A], "msg_1", int(time.time()), b"{}")
    verify_webhook(SECRET_A, fresh, b"{}")
    stale = signing.sign([SECRET_A], "msg_1", int(time.time()) - 3600, b"{}")
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify_webhook(SECRET_A, stale, b"{}")


def test_during_a_rotation_both_secrets_sign_and_a_receiver_holding_either_verifies():
    headers = signing.sign([SECRET_B, SECRET_A], "msg_1", 1_700_000_000, b"{}")
    assert len(headers["webhook-signature"].split(" ")) == 2
    for holds in ([SECRET_A], [SECRET_B], [SECRET_A, SECRET_B], SECRET_B):
        verify_webhook(holds, headers, b"{}", now=1_700_000_000)
    # a receiver that kept only the old secret after the sender dropped it is refused
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET_A, signing.sign([SECRET_B], "msg_1", 1_700_000_000, b"{}"), b"{}", now=1_700_000_000)


def test_signing_or_verifying_without_a_secret_is_a_mistake_not_a_pass():
    with pytest.raises(ValueError):
        signing.sign([], "msg_1", 1_700_000_000, b"{}")
    with pytest.raises(ValueError):
        verify_webhook([], vector_headers(), VECTOR_PAYLOAD, now=VECTOR_TIMESTAMP)
    for empty in ("", "whsec_"):
        with pytest.raises(ValueError):
            verify_webhook(empty, vector_headers(), VECTOR_PAYLOAD, now=VECTOR_TIMESTAMP)


def test_the_client_module_needs_no_database_driver():
    code = "import sys, jobrunner.client; assert not [m for m in sys.modules if 'psycopg' in m], sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the setting --------------------------------------------------------------------


@pytest.mark.parametrize("secret, why", [
    ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with whsec_"),
    ("whsec_not base64!", "base64"),
    ("whsec_c2hvcnQ=", "24 to 64 bytes of key, not 5"),
    ("whsec_" + "QUFB" * 22, "24 to 64 bytes of key, not 66"),
])
def test_check_secret_says_what_is_wrong(secret, why):
    with pytest.raises(ValueError, match=why):
        signing.check_secret(secret)


def test_the_global_secrets_come_from_the_environment_or_the_config_file(tmp_path):
    assert load_config({}).signing_secrets == ()
    config = load_config({"JOBRUNNER_SIGNING_SECRETS": f" {SECRET_A} , {SECRET_B} "})
    assert config.signing_secrets == (SECRET_A, SECRET_B)
    path = tmp_path / "jobrunner.ini"
    path.write_text(f"[jobrunner]\nsigning_secrets = {SECRET_B}\n")
    assert load_config({}, str(path)).signing_secrets == (SECRET_B,)
    assert load_config({"JOBRUNNER_SIGNING_SECRETS": SECRET_A}, str(path)).signing_secrets == (SECRET_A,)


def test_at_most_two_global_secrets_as_for_a_type():
    with pytest.raises(ConfigError, match="at most 2 secrets"):
        load_config({"JOBRUNNER_SIGNING_SECRETS": ",".join([SECRET_A, SECRET_B, SECRET_C])})


def test_a_bad_secret_fails_at_start_naming_the_setting_and_never_showing_a_secret():
    with pytest.raises(ConfigError) as refused:
        load_config({"JOBRUNNER_SIGNING_SECRETS": f"{SECRET_A},whsec_c2hvcnQ="})
    message = str(refused.value)
    assert message.startswith("JOBRUNNER_SIGNING_SECRETS (signing_secrets, from $JOBRUNNER_SIGNING_SECRETS): secret 2 of 2:")
    assert SECRET_A not in message and "c2hvcnQ" not in message


def test_the_secrets_are_masked_wherever_the_config_is_shown():
    config = load_config({"JOBRUNNER_SIGNING_SECRETS": SECRET_A})
    assert SECRET_A not in repr(config)
    line = next(line for line in effective_settings(config).splitlines() if line.startswith("signing_secrets"))
    assert "****" in line and SECRET_A not in line


# --- what the downstream receives ---------------------------------------------------

NOW = datetime.now(timezone.utc)
JOB = QueuedJob(uuid.uuid4(), "email", 3, NOW, None, NOW, NOW, "in-progress", {"to": "a@example.com"})


@pytest.fixture
def receiver():
    """A downstream that records each POST (headers and raw body) and answers 202."""
    downstream = DownstreamStub(0, (API_USER, API_PASSWORD), DOWNSTREAM_PASSWORD)
    downstream.policy = lambda post: stub.ACCEPT_SILENTLY
    yield downstream
    downstream.close()


def post_once(receiver, job=JOB, global_secrets=(), **kwargs):
    client = Downstream(receiver.url, DOWNSTREAM_PASSWORD, 5, global_secrets)
    try:
        assert client.post(job, **kwargs)[0] is Delivery.ACCEPTED
    finally:
        client.close()
    return receiver.posts[-1]


def test_without_secrets_or_token_the_post_carries_exactly_rickovers_headers(receiver):
    post = post_once(receiver)
    assert set(post.headers) == {"accept-encoding", "content-length", "host", "user-agent", "authorization", "content-type", "accept"}


def test_with_the_global_secrets_each_post_is_signed_under_the_attempts_id(receiver):
    before = int(time.time())
    post = post_once(receiver, global_secrets=(SECRET_A,))
    verify_webhook(SECRET_A, post.headers, post.raw)
    assert post.headers["webhook-id"] == f"{JOB.job_id}-3"  # the body's "attempts": what its callback names
    assert before <= int(post.headers["webhook-timestamp"]) <= time.time()
    assert post.authorization.startswith("Basic ")  # in addition to Basic auth, not instead
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET_B, post.headers, post.raw)


def test_a_types_own_secrets_replace_the_global_ones_and_during_a_rotation_both_sign(receiver):
    post = post_once(receiver, global_secrets=(SECRET_A,), signing_secrets=(SECRET_C, SECRET_B))
    for holds in (SECRET_C, SECRET_B):  # a downstream that has the new secret, or still the old one
        verify_webhook(holds, post.headers, post.raw)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET_A, post.headers, post.raw)


def test_a_types_callback_token_travels_with_its_job(receiver):
    post = post_once(receiver, callback_token="tok-0123456789abcdef")
    assert post.headers["jobrunner-callback-token"] == "tok-0123456789abcdef"
    assert not any(name.startswith("webhook-") for name in post.headers)


def test_a_real_service_signs_every_post_and_its_downstream_verifies_each(db_url, detached_downstream):
    """`jobrunner run` with global secrets, a type with its own (in rotation) and a callback token: a downstream
    holding one secret per type verifies every request it receives, and refuses any other."""
    downstream = detached_downstream
    holds = {"email": SECRET_A, "sms": SECRET_B}  # sms's downstream still has the old secret of the rotation
    refused = []

    def verify_then_accept(post):
        try:
            verify_webhook(holds[post.name], post.headers, post.raw)
        except WebhookVerificationError as error:
            refused.append(f"{post.name} {post.job_id}: {error}")
            return stub.ERROR_500
        other = holds["sms" if post.name == "email" else "email"]
        with pytest.raises(WebhookVerificationError):  # the other type's secret does not verify it
            verify_webhook(other, post.headers, post.raw)
        return stub.ACCEPT

    downstream.policy = verify_then_accept
    with running_service(db_url, downstream.url, JOBRUNNER_SIGNING_SECRETS=SECRET_A) as service:
        downstream.api_port = service.port
        own = {"sms": {"signing_secrets": [SECRET_C, SECRET_B], "callback_token": "tok-0123456789abcdef"}}  # a rotation
        for name in holds:
            body = {"name": name, "delivery_strategy": "at_least_once", "attempts": 1, "concurrency": 5, **own.get(name, {})}
            assert service.api.post("/v1/jobs", body).status == 201
        ids = {name: [enqueue_over(service, name) for _ in range(10)] for name in holds}
        wait_until(lambda: succeeded(db_url) == 20 or refused, "20 jobs to succeed", timeout=30)
    assert not refused and not downstream.callback_errors
    assert {post.job_id for post in downstream.posts} == {job_id for each in ids.values() for job_id in each}
    assert all(post.headers["jobrunner-callback-token"] == "tok-0123456789abcdef" for post in downstream.posts if post.name == "sms")
    assert not any("jobrunner-callback-token" in post.headers for post in downstream.posts if post.name == "email")


def enqueue_over(service, name: str) -> str:
    job_id = f"job_{uuid.uuid4()}"
    assert service.api.put(f"/v1/jobs/{name}/{job_id}", {"data": {"n": 1}}).status == 202
    return job_id


def succeeded(db_url: str) -> int:
    with store.connect(db_url) as conn:
        return count_rows(conn, "archived_jobs", "succeeded")


def test_the_downstream_example_in_the_client_docs_is_python_using_what_the_client_exports():
    import ast
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "client.md").read_text()
    [example] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "verify_webhook" in block]
    imported = {alias.name for node in ast.walk(ast.parse(example)) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert {"verify_webhook", "WebhookVerificationError"} <= imported
    import jobrunner.client

    assert all(hasattr(jobrunner.client, name) for name in ("verify_webhook", "WebhookVerificationError"))

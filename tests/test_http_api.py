"""The v1 HTTP API over real loopback HTTP: every route's success and error paths."""

import base64
import hashlib
import os
import re
import socket
import tempfile
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from conftest import run_concurrently, running_server, wait_until

from jobrunner import migrate, services, store
from jobrunner.localdb import LocalPostgres

EMAIL = {"name": "email", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 2}


def job_id():
    return f"job_{uuid.uuid4()}"


def assert_error(response, status, error_id):
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.json["id"] == error_id, response.json
    assert response.json["title"]


@pytest.fixture
def email(api):
    assert api.post("/v1/jobs", EMAIL).status == 201
    return api


def claim_one(db_url, name="email"):
    conn = store.connect(db_url)
    try:
        [job] = services.claim(conn, name, limit=1).jobs
        return job
    finally:
        conn.close()


# --- job types ---------------------------------------------------------------


def test_create_and_get_a_job_type(api):
    created = api.post("/v1/jobs", EMAIL)
    assert created.status == 201
    assert {k: created.json[k] for k in EMAIL} == EMAIL
    assert created.json["created_at"].endswith("Z")
    fetched = api.get("/v1/jobs/email")
    assert (fetched.status, fetched.json) == (200, created.json)
    assert_error(api.get("/v1/jobs/nope"), 404, "not_found")


@pytest.mark.parametrize(
    "body, error_id",
    [
        ({**EMAIL, "name": ""}, "missing_parameter"),
        ({k: v for k, v in EMAIL.items() if k != "name"}, "missing_parameter"),
        ({**EMAIL, "delivery_strategy": ""}, "missing_parameter"),
        ({**EMAIL, "delivery_strategy": "sometimes"}, "invalid_delivery_strategy"),
        ({**EMAIL, "attempts": 0}, "invalid_parameter"),
        ({k: v for k, v in EMAIL.items() if k != "attempts"}, "invalid_parameter"),
        ({**EMAIL, "name": "has space"}, "invalid_parameter"),
        ({**EMAIL, "name": "job_x"}, "invalid_parameter"),
        ({**EMAIL, "attempts": 256}, "invalid_request"),
        ({**EMAIL, "concurrency": -1}, "invalid_request"),
        ({**EMAIL, "concurrency": "2"}, "invalid_request"),
    ],
)
def test_invalid_job_types_are_refused(api, body, error_id):
    assert_error(api.post("/v1/jobs", body), 400, error_id)
    assert api.get("/v1/jobs").json == {"job_types": []}


def test_a_duplicate_job_type_is_refused(email):
    response = email.post("/v1/jobs", EMAIL)
    assert_error(response, 400, "invalid_parameter")
    assert "already exists" in response.json["title"]


def test_list_job_types_with_live_counts(email, db_url):
    email.post("/v1/jobs", {**EMAIL, "name": "sms"})
    for _ in range(3):
        email.put(f"/v1/jobs/email/{job_id()}", {"data": {}})
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    email.put(f"/v1/jobs/email/{job_id()}", {"data": {}, "run_after": later})
    claim_one(db_url)

    listed = email.get("/v1/jobs").json["job_types"]

    assert [(t["name"], t["queued"], t["in_progress"], t["due"]) for t in listed] == [("email", 3, 1, 2), ("sms", 0, 0, 0)]


def test_update_concurrency_and_attempts_while_running(email):
    updated = email.post("/v1/jobs/email", {"concurrency": 0})
    assert (updated.status, updated.json["concurrency"], updated.json["attempts"]) == (200, 0, 3)
    assert email.post("/v1/jobs/email", {"attempts": 5, "concurrency": 7}).json["attempts"] == 5
    assert email.get("/v1/jobs/email").json["concurrency"] == 7
    assert_error(email.post("/v1/jobs/email", {}), 400, "invalid_parameter")
    assert_error(email.post("/v1/jobs/nope", {"concurrency": 1}), 404, "not_found")


# --- enqueue -----------------------------------------------------------------


def test_enqueue_answers_202_with_the_queued_job(email):
    jid = job_id()
    run_after = "2030-01-02T03:04:05.123456Z"
    response = email.put(f"/v1/jobs/email/{jid}", {"data": {"to": "a@example.com"}, "run_after": run_after, "expires_at": None})
    assert response.status == 202
    assert response.json == {
        "id": jid,
        "name": "email",
        "attempts": 3,
        "run_after": run_after,
        "expires_at": None,
        "created_at": response.json["created_at"],
        "updated_at": response.json["updated_at"],
        "status": "queued",
        "data": {"to": "a@example.com"},
        "priority": 0,
    }


def test_a_jobs_priority_is_stored_returned_and_listed(email):
    jid = job_id()
    enqueued = email.put(f"/v1/jobs/email/{jid}", {"data": {}, "priority": -32768})
    assert (enqueued.status, enqueued.json["priority"]) == (202, -32768)
    assert email.put(f"/v1/jobs/email/{job_id()}", {"data": {}, "priority": 32767}).json["priority"] == 32767
    assert email.put(f"/v1/jobs/email/{job_id()}", {"data": {}, "priority": None}).json["priority"] == 0

    assert email.get(f"/v1/jobs/email/{jid}").json["priority"] == -32768
    assert sorted(job["priority"] for job in email.get("/v1/jobs/email/jobs").json["jobs"]) == [-32768, 0, 32767]


@pytest.mark.parametrize("priority", [True, False, 1.5, 1.0, "1", 32768, -32769, [1], {"level": 1}])
def test_a_priority_that_is_not_a_smallint_is_refused_naming_it_and_nothing_stored(email, priority):
    jid = job_id()
    refused = email.put(f"/v1/jobs/email/{jid}", {"data": {}, "priority": priority})
    assert_error(refused, 400, "invalid_request")
    assert "priority" in refused.json["detail"]
    assert_error(email.get(f"/v1/jobs/email/{jid}"), 404, "not_found")


def test_enqueue_random_id_and_any_json_data(email):
    for data in (None, [1, 2], "text", 3.5, {"nested": {"a": [True]}}):
        response = email.put("/v1/jobs/email/random_id", {"data": data})
        assert response.status == 202
        assert response.json["data"] == data
        assert uuid.UUID(response.json["id"][4:]).version == 4


def test_enqueue_is_idempotent(email):
    jid = job_id()
    first = email.put(f"/v1/jobs/email/{jid}", {"data": {"v": 1}})
    second = email.put(f"/v1/jobs/email/{jid}", {"data": {"v": 2}})
    assert (second.status, second.json) == (202, first.json)


def test_twenty_concurrent_identical_puts_make_exactly_one_job(email, db_url):
    jid = job_id()
    responses = run_concurrently([lambda: email.put(f"/v1/jobs/email/{jid}", {"data": {"same": True}})] * 20)

    assert [r.status for r in responses] == [202] * 20
    assert len({r.body for r in responses}) == 1
    conn = store.connect(db_url)
    assert conn.execute("SELECT count(*) FROM queued_jobs").fetchone()[0] == 1
    conn.close()


def test_enqueue_errors(email):
    assert_error(email.put(f"/v1/jobs/nope/{job_id()}", {"data": {}}), 404, "job_type_not_found")
    assert email.put(f"/v1/jobs/nope/{job_id()}", {"data": {}}).json["instance"] == "/v1/jobs/nope"
    assert_error(email.put(f"/v1/jobs/email/{job_id()}", {}), 400, "missing_parameter")
    assert_error(email.put("/v1/jobs/email/job_123", {"data": {}}), 400, "invalid_uuid")
    assert_error(email.put(f"/v1/jobs/email/job_x{uuid.uuid4()}", {"data": {}}), 400, "invalid_prefix")
    assert_error(email.put(f"/v1/jobs/email/{job_id()}", {"data": {}, "run_after": "2016-01-11"}), 400, "invalid_request")
    assert_error(email.put(f"/v1/jobs/email/{job_id()}", {"data": "x" * 102400}), 413, "entity_too_large")
    assert email.put(f"/v1/jobs/email/{job_id()}", {"data": "x" * 102000}).status == 202
    assert_error(email.put(f"/v1/jobs/email/{job_id()}", {"data": "nul\u0000"}), 400, "invalid_parameter")


@pytest.mark.parametrize("field", ["run_after", "expires_at"])
@pytest.mark.parametrize(
    "value",
    ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "9999-12-31T00:00:00Z", "0001-01-01T12:00:00Z"],
)
def test_a_timestamp_outside_what_postgres_and_python_both_hold_is_refused_and_nothing_stored(email, field, value):
    """A day's margin at each end of Python's datetime, so a retry's later run_after still fits (issue 14, defect 1)."""
    jid = job_id()
    refused = email.put(f"/v1/jobs/email/{jid}", {"data": {}, field: value})
    assert_error(refused, 400, "invalid_parameter")
    assert field in refused.json["title"]
    assert_error(email.get(f"/v1/jobs/email/{jid}"), 404, "not_found")
    assert email.get("/v1/jobs/email/jobs").json["jobs"] == []


def test_timestamps_at_the_edges_of_the_range_are_stored(email):
    jid = job_id()
    stored = email.put(f"/v1/jobs/email/{jid}", {"data": {}, "run_after": "0001-01-02T00:00:00Z", "expires_at": "9999-12-30T23:59:59Z"})
    assert stored.status == 202, stored.body
    assert email.get(f"/v1/jobs/email/{jid}").json["expires_at"] == "9999-12-30T23:59:59Z"


def test_a_big_body_with_a_lone_surrogate_is_a_400_as_a_small_one_is(email):
    """Over 100 KiB the data's size is measured: a lone surrogate must not turn that into a 500 (issue 14, defect 5)."""
    small = email.put(f"/v1/jobs/email/{job_id()}", {"data": {"s": "\ud800"}})
    big = email.put(f"/v1/jobs/email/{job_id()}", {"data": {"pad": "x" * 100_000, "s": "\ud800"}, "other": "y" * 5000})
    assert_error(small, 400, small.json["id"])
    assert_error(big, 400, small.json["id"])


def test_enqueue_of_an_archived_id_or_an_id_of_another_type(email):
    email.post("/v1/jobs", {**EMAIL, "name": "sms"})
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {}})
    assert_error(email.put(f"/v1/jobs/sms/{jid}", {"data": {}}), 409, "job_id_in_use")
    assert email.post(f"/v1/jobs/email/{jid}", {"status": "succeeded", "attempt": 3}).status == 200
    assert_error(email.put(f"/v1/jobs/email/{jid}", {"data": {}}), 400, "job_already_archived")


# --- callbacks ---------------------------------------------------------------


def test_succeeded_callback_archives_and_answers_the_archived_job(email, db_url):
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {"k": 1}})
    claim_one(db_url)

    response = email.post(f"/v1/jobs/email/{jid}", {"status": "succeeded", "attempt": 3})

    assert response.status == 200
    assert {k: response.json[k] for k in ("id", "status", "attempts", "data")} == {"id": jid, "status": "succeeded", "attempts": 3, "data": {"k": 1}}
    assert email.get(f"/v1/jobs/{jid}").json["status"] == "succeeded"
    assert_error(email.post(f"/v1/jobs/email/{jid}", {"status": "succeeded", "attempt": 3}), 400, "duplicate_status_request")


def test_failed_callback_requeues_then_a_stale_one_is_refused(email, db_url):
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {}})
    claim_one(db_url)

    retried = email.post(f"/v1/jobs/email/{jid}", {"status": "failed", "attempt": 3})
    assert (retried.status, retried.json["status"], retried.json["attempts"]) == (200, "queued", 2)
    stale = email.post(f"/v1/jobs/email/{jid}", {"status": "failed", "attempt": 3})
    assert_error(stale, 400, "stale_attempt")
    assert email.get(f"/v1/jobs/email/{jid}").json["attempts"] == 2


def test_failed_not_retryable_archives(email, db_url):
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {}})
    claim_one(db_url)
    response = email.post(f"/v1/jobs/email/{jid}", {"status": "failed", "attempt": 3, "retryable": False})
    assert (response.json["status"], response.json["attempts"]) == ("failed", 2)


@pytest.mark.parametrize(
    "body, error_id",
    [
        ({"attempt": 3}, "missing_parameter"),
        ({"status": "succeeded"}, "missing_parameter"),
        ({"status": "succeeded", "attempt": None}, "missing_parameter"),
        ({"status": "done", "attempt": 3}, "invalid_status"),
        ({"status": "failed", "attempt": -1}, "invalid_request"),
        ({"status": "failed", "attempt": 3, "retryable": "no"}, "invalid_request"),
    ],
)
def test_invalid_callbacks(email, body, error_id):
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {}})
    assert_error(email.post(f"/v1/jobs/email/{jid}", body), 400, error_id)
    assert email.get(f"/v1/jobs/{jid}").json["status"] == "queued"


def test_callbacks_racing_each_other_take_effect_exactly_once(email, db_url):
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {}})
    claim_one(db_url)
    responses = run_concurrently([lambda: email.post(f"/v1/jobs/email/{jid}", {"status": "failed", "attempt": 3})] * 10)

    assert sorted(r.status for r in responses) == [200] + [400] * 9
    assert {r.json["id"] for r in responses if r.status == 400} == {"stale_attempt"}
    assert email.get(f"/v1/jobs/{jid}").json["attempts"] == 2


def test_callback_for_an_unknown_job_or_another_type(email):
    email.post("/v1/jobs", {**EMAIL, "name": "sms"})
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {}})
    assert_error(email.post(f"/v1/jobs/sms/{jid}", {"status": "succeeded", "attempt": 3}), 400, "duplicate_status_request")
    assert_error(email.post(f"/v1/jobs/email/{job_id()}", {"status": "failed", "attempt": 3}), 400, "duplicate_status_request")
    assert email.get(f"/v1/jobs/{jid}").json["status"] == "queued"


# --- get, replay, cancel, list -----------------------------------------------


def test_get_a_job_by_both_url_forms(email):
    jid = job_id()
    queued = email.put(f"/v1/jobs/email/{jid}", {"data": {}}).json
    assert email.get(f"/v1/jobs/email/{jid}").json == queued
    assert email.get(f"/v1/jobs/{jid}").json == queued
    assert_error(email.get(f"/v1/jobs/sms/{jid}"), 404, "job_not_found")
    assert_error(email.get(f"/v1/jobs/{job_id()}"), 404, "not_found")
    assert_error(email.get("/v1/jobs/email/random_id"), 400, "invalid_uuid")

    email.post(f"/v1/jobs/email/{jid}", {"status": "succeeded", "attempt": 3})
    archived = email.get(f"/v1/jobs/email/{jid}").json
    assert set(archived) == {"id", "name", "attempts", "status", "created_at", "data", "expires_at", "priority"}
    assert_error(email.get(f"/v1/jobs/sms/{jid}"), 404, "job_not_found")


def test_replay(email):
    jid = job_id()
    expires_at = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    email.put(f"/v1/jobs/email/{jid}", {"data": {"again": 1}, "expires_at": expires_at})
    assert_error(email.post(f"/v1/jobs/email/{jid}/replay"), 400, "invalid_replay_attempt")
    email.post(f"/v1/jobs/email/{jid}", {"status": "succeeded", "attempt": 3})

    for path in (f"/v1/jobs/email/{jid}/replay", f"/v1/jobs/{jid}/replay"):
        replayed = email.post(path)
        assert replayed.status == 201
        assert replayed.json["id"] != jid
        assert (replayed.json["data"], replayed.json["status"]) == ({"again": 1}, "queued")
        assert replayed.json["expires_at"] is not None
    assert_error(email.post(f"/v1/jobs/sms/{jid}/replay"), 404, "job_not_found")
    assert_error(email.post(f"/v1/jobs/{job_id()}/replay"), 404, "not_found")


def test_a_replay_under_a_client_chosen_id_is_made_once(email):
    """`{"id": "job_<uuid>"}` names the new job: sent twice (a double click, a retry), one replay (issue 14, 12c)."""
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {"again": 1}})
    email.post(f"/v1/jobs/email/{jid}", {"status": "succeeded", "attempt": 3})
    chosen = job_id()
    first = email.post(f"/v1/jobs/email/{jid}/replay", {"id": chosen})
    again = email.post(f"/v1/jobs/{jid}/replay", {"id": chosen, "note": "extra keys are accepted"})
    assert (first.status, first.json["id"], first.json["data"]) == (201, chosen, {"again": 1})
    assert again.status in (200, 201) and again.json["id"] == chosen
    assert [job["id"] for job in email.get("/v1/jobs/email/jobs?status=queued").json["jobs"]] == [chosen]
    assert email.post(f"/v1/jobs/email/{jid}/replay", {}).json["id"] not in (jid, chosen)  # as Rickover's clients send
    assert_error(email.post(f"/v1/jobs/email/{jid}/replay", {"id": "job_123"}), 400, "invalid_uuid")
    assert_error(email.post(f"/v1/jobs/email/{jid}/replay", {"id": 5}), 400, "invalid_request")
    assert_error(email.post(f"/v1/jobs/email/{jid}/replay", b"[1]"), 400, "invalid_request")


def test_cancel_a_queued_job_but_not_one_in_progress(email, db_url):
    first, second = job_id(), job_id()
    email.put(f"/v1/jobs/email/{first}", {"data": {}})
    claim_one(db_url)
    email.put(f"/v1/jobs/email/{second}", {"data": {}})

    assert_error(email.post(f"/v1/jobs/email/{first}/cancel"), 409, "invalid_cancel_attempt")
    cancelled = email.post(f"/v1/jobs/email/{second}/cancel")
    assert (cancelled.status, cancelled.json["status"]) == (200, "cancelled")
    assert email.get(f"/v1/jobs/{second}").json["status"] == "cancelled"
    assert_error(email.post(f"/v1/jobs/email/{second}/cancel"), 400, "job_already_archived")
    assert_error(email.post(f"/v1/jobs/email/{job_id()}/cancel"), 404, "not_found")


def test_page_through_a_types_jobs_newest_first(email, db_url):
    ids = []
    for n in range(7):
        ids.append(job_id())
        email.put(f"/v1/jobs/email/{ids[-1]}", {"data": {"n": n}})
    for jid in ids[:2]:
        email.post(f"/v1/jobs/email/{jid}", {"status": "succeeded", "attempt": 3})

    seen, cursor = [], None
    while True:
        page = email.get("/v1/jobs/email/jobs?limit=3" + (f"&cursor={cursor}" if cursor else "")).json
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert len(seen) == 7
    # archived jobs carry their archive time, so the two archived ones are newest
    assert set(seen[:2]) == set(ids[:2])
    assert seen[2:] == list(reversed(ids[2:]))

    succeeded = email.get("/v1/jobs/email/jobs?status=succeeded").json
    assert {job["id"] for job in succeeded["jobs"]} == set(ids[:2])
    assert succeeded["next_cursor"] is None
    assert_error(email.get("/v1/jobs/email/jobs?status=done"), 400, "invalid_parameter")
    assert_error(email.get("/v1/jobs/email/jobs?limit=0"), 400, "invalid_parameter")
    assert_error(email.get("/v1/jobs/email/jobs?cursor=bogus"), 400, "invalid_parameter")
    assert_error(email.get("/v1/jobs/nope/jobs"), 404, "not_found")


# --- operations --------------------------------------------------------------


def test_homepage(email):
    email.put(f"/v1/jobs/email/{job_id()}", {"data": {"note": "</pre><script>alert(1)</script>"}})
    response = email.get("/")
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert (response.headers["cache-control"], response.headers["x-frame-options"]) == ("no-store", "DENY")
    page = response.body.decode()
    assert "<title>jobrunner</title>" in page and 'data-type="email"' in page
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page  # job data is escaped
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert (policy["default-src"], policy["connect-src"], policy["frame-ancestors"]) == ("'none'", "'self'", "'none'")
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        [inline] = re.findall(f"<{tag}>(.*?)</{tag}>", page, re.S)  # the page's own, and nothing from the data
        assert policy[directive] == f"'sha256-{base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()}'"
    assert email.get("/", auth=None).status == 401


def test_pause_and_resume(email):
    paused = email.post("/v1/jobs/email/pause")
    assert (paused.status, paused.json["concurrency"]) == (200, 0)
    resumed = email.post("/v1/jobs/email/resume")
    assert (resumed.status, resumed.json["concurrency"]) == (200, EMAIL["concurrency"])
    assert email.post("/v1/jobs/email/pause").json["concurrency"] == 0
    # a paused type resumed with a concurrency takes that one, not the one it had before the pause
    assert email.post("/v1/jobs/email/resume", {"concurrency": 9}).json["concurrency"] == 9
    assert email.get("/v1/jobs/email").json["concurrency"] == 9
    assert_error(email.post("/v1/jobs/nope/pause"), 404, "not_found")
    assert_error(email.post("/v1/jobs/email/resume", {"concurrency": "x"}), 400, "invalid_request")
    email.post("/v1/jobs/email", {"concurrency": 0})
    assert_error(email.post("/v1/jobs/email/resume"), 409, "not_paused")


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}],
)
def test_a_change_sent_by_another_sites_page_is_refused(email, headers):
    assert_error(email.post("/v1/jobs/email/pause", headers=headers), 403, "cross_origin_request")
    assert email.get("/v1/jobs/email").json["concurrency"] == EMAIL["concurrency"]
    assert email.get("/v1/jobs/email", headers=headers).status == 200  # reading is harmless


def test_a_change_from_the_servers_own_page_is_accepted(email):
    own = {"Origin": f"http://127.0.0.1:{email.port}", "Sec-Fetch-Site": "same-origin"}
    assert email.post("/v1/jobs/email/pause", headers=own).status == 200
    # behind a proxy that rewrites Host, the browser's Sec-Fetch-Site still says it is the server's own page
    proxied = {"Origin": "https://jobs.example.com", "Sec-Fetch-Site": "same-origin"}
    assert email.post("/v1/jobs/email/resume", headers=proxied).status == 200


def test_a_malformed_origin_is_refused_not_a_server_error(email):
    assert_error(email.post("/v1/jobs/email/pause", headers={"Origin": "http://["}), 403, "cross_origin_request")


def test_resume_refuses_a_chunked_body_as_every_route_does(email):
    response = email.post("/v1/jobs/email/resume", b'{"concurrency": 9}', headers={"Transfer-Encoding": "chunked"})
    assert_error(response, 411, "length_required")


def test_healthz_needs_no_auth(api):
    response = api.get("/healthz", auth=None)
    assert (response.status, response.json) == (200, {"status": "ok"})


def test_metrics_count_requests_enqueues_and_callbacks(email):
    jid = job_id()
    email.put(f"/v1/jobs/email/{jid}", {"data": {}})
    email.post(f"/v1/jobs/email/{jid}", {"status": "succeeded", "attempt": 3})
    email.get("/v1/jobs/nope")

    text = email.get("/metrics").body.decode()

    assert 'jobrunner_http_requests_total{route="enqueue",status="202"} 1' in text
    assert 'jobrunner_http_requests_total{route="get_job_type",status="404"} 1' in text
    assert 'jobrunner_jobs_enqueued_total{name="email"} 1' in text
    assert 'jobrunner_jobs_succeeded_total{name="email"} 1' in text
    assert 'jobrunner_http_request_duration_seconds_count{route="enqueue"} 1' in text


def test_metrics_show_each_types_queue_from_the_database(email):
    assert email.post("/v1/jobs/email", {"concurrency": 0}).status == 200  # paused: the jobs stay queued
    for _ in range(2):
        email.put(f"/v1/jobs/email/{job_id()}", {"data": {}})
    email.put(f"/v1/jobs/email/{job_id()}", {"data": {}, "run_after": "2099-01-01T00:00:00Z"})

    lines = set(email.get("/metrics").body.decode().splitlines())

    assert {"jobrunner_database_up 1", 'jobrunner_jobs_queued{name="email"} 3',
            'jobrunner_jobs_due{name="email"} 2', 'jobrunner_jobs_in_progress{name="email"} 0',
            'jobrunner_job_type_concurrency{name="email"} 0', "# TYPE jobrunner_jobs_queued gauge"} <= lines


def test_the_database_going_away_gives_503_then_recovers_by_itself():
    """A private cluster, so that stopping it disturbs no other test."""
    workdir = tempfile.mkdtemp(prefix="jobrunner-outage-")
    os.chmod(workdir, 0o755)
    cluster = LocalPostgres(f"{workdir}/data", settings={"fsync": "off"})
    url = cluster.start()
    try:
        conn = store.connect(url)
        migrate.apply(conn)
        conn.close()
        with running_server(url, db_timeout="1") as api:
            assert api.post("/v1/jobs", EMAIL).status == 201
            cluster.stop()

            down = api.get("/v1/jobs/email")
            assert_error(down, 503, "service_unavailable")
            assert "detail" not in down.json and "5432" not in down.body.decode()  # the driver's message (host, port, user) stays in the log
            health = api.get("/healthz", auth=None)
            assert_error(health, 503, "service_unavailable")
            assert "detail" not in health.json  # no credentials needed here: the driver's message stays inside
            metrics = api.get("/metrics")  # still answered, from the process's own counters
            assert metrics.status == 200 and "jobrunner_database_up 0" in metrics.body.decode().splitlines()

            cluster.start()
            wait_until(lambda: api.get("/v1/jobs/email").status == 200, "the server to recover", timeout=30)
            assert api.put(f"/v1/jobs/email/{job_id()}", {"data": {}}).status == 202
    finally:
        cluster.stop()



def test_a_server_woken_for_a_connection_another_server_took_does_not_block(db_url):
    from jobrunner import server
    from jobrunner.config import load_config
    from jobrunner.metrics import Registry

    config = load_config({}, overrides={"database_url": db_url, "users": "u:p"})
    sock = socket.create_server(("127.0.0.1", 0))
    pool = store.Pool(db_url, 1, timeout=5)
    api_server = server.APIServer(sock, config, pool, Registry())
    # what serve_forever does when select() said the socket was readable, but no connection is left
    handling = threading.Thread(target=api_server._handle_request_noblock, daemon=True)
    handling.start()
    handling.join(timeout=5)
    blocked = handling.is_alive()
    if blocked:
        socket.create_connection(sock.getsockname()).close()  # let it go
        handling.join(timeout=5)
    api_server.server_close()  # never served (stop() would wait for serve_forever)
    api_server.enqueuer.close()
    api_server.callbacks_batcher.close()
    pool.close()
    assert not blocked, "the server blocked in accept()"


# --- behind a proxy; OPTIONS ------------------------------------------------------


@pytest.mark.parametrize("path, auth", [("/v1/jobs", True), ("/healthz", False)])
def test_a_request_a_proxy_received_unencrypted_is_refused(email, path, auth):
    """docs/security.md: behind a TLS-terminating proxy, X-Forwarded-Proto: http means the client sent it in clear."""
    credentials = {} if auth else {"auth": None}
    assert_error(email.get(path, headers={"X-Forwarded-Proto": "http"}, **credentials), 403, "insecure_request")
    assert email.get(path, headers={"X-Forwarded-Proto": "https"}, **credentials).status == 200
    assert email.get(path, **credentials).status == 200  # no proxy: nothing to say
    change = email.post("/v1/jobs/email/pause", headers={"X-Forwarded-Proto": "http"})
    assert_error(change, 403, "insecure_request")
    assert email.get("/v1/jobs/email").json["concurrency"] == EMAIL["concurrency"]


def test_allow_unencrypted_proxy_traffic_accepts_it(db_url):
    with running_server(db_url, allow_unencrypted_proxy_traffic="true") as api:
        assert api.get("/v1/jobs", headers={"X-Forwarded-Proto": "http"}).status == 200


def test_options_lists_the_routes_methods_and_changes_nothing(email):
    response = email.request("OPTIONS", "/v1/jobs/email")
    assert (response.status, response.body) == (200, b"")
    allowed = [method.strip() for method in response.headers["allow"].split(",")]
    assert "OPTIONS" in allowed and {"GET", "POST"} <= set(allowed) and "PUT" not in allowed and "DELETE" not in allowed
    job_route = [method.strip() for method in email.request("OPTIONS", f"/v1/jobs/email/{job_id()}").headers["allow"].split(",")]
    assert {"PUT", "POST", "OPTIONS"} <= set(job_route)
    assert email.request("OPTIONS", "/v1/jobs/email", auth=None).status == 401  # credentials as for the route itself
    assert_error(email.request("OPTIONS", "/v1/nowhere"), 404, "not_found")
    assert email.get("/v1/jobs/email").json["concurrency"] == EMAIL["concurrency"]


def test_data_nested_too_deep_to_read_back_is_refused_and_not_stored(api):
    """PostgreSQL stores any depth; the JSON decoder of a reading thread may not get back: refused with a 400."""
    api.post("/v1/jobs", {"name": "email", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 0})
    deep = "1"
    for _ in range(600):
        deep = "[" + deep + "]"
    answer = api.request("PUT", "/v1/jobs/email/random_id", ('{"data": ' + deep + "}").encode())
    assert answer.status == 400 and answer.json["id"] == "invalid_parameter" and "data" in answer.json["title"]
    assert api.get("/v1/jobs/email/jobs").json["jobs"] == []

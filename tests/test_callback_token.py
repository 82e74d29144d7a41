"""Callback scope: a job type's callback token must come back on every callback for its jobs, alone or batched."""

import pytest
from conftest import API_PASSWORD, API_USER, make_type, new_id, run_concurrently, wait_until

from jobrunner import batching, services, store
from jobrunner.errors import CallbackForbidden
from jobrunner.models import CALLBACK_TOKEN_HEADER, IN_PROGRESS, SUCCEEDED, TypePolicy

TOKEN = "tok-0123456789abcdef-email"


def dispatch(conn, name="email"):
    """Enqueue one job and claim it: it is then in progress, as after its POST to the downstream."""
    job = services.enqueue(conn, new_id(), name, {"to": "a@example.com"})
    [claimed] = services.claim(conn, name, limit=1).jobs
    assert claimed.id == job.id
    return claimed


def with_token(conn, name="email", token=TOKEN):
    make_type(conn, name, concurrency=50)
    store.save_job_type_policy(conn, name, TypePolicy(callback_token=token))


def call_back(api, job, status="succeeded", token=None):
    headers = {} if token is None else {CALLBACK_TOKEN_HEADER: token}
    return api.post(f"/v1/jobs/{job.name}/{job.job_id}", {"status": status, "attempt": job.attempts}, headers=headers)


def status_in_db(conn, job) -> str:
    row = conn.execute("SELECT status::text FROM queued_jobs WHERE id = %s UNION ALL SELECT status::text FROM archived_jobs WHERE id = %s", (job.id, job.id)).fetchone()
    return row[0]


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_a_callback_without_or_with_a_wrong_token_is_403_and_changes_nothing(api, conn, status):
    with_token(conn)
    job = dispatch(conn)
    # a wrong token of the same length, one differing only in case, a prefix, and none at all
    for token in (None, TOKEN[:-1] + "X", TOKEN.upper(), TOKEN[:8], "", TOKEN + " x"):
        response = call_back(api, job, status, token)
        assert response.status == 403, (token, response.body)
        assert response.json["id"] == "forbidden"
        assert CALLBACK_TOKEN_HEADER in response.json["detail"]
        assert status_in_db(conn, job) == IN_PROGRESS
    assert call_back(api, job, status, TOKEN).status == 200
    assert status_in_db(conn, job) != IN_PROGRESS


def test_the_token_of_another_type_does_not_do(api, conn):
    with_token(conn, "email", TOKEN)
    with_token(conn, "sms", "tok-of-the-sms-type-0123")
    job = dispatch(conn, "email")
    assert call_back(api, job, token="tok-of-the-sms-type-0123").status == 403
    assert status_in_db(conn, job) == IN_PROGRESS


def test_a_type_without_a_token_takes_callbacks_as_before(api, conn):
    make_type(conn)
    store.save_job_type_policy(conn, "email", TypePolicy(downstream_timeout=3.0))  # other settings, no token
    first, second = dispatch(conn), dispatch(conn)
    assert call_back(api, first).status == 200
    assert call_back(api, second, token="anything-at-all").status == 200  # a token nobody asked for is ignored
    assert status_in_db(conn, first) == status_in_db(conn, second) == SUCCEEDED


def test_a_token_set_or_cleared_applies_to_the_next_callback(api, conn):
    make_type(conn)
    job = dispatch(conn)
    store.save_job_type_policy(conn, "email", TypePolicy(callback_token=TOKEN))
    assert call_back(api, job).status == 403
    store.save_job_type_policy(conn, "email", TypePolicy())
    assert call_back(api, job).status == 200


def test_batched_callbacks_are_each_checked_against_their_own_type(api, conn):
    """Many succeeded callbacks at once share the server's group commit: a wrong token there is no way around the check."""
    with_token(conn, "email")
    make_type(conn, "sms", concurrency=50)
    kinds = [("email", TOKEN), ("email", None), ("email", "tok-wrong-0123456789"), ("sms", None)] * 10
    jobs = [(dispatch(conn, name), token) for name, token in kinds]
    answers = run_concurrently([lambda job=job, token=token: call_back(api, job, token=token).status for job, token in jobs])
    for (job, token), answer in zip(jobs, answers):
        allowed = job.name == "sms" or token == TOKEN
        assert answer == (200 if allowed else 403), (job.name, token, answer)
        assert status_in_db(conn, job) == (SUCCEEDED if allowed else IN_PROGRESS)


def test_succeed_many_leaves_the_callbacks_with_a_wrong_token_to_be_refused_alone(conn, db_url):
    with_token(conn, "email")
    make_type(conn, "sms")
    good, bad, other = dispatch(conn, "email"), dispatch(conn, "email"), dispatch(conn, "sms")
    archived = services.succeed_many(conn, [(good.id, "email", TOKEN), (bad.id, "email", "tok-wrong-0123456789"), (other.id, "sms", None)])
    assert [job and job.id for job in archived] == [good.id, None, other.id]
    assert status_in_db(conn, bad) == IN_PROGRESS
    # and the batcher's slow path, where such a callback goes next, says why
    pool = store.Pool(db_url, 2, timeout=5)
    batcher = batching.CallbackBatcher(pool)
    try:
        with pytest.raises(CallbackForbidden, match="email"):
            batcher.handle_status_callback(bad.id, "email", "succeeded", bad.attempts, callback_token="tok-wrong-0123456789")
        assert batcher.handle_status_callback(bad.id, "email", "succeeded", bad.attempts, callback_token=TOKEN).status == SUCCEEDED
    finally:
        batcher.close()
        pool.close()


def test_an_in_process_worker_records_its_outcomes_without_a_token(conn):
    """The token is for the HTTP callbacks of downstreams: services.record_outcome is not a callback."""
    from jobrunner.outcomes import Succeeded

    with_token(conn)
    job = dispatch(conn)
    assert services.record_outcome(conn, job, Succeeded()).status == SUCCEEDED


def test_the_development_downstream_hands_the_token_back(api, conn):
    """`jobrunner run`'s example downstream calls back with the token its POST carried, so a type with one still runs."""
    import socket
    import threading

    from jobrunner import example_downstream
    from jobrunner.downstream import Delivery, Downstream

    with_token(conn)
    job = dispatch(conn)
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    api_url = f"http://127.0.0.1:{api.port}"
    thread = threading.Thread(target=example_downstream.serve, args=(sock, api_url, API_USER, API_PASSWORD, stop))
    thread.start()
    client = Downstream(f"http://127.0.0.1:{sock.getsockname()[1]}", "", 5)
    try:
        assert client.post(job, callback_token=TOKEN)[0] is Delivery.ACCEPTED
        wait_until(lambda: status_in_db(conn, job) == SUCCEEDED, "the example downstream's callback")
    finally:
        client.close()
        stop.set()
        thread.join(timeout=10)
        sock.close()

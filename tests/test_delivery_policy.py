"""A job type's delivery policy: its own downstream URL and timeouts, and its retry back-off.

Types that set none of it are the rest of the suite's (test_delivery, test_worker,
test_callbacks, test_stuck_jobs): Rickover's behaviour, unchanged.
"""

import contextlib
import math
import time
from datetime import datetime, timedelta, timezone

import downstream_stub as stub
import pytest
from conftest import (
    API_PASSWORD,
    API_USER,
    DOWNSTREAM_PASSWORD,
    create_type,
    enqueue,
    enqueue_many,
    examples,
    free_port,
    make_type,
    new_id,
    running_worker,
    status_of,
    wait_for_status,
    wait_until,
)
from downstream_stub import DownstreamStub
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st
from test_downstream import JOB, keep_alive_server, raw_server, read_request

from jobrunner import downstream as downstream_module
from jobrunner import services, store
from jobrunner.config import load_config
from jobrunner.downstream import Delivery, Downstream
from jobrunner.metrics import LATENCY_BUCKETS
from jobrunner.models import FAILED, QUEUED, ArchivedJob, QueuedJob, RetryPolicy, TypePolicy
from jobrunner.watcher import Watcher


def set_policy(conn, name: str, **settings) -> None:
    """Save a type's settings as the settings API does (store.save_job_type_policy: a row, and a notification)."""
    store.save_job_type_policy(conn, name, TypePolicy(**settings))


def now() -> datetime:
    return datetime.now(timezone.utc)


@contextlib.contextmanager
def downstream_client(url: str, timeout: float = 5):
    made = Downstream(url, "pw", timeout)
    try:
        yield made
    finally:
        made.close()


# --- the downstream client: a URL and a timeout per POST --------------------------------------


def test_a_post_goes_to_the_base_url_it_is_given_with_the_path_appended_and_the_same_credentials():
    with keep_alive_server() as (default_url, _, default_posts), keep_alive_server() as (other_url, _, other_posts):
        with downstream_client(default_url) as client:
            assert client.post(JOB, base_url=f"{other_url}/") == (Delivery.ACCEPTED, "HTTP 202")
            assert client.url(JOB, f"{other_url}/base/") == f"{other_url}/base/v1/jobs/email/{JOB.job_id}"
    assert (len(default_posts), len(other_posts)) == (0, 1)


def test_one_thread_keeps_a_connection_to_each_host_it_posts_to():
    with keep_alive_server() as (first, first_connections, _), keep_alive_server() as (second, second_connections, _):
        with downstream_client(first) as client:
            outcomes = [client.post(JOB, base_url=url)[0] for url in (first, second) * 4]
    assert outcomes == [Delivery.ACCEPTED] * 8
    assert (len(first_connections), len(second_connections)) == (1, 1)


def test_a_post_keeps_to_its_own_timeout():
    def read_then_hang(connection, done):
        read_request(connection)
        done.wait(10)

    with raw_server(read_then_hang) as url, downstream_client(url, timeout=8) as client:
        began = time.monotonic()
        outcome, reason = client.post(JOB, timeout=0.3)
        took = time.monotonic() - began
    assert (outcome, downstream_module.error_kind(outcome, reason)) == (Delivery.MAYBE_DELIVERED, "timeout")
    assert took < 3, took  # the client's default, 8 s, would have held it


def test_connections_idle_past_max_idle_are_closed_so_many_hosts_keep_memory_flat(monkeypatch):
    """A connection kept for a host this thread stopped posting to is never reused: it is closed, not kept forever."""
    monkeypatch.setattr(downstream_module, "MAX_IDLE", 0.0)  # every kept connection is idle past it at once
    with contextlib.ExitStack() as servers:
        urls = [servers.enter_context(keep_alive_server())[0] for _ in range(6)]
        with downstream_client(urls[0]) as client:
            assert [client.post(JOB, base_url=url)[0] for url in urls] == [Delivery.ACCEPTED] * 6
            assert len(client._connections._kept) == 1  # the last host's; one per host before


def test_a_host_that_does_not_resolve_is_not_delivered():
    with downstream_client("http://127.0.0.1:9") as client:
        outcome, reason = client.post(JOB, base_url="http://jobrunner-test.invalid")
    assert outcome is Delivery.NOT_DELIVERED, reason


# --- the worker: each type to its own downstream, a dead one holding up no other ------------


@pytest.fixture
def second_downstream(api):
    made = DownstreamStub(api.port, (API_USER, API_PASSWORD), DOWNSTREAM_PASSWORD)
    yield made
    made.close()


def test_each_type_is_posted_to_its_own_downstream(api, conn, db_url, downstream, second_downstream):
    create_type(api, "email")
    create_type(api, "sms")
    set_policy(conn, "sms", downstream_url=second_downstream.url + "/hooks/")
    with running_worker(db_url, downstream.url):
        ids = {name: [enqueue(api, name) for _ in range(5)] for name in ("email", "sms")}
        for job_id in ids["email"] + ids["sms"]:
            wait_for_status(api, job_id, "succeeded")
    assert sorted(post.job_id for post in downstream.posts) == sorted(ids["email"])
    assert sorted(post.job_id for post in second_downstream.posts) == sorted(ids["sms"])
    assert {post.path for post in second_downstream.posts} == {f"/hooks/v1/jobs/sms/{job_id}" for job_id in ids["sms"]}
    # the path appended after the type's base URL; the same credentials everywhere
    assert {post.authorization for post in downstream.posts + second_downstream.posts} == {"Basic am9iczpkb3duc3RyZWFtLXNlY3JldA=="}


def test_a_type_whose_downstream_is_gone_hangs_or_does_not_resolve_holds_up_no_other(api, conn, db_url, downstream, second_downstream):
    """Three types sent to dead downstreams, one to a live one: the live one's jobs all flow, the dead ones' fail."""
    create_type(api, "live", attempts=1, concurrency=20)
    for name in ("unresolvable", "refused", "hangs"):
        create_type(api, name, attempts=1, concurrency=20)
    set_policy(conn, "unresolvable", downstream_url="http://jobrunner-test.invalid")
    set_policy(conn, "refused", downstream_url=f"http://127.0.0.1:{free_port()}")
    # hangs: cut off at its own 0.3 s (the default here is 2 s), then waits 1 s for a callback that never comes
    second_downstream.policy = lambda post: stub.HANG
    set_policy(conn, "hangs", downstream_url=second_downstream.url, downstream_timeout=0.3, job_timeout=1.0)
    with running_worker(db_url, downstream.url, downstream_timeout="2") as worker:
        dead = [enqueue(api, name) for _ in range(20) for name in ("unresolvable", "refused", "hangs")]
        live = [enqueue(api, "live") for _ in range(20)]
        for job_id in live:
            wait_for_status(api, job_id, "succeeded")
        for job_id in dead:
            wait_for_status(api, job_id, "failed", timeout=30)
    assert len(downstream.posts) == 20  # every live job once: none went elsewhere
    assert len(second_downstream.posts) == 20  # each hanging job sent once, then timed out waiting for its callback
    # each hanging POST was cut off at its type's 0.3 s: every one took at most 1 s (the default would take 2 s)
    [(_, hangs)] = [(key, counts) for key, counts in worker.metrics.downstream_latency.snapshot() if key == ["hangs"]]
    within_1s = LATENCY_BUCKETS.index(1.0) + 1
    assert sum(hangs[:within_1s]) == sum(hangs[:-1]) == 20, hangs


def test_a_type_with_a_shorter_job_timeout_times_out_its_silent_jobs_while_others_wait(api, conn, db_url, downstream):
    create_type(api, "quick", attempts=1)
    create_type(api, "patient", attempts=1)
    set_policy(conn, "quick", job_timeout=0.5)
    downstream.policy = lambda post: stub.ACCEPT_SILENTLY
    with running_worker(db_url, downstream.url, job_timeout="300"):
        patient = enqueue(api, "patient")
        quick = enqueue(api, "quick")
        wait_for_status(api, quick, "failed", timeout=10)
        assert status_of(api, patient) == "in-progress"


# --- job_timeout in the overdue and stuck checks (the database's clock, pinned) ---------------

DEFAULT_TIMEOUT = timedelta(minutes=5)


def claim_one(conn, name: str) -> QueuedJob:
    services.enqueue(conn, new_id(), name, {}, now=now())
    [job] = services.claim(conn, name, limit=1, now=now()).jobs
    return job


def test_the_overdue_check_counts_each_type_from_its_own_job_timeout(conn):
    make_type(conn, "short")
    make_type(conn, "default")
    make_type(conn, "long")
    set_policy(conn, "short", job_timeout=60)
    set_policy(conn, "long", job_timeout=3600)
    with freeze_time("2026-06-01 08:00:00", tz_offset=0) as clock:
        jobs = {name: claim_one(conn, name) for name in ("short", "default", "long")}
        failed_at = {}
        for seconds in (59, 61, 299, 301, 3599, 3601):
            clock.move_to(datetime(2026, 6, 1, 8, tzinfo=timezone.utc) + timedelta(seconds=seconds))
            for job in services.archive_stuck_jobs(conn, DEFAULT_TIMEOUT, now=now()):
                failed_at[job.name] = seconds
    assert failed_at == {"short": 61, "default": 301, "long": 3601}
    assert all(services.get_job(conn, job.id).status == QUEUED for job in jobs.values())  # retried, as before


def test_the_watcher_gives_a_type_with_its_own_job_timeout_the_same_margin_behind_the_workers(conn):
    """job_timeout 300 s and stuck_job_timeout 420 s: the watcher fails a job 120 s after the workers would."""
    make_type(conn, "short")
    make_type(conn, "default")
    set_policy(conn, "short", job_timeout=60)
    config = load_config({}, overrides={"job_timeout": "300", "stuck_job_timeout": "420"})
    watcher = Watcher(config, lambda: contextlib.nullcontext(conn))
    with freeze_time("2026-06-01 08:00:00", tz_offset=0) as clock:
        claim_one(conn, "short")
        claim_one(conn, "default")
        stuck_at = {}
        for seconds in (179, 181, 419, 421):
            clock.move_to(datetime(2026, 6, 1, 8, tzinfo=timezone.utc) + timedelta(seconds=seconds))
            stuck_at[seconds] = watcher.run_once(now()).stuck
    assert stuck_at == {179: 0, 181: 1, 419: 0, 421: 1}


# --- retries: the type's back-off, full jitter, max_retry_duration ---------------------------


def fail(conn, job: QueuedJob) -> QueuedJob | ArchivedJob:
    return services.handle_status_callback(conn, job.id, job.name, FAILED, job.attempts, now=now())


def test_a_type_with_retry_settings_backs_off_between_its_bounds_with_full_jitter(conn):
    make_type(conn, "email", attempts=6, concurrency=40)
    set_policy(conn, "email", retry_min_backoff=10, retry_max_backoff=40, retry_max_doublings=2)
    expected = [(10, 10), (10, 20), (10, 40), (10, 40), (10, 40)]  # the ceiling doubles twice, then stops at 40
    with freeze_time("2026-03-01 12:00:00", tz_offset=0) as clock:
        jobs = enqueue_many(conn, "email", 30, now=now())
        delays: list[list[float]] = []
        for low, high in expected:
            claimed = services.claim(conn, "email", limit=40, now=now()).jobs
            assert len(claimed) == 30
            retried = [fail(conn, job) for job in claimed]
            waits = [(job.run_after - now()).total_seconds() for job in retried]
            assert all(low <= wait <= high for wait in waits), (low, high, sorted(waits))
            delays.append(waits)
            clock.tick(timedelta(seconds=high))
    assert len(set(delays[2])) > 10  # jittered: 30 jobs failed together do not come back together
    assert len(jobs) == 30


def test_a_type_with_only_max_retry_duration_keeps_rickovers_back_off_until_then_fails_for_good(conn):
    make_type(conn, "email", attempts=10)
    set_policy(conn, "email", retry_max_duration=60)
    with freeze_time("2026-03-01 12:00:00", tz_offset=0) as clock:
        job = claim_one(conn, "email")
        clock.tick(timedelta(seconds=30))
        retried = fail(conn, job)
        assert (retried.status, retried.run_after - now()) == (QUEUED, timedelta(seconds=2))  # 2^1, exactly
        clock.tick(timedelta(seconds=2))
        [job] = services.claim(conn, "email", limit=1, now=now()).jobs
        clock.tick(timedelta(seconds=27, milliseconds=999))  # 59.999 s after it was created
        retried = fail(conn, job)
        assert (retried.status, retried.run_after - now()) == (QUEUED, timedelta(seconds=4))
        clock.tick(timedelta(seconds=4))
        [job] = services.claim(conn, "email", limit=1, now=now()).jobs
        archived = fail(conn, job)  # 64 s after it was created, with 8 attempts left
    assert isinstance(archived, ArchivedJob)
    assert (archived.status, archived.attempts) == (FAILED, 7)


def test_a_stuck_job_of_a_type_with_retry_settings_takes_its_back_off_and_duration(conn):
    """The overdue check fails a job as a failed callback would: the type's back-off, and its max_retry_duration."""
    make_type(conn, "email", attempts=5)
    set_policy(conn, "email", retry_min_backoff=30, retry_max_backoff=30, retry_max_duration=600)
    with freeze_time("2026-03-01 12:00:00", tz_offset=0) as clock:
        job = claim_one(conn, "email")
        clock.tick(DEFAULT_TIMEOUT + timedelta(seconds=1))
        [retried] = services.archive_stuck_jobs(conn, DEFAULT_TIMEOUT, now=now())
        assert retried.run_after - now() == timedelta(seconds=30)
        clock.tick(timedelta(seconds=30))
        services.claim(conn, "email", limit=1, now=now())
        clock.tick(DEFAULT_TIMEOUT + timedelta(seconds=1))  # 631 s after it was created
        [archived] = services.archive_stuck_jobs(conn, DEFAULT_TIMEOUT, now=now())
    assert (archived.status, archived.attempts, archived.id) == (FAILED, 3, job.id)


def test_a_type_without_settings_keeps_rickovers_exact_back_off_beside_one_with_them(conn):
    make_type(conn, "plain", attempts=4)
    make_type(conn, "tuned", attempts=4)
    set_policy(conn, "tuned", retry_min_backoff=100)
    with freeze_time("2026-03-01 12:00:00", tz_offset=0) as clock:
        plain, tuned = claim_one(conn, "plain"), claim_one(conn, "tuned")
        waits = {}
        for _ in range(3):
            for job in (plain, tuned):
                retried = fail(conn, job)
                waits.setdefault(job.name, []).append((retried.run_after - now()).total_seconds())
            clock.tick(timedelta(days=1))
            plain, tuned = (services.claim(conn, name, limit=1, now=now()).jobs[0] for name in ("plain", "tuned"))
    assert waits["plain"] == [2, 4, 8]
    assert waits["tuned"][0] == 100 and all(100 <= wait <= 400 for wait in waits["tuned"])


# --- the back-off formula's bounds ------------------------------------------------------------

seconds = st.floats(min_value=0, max_value=7 * 86400, allow_nan=False)


@st.composite
def retry_policies(draw) -> RetryPolicy:
    low, high = sorted((draw(seconds), draw(seconds)))
    return RetryPolicy(
        min_backoff=draw(st.none() | st.just(low)),
        max_backoff=draw(st.none() | st.just(high)),
        max_doublings=draw(st.none() | st.integers(0, 10_000)),
    )


@settings(max_examples=examples(300))
@given(retry=retry_policies(), used=st.integers(1, 255))
def test_the_back_off_stays_between_min_and_max_backoff_and_its_ceiling_doubles_then_stops(retry, used):
    low, high = services.backoff_bounds(retry, used)
    floor = services.DEFAULT_MIN_BACKOFF if retry.min_backoff is None else retry.min_backoff
    cap = services.MAX_RETRY_DELAY.total_seconds() if retry.max_backoff is None else retry.max_backoff
    assert low == min(floor, cap) if retry.min_backoff is None else low == retry.min_backoff
    assert low <= high <= max(low, cap)
    doublings = services.DEFAULT_MAX_DOUBLINGS if retry.max_doublings is None else retry.max_doublings
    ceiling = min(cap, low * 2.0 ** min(used - 1, doublings, 1000))
    assert math.isclose(high, max(low, ceiling))
    next_low, next_high = services.backoff_bounds(retry, used + 1)
    assert (next_low, next_high >= high) == (low, True)  # never shorter after another failure
    delay = services.retry_delay(used + 1, 1, retry).total_seconds()  # used attempts: (used + 1) - 1
    assert low - 1e-6 <= delay <= high + 1e-6


@given(total=st.integers(1, 255), remaining=st.integers(0, 255))
def test_without_retry_settings_the_back_off_is_rickovers(total, remaining):
    assert services.retry_delay(total, remaining, RetryPolicy(max_duration=60)) == services.retry_delay(total, remaining)
    exponent = max(0, total - remaining)
    rickover = timedelta(seconds=2**exponent) if exponent < 17 else services.MAX_RETRY_DELAY  # 2^17 s: more than a day
    assert services.retry_delay(total, remaining) == rickover

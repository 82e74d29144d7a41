"""What the default worker does with each way a POST ends: an answer proves arrival, a callback ends the resends."""

import logging
import threading
from datetime import datetime, timedelta, timezone

import downstream_stub as stub
import pytest
from conftest import (
    DOWNSTREAM_PASSWORD,
    create_type,
    enqueue,
    free_port,
    make_type,
    new_id,
    running_worker,
    wait_for_status,
    wait_until,
)

from jobrunner import outcomes, services, store
from jobrunner.delivery import HttpDelivery
from jobrunner.downstream import Downstream


@pytest.mark.parametrize("action", [stub.ERROR_500, stub.RICKOVER_UNAVAILABLE])
def test_an_at_most_once_job_that_got_an_answer_is_never_sent_again(api, downstream, db_url, action):
    """A 500 (or Rickover's 500 service_unavailable, which is resent at once) arrived: it may have been acted on."""
    create_type(api, strategy="at_most_once", attempts=3)
    downstream.policy = lambda post: action if post.attempts == 3 and len(downstream.posts_for(post.job_id)) == 0 else stub.ERROR_500
    with running_worker(db_url, downstream.url):
        job_id = enqueue(api)
        archived = wait_for_status(api, job_id, "failed", timeout=20)
    posts = downstream.posts_for(job_id)
    if action == stub.ERROR_500:
        assert len(posts) == 1
    else:  # 503: not delivered, resent at once without using an attempt; then the 500 ends it
        assert [post.action for post in posts] == [stub.RICKOVER_UNAVAILABLE, stub.ERROR_500]
    assert archived["attempts"] == 2


def test_an_at_least_once_job_that_got_an_error_answer_is_retried_with_back_off(api, downstream, db_url):
    create_type(api, strategy="at_least_once", attempts=3)
    downstream.policy = lambda post: stub.ERROR_500 if post.attempts == 3 else stub.ACCEPT
    with running_worker(db_url, downstream.url):
        job_id = enqueue(api)
        wait_for_status(api, job_id, "succeeded", timeout=20)
    first, second = downstream.posts_for(job_id)
    assert (first.attempts, second.attempts) == (3, 2)
    assert second.at - first.at >= 1.5  # retried 2 s after its first failure


def test_a_job_called_back_before_its_503_answer_is_not_sent_again(api, downstream, db_url, caplog):
    """A proxy that times out answers 503 while the downstream keeps working and calls back."""
    create_type(api, strategy="at_most_once", attempts=1)
    downstream.policy = lambda post: stub.CALL_BACK_THEN_UNAVAILABLE
    with caplog.at_level(logging.INFO, logger="jobrunner.delivery"), running_worker(db_url, downstream.url):
        job_id = enqueue(api)
        wait_for_status(api, job_id, "succeeded")
        # the first resend would come UNAVAILABLE_SLEEP_FACTOR (0.5 s) after the 503
        wait_until(
            lambda: len(downstream.posts_for(job_id)) > 1 or "not sent again" in caplog.text,
            "a resend, or the worker to see the job settled",
        )
    assert len(downstream.posts_for(job_id)) == 1
    assert downstream.callback_errors == []


# --- HttpDelivery alone: what each way a POST ends comes to, as an outcome ------------------


@pytest.fixture
def deliver(db_url, conn):
    """do_work of an HttpDelivery posting to `url`, for one claimed job of type email (at_most_once, 2 attempts)."""
    pool = store.Pool(db_url, 2, timeout=5)
    made = []

    def deliver_to(url, expires_at=None, pool=pool):
        make_type(conn, strategy="at_most_once", attempts=2)
        services.enqueue(conn, new_id(), "email", {"n": 1}, expires_at=expires_at)
        [job] = services.claim(conn, "email", 1).jobs
        made.append(Downstream(url, DOWNSTREAM_PASSWORD, timeout=5))
        return job, HttpDelivery(pool, made[-1], threading.Event()).do_work(job)

    yield deliver_to
    for downstream in made:
        downstream.close()
    pool.close()


@pytest.mark.parametrize(
    "action, outcome",
    [(stub.ACCEPT_SILENTLY, outcomes.Accepted()), (stub.ERROR_500, outcomes.Rejected("HTTP 500")), (stub.UNAVAILABLE, outcomes.NotDelivered("HTTP 503"))],
)
def test_each_answer_comes_to_its_outcome_and_nothing_is_recorded_by_the_delivery(deliver, downstream, conn, action, outcome):
    downstream.policy = lambda post: action
    job, delivered = deliver(downstream.url)
    assert delivered == outcome
    assert services.get_job(conn, job.id) == job  # still in progress: the worker records the outcome
    assert len(downstream.posts_for(job.job_id)) == (4 if action == stub.UNAVAILABLE else 1)


def test_a_refused_connection_is_not_delivered(deliver):
    _, delivered = deliver(f"http://127.0.0.1:{free_port()}")
    assert isinstance(delivered, outcomes.NotDelivered)


def test_a_job_that_expires_while_503s_are_resent_comes_to_expired_meanwhile(deliver, downstream):
    downstream.policy = lambda post: stub.UNAVAILABLE
    job, delivered = deliver(downstream.url, expires_at=datetime.now(timezone.utc) + timedelta(seconds=0.3))
    assert delivered == outcomes.ExpiredMeanwhile()
    assert len(downstream.posts_for(job.job_id)) == 1


def test_a_database_error_before_a_resend_is_not_delivered_not_raised(deliver, downstream):
    """The 503s stand: the worker records them once the database answers (before, the error left the job to time out)."""
    downstream.policy = lambda post: stub.UNAVAILABLE
    unreachable = store.Pool(f"postgresql://nobody@127.0.0.1:{free_port()}/none?connect_timeout=1", 1, timeout=0.5)
    try:
        job, delivered = deliver(downstream.url, pool=unreachable)
    finally:
        unreachable.close()
    assert delivered == outcomes.NotDelivered("HTTP 503")
    assert len(downstream.posts_for(job.job_id)) == 1

"""What the default worker does with each way a POST ends: an answer proves arrival, a callback ends the resends."""

import logging

import downstream_stub as stub
import pytest
from conftest import running_worker, wait_until
from test_worker import create_type, enqueue, wait_for_status


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

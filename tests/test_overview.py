"""services.overview(): what the dashboard shows, counted from the database at a pinned instant."""

from datetime import timedelta

from conftest import make_type, new_id, utcnow

from jobrunner import services


def finish(conn, name, status, at, data=None):
    """Enqueue, claim and archive one job with `status` at the instant `at`."""
    job = services.enqueue(conn, new_id(), name, data or {}, now=at - timedelta(seconds=1))
    [claimed] = services.claim(conn, name, limit=1, now=at).jobs
    assert claimed.id == job.id
    return services.handle_status_callback(conn, job.id, name, status, claimed.attempts, retryable=False, now=at)


def test_counts_per_type_per_minute_failures_and_waiting_jobs(conn):
    now = utcnow().replace(second=30, microsecond=0)
    make_type(conn, "email", concurrency=5)
    make_type(conn, "sms", concurrency=1)
    finish(conn, "email", "succeeded", now - timedelta(minutes=1))
    finish(conn, "email", "succeeded", now - timedelta(minutes=1))
    failed = finish(conn, "email", "failed", now - timedelta(minutes=2), {"why": "boom"})
    finish(conn, "email", "succeeded", now - timedelta(hours=3))  # in the day, not the hour
    finish(conn, "email", "succeeded", now - timedelta(days=2))  # in neither
    old_failure = finish(conn, "sms", "failed", now - timedelta(hours=5))
    later = services.enqueue(conn, new_id(), "sms", {}, run_after=now + timedelta(hours=1), now=now)
    sooner = services.enqueue(conn, new_id(), "email", {}, run_after=now + timedelta(minutes=1), now=now)
    services.pause_job_type(conn, "sms")

    seen = services.overview(conn, now=now)

    assert seen.now == now
    assert [(c.job_type.name, c.queued) for c in seen.types] == [("email", 1), ("sms", 1)]
    assert seen.paused == {"sms": 1}
    assert seen.archived == {
        ("email", "succeeded"): (2, 3),
        ("email", "failed"): (1, 1),
        ("sms", "failed"): (0, 1),
    }
    minute = now.replace(second=0)
    assert seen.per_minute == [
        (minute - timedelta(minutes=2), "failed", 1),
        (minute - timedelta(minutes=1), "succeeded", 2),
    ]
    assert [job.id for job in seen.recent_failures] == [failed.id, old_failure.id]
    assert seen.recent_failures[0].data == {"why": "boom"}
    assert [job.id for job in seen.waiting] == [sooner.id, later.id]


def test_limits_apply_across_types(conn):
    now = utcnow()
    for name in ("a", "b", "c"):
        make_type(conn, name)
        for _ in range(3):
            finish(conn, name, "failed", now - timedelta(minutes=5))
            services.enqueue(conn, new_id(), name, {}, now=now)

    seen = services.overview(conn, limit=4, now=now)

    assert len(seen.recent_failures) == 4
    assert len(seen.waiting) == 4

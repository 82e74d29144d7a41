"""The watcher's round: stuck jobs failed, expired jobs archived, old archived jobs deleted; counted."""

from datetime import timedelta

import pytest
from conftest import make_type, new_id, utcnow

from jobrunner import services, store
from jobrunner.config import load_config
from jobrunner.models import EXPIRED, FAILED, QUEUED
from jobrunner.watcher import Round, Watcher


@pytest.fixture
def watcher(db_url):
    pool = store.Pool(db_url, 1, timeout=5)
    config = load_config({}, overrides={"stuck_job_timeout": "420", "archive_retention_days": "30"})
    yield Watcher(config, pool.connection)
    pool.close()


def test_a_quiet_round_changes_nothing(conn, watcher):
    make_type(conn)
    services.enqueue(conn, new_id(), "email", {})
    assert watcher.run_once() == Round(0, 0, 0)
    assert not watcher.run_once().changed_something()


def test_stuck_jobs_are_failed_after_the_watchers_timeout_only(conn, watcher):
    make_type(conn, "email")
    make_type(conn, "charge", strategy="at_most_once", attempts=1)
    now = utcnow()
    services.enqueue(conn, new_id(), "email", {}, now=now)
    charge = services.enqueue(conn, new_id(), "charge", {}, now=now)
    [email] = services.claim(conn, "email", 1, now=now).jobs
    services.claim(conn, "charge", 1, now=now)

    assert watcher.run_once(now=now + timedelta(minutes=6)).stuck == 0
    assert watcher.run_once(now=now + timedelta(minutes=7, seconds=1)).stuck == 2
    assert (services.get_job(conn, email.id).status, services.get_job(conn, email.id).attempts) == (QUEUED, 2)
    assert services.get_job(conn, charge.id).status == FAILED


def test_due_expired_jobs_of_every_type_are_archived_even_when_paused(conn, watcher):
    make_type(conn, "email", concurrency=0)
    now = utcnow()
    expired = services.enqueue(conn, new_id(), "email", {}, expires_at=now - timedelta(seconds=1))
    not_due = services.enqueue(conn, new_id(), "email", {}, run_after=now + timedelta(hours=1), expires_at=now - timedelta(seconds=1))
    alive = services.enqueue(conn, new_id(), "email", {}, expires_at=now + timedelta(hours=1))

    assert watcher.run_once().expired == 1
    assert services.get_job(conn, expired.id).status == EXPIRED
    assert services.get_job(conn, not_due.id).status == QUEUED  # expires when it comes due
    assert services.get_job(conn, alive.id).status == QUEUED


def test_archived_jobs_past_the_retention_are_deleted_in_batches(conn, watcher):
    make_type(conn, concurrency=3000)
    jobs = [services.enqueue(conn, new_id(), "email", {"n": n}) for n in range(2500)]
    old = utcnow() - timedelta(days=40)
    for job in jobs[:2100]:
        services.handle_status_callback(conn, job.id, "email", "succeeded", 3, now=old)
    for job in jobs[2100:]:
        services.handle_status_callback(conn, job.id, "email", "succeeded", 3)

    assert watcher.run_once().deleted == 2100
    assert conn.execute("SELECT count(*) FROM archived_jobs").fetchone()[0] == 400


def test_retention_zero_keeps_everything(conn, db_url):
    pool = store.Pool(db_url, 1, timeout=5)
    keeper = Watcher(load_config({}), pool.connection)
    make_type(conn)
    job = services.enqueue(conn, new_id(), "email", {})
    services.handle_status_callback(conn, job.id, "email", "succeeded", 3, now=utcnow() - timedelta(days=4000))
    assert keeper.run_once().deleted == 0
    pool.close()

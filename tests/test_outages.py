"""Outages of one connection: the workers' LISTEN connection (listen_database_url) and the watcher's database."""

import logging
import threading
import uuid

from conftest import create_type, enqueue, make_type, running_worker, wait_for_status, wait_until

from jobrunner import scheduler, schedules, services, timetable, watcher
from jobrunner.config import load_config


def listen_connections(conn) -> int:
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'jobrunner-worker-listen:%'"
    return conn.execute(query).fetchone()[0]


def test_the_listen_connection_uses_listen_database_url_and_the_rest_database_url(api, downstream, db_url, conn, relay):
    create_type(api)
    with running_worker(db_url, downstream.url, listen_database_url=relay.url):
        wait_until(lambda: relay.connections == 1 and listen_connections(conn) == 1, "the LISTEN connection through the relay")
        wait_for_status(api, enqueue(api), "succeeded")
        assert relay.connections == 1  # claims and outcomes went to database_url, not through the relay
        relay.cut()  # the relayed connection was the LISTEN one: it is gone with the relay
        wait_until(lambda: listen_connections(conn) == 0, "the LISTEN connection to end with the relay")


def test_jobs_still_flow_while_the_listen_connection_is_down(api, downstream, db_url, relay, caplog):
    create_type(api)
    relay.cut()
    with caplog.at_level(logging.WARNING), running_worker(db_url, downstream.url, listen_database_url=relay.url):
        wait_until(lambda: "LISTEN connection" in caplog.text, "the LISTEN outage to be logged")
        job_id = enqueue(api)
        wait_for_status(api, job_id, "succeeded")  # found by the worker's own polling, deaf as it is
        relay.restore()
        wait_until(lambda: relay.connections == 1, "the LISTEN connection to come back")
        wait_for_status(api, enqueue(api), "succeeded")


def test_the_watcher_rides_out_a_database_outage_and_fails_stuck_jobs_after_it(conn, relay, caplog):
    make_type(conn, "email")
    services.enqueue(conn, uuid.uuid4(), "email", {})
    [stuck] = services.claim(conn, "email", 1).jobs
    conn.execute("UPDATE queued_jobs SET updated_at = now() - interval '1 hour' WHERE id = %s", (stuck.id,))
    relay.cut()
    config = load_config({}, overrides={"database_url": relay.url, "stuck_job_interval": "0.1", "db_timeout": "1"})
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(config, stop), name="test-watcher")
    with caplog.at_level(logging.WARNING, logger="jobrunner.watcher"):
        thread.start()
        try:
            wait_until(lambda: "trying again next round" in caplog.text, "the outage to be logged")
            assert services.get_job(conn, stuck.id).status == "in-progress"
            relay.restore()
            wait_until(lambda: services.get_job(conn, stuck.id).status == "queued", "the stuck job to be failed and retried")
        finally:
            stop.set()
            thread.join(timeout=30)
    assert not thread.is_alive(), "the watcher did not stop"
    assert services.get_job(conn, stuck.id).attempts == stuck.attempts - 1


def test_the_scheduler_rides_out_a_database_outage_and_ticks_after_it(conn, relay, caplog):
    make_type(conn, "email", concurrency=0)
    schedules.create_schedule(conn, timetable.validate({"name": "every-second", "job_type": "email", "interval_seconds": 1}))
    config = load_config({}, overrides={"database_url": relay.url, "db_timeout": "1"})
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(config, stop), name="test-scheduler")
    ticks = lambda: conn.execute("SELECT count(*) FROM queued_jobs").fetchone()[0]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="jobrunner.scheduler"):
        thread.start()
        try:
            wait_until(lambda: ticks() >= 2, "the ticks' jobs")
            relay.cut()
            wait_until(lambda: "scheduler failed" in caplog.text, "the outage to be logged")
            during = ticks()
            relay.restore()
            wait_until(lambda: ticks() >= during + 2, "ticks after the outage", timeout=30)
            assert "scheduler recovered" in caplog.text
        finally:
            stop.set()
            thread.join(timeout=30)
    assert not thread.is_alive(), "the scheduler did not stop"
    assert caplog.text.count("scheduler failed") == 1  # the outage logged once

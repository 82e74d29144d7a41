"""What wakes a worker's claim: a paused type's enqueues do not; its resume does."""

import re

from conftest import free_port, make_type, new_id, running_worker, wait_until

from jobrunner import services


def claims_of(worker, name: str) -> int:
    """How many claims of `name` the worker made (its claim-duration histogram's count)."""
    text = "\n".join(worker.metrics.claim_latency.render())
    found = re.search(rf'_count{{name="{re.escape(name)}"}} (\d+)', text)
    return int(found.group(1)) if found else 0


def test_a_paused_types_enqueues_wake_no_claim_until_it_is_resumed(db_url, conn):
    make_type(conn, "paused", concurrency=0)
    make_type(conn, "mail", concurrency=1)
    with running_worker(db_url, f"http://127.0.0.1:{free_port()}", sleep_factor=100) as worker:
        wait_until(lambda: not worker._deaf and worker._polls > 0, "the worker to listen and poll once")
        paused = [services.enqueue(conn, new_id(), "paused", {}) for _ in range(20)]
        mail = services.enqueue(conn, new_id(), "mail", {})  # notified after the paused ones: a marker
        wait_until(lambda: services.get_job(conn, mail.id).status != "queued", "the mail job to be claimed")
        assert claims_of(worker, "paused") == 0  # 20 notifications, no claim of a type that can take none

        services.resume_job_type(conn, "paused", concurrency=2)  # the type changed: the worker polls again
        wait_until(lambda: services.get_job(conn, paused[0].id).status != "queued", "the resumed type's jobs to be claimed")
        assert claims_of(worker, "paused") >= 1

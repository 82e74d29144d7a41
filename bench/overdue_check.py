"""The workers' overdue check with many jobs in flight and none due (issue 16: per-type job_timeout, heartbeats).

    python bench/overdue_check.py [--in-flight 1000,10000] [--runs 50]

For each count, on a private PostgreSQL: ten job types (one with its own
job_timeout of 600 s), that many jobs in progress, just claimed, and a heartbeat
deadline for one job in ten. Then --runs checks through store.lock_stuck_jobs
(the default job_timeout 300 s: nothing is due), each in its own transaction, as
a worker runs it every tenth of the shortest job_timeout (at most every 10 s).
Prints the median check time.
"""

import argparse
import statistics
import time
from datetime import timedelta

from harness import private_database

from jobrunner import services, store
from jobrunner.models import TypePolicy

IN_FLIGHT = """
INSERT INTO queued_jobs (id, name, attempts, run_after, status, data)
SELECT gen_random_uuid(), 'type' || (n %% 10), 3, now(), 'in-progress', '{}' FROM generate_series(1, %(rows)s) AS n
"""
HEARTBEATS = """
INSERT INTO jobrunner_job_deadlines (id, attempts, beat_at, deadline)
SELECT id, attempts, updated_at, updated_at + interval '1 hour' FROM queued_jobs WHERE random() < 0.1
"""


def check_times(conn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with store.transaction(conn):
            assert store.lock_stuck_jobs(conn, timedelta(minutes=5), 100) == []
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-flight", default="1000,10000")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    for rows in map(int, args.in_flight.split(",")):
        with private_database() as database:
            conn = database.conn
            for n in range(10):
                services.create_job_type(conn, f"type{n}", "at_least_once", 3, 32767)
            store.save_job_type_policy(conn, "type0", TypePolicy(job_timeout=600))
            conn.execute(IN_FLIGHT, {"rows": rows})
            conn.execute(HEARTBEATS)
            conn.execute("ANALYZE")
            times = check_times(conn, args.runs)
            print(f"{rows} jobs in flight, none due: overdue check {statistics.median(times):.2f} ms median [{min(times):.2f}-{max(times):.2f}]")


if __name__ == "__main__":
    main()

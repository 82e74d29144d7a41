"""Claim time after a burst onto a queue whose statistics say it is empty (issue 15).

    python bench/claim_plan.py [--backlogs 20000,100000] [--claims 200] [--batch 7]

For each backlog size, on a private PostgreSQL of its own (default settings): a job type
with room for every claim, autovacuum off for queued_jobs, ANALYZE while the
table is empty (the statistics after a quiet night), then that many due jobs
written in one statement. Then --claims claims of --batch jobs each through
store.claim_jobs, as a worker makes them (psycopg prepares the statement after
five, and the server then chooses its cached plan), each timed alone; between
two claims the claimed jobs are deleted, untimed. The same again after ANALYZE.
Prints the median claim time [min-max] with stale and with fresh statistics.
"""

import argparse
import statistics
import time

from harness import private_database

from jobrunner import store

JOB_TYPE = "burst"

BURST = """
INSERT INTO queued_jobs (id, name, attempts, run_after, created_at, updated_at, status, data)
SELECT gen_random_uuid(), %(name)s, 3, now() - interval '1 hour' + n * interval '10 ms', now(), now(), 'queued', '{}'
FROM generate_series(1, %(rows)s) AS n
"""


def claim_times(conn, claims: int, batch: int) -> list[float]:
    """Milliseconds of each of `claims` claims of `batch` jobs."""
    times = []
    for _ in range(claims):
        started = time.perf_counter()
        claim = store.claim_jobs(conn, JOB_TYPE, batch)
        times.append((time.perf_counter() - started) * 1000)
        assert len(claim.jobs) == batch, f"claimed {len(claim.jobs)} of {batch}"
        conn.execute("DELETE FROM queued_jobs WHERE status = 'in-progress'")
    return times


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ms [{min(times):.3f}-{max(times):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="20000,100000")
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--batch", type=int, default=7)
    args = parser.parse_args()
    for rows in (int(n) for n in args.backlogs.split(",")):
        # a cluster each: ANALYZE of an empty table keeps the column statistics an earlier one took
        with private_database() as database:
            conn = database.conn
            conn.execute("INSERT INTO jobs (name, delivery_strategy, attempts, concurrency) VALUES (%s, 'at_least_once', 3, 1000)", [JOB_TYPE])
            conn.execute("ALTER TABLE queued_jobs SET (autovacuum_enabled = off)")
            conn.execute("ANALYZE queued_jobs")  # the statistics of an empty queue
            conn.execute(BURST, {"name": JOB_TYPE, "rows": rows})
            stale = claim_times(conn, args.claims, args.batch)
            conn.execute("ANALYZE queued_jobs")
            fresh = claim_times(conn, args.claims, args.batch)
        print(f"claim of {args.batch}, {rows:,} due: stale statistics {spread(stale)}; after ANALYZE {spread(fresh)}", flush=True)

if __name__ == "__main__":
    main()

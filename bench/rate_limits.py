"""Rate limits and priorities: what they cost a type that uses neither, side by side with the code before them.

    python bench/rate_limits.py [--jobs 10000] [--rounds 3] [--concurrency 50] [--before REV]
                                [--limit 50] [--workers 2] [--threads 16]

On a private PostgreSQL, each round drains the job type `drain` (no limit, every
job priority 0) three times, in turn, the way bench/drain.py does: N jobs
written while the type is paused, then released with its concurrency C.

1. before: the code at REV (default 528ddbb: before priorities and rate limits),
   exported with `git archive`, on the schema it knew: for its run the priority
   columns are dropped and its claim index queued_jobs_claim is back (the
   migration 0003 then makes the schema this code's again). Its `SELECT *`
   would not read a row with a column it does not know;
2. alone: this code, the only type;
3. beside an idle type: this code, the type `limited` serving (concurrency 10)
   with nothing queued: a worker then gives each type at most half its dispatch
   threads, whatever the types' limits (the control for 4);
4. beside a limited type: the same while `limited` (rate limit --limit jobs/s,
   burst as many) works off a backlog at its limit: its own POSTs, callbacks
   and claims share the machine with the drain.

Drain rate = N / (last archive - first archive) of `drain`; every job must end
`succeeded`. One line to bench/results.txt with the medians [min-max], the
ratios to "before", and how many jobs of `limited` went per second of drain.
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from drain import JOB_TYPE, archive_rate, wait_drained
from harness import ROOT, Downstream, Service, downstream_settings, free_port, median_spread, private_database, record, request

from jobrunner import services, store
from jobrunner.models import TypePolicy

LIMITED = "limited"
# The schema of the code before: no priority column (dropping it drops the claim index built on it), its claim index.
SCHEMA_BEFORE = """
ALTER TABLE queued_jobs DROP COLUMN priority;
ALTER TABLE archived_jobs DROP COLUMN priority;
CREATE INDEX queued_jobs_claim ON queued_jobs (name, run_after, id) WHERE status = 'queued';
"""
SCHEMA_NOW = (ROOT / "jobrunner" / "migrations" / "0003_priority.sql").read_text()
# Jobs as both codes write them (the columns both know), in one statement.
ENQUEUE = """
INSERT INTO queued_jobs (id, name, attempts, run_after, status, data)
SELECT gen_random_uuid(), %s, 3, now(), 'queued', jsonb_build_object('n', n) FROM generate_series(1, %s) AS n
"""


def drain(database, args, root: Path, beside: str | None) -> dict:
    database.conn.execute("TRUNCATE queued_jobs, archived_jobs, jobrunner_rate_limits")
    services.update_job_type(database.conn, JOB_TYPE, concurrency=0)
    port = free_port()
    downstream = Downstream(port)
    service = Service(database, {"JOBRUNNER_WORKERS": str(args.workers), "JOBRUNNER_DISPATCH_THREADS": str(args.threads),
                                 **downstream_settings(downstream)}, port, root=root)
    try:
        database.conn.execute(ENQUEUE, (JOB_TYPE, args.jobs))
        database.conn.execute("ANALYZE queued_jobs")
        if beside == "limited":
            database.conn.execute(ENQUEUE, (LIMITED, 5_000))
        if beside:
            services.update_job_type(database.conn, LIMITED, concurrency=10)
            time.sleep(2)  # its bucket's burst is spent: it runs at its limit when `drain` is released
        released = time.monotonic()
        status, body = request(port, "POST", f"/v1/jobs/{JOB_TYPE}", {"concurrency": args.concurrency})
        if status != 200:
            raise SystemExit(f"rate_limits: releasing the jobs answered {status}: {body}")
        limited_before = database.scalar("SELECT count(*) FROM archived_jobs WHERE name = %s", (LIMITED,))
        wait_drained(database, args.jobs, "jobrunner", [service.process, downstream.process])
        elapsed = time.monotonic() - released
        limited_during = database.scalar("SELECT count(*) FROM archived_jobs WHERE name = %s", (LIMITED,)) - limited_before
        return {"rate": archive_rate(database, args.jobs), "limited_per_second": limited_during / elapsed}
    finally:
        service.stop()
        downstream.stop()
        services.update_job_type(database.conn, LIMITED, concurrency=0)


def exported(rev: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="jobrunner-before-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--before", default="528ddbb", help="the code to compare with (a git revision)")
    parser.add_argument("--limit", type=float, default=50.0, help="the limited type's jobs per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    before = exported(args.before)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    variants = {"before": None, "alone": None, "beside an idle type": "idle", "beside a limited type": "limited"}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with private_database() as database:
        services.create_job_type(database.conn, JOB_TYPE, "at_least_once", 3, 0)
        services.create_job_type(database.conn, LIMITED, "at_least_once", 3, 0)
        store.save_job_type_policy(database.conn, LIMITED, TypePolicy(rate_per_second=args.limit, rate_burst=max(1, int(args.limit))))
        for round_number in range(1, args.rounds + 1):
            for name in results:
                if name == "before":
                    database.conn.execute("TRUNCATE queued_jobs, archived_jobs")
                    database.conn.execute(SCHEMA_BEFORE)
                try:
                    result = drain(database, args, before if name == "before" else ROOT, variants[name])
                finally:
                    database.conn.execute("TRUNCATE queued_jobs, archived_jobs")
                    database.conn.execute(SCHEMA_NOW)
                results[name].append(result)
                print(f"round {round_number} {name}: {result['rate']:,.0f} jobs/s"
                      f" ({result['limited_per_second']:.1f} jobs/s of {LIMITED!r} meanwhile)", flush=True)

    rates = {name: [r["rate"] for r in runs] for name, runs in results.items()}
    ratios = {name: [r / b for r, b in zip(rates[name], rates["before"])] for name in rates if name != "before"}
    limited = [r["limited_per_second"] for r in results["beside a limited type"]]
    record(
        f"[code at {head}; before: {args.before}] rate limits and priorities, cost to a type using neither: drain {args.jobs:,} jobs "
        f"C={args.concurrency}, {args.workers}x{args.threads}, {args.rounds} rounds: before {median_spread(rates['before'])} jobs/s; "
        f"alone {median_spread(rates['alone'])} ({median_spread(ratios['alone'], '{:.2f}')} of before); "
        f"beside an idle type {median_spread(rates['beside an idle type'])} ({median_spread(ratios['beside an idle type'], '{:.2f}')} of before); "
        f"beside a type limited to {args.limit:g}/s {median_spread(rates['beside a limited type'])} "
        f"({median_spread(ratios['beside a limited type'], '{:.2f}')} of before; it sent {statistics.median(limited):.1f}/s meanwhile)"
    )


if __name__ == "__main__":
    main()

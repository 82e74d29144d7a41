"""Steady state: enqueue at a fixed rate while the workers drain; completed jobs/s and end-to-end latency.

    python bench/steady.py [--rate 500] [--duration 20] [--concurrency 50] [--clients 32] [--rounds 3]

`jobrunner run` (its defaults) on a private PostgreSQL, one job type `steady` of
`--concurrency`, bench/fast_downstream.py calling back `succeeded` at once. A
load generator in this process (--clients threads, each on one kept-alive
connection) PUTs job n at start + n / rate for --duration seconds, an open loop:
a slow queue does not slow the arrivals down, as long as a client is free (the
generator reports how far it fell behind its schedule, and its own CPU; more
than a second behind and the line says the queue did not keep up with the
offered rate). Then it waits until every job is archived.

Per job, end-to-end latency = when its callback archived it (archived_jobs.created_at,
the database's clock) - when its PUT started (this machine's clock: the same
one). Enqueued and completed jobs/s = jobs PUT, and jobs archived, while the
load ran / the time it ran (from the first PUT to the last).
Prints each round and the medians [min–max]; one result line is appended to
bench/results.txt.
"""

import argparse
import http.client
import itertools
import threading
import time
import uuid

from harness import (Downstream, Service, create_type, downstream_settings, free_port, median_spread, percentile,
                     private_database, record, request, wait_for)

JOB_TYPE = "steady"


def generate(port: int, rate: float, duration: float, clients: int) -> dict:
    """PUT `rate` jobs a second for `duration` seconds; {job id: start of its PUT (time.time())} and the worst lateness."""
    started = time.time() + 0.2
    numbers = itertools.count()
    sent: dict[str, float] = {}
    lateness = [0.0]
    failures = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            due = started + next(numbers) / rate
            if due >= started + duration:
                break
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            else:
                lateness[0] = max(lateness[0], -wait)
            job_id = f"job_{uuid.uuid4()}"
            at = time.time()
            status, body = request(port, "PUT", f"/v1/jobs/{JOB_TYPE}/{job_id}", {"data": {"n": 1}}, conn)
            if status == 202:
                sent[job_id] = at
            else:
                failures.append((status, body))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()

    cpu = time.process_time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ended = time.time()
    return {"sent": sent, "started": started, "ended": ended, "late": lateness[0], "failures": failures,
            "cpu": (time.process_time() - cpu) / (ended - started)}


def run_once(database, args) -> dict:
    database.conn.execute("TRUNCATE queued_jobs, archived_jobs")
    port = free_port()
    downstream = Downstream(port)
    service = Service(database, downstream_settings(downstream), port)
    try:
        if database.scalar("SELECT count(*) FROM jobs WHERE name = %s", (JOB_TYPE,)) == 0:
            create_type(port, JOB_TYPE, args.concurrency)
        load = generate(port, args.rate, args.duration, args.clients)
        if load["failures"]:
            raise SystemExit(f"steady: {len(load['failures'])} PUTs failed, e.g. {load['failures'][0]}")
        jobs = len(load["sent"])
        wait_for(lambda: database.scalar("SELECT count(*) FROM archived_jobs") >= jobs, "every job archived",
                 timeout=120 + jobs / 100, interval=0.2)
        archived = dict(database.conn.execute(
            "SELECT 'job_' || id::text, extract(epoch FROM created_at)::float8 FROM archived_jobs WHERE status = 'succeeded'"
        ).fetchall())
        if set(archived) != set(load["sent"]):
            raise SystemExit(f"steady: {len(set(load['sent']) - set(archived))} jobs did not succeed")
        latencies = [(archived[job_id] - at) * 1000 for job_id, at in load["sent"].items()]
        ran = load["ended"] - load["started"]
        completed = sum(1 for at in archived.values() if at <= load["ended"]) / ran
        return {"enqueued": jobs / ran, "completed": completed, "p50": percentile(latencies, 0.5),
                "p99": percentile(latencies, 0.99), "late": load["late"] * 1000, "cpu": load["cpu"]}
    finally:
        service.stop()
        downstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="jobs enqueued per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--clients", type=int, default=32, help="load generator threads (kept-alive connections)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runs = []
    with private_database() as database:
        for round_number in range(1, args.rounds + 1):
            run = run_once(database, args)
            runs.append(run)
            print(f"round {round_number}: enqueued {run['enqueued']:,.0f}/s, completed {run['completed']:,.0f} jobs/s, "
                  f"end-to-end p50 {run['p50']:.1f} ms p99 {run['p99']:.1f} ms (generator at most {run['late']:.1f} ms "
                  f"behind its schedule, {run['cpu']:.2f} CPU s/s)", flush=True)
    kept_up = "" if max(r["late"] for r in runs) < 1000 else " (DID NOT KEEP UP: the generator fell behind)"
    record(f"steady {args.rate:,.0f} jobs/s offered for {args.duration:g} s, C={args.concurrency}, {args.rounds} rounds{kept_up}: "
           f"enqueued {median_spread([r['enqueued'] for r in runs])}/s, "
           f"completed {median_spread([r['completed'] for r in runs])} jobs/s; end-to-end p50 "
           f"{median_spread([r['p50'] for r in runs], '{:.1f}')} ms, p99 {median_spread([r['p99'] for r in runs], '{:.1f}')} ms")


if __name__ == "__main__":
    main()

"""Idle: database load, connections and memory of `jobrunner run` with nothing queued, at 30 and at 300 slots.

    python bench/idle.py [--slots 30,300] [--window 30] [--concurrency 10]

For each total of slots S: `jobrunner run` (its defaults: one server, one
watcher, one worker per core) on a private PostgreSQL with S / --concurrency job
types, bench/fast_downstream.py, one job per type to warm up; then idle:

* database load: transactions (xact_commit + xact_rollback of the database)
  over a --window of seconds, after SETTLE seconds in which the last job's
  statistics reach pg_stat_database, with the statements behind them
  (pg_stat_statements);
* connections: client backends per jobrunner process (each names itself in
  application_name), against workers x (PG_WORKER_POOL_SIZE + 1) + PG_SERVER_POOL_SIZE;
* memory: PSS (/proc/PID/smaps_rollup; shared pages divided among the
  processes that share them) of the supervisor and every child, and the total.

One result line per S is appended to bench/results.txt.
"""

import argparse
import os
import re
import time

from harness import idle_service, memory_kb, private_database, record, store

SETTLE = 11.0  # seconds: PostgreSQL 15 backends flush their statistics at most 10 s after going idle
XACTS = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
STATEMENTS = """
SELECT query, sum(calls)::bigint FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query NOT LIKE '%%pg_stat%%'
GROUP BY query
"""
CONNECTIONS = """
SELECT application_name, count(*) FROM pg_stat_activity
WHERE backend_type = 'client backend' AND application_name LIKE 'jobrunner-%%' GROUP BY 1
"""


def read_once(url: str, query: str) -> list[tuple]:
    """On a connection of its own, closed at once: its backend flushes its statistics as it exits."""
    conn = store.connect(url, application_name="bench-probe")
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()
        time.sleep(0.2)


def measure(database, slots: int, concurrency: int, window: float) -> dict:
    with idle_service(database, slots // concurrency, concurrency) as (service, _downstream, _arrivals, _names):
        time.sleep(SETTLE)
        calls_before = dict(read_once(database.url, STATEMENTS))
        xacts_before = database.scalar(XACTS)
        started = time.monotonic()
        time.sleep(window)
        xacts = database.scalar(XACTS) - xacts_before - 1  # less the transaction that read the first count
        elapsed = time.monotonic() - started
        calls = {query: n - calls_before.get(query, 0) for query, n in read_once(database.url, STATEMENTS)}
        connections: dict[str, int] = {}
        for name, count in read_once(database.url, CONNECTIONS):
            role = re.sub(r":\d+$", "", name)  # jobrunner-worker:1234 -> jobrunner-worker
            connections[role] = connections.get(role, 0) + count
        pss = {name.removeprefix("jr-"): memory_kb(pid)["Pss"] / 1024 for name, pid in service.processes().items()}
        return {"load": xacts / elapsed, "calls": calls, "elapsed": elapsed, "connections": connections, "pss": pss,
                "workers": service.workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", default="30,300", help="total slots (job types x concurrency), comma-separated")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrency of each job type")
    parser.add_argument("--window", type=float, default=30.0, help="seconds over which idle transactions are counted")
    args = parser.parse_args()
    pool, server_pool = int(os.environ.get("PG_WORKER_POOL_SIZE", 4)), int(os.environ.get("PG_SERVER_POOL_SIZE", 10))

    totals = {}
    with private_database() as database:
        for slots in (int(s) for s in args.slots.split(",")):
            result = measure(database, slots, args.concurrency, args.window)
            print(f"{slots} slots, idle {result['elapsed']:.0f} s: {result['load']:.2f} transactions/s; statements:")
            for query, count in sorted(result["calls"].items(), key=lambda item: -item[1])[:6]:
                if count:
                    print(f"    {count / result['elapsed']:6.2f}/s  {' '.join(query.split())[:100]}")
            limit = result["workers"] * (pool + 1) + server_pool
            connections = sum(result["connections"].values())
            total = totals[slots] = sum(result["pss"].values())
            record(f"idle, {slots} slots ({slots // args.concurrency} types x {args.concurrency}), {result['workers']} workers: "
                   f"{result['load']:.2f} transactions/s; {connections} connections (limit {limit}: "
                   + ", ".join(f"{role.removeprefix('jobrunner-')} {n}" for role, n in sorted(result["connections"].items()))
                   + f"); PSS {total:.1f} MB ("
                   + ", ".join(f"{name} {mb:.1f}" for name, mb in result["pss"].items()) + ")")
    if len(totals) > 1:
        (low, low_mb), (high, high_mb) = min(totals.items()), max(totals.items())
        print(f"PSS at {high} slots - PSS at {low} slots: {high_mb - low_mb:+.1f} MB")


if __name__ == "__main__":
    main()

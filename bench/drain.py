"""Drain: N jobs enqueued with the workers paused, then released; jobs/s against the database's own ceiling.

    python bench/drain.py [--jobs 30000] [--rounds 3] [--concurrency 50] [--workers 2] [--threads 16]
                          [--servers 1] [--compare ENV=VALUE] [--rickover DIR] [--profile] [--ceiling-seconds 15]

On a private PostgreSQL (default settings, fsync on), for each concurrency C and
round, in turn:

1. the ceiling: pgbench runs bench/pg_lifecycle_single.sql (one job lifecycle as
   three single-row autocommit transactions: enqueue, claim with SKIP LOCKED,
   archive) with 16 clients for --ceiling-seconds; lifecycles/s = rows archived
   / seconds. The figure that compares across machines is drain / ceiling.
2. jobrunner: `jobrunner run` (--workers worker processes with --threads
   dispatch threads each, each number of server processes in --servers,
   otherwise its defaults) and bench/fast_downstream.py,
   which answers each POST at once and calls back `succeeded` over kept-alive
   connections. The job type `drain` is created with concurrency 0 (paused); N
   jobs are written straight into the database (1,000 per transaction, not
   timed); then `POST /v1/jobs/drain {"concurrency": C}` releases them. Each
   --compare ENV=VALUE drains again in the same round with that setting, so both
   meet the same machine (JOBRUNNER_PREPARED_STATEMENTS=off: its cost).
3. with --rickover (a directory holding Rickover's `server` and `dequeuer`, or
   its bin/): Rickover's own method on the same database and downstream, the
   jobs written the same way, then its dequeuer started.

Drain rate = jobs / time from the first archive to the last (archived_jobs.created_at);
every job must end `succeeded`. CPU seconds per second of drain are read from
/proc for each process: PostgreSQL, jobrunner's supervisor, server, watcher and
workers, the downstream. --profile attaches `py-spy record --gil` to the server
and the workers during jobrunner's drain and prints where each spends its CPU,
and prints the statements that took PostgreSQL's time (pg_stat_statements).

One result line per C is appended to bench/results.txt: the medians (and
[min–max]) of jobrunner's drain, the ceiling, drain / ceiling and, with
--rickover, Rickover's.
"""

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from harness import (BENCH, DOWNSTREAM_PASSWORD, Database, Downstream, Service, cpu_seconds, downstream_settings, free_port,
                     median_spread, private_database, record, request, stop, top_statements, wait_for)

from jobrunner import services, store
from jobrunner.localdb import find_server_binary

JOB_TYPE = "drain"
CEILING_CLIENTS = 16


def ceiling(database: Database, seconds: int) -> float:
    """Lifecycles/s of bench/pg_lifecycle_single.sql under pgbench, on this database."""
    pgbench = shutil.which("pgbench") or find_server_binary("pgbench")
    before = database.scalar("SELECT count(*) FROM archived_jobs WHERE name = 'pgbench'")
    subprocess.run([pgbench, "-n", "-M", "prepared", "-c", str(CEILING_CLIENTS), "-j", "2", "-T", str(seconds),
                    "-f", str(BENCH / "pg_lifecycle_single.sql"), database.url],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = database.scalar("SELECT count(*) FROM archived_jobs WHERE name = 'pgbench'") - before
    database.conn.execute("DELETE FROM queued_jobs WHERE name = 'pgbench'")
    database.conn.execute("DELETE FROM archived_jobs WHERE name = 'pgbench'")
    return done / seconds


def enqueue_paused(database: Database, jobs: int) -> None:
    for start in range(0, jobs, 1000):
        batch = [store.NewJob(uuid.uuid4(), JOB_TYPE, {"n": n}, None, None) for n in range(start, min(start + 1000, jobs))]
        store.enqueue_jobs(database.conn, batch)
    database.conn.execute("ANALYZE queued_jobs")


def wait_drained(database: Database, jobs: int, what: str, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + max(120, jobs / 50)
    while database.scalar("SELECT count(*) FROM archived_jobs WHERE name = %s", (JOB_TYPE,)) < jobs:
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            sys.exit(f"drain: {what} did not drain {jobs} jobs")
        time.sleep(0.1)
    statuses = dict(database.conn.execute(
        "SELECT status::text, count(*) FROM archived_jobs WHERE name = %s GROUP BY 1", (JOB_TYPE,)).fetchall())
    if statuses != {"succeeded": jobs}:
        sys.exit(f"drain: {what} archived {statuses}, not {jobs} succeeded")


def archive_rate(database: Database, jobs: int) -> float:
    seconds = database.scalar("SELECT extract(epoch FROM max(created_at) - min(created_at)) FROM archived_jobs WHERE name = %s",
                              (JOB_TYPE,))
    return (jobs - 1) / float(seconds)


class Profiler:
    """py-spy record --gil on some processes (a sample goes to the thread that last held the GIL); folded stacks."""

    def __init__(self, pids: dict[str, int]):
        py_spy = shutil.which("py-spy") or sys.exit("drain: --profile needs py-spy (pip install py-spy)")
        self.dir = tempfile.mkdtemp(prefix="jobrunner-profile-")
        self.recorders = {name: subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--gil", "--rate", "200", "--format", "raw", "--output",
             f"{self.dir}/{name}.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()}
        time.sleep(1)  # py-spy attaches

    def report(self, top: int = 10) -> list[str]:
        for recorder in self.recorders.values():
            recorder.send_signal(signal.SIGINT)
        lines = []
        for name, recorder in self.recorders.items():
            recorder.wait(timeout=30)
            own, within = collections.Counter(), collections.Counter()
            total = 0
            for line in Path(f"{self.dir}/{name}.txt").read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
                own[frames[-1]] += int(count)
                for frame in set(frames):
                    if "jobrunner/" in frame:
                        within[frame] += int(count)
                total += int(count)
            lines.append(f"  {name}: {total} samples holding the GIL; most own time:")
            lines += [f"    {100 * count / total:5.1f}%  {frame}" for frame, count in own.most_common(top)]
            lines.append(f"  {name}, time within jobrunner's functions:")
            lines += [f"    {100 * count / total:5.1f}%  {frame}" for frame, count in within.most_common(top)]
        lines.append(f"  (py-spy's folded stacks are kept in {self.dir})")
        return lines


def drain_jobrunner(database: Database, args, concurrency: int, servers: str, settings: dict[str, str] | None = None) -> dict:
    database.conn.execute("TRUNCATE queued_jobs, archived_jobs")
    services.update_job_type(database.conn, JOB_TYPE, concurrency=0)
    port = free_port()
    downstream = Downstream(port)
    service = Service(database, {"JOBRUNNER_WORKERS": str(args.workers), "JOBRUNNER_DISPATCH_THREADS": str(args.threads),
                                 "JOBRUNNER_SERVERS": servers, **downstream_settings(downstream), **(settings or {})}, port)
    try:
        enqueue_paused(database, args.jobs)
        processes = {name.removeprefix("jr-"): pid for name, pid in service.processes().items()}
        processes["downstream"] = downstream.process.pid
        profiler = Profiler({n: p for n, p in processes.items() if n.startswith(("server", "worker"))}) if args.profile else None
        before = {name: cpu_seconds([pid]) for name, pid in processes.items()} | {"postgres": cpu_seconds(database.pids())}
        database.conn.execute("SELECT pg_stat_statements_reset()")
        released = time.monotonic()
        status, body = request(port, "POST", f"/v1/jobs/{JOB_TYPE}", {"concurrency": concurrency})
        if status != 200:
            sys.exit(f"drain: releasing the jobs answered {status}: {body}")
        wait_drained(database, args.jobs, "jobrunner", [service.process, downstream.process])
        elapsed = time.monotonic() - released
        used = {name: cpu_seconds([pid]) for name, pid in processes.items()} | {"postgres": cpu_seconds(database.pids())}
        result = {"rate": archive_rate(database, args.jobs), "elapsed": elapsed,
                  "cpu": {name: (used[name] - before[name]) / elapsed for name in used}}
        if profiler:
            result["profile"] = profiler.report() + ["  postgres, by statement:"] + ["    " + s for s in top_statements(database)]
        return result
    finally:
        service.stop()
        downstream.stop()


def drain_rickover(database: Database, args, concurrency: int) -> dict:
    server_binary, dequeuer_binary = rickover_binaries(args.rickover)
    database.conn.execute("TRUNCATE queued_jobs, archived_jobs")
    services.update_job_type(database.conn, JOB_TYPE, concurrency=concurrency)
    socket_dir = database.cluster.socket_dir
    env = {**os.environ, "DATABASE_URL": f"postgres://jobrunner@/postgres?host={socket_dir}&port=5432&sslmode=disable&timezone=UTC"}
    port = free_port()
    downstream = Downstream(port, user="test", password="hymanrickover")
    server = subprocess.Popen([server_binary], env={**env, "PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dequeuer = None
    try:
        wait_for(lambda: request(port, "GET", "/v1/jobs/drain")[0] is not None, "Rickover's server")
        enqueue_paused(database, args.jobs)
        pids = {"server": server.pid, "downstream": downstream.process.pid}
        before = {name: cpu_seconds([pid]) for name, pid in pids.items()} | {"postgres": cpu_seconds(database.pids())}
        started = time.monotonic()
        dequeuer = subprocess.Popen([dequeuer_binary], env={**env, "DOWNSTREAM_URL": downstream.url,
                                                            "DOWNSTREAM_WORKER_AUTH": DOWNSTREAM_PASSWORD},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_drained(database, args.jobs, "rickover", [server, dequeuer, downstream.process])
        elapsed = time.monotonic() - started
        used = ({name: cpu_seconds([pid]) for name, pid in pids.items()} | {"postgres": cpu_seconds(database.pids())})
        cpu = {name: (used[name] - before[name]) / elapsed for name in used} | {"dequeuer": cpu_seconds([dequeuer.pid]) / elapsed}
        return {"rate": archive_rate(database, args.jobs), "elapsed": elapsed, "cpu": cpu}
    finally:
        for process in (dequeuer, server):
            if process is not None:
                stop(process)
        downstream.stop()


def rickover_binaries(directory: str) -> tuple[str, str]:
    for base in (Path(directory), Path(directory) / "bin"):
        if (base / "server").exists() and (base / "dequeuer").exists():
            return str(base / "server"), str(base / "dequeuer")
    sys.exit(f"drain: no server and dequeuer in {directory} or {directory}/bin")


def cpu_line(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {share:.2f}" for name, share in sorted(cpu.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="50", help="job type concurrencies C, comma-separated")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="jobrunner worker processes")
    parser.add_argument("--threads", type=int, default=16, help="dispatch threads per worker")
    parser.add_argument("--servers", default="1", help="jobrunner server processes (JOBRUNNER_SERVERS), comma-separated")
    parser.add_argument("--compare", action="append", default=[], metavar="ENV=VALUE",
                        help="also drain, in each round, with this setting (e.g. JOBRUNNER_PREPARED_STATEMENTS=off); repeatable")
    parser.add_argument("--rickover", help="directory of Rickover's server and dequeuer binaries")
    parser.add_argument("--profile", action="store_true", help="py-spy the server and workers; top statements")
    parser.add_argument("--ceiling-seconds", type=int, default=15)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    results: dict[tuple[int, str], list[dict]] = collections.defaultdict(list)
    with private_database() as database:
        # Rickover's dequeuer claims ORDER BY created_at: its own migrations add this index, which it needs
        database.conn.execute("CREATE INDEX IF NOT EXISTS queued_jobs_created_at ON queued_jobs (created_at)")
        services.create_job_type(database.conn, JOB_TYPE, "at_least_once", 3, 0)
        services.create_job_type(database.conn, "pgbench", "at_least_once", 3, 1)
        for concurrency in concurrencies:
            for round_number in range(1, args.rounds + 1):
                rate = ceiling(database, args.ceiling_seconds)
                results[(concurrency, "ceiling")].append({"rate": rate})
                print(f"C={concurrency} round {round_number} ceiling: {rate:,.0f} lifecycles/s", flush=True)
                runs = [("jobrunner" if n == "1" else f"jobrunner {n} servers",
                         lambda database, args, concurrency, n=n: drain_jobrunner(database, args, concurrency, n))
                        for n in args.servers.split(",")]
                runs += [(f"jobrunner {setting}",
                          lambda database, args, concurrency, setting=setting: drain_jobrunner(
                              database, args, concurrency, args.servers.split(",")[0], dict([setting.split("=", 1)])))
                         for setting in args.compare]
                runs += [("rickover", drain_rickover)] if args.rickover else []
                for name, drain in runs:
                    result = drain(database, args, concurrency)
                    results[(concurrency, name)].append(result)
                    print(f"C={concurrency} round {round_number} {name}: {result['rate']:,.0f} jobs/s = {result['rate'] / rate:.2f} "
                          f"of the ceiling ({args.jobs:,} in {result['elapsed']:.1f} s from release; "
                          f"CPU s/s: {cpu_line(result['cpu'])})", flush=True)
                    for line in result.get("profile", []):
                        print(line)

    print()
    for concurrency in concurrencies:
        ceilings = [r["rate"] for r in results[(concurrency, "ceiling")]]
        line = (f"drain {args.jobs:,} jobs C={concurrency}, {args.workers}x{args.threads}, {args.rounds} rounds: "
                f"ceiling {median_spread(ceilings)} lifecycles/s")
        for name in [name for c, name in results if c == concurrency and name != "ceiling"]:
            runs = results.get((concurrency, name))
            if runs:
                rates = [r["rate"] for r in runs]
                ratios = [r["rate"] / c for r, c in zip(runs, ceilings)]
                line += f"; {name} {median_spread(rates)} jobs/s, drain/ceiling {median_spread(ratios, '{:.2f}')}"
                cpu = {part: statistics.median(r["cpu"][part] for r in runs) for part in runs[0]["cpu"]}
                print(f"    {name} median CPU seconds per second of drain: {cpu_line(cpu)}")
        record(line)


if __name__ == "__main__":
    main()

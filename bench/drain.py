"""Drain throughput (Rickover's method): enqueue N jobs with the workers stopped, then start them and time the drain.

    python bench/drain.py [--jobs 30000] [--rounds 3] [--concurrency 10,50,100]
                          [--jobrunner 1x16,2x16] [--rickover DIR]

Starts a private PostgreSQL with one job type, `drain` (at_least_once, 3 attempts,
concurrency C). For each C and round, each target in turn (alternating, so that
all see the same machine noise) runs against the same database:

1. TRUNCATE queued_jobs, archived_jobs; start the target's HTTP server and
   bench/fast_downstream.py (which calls back `succeeded` on that server);
2. enqueue N jobs straight into the database with jobrunner.store.enqueue_jobs,
   1,000 per transaction (not timed), then ANALYZE queued_jobs;
3. start the workers — jobrunner: W x `python -m jobrunner work` with
   JOBRUNNER_DISPATCH_THREADS=T (`--jobrunner WxT,...`); Rickover: its
   `dequeuer` — and time from their start until archived_jobs holds N rows
   (polled every 100 ms); every one must be `succeeded`.

The database is by default an upgraded Rickover one (`--schema upgraded`):
jobrunner's schema plus the one index Rickover's own migrations add to it,
queued_jobs (created_at), which Rickover's dequeuer needs (it claims ORDER BY
created_at LIMIT 1; without the index each claim sorts the whole backlog).
`--schema jobrunner` is a fresh `jobrunner migrate` alone.

With --statements, pg_stat_statements is loaded and each run also prints the
statements that took the database's time during the drain.

Prints each run, the medians in jobs/s and, with --rickover (a directory holding
Rickover's `server` and `dequeuer`, or its bin/), the ratio of each jobrunner
configuration to Rickover. Also prints the CPU each part used during the drain
(seconds of CPU per second of drain; the machine has os.cpu_count() cores) to
show what bounds it. One result line per C is appended to bench/results.txt.
"""

import argparse
import base64
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from jobrunner import services, store  # noqa: E402
from jobrunner.cli import migrate  # noqa: E402
from jobrunner.localdb import LocalPostgres  # noqa: E402

JOB_TYPE = "drain"
DOWNSTREAM_PASSWORD = "downstream-secret"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, auth: str | None, process: subprocess.Popen, what: str) -> None:
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(request, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                sys.exit(f"drain: {what} did not start")
            time.sleep(0.05)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def postgres_pids(cluster: LocalPostgres) -> list[int]:
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Target:
    """A queue implementation: how to start its server and its workers."""

    def __init__(self, name: str, server: list[str], workers: list[list[str]], env: dict, user: str, password: str,
                 worker_env: dict):
        self.name, self.server, self.workers, self.env, self.worker_env = name, server, workers, env, worker_env
        self.user, self.password = user, password
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


TOP_STATEMENTS = """
SELECT calls, total_exec_time / calls AS mean_ms, rows::float8 / calls AS rows_per_call,
       total_exec_time / 1000 AS seconds, query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query NOT LIKE '%%pg_stat%%'
ORDER BY total_exec_time DESC
LIMIT 6
"""


def run_once(target: Target, conn, cluster: LocalPostgres, jobs: int, statements: bool = False) -> dict:
    conn.execute("TRUNCATE queued_jobs, archived_jobs")
    port, downstream_port = free_port(), free_port()
    env = {**os.environ, **target.env}
    server = subprocess.Popen(target.server, env={**env, "PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    downstream_log = tempfile.TemporaryFile("w+")
    downstream = subprocess.Popen(
        [sys.executable, str(BENCH / "fast_downstream.py"), "--port", str(downstream_port),
         "--api", f"http://127.0.0.1:{port}", "--user", target.user, "--password", target.password],
        stdout=subprocess.DEVNULL, stderr=downstream_log,
    )
    workers = []
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/jobs/{JOB_TYPE}", target.auth, server, f"{target.name} server")
        wait_http(f"http://127.0.0.1:{downstream_port}/stats", None, downstream, "fast_downstream")
        for start in range(0, jobs, 1000):
            batch = [store.NewJob(uuid.uuid4(), JOB_TYPE, {"n": n}, None, None)
                     for n in range(start, min(start + 1000, jobs))]
            store.enqueue_jobs(conn, batch)
        conn.execute("ANALYZE queued_jobs")
        worker_env = {**env, **target.worker_env, "DOWNSTREAM_URL": f"http://127.0.0.1:{downstream_port}",
                      "DOWNSTREAM_WORKER_AUTH": DOWNSTREAM_PASSWORD}
        pg_pids = postgres_pids(cluster)
        cpu_before = {"postgres": cpu_seconds(pg_pids), "server": cpu_seconds([server.pid]),
                      "downstream": cpu_seconds([downstream.pid])}
        if statements:
            conn.execute("SELECT pg_stat_statements_reset()")
        started = time.monotonic()
        workers = [subprocess.Popen(command, env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for command in target.workers]
        first_at = None
        deadline = started + max(120, jobs / 50)
        while True:
            done = conn.execute("SELECT count(*) FROM archived_jobs").fetchone()[0]
            now = time.monotonic()
            if done and first_at is None:
                first_at = now
            if done >= jobs:
                break
            if now > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError(f"{target.name}: {done} of {jobs} archived after {now - started:.0f} s")
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        pg_pids = postgres_pids(cluster)  # backends started during the run count too (from 0)
        cpu = {
            "postgres": cpu_seconds(pg_pids) - cpu_before["postgres"],
            "server": cpu_seconds([server.pid]) - cpu_before["server"],
            "workers": cpu_seconds([w.pid for w in workers]),
            "downstream": cpu_seconds([downstream.pid]) - cpu_before["downstream"],
        }
        statuses = dict(conn.execute("SELECT status::text, count(*) FROM archived_jobs GROUP BY 1").fetchall())
        if statuses != {"succeeded": jobs}:
            raise RuntimeError(f"{target.name}: archived {statuses}, not {jobs} succeeded")
        top = conn.execute(TOP_STATEMENTS).fetchall() if statements else []
        return {"top": top, "rate": jobs / elapsed, "elapsed": elapsed, "startup": (first_at or started) - started,
                "cpu": {name: seconds / elapsed for name, seconds in cpu.items()}}
    finally:
        for worker in workers:
            stop(worker)
        stop(server)
        stop(downstream)
        downstream_log.seek(0)
        errors = [line for line in downstream_log.read().splitlines() if "callback failed" in line]
        downstream_log.close()
        if errors:
            print(f"  {target.name}: {len(errors)} callbacks failed, e.g. {errors[0]}", file=sys.stderr)


def rickover_binaries(directory: str) -> tuple[str, str]:
    for base in (Path(directory), Path(directory) / "bin"):
        if (base / "server").exists() and (base / "dequeuer").exists():
            return str(base / "server"), str(base / "dequeuer")
    sys.exit(f"drain: no server and dequeuer in {directory} or {directory}/bin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="10,50,100", help="job type concurrencies C, comma-separated")
    parser.add_argument("--jobrunner", default="1x16,2x16",
                        help="jobrunner configurations WxT: W worker processes, T JOBRUNNER_DISPATCH_THREADS each")
    parser.add_argument("--pool-size", type=int, help="PG_WORKER_POOL_SIZE for jobrunner's workers (default: theirs)")
    parser.add_argument("--rickover", help="directory of Rickover's server and dequeuer binaries")
    parser.add_argument("--statements", action="store_true", help="load pg_stat_statements; print the top statements")
    parser.add_argument("--schema", choices=["upgraded", "jobrunner"], default="upgraded",
                        help="upgraded: jobrunner's schema plus Rickover's queued_jobs (created_at) index (default); "
                             "jobrunner: jobrunner's alone")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    workdir = tempfile.mkdtemp(prefix="jobrunner-bench-")
    os.chmod(workdir, 0o755)
    cluster = LocalPostgres(Path(workdir) / "data",
                            {"shared_preload_libraries": "'pg_stat_statements'"} if args.statements else None)
    url = cluster.start()
    results: dict[tuple[int, str], list[dict]] = {}
    try:
        migrate(url)
        conn = store.connect(url)
        if args.statements:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if args.schema == "upgraded":
            conn.execute("CREATE INDEX IF NOT EXISTS queued_jobs_created_at ON queued_jobs (created_at ASC)")
        services.create_job_type(conn, JOB_TYPE, "at_least_once", 3, concurrencies[0])
        base_env = {"DATABASE_URL": url, "JOBRUNNER_USERS": "bench:bench", "JOBRUNNER_LOG_LEVEL": "WARNING",
                    "PYTHONPATH": str(BENCH.parent)}
        targets = []
        for spec in filter(None, args.jobrunner.split(",")):
            workers, threads = (int(n) for n in spec.lower().split("x"))
            worker_env = {"JOBRUNNER_DISPATCH_THREADS": str(threads)}
            if args.pool_size:
                worker_env["PG_WORKER_POOL_SIZE"] = str(args.pool_size)
            targets.append(Target(
                f"jobrunner {workers}x{threads}", [sys.executable, "-m", "jobrunner", "serve", "--host", "127.0.0.1"],
                [[sys.executable, "-m", "jobrunner", "work"]] * workers, base_env, "bench", "bench", worker_env,
            ))
        if args.rickover:
            server, dequeuer = rickover_binaries(args.rickover)
            pq_url = f"postgres://jobrunner@/postgres?host={cluster.socket_dir}&port=5432&sslmode=disable&timezone=UTC"
            targets.append(Target("rickover", [server], [[dequeuer]], {"DATABASE_URL": pq_url}, "test", "hymanrickover", {}))

        for concurrency in concurrencies:
            services.update_job_type(conn, JOB_TYPE, concurrency=concurrency)
            for round_number in range(args.rounds):
                for target in targets:
                    result = run_once(target, conn, cluster, args.jobs, args.statements)
                    results.setdefault((concurrency, target.name), []).append(result)
                    cpu = ", ".join(f"{name} {share:.2f}" for name, share in result["cpu"].items())
                    print(f"C={concurrency} round {round_number + 1} {target.name}: {result['rate']:,.0f} jobs/s "
                          f"({args.jobs:,} in {result['elapsed']:.1f} s, first archived after {result['startup']:.2f} s; "
                          f"CPU/s: {cpu})", flush=True)
                    for calls, mean_ms, rows, seconds, query in result["top"]:
                        print(f"    {seconds:6.1f} s {calls:7,} calls {mean_ms:6.2f} ms {rows:6.1f} rows/call  "
                              f"{' '.join(query.split())[:90]}", flush=True)
        conn.close()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    with open(BENCH / "results.txt", "a") as results_file:
        for concurrency in concurrencies:
            medians = {t.name: statistics.median(r["rate"] for r in results[(concurrency, t.name)]) for t in targets}
            line = (f"drain {args.jobs:,} jobs C={concurrency} ({args.schema} schema), median of {args.rounds} (jobs/s): "
                    + "; ".join(f"{name} {rate:,.0f}" for name, rate in medians.items()))
            if "rickover" in medians and len(medians) > 1:
                line += "; jobrunner/rickover = " + ", ".join(
                    f"{name.split(' ', 1)[1]} {rate / medians['rickover']:.2f}"
                    for name, rate in medians.items() if name != "rickover")
            print(line)
            for target in targets:
                runs = results[(concurrency, target.name)]
                cpu = ", ".join(f"{part} {statistics.median(r['cpu'][part] for r in runs):.2f}" for part in runs[0]["cpu"])
                print(f"    {target.name} median CPU per second of drain: {cpu}")
            results_file.write(f"{time.strftime('%Y-%m-%d %H:%M')} {line}\n")


if __name__ == "__main__":
    main()

"""Idle workers: dispatch latency after an idle spell, database load while idle, connections held.

    python bench/worker_idle.py [--idle 30] [--samples 5] [--types 30] [--concurrency 10] [--workers 2]

Starts a private PostgreSQL (with pg_stat_statements), `--types` job types of
concurrency `--concurrency` each (30 x 10 = 300 by default), `python -m jobrunner serve`,
`--workers` x `python -m jobrunner work` (their default settings unless the
environment sets JOBRUNNER_* / PG_WORKER_POOL_SIZE) and bench/fast_downstream.py,
which prints the CLOCK_MONOTONIC time of every POST's arrival to a pipe read here.
Each process connects with its own application_name, so pg_stat_activity tells
them apart.

After a warm-up, `--samples` times:
  * stay idle `--idle` seconds: the first SETTLE seconds let the last job's
    statistics reach pg_stat_database (a backend flushes them up to 10 s late);
    over the rest, the load window, count transactions (xact_commit + xact_rollback
    of the database, less the bench's one snapshot transaction) and, with
    pg_stat_statements, which statements ran;
  * PUT one job (to the next job type in turn) and time from the PUT's response to
    the downstream's receipt of the POST; wait for its callback.

Prints p50 and max of the latencies, the idle load (transactions/s, median of
the windows and overall) with the statements behind it, the client backends per
process against workers x (PG_WORKER_POOL_SIZE + 1), and the processes' memory.
One result line is appended to bench/results.txt.
"""

import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from jobrunner import services, store  # noqa: E402
from jobrunner.cli import migrate  # noqa: E402
from jobrunner.config import load_config  # noqa: E402
from jobrunner.localdb import LocalPostgres  # noqa: E402

SETTLE = 11.0  # seconds: PostgreSQL 15 backends flush their statistics at most 10 s after going idle
USER, PASSWORD = "bench", "bench"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
XACTS = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
STATEMENTS = """
SELECT query, sum(calls)::bigint FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query NOT LIKE '%%pg_stat%%'
GROUP BY query
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_application_name(url: str, name: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0]) / 1024
    return values["Rss"], values["Pss"]


class Arrivals:
    """Reads fast_downstream's `<monotonic> <name> <id>` lines: job id -> arrival time."""

    def __init__(self, stream):
        self.times: dict[str, float] = {}
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            at, _name, job_id = line.split()
            with self.changed:
                self.times[job_id] = float(at)
                self.changed.notify_all()

    def wait_for(self, job_id: str, timeout: float) -> float | None:
        with self.changed:
            self.changed.wait_for(lambda: job_id in self.times, timeout)
            return self.times.get(job_id)


def put_job(port: int, name: str) -> tuple[str, float]:
    """PUT one job on a new connection; its id and when its response had been read."""
    job_id = f"job_{uuid.uuid4()}"
    body = json.dumps({"data": {"to": "someone@example.com", "n": 1}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.request("PUT", f"/v1/jobs/{name}/{job_id}", body=body,
                 headers={"Authorization": AUTH, "Content-Type": "application/json"})
    response = conn.getresponse()
    answer = response.read()
    answered_at = time.monotonic()
    conn.close()
    if response.status not in (200, 201, 202):
        sys.exit(f"worker_idle: PUT answered {response.status}: {answer[:200]!r}")
    return job_id, answered_at


def wait_callbacks(downstream_port: int, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{downstream_port}/stats", timeout=5).read())
        if stats["callbacks_ok"] + stats["callbacks_failed"] >= count:
            if stats["callbacks_failed"]:
                sys.exit(f"worker_idle: callbacks failed: {stats}")
            return
        if time.monotonic() > deadline:
            sys.exit(f"worker_idle: callbacks did not come: {stats}")
        time.sleep(0.02)


def read_once(url: str, query: str) -> list[tuple]:
    """On a connection of its own, closed at once: its backend flushes its statistics as it exits."""
    conn = store.connect(with_application_name(url, "bench-probe"))
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=30.0, help="seconds idle before each job (more than 11)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--types", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.idle <= SETTLE:
        parser.error(f"--idle must be more than {SETTLE:.0f} s")
    worker_config = load_config(os.environ)
    pool_size = worker_config.worker_pool_size

    workdir = tempfile.mkdtemp(prefix="jobrunner-bench-")
    os.chmod(workdir, 0o755)
    cluster = LocalPostgres(Path(workdir) / "data", {"shared_preload_libraries": "'pg_stat_statements'"})
    url = cluster.start()
    processes: dict[str, subprocess.Popen] = {}
    try:
        migrate(url)
        snapshots = store.connect(with_application_name(url, "bench"))
        snapshots.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        names = [f"idle{n:02d}" for n in range(args.types)]
        for name in names:
            services.create_job_type(snapshots, name, "at_least_once", 3, args.concurrency)

        port, downstream_port = free_port(), free_port()
        env = {**os.environ, "JOBRUNNER_USERS": f"{USER}:{PASSWORD}", "JOBRUNNER_LOG_LEVEL": "WARNING",
               "PYTHONPATH": str(BENCH.parent)}
        processes["server"] = subprocess.Popen(
            [sys.executable, "-m", "jobrunner", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "DATABASE_URL": with_application_name(url, "jobrunner-server")},
            stdout=subprocess.DEVNULL,
        )
        processes["downstream"] = subprocess.Popen(
            [sys.executable, str(BENCH / "fast_downstream.py"), "--port", str(downstream_port),
             "--api", f"http://127.0.0.1:{port}", "--user", USER, "--password", PASSWORD, "--arrivals", "-"],
            stdout=subprocess.PIPE, text=True,
        )
        arrivals = Arrivals(processes["downstream"].stdout)
        for n in range(args.workers):
            processes[f"worker {n + 1}"] = subprocess.Popen(
                [sys.executable, "-m", "jobrunner", "work"],
                env={**env, "DATABASE_URL": with_application_name(url, f"jobrunner-worker-{n + 1}"),
                     "DOWNSTREAM_URL": f"http://127.0.0.1:{downstream_port}", "DOWNSTREAM_WORKER_AUTH": "secret"},
            )

        # warm-up: one job per type, until every one has been sent and called back
        deadline = time.monotonic() + 30
        while True:
            try:
                put_job(port, names[0])
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("worker_idle: the server did not start")
                time.sleep(0.1)
        warm = [put_job(port, name)[0] for name in names[1:]]
        for job_id in warm:
            if arrivals.wait_for(job_id, 30) is None:
                sys.exit("worker_idle: warm-up jobs were not dispatched")
        wait_callbacks(downstream_port, len(names))
        sent = len(names)

        connections = dict(read_once(url, "SELECT application_name, count(*) FROM pg_stat_activity "
                                          "WHERE backend_type = 'client backend' GROUP BY 1"))
        latencies, loads, window_seconds, window_xacts = [], [], 0.0, 0
        calls: dict[str, int] = {}
        for sample in range(args.samples):
            idle_since = time.monotonic()
            time.sleep(SETTLE)
            before = dict(read_once(url, STATEMENTS))
            xacts0 = snapshots.execute(XACTS).fetchone()[0]
            started = time.monotonic()
            time.sleep(max(0.0, idle_since + args.idle - 0.25 - time.monotonic()))  # 0.25: read_once, below
            xacts1 = snapshots.execute(XACTS).fetchone()[0]
            elapsed = time.monotonic() - started
            after = dict(read_once(url, STATEMENTS))
            xacts = xacts1 - xacts0 - 1  # less the snapshot transaction that opened the window
            loads.append(xacts / elapsed)
            window_seconds += elapsed
            window_xacts += xacts
            for query, count in after.items():
                if count - before.get(query, 0):
                    calls[query] = calls.get(query, 0) + count - before.get(query, 0)

            name = names[sample % len(names)]
            job_id, answered_at = put_job(port, name)
            arrived_at = arrivals.wait_for(job_id, 30)
            if arrived_at is None:
                sys.exit(f"worker_idle: job {job_id} was not dispatched within 30 s")
            latencies.append((arrived_at - answered_at) * 1000)
            sent += 1
            wait_callbacks(downstream_port, sent)
            print(f"sample {sample + 1}: idle load {loads[-1]:.2f} transactions/s over {elapsed:.1f} s; "
                  f"dispatch {latencies[-1]:.2f} ms after the PUT's response ({name})", flush=True)

        memory = {name: memory_mb(p.pid) for name, p in processes.items() if name != "downstream"}
        snapshots.close()
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    worker_connections = sum(n for app, n in connections.items() if app.startswith("jobrunner-worker"))
    limit = args.workers * (pool_size + 1)
    p50, worst = statistics.median(latencies), max(latencies)
    overall = window_xacts / window_seconds
    print()
    print(f"dispatch latency after {args.idle:.0f} s idle, {len(latencies)} samples: p50 {p50:.2f} ms, max {worst:.2f} ms "
          f"(targets 5 / 50 ms: {'met' if p50 <= 5 and worst <= 50 else 'MISSED'})")
    print(f"idle load: median {statistics.median(loads):.2f} transactions/s, overall {overall:.2f} "
          f"({window_xacts} in {window_seconds:.0f} s; target < 5/s: {'met' if overall < 5 else 'MISSED'}); statements:")
    for query, count in sorted(calls.items(), key=lambda item: -item[1])[:8]:
        print(f"    {count / window_seconds:6.2f}/s  {' '.join(query.split())[:110]}")
    print(f"client backends: workers {worker_connections} (target <= {args.workers} x ({pool_size} + 1) = {limit}: "
          f"{'met' if worker_connections <= limit else 'MISSED'}), server {connections.get('jobrunner-server', 0)}; "
          + ", ".join(f"{app or '-'} {n}" for app, n in sorted(connections.items())))
    print("memory (RSS / PSS MB): " + ", ".join(f"{name} {rss:.1f} / {pss:.1f}" for name, (rss, pss) in memory.items()))
    line = (f"worker idle, {args.workers} workers, {args.types}x{args.concurrency} slots: dispatch after {args.idle:.0f} s idle "
            f"p50 {p50:.1f} ms max {worst:.1f} ms ({len(latencies)} samples); idle load {overall:.2f} xact/s; "
            f"client backends workers {worker_connections} (<= {limit}) server {connections.get('jobrunner-server', 0)}")
    with open(BENCH / "results.txt", "a") as results_file:
        results_file.write(f"{time.strftime('%Y-%m-%d %H:%M')} {line}\n")


if __name__ == "__main__":
    main()

"""Enqueue throughput: PUT /v1/jobs/bench/<id> with 50 keep-alive clients (wrk), jobrunner vs Rickover.

    python bench/http_enqueue.py [--rounds 3] [--duration 10] [--connections 50] [--rickover PATH]

Starts a private PostgreSQL, then runs each server in turn against the same
database, alternating rounds so that both see the same machine noise, and
prints the medians and their ratio. With --rickover (the path of Rickover's
`server` binary, built from Shyp/rickover) Rickover is measured side by side;
without it only jobrunner is. One result line is appended to bench/results.txt.
"""

import argparse
import base64
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from jobrunner import services, store  # noqa: E402
from jobrunner.cli import migrate  # noqa: E402
from jobrunner.localdb import LocalPostgres  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_wrk() -> str:
    if not shutil.which("wrk"):
        if os.geteuid() != 0:
            sys.exit("http_enqueue: wrk not found; install it (apt-get install wrk)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("wrk")


class Target:
    def __init__(self, name: str, command: list[str], env: dict, user: str, password: str):
        self.name, self.command, self.env = name, command, env
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def start(self, port: int) -> subprocess.Popen:
        env = {**os.environ, **self.env, "PORT": str(port)}
        process = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/jobs/bench", headers={"Authorization": self.auth})
        while True:
            try:
                urllib.request.urlopen(request, timeout=1).read()
                return process
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or process.poll() is not None:
                    process.kill()
                    sys.exit(f"http_enqueue: {self.name} did not start")
                time.sleep(0.1)


def run_wrk(wrk: str, port: int, auth: str, connections: int, duration: int) -> tuple[float, float]:
    """Requests per second and p99 latency (ms) of one wrk run."""
    output = subprocess.run(
        [wrk, "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(BENCH / "enqueue.lua"),
         f"http://127.0.0.1:{port}/v1/jobs/bench/", "--", auth],
        capture_output=True, text=True, check=True,
    ).stdout
    if "Non-2xx" in output:
        sys.exit(f"http_enqueue: some requests failed:\n{output}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", output).groups()
    p99_ms = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rps, p99_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rickover", help="path of Rickover's server binary")
    args = parser.parse_args()
    wrk = ensure_wrk()

    workdir = tempfile.mkdtemp(prefix="jobrunner-bench-")
    os.chmod(workdir, 0o755)
    cluster = LocalPostgres(Path(workdir) / "data")
    url = cluster.start()
    try:
        migrate(url)
        conn = store.connect(url)
        services.create_job_type(conn, "bench", "at_least_once", 3, 10)
        targets = [
            Target("jobrunner", [sys.executable, "-m", "jobrunner", "serve", "--host", "127.0.0.1"],
                   {"DATABASE_URL": url, "JOBRUNNER_USERS": "bench:bench", "JOBRUNNER_LOG_LEVEL": "WARNING",
                    "PYTHONPATH": str(BENCH.parent)}, "bench", "bench"),
        ]
        if args.rickover:
            pq_url = f"postgres://{'jobrunner'}@/postgres?host={cluster.socket_dir}&port=5432&sslmode=disable&timezone=UTC"
            targets.append(Target("rickover", [args.rickover], {"DATABASE_URL": pq_url}, "test", "hymanrickover"))
        results = {target.name: [] for target in targets}
        for round_number in range(args.rounds):
            for target in targets:
                conn.execute("TRUNCATE queued_jobs")
                port = free_port()
                process = target.start(port)
                try:
                    rps, p99 = run_wrk(wrk, port, target.auth, args.connections, args.duration)
                finally:
                    process.terminate()
                    process.wait(timeout=30)
                results[target.name].append((rps, p99))
                print(f"round {round_number + 1} {target.name}: {rps:,.0f} req/s, p99 {p99:.1f} ms", flush=True)
        conn.close()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = []
    for name, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        p99 = statistics.median(p for _, p in runs)
        summary.append(f"{name} {rps:,.0f} req/s p99 {p99:.1f} ms")
    line = f"enqueue PUT c={args.connections}, median of {args.rounds} x {args.duration}s: " + "; ".join(summary)
    if args.rickover:
        ratio = statistics.median(r for r, _ in results["jobrunner"]) / statistics.median(r for r, _ in results["rickover"])
        line += f"; jobrunner/rickover = {ratio:.2f}"
    print(line)
    with open(BENCH / "results.txt", "a") as results_file:
        results_file.write(f"{time.strftime('%Y-%m-%d %H:%M')} {line}\n")


if __name__ == "__main__":
    main()

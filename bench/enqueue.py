"""Enqueue: PUT /v1/jobs/bench/<id> with 50 keep-alive clients (wrk); throughput and p99, jobrunner vs Rickover.

    python bench/enqueue.py [--rounds 3] [--duration 10] [--connections 50] [--servers 1] [--rickover PATH]

On a private PostgreSQL (default settings, fsync on), each target in turn,
alternating rounds so that all see the same machine noise: `jobrunner run` with
no workers and each number of server processes in --servers (1,2 compares one
with two), and with --rickover (the path of
Rickover's `server` binary, built from Shyp/rickover) Rickover's server, on the
same database, queued_jobs truncated before each run. wrk (Debian's package,
installed if missing when run as root) sends `PUT` with a random job id and a
44-byte body from 2 threads; every answer must be 2xx. Prints each run and the
medians [min–max]; one result line is appended to bench/results.txt.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

from harness import AUTH, BENCH, Service, free_port, median_spread, private_database, record, request, stop, wait_for

from jobrunner import services

RICKOVER_AUTH = "Basic dGVzdDpoeW1hbnJpY2tvdmVy"  # test:hymanrickover, Rickover's development user


def ensure_wrk() -> str:
    if not shutil.which("wrk"):
        if os.geteuid() != 0:
            sys.exit("enqueue: wrk not found; install it (apt-get install wrk)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("wrk")


def run_wrk(wrk: str, port: int, auth: str, connections: int, duration: int) -> tuple[float, float]:
    """Requests per second and p99 latency (ms) of one wrk run."""
    output = subprocess.run(
        [wrk, "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(BENCH / "enqueue.lua"),
         f"http://127.0.0.1:{port}/v1/jobs/bench/", "--", auth],
        capture_output=True, text=True, check=True,
    ).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        sys.exit(f"enqueue: some requests failed:\n{output}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", output).groups()
    return rps, float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--servers", default="1", help="jobrunner server processes (JOBRUNNER_SERVERS), comma-separated")
    parser.add_argument("--rickover", help="path of Rickover's server binary")
    args = parser.parse_args()
    wrk = ensure_wrk()

    servers = {("jobrunner" if n == "1" else f"jobrunner {n} servers"): n for n in args.servers.split(",")}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers} | ({"rickover": []} if args.rickover else {})
    with private_database() as database:
        services.create_job_type(database.conn, "bench", "at_least_once", 3, 10)
        for round_number in range(1, args.rounds + 1):
            for name in results:
                database.conn.execute("TRUNCATE queued_jobs")
                if name in servers:
                    service = Service(database, {"JOBRUNNER_WORKERS": "0", "JOBRUNNER_SERVERS": servers[name]})
                    port, auth, stopper = service.port, AUTH, service.stop
                else:
                    port, auth = free_port(), RICKOVER_AUTH
                    socket_dir = database.cluster.socket_dir
                    url = f"postgres://jobrunner@/postgres?host={socket_dir}&port=5432&sslmode=disable&timezone=UTC"
                    process = subprocess.Popen([args.rickover], env={**os.environ, "DATABASE_URL": url, "PORT": str(port)},
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    wait_for(lambda: request(port, "GET", "/v1/jobs/bench")[0] is not None, "Rickover's server")
                    stopper = lambda: stop(process)  # noqa: E731
                try:
                    rps, p99 = run_wrk(wrk, port, auth, args.connections, args.duration)
                finally:
                    stopper()
                results[name].append((rps, p99))
                print(f"round {round_number} {name}: {rps:,.0f} req/s, p99 {p99:.1f} ms", flush=True)

    line = f"enqueue PUT c={args.connections}, {args.rounds} x {args.duration} s: " + "; ".join(
        f"{name} {median_spread([r for r, _ in runs])} req/s p99 {median_spread([p for _, p in runs], '{:.1f}')} ms"
        for name, runs in results.items())
    for name in servers if args.rickover else ():
        ratios = [j / r for (j, _), (r, _) in zip(results[name], results["rickover"])]
        line += f"; {name}/rickover {median_spread(ratios, '{:.2f}')}"
    record(line)


if __name__ == "__main__":
    main()

"""The server's cost of a new connection: PUTs on a new connection each against PUTs on kept-alive ones.

    python bench/connections.py [--rounds 3] [--requests 5000] [--clients 50] [--before DIR]

`jobrunner run` with no workers (one server process) on a private PostgreSQL;
in each round, `ab -c CLIENTS` PUTs --requests jobs to .../random_id on kept-alive
connections (`-k`), then as many on a new connection each (no `-k`, as a client
without a session). The figure is the server process's CPU time per request
(/proc/PID/stat), which a loaded machine changes far less than a rate; the rates
are printed too. --before DIR runs DIR's jobrunner as well, in the same rounds
(DIR: e.g. `git archive` of the commit before a change, unpacked). Prints each
run and appends the medians [min–max] to bench/results.txt.
"""

import argparse
import collections
import re
import time
from pathlib import Path

from harness import ROOT, Service, cpu_seconds, median_spread, private_database, record
from shapes import ab_put_output

from jobrunner import services


def measure(database, root: Path, requests: int, clients: int) -> dict[str, float]:
    database.conn.execute("TRUNCATE queued_jobs")
    service = Service(database, {"JOBRUNNER_WORKERS": "0"}, root=root)
    try:
        server = service.processes()["jr-server"]
        result = {}
        for mode, keep_alive in (("kept", True), ("fresh", False)):
            before, started = cpu_seconds([server]), time.monotonic()
            output = ab_put_output(service.port, "bench", requests, "bench:bench", keep_alive, clients)
            result[f"{mode} ms"] = (cpu_seconds([server]) - before) / requests * 1000
            result[f"{mode} req/s"] = float(re.search(r"Requests per second:\s+([\d.]+)", output).group(1))
            result[f"{mode} s"] = time.monotonic() - started
        return result
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--before", help="also run this checkout's code (the code before a change), in the same rounds")
    args = parser.parse_args()
    codes = {"jobrunner": ROOT, **({"before": Path(args.before)} if args.before else {})}
    results: dict[str, list[dict]] = collections.defaultdict(list)
    with private_database() as database:
        services.create_job_type(database.conn, "bench", "at_least_once", 3, 0)
        for round_number in range(1, args.rounds + 1):
            for name, root in codes.items():
                result = measure(database, root, args.requests, args.clients)
                results[name].append(result)
                print(f"round {round_number} {name}: " + ", ".join(f"{key} {value:,.2f}" for key, value in result.items()), flush=True)
    line = f"connections: server CPU per PUT, ab -c {args.clients} -n {args.requests:,}, {args.rounds} rounds:"
    for name, runs in results.items():
        parts = [f"{mode} {median_spread([r[f'{mode} ms'] for r in runs], '{:.3f}')} ms ({median_spread([r[f'{mode} req/s'] for r in runs])} req/s)"
                 for mode in ("kept", "fresh")]
        extra = median_spread([r["fresh ms"] - r["kept ms"] for r in runs], "{:.3f}")
        line += f" {name}: {', '.join(parts)}, a new connection costs {extra} ms;"
    record(line.rstrip(";"))


if __name__ == "__main__":
    main()

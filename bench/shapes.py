"""The shapes users load a queue with (issue 15), jobrunner side by side with Rickover.

    python bench/shapes.py SHAPE [--rounds 3] [--jobs 10000] [--concurrency 50] [--rickover DIR]
                                 [--backlog 1000000] [--types 1000] [--profile] [--before DIR]

SHAPE is one of:

burst    (a, b) In each round, in turn: N jobs PUT over HTTP (`ab -k -c 100`, PUT
         .../random_id) into an empty queue whose statistics say it is empty
         (TRUNCATE, VACUUM ANALYZE, autovacuum off for queued_jobs: the state after a
         quiet night, kept for the whole burst), the job type paused; then released
         with `POST /v1/jobs/burst {"concurrency": C}`. Three jobrunner runs: the
         downstream calling back on a fresh connection each time (`fresh`), on 32
         kept-alive connections (`kept`), and the project's favourable shape (jobs
         written by SQL, ANALYZE, kept-alive: bench/drain.py's). Rickover: the same
         PUTs to its server, then its dequeuer started, with fresh callbacks.
types    (c) N due jobs spread over --types job types of concurrency 1 each, against
         N jobs of one type at concurrency C; written by SQL, then the service started.
         Rickover the same (its dequeuer starts one goroutine per slot).
backlog  (d) N due jobs drained with, in the same type, --backlog jobs scheduled for
         tomorrow and 2 x --backlog archived rows, against the same drain on an empty
         table. Two private clusters, created once: the backlog is written into one
         (one statement each, VACUUM ANALYZE), the other stays empty; each round
         drains with the backlog, then without, so machine drift falls on both.
         jobrunner only.
enqueue  (e) PUT .../random_id with `ab -k -c 100 -n N`, then `wrk -c 100` for 5 s
         (bench/enqueue.lua, a random id per request), workers off; jobrunner and
         Rickover's server in turn each round.

C = 10 (f) is bench/drain.py --concurrency 10 --rickover DIR.

--before DIR (burst, enqueue) runs DIR's jobrunner too, in the same rounds: a change
measured side by side with the code before it (DIR: e.g. `git archive` of the
commit before, unpacked).

Drain rate = jobs / time from the first archive to the last; every job must end
`succeeded`. Each shape prints one line per run and appends one result line with
the medians [min–max] to bench/results.txt. --profile attaches py-spy (--gil) to
jobrunner's server and workers in the first round's first jobrunner run and prints
the statements that took PostgreSQL's time.
"""

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import drain as drain_bench
from harness import (AUTH, BENCH, DOWNSTREAM_PASSWORD, ROOT, Database, Downstream, Service, downstream_settings, free_port,
                     median_spread, private_database, record, request, stop, top_statements, wait_for)

from jobrunner import services

RICKOVER_USER = "test:hymanrickover"
RICKOVER_AUTH = "Basic dGVzdDpoeW1hbnJpY2tvdmVy"
# Rickover's dequeuer claims ORDER BY created_at: its own migrations add this index, which it needs
RICKOVER_INDEX = "CREATE INDEX IF NOT EXISTS queued_jobs_created_at ON queued_jobs (created_at)"
BODY = b'{"data":{"to":"someone@example.com","n":1}}'


def ensure_tool(name: str, package: str) -> str:
    if not shutil.which(name):
        if os.geteuid() != 0:
            sys.exit(f"shapes: {name} not found; apt-get install {package}")
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, stdout=subprocess.DEVNULL)
    return shutil.which(name)


def ab_put(port: int, name: str, jobs: int, user: str, keep_alive: bool = True, clients: int = 100) -> float:
    """PUT `jobs` jobs with ab -c `clients` (-k unless told) to .../random_id; requests/s. Every answer must be 2xx."""
    return float(re.search(r"Requests per second:\s+([\d.]+)", ab_put_output(port, name, jobs, user, keep_alive, clients)).group(1))


def ab_put_output(port: int, name: str, jobs: int, user: str, keep_alive: bool = True, clients: int = 100) -> str:
    """ab's report of `jobs` PUTs to .../random_id (-k: on kept-alive connections); exits unless every answer was 2xx."""
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        body.write(BODY)
        body.flush()
        output = subprocess.run([ensure_tool("ab", "apache2-utils"), "-q", *(["-k"] if keep_alive else []), "-c", str(clients),
                                 "-n", str(jobs), "-u", body.name, "-T", "application/json", "-A", user,
                                 f"http://127.0.0.1:{port}/v1/jobs/{name}/random_id"],
                                capture_output=True, text=True, check=True).stdout
    # ab counts an answer whose length differs from the first one's as failed: ids and times vary in length
    breakdown = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", output)
    failed = sum(int(n) for n in breakdown.groups()) if breakdown else int(re.search(r"Failed requests:\s+(\d+)", output).group(1))
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", output)
    if failed or non_2xx:
        sys.exit(f"shapes: ab: {failed} failed, {non_2xx.group(1) if non_2xx else 0} non-2xx:\n{output}")
    return output


def wrk_put(port: int, name: str, auth: str, seconds: int = 5) -> float:
    wrk = ensure_tool("wrk", "wrk")
    # --timeout: on a loaded machine an answer can take over wrk's default 2 s; slow is not failed
    output = subprocess.run([wrk, "-t2", "-c100", f"-d{seconds}s", "--timeout", "10s", "-s", str(BENCH / "enqueue.lua"),
                             f"http://127.0.0.1:{port}/v1/jobs/{name}/", "--", auth], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        sys.exit(f"shapes: wrk: some requests failed:\n{output}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


def empty_queue_with_empty_statistics(database: Database) -> None:
    database.conn.execute("TRUNCATE queued_jobs, archived_jobs")
    database.conn.execute("ALTER TABLE queued_jobs SET (autovacuum_enabled = false)")
    database.conn.execute("VACUUM ANALYZE queued_jobs")


def wait_drained(database: Database, jobs: int, what: str, processes, since: str = "-infinity", name: str | None = None) -> float:
    """Wait until `jobs` jobs (of type `name`, if given) archived after `since` (all succeeded); their archive rate.

    `name` lets the polls use the index on (name, created_at): without it each poll
    reads the whole archive (0.4 s a poll with 2,000,000 archived rows), the bench's
    own CPU taken from the drain it measures."""
    deadline = time.monotonic() + max(180, jobs / 30)
    where = "created_at > %(since)s::timestamptz" + ("" if name is None else " AND name = %(name)s")
    params = {"since": since, "name": name}
    query = f"SELECT count(*) FROM archived_jobs WHERE {where}"
    while (done := database.conn.execute(query, params).fetchone()[0]) < jobs:
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            sys.exit(f"shapes: {what} did not drain {jobs} jobs ({done} archived)")
        time.sleep(0.1)
    statuses = dict(database.conn.execute(f"SELECT status::text, count(*) FROM archived_jobs WHERE {where} GROUP BY 1", params).fetchall())
    if statuses != {"succeeded": jobs}:
        sys.exit(f"shapes: {what} archived {statuses}, not {jobs} succeeded")
    seconds = database.conn.execute(f"SELECT extract(epoch FROM max(created_at) - min(created_at)) FROM archived_jobs WHERE {where}",
                                    params).fetchone()[0]
    return (jobs - 1) / float(seconds)


def jobrunner_settings(args, downstream: Downstream, workers: int | None = None) -> dict[str, str]:
    return {"JOBRUNNER_WORKERS": str(args.workers if workers is None else workers), **downstream_settings(downstream)}


class Rickover:
    """Rickover's server (and, once started, its dequeuer) on the bench database."""

    def __init__(self, database: Database, directory: str, downstream: Downstream | None = None, port: int | None = None):
        self.server_binary, self.dequeuer_binary = drain_bench.rickover_binaries(directory)
        socket_dir = database.cluster.socket_dir
        self.env = {**os.environ, "DATABASE_URL": f"postgres://jobrunner@/postgres?host={socket_dir}&port=5432&sslmode=disable&timezone=UTC"}
        self.port = port or free_port()
        self.downstream = downstream
        self.server = subprocess.Popen([self.server_binary], env={**self.env, "PORT": str(self.port)},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.dequeuer = None
        wait_for(lambda: request(self.port, "GET", "/v1/jobs/x")[0] is not None, "Rickover's server")

    def start_dequeuer(self) -> None:
        self.dequeuer = subprocess.Popen([self.dequeuer_binary], env={**self.env, "DOWNSTREAM_URL": self.downstream.url,
                                                                       "DOWNSTREAM_WORKER_AUTH": DOWNSTREAM_PASSWORD},
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def processes(self) -> list[subprocess.Popen]:
        return [p for p in (self.server, self.dequeuer) if p is not None]

    def stop(self) -> None:
        for process in (self.dequeuer, self.server):
            if process is not None:
                stop(process)


def rickover_downstream(port: int, fresh: bool) -> Downstream:
    return Downstream(port, user="test", password="hymanrickover", fresh=fresh)


# --- (a, b) the burst ---------------------------------------------------------------------

def burst_jobrunner(database: Database, args, fresh: bool, profile: bool, root: Path = ROOT) -> dict:
    empty_queue_with_empty_statistics(database)
    services.update_job_type(database.conn, "burst", concurrency=0)
    port = free_port()
    downstream = Downstream(port, fresh=fresh)
    service = Service(database, jobrunner_settings(args, downstream), port, root)
    try:
        enqueue_rate = ab_put(port, "burst", args.jobs, "bench:bench")
        profiler = start_profiler(service) if profile else None
        database.conn.execute("SELECT pg_stat_statements_reset()")
        status, body = request(port, "POST", "/v1/jobs/burst", {"concurrency": args.concurrency})
        if status != 200:
            sys.exit(f"shapes: releasing answered {status}: {body}")
        rate = wait_drained(database, args.jobs, "jobrunner", [service.process, downstream.process])
        result = {"rate": rate, "enqueue": enqueue_rate}
        if profiler:
            result["profile"] = profiler.report() + ["  postgres, by statement:"] + ["    " + s for s in top_statements(database)]
        return result
    finally:
        service.stop()
        downstream.stop()


def burst_rickover(database: Database, args, fresh: bool) -> dict:
    empty_queue_with_empty_statistics(database)
    services.update_job_type(database.conn, "burst", concurrency=args.concurrency)
    port = free_port()
    downstream = rickover_downstream(port, fresh)
    rickover = Rickover(database, args.rickover, downstream, port)
    try:
        enqueue_rate = ab_put(port, "burst", args.jobs, RICKOVER_USER)
        rickover.start_dequeuer()
        rate = wait_drained(database, args.jobs, "rickover", [*rickover.processes(), downstream.process])
        return {"rate": rate, "enqueue": enqueue_rate}
    finally:
        rickover.stop()
        downstream.stop()


def favourable(database: Database, args) -> dict:
    database.conn.execute("ALTER TABLE queued_jobs RESET (autovacuum_enabled)")
    drain_args = argparse.Namespace(jobs=args.jobs, workers=args.workers, threads=16, profile=False)
    return drain_bench.drain_jobrunner(database, drain_args, args.concurrency, "1")


def shape_burst(database: Database, args) -> None:
    services.create_job_type(database.conn, "burst", "at_least_once", 3, 0)
    services.create_job_type(database.conn, drain_bench.JOB_TYPE, "at_least_once", 3, 0)
    runs = [("jobrunner fresh", lambda r: burst_jobrunner(database, args, True, args.profile and r == 1)),
            ("jobrunner kept", lambda r: burst_jobrunner(database, args, False, False)),
            ("jobrunner favourable", lambda r: favourable(database, args))]
    if args.before:
        runs += [("before fresh", lambda r: burst_jobrunner(database, args, True, False, Path(args.before))),
                 ("before kept", lambda r: burst_jobrunner(database, args, False, False, Path(args.before)))]
    if args.rickover:
        runs.append(("rickover fresh", lambda r: burst_rickover(database, args, True)))
    results = run_rounds(args, runs)
    line = f"burst {args.jobs:,} jobs PUT (ab -k -c 100) onto an empty queue with empty statistics, C={args.concurrency}, {args.rounds} rounds:"
    pairs = [("jobrunner fresh", "jobrunner kept"), ("jobrunner fresh", "jobrunner favourable")]
    if args.before:
        pairs += [("before fresh", "before kept"), ("jobrunner fresh", "before fresh")]
    line += summary(results, pairs + ([("jobrunner fresh", "rickover fresh")] if args.rickover else []))
    enqueues = {name: [r["enqueue"] for r in runs] for name, runs in results.items() if "enqueue" in runs[0]}
    line += "; enqueue " + ", ".join(f"{name} {median_spread(rates)} req/s" for name, rates in enqueues.items())
    record(line)


# --- (c) many job types ----------------------------------------------------------------------

TYPED_JOBS = """
INSERT INTO queued_jobs (id, name, attempts, run_after, created_at, updated_at, status, data)
SELECT gen_random_uuid(), %(prefix)s || (n %% %(types)s), 3, now() - interval '1 second', now(), now(), 'queued', '{"n": 1}'
FROM generate_series(1, %(jobs)s) AS n
"""


def types_setup(database: Database, args, types: int, concurrency: int) -> None:
    """`types` types t0.. of concurrency `concurrency` hold the jobs; every other type is paused (concurrency 0)."""
    database.conn.execute("TRUNCATE queued_jobs, archived_jobs")
    existing = dict(database.conn.execute("SELECT name, concurrency FROM jobs").fetchall())
    for n in range(args.types):
        name, wanted = f"t{n}", concurrency if n < types else 0
        if name not in existing:
            services.create_job_type(database.conn, name, "at_least_once", 3, wanted)
        elif existing[name] != wanted:
            services.update_job_type(database.conn, name, concurrency=wanted)
    database.conn.execute(TYPED_JOBS, {"prefix": "t", "types": types, "jobs": args.jobs})
    database.conn.execute("ANALYZE queued_jobs")


def types_jobrunner(database: Database, args, types: int, concurrency: int) -> dict:
    types_setup(database, args, types, concurrency)
    port = free_port()
    downstream = Downstream(port)
    service = Service(database, jobrunner_settings(args, downstream), port)
    try:
        return {"rate": wait_drained(database, args.jobs, "jobrunner", [service.process, downstream.process])}
    finally:
        service.stop()
        downstream.stop()


def types_rickover(database: Database, args, types: int, concurrency: int) -> dict:
    types_setup(database, args, types, concurrency)
    port = free_port()
    downstream = rickover_downstream(port, False)
    env = {**os.environ, "DATABASE_URL": f"postgres://jobrunner@/postgres?host={database.cluster.socket_dir}&port=5432&sslmode=disable&timezone=UTC"}
    server_binary, dequeuer_binary = drain_bench.rickover_binaries(args.rickover)
    server = subprocess.Popen([server_binary], env={**env, "PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dequeuer = subprocess.Popen([dequeuer_binary], env={**env, "DOWNSTREAM_URL": downstream.url, "DOWNSTREAM_WORKER_AUTH": DOWNSTREAM_PASSWORD},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return {"rate": wait_drained(database, args.jobs, "rickover", [server, dequeuer, downstream.process])}
    finally:
        stop(dequeuer)
        stop(server)
        downstream.stop()


def shape_types(database: Database, args) -> None:
    runs = [(f"jobrunner {args.types} types", lambda r: types_jobrunner(database, args, args.types, 1)),
            ("jobrunner 1 type", lambda r: types_jobrunner(database, args, 1, args.concurrency))]
    if args.rickover:
        runs += [(f"rickover {args.types} types", lambda r: types_rickover(database, args, args.types, 1)),
                 ("rickover 1 type", lambda r: types_rickover(database, args, 1, args.concurrency))]
    results = run_rounds(args, runs)
    line = f"types: {args.jobs:,} due jobs over {args.types:,} types of concurrency 1 vs one type C={args.concurrency}, {args.rounds} rounds:"
    pairs = [(f"jobrunner {args.types} types", "jobrunner 1 type")]
    if args.rickover:
        pairs += [(f"rickover {args.types} types", "rickover 1 type"), (f"jobrunner {args.types} types", f"rickover {args.types} types")]
    record(line + summary(results, pairs))


# --- (d) a backlog and an archive --------------------------------------------------------------

BACKLOG = """
INSERT INTO queued_jobs (id, name, attempts, run_after, created_at, updated_at, status, data)
SELECT gen_random_uuid(), 'drain', 3, now() + interval '1 day' + n * interval '1 ms', now(), now(), 'queued', '{"n": 1}'
FROM generate_series(1, %(rows)s) AS n
"""
ARCHIVE = """
INSERT INTO archived_jobs (id, name, attempts, status, created_at, data, expires_at)
SELECT gen_random_uuid(), 'drain', 0, 'succeeded', now() - interval '2 days', '{"n": 1}', NULL
FROM generate_series(1, %(rows)s) AS n
"""
DUE = """
INSERT INTO queued_jobs (id, name, attempts, run_after, created_at, updated_at, status, data)
SELECT gen_random_uuid(), 'drain', 3, now() - interval '1 second', now(), now(), 'queued', '{"n": 1}'
FROM generate_series(1, %(rows)s) AS n
"""


def backlog_drain(database: Database, args) -> dict:
    since = database.scalar("SELECT now()::text")
    database.conn.execute(DUE, {"rows": args.jobs})
    database.conn.execute("ANALYZE queued_jobs")
    port = free_port()
    downstream = Downstream(port)
    service = Service(database, jobrunner_settings(args, downstream), port)
    try:
        result = {"rate": wait_drained(database, args.jobs, "jobrunner", [service.process, downstream.process], since, "drain")}
    finally:
        service.stop()
        downstream.stop()
    database.conn.execute("DELETE FROM archived_jobs WHERE name = 'drain' AND created_at > %s::timestamptz", (since,))
    return result


def shape_backlog(database: Database, args) -> None:
    """Two clusters, created once: `database` gets the backlog, a second one stays empty; rounds alternate."""
    with private_database() as empty:
        for db in (database, empty):
            db.conn.execute(RICKOVER_INDEX)  # as main() made it: both tables carry the same indexes
            services.create_job_type(db.conn, "drain", "at_least_once", 3, args.concurrency)
        started = time.monotonic()
        database.conn.execute(BACKLOG, {"rows": args.backlog})
        database.conn.execute(ARCHIVE, {"rows": 2 * args.backlog})
        database.conn.execute("VACUUM ANALYZE queued_jobs")
        database.conn.execute("VACUUM ANALYZE archived_jobs")
        print(f"backlog of {args.backlog:,} + {2 * args.backlog:,} archived written in {time.monotonic() - started:.0f} s", flush=True)
        with_name = f"with {args.backlog:,} tomorrow + {2 * args.backlog:,} archived"
        results = run_rounds(args, [(with_name, lambda r: backlog_drain(database, args)),
                                    ("without", lambda r: backlog_drain(empty, args))])
    line = f"backlog: drain {args.jobs:,} due jobs C={args.concurrency}, {args.rounds} rounds (interleaved: with, without; two clusters):"
    record(line + summary(results, [(with_name, "without")]))


# --- (e) enqueue -----------------------------------------------------------------------------------

def enqueue_jobrunner(database: Database, args, root: Path = ROOT) -> dict:
    database.conn.execute("TRUNCATE queued_jobs")
    service = Service(database, {"JOBRUNNER_WORKERS": "0"}, root=root)
    try:
        ab = ab_put(service.port, "bench", args.jobs, "bench:bench")
        wrk = wrk_put(service.port, "bench", AUTH)
        return {"rate": ab, "wrk": wrk}
    finally:
        service.stop()


def enqueue_rickover(database: Database, args) -> dict:
    database.conn.execute("TRUNCATE queued_jobs")
    rickover = Rickover(database, args.rickover)
    try:
        ab = ab_put(rickover.port, "bench", args.jobs, RICKOVER_USER)
        wrk = wrk_put(rickover.port, "bench", RICKOVER_AUTH)
        return {"rate": ab, "wrk": wrk}
    finally:
        rickover.stop()


def shape_enqueue(database: Database, args) -> None:
    services.create_job_type(database.conn, "bench", "at_least_once", 3, 0)
    runs = [("jobrunner", lambda r: enqueue_jobrunner(database, args))]
    if args.before:
        runs.append(("before", lambda r: enqueue_jobrunner(database, args, Path(args.before))))
    if args.rickover:
        runs.append(("rickover", lambda r: enqueue_rickover(database, args)))
    results = run_rounds(args, runs)
    line = f"enqueue PUT random_id, workers off, {args.rounds} rounds: ab -k -c 100 -n {args.jobs:,}:"
    line += summary(results, [("jobrunner", "rickover")] if args.rickover else [], unit="req/s")
    wrk = {name: [r["wrk"] for r in runs] for name, runs in results.items()}
    line += "; wrk -c 100 5 s: " + ", ".join(f"{name} {median_spread(rates)} req/s" for name, rates in wrk.items())
    if args.rickover:
        line += f", jobrunner/rickover {median_spread([a / b for a, b in zip(wrk['jobrunner'], wrk['rickover'])], '{:.2f}')}"
    record(line)


# --- rounds and figures ---------------------------------------------------------------------------

def run_rounds(args, runs) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = collections.defaultdict(list)
    for round_number in range(1, args.rounds + 1):
        for name, run in runs:
            result = run(round_number)
            results[name].append(result)
            extra = "".join(f", {key} {value:,.0f}" for key, value in result.items() if key in ("enqueue", "wrk"))
            print(f"round {round_number} {name}: {result['rate']:,.0f}{extra}", flush=True)
            for line in result.get("profile", []):
                print(line, flush=True)
    return results


def summary(results: dict[str, list[dict]], pairs, unit: str = "jobs/s") -> str:
    """Each run's median [min–max], and the ratios of the pairs, round by round."""
    parts = [f" {name} {median_spread([r['rate'] for r in runs])} {unit}" for name, runs in results.items()]
    for a, b in pairs:
        ratios = [x["rate"] / y["rate"] for x, y in zip(results[a], results[b])]
        parts.append(f" {a}/{b} {median_spread(ratios, '{:.2f}')}")
    return ";".join(parts)


def start_profiler(service: Service):
    pids = {name.removeprefix("jr-"): pid for name, pid in service.processes().items()}
    return drain_bench.Profiler({n: p for n, p in pids.items() if n.startswith(("server", "worker"))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=["burst", "types", "backlog", "enqueue"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--types", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=1000000)
    parser.add_argument("--rickover", help="directory of Rickover's server and dequeuer binaries")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--before", help="burst, enqueue: also run this checkout's code (the code before a change), in the same rounds")
    args = parser.parse_args()
    with private_database() as database:
        database.conn.execute(RICKOVER_INDEX)
        {"burst": shape_burst, "types": shape_types, "backlog": shape_backlog, "enqueue": shape_enqueue}[args.shape](database, args)


if __name__ == "__main__":
    main()

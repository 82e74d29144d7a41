"""Many hosts: 1, 2 and 4 supervisors on one database, side by side; drain, enqueue, connections, concurrency, the bound.

    python bench/hosts.py [--hosts 1,2,4] [--rounds 3] [--enqueue-seconds 4] [--clients 48] [--workers 2]

On a private PostgreSQL (default settings, fsync on), for each round and each
number of hosts H (the order turns each round, so that every H meets the same
machine noise):

1. H `jobrunner run`, each as its own host would run it: its own server,
   watcher and --workers workers, its own port, its defaults otherwise; one
   downstream for all of them (this file, `--serve-downstream`: the asyncio
   downstream of bench/fast_downstream.py, answering every POST at once and
   calling back `succeeded` over HTTP, its 32 callback connections spread over
   the H hosts, as a load balancer would).
2. Enqueue: eight job types (TYPES: both delivery strategies, concurrency 2 to
   32) are paused (concurrency 0); wrk PUTs jobs for --enqueue-seconds, from
   --clients keep-alive connections spread evenly over the H hosts' servers,
   each job's type drawn in proportion to its concurrency. Enqueue rate = the
   sum of wrk's requests/s.
3. Drain: every type gets its concurrency back (`POST /v1/jobs/<type>`); drain
   rate = jobs / time from the first archive to the last.

Throughout, pg_stat_activity is sampled every 50 ms: jobrunner's connections
(their peak, against the documented formula H x (10 x servers + 5 x workers + 1),
plus one per host during a watcher round) and the sessions waiting on a lock
(wait_event_type 'Lock'). pg_stat_statements gives the claims (one per-type
advisory lock each) and the time spent in that lock, and the statements that
took PostgreSQL's time. CPU is read from /proc: PostgreSQL (the postmaster's
tree), jobrunner (every supervisor's tree), the downstream, wrk, and the whole
machine (/proc/stat, other load included), as CPU seconds per 1,000 jobs.

Guarantees checked per run (a broken one is printed and makes the exit status 1):
every job enqueued is archived `succeeded` and none is left queued; the
downstream took exactly one POST per job (an at_most_once job never twice);
no callback failed; the most jobs of a type the downstream held at once (from
its POST until its callback is sent, which is inside the queue's own
in-progress time, so the count never runs ahead of the queue's) never exceeded
the type's concurrency, over all hosts; the peak of connections stayed within
the formula.

Prints each run, then the medians per H as a Markdown table; one result line
is appended to bench/results.txt.
"""

import argparse
import asyncio
import collections
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import fast_downstream
from harness import (AUTH, PASSWORD, USER, Database, Downstream, Service, children, downstream_settings, free_port, median_spread,
                     private_database, record, request, wait_for)
from enqueue import ensure_wrk

from jobrunner import services, store

TYPES = {  # name: (delivery strategy, concurrency)
    "email": ("at_least_once", 32),
    "webhook": ("at_least_once", 24),
    "thumbnail": ("at_least_once", 16),
    "report": ("at_least_once", 12),
    "sms": ("at_least_once", 8),
    "export": ("at_least_once", 4),
    "charge": ("at_most_once", 6),
    "refund": ("at_most_once", 2),
}
SERVER_POOL, WORKER_POOL = 10, 4  # the defaults of PG_SERVER_POOL_SIZE and PG_WORKER_POOL_SIZE
CALLBACK_CONNECTIONS = 32
SAMPLE_EVERY = 0.05

WRK_SCRIPT = r"""
-- PUT /v1/jobs/<type>/job_<random uuid v4>; the type drawn by weight.
-- Arguments (after --): the Authorization header, a seed, then name=weight ...
local auth
local names = {}
local counter = 0

function setup(thread)
  thread:set("thread_number", counter)
  counter = counter + 1
end

function init(args)
  auth = args[1]
  math.randomseed(tonumber(args[2]) * 1000 + thread_number)
  for i = 3, #args do
    local name, weight = string.match(args[i], "([^=]+)=(%d+)")
    for _ = 1, tonumber(weight) do
      names[#names + 1] = name
    end
  end
end

local function hex(n)
  local digits = {}
  for i = 1, n do
    digits[i] = string.format("%x", math.random(0, 15))
  end
  return table.concat(digits)
end

request = function()
  local name = names[math.random(1, #names)]
  local variant = string.format("%x", math.random(8, 11))
  local id = "job_" .. hex(8) .. "-" .. hex(4) .. "-4" .. hex(3) .. "-" .. variant .. hex(3) .. "-" .. hex(12)
  local headers = {["Authorization"] = auth, ["Content-Type"] = "application/json"}
  return wrk.format("PUT", wrk.path .. name .. "/" .. id, headers, '{"data":{"to":"someone@example.com","n":1}}')
end
"""


# --- the downstream (its own process) ----------------------------------------------------------


class TypeCountingQueue(asyncio.Queue):
    """fast_downstream's queue of callbacks to send, counting each type's jobs in flight: from the job's POST
    (put, as the POST is answered) until a sender takes its callback (get), just before sending it. That span lies
    inside the queue's own in-progress time (claim to archive), so the count never runs ahead of the queue's."""

    def __init__(self, stats: dict):
        super().__init__()
        self.stats = stats
        self.seen: set[bytes] = set()

    def put_nowait(self, item) -> None:
        path, _attempts = item
        _, _, _, name, job_id = path.decode().split("/")
        in_flight, most = self.stats["in_flight"], self.stats["max_in_flight"]
        in_flight[name] = in_flight.get(name, 0) + 1
        most[name] = max(most.get(name, 0), in_flight[name])
        if job_id in self.seen:
            self.stats["duplicates"][name] = self.stats["duplicates"].get(name, 0) + 1
        self.seen.add(job_id)
        super().put_nowait(item)

    def get_nowait(self):
        item = super().get_nowait()
        self.stats["in_flight"][item[0].decode().split("/")[3]] -= 1
        return item


def serve_downstream(port: int, apis: list[str]) -> None:
    """fast_downstream, calling back through every host's API: one fast_downstream.Downstream per API, all
    sharing one queue and one set of counters; the first one also takes the POSTs."""
    per_api = max(1, CALLBACK_CONNECTIONS // len(apis))
    downstreams = [fast_downstream.Downstream(api, USER, PASSWORD, per_api, None) for api in apis]
    stats = downstreams[0].stats
    stats.update(in_flight={}, max_in_flight={}, duplicates={})
    shared = TypeCountingQueue(stats)
    for downstream in downstreams:
        downstream.queue, downstream.stats = shared, stats

    async def run() -> None:
        server = await asyncio.start_server(downstreams[0].serve_client, "127.0.0.1", port, backlog=1024, reuse_address=True)
        senders = [asyncio.create_task(d.callback_sender()) for d in downstreams for _ in range(d.callback_connections)]
        stopped = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
        async with server:
            await stopped.wait()
        for sender in senders:
            sender.cancel()

    asyncio.run(run())


class HostsDownstream(Downstream):
    """This file's downstream in its own process, calling back through the APIs on `api_ports`."""

    def __init__(self, api_ports: list[int]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, __file__, "--serve-downstream", str(self.port),
                                         *[f"http://127.0.0.1:{port}" for port in api_ports]], stdout=subprocess.DEVNULL)
        wait_for(lambda: self._answers(), "the downstream")


# --- readings ------------------------------------------------------------------------------------


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds a process tree has used so far: the root's own and its reaped children's, plus its live
    children's own. A child that exits between two readings is counted once, through the root's reaped time."""
    def fields(pid: int) -> list[str]:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return []
    own = fields(root)
    ticks = sum(int(value) for value in own[11:15])  # utime, stime, cutime, cstime
    for child in children(root):
        ticks += sum(int(value) for value in fields(child)[11:13])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine have been busy since boot (everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by PostgreSQL, jobrunner (every host), the downstream, wrk and the machine, between marks."""

    def __init__(self, database: Database, hosts: list[Service], downstream: Downstream):
        self.postmaster = database.pids()[0]
        self.supervisors = [host.process.pid for host in hosts]
        self.downstream = downstream.process.pid

    def reading(self) -> dict[str, float]:
        return {"postgres": tree_cpu_seconds(self.postmaster),
                "jobrunner": sum(tree_cpu_seconds(pid) for pid in self.supervisors),
                "downstream": tree_cpu_seconds(self.downstream),
                "wrk": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,
                "machine": machine_busy_seconds()}

    @staticmethod
    def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {part: after[part] - before[part] for part in before}


ACTIVITY = """
SELECT split_part(application_name, ':', 1), wait_event_type, wait_event, state
FROM pg_stat_activity WHERE application_name LIKE 'jobrunner-%'
"""


class ActivitySampler:
    """pg_stat_activity every SAMPLE_EVERY s, on its own connection: jobrunner's connections (the peak, and by
    process at the peak) and its sessions waiting on a lock."""

    def __init__(self, url: str):
        self.conn = store.connect(url, application_name="bench-sampler")
        self.peak, self.peak_by_process = 0, {}
        self.samples = 0
        self.lock_waits = collections.Counter()  # wait_event -> sessions waiting, summed over samples
        self.active = 0  # active sessions, summed over samples
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(SAMPLE_EVERY):
            rows = self.conn.execute(ACTIVITY).fetchall()
            if len(rows) > self.peak:
                self.peak, self.peak_by_process = len(rows), dict(collections.Counter(process for process, *_ in rows))
            self.samples += 1
            self.active += sum(1 for *_, state in rows if state == "active")
            self.lock_waits.update(event for _, kind, event, _ in rows if kind == "Lock")

    def restart_counts(self) -> None:
        """Lock waits and active sessions from now on (the peak of connections is kept)."""
        self.samples, self.active, self.lock_waits = 0, 0, collections.Counter()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.conn.close()


ADVISORY_LOCK = """
SELECT coalesce(sum(calls), 0), coalesce(sum(total_exec_time), 0)
FROM pg_stat_statements WHERE query LIKE '%%pg_advisory_xact_lock%%hashtext%%'
"""


# --- one run -----------------------------------------------------------------------------------


def enqueue(wrk: str, ports: list[int], seconds: int, clients: int, script: str, round_number: int) -> dict:
    """wrk against every host at once, the clients spread evenly; requests/s summed, errors counted."""
    weights = [f"{name}={concurrency}" for name, (_, concurrency) in TYPES.items()]
    threads = 2 if len(ports) == 1 else 1  # two wrk threads in all, as bench/enqueue.py
    runs = [subprocess.Popen([wrk, f"-t{threads}", f"-c{max(threads, clients // len(ports))}", f"-d{seconds}s", "-s", script,
                              f"http://127.0.0.1:{port}/v1/jobs/", "--", AUTH, str(round_number * 100 + n), *weights],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for n, port in enumerate(ports)]
    rate, errors = 0.0, []
    for run in runs:
        output = run.communicate()[0]
        found = re.search(r"Requests/sec:\s+([\d.]+)", output)
        if run.returncode != 0 or not found:
            sys.exit(f"hosts: wrk failed:\n{output}")
        rate += float(found.group(1))
        errors += [line.strip() for line in output.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    return {"rate": rate, "errors": errors}


def enqueued_jobs(database: Database) -> int:
    """The jobs queued once the PUTs wrk left in flight when it stopped have been answered."""
    previous, count = -1, database.scalar("SELECT count(*) FROM queued_jobs")
    while count != previous:
        time.sleep(0.5)
        previous, count = count, database.scalar("SELECT count(*) FROM queued_jobs")
    return count


TOP_STATEMENTS = """
SELECT calls, total_exec_time, rows, query FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query NOT LIKE '%%pg_stat%%'
ORDER BY total_exec_time DESC LIMIT 5
"""


def top_statements(database: Database, jobs: int) -> list[str]:
    """The statements that took PostgreSQL's time in the drain: calls and ms per 1,000 jobs, rows per call."""
    return [f"{calls * 1000 / jobs:,.0f} calls, {total_ms * 1000 / jobs:,.0f} ms, {rows / calls:.1f} rows/call: "
            f"{' '.join(query.split())[:70]}" for calls, total_ms, rows, query in database.conn.execute(TOP_STATEMENTS)]


def set_concurrency(port: int, concurrency: dict[str, int]) -> None:
    for name, value in concurrency.items():
        status, body = request(port, "POST", f"/v1/jobs/{name}", {"concurrency": value})
        if status != 200:
            sys.exit(f"hosts: setting {name}'s concurrency answered {status}: {body}")


def wait_drained(database: Database, jobs: int, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + max(120, jobs / 50)
    while database.scalar("SELECT count(*) FROM archived_jobs") < jobs:
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            sys.exit(f"hosts: {jobs} jobs were not drained")
        time.sleep(0.1)


def archive_rate(database: Database, jobs: int) -> float:
    seconds = database.scalar("SELECT extract(epoch FROM max(created_at) - min(created_at)) FROM archived_jobs")
    return (jobs - 1) / float(seconds)


def connection_formula(hosts: int, servers: int, workers: int) -> int:
    """docs/scaling.md: a host holds 10 x servers + 5 x workers (pools and LISTEN) + 1 (the scheduler), plus one during a watcher round."""
    return hosts * (SERVER_POOL * servers + (WORKER_POOL + 1) * workers + 2)


def run_hosts(database: Database, count: int, args, wrk: str, script: str, round_number: int) -> dict:
    database.conn.execute("TRUNCATE queued_jobs, archived_jobs")
    for name in TYPES:
        services.update_job_type(database.conn, name, concurrency=0)
    ports = [free_port() for _ in range(count)]
    downstream = HostsDownstream(ports)
    hosts: list[Service] = []
    try:
        settings = {"JOBRUNNER_WORKERS": str(args.workers), "JOBRUNNER_SERVERS": "1", **downstream_settings(downstream)}
        hosts = [Service(database, settings, port) for port in ports]
        meter, sampler = CpuMeter(database, hosts, downstream), ActivitySampler(database.url)
        try:
            return measure(database, hosts, downstream, meter, sampler, args, wrk, script, round_number)
        finally:
            sampler.stop()
    finally:
        for host in hosts:
            host.stop()
        downstream.stop()


def measure(database, hosts, downstream, meter, sampler, args, wrk, script, round_number) -> dict:
    """Enqueue with every type paused, then drain; the figures and the guarantees of one run."""
    database.conn.execute("SELECT pg_stat_statements_reset()")
    started = meter.reading()
    enqueued = enqueue(wrk, [host.port for host in hosts], args.enqueue_seconds, args.clients, script, round_number)
    after_enqueue = meter.reading()
    jobs = enqueued_jobs(database)
    paused_claims, _ = database.conn.execute(ADVISORY_LOCK).fetchone()
    database.conn.execute("ANALYZE queued_jobs")
    database.conn.execute("SELECT pg_stat_statements_reset()")
    sampler.restart_counts()
    released, released_at = meter.reading(), time.monotonic()
    set_concurrency(hosts[0].port, {name: concurrency for name, (_, concurrency) in TYPES.items()})
    wait_drained(database, jobs, [host.process for host in hosts] + [downstream.process])
    stats = wait_for(lambda: (s := downstream.stats())["callbacks_ok"] + s["callbacks_failed"] >= jobs and s,
                     "the last callbacks")
    drained, elapsed = meter.reading(), time.monotonic() - released_at
    rate = archive_rate(database, jobs)
    statuses = dict(database.conn.execute("SELECT status::text, count(*) FROM archived_jobs GROUP BY 1").fetchall())
    left = database.scalar("SELECT count(*) FROM queued_jobs")
    claims, advisory_ms = database.conn.execute(ADVISORY_LOCK).fetchone()
    result = {
        "hosts": len(hosts), "jobs": jobs, "enqueue_rate": enqueued["rate"], "drain_rate": rate,
        "enqueue_cpu": per_thousand(meter.used(started, after_enqueue), jobs),
        "drain_cpu": per_thousand(meter.used(released, drained), jobs),
        "drain_cpu_per_second": {part: seconds / elapsed for part, seconds in meter.used(released, drained).items()},
        "peak_connections": sampler.peak, "peak_by_process": sampler.peak_by_process,
        "formula": connection_formula(len(hosts), 1, args.workers),
        "lock_waiting": sum(sampler.lock_waits.values()) / max(1, sampler.samples),
        "lock_share": sum(sampler.lock_waits.values()) / max(1, sampler.active),
        "lock_events": dict(sampler.lock_waits),
        "advisory_ms_per_1000": advisory_ms * 1000 / jobs, "claims_per_1000": claims * 1000 / jobs,
        "paused_claims_per_1000": paused_claims * 1000 / jobs,
        "statements": top_statements(database, jobs),
        "max_in_flight": stats["max_in_flight"],
    }
    result["broken"] = broken_guarantees(result, statuses, left, stats, enqueued["errors"])
    return result


def per_thousand(used: dict[str, float], jobs: int) -> dict[str, float]:
    return {part: seconds * 1000 / jobs for part, seconds in used.items()}


def broken_guarantees(result: dict, statuses: dict, left: int, stats: dict, enqueue_errors: list[str]) -> list[str]:
    jobs = result["jobs"]
    broken = []
    if statuses != {"succeeded": jobs} or left:
        broken.append(f"archived {statuses}, {left} left queued, of {jobs} enqueued")
    if stats["posts"] != jobs:
        broken.append(f"{stats['posts']} POSTs for {jobs} jobs")
    if stats["duplicates"]:
        broken.append(f"jobs POSTed more than once: {stats['duplicates']}")
    if stats["callbacks_failed"]:
        broken.append(f"{stats['callbacks_failed']} callbacks failed")
    over = {name: most for name, most in stats["max_in_flight"].items() if most > TYPES[name][1]}
    if over:
        broken.append(f"concurrency exceeded: {over}")
    if result["peak_connections"] > result["formula"]:
        broken.append(f"{result['peak_connections']} connections, above the formula's {result['formula']}")
    if enqueue_errors:
        broken.append(f"enqueue errors: {enqueue_errors}")
    return broken


# --- the report ----------------------------------------------------------------------------------


def describe(result: dict) -> str:
    d, e = result["drain_cpu"], result["enqueue_cpu"]
    reached = sum(1 for name, (_, limit) in TYPES.items() if result["max_in_flight"].get(name, 0) == limit)
    return (f"{result['jobs']:,} jobs; enqueue {result['enqueue_rate']:,.0f} req/s; drain {result['drain_rate']:,.0f} jobs/s; "
            f"connections peak {result['peak_connections']} (formula {result['formula']}, {result['peak_by_process']}); "
            f"max in flight {result['max_in_flight']} ({reached} of {len(TYPES)} types at their limit); "
            f"drain CPU s per 1,000 jobs: postgres {d['postgres']:.3f}, jobrunner {d['jobrunner']:.3f}, "
            f"downstream {d['downstream']:.3f}, machine {d['machine']:.3f} "
            f"({result['drain_cpu_per_second']['machine']:.2f} CPU s/s); "
            f"enqueue CPU s per 1,000: postgres {e['postgres']:.3f}, jobrunner {e['jobrunner']:.3f}, wrk {e['wrk']:.3f}, "
            f"{result['paused_claims_per_1000']:.0f} claims of paused types per 1,000 PUTs; "
            f"lock waits: {result['lock_waiting']:.2f} sessions on average ({100 * result['lock_share']:.0f}% of active), "
            f"{result['lock_events']}, advisory lock {result['advisory_ms_per_1000']:.0f} ms per 1,000 jobs"
            f", {result['claims_per_1000']:.0f} claims per 1,000 jobs"
            + (f"; BROKEN: {result['broken']}" if result["broken"] else "")
            + "".join(f"\n    per 1,000 jobs: {line}" for line in result["statements"]))


def table(results: dict[int, list[dict]]) -> list[str]:
    """The medians per number of hosts, as docs/benchmarks.md quotes them."""
    def med(runs, key, fmt="{:,.0f}"):
        return median_spread([key(r) for r in runs], fmt)

    lines = ["| hosts | drain jobs/s | enqueue req/s | connections peak / formula | max in flight ≤ limit, all types |"
             " CPU s per 1,000 jobs, drain: PostgreSQL / jobrunner / downstream | machine CPU s/s in the drain |"
             " enqueue: PostgreSQL / jobrunner | sessions waiting on a lock (share of active) | claims per 1,000 jobs |"
             " advisory lock ms per 1,000 jobs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for count, runs in sorted(results.items()):
        worst = {name: max(r["max_in_flight"].get(name, 0) for r in runs) for name in TYPES}
        kept = all(worst[name] <= limit for name, (_, limit) in TYPES.items())
        reached = sum(1 for name, (_, limit) in TYPES.items() if worst[name] == limit)
        lines.append(
            f"| {count} | {med(runs, lambda r: r['drain_rate'])} | {med(runs, lambda r: r['enqueue_rate'])} | "
            f"{max(r['peak_connections'] for r in runs)} / {runs[0]['formula']} | "
            f"{'yes' if kept else 'NO'} ({reached} of {len(TYPES)} reached their limit) | "
            f"{statistics.median(r['drain_cpu']['postgres'] for r in runs):.2f} / "
            f"{statistics.median(r['drain_cpu']['jobrunner'] for r in runs):.2f} / "
            f"{statistics.median(r['drain_cpu']['downstream'] for r in runs):.2f} | "
            f"{med(runs, lambda r: r['drain_cpu_per_second']['machine'], '{:.2f}')} | "
            f"{statistics.median(r['enqueue_cpu']['postgres'] for r in runs):.2f} / "
            f"{statistics.median(r['enqueue_cpu']['jobrunner'] for r in runs):.2f} | "
            f"{med(runs, lambda r: r['lock_waiting'], '{:.2f}')} "
            f"({statistics.median(r['lock_share'] for r in runs) * 100:.0f}%) | "
            f"{med(runs, lambda r: r['claims_per_1000'])} | {med(runs, lambda r: r['advisory_ms_per_1000'])} |")
    lines.append("")
    lines.append("| hosts | " + " | ".join(f"{name} ({limit})" for name, (_, limit) in TYPES.items()) + " |")
    lines.append("|---|" + "---|" * len(TYPES))
    for count, runs in sorted(results.items()):
        lines.append(f"| {count} | " + " | ".join(str(max(r["max_in_flight"].get(name, 0) for r in runs)) for name in TYPES) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="1,2,4", help="numbers of supervisors, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--enqueue-seconds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=48, help="wrk's keep-alive connections, spread over the hosts")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per host")
    parser.add_argument("--serve-downstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("apis", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_downstream:
        serve_downstream(args.serve_downstream, args.apis)
        return
    counts = [int(n) for n in args.hosts.split(",")]
    wrk = ensure_wrk()
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="jobrunner-hosts-", delete=False)
    script.write(WRK_SCRIPT)
    script.close()
    started = time.monotonic()
    results: dict[int, list[dict]] = collections.defaultdict(list)
    try:
        with private_database() as database:
            for name, (strategy, _) in TYPES.items():
                services.create_job_type(database.conn, name, strategy, 3, 0)
            for round_number in range(1, args.rounds + 1):
                shift = (round_number - 1) % len(counts)
                for count in counts[shift:] + counts[:shift]:
                    result = run_hosts(database, count, args, wrk, script.name, round_number)
                    results[count].append(result)
                    print(f"round {round_number}, {count} host(s): {describe(result)}", flush=True)
    finally:
        os.unlink(script.name)

    broken = [(count, b) for count, runs in results.items() for r in runs for b in r["broken"]]
    print(f"\nhosts: {args.rounds} rounds in {time.monotonic() - started:.0f} s; "
          + ("every guarantee kept" if not broken else f"BROKEN: {broken}") + "\n")
    print("\n".join(table(results)))
    record(f"hosts {args.hosts}, {args.rounds} rounds, enqueue {args.enqueue_seconds} s then drain, {len(TYPES)} types, "
           f"{args.workers} workers per host: " + "; ".join(
               f"{count} host(s) drain {median_spread([r['drain_rate'] for r in runs])} jobs/s, enqueue "
               f"{median_spread([r['enqueue_rate'] for r in runs])} req/s, "
               f"CPU s per 1,000 jobs {statistics.median(r['drain_cpu']['machine'] for r in runs):.2f}"
               for count, runs in sorted(results.items()))
           + ("; every guarantee kept" if not broken else f"; {len(broken)} guarantee(s) BROKEN"))
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()

"""Chaos: jobs flow through real `jobrunner run` processes while things break; then every promise is checked.

    python bench/chaos.py [--jobs 3000] [--duration 60] [--hosts 1] [--outage 10] [--seed N]

A private PostgreSQL; --hosts supervisors (`jobrunner run`, 2 workers each, on
their own ports) sharing it; a downstream in this process that, for each POST,
at random: succeeds (202, then calls back `succeeded`), fails (202, then calls
back `failed`), answers 503, hangs past the workers' timeout and hangs up, or
drops the connection at once; it records every delivery and counts the jobs
in flight per type. Four job types (both delivery strategies, concurrency 2 to
10), each given jobs in proportion to its concurrency; a tenth of the jobs expire 3 s after they are enqueued. Enqueuers PUT
--jobs jobs over --duration seconds to the hosts in turn, retrying a PUT that
failed (an enqueue is idempotent).

Meanwhile the faults, spread over the run: kill -9 of a random child every 3 s;
kill -9 of a supervisor, then a fresh start of it; a storm of SIGHUPs; a
PostgreSQL restart (stop -m fast, start); PostgreSQL stopped for --outage
seconds; the downstream gone (connections refused, callbacks held) for
--outage seconds. Then no more faults, and the queue is left to settle: until
nothing is queued, or nothing has changed for 30 s.

Promises checked (from the database and the downstream's records):
  lost        a job whose PUT was answered 202, neither queued nor archived
  stuck       a job still queued or in progress once settled
  both        a job both queued and archived
  duplicates  deliveries (POSTs the downstream took on) beyond the first, per strategy: 0 for at_most_once
  in flight   the most jobs of a type the downstream held at once, against the type's concurrency
  status      succeeded without a succeeded callback sent; at_least_once failed with attempts left;
              expired before its expiry
Prints one table and exits 1 if a promise is broken.
"""

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness import DOWNSTREAM_PASSWORD, ROOT, Database, children, comm, free_port, private_database, request

TYPES = {  # name: (strategy, attempts, concurrency)
    "mail": ("at_least_once", 4, 5),
    "report": ("at_least_once", 3, 10),
    "charge": ("at_most_once", 1, 3),
    "refund": ("at_most_once", 3, 2),
}
OUTCOMES = {"succeed": 0.72, "fail": 0.10, "unavailable": 0.06, "hang": 0.06, "drop": 0.06}
SETTINGS = {
    "JOBRUNNER_WORKERS": "2",
    "JOBRUNNER_DOWNSTREAM_TIMEOUT": "1",
    "JOBRUNNER_JOB_TIMEOUT": "3",
    "JOBRUNNER_STUCK_JOB_TIMEOUT": "6",
    "JOBRUNNER_STUCK_JOB_INTERVAL": "2",
    "JOBRUNNER_GRACEFUL_TIMEOUT": "5",
    "JOBRUNNER_START_TIMEOUT": "10",
    "JOBRUNNER_DB_TIMEOUT": "2",
}


# --- the downstream ------------------------------------------------------------------------


@dataclasses.dataclass
class Delivery:
    at: float
    job_id: str
    name: str
    attempts: int
    outcome: str


class ChaosDownstream:
    """Takes POSTs on its own port; answers each per a random outcome; calls back through the hosts' APIs."""

    def __init__(self, seed: int):
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.deliveries: list[Delivery] = []
        self.in_flight = collections.Counter()
        self.max_in_flight = collections.Counter()
        self.callbacks_sent: dict[str, list[str]] = collections.defaultdict(list)  # job id -> statuses sent
        self.api_ports: list[int] = []
        self.port = free_port()
        self.away = threading.Event()
        self.callbacks: queue.SimpleQueue = queue.SimpleQueue()
        self._server = None
        self._start_server()
        for _ in range(8):
            threading.Thread(target=self._send_callbacks, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start_server(self) -> None:
        downstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                _, _, name, job_id = self.path.strip("/").split("/")
                downstream.take(self, name, job_id, body["attempts"])

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def take(self, handler: BaseHTTPRequestHandler, name: str, job_id: str, attempts: int) -> None:
        with self.lock:
            outcome = self.random.choices(list(OUTCOMES), weights=list(OUTCOMES.values()))[0]
            hold = self.random.uniform(0.05, 0.6)
            self.in_flight[name] += 1
            self.max_in_flight[name] = max(self.max_in_flight[name], self.in_flight[name])
            if outcome != "unavailable":  # a 503 is a refusal, not a delivery
                self.deliveries.append(Delivery(time.time(), job_id, name, attempts, outcome))
        # a job leaves "in flight" before the queue can learn it is done: the count never runs ahead of the queue's
        if outcome in ("succeed", "fail"):
            # the work takes a while, so that the types' concurrency is reached
            threading.Timer(hold, self._finish, (name, job_id, outcome, attempts)).start()
            self._answer(handler, 202, b'{"status":"accepted"}')
            return
        if outcome == "hang":
            time.sleep(1.5)  # past the workers' 1 s timeout
        self._done(name)
        if outcome == "unavailable":
            self._answer(handler, 503, b'{"id":"service_unavailable","title":"busy"}')
        else:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)

    def _finish(self, name: str, job_id: str, outcome: str, attempts: int) -> None:
        self._done(name)
        status = "succeeded" if outcome == "succeed" else "failed"
        with self.lock:
            self.callbacks_sent[job_id].append(status)
        self.callbacks.put((name, job_id, status, attempts))

    def _done(self, name: str) -> None:
        with self.lock:
            self.in_flight[name] -= 1

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _send_callbacks(self) -> None:
        while True:
            name, job_id, status, attempts = self.callbacks.get()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self.away.is_set():
                    time.sleep(0.2)
                    continue
                port = random.choice(self.api_ports)
                answer, _ = request(port, "POST", f"/v1/jobs/{name}/{job_id}", {"status": status, "attempt": attempts})
                if answer is not None and answer < 500:
                    break  # 200, or 400 when the job has moved on (timed out meanwhile)
                time.sleep(0.2)

    def go_away(self, seconds: float) -> None:
        """Refuse connections and hold callbacks for `seconds`."""
        self.away.set()
        self._server.shutdown()
        self._server.server_close()
        time.sleep(seconds)
        self._start_server()
        self.away.clear()


# --- the hosts --------------------------------------------------------------------------


class Host:
    """One `jobrunner run`, restartable on the same port."""

    def __init__(self, database: Database, downstream: ChaosDownstream, number: int, logs: str):
        self.port = free_port()
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("JOBRUNNER_", "PG_", "DOWNSTREAM"))}
        self.env.update({"DATABASE_URL": database.url, "JOBRUNNER_USERS": "bench:bench", "JOBRUNNER_HOST": "127.0.0.1",
                         "PORT": str(self.port), "PYTHONPATH": str(ROOT), "DOWNSTREAM_URL": downstream.url,
                         "DOWNSTREAM_WORKER_AUTH": DOWNSTREAM_PASSWORD, "JOBRUNNER_LOG_LEVEL": "ERROR", **SETTINGS})
        self.number = number
        self.process: subprocess.Popen | None = None
        self.log = open(os.path.join(logs, f"host{number}.log"), "a")
        self.start()

    def start(self) -> None:
        """Start, again if the port is still held by children of a killed supervisor that are stopping."""
        deadline = time.monotonic() + 60
        while True:
            self.process = subprocess.Popen([sys.executable, "-m", "jobrunner", "run"], env=self.env, cwd="/",
                                            stdout=self.log, stderr=self.log)
            # its own server answers (not one of a killed supervisor's children that are stopping)
            while self.process.poll() is None and not (children(self.process.pid) and request(self.port, "GET", "/healthz")[0] == 200):
                if time.monotonic() > deadline:
                    sys.exit(f"chaos: host {self.number} did not come back")
                time.sleep(0.1)
            if self.process.poll() is None:
                return
            time.sleep(0.5)

    def children(self) -> list[int]:
        return children(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# --- load and faults ----------------------------------------------------------------------------


class Load:
    """PUTs jobs to the hosts in turn at an even pace, each retried until answered 202 or refused for good."""

    def __init__(self, hosts: list[Host], jobs: int, duration: float, seed: int):
        self.hosts, self.jobs, self.duration = hosts, jobs, duration
        self.random = random.Random(seed + 1)
        self.accepted: dict[str, tuple[str, float | None]] = {}  # job id -> (type, expires_at epoch)
        self.refused: list[tuple[int, object]] = []
        self.lock = threading.Lock()
        # each type gets jobs in proportion to its concurrency, so that none is offered more than it can do
        weights = [concurrency for _, _, concurrency in TYPES.values()]
        self.plan = [(f"job_{uuid.uuid4()}", self.random.choices(list(TYPES), weights)[0], self.random.random() < 0.1)
                     for _ in range(jobs)]

    def run(self) -> None:
        started = time.monotonic()
        cursor = iter(range(self.jobs))
        cursor_lock = threading.Lock()

        def enqueuer():
            while True:
                with cursor_lock:
                    n = next(cursor, None)
                if n is None:
                    return
                time.sleep(max(0.0, started + n * self.duration / self.jobs - time.monotonic()))
                self._put(n)

        threads = [threading.Thread(target=enqueuer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _put(self, n: int) -> None:
        job_id, name, expires = self.plan[n]
        body = {"data": {"n": n}}
        expires_at = None
        if expires:
            expires_at = time.time() + 3
            body["expires_at"] = datetime.fromtimestamp(expires_at, timezone.utc).isoformat().replace("+00:00", "Z")
        deadline = time.monotonic() + 120
        for attempt in range(10**6):
            if time.monotonic() > deadline:
                break
            host = self.hosts[(n + attempt) % len(self.hosts)]  # the next host when one does not answer
            status, answer = request(host.port, "PUT", f"/v1/jobs/{name}/{job_id}", body)
            if status == 202:
                with self.lock:
                    self.accepted[job_id] = (name, expires_at)
                return
            if status is not None and 400 <= status < 500 and status != 429:
                with self.lock:
                    self.refused.append((status, answer))
                return
            time.sleep(0.2)  # down, restarting, or the database is: try again


class Faults:
    def __init__(self, hosts: list[Host], database: Database, downstream: ChaosDownstream, duration: float, outage: float, seed: int):
        self.hosts, self.database, self.downstream = hosts, database, downstream
        self.duration, self.outage = duration, outage
        self.random = random.Random(seed + 2)
        self.done = collections.Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        scheduled = [(0.2, self.kill_supervisor), (0.35, self.hup_storm), (0.5, self.restart_postgres),
                     (0.65, self.stop_postgres), (0.8, self.downstream_away)]
        next_kill = started + 3
        while not self.stop.is_set() and time.monotonic() < started + self.duration:
            now = time.monotonic()
            if scheduled and now >= started + scheduled[0][0] * self.duration:
                scheduled.pop(0)[1]()
            elif now >= next_kill:
                self.kill_child()
                next_kill = time.monotonic() + 3
            else:
                time.sleep(0.1)

    def kill_child(self) -> None:
        host = self.random.choice(self.hosts)
        victims = [pid for pid in host.children() if comm(pid).startswith("jr-")]
        if victims:
            os.kill(self.random.choice(victims), signal.SIGKILL)
            self.done["kill -9 child"] += 1

    def kill_supervisor(self) -> None:
        host = self.random.choice(self.hosts)
        host.process.kill()
        host.process.wait()
        host.start()
        self.done["kill -9 supervisor, fresh start"] += 1

    def hup_storm(self) -> None:
        for _ in range(5):
            for host in self.hosts:
                host.process.send_signal(signal.SIGHUP)
            time.sleep(0.3)
        self.done["SIGHUP storm (5 per host)"] += 1

    def restart_postgres(self) -> None:
        self.database.cluster.stop()
        self.database.cluster.start()
        self.done["PostgreSQL restart"] += 1

    def stop_postgres(self) -> None:
        self.database.cluster.stop()
        time.sleep(self.outage)
        self.database.cluster.start()
        self.done[f"PostgreSQL down {self.outage:g} s"] += 1

    def downstream_away(self) -> None:
        self.downstream.go_away(self.outage)
        self.done[f"downstream gone {self.outage:g} s"] += 1


# --- the verdict ------------------------------------------------------------------------------------


def settle(database: Database, quiet: float) -> None:
    """Until nothing is queued or in progress (retries wait out their back-off), or nothing has
    changed for `quiet` seconds: what is left then is stuck."""
    last, changed = None, time.monotonic()
    while time.monotonic() - changed < quiet:
        try:
            left = database.scalar("SELECT count(*) FROM queued_jobs")
        except Exception:  # the bench's own connection died in an outage: a new one
            time.sleep(0.5)
            with contextlib.suppress(Exception):
                database.reconnect()
            continue
        if left == 0:
            return
        if left != last:
            last, changed = left, time.monotonic()
        time.sleep(0.5)


def verdict(database: Database, load: Load, downstream: ChaosDownstream) -> tuple[list[tuple[str, str, bool]], int]:
    database.reconnect()
    rows = database.conn.execute("SELECT id, name, status::text FROM queued_jobs").fetchall()
    queued = {f"job_{job_id}": status for job_id, _, status in rows}
    names = {f"job_{job_id}": name for job_id, name, _ in rows}
    archived = {}
    for job_id, name, status, attempts, expires_at, created_at in database.conn.execute(
            "SELECT id, name, status::text, attempts, expires_at, created_at FROM archived_jobs"):
        archived[f"job_{job_id}"] = (status, attempts, expires_at.timestamp() if expires_at else None, created_at.timestamp())
        names[f"job_{job_id}"] = name
    # every job the queue took: answered 202, or committed by a server killed before it could answer
    known = set(load.accepted) | set(names)
    lost = [job_id for job_id in known if job_id not in queued and job_id not in archived]
    both = [job_id for job_id in queued if job_id in archived]
    deliveries = collections.Counter(d.job_id for d in downstream.deliveries)
    strategy = {job_id: TYPES[name][0] for job_id, name in names.items()}
    strategy.update({job_id: TYPES[name][0] for job_id, (name, _) in load.accepted.items()})
    duplicates = collections.Counter()
    for job_id, count in deliveries.items():
        if count > 1 and job_id in strategy:
            duplicates[strategy[job_id]] += count - 1
    wrong = []
    for job_id, (status, attempts, expires_at, archived_at) in archived.items():
        if status == "succeeded" and "succeeded" not in downstream.callbacks_sent.get(job_id, []):
            wrong.append((job_id, "succeeded without a succeeded callback"))
        if status == "failed" and strategy.get(job_id) == "at_least_once" and attempts > 0:
            wrong.append((job_id, f"at_least_once failed with {attempts} attempts left"))
        if status == "expired" and (expires_at is None or expires_at > archived_at + 1):
            wrong.append((job_id, "expired before its expiry"))
    statuses = collections.Counter(archived[j][0] for j in known if j in archived)
    rows = [
        ("jobs enqueued (answered 202, or found in the database)", f"{len(known):,}", True),
        ("archived: " + ", ".join(f"{s} {n:,}" for s, n in sorted(statuses.items())), f"{sum(statuses.values()):,}", True),
        ("deliveries (POSTs taken on)", f"{len(downstream.deliveries):,}", True),
        ("lost", str(len(lost)), not lost),
        ("stuck (still queued or in progress)", str(len(queued)), not queued),
        ("both queued and archived", str(len(both)), not both),
        ("duplicate deliveries, at_most_once", str(duplicates["at_most_once"]), duplicates["at_most_once"] == 0),
        ("duplicate deliveries, at_least_once (allowed)", str(duplicates["at_least_once"]), True),
        ("wrong final status", str(len(wrong)) + (f" e.g. {wrong[0]}" if wrong else ""), not wrong),
    ]
    for name, (_, _, concurrency) in TYPES.items():
        most = downstream.max_in_flight[name]
        rows.append((f"max in flight, {name} (concurrency {concurrency})", str(most), most <= concurrency))
    rows.append(("enqueues refused for good", str(len(load.refused)) + (f" e.g. {load.refused[0]}" if load.refused else ""),
                 not load.refused))
    return rows, sum(1 for _, _, ok in rows if not ok)


def run(jobs: int, duration: float, hosts: int, outage: float, seed: int, settle_quiet: float = 30) -> tuple[list, dict, int]:
    """The whole chaos run; (the table's rows, the faults injected, the number of broken promises)."""
    with private_database() as database:
        downstream = ChaosDownstream(seed)
        logs = tempfile.mkdtemp(prefix="jobrunner-chaos-")  # kept: what each host logged (errors only)
        running = [Host(database, downstream, n + 1, logs) for n in range(hosts)]
        downstream.api_ports = [host.port for host in running]
        try:
            for name, (strategy, attempts, concurrency) in TYPES.items():
                status, answer = request(running[0].port, "POST", "/v1/jobs", {"name": name, "delivery_strategy": strategy,
                                                                                  "attempts": attempts, "concurrency": concurrency})
                assert status == 201, answer
            load = Load(running, jobs, duration, seed)
            faults = Faults(running, database, downstream, duration, outage, seed)
            fault_thread = threading.Thread(target=faults.run)
            fault_thread.start()
            load.run()
            fault_thread.join()
            for host in running:  # the service recovers by itself: every host still serves
                if request(host.port, "GET", "/healthz")[0] != 200:
                    time.sleep(5)
            settle(database, settle_quiet)
            rows, broken = verdict(database, load, downstream)
            answers = {host.number: request(host.port, "GET", "/healthz") for host in running}
            serving = all(status == 200 for status, _ in answers.values())
            rows.append(("every host serving at the end, no restart by hand", "yes" if serving else f"NO {answers} (logs in {logs})", serving))
            return rows, dict(faults.done), broken + (not serving)
        finally:
            for host in running:
                host.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults")
    parser.add_argument("--hosts", type=int, default=1, help="jobrunner supervisors sharing the database")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds PostgreSQL and the downstream stay away")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    started = time.monotonic()
    rows, faults, broken = run(args.jobs, args.duration, args.hosts, args.outage, args.seed)
    print(f"chaos: {args.jobs:,} jobs over {args.duration:g} s, {args.hosts} host(s), seed {args.seed}, "
          f"{time.monotonic() - started:.0f} s in all")
    print("faults injected: " + ", ".join(f"{name} x{count}" for name, count in faults.items()))
    width = max(len(label) for label, _, _ in rows)
    for label, value, ok in rows:
        print(f"  {label:{width}}  {value:>8}  {'ok' if ok else 'BROKEN'}")
    print("every promise kept" if not broken else f"{broken} promise(s) broken")
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()

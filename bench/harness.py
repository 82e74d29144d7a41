"""What the benchmarks share: a private PostgreSQL, `jobrunner run` as a real process tree,
the fast downstream, readings from /proc, medians and the results file."""

import base64
import contextlib
import http.client
import json
import math
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
import uuid
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from jobrunner import store  # noqa: E402
from jobrunner.cli import migrate  # noqa: E402
from jobrunner.localdb import LocalPostgres  # noqa: E402

USER, PASSWORD = "bench", "bench"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
DOWNSTREAM_PASSWORD = "downstream-secret"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- PostgreSQL ---------------------------------------------------------------------


class Database:
    """A private cluster (default settings, fsync on) with pg_stat_statements, and jobrunner's schema."""

    def __init__(self, cluster: LocalPostgres, url: str, workdir: str):
        self.cluster, self.url, self.workdir = cluster, url, workdir
        self.conn = store.connect(url, application_name="bench")

    def pids(self) -> list[int]:
        postmaster = int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])
        return [postmaster, *children(postmaster)]

    def reconnect(self) -> None:
        """A new connection for the bench (after the database was restarted under it)."""
        try:
            self.conn.close()
        except Exception:
            pass
        self.conn = store.connect(self.url, application_name="bench")

    def scalar(self, query: str, params: tuple = ()):
        return self.conn.execute(query, params).fetchone()[0]


@contextlib.contextmanager
def private_database() -> Iterator[Database]:
    workdir = tempfile.mkdtemp(prefix="jobrunner-bench-")
    os.chmod(workdir, 0o755)
    cluster = LocalPostgres(Path(workdir) / "data", {"shared_preload_libraries": "'pg_stat_statements'"})
    url = cluster.start()
    try:
        migrate(url)
        database = Database(cluster, url, workdir)
        database.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield database
        database.conn.close()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


TOP_STATEMENTS = """
SELECT calls, total_exec_time / calls AS mean_ms, rows::float8 / calls AS rows_per_call,
       total_exec_time / 1000 AS seconds, query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query NOT LIKE '%%pg_stat%%'
ORDER BY total_exec_time DESC
LIMIT %s
"""


def top_statements(database: Database, limit: int = 6) -> list[str]:
    lines = []
    for calls, mean_ms, rows, seconds, query in database.conn.execute(TOP_STATEMENTS, (limit,)).fetchall():
        lines.append(f"{seconds:6.2f} s {calls:7,} calls {mean_ms:6.3f} ms {rows:6.1f} rows/call  {' '.join(query.split())[:100]}")
    return lines


# --- processes ------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def memory_kb(pid: int) -> dict[str, int]:
    """Rss, Pss, Pss_Anon, Pss_File of a process, in kB (smaps_rollup)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
            values[key] = int(rest.split()[0])
    return values


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(condition, what: str, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            sys.exit(f"bench: timed out waiting for {what}")
        time.sleep(interval)


class Service:
    """`python -m jobrunner run` with the given settings (environment variables), on a free port.

    `root`: the checkout whose code runs (another one: the code before a change, side by side in one run)."""

    def __init__(self, database: Database, settings: dict[str, str], port: int | None = None, root: Path = ROOT):
        self.port = port or free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("JOBRUNNER_", "PG_", "DOWNSTREAM"))}
        env.update({"DATABASE_URL": database.url, "JOBRUNNER_USERS": f"{USER}:{PASSWORD}", "JOBRUNNER_LOG_LEVEL": "WARNING",
                    "JOBRUNNER_HOST": "127.0.0.1", "PORT": str(self.port), "PYTHONPATH": str(root), **settings})
        self.workers = int(settings.get("JOBRUNNER_WORKERS", os.cpu_count() or 1))
        self.process = subprocess.Popen([sys.executable, "-m", "jobrunner", "run"], env=env, cwd=database.workdir,
                                        stdout=subprocess.DEVNULL)
        expected = int(settings.get("JOBRUNNER_SERVERS", 1)) + 1 + self.workers  # servers, watcher, workers
        wait_for(lambda: self.process.poll() is not None or len(self.processes()) == expected + 1, "jobrunner's children")
        if self.process.poll() is not None:
            sys.exit("bench: jobrunner run exited at start")
        wait_for(lambda: request(self.port, "GET", "/healthz")[0] == 200, "jobrunner's server")

    def processes(self) -> dict[str, int]:
        """comm name -> pid: the supervisor and each child."""
        found = {comm(self.process.pid): self.process.pid}
        found.update({comm(pid): pid for pid in children(self.process.pid)})
        return found

    def stop(self) -> None:
        stop(self.process)


class Downstream:
    """bench/fast_downstream.py, calling back `succeeded` on the API at `api_port` (it connects when it first calls back)."""

    def __init__(self, api_port: int, arrivals: bool = False, user: str = USER, password: str = PASSWORD, fresh: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "fast_downstream.py"), "--port", str(self.port), "--api",
             f"http://127.0.0.1:{api_port}", "--user", user, "--password", password, *(["--arrivals", "-"] if arrivals else []),
             *(["--fresh-callbacks"] if fresh else [])],
            stdout=subprocess.PIPE if arrivals else subprocess.DEVNULL, text=True,
        )
        wait_for(lambda: self._answers(), "fast_downstream")

    def _answers(self) -> bool:
        try:
            return self.stats() is not None
        except OSError:
            return False

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> None:
        stop(self.process)


def downstream_settings(downstream: Downstream) -> dict[str, str]:
    return {"DOWNSTREAM_URL": downstream.url, "DOWNSTREAM_WORKER_AUTH": DOWNSTREAM_PASSWORD}


def request(port: int, method: str, path: str, body: dict | None = None, conn: http.client.HTTPConnection | None = None):
    """(status, parsed body) of one API request; on `conn` (kept alive) if given."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Authorization": AUTH, "Content-Type": "application/json"})
        response = conn.getresponse()
        answer = response.read()
        return response.status, json.loads(answer) if answer else None
    except (OSError, http.client.HTTPException, ValueError):  # down, cut off mid-answer, or not JSON
        return None, None
    finally:
        if own:
            conn.close()


def create_type(port: int, name: str, concurrency: int, strategy: str = "at_least_once", attempts: int = 3) -> None:
    status, body = request(port, "POST", "/v1/jobs", {"name": name, "delivery_strategy": strategy,
                                                      "attempts": attempts, "concurrency": concurrency})
    if status != 201:
        sys.exit(f"bench: creating job type {name} answered {status}: {body}")


# --- figures ------------------------------------------------------------------------------


def median_spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """`median [min-max]`, the way docs/benchmarks.md quotes a figure."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def record(line: str) -> None:
    """Print the result line and append it, dated, to bench/results.txt."""
    print(line, flush=True)
    with open(BENCH / "results.txt", "a") as results:
        results.write(f"{time.strftime('%Y-%m-%d %H:%M')} {line}\n")


# --- an idle service with many job types ---------------------------------------------------


class Arrivals:
    """Reads fast_downstream's `<monotonic> <name> <id>` lines: job id -> when its POST arrived."""

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

    def wait_for(self, job_id: str, timeout: float = 30) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: job_id in self.times, timeout):
                sys.exit(f"bench: job {job_id} was not dispatched within {timeout} s")
            return self.times[job_id]


def put_job(port: int, name: str) -> tuple[str, float, float]:
    """PUT one job on a new connection; its id, when the PUT started and when its answer had been read (CLOCK_MONOTONIC)."""
    job_id = f"job_{uuid.uuid4()}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    status, body = request(port, "PUT", f"/v1/jobs/{name}/{job_id}", {"data": {"to": "someone@example.com"}}, conn)
    answered = time.monotonic()
    conn.close()
    if status != 202:
        sys.exit(f"bench: PUT answered {status}: {body}")
    return job_id, started, answered


@contextlib.contextmanager
def idle_service(database: Database, types: int, concurrency: int, settings: dict[str, str] | None = None, root: Path = ROOT):
    """`jobrunner run` with `types` job types of `concurrency` each, warmed up (one job each, called back), then idle.

    Yields (service, downstream, arrivals, type names)."""
    port = free_port()
    downstream = Downstream(port, arrivals=True)
    arrivals = Arrivals(downstream.process.stdout)
    service = Service(database, {**downstream_settings(downstream), **(settings or {})}, port, root)
    try:
        database.conn.execute("TRUNCATE queued_jobs, archived_jobs, jobrunner_paused_job_types, jobs CASCADE")  # and the types' settings
        names = [f"idle{n:03d}" for n in range(types)]
        for name in names:
            create_type(port, name, concurrency)
        for job_id, _, _ in [put_job(port, name) for name in names]:
            arrivals.wait_for(job_id)
        wait_callbacks(downstream, len(names))
        yield service, downstream, arrivals, names
    finally:
        service.stop()
        downstream.stop()


def wait_callbacks(downstream: Downstream, count: int) -> None:
    stats = wait_for(lambda: (s := downstream.stats())["callbacks_ok"] + s["callbacks_failed"] >= count and s,
                     f"{count} callbacks")
    if stats["callbacks_failed"]:
        sys.exit(f"bench: callbacks failed: {stats}")

"""Test databases: a throwaway PostgreSQL cluster, a template built by the migrations, a fresh database per test.

Set JOBRUNNER_TEST_DATABASE_URL to use an existing server instead (the role needs
CREATEDB); otherwise a private cluster is started with the machine's initdb/pg_ctl.
"""

import base64
import contextlib
import dataclasses
import http.client
import itertools
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from psycopg.conninfo import make_conninfo

from jobrunner import migrate, server, services, store
from jobrunner.config import load_config
from jobrunner.localdb import LocalPostgres

TEMPLATE = f"jobrunner_template_{os.getpid()}"
# the readable whole schema, which tests/test_migrations.py holds equal to the migrations
SCHEMA_SQL = (Path(__file__).parent.parent / "schema.sql").read_text()
# Durability is worthless in a throwaway cluster, and speed is not.
TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200"}
_database_numbers = itertools.count()

# Hypothesis profiles for the generated suites (test_generated_api, test_lifecycle_model,
# test_faults, test_hostile_peers):
#   ci        chosen when CI is set: derandomized (the same examples every run, so a red
#             build is reproducible), a fixed example budget, no example database;
#   dev       the default for local runs: random examples, remembered failures;
#   thorough  HYPOTHESIS_PROFILE=thorough, a longer local hunt (10x the examples).
# Each test asks for `examples(n)`, its budget in the ci profile, scaled by the profile.
_NO_TIMING = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", derandomize=True, database=None, max_examples=50, print_blob=True, **_NO_TIMING)
settings.register_profile("dev", max_examples=50, **_NO_TIMING)
settings.register_profile("thorough", max_examples=500, **_NO_TIMING)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(HYPOTHESIS_PROFILE)


def package_data() -> list[str]:
    """The package data patterns of setup.cfg, read as setuptools reads them (a list is split at
    commas and newlines, not at spaces: "a b" is one pattern that matches nothing)."""
    from setuptools.dist import Distribution

    dist = Distribution()
    dist.parse_config_files([str(Path(__file__).parent.parent / "setup.cfg")])
    return dist.package_data["jobrunner"]


def examples(ci_budget: int) -> int:
    """A generated test's example budget: `ci_budget` in the ci and dev profiles, 10x in thorough."""
    return ci_budget * (10 if HYPOTHESIS_PROFILE == "thorough" else 1)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """Connection info of a server where tests may create databases."""
    url = os.environ.get("JOBRUNNER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    workdir = tempfile.mkdtemp(prefix="jobrunner-test-")
    os.chmod(workdir, 0o755)  # as root, the cluster runs as `postgres`, which must reach its data directory
    cluster = LocalPostgres(Path(workdir) / "data", settings=TEST_SETTINGS)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def admin_execute(server: str, *statements: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture(scope="session")
def template_database(pg_server: str) -> str:
    admin_execute(pg_server, f"DROP DATABASE IF EXISTS {TEMPLATE}", f"CREATE DATABASE {TEMPLATE} TEMPLATE template0")
    conn = store.connect(make_conninfo(pg_server, dbname=TEMPLATE))
    migrate.apply(conn)  # every migration, so each test runs on what `jobrunner migrate` builds
    conn.close()
    yield TEMPLATE
    admin_execute(pg_server, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")


@pytest.fixture
def make_database(pg_server: str, template_database: str):
    """Create databases for this test (from the schema template, or empty) and drop them after it."""
    created = []

    def make(template: str = template_database) -> str:
        name = f"jobrunner_test_{os.getpid()}_{next(_database_numbers)}"
        admin_execute(pg_server, f"CREATE DATABASE {name} TEMPLATE {template}")
        created.append(name)
        return make_conninfo(pg_server, dbname=name)

    yield make
    for name in created:
        admin_execute(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def module_db_url(pg_server: str, template_database: str) -> str:
    """A database with jobrunner's schema shared by one module's tests: the generated suites
    run hundreds of examples, and a database each would cost more than the examples."""
    name = f"jobrunner_test_{os.getpid()}_{next(_database_numbers)}"
    admin_execute(pg_server, f"CREATE DATABASE {name} TEMPLATE {template_database}")
    yield make_conninfo(pg_server, dbname=name)
    admin_execute(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(make_database) -> str:
    """A fresh database with jobrunner's schema, for this test alone."""
    return make_database()


@pytest.fixture
def conn(db_url: str):
    connection = store.connect(db_url)
    yield connection
    connection.close()


@pytest.fixture
def connect(db_url: str):
    """Open more connections to the test's database; they are closed after the test."""
    opened = []

    def open_connection():
        connection = store.connect(db_url)
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        connection.close()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def make_type(conn, name="email", strategy="at_least_once", attempts=3, concurrency=5):
    return services.create_job_type(conn, name, strategy, attempts, concurrency)


def enqueue_many(conn, name, count, **kwargs):
    return [services.enqueue(conn, new_id(), name, {"n": n}, **kwargs) for n in range(count)]


def free_port() -> int:
    """A loopback port nothing listens on (for a process that binds it itself, or for a refused connection)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, what: str, timeout: float = 10.0, interval: float = 0.005):
    """Wait for `condition()` to be truthy and return its value, failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value


# --- a real HTTP server on loopback ---------------------------------------------

API_USER, API_PASSWORD = "admin", "s3cret:pass"


@dataclasses.dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


class Api:
    """A client of the server under test: one new connection per request unless given one."""

    def __init__(self, port: int):
        self.port = port

    def request(self, method, path, body=None, auth=(API_USER, API_PASSWORD), headers=None, conn=None) -> Response:
        all_headers = dict(headers or {})
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            all_headers.setdefault("Authorization", f"Basic {token}")
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        connection = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            if conn is None:
                connection.close()

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, body=None, **kwargs):
        return self.request("POST", path, body=body, **kwargs)

    def put(self, path, body=None, **kwargs):
        return self.request("PUT", path, body=body, **kwargs)


@contextlib.contextmanager
def running_server(database_url: str, **settings):
    """Run the HTTP server in a thread on a loopback port; stop it gracefully on exit."""
    overrides = {"database_url": database_url, "users": f"{API_USER}:{API_PASSWORD}", "db_timeout": "2", **settings}
    config = load_config({}, overrides=overrides)
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(config, sock, stop), name="test-server")
    thread.start()
    try:
        yield Api(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def api(db_url):
    with running_server(db_url) as client:
        yield client


# --- workers and a downstream ----------------------------------------------------

DOWNSTREAM_PASSWORD = "downstream-secret"


def worker_settings(db_url: str, downstream_url: str, **settings) -> dict:
    return {
        "database_url": db_url,
        "downstream_url": downstream_url,
        "downstream_password": DOWNSTREAM_PASSWORD,
        "downstream_timeout": "1",
        **settings,
    }


@contextlib.contextmanager
def running_worker(db_url: str, downstream_url: str, **settings):
    """A Worker in a thread of this process (its own pools and LISTEN connection); stopped gracefully on exit."""
    from jobrunner.worker import Worker

    worker = Worker(load_config({}, overrides=worker_settings(db_url, downstream_url, **settings)))
    thread = threading.Thread(target=worker.run, name="test-worker")
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the worker did not stop"


@contextlib.contextmanager
def worker_processes(count: int, db_url: str, downstream_url: str, **settings):
    """`jobrunner work` processes, stopped with SIGTERM on exit (each must exit 0)."""
    import signal
    import subprocess
    import sys

    from jobrunner.config import SETTINGS

    env_names = {setting.name: setting.env for setting in SETTINGS}
    environment = {k: v for k, v in os.environ.items() if k not in env_names.values()}
    environment.update({env_names[name]: str(value) for name, value in worker_settings(db_url, downstream_url, **settings).items()})
    environment["JOBRUNNER_LOG_LEVEL"] = "WARNING"
    processes = [
        subprocess.Popen([sys.executable, "-m", "jobrunner", "work"], env=environment, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            _, stderr = process.communicate(timeout=30)
            assert process.returncode == 0, stderr


@pytest.fixture
def downstream(api):
    from downstream_stub import DownstreamStub

    stub = DownstreamStub(api.port, (API_USER, API_PASSWORD), DOWNSTREAM_PASSWORD)
    yield stub
    stub.close()


def enqueue_while_archiving(conn, connect, job, enqueue):
    """Re-send a job's PUT (`enqueue()`) while a succeeded callback is archiving that job; what the PUT got."""
    callback = connect()
    outcome = []

    def resend():
        try:
            outcome.append(enqueue())
        except Exception as error:  # the outcome under test
            outcome.append(error)

    with callback.transaction():
        services.handle_status_callback(callback, job.id, job.name, "succeeded", job.attempts)
        thread = threading.Thread(target=resend)
        thread.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        wait_until(lambda: conn.execute(waiting).fetchone()[0] > 0, "the PUT to wait on the archiving transaction")
    thread.join(timeout=10)
    assert not thread.is_alive()
    return outcome[0]


# --- helpers shared by test files (import them from here, not from another test file) ---


def count_rows(conn, table: str, status: str | None = None) -> int:
    """Rows of `queued_jobs` or `archived_jobs` (of one status if given)."""
    assert table in ("queued_jobs", "archived_jobs")
    if status is None:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return conn.execute(f"SELECT count(*) FROM {table} WHERE status = %s", (status,)).fetchone()[0]


def create_type(api, name="email", strategy="at_least_once", attempts=3, concurrency=5):
    """Create a job type over HTTP."""
    response = api.post("/v1/jobs", {"name": name, "delivery_strategy": strategy, "attempts": attempts, "concurrency": concurrency})
    assert response.status == 201, response.body


def enqueue(api, name="email", data=None, **fields) -> str:
    """PUT a new job over HTTP; its id."""
    job_id = f"job_{uuid.uuid4()}"
    response = api.put(f"/v1/jobs/{name}/{job_id}", {"data": data if data is not None else {"n": 1}, **fields})
    assert response.status == 202, response.body
    return job_id


def status_of(api, job_id) -> str:
    return api.get(f"/v1/jobs/{job_id}").json["status"]


def wait_for_status(api, job_id, status, timeout=15) -> dict:
    wait_until(lambda: status_of(api, job_id) == status, f"{job_id} to be {status}", timeout)
    return api.get(f"/v1/jobs/{job_id}").json


# --- `jobrunner run` as a real process tree ----------------------------------------


def live_children(parent: int) -> list[tuple[str, int]]:
    """(comm name, pid) of each live (not zombie) child process of `parent`, read from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as comm:
                name = comm.read().strip()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append((name, int(pid)))
    return found


class Service:
    """A running `jobrunner run`: its process, the NOTIFY_SOCKET messages it sent, its log so far."""

    def __init__(self, process, notifications: list[str], config_path: str, log_path: str):
        self.process = process
        self.notifications = notifications
        self.config_path = config_path
        self.log_path = log_path
        self.port = None

    @property
    def api(self) -> Api:
        return Api(self.port)

    def log(self) -> str:
        """Everything the supervisor and its children wrote to stderr so far."""
        with open(self.log_path) as file:
            return file.read()

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        wait_until(lambda: text in self.log(), f"{text!r} in the log", timeout, interval=0.02)

    def children(self) -> dict[str, int]:
        """comm name -> pid of each live child."""
        return {name: pid for name, pid in live_children(self.process.pid)}

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def notified(self, message: str) -> bool:
        return self.notified_count(message) > 0

    def notified_count(self, message: str) -> int:
        return sum(message in notification.split("\n") for notification in list(self.notifications))

    def wait_for_exit(self, timeout: float) -> int:
        import subprocess

        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`jobrunner run` still running {timeout} s later; its log:\n{self.log()}") from None


@contextlib.contextmanager
def running_service(db_url: str, downstream_url: str, config: str = "workers = 2\n", **environment):
    """`jobrunner run` with a NOTIFY_SOCKET of its own, its stderr in a file; killed on exit if still running.

    `environment` adds or overrides variables (JOBRUNNER_GRACEFUL_TIMEOUT is 10 unless given).
    """
    import subprocess
    import sys

    workdir = tempfile.mkdtemp(prefix="jobrunner-run-")
    notify_path = os.path.join(workdir, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(0.2)
    notifications: list[str] = []
    reading = threading.Event()

    def read_notifications():
        while not reading.is_set():
            try:
                notifications.append(listener.recv(4096).decode())
            except TimeoutError:
                continue

    reader = threading.Thread(target=read_notifications, daemon=True)
    reader.start()
    config_path = os.path.join(workdir, "jobrunner.ini")
    with open(config_path, "w") as file:
        file.write("[jobrunner]\n" + config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBRUNNER_", "DATABASE_URL", "DOWNSTREAM", "PORT", "WATCHDOG_", "NOTIFY_SOCKET"))}
    if "database_url" not in config:
        env["DATABASE_URL"] = db_url
    env.update(
        JOBRUNNER_USERS=f"{API_USER}:{API_PASSWORD}",
        DOWNSTREAM_URL=downstream_url,
        DOWNSTREAM_WORKER_AUTH=DOWNSTREAM_PASSWORD,
        JOBRUNNER_HOST="127.0.0.1",
        PORT="0",
        JOBRUNNER_GRACEFUL_TIMEOUT="10",
        JOBRUNNER_DOWNSTREAM_TIMEOUT="1",
        NOTIFY_SOCKET=notify_path,
    )
    env.update(environment)
    log_path = os.path.join(workdir, "stderr.log")
    with open(log_path, "w") as log_file:
        command = [sys.executable, "-m", "jobrunner", "--config", config_path, "run"]
        process = subprocess.Popen(command, env=env, stderr=log_file, text=True)
    service = Service(process, notifications, config_path, log_path)
    try:
        wait_until(lambda: service.notified("READY=1") or process.poll() is not None, "READY=1", timeout=30)
        assert process.poll() is None, service.log()
        status = next(line for n in notifications for line in n.split("\n") if line.startswith("STATUS="))
        service.port = int(status.rsplit(" ", 1)[1])
        yield service
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        reading.set()
        reader.join(timeout=5)
        listener.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def detached_downstream():
    """A downstream stub for a `jobrunner run` whose port is known only once it runs: set `.api_port` then."""
    from downstream_stub import DownstreamStub

    stub = DownstreamStub(0, (API_USER, API_PASSWORD), DOWNSTREAM_PASSWORD)
    yield stub
    stub.close()


class PostgresRelay:
    """A TCP relay to the test's PostgreSQL (which listens on a Unix socket only), that can be cut and restored.

    `url` reaches the database through the relay; `cut()` closes every relayed
    connection and refuses new ones (an outage), `restore()` ends the outage.
    `connections` counts the connections it relayed.
    """

    def __init__(self, db_url: str):
        from psycopg.conninfo import conninfo_to_dict

        target = conninfo_to_dict(db_url)
        self._target = os.path.join(target["host"], f".s.PGSQL.{target.get('port', 5432)}")
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = make_conninfo(db_url, host="127.0.0.1", port=str(self._listener.getsockname()[1]))
        self.connections = 0
        self._down = threading.Event()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._down.set()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def restore(self) -> None:
        self._down.clear()

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self._down.is_set():
                client.close()
                continue
            server = socket.socket(socket.AF_UNIX)
            server.connect(self._target)
            with self._lock:
                self.connections += 1
                self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        source.close()  # each socket is one direction's source: closed once, by the thread that read it (else a ResourceWarning at GC)


@pytest.fixture
def relay(db_url):
    relayed = PostgresRelay(db_url)
    yield relayed
    relayed.close()


def run_concurrently(calls, timeout: float = 30.0) -> list:
    """Call each of `calls` in its own thread, released together; their results in the order of `calls`.

    Fails if a thread is still running after `timeout` seconds or raised (its error is re-raised).
    """
    results: list = [None] * len(calls)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def run(index, call):
        try:
            barrier.wait(timeout)
            results[index] = call()
        except BaseException as error:  # collected, and raised in the test's thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index, call)) for index, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(thread.is_alive() for thread in threads)
    assert not stuck, f"{stuck} of {len(calls)} calls still running after {timeout} s"
    if errors:
        raise errors[0]
    return results


# --- HTTP spoken by hand, for what http.client will not send ------------------------


def basic(user: str = API_USER, password: str = API_PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def raw_request(method="GET", target="/healthz", headers=(), body=b"", version="HTTP/1.1", auth=True) -> bytes:
    """A request written by hand; `headers` are "Name: value" lines (duplicates allowed)."""
    lines = [f"{method} {target} {version}", "Host: 127.0.0.1"]
    if auth:
        lines.append(f"Authorization: {basic()}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawClient:
    """HTTP spoken by hand over a plain socket, for what http.client will not send."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        """Read what the server sent next; False once it has closed (EOF or reset)."""
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def read_response(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise AssertionError(f"the connection closed without a complete answer; got {self.buffer[:300]!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version.startswith("HTTP/1."), status_line
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buffer) < length and self._fill():
                pass
        else:
            while self._fill():
                pass
            length = len(self.buffer)
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        assert len(body) == length, f"the body was cut short: {body!r}"
        return Response(int(status), headers, body)

    def wait_for_close(self, within: float) -> float:
        """Read until the server closes the connection and return how long that took; fail after `within` s."""
        started = time.monotonic()
        deadline = started + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the server kept the connection open for {within} s")
            self.sock.settimeout(remaining)
            try:
                if not self._fill():
                    return time.monotonic() - started
            except TimeoutError:
                raise AssertionError(f"the server kept the connection open for {within} s") from None

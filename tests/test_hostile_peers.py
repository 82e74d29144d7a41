"""Hostile peers, generated: a downstream whose answers' timing, size, framing and status, and
whose callbacks' order, are generated; and a generated population of clients around the server.

Against a real worker (conftest.running_worker) and a real server, checking:
- nothing lost: every job is archived, none is left queued or in progress;
- an at_most_once job reaches the downstream once, unless its answer was a clean 503;
- nothing is POSTed again after its callback was accepted;
- a type's concurrency is never exceeded at the downstream;
- authenticated clients are served while others hold sockets;
- a stop is bounded.

These examples are slow (seconds each): a small fixed budget (conftest.examples).
"""

import base64
import contextlib
import dataclasses
import http.client
import json
import select
import socket
import struct
import threading
import time
import uuid

import pytest
from conftest import API_PASSWORD, API_USER, HYPOTHESIS_PROFILE, examples, running_server, running_worker, wait_until
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from jobrunner import services, store

# The worker's and server's threads use the global `random` (poll jitter, pool jitter) while
# Hypothesis draws; Hypothesis would take that for a strategy using it.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

DOWNSTREAM_TIMEOUT = 1.0  # seconds: the worker's JOBRUNNER_DOWNSTREAM_TIMEOUT here
JOB_TIMEOUT = 5.0  # longer than any generated hold (delay + drip < 4 s): a downstream that keeps to the contract
STOP_BOUND = 5.0  # seconds a worker may take to stop once asked
SETTLE_WITHIN = 60.0
# Shrinking a failure here costs minutes (every step runs a worker); only the thorough profile shrinks.
PHASES = tuple(Phase) if HYPOTHESIS_PROFILE == "thorough" else (Phase.explicit, Phase.reuse, Phase.generate)
AUTH = "Basic " + base64.b64encode(f"{API_USER}:{API_PASSWORD}".encode()).decode()


# --- the downstream ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """What the downstream does with one POST."""

    status: int  # of its answer
    framing: str  # normal, close, chunked, cut (ends mid-body), reset, silence, drip (a byte at a time), big (70 KiB)
    delay: float  # before answering
    callback: str  # none, before (the answer), after, twice, failed
    rickover_body: bool = True  # a 503's body says {"id": "service_unavailable"}

    def clean_unavailable(self) -> bool:
        """A 503 the worker can read whole and in time, with no callback: the one answer that allows a resend."""
        return (
            self.status == 503
            and self.framing not in ("reset", "silence", "drip")
            and self.delay < DOWNSTREAM_TIMEOUT / 2
            and self.callback == "none"
        )


behaviours = st.builds(
    Behaviour,
    status=st.sampled_from([202, 202, 200, 204, 400, 500, 503, 503]),
    framing=st.sampled_from(["normal", "normal", "close", "chunked", "cut", "reset", "silence", "drip", "big"]),
    delay=st.sampled_from([0.0, 0.0, 0.3, 1.5]),
    callback=st.sampled_from(["none", "before", "after", "after", "twice", "failed"]),
    rickover_body=st.booleans(),
)


@dataclasses.dataclass
class Post:
    arrived: float
    name: str
    job_id: str
    attempts: int
    behaviour: Behaviour
    in_flight: bool = True
    waited: float = 0.0  # seconds the worker stayed for a dripping answer before hanging up (or it all came)


@dataclasses.dataclass
class Callback:
    at: float  # when its answer came back
    job_id: str
    attempt: int
    status: str
    answer: int


class HostileDownstream:
    """A downstream on raw sockets: each job's k-th POST gets that job's k-th behaviour (the last repeats)."""

    def __init__(self, api_port: int, plan: dict[str, list[Behaviour]]):
        self.api_port, self.plan = api_port, plan
        self.posts: list[Post] = []
        self.callbacks: list[Callback] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def close(self) -> None:
        self._stopping.set()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(timeout=10)
        self._sock.close()
        assert not [thread for thread in self._threads if thread.is_alive()], "a peer thread did not end"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with self._lock:
                self._connections.append(conn)
            self._start(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        reader = conn.makefile("rb")
        try:
            while not self._stopping.is_set():
                request = _read_request(reader)
                if request is None:
                    return
                if not self._answer(conn, request):
                    return
        except OSError:
            pass  # the worker gave up on the connection
        finally:
            reader.close()
            conn.close()

    def _answer(self, conn: socket.socket, request: tuple[str, bytes]) -> bool:
        """Behave as planned; whether the connection may carry another request."""
        path, body = request
        _, _, _, name, job_id = path.split("/")
        with self._lock:
            count = sum(post.job_id == job_id for post in self.posts)
            planned = self.plan.get(job_id) or [Behaviour(202, "normal", 0.0, "after")]
            post = Post(time.monotonic(), name, job_id, json.loads(body)["attempts"], planned[min(count, len(planned) - 1)])
            self.posts.append(post)
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            self.max_in_flight[name] = max(self.max_in_flight.get(name, 0), self.in_flight[name])
        try:
            return self._behave(conn, post)
        finally:
            self._done(post)

    def _behave(self, conn: socket.socket, post: Post) -> bool:
        b = post.behaviour
        if b.callback == "before":
            self._call_back(post, "succeeded")
        if self._stopping.wait(b.delay):
            return False
        if b.framing == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if b.framing == "silence":
            self._stopping.wait(2 * DOWNSTREAM_TIMEOUT + 0.5)
            return False
        keep = self._send_answer(conn, post)
        if b.callback in ("after", "twice", "failed"):
            self._start(self._call_back_later, post, "failed" if b.callback == "failed" else "succeeded", 2 if b.callback == "twice" else 1)
        return keep

    def _send_answer(self, conn: socket.socket, post: Post) -> bool:
        try:
            return self._write_answer(conn, post.behaviour)
        finally:
            post.waited = time.monotonic() - post.arrived

    def _write_answer(self, conn: socket.socket, b: Behaviour) -> bool:
        if b.status == 503:
            body = b'{"title":"busy","id":"service_unavailable"}' if b.rickover_body else b"busy"
        elif b.status >= 400:
            body = b'{"title":"boom","id":"server_error"}'
        else:
            body = b"" if b.status == 204 else b'{"status":"accepted"}'
        if b.framing == "big":
            body = b'{"pad":"' + b"x" * 70_000 + b'"}'
        head = f"HTTP/1.1 {b.status} X\r\nContent-Type: application/json\r\n"
        if b.framing == "close":
            conn.sendall((head + "Connection: close\r\n\r\n").encode() + body)
            return False
        if b.framing == "chunked":
            conn.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n")
            return True
        if b.framing == "cut":
            conn.sendall((head + f"Content-Length: {len(body) + 100}\r\n\r\n").encode() + body)
            return False
        whole = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        if b.framing == "drip":  # a byte every 0.2 s for a while, then the rest
            for i in range(12):
                if self._stopping.is_set() or _hung_up(conn):
                    return False
                conn.sendall(whole[i : i + 1])
                time.sleep(0.2)  # the drip's pace, not a wait for a condition
            conn.sendall(whole[12:])
            return False
        conn.sendall(whole)
        return True

    def _done(self, post: Post) -> None:
        with self._lock:
            if post.in_flight:
                post.in_flight = False
                self.in_flight[post.name] -= 1

    def _call_back_later(self, post: Post, status: str, times: int) -> None:
        for _ in range(times):
            self._call_back(post, status)

    def _call_back(self, post: Post, status: str) -> None:
        self._done(post)  # on its way: the job may be freed any moment
        for _ in range(50):  # like a real downstream: retry while the API cannot be reached
            connection = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=10)
            try:
                connection.request(
                    "POST", f"/v1/jobs/{post.name}/{post.job_id}", body=json.dumps({"status": status, "attempt": post.attempts}),
                    headers={"Authorization": AUTH, "Content-Type": "application/json"},
                )
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException):
                self._stopping.wait(0.1)
                continue
            finally:
                connection.close()
            with self._lock:
                self.callbacks.append(Callback(time.monotonic(), post.job_id, post.attempts, status, answer.status))
            if answer.status != 503:
                return


def _hung_up(conn: socket.socket) -> bool:
    """The worker closed its side (it gave up on the answer)."""
    if not select.select([conn], [], [], 0)[0]:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _read_request(reader) -> tuple[str, bytes] | None:
    line = reader.readline(65537)
    if not line:
        return None
    path = line.split()[1].decode()
    length = 0
    while (header := reader.readline(65537)) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return path, reader.read(length)


# --- the invariants --------------------------------------------------------------------------------


def check_deliveries(downstream: HostileDownstream, strategies: dict[str, str], concurrency: dict[str, int]) -> None:
    with downstream._lock:
        posts, callbacks = list(downstream.posts), list(downstream.callbacks)
    for name, most in downstream.max_in_flight.items():
        assert most <= concurrency[name], f"type {name} (concurrency {concurrency[name]}) had {most} jobs in flight at the downstream"
    for post in posts:
        if post.behaviour.framing == "drip":
            assert post.waited < post.behaviour.delay + DOWNSTREAM_TIMEOUT + 1.0, (
                f"the worker waited {post.waited:.1f} s for a dripping answer; its downstream timeout is {DOWNSTREAM_TIMEOUT} s"
            )
    by_job: dict[str, list[Post]] = {}
    for post in posts:
        by_job.setdefault(post.job_id, []).append(post)
    for job_id, sent in by_job.items():
        name = sent[0].name
        if strategies[name] == "at_most_once":
            for earlier, later in zip(sent, sent[1:]):
                assert earlier.behaviour.clean_unavailable(), (
                    f"at_most_once job {job_id} POSTed again after an answer that may have been acted on: {earlier.behaviour}"
                )
        for callback in callbacks:
            if callback.job_id != job_id or callback.answer != 200:
                continue
            again = [p for p in sent if p.arrived > callback.at and (callback.status == "succeeded" or p.attempts == callback.attempt)]
            assert not again, f"job {job_id} POSTed {len(again)} times after its {callback.status} callback for attempt {callback.attempt} was accepted"


@pytest.fixture(scope="module")
def api(module_db_url):
    with running_server(module_db_url) as client:
        yield client


@pytest.fixture(scope="module")
def conn(module_db_url):
    connection = store.connect(module_db_url)
    yield connection
    connection.close()


job_types = st.lists(
    st.tuples(st.sampled_from(["at_least_once", "at_most_once"]), st.integers(1, 2), st.integers(1, 2)), min_size=1, max_size=2
)


@settings(max_examples=examples(6), phases=PHASES)
@given(types=job_types, jobs=st.lists(st.tuples(st.integers(0, 1), st.lists(behaviours, min_size=1, max_size=3)), min_size=1, max_size=4))
def test_a_generated_downstream_loses_nothing_and_never_delivers_twice(module_db_url, api, conn, types, jobs):
    conn.execute("TRUNCATE queued_jobs, archived_jobs, jobrunner_paused_job_types, jobs CASCADE")  # and the types' settings
    strategies, concurrency = {}, {}
    for number, (strategy, attempts, slots) in enumerate(types):
        name = f"peer-{number}"
        services.create_job_type(conn, name, strategy, attempts, slots)
        strategies[name], concurrency[name] = strategy, slots
    plan = {}
    for which, planned in jobs:
        name = f"peer-{which % len(types)}"
        job = services.enqueue(conn, uuid.uuid4(), name, {"planned": [dataclasses.astuple(b) for b in planned]})
        plan[job.job_id] = planned
    downstream = HostileDownstream(api.port, plan)
    try:
        settings_ = {"downstream_timeout": str(DOWNSTREAM_TIMEOUT), "job_timeout": str(JOB_TIMEOUT)}
        with contextlib.ExitStack() as stack:
            stack.enter_context(running_worker(module_db_url, downstream.url, **settings_))
            left = "SELECT count(*) FROM queued_jobs"
            wait_until(lambda: conn.execute(left).fetchone()[0] == 0, f"every job archived (plan {plan})", timeout=SETTLE_WITHIN, interval=0.05)
            asked = time.monotonic()
        stopped_in = time.monotonic() - asked
        assert stopped_in < STOP_BOUND, f"the worker took {stopped_in:.1f} s to stop"
        archived = conn.execute("SELECT count(*) FROM archived_jobs").fetchone()[0]
        assert archived == len(plan), f"{archived} archived of {len(plan)} enqueued"
        check_deliveries(downstream, strategies, concurrency)
    finally:
        downstream.close()


# --- a generated population of clients --------------------------------------------------------------

MAX_REQUEST_THREADS = 8
READ_TIMEOUT = 6.0


def open_client(port: int, kind: str) -> socket.socket:
    """A client that connects and then: sends nothing, drips a request, idles after one request, or polls without credentials."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if kind == "slow":
        sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")  # and then nothing more for now
    elif kind in ("idle", "unauthenticated"):
        auth = f"Authorization: {AUTH}\r\n" if kind == "idle" else ""
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        sock.recv(65536)
    return sock


population = st.fixed_dictionaries(
    {
        "silent": st.integers(0, 2 * MAX_REQUEST_THREADS),
        "slow": st.integers(0, 4),
        "idle": st.integers(0, 2 * MAX_REQUEST_THREADS),
        "unauthenticated": st.integers(0, MAX_REQUEST_THREADS),
    }
)


@settings(max_examples=examples(6), phases=PHASES)
@given(clients=population)
def test_authenticated_clients_are_served_whatever_the_others_do(module_db_url, clients):
    sockets: list[socket.socket] = []
    settings_ = {"max_request_threads": str(MAX_REQUEST_THREADS), "read_timeout": str(READ_TIMEOUT)}
    try:
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(running_server(module_db_url, **settings_))
            for kind, count in clients.items():
                sockets += [open_client(client.port, kind) for _ in range(count)]
            for _ in range(3):
                started = time.monotonic()
                answer = client.get("/v1/jobs")
                took = time.monotonic() - started
                assert answer.status == 200, f"an authenticated client got {answer.status} {answer.body[:200]!r} with {clients} around"
                assert took < 2.0, f"an authenticated request took {took:.1f} s with {clients} around"
            asked = time.monotonic()
        stopped_in = time.monotonic() - asked
        assert stopped_in < 2.5, f"the server took {stopped_in:.1f} s to stop with {clients} connected"
    finally:
        for sock in sockets:
            sock.close()

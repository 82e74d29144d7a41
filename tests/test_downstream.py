"""The downstream client over real sockets: each way a POST can end, told apart by type."""

import contextlib
import dataclasses
import gc
import http.client
import json
import select
import socket
import threading
import time
import tracemalloc
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import wait_until

from jobrunner import downstream as downstream_module
from jobrunner.downstream import Delivery
from jobrunner.models import QueuedJob

NOW = datetime.now(timezone.utc)
_clients = []


def client(*args, **kwargs):
    """A client that the test's teardown closes (kept-alive connections included)."""
    made = downstream_module.Downstream(*args, **kwargs)
    _clients.append(made)
    return made


@pytest.fixture(autouse=True)
def close_clients():
    yield
    while _clients:
        _clients.pop().close()
JOB = QueuedJob(uuid.uuid4(), "email", 3, NOW, None, NOW, NOW, "in-progress", {"to": "a@example.com"})


@contextlib.contextmanager
def http_server(status: int, body: bytes = b""):
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.headers.get("Authorization"), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def raw_server(behaviour):
    """A server that accepts one connection and does `behaviour(connection)`."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        connection, _ = listener.accept()
        with connection:
            behaviour(connection, done)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join(timeout=10)
        listener.close()


def read_request(connection: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += connection.recv(65536)
    return body


@pytest.mark.parametrize("status, body", [(200, b""), (202, b""), (202, b'{"status":"accepted"}'), (204, b""), (201, b"[1]")])
def test_any_2xx_is_accepted_whatever_its_body(status, body):
    with http_server(status, body) as (url, received):
        assert client(url, "pw", timeout=5).post(JOB)[0] is Delivery.ACCEPTED
    [(path, authorization, sent)] = received
    assert path == f"/v1/jobs/email/{JOB.job_id}"
    assert authorization == "Basic am9iczpwdw=="  # jobs:pw
    assert json.loads(sent) == {"data": {"to": "a@example.com"}, "attempts": 3}


@pytest.mark.parametrize(
    "status, body, outcome",
    [
        (503, b"", Delivery.UNAVAILABLE),
        (500, b'{"title":"Service Unavailable","id":"service_unavailable"}', Delivery.UNAVAILABLE),
        (500, b'{"title":"boom","id":"server_error"}', Delivery.REJECTED),
        (502, b"", Delivery.REJECTED),
        (404, b"not json", Delivery.REJECTED),
        (400, b"", Delivery.REJECTED),
    ],
)
def test_error_answers(status, body, outcome):
    """Any answer but a 2xx or a 503 is a rejection: it proves the request arrived, so it may have been acted on."""
    with http_server(status, body) as (url, _):
        assert client(url, "pw", timeout=5).post(JOB)[0] is outcome


def test_a_refused_connection_is_not_delivered():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome, reason = client(f"http://127.0.0.1:{port}", "pw", timeout=5).post(JOB)
    assert (outcome, reason.split(":")[0]) == (Delivery.NOT_DELIVERED, "ConnectionRefusedError")


def test_a_connect_timeout_is_not_delivered():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        while True:  # fill the accept queue until a connection cannot complete
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        outcome, reason = client(f"http://127.0.0.1:{port}", "pw", timeout=0.2).post(JOB)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert outcome is Delivery.NOT_DELIVERED, reason


def test_a_failed_tls_handshake_is_not_delivered():
    with raw_server(lambda connection, done: connection.sendall(b"HTTP/1.1 400 Not TLS\r\n\r\n")) as url:
        outcome, _ = client(url.replace("http://", "https://"), "pw", timeout=5).post(JOB)
    assert outcome is Delivery.NOT_DELIVERED


def test_no_answer_after_the_request_was_sent_may_have_been_delivered():
    def read_then_hang(connection, done):
        read_request(connection)
        done.wait(10)

    with raw_server(read_then_hang) as url:
        assert client(url, "pw", timeout=0.3).post(JOB)[0] is Delivery.MAYBE_DELIVERED


@pytest.mark.parametrize(
    "partial", [b"", b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n{", b"HTTP/1.1 20"]
)
def test_a_connection_cut_mid_response_may_have_been_delivered(partial):
    def read_then_cut(connection, done):
        read_request(connection)
        connection.sendall(partial)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset

    with raw_server(read_then_cut) as url:
        assert client(url, "pw", timeout=5).post(JOB)[0] is Delivery.MAYBE_DELIVERED


@contextlib.contextmanager
def keep_alive_server():
    """An HTTP/1.1 downstream that answers 202 and keeps connections open: (url, connections seen, bodies posted)."""
    connections, posts = [], []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            connections.append(self.client_address)
            super().setup()

        def do_POST(self):
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", connections, posts
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_posts_from_one_thread_share_a_kept_alive_connection():
    with keep_alive_server() as (url, connections, _):
        downstream = client(url, "pw", timeout=5)
        assert [downstream.post(JOB)[0] for _ in range(5)] == [Delivery.ACCEPTED] * 5
    assert len(connections) == 1


def test_a_kept_connection_the_server_closed_while_idle_is_not_reused():
    """Each answer, then the server closes the connection without saying so: the next POST opens a new one."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed = threading.Event()
    answered = []

    def serve():
        for _ in range(2):
            connection, _ = listener.accept()
            with connection:
                read_request(connection)
                connection.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                answered.append(True)
            closed.set()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        downstream = client(f"http://127.0.0.1:{listener.getsockname()[1]}", "pw", timeout=5)
        assert downstream.post(JOB)[0] is Delivery.ACCEPTED
        closed.wait(5)
        assert downstream.post(JOB)[0] is Delivery.ACCEPTED
    finally:
        thread.join(timeout=10)
        listener.close()
    assert len(answered) == 2


def test_a_redirect_is_not_followed_so_the_credentials_go_nowhere_else():
    with http_server(202) as (elsewhere, received_elsewhere):

        def redirect(connection, done):
            read_request(connection)
            connection.sendall(f"HTTP/1.1 302 Found\r\nLocation: {elsewhere}/steal\r\nContent-Length: 0\r\n\r\n".encode())
            done.wait(10)

        with raw_server(redirect) as url:
            outcome, reason = client(url, "pw", timeout=5).post(JOB)
    assert (outcome, reason) == (Delivery.REJECTED, "HTTP 302")
    assert received_elsewhere == []


def test_a_2xx_answer_is_read_only_up_to_a_limit():
    def huge_answer(connection, done):
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 200_000)
        done.wait(10)  # the rest never comes: a client that reads it all waits out its timeout

    with raw_server(huge_answer) as url:
        assert client(url, "pw", timeout=2).post(JOB)[0] is Delivery.ACCEPTED


def test_a_connection_whose_answer_was_not_read_whole_is_not_reused():
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve():
        first, _ = listener.accept()  # an answer far longer than the client reads, left hanging
        connections.append(first)
        read_request(first)
        # exactly what the client reads, so that nothing unread shows on the socket: only the length tells
        first.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * downstream_module.MAX_ANSWER)
        second, _ = listener.accept()  # the next POST must come on a new connection
        connections.append(second)
        read_request(second)
        second.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve)
    thread.start()
    poster = client(f"http://127.0.0.1:{listener.getsockname()[1]}", "pw", timeout=3)
    try:
        assert poster.post(JOB)[0] is Delivery.ACCEPTED
        assert poster.post(JOB)[0] is Delivery.ACCEPTED
    finally:
        thread.join(timeout=10)
        for conn in connections:
            conn.close()
        listener.close()
    assert len(connections) == 2


# --- one deadline for the whole POST ----------------------------------------------

DRIP_INTERVAL = 0.2  # well under the client's timeout: a per-read timeout never fires


def drip(connection: socket.socket, data: bytes, done: threading.Event) -> float | None:
    """Send `data` a byte at a time; the monotonic time the client closed the connection, None if it never did."""
    for byte in data:
        try:
            connection.sendall(bytes([byte]))
        except OSError:
            return time.monotonic()
        readable, _, _ = select.select([connection], [], [], DRIP_INTERVAL)
        if readable and not connection.recv(1):  # nothing more is sent: readable means closed
            return time.monotonic()
        if done.is_set():
            return None
    done.wait(10)
    return None


@pytest.mark.parametrize(
    "head, dripped",
    [
        (b"", b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"),  # the status line and headers
        (b"HTTP/1.1 202 Accepted\r\nContent-Length: 60\r\n\r\n", b'{"status":"accepted"}' + b" " * 39),  # the body
    ],
)
def test_a_dripping_answer_is_cut_off_at_the_timeout_and_its_connection_closed(head, dripped):
    closed_at = []

    def answer_slowly(connection, done):
        read_request(connection)
        connection.sendall(head)
        closed_at.append(drip(connection, dripped, done))

    timeout = 1.0
    with raw_server(answer_slowly) as url:
        started = time.monotonic()
        outcome, reason = client(url, "pw", timeout=timeout).post(JOB)
        took = time.monotonic() - started
        assert (outcome, downstream_module.error_kind(outcome, reason)) == (Delivery.MAYBE_DELIVERED, "timeout")
        assert timeout <= took < timeout + 1.0, took  # the whole answer would take 8 s or more
        wait_until(lambda: closed_at, "the downstream to see the connection closed", timeout=5)
    assert closed_at[0] is not None and closed_at[0] - started < timeout + 1.0


def test_a_slow_request_send_counts_against_the_same_deadline():
    """A downstream that reads nothing: the send blocks once the buffers fill, and the deadline ends it."""

    def read_nothing(connection, done):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        done.wait(10)

    big = dataclasses.replace(JOB, data={"blob": "x" * 20_000_000})
    with raw_server(read_nothing) as url:
        started = time.monotonic()
        outcome, _ = client(url, "pw", timeout=1.0).post(big)
        took = time.monotonic() - started
    assert outcome is Delivery.MAYBE_DELIVERED
    assert took < 2.5, took


# --- connections: none leaks, and a kept one closed under our feet is retried once ---------


@contextlib.contextmanager
def closing_server():
    """A fast downstream that answers 202 with `Connection: close` to every POST, on a new connection each."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.settimeout(0.05)
    stop = threading.Event()
    answered = [0]

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                read_request(connection)
                answered[0] += 1  # before the answer: the client may count as soon as it has it
                connection.sendall(b"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", answered
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def live_connection_objects() -> int:
    gc.collect()
    return sum(isinstance(thing, http.client.HTTPConnection) for thing in gc.get_objects())


def test_posts_to_a_downstream_that_closes_every_connection_keep_memory_flat():
    posts = 3000
    with closing_server() as (url, answered):
        poster = client(url, "pw", timeout=5)
        assert poster.post(JOB)[0] is Delivery.ACCEPTED
        before = live_connection_objects()
        tracemalloc.start()
        try:
            for _ in range(posts // 10):
                poster.post(JOB)
            warm, _ = tracemalloc.get_traced_memory()
            for _ in range(posts):
                poster.post(JOB)
            grown = tracemalloc.get_traced_memory()[0] - warm
        finally:
            tracemalloc.stop()
        after = live_connection_objects()
        assert answered[0] == 1 + posts + posts // 10
    assert after - before <= 1, (before, after)  # each connection is gone once closed: not one more per POST
    assert grown < 100_000, grown  # about 500 bytes a connection when they leaked: 1.5 MB here


def test_a_kept_connection_closed_just_as_the_next_post_is_sent_is_retried_once_on_a_new_one():
    """The downstream closes a kept-alive connection as the next request arrives, unread (an idle timeout that
    fires between our idle check and our send): not a byte of an answer came, so the POST is sent again."""
    listener = socket.create_server(("127.0.0.1", 0))
    requests = []  # (connection number, request body) of each request the downstream read

    def serve():
        first, _ = listener.accept()
        with first:
            requests.append((1, read_request(first)))
            first.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            select.select([first], [], [], 10)  # the next request is here: close, without reading it
        listener.settimeout(3)
        try:
            second, _ = listener.accept()
        except TimeoutError:
            return  # not sent again
        with second:
            requests.append((2, read_request(second)))
            second.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        poster = client(f"http://127.0.0.1:{listener.getsockname()[1]}", "pw", timeout=5)
        assert poster.post(JOB)[0] is Delivery.ACCEPTED
        second_job = dataclasses.replace(JOB, attempts=2)
        assert poster.post(second_job) == (Delivery.ACCEPTED, "HTTP 202")
    finally:
        thread.join(timeout=10)
        listener.close()
    assert [(number, json.loads(body)["attempts"]) for number, body in requests] == [(1, 3), (2, 2)]


@pytest.mark.parametrize("answer", [b"HTTP/1.1 20", b"HTTP/1.1 202 Accepted\r\nContent-Length: 10\r\n\r\n{"])
def test_a_kept_connection_cut_after_part_of_an_answer_is_not_retried(answer):
    """A byte of an answer proves the request arrived: never sent again, even on a reused connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve():
        first, _ = listener.accept()
        connections.append(first)
        read_request(first)
        first.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        read_request(first)
        first.sendall(answer)
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        first.close()
        listener.settimeout(1.0)
        with contextlib.suppress(TimeoutError):
            connections.append(listener.accept()[0])  # a retry would come here

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        poster = client(f"http://127.0.0.1:{listener.getsockname()[1]}", "pw", timeout=5)
        assert poster.post(JOB)[0] is Delivery.ACCEPTED
        assert poster.post(JOB)[0] is Delivery.MAYBE_DELIVERED
    finally:
        thread.join(timeout=10)
        for connection in connections:
            connection.close()
        listener.close()
    assert len(connections) == 1


@pytest.mark.parametrize(
    "outcome, reason, kind",
    [
        (Delivery.REJECTED, "HTTP 500", "http_5xx"),
        (Delivery.REJECTED, "HTTP 404", "http_4xx"),
        (Delivery.REJECTED, "HTTP 302", "http_3xx"),
        (Delivery.UNAVAILABLE, "HTTP 503", "unavailable"),
        (Delivery.UNAVAILABLE, "HTTP 500", "unavailable"),  # Rickover's service_unavailable body
        (Delivery.NOT_DELIVERED, "ConnectionRefusedError: [Errno 111] Connection refused", "connect"),
        (Delivery.NOT_DELIVERED, "TimeoutError: timed out", "connect"),
        (Delivery.MAYBE_DELIVERED, "TimeoutError", "timeout"),
        (Delivery.MAYBE_DELIVERED, "RemoteDisconnected", "cut_off"),
    ],
)
def test_each_failed_post_is_counted_under_its_kind(outcome, reason, kind):
    assert downstream_module.error_kind(outcome, reason) == kind


def test_a_kept_connection_on_a_descriptor_past_1023_is_reused_like_any_other():
    """select() refuses descriptors past 1023: the idle check must not, or the next POST fails unsent."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no descriptor past 1023")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the next sockets get descriptors past 1023
    try:
        with keep_alive_server() as (url, connections, posts):
            downstream = client(url, "pw", timeout=5)
            assert [downstream.post(JOB)[0] for _ in range(2)] == [Delivery.ACCEPTED] * 2
        assert len(posts) == 2 and len(connections) == 1  # the second POST reused the first one's connection
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_kept_connection_closed_cleanly_after_the_request_was_read_is_not_sent_again():
    """A downstream that reads the request on a kept connection and closes without answering may have acted on it:
    "may have been delivered", never a second POST (an at_most_once job must not arrive twice)."""
    listener = socket.create_server(("127.0.0.1", 0))
    requests = []

    def serve():
        first, _ = listener.accept()
        with first:
            requests.append(read_request(first))
            first.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            requests.append(read_request(first))  # read whole, then a clean close (FIN), no answer
            first.shutdown(socket.SHUT_RDWR)
        listener.settimeout(2)
        with contextlib.suppress(TimeoutError):
            second, _ = listener.accept()
            with second:
                requests.append(read_request(second))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        poster = client(f"http://127.0.0.1:{listener.getsockname()[1]}", "pw", timeout=5)
        assert poster.post(JOB)[0] is Delivery.ACCEPTED
        assert poster.post(dataclasses.replace(JOB, attempts=2))[0] is Delivery.MAYBE_DELIVERED
    finally:
        thread.join(timeout=10)
        listener.close()
    assert not thread.is_alive()
    assert [json.loads(body)["attempts"] for body in requests] == [3, 2]  # the second job arrived once

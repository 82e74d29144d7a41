"""The downstream client over real sockets: each way a POST can end, told apart by type."""

import contextlib
import json
import socket
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

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
        (500, b'{"title":"boom","id":"server_error"}', Delivery.NOT_DELIVERED),
        (404, b"not json", Delivery.NOT_DELIVERED),
        (400, b"", Delivery.NOT_DELIVERED),
    ],
)
def test_error_answers(status, body, outcome):
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


def test_posts_from_one_thread_share_a_kept_alive_connection():
    connections = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            connections.append(self.client_address)
            super().setup()

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        downstream = client(f"http://127.0.0.1:{server.server_address[1]}", "pw", timeout=5)
        assert [downstream.post(JOB)[0] for _ in range(5)] == [Delivery.ACCEPTED] * 5
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
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
    assert (outcome, reason) == (Delivery.NOT_DELIVERED, "HTTP 302")
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

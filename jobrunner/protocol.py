"""HTTP/1.1 on the stdlib's HTTPServer: parsing, limits, keep-alive, bodies, and a graceful stop.

This is the part a newcomer should rarely need to read: server.py holds the
routes. `ProtocolHandler` reads one request at a time from a connection, hands
it to `dispatch()` (the subclass's), and writes the answer in one send();
`ProtocolServer` accepts connections, bounds them, serves each on one of its
long-lived `ConnectionThreads`, drops clients too slow to send a request, and
stops without cutting off a request in flight.

Every error this layer answers is the API's JSON error body, never an HTML page.
"""

import contextlib
import errno
import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

log = logging.getLogger(__name__)

QUIET_BEFORE_CLOSE = 0.2  # seconds an idle kept-alive connection must be quiet before a stopping server closes it
MAX_HEADERS = 100  # the stdlib's limits
MAX_LINE = 65536
# After refusing a request whose body was not read (413, 401...), read and discard up to this
# much of it, for up to this long, before closing: closing with unread data resets the
# connection, and a client still writing would see the reset instead of the answer.
LINGER_BYTES = 4 * 2**20
LINGER_SECONDS = 2.0
# A new connection must send its first byte within this (or the read timeout, if shorter):
# a client that connects and says nothing is not waited on for the whole read timeout.
FIRST_BYTE_TIMEOUT = 2.0
# accept() failing for want of file descriptors: the listening socket stays readable, so
# the accept loop leaves it alone this long (else it would spin a core) before trying again.
ACCEPT_BACKOFF = 0.5
# A connection thread with no connection to serve for this long ends: a burst of connections
# leaves no crowd of idle threads behind, and a steady load starts none.
IDLE_THREAD_SECONDS = 60.0


class Headers(dict):
    """Request headers by lower-case name; `get` takes any case."""

    def add(self, name: str, value: str) -> bool:
        """Add one header line; False when it contradicts an earlier one (two different lengths)."""
        key, value = name.strip().lower(), value.strip()
        if key in self and key in ("content-length", "transfer-encoding") and self[key] != value:
            return False
        self[key] = f"{self[key]}, {value}" if key in self and key not in ("content-length",) else value
        return True

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)


class HttpError(Exception):
    """An error answer: status, Rickover's error id, a title, and optional detail."""

    def __init__(self, status: int, error_id: str, title: str, detail: str = "", headers: dict | None = None, instance: str = ""):
        super().__init__(title)
        self.status, self.error_id, self.title, self.detail = status, error_id, title, detail
        self.headers = headers or {}
        self.instance = instance


def is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


class ProtocolHandler(BaseHTTPRequestHandler):
    """One connection: requests read one at a time, each answered by `dispatch()`."""

    protocol_version = "HTTP/1.1"
    # The stdlib writes headers and body in separate send()s: without TCP_NODELAY a
    # kept-alive connection stalls ~40 ms per response (Nagle meets delayed ACK).
    disable_nagle_algorithm = True
    server_version = "jobrunner/0.1"
    sys_version = ""
    server: "ProtocolServer"
    last_status = 0  # of the response sent last, for the metrics
    # Where the connection is, for the server's reaper and its graceful stop (monotonic seconds):
    waiting_since: float | None = None  # waiting for the first byte of a request
    lingering_since: float | None = None  # answered, discarding a body before closing: the first to go when full
    head_since: float | None = None  # from that byte until the request line and headers are read
    body_since: float | None = None  # while the body is read
    requests_begun = 0  # 0: a fresh connection, yet to send its first request
    body_read = True  # False while a request body waits unread on the connection

    def setup(self) -> None:
        self.timeout = self.server.read_timeout
        super().setup()

    def handle(self) -> None:
        self.server.connections.attach(self)
        try:
            super().handle()
            if not self.body_read:
                self._discard_unread_body()
        except ConnectionError:
            pass  # the client reset or half-closed the connection: there is no one left to answer
        finally:
            self.server.connections.detach(self)

    def _discard_unread_body(self) -> None:
        """Lingering close: the answer and a FIN first, then the body the client may still be sending, within bounds."""
        self.lingering_since = time.monotonic()
        self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
        left = self._unread_length()
        deadline = time.monotonic() + LINGER_SECONDS
        with contextlib.suppress(OSError):  # a timeout or a reset ends it as well as the end of the body
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)

    def _unread_length(self) -> int:
        """How much of the body to discard: what Content-Length announced (chunked: until the end), within LINGER_BYTES."""
        text = self.headers.get("Content-Length", "")
        if self.headers.get("Transfer-Encoding") or not is_number(text) or len(text) > 12:
            return LINGER_BYTES
        return min(int(text), LINGER_BYTES)

    def handle_one_request(self) -> None:
        """Wait for a request, read its head, answer it; the stdlib's, with the connection's state kept."""
        if not self._request_begins():
            self.close_connection = True
            return
        self.requests_begun += 1
        self.head_since = time.monotonic()
        try:
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
            if len(self.raw_requestline) > MAX_LINE:
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(414, "Request line too long")
                return
            if not self.parse_request():
                return
            self.head_since = None
            self._answer()
        except TimeoutError:
            self.close_connection = True  # a silent client: drop it, no one is reading an answer
        finally:
            self.head_since = self.body_since = None

    def _answer(self) -> None:
        """Answer the request whose head has been read, in one of the server's request slots."""
        if not self.server.request_slots.acquire(blocking=False):
            self.close_connection = True
            self.send_error_answer(HttpError(503, "service_unavailable", "Too many requests at once; try again shortly", headers={"Retry-After": "1"}))
            self.server.count_refused()
            return
        try:
            self.dispatch()
            self.wfile.flush()
        finally:
            self.server.request_slots.release()

    def _request_begins(self) -> bool:
        """Wait for the first byte of the next request: False when the client closes or stays silent too long.

        A kept-alive connection may wait the read timeout; a new one, only until its first byte is due.
        """
        self.waiting_since = time.monotonic()
        self.connection.settimeout(self.server.read_timeout if self.requests_begun else self.server.first_byte_timeout)
        try:
            return bool(self.rfile.peek(1))  # buffered bytes, or one read from the socket
        except TimeoutError:
            return False
        finally:
            self.waiting_since = None
            self.connection.settimeout(self.server.read_timeout)

    def parse_request(self) -> bool:
        """Parse the request line and headers; the stdlib's email-based parser costs a fifth of a request."""
        self.body_read = True  # nothing to read until the request is understood
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(400, "Bad request line", "Send METHOD PATH HTTP/1.1")
            return False
        self.command, self.path, self.request_version = words
        headers = Headers()
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                self.send_error(431, "Header line too long")
                return False
            if not line:  # the connection ended inside the headers: nothing to answer, nothing to do
                self.close_connection = True
                return False
            if line in (b"\r\n", b"\n"):
                break
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if not colon or not name.strip() or not headers.add(name, value):
                self.send_error(400, "Bad header", f"Cannot understand header {name.strip()[:100]!r}")
                return False
        else:
            self.send_error(431, "Too many headers")
            return False
        self.headers = headers
        connection = headers.get("Connection", "").lower()
        self.close_connection = connection == "close" if self.request_version == "HTTP/1.1" else connection != "keep-alive"
        self.body_read = "Content-Length" not in headers and "Transfer-Encoding" not in headers
        if headers.get("Expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def dispatch(self) -> None:
        """Answer the request whose head has been read, whatever its method (an unknown one is the routes' 405, not a 501)."""
        raise NotImplementedError

    # --- bodies and answers ---

    def read_body(self) -> bytes:
        """The request's body, framed by Content-Length and at most the server's max_body_bytes."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(411, "length_required", "Send the body with a Content-Length, not chunked")
        text = self.headers.get("Content-Length", "0")
        if not is_number(text):
            self.close_connection = True
            raise HttpError(400, "invalid_request", "Invalid Content-Length header")
        length = int(text) if len(text) <= 12 else 2**63
        if length > self.server.max_body_bytes:
            self.close_connection = True
            raise HttpError(413, "entity_too_large", "Request body too large", f"The limit is {self.server.max_body_bytes} bytes")
        self.body_since = time.monotonic()
        body = self.rfile.read(length)
        self.body_since = None
        self.body_read = len(body) == length
        if len(body) < length:
            self.close_connection = True
            raise HttpError(400, "invalid_request", "The request body ended early")
        return body

    def send_json(self, status: int, value: Any) -> None:
        self.send_answer(status, json.dumps(value, separators=(",", ":")).encode() + b"\n", {"Content-Type": "application/json; charset=utf-8"})

    def send_error_answer(self, error: HttpError) -> None:
        body = {"title": error.title, "id": error.error_id, "status_code": error.status}
        if error.detail:
            body["detail"] = error.detail
        body["instance"] = error.instance or getattr(self, "path", "").partition("?")[0]
        headers = {"Content-Type": "application/json; charset=utf-8", **error.headers}
        self.send_answer(error.status, json.dumps(body).encode() + b"\n", headers)

    def send_answer(self, status: int, body: bytes, headers: dict) -> None:
        if not self.body_read:
            self.close_connection = True  # an unread body would be taken for the next request
        if self.server.stopping:
            self.close_connection = True
        self.last_status = status
        lines = [
            f"{self.protocol_version} {status} {HTTPStatus(status).phrase}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Length: {len(body)}",
            "Strict-Transport-Security: max-age=31536000; includeSubDomains; preload",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")  # else an HTTP/1.0 keep-alive client waits for a close
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + (b"" if self.command == "HEAD" else body))  # one send()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the stdlib finds while parsing (bad request line, huge headers): JSON, never a 5xx."""
        if code >= 500:
            code = 400
        self.close_connection = True
        self.body_read = True
        self.send_error_answer(HttpError(code, "invalid_request", message or HTTPStatus(code).phrase, explain or ""))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class Connections:
    """The open connections, at most `limit`: when full, the one that has waited on its client longest makes room.

    Entries are made by the accept loop (a connection's handler does not exist
    yet) and given their handler when a connection thread takes it.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[socket.socket, ProtocolHandler | None] = {}

    def admit(self, request: socket.socket) -> bool:
        """Make room for a new connection; False when every open one is at work."""
        with self._lock:
            if len(self._open) >= self.limit:
                waiting = [(_waiting_on_client_since(h), id(h), h) for h in self._open.values() if h is not None]
                oldest = min(((since, key, h) for since, key, h in waiting if since != float("inf")), default=None)
                if oldest is None:
                    return False
                del self._open[oldest[2].connection]  # its thread ends once hung up; it no longer counts
                hang_up(oldest[2])
            self._open[request] = None
            return True

    def attach(self, handler: ProtocolHandler) -> None:
        with self._lock:
            if handler.connection in self._open:
                self._open[handler.connection] = handler

    def detach(self, handler: ProtocolHandler) -> None:
        with self._lock:
            if self._open.get(handler.connection) is handler:
                self._open[handler.connection] = None

    def release(self, request: socket.socket) -> None:
        with self._lock:
            self._open.pop(request, None)

    def handlers(self) -> list[ProtocolHandler]:
        with self._lock:
            return [handler for handler in self._open.values() if handler is not None]

    def __len__(self) -> int:
        return len(self._open)


class ConnectionThreads:
    """Long-lived threads that each serve one connection at a time, handed to them through a queue.

    A thread started per connection (ThreadingMixIn's model) made Thread.start a
    tenth of the server's CPU when clients open a connection per request; here a
    new connection costs a queue put. A thread is started only when none is free,
    so a connection never waits behind another (a slow or silent client holds its
    own thread, never the queue), up to `most`, the server's connection limit. A
    thread idle for IDLE_THREAD_SECONDS ends.
    """

    def __init__(self, serve: Callable[[socket.socket, Any], None], most: int):
        self._serve = serve
        self._most = most
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._free = 0  # threads not serving a connection, less the connections queued for them

    def submit(self, request: socket.socket, client_address: Any) -> None:
        """Serve `request` on a free thread, or on a new one when none is free."""
        with self._lock:
            if self._free <= 0 and len(self._threads) < self._most:
                thread = threading.Thread(target=self._run, name="http-idle", daemon=True)  # close() joins them
                thread.start()
                self._threads.add(thread)
                self._free += 1
            # Past `most`, the connection waits for a thread: only an evicted connection's (Connections.admit),
            # which ends as soon as it sees its socket shut down.
            self._free -= 1
            self._queue.put((request, client_address))

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                work = self._queue.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                if self._retire(me):
                    return
                continue
            if work is None:  # close()
                return
            me.name = "http-connection"  # what a thread dump (and the tests) see while it serves one
            try:
                self._serve(*work)
            except BaseException:  # _serve handles errors: this thread is ending, and no connection may count on it
                with self._lock:
                    self._threads.discard(me)
                raise
            with self._lock:
                self._free += 1
            me.name = "http-idle"  # after: once no thread is named serving, the next connection finds one free

    def _retire(self, thread: threading.Thread) -> bool:
        """End an idle thread, unless a queued connection counts on it."""
        with self._lock:
            if self._free <= 0:
                return False
            self._free -= 1
            self._threads.discard(thread)
            return True

    def close(self) -> None:
        """Let every thread finish the connection it serves (and those queued), then end them and wait for them."""
        with self._lock:
            threads, self._most = list(self._threads), 0
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()


class ProtocolServer(HTTPServer):
    """HTTPServer on an already-bound socket: request slots, bounded connections, a graceful stop.

    `max_requests` requests are answered at once (more get a quick 503); an idle
    connection holds no request slot, only one of the
    `connections_per_request_slot` x `max_requests` connections kept open, and
    the connection thread serving it.
    """

    connections_per_request_slot = 4  # each open connection holds a thread: this bounds them

    def __init__(self, sock: socket.socket, handler: type[ProtocolHandler], read_timeout: float, max_requests: int, max_body_bytes: int):
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        # Other servers (more processes, or a reload's next generation) accept on the same
        # socket: all wake for a connection and one takes it; the others' accept() must
        # come back empty-handed, not block until the next connection (deaf to their stop).
        sock.setblocking(False)
        self.socket = sock
        self.server_address = sock.getsockname()
        self.read_timeout = read_timeout
        self.first_byte_timeout = min(FIRST_BYTE_TIMEOUT, read_timeout)
        self.max_body_bytes = max_body_bytes
        self.stopping = False
        self.request_slots = threading.BoundedSemaphore(max_requests)
        self.connections = Connections(max_requests * self.connections_per_request_slot)
        self.connection_threads = ConnectionThreads(self._serve_connection, self.connections.limit)
        self._next_slow_check = 0.0
        self._wake_up, self._woken = socket.socketpair()  # a stop wakes the accept loop at once
        self._stop_accepting = False
        self._loop_ended = threading.Event()
        self._loop_ended.set()  # until serve_forever runs
        self._accept_again_at = 0.0
        self._out_of_files = False  # said once per episode
        self._spare_fd: int | None = _spare_fd()  # given up to accept one connection and refuse it

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept connections until shutdown(), which wakes it at once; the stdlib's loop only polls for it."""
        self._loop_ended.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._woken, selectors.EVENT_READ)
                listening = False
                while not self._stop_accepting:
                    pause = self._accept_again_at - time.monotonic()
                    if listening and pause > 0:
                        selector.unregister(self.socket)
                    elif not listening and pause <= 0:
                        selector.register(self.socket, selectors.EVENT_READ)
                    listening = pause <= 0
                    ready = selector.select(poll_interval if listening else min(poll_interval, pause))
                    if self._stop_accepting:
                        break
                    if any(key.fileobj is self.socket for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._loop_ended.set()

    def shutdown(self) -> None:
        """Stop the accept loop and wait for it: not one connection more is accepted once this returns."""
        self._stop_accepting = True
        with contextlib.suppress(OSError):
            self._wake_up.send(b"x")
        self._loop_ended.wait()

    def get_request(self):
        """accept(); at the open-file limit, refuse what waits with the spare descriptor, say so once, and pause."""
        try:
            request = super().get_request()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                self._at_open_file_limit(error)
            raise  # the stdlib's loop ignores it: another server took the connection, or there was none
        if self._out_of_files:
            log.warning("accepting connections again")
            self._out_of_files = False
        return request

    def _at_open_file_limit(self, error: OSError) -> None:
        if not self._out_of_files:
            log.warning(
                "cannot accept connections: out of open files (%s); refusing new ones with 503 and pausing %.1f s between tries",
                error.strerror, ACCEPT_BACKOFF,
            )
            self._out_of_files = True
        self._refuse_waiting_connections()
        self._accept_again_at = time.monotonic() + ACCEPT_BACKOFF

    def _refuse_waiting_connections(self, most: int = 64) -> None:
        """Answer connections waiting in the listen queue with the quick 503, each on the spare descriptor."""
        for _ in range(most):
            if self._spare_fd is None:
                break
            os.close(self._spare_fd)
            try:
                request, _ = self.socket.accept()
            except OSError:
                break  # none left, or the descriptor went to another thread
            finally:
                self._spare_fd = None
            self._refuse_busy(request)
            self._spare_fd = _spare_fd()
        if self._spare_fd is None:
            self._spare_fd = _spare_fd()

    def server_close(self) -> None:
        super().server_close()
        self.connection_threads.close()  # in-flight requests finish: what ThreadingMixIn's block_on_close did
        self._wake_up.close()
        self._woken.close()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    def count_refused(self) -> None:
        """A connection refused for want of a slot: the subclass counts it."""

    def service_actions(self) -> None:
        """Between polls of the accept loop: now and then, drop connections whose request is too slow to arrive.

        The read timeout bounds each silence, so a client that sends a byte now and
        then would otherwise hold its thread for ever (slowloris). A request's head
        gets twice the read timeout from its first byte, and so does its body's
        read; a handler at work is never timed.
        """
        now = time.monotonic()
        if now < self._next_slow_check:
            return
        self._next_slow_check = now + 1.0
        for handler in self.connections.handlers():
            for since in (handler.head_since, handler.body_since):
                if since is not None and now - since > 2 * self.read_timeout:
                    hang_up(handler)

    def handle_error(self, request, client_address) -> None:
        """A bug, not the client's doing (handlers answer those): once, in the log, with its traceback."""
        log.exception("unhandled error serving %s:%s", *client_address[:2])

    def process_request(self, request, client_address) -> None:
        if not self.connections.admit(request):
            self._refuse_busy(request)
            return
        try:
            self.connection_threads.submit(request, client_address)
        except BaseException:
            self.connections.release(request)
            raise

    def _serve_connection(self, request: socket.socket, client_address) -> None:
        """One connection, from its first request to its close, on a connection thread (the stdlib's process_request_thread)."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.connections.release(request)

    def _refuse_busy(self, request: socket.socket) -> None:
        request.settimeout(1.0)  # a few bytes into an empty send buffer; a client that never reads must not block the accept loop
        body = json.dumps({"title": "Too many connections; try again shortly", "id": "service_unavailable", "status_code": 503}).encode() + b"\n"
        head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        try:
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)
        self.count_refused()

    def stop_serving(self, within: float) -> None:
        """Stop accepting, let requests in flight finish, close connections as soon as they are quiet.

        A connection that is busy gets `Connection: close` with its next answer. A
        kept-alive one waiting for its next request is closed once quiet for
        QUIET_BEFORE_CLOSE: a client that reuses it at once is answered rather than
        cut off (the race every keep-alive server has, narrowed to clients silent for
        that long). A request whose head is still incomplete after that long is a
        stalled one and is dropped. After `within` seconds whatever is left is hung up.
        """
        self.stopping = True
        self.shutdown()
        deadline = time.monotonic() + within
        while len(self.connections) and time.monotonic() < deadline:
            for handler in self.connections.handlers():
                if _quiet_since(handler) <= time.monotonic() - QUIET_BEFORE_CLOSE:
                    hang_up(handler)
            time.sleep(QUIET_BEFORE_CLOSE / 4)  # a bounded wait for connections to finish, not a test
        for handler in self.connections.handlers():
            hang_up(handler)
        self.server_close()


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # at the limit already: the next _refuse_waiting_connections tries again


def _waiting_on_client_since(handler: ProtocolHandler) -> float:
    """Since when a connection has waited for its client's request or head (inf: it is at work; -inf: lingering)."""
    if handler.lingering_since is not None:
        return float("-inf")  # its answer is sent: closing it costs its client least
    for since in (handler.waiting_since, handler.head_since):
        if since is not None:
            return since
    return float("inf")


def _quiet_since(handler: ProtocolHandler) -> float:
    """Since when a connection has waited on its client with nothing to do (inf: at work, or too new to judge).

    A fresh connection's first request may be on its way (a client on a loaded
    machine connects, then is scheduled out): it gets its timeout to arrive.
    """
    waiting, head = handler.waiting_since, handler.head_since
    if handler.lingering_since is not None:
        return handler.lingering_since
    if waiting is not None and handler.requests_begun:
        return waiting
    return head if head is not None else float("inf")


def hang_up(handler: ProtocolHandler) -> None:
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)

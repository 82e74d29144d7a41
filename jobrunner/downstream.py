"""The downstream client: POST a job to the service that runs it, with urllib, and say what became of it.

What we send is what Rickover sent (CONTRACT.md §6.3): `POST <DOWNSTREAM_URL>/v1/jobs/<name>/<id>`,
body exactly `{"data": ..., "attempts": N}`, HTTP Basic auth user `jobs`; with signing
secrets, also the Standard Webhooks headers (`signing.py`; webhook-id `<job id>-<attempts>`,
the same for every POST of one attempt), and a type's callback token when it has one.
A job type may have a base URL and a timeout of its own (`post`'s `base_url`,
`timeout`); connections are kept per thread and (scheme, host, port), so types sent
to different services share nothing but the dispatch threads.
Failures are told apart by their type, never by their message: an attempt that
certainly never reached the downstream may be sent again; one that may have
reached it must wait for its callback; an error answer proves that it arrived.
The timeout is one deadline for the whole POST, not for each read: a downstream
that drips its answer is cut off like one that says nothing.
"""

import base64
import dataclasses
import enum
import http.client
import io
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from . import signing
from .models import CALLBACK_TOKEN_HEADER, QueuedJob

USER = "jobs"


class NotConnected(OSError):
    """Connecting failed (refused, unreachable, timed out, TLS handshake): not a byte of the request was sent."""


class _Exchange:
    """One POST's deadline, and how many bytes of its answer have come."""

    def __init__(self, timeout: float):
        self.deadline = time.monotonic() + timeout
        self.answered = 0

    def time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the downstream did not answer in time")
        return left


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each allowed only the exchange's time left, so that a peer dripping bytes meets the deadline."""

    def __init__(self, sock: socket.socket, exchange: _Exchange):
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # counted by the socket: it stays open until this closes
        self._exchange = exchange

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(self._exchange.time_left())
        count = self._raw.readinto(buffer)
        self._exchange.answered += count or 0
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What an HTTPResponse reads its answer from: the connection's socket, under the exchange's deadline."""

    def __init__(self, sock: socket.socket, exchange: _Exchange):
        self._sock, self._exchange = sock, exchange

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._exchange))


class _DeadlineConnection:
    """The part our http and https connections share: the whole exchange (connect, send, the
    answer) has one deadline, set by `start`; a socket timeout alone bounds only each read."""

    exchange: _Exchange  # set by start, before each request

    def start(self, timeout: float) -> _Exchange:
        self.exchange = _Exchange(timeout)
        return self.exchange

    def connect(self) -> None:
        try:
            self.timeout = self.exchange.time_left()  # the TLS handshake too: CPython gives it one deadline
            super().connect()
        except OSError as error:  # ssl.SSLError included: the handshake is part of connecting
            raise NotConnected(f"{type(error).__name__}: {error}") from error

    def send(self, data) -> None:
        if self.sock is None:
            self.connect()
        self.sock.settimeout(self.exchange.time_left())  # sendall keeps to one timeout for all its data
        super().send(data)

    def response_class(self, sock, *args, **kwargs) -> http.client.HTTPResponse:
        # http.client makes each answer with self.response_class(self.sock, ...)
        return http.client.HTTPResponse(_DeadlineSocket(sock, self.exchange), *args, **kwargs)


class _HTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


@dataclasses.dataclass
class _Kept:
    conn: _HTTPConnection | _HTTPSConnection
    response: http.client.HTTPResponse  # its last answer
    used_at: float  # time.monotonic()

    def reusable(self) -> bool:
        return (
            self.conn.sock is not None
            and self.response.isclosed()  # read whole: http.client closes an answer at its end
            and time.monotonic() - self.used_at <= MAX_IDLE
            and not _readable(self.conn.sock)  # readable while idle: the server closed it
        )


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has something to read now; poll, not select, which refuses descriptors past 1023."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _NoAnswer(Exception):
    """A reused connection failed before a byte of the answer came."""


class _KeepAliveHandler(urllib.request.BaseHandler):
    """urllib's http and https opener, keeping one connection per thread and host alive.

    urllib's own handlers open and close a connection per request; for a worker
    that POSTs job after job that is most of the cost, on both sides. A kept
    connection is reused only if its last answer was read whole and it has been
    idle less than MAX_IDLE (well under a server's idle timeout). Failing to
    connect raises NotConnected (nothing sent). A reused connection reset before
    a byte of the answer came was closed by the server as idle with our request
    unread (no idle check can close that race): the request is sent again, once,
    on a new connection. A clean close with no answer is not resent: a
    downstream may close that way after reading the request, and an
    `at_most_once` job must not reach it twice. Any other failure after
    connecting counts as "may have been delivered".
    """

    handler_order = 100  # before urllib's own http/https handlers, which build_opener adds too

    def __init__(self):
        # Only the connections kept for a thread's next POST: one that fails, or is
        # not kept, is closed and forgotten, so memory stays flat however many come and go.
        self._kept: dict[tuple[int, str, str], _Kept] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def release(self, req: urllib.request.Request) -> None:
        """This thread's request is over: keep its connection only if the answer was read whole."""
        key = self._key(req)
        with self._lock:
            kept = self._kept.get(key)
            if kept is None or kept.response.isclosed():
                return
            del self._kept[key]
        kept.conn.close()

    def close_all(self) -> None:
        with self._lock:
            kept, self._kept = self._kept, {}
        for connection in kept.values():
            connection.conn.close()

    def http_open(self, req):
        return self._open(_HTTPConnection, req)

    def https_open(self, req):
        return self._open(_HTTPSConnection, req)

    def _open(self, connection_class, req):
        key = self._key(req)
        self._sweep()
        with self._lock:
            kept = self._kept.pop(key, None)
        deadline = time.monotonic() + req.timeout
        if kept is not None and kept.reusable():
            try:
                return self._exchange(kept.conn, req, deadline - time.monotonic(), reused=True)
            except _NoAnswer:
                pass
        elif kept is not None:
            kept.conn.close()
        return self._exchange(connection_class(req.host, timeout=req.timeout), req, deadline - time.monotonic())

    def _exchange(self, conn, req, timeout: float, reused: bool = False):
        """Send the request on `conn` and read the answer's head, within `timeout` for both."""
        exchange = conn.start(timeout)
        try:
            conn.request(req.get_method(), req.selector, req.data, {**req.unredirected_hdrs, **req.headers})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as error:
            conn.close()
            # Reset with no answer: the downstream closed the kept connection with our request
            # unread (its idle timeout fired as we sent). A clean close instead (RemoteDisconnected)
            # may follow a request it read and acted on: that one "may have been delivered".
            reset = isinstance(error, (ConnectionResetError, BrokenPipeError)) and not isinstance(error, http.client.RemoteDisconnected)
            if reused and reset and exchange.answered == 0:
                raise _NoAnswer from error
            raise urllib.error.URLError(error) from error
        response.url, response.msg = req.get_full_url(), response.reason
        with self._lock:
            self._kept[self._key(req)] = _Kept(conn, response, time.monotonic())
        return response

    def _sweep(self) -> None:
        """Close the kept connections idle past MAX_IDLE, which no POST would reuse: with job types sent
        to many hosts, a thread keeps only those it used lately, not one per host it ever sent to."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_sweep:
                return
            self._next_sweep = now + MAX_IDLE
            # an answer still being read (not closed) belongs to its thread's POST in progress
            idle = [key for key, kept in self._kept.items() if kept.response.isclosed() and now - kept.used_at > MAX_IDLE]
            closing = [self._kept.pop(key) for key in idle]
        for kept in closing:
            kept.conn.close()

    @staticmethod
    def _key(req: urllib.request.Request) -> tuple[int, str, str]:
        return threading.get_ident(), req.type, req.host  # host: name and port, as the URL gives them


MAX_IDLE = 1.0
MAX_ANSWER = 65536  # bytes of the downstream's answer read, at most


class Delivery(enum.Enum):
    ACCEPTED = "accepted"  # any 2xx: wait for the callback
    NOT_DELIVERED = "not delivered"  # refused or unreachable: never arrived, it may be sent again
    REJECTED = "rejected"  # any other answer (3xx, 4xx, 5xx but 503): it arrived, so it may have been acted on
    MAYBE_DELIVERED = "maybe delivered"  # timed out or cut off after sending: wait for the callback, never resend
    UNAVAILABLE = "unavailable"  # 503 or Rickover's service_unavailable: resend without using an attempt


class Downstream:
    """POSTs jobs to `base_url` within `timeout`, signed with `signing_secrets` (none: unsigned),
    unless a job type has its own base URL, timeout or secrets (`post`)."""

    def __init__(self, base_url: str, password: str, timeout: float, signing_secrets: Sequence[str] = ()):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.signing_secrets = tuple(signing_secrets)
        # urllib reports errors of connecting and of sending alike (URLError); our
        # connections mark the first kind, which proves that nothing was delivered.
        self._connections = _KeepAliveHandler()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects(), self._connections)
        token = base64.b64encode(f"{USER}:{password}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {token}",
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "application/json",
            "User-Agent": "jobrunner/0.1",
        }

    def close(self) -> None:
        """Close the kept-alive connections of every thread."""
        self._connections.close_all()

    def url(self, job: QueuedJob, base_url: str | None = None) -> str:
        base = self.base_url if base_url is None else base_url.rstrip("/")
        return f"{base}/v1/jobs/{urllib.parse.quote(job.name, safe='')}/{job.job_id}"

    def post(
        self,
        job: QueuedJob,
        *,
        base_url: str | None = None,
        timeout: float | None = None,
        signing_secrets: Sequence[str] = (),
        callback_token: str | None = None,
    ) -> tuple[Delivery, str]:
        """Send one attempt of `job`; what became of it, and a short reason for the logs.

        To the job type's `base_url` (None: the default), path appended. Signed
        with the type's `signing_secrets` (none: the default ones), and carrying
        its `callback_token` if it has one. The whole exchange (connect, send,
        the answer's head and its first MAX_ANSWER bytes) has `timeout` seconds
        (None: the default); past them the connection is closed.
        """
        body = json.dumps({"data": job.data, "attempts": job.attempts}).encode()
        headers = self._headers_for(job, body, signing_secrets or self.signing_secrets, callback_token)
        request = urllib.request.Request(self.url(job, base_url), data=body, headers=headers, method="POST")
        try:
            return self._send(request, self.timeout if timeout is None else timeout)
        finally:
            self._connections.release(request)

    def _headers_for(self, job: QueuedJob, body: bytes, secrets: Sequence[str], callback_token: str | None) -> dict[str, str]:
        if not secrets and callback_token is None:
            return self._headers  # exactly Rickover's
        headers = dict(self._headers)
        if callback_token is not None:
            headers[CALLBACK_TOKEN_HEADER] = callback_token
        if secrets:
            # signed at each POST: a 503's resend carries a fresh timestamp under the same id
            headers.update(signing.sign(secrets, webhook_id(job), int(time.time()), body))
        return headers

    def _send(self, request: urllib.request.Request, timeout: float) -> tuple[Delivery, str]:
        try:
            response = self._opener.open(request, timeout=timeout)
            response.read(MAX_ANSWER)
            return Delivery.ACCEPTED, f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            answer = _read_quietly(error)
            if error.code == 503 or _is_service_unavailable(answer):
                return Delivery.UNAVAILABLE, f"HTTP {error.code}"
            return Delivery.REJECTED, f"HTTP {error.code}"
        except urllib.error.URLError as error:
            if isinstance(error.reason, NotConnected):
                return Delivery.NOT_DELIVERED, str(error.reason)
            # connected, then failed while sending: part of the request may have arrived
            return Delivery.MAYBE_DELIVERED, type(error.reason).__name__
        except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
            # the request went out; the answer did not come back whole
            return Delivery.MAYBE_DELIVERED, type(error).__name__


def webhook_id(job: QueuedJob) -> str:
    """The Standard Webhooks id of a job's attempt: `<job id>-<attempts>` (the body's "attempts", which its
    callback names as "attempt"); a downstream may use it to recognise a resend of an attempt it already has."""
    return f"{job.job_id}-{job.attempts}"


def error_kind(outcome: Delivery, reason: str) -> str:
    """What kind of failure a POST's outcome and reason (from `post`) tell, for the metrics."""
    if outcome is Delivery.UNAVAILABLE:
        return "unavailable"
    if outcome is Delivery.REJECTED:
        return f"http_{reason[5]}xx"  # "HTTP 500"
    if outcome is Delivery.NOT_DELIVERED:
        return "connect"
    return "timeout" if "timeout" in reason.lower() else "cut_off"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer like any other non-2xx: following it would send the job, and the
    downstream's credentials, wherever the Location header points."""

    def redirect_request(self, *args, **kwargs):
        return None


def _read_quietly(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read(MAX_ANSWER)
    except (OSError, http.client.HTTPException):
        return b""


def _is_service_unavailable(answer: bytes) -> bool:
    """Rickover's downstreams say 503 with a body: {"id": "service_unavailable", "title": ...}."""
    try:
        body = json.loads(answer)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("id") == "service_unavailable" and bool(body.get("title"))

"""The downstream client: POST a job to the service that runs it, with urllib, and say what became of it.

What we send is what Rickover sent (CONTRACT.md §6.3): `POST <DOWNSTREAM_URL>/v1/jobs/<name>/<id>`,
body exactly `{"data": ..., "attempts": N}`, HTTP Basic auth user `jobs`.
Failures are told apart by their type, never by their message: an attempt that
certainly never reached the downstream may be sent again; one that may have
reached it must wait for its callback.
"""

import base64
import enum
import http.client
import json
import select
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from .models import QueuedJob

USER = "jobs"


class NotConnected(OSError):
    """Connecting failed (refused, unreachable, timed out, TLS handshake): not a byte of the request was sent."""


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        try:
            super().connect()
        except OSError as error:
            raise NotConnected(f"{type(error).__name__}: {error}") from error


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        try:
            super().connect()
        except OSError as error:  # ssl.SSLError included: the handshake is part of connecting
            raise NotConnected(f"{type(error).__name__}: {error}") from error


class _KeepAliveHandler(urllib.request.BaseHandler):
    """urllib's http and https opener, keeping one connection per thread and host alive.

    urllib's own handlers open and close a connection per request; for a worker
    that POSTs job after job that is most of the cost, on both sides. A kept
    connection is reused only if its last answer was read whole and it has been
    idle less than MAX_IDLE (well under a server's idle timeout). Failing to
    connect raises NotConnected (nothing sent); any failure on a connection that
    was reused counts, like any other after connecting, as "may have been delivered".
    """

    handler_order = 100  # before urllib's own http/https handlers, which build_opener adds too

    def __init__(self):
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()  # every thread's, to close them all at the end
        self._lock = threading.Lock()

    def forget(self, host: str) -> None:
        """Close this thread's kept connections to `host`."""
        kept = self._local.__dict__.get("connections", {})
        for key in [key for key in kept if key[1] == host]:
            kept.pop(key)[0].close()

    def close_all(self) -> None:
        with self._lock:
            connections, self._all = self._all, set()
        for conn in connections:
            conn.close()

    def http_open(self, req):
        return self._open(_HTTPConnection, req)

    def https_open(self, req):
        return self._open(_HTTPSConnection, req)

    def _open(self, connection_class, req):
        kept = self._local.__dict__.setdefault("connections", {})
        key = (connection_class, req.host)
        conn, last_response, last_used = kept.pop(key, (None, None, 0.0))
        if conn is not None and (
            conn.sock is None
            or not last_response.isclosed()
            or time.monotonic() - last_used > MAX_IDLE
            or select.select([conn.sock], [], [], 0)[0]  # readable while idle: the server closed it
        ):
            conn.close()
            conn = None
        if conn is None:
            conn = connection_class(req.host, timeout=req.timeout)
            with self._lock:
                self._all.add(conn)
        try:
            conn.request(req.get_method(), req.selector, req.data, {**req.unredirected_hdrs, **req.headers})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as error:
            conn.close()
            raise urllib.error.URLError(error) from error
        response.url, response.msg = req.get_full_url(), response.reason
        kept[key] = (conn, response, time.monotonic())
        return response


MAX_IDLE = 1.0
MAX_ANSWER = 65536  # bytes of the downstream's answer read, at most


class Delivery(enum.Enum):
    ACCEPTED = "accepted"  # any 2xx: wait for the callback
    NOT_DELIVERED = "not delivered"  # refused, unreachable, or an error answer: it may be sent again
    MAYBE_DELIVERED = "maybe delivered"  # timed out or cut off after sending: wait for the callback, never resend
    UNAVAILABLE = "unavailable"  # 503 or Rickover's service_unavailable: resend without using an attempt


class Downstream:
    def __init__(self, base_url: str, password: str, timeout: float):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
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

    def url(self, job: QueuedJob) -> str:
        return f"{self.base_url}/v1/jobs/{urllib.parse.quote(job.name, safe='')}/{job.job_id}"

    def post(self, job: QueuedJob) -> tuple[Delivery, str]:
        """Send one attempt of `job`; what became of it, and a short reason for the logs."""
        body = json.dumps({"data": job.data, "attempts": job.attempts}).encode()
        request = urllib.request.Request(self.url(job), data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(MAX_ANSWER)
                if not response.isclosed():  # an answer longer than we read: its connection cannot carry another
                    self._connections.forget(request.host)
                return Delivery.ACCEPTED, f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            answer = _read_quietly(error)
            if error.code == 503 or _is_service_unavailable(answer):
                return Delivery.UNAVAILABLE, f"HTTP {error.code}"
            return Delivery.NOT_DELIVERED, f"HTTP {error.code}"
        except urllib.error.URLError as error:
            if isinstance(error.reason, NotConnected):
                return Delivery.NOT_DELIVERED, str(error.reason)
            # connected, then failed while sending: part of the request may have arrived
            return Delivery.MAYBE_DELIVERED, type(error.reason).__name__
        except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
            # the request went out; the answer did not come back whole
            return Delivery.MAYBE_DELIVERED, type(error).__name__


def error_kind(outcome: Delivery, reason: str) -> str:
    """What kind of failure a POST's outcome and reason (from `post`) tell, for the metrics."""
    if outcome is Delivery.UNAVAILABLE:
        return "unavailable"
    if reason.startswith("HTTP "):
        return f"http_{reason[5]}xx"
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

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


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


# urllib reports errors of connecting and of sending alike (URLError); these
# connections mark the first kind, which proves that nothing was delivered.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _HTTPHandler(), _HTTPSHandler())


class Delivery(enum.Enum):
    ACCEPTED = "accepted"  # any 2xx: wait for the callback
    NOT_DELIVERED = "not delivered"  # refused, unreachable, or an error answer: it may be sent again
    MAYBE_DELIVERED = "maybe delivered"  # timed out or cut off after sending: wait for the callback, never resend
    UNAVAILABLE = "unavailable"  # 503 or Rickover's service_unavailable: resend without using an attempt


class Downstream:
    def __init__(self, base_url: str, password: str, timeout: float):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        token = base64.b64encode(f"{USER}:{password}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {token}",
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "application/json",
            "User-Agent": "jobrunner/0.1",
        }

    def url(self, job: QueuedJob) -> str:
        return f"{self.base_url}/v1/jobs/{urllib.parse.quote(job.name, safe='')}/{job.job_id}"

    def post(self, job: QueuedJob) -> tuple[Delivery, str]:
        """Send one attempt of `job`; what became of it, and a short reason for the logs."""
        body = json.dumps({"data": job.data, "attempts": job.attempts}).encode()
        request = urllib.request.Request(self.url(job), data=body, headers=self._headers, method="POST")
        try:
            with _opener.open(request, timeout=self.timeout) as response:
                response.read()
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


def _read_quietly(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read(65536)
    except (OSError, http.client.HTTPException):
        return b""


def _is_service_unavailable(answer: bytes) -> bool:
    """Rickover's downstreams say 503 with a body: {"id": "service_unavailable", "title": ...}."""
    try:
        body = json.loads(answer)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("id") == "service_unavailable" and bool(body.get("title"))

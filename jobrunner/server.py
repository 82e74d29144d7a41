"""The HTTP API: Rickover's v1 routes and jobrunner's additions, on the stdlib ThreadingHTTPServer.

A handler decodes and validates the request, calls one service, and turns the
result or the error into JSON. Jobs change state only through the services.
"""

import contextlib
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from base64 import b64decode
from collections.abc import Callable
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import dashboard, metrics, plugins, services, store
from .config import ConfigError
from .errors import (
    DatabaseUnavailable,
    Forbidden,
    InvalidField,
    InvalidJobId,
    JobAlreadyArchived,
    JobIdInUse,
    JobNameMismatch,
    JobrunnerError,
    JobTypeExists,
    NotCancellable,
    NotPaused,
    NotReplayable,
    StaleCallback,
    UnknownJob,
    UnknownJobType,
    Unauthorized,
)
from .metrics import ServiceMetrics, render_gauges
from .models import MAX_ATTEMPTS, MAX_CONCURRENCY, ArchivedJob, JobType, QueuedJob, new_job_id, parse_job_id
from .plugins import Authorizer

log = logging.getLogger(__name__)

MAX_DATA_BYTES = 102400  # Rickover's limit on a job's data
BAD_JSON = "Invalid request: bad JSON. Double check the types of the fields you sent"
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")

# (path pattern, {method: handler}); the first pattern that matches the path wins.
ROUTES = (
    (re.compile(r"/v1/jobs"), {"GET": "list_job_types", "POST": "create_job_type"}),
    (re.compile(r"/v1/jobs/(job_[^\s/]+)"), {"GET": "get_job"}),
    (re.compile(r"/v1/jobs/([^\s/]+)"), {"GET": "get_job_type", "POST": "update_job_type"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/jobs"), {"GET": "list_jobs"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/(job_[^\s/]+|random_id)"), {"GET": "get_job", "POST": "record_status", "PUT": "enqueue"}),
    (re.compile(r"/v1/jobs(?:/([^\s/]+))?/(job_[^\s/]+)/replay"), {"POST": "replay"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/(job_[^\s/]+)/cancel"), {"POST": "cancel"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/pause"), {"POST": "pause"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/resume"), {"POST": "resume"}),
    (re.compile(r"/"), {"GET": "homepage"}),
    (re.compile(r"/healthz"), {"GET": "healthz"}),
    (re.compile(r"/metrics"), {"GET": "metrics"}),
)


QUIET_BEFORE_CLOSE = 0.2  # seconds an idle kept-alive connection must be quiet before a stopping server closes it
MAX_HEADERS = 100  # the stdlib's limits
MAX_LINE = 65536


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


def _missing(field: str) -> HttpError:
    return HttpError(400, "missing_parameter", f"Missing required field: {field}", f"Please include a {field} in the request body")


def _error_for(error: JobrunnerError) -> HttpError:
    """The default answer to each service error; some handlers answer differently."""
    message = str(error)
    if isinstance(error, InvalidJobId):
        return HttpError(400, "invalid_prefix" if error.wrong_prefix else "invalid_uuid", message)
    if isinstance(error, InvalidField):
        error_id = "invalid_delivery_strategy" if error.field == "delivery_strategy" else "invalid_parameter"
        return HttpError(400, error_id, message)
    if isinstance(error, JobTypeExists):
        return HttpError(400, "invalid_parameter", message)
    if isinstance(error, (UnknownJobType, UnknownJob)):
        return HttpError(404, "not_found", message)
    if isinstance(error, JobNameMismatch):
        return HttpError(404, "job_not_found", message)
    if isinstance(error, JobAlreadyArchived):
        return HttpError(400, "job_already_archived", message)
    if isinstance(error, JobIdInUse):
        return HttpError(409, "job_id_in_use", message)
    if isinstance(error, NotReplayable):
        return HttpError(400, "invalid_replay_attempt", message)
    if isinstance(error, NotPaused):
        return HttpError(409, "not_paused", message)
    if isinstance(error, NotCancellable):
        return HttpError(409, "invalid_cancel_attempt", message)
    if isinstance(error, StaleCallback):
        return HttpError(400, "stale_attempt", message)
    if isinstance(error, DatabaseUnavailable):
        return HttpError(503, "service_unavailable", "The database is unavailable; try again shortly", message, {"Retry-After": "1"})
    log.error("unexpected service error: %s", message)
    return HttpError(500, "server_error", "Unexpected server error. Please try again")


# --- representations (CONTRACT.md §5.8) ---------------------------------------


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with up to 6 fractional digits, as Rickover wrote it."""
    if value is None:
        return None
    text = value.astimezone(timezone.utc).isoformat()[:-6]  # drop "+00:00"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + "Z"


def job_type_json(job_type: JobType) -> dict:
    return {
        "name": job_type.name,
        "delivery_strategy": job_type.delivery_strategy,
        "attempts": job_type.attempts,
        "concurrency": job_type.concurrency,
        "created_at": timestamp(job_type.created_at),
    }


def job_json(job: QueuedJob | ArchivedJob) -> dict:
    if isinstance(job, QueuedJob):
        return {
            "id": job.job_id,
            "name": job.name,
            "attempts": job.attempts,
            "run_after": timestamp(job.run_after),
            "expires_at": timestamp(job.expires_at),
            "created_at": timestamp(job.created_at),
            "updated_at": timestamp(job.updated_at),
            "status": job.status,
            "data": job.data,
        }
    return {
        "id": job.job_id,
        "name": job.name,
        "attempts": job.attempts,
        "status": job.status,
        "created_at": timestamp(job.created_at),
        "data": job.data,
        "expires_at": timestamp(job.expires_at),
    }


# --- request fields ------------------------------------------------------------


def _string(body: dict, field: str, required: bool = True) -> str | None:
    value = body.get(field)
    if value is None or value == "":
        if required:
            raise _missing(field)
        return None
    if not isinstance(value, str):
        raise HttpError(400, "invalid_request", BAD_JSON, f"{field} must be a string")
    return value


def _integer(body: dict, field: str, high: int, required: bool = True) -> int | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _missing(field)
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise HttpError(400, "invalid_request", BAD_JSON, f"{field} must be a whole number from 0 to {high}")
    return value


def _timestamp(body: dict, field: str) -> datetime | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise HttpError(400, "invalid_request", BAD_JSON, f"{field} must be an RFC 3339 timestamp with a time zone")
    text = re.sub(r"[Zz]$", "+00:00", value)
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)  # Python keeps microseconds, like Postgres
    try:
        return datetime.fromisoformat(text.replace("t", "T"))
    except ValueError:
        raise HttpError(400, "invalid_request", BAD_JSON, f"{field} is not a valid date and time") from None


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _host_of(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).netloc
    except ValueError:
        return None  # malformed: not this server


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# --- the handler ---------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The stdlib writes headers and body in separate send()s: without TCP_NODELAY a
    # kept-alive connection stalls ~40 ms per response (Nagle meets delayed ACK).
    disable_nagle_algorithm = True
    server_version = "jobrunner/0.1"
    sys_version = ""
    server: "APIServer"
    last_status = 0  # of the response sent last, for the metrics
    idle_since: float | None = None  # while waiting for the next request on a kept-alive connection
    reading_since: float | None = None  # from then until the request (its body included) has been read
    body_read = True  # False while a request body waits unread on the connection

    def setup(self) -> None:
        self.timeout = self.server.config.read_timeout
        super().setup()

    def handle(self) -> None:
        self.server.connections.add(self)
        try:
            super().handle()
        except ConnectionError:
            pass  # the client reset or half-closed the connection: there is no one left to answer
        finally:
            self.server.connections.discard(self)

    def handle_one_request(self) -> None:
        self.idle_since = self.reading_since = time.monotonic()
        super().handle_one_request()

    def parse_request(self) -> bool:
        """Parse the request line and headers; the stdlib's email-based parser costs a fifth of a request."""
        self.idle_since = None
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
        self.reading_since = None  # the head has arrived; _read_body times the body's read
        if headers.get("Expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def __getattr__(self, name: str) -> Callable[[], None]:
        # Every method, known or not, goes through the router: an unknown one is a 405, not a 501.
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def dispatch(self) -> None:
        started = time.perf_counter()
        route = "none"
        try:
            path, _, query = self.path.partition("?")
            path = urllib.parse.unquote(path, errors="replace")
            self.query = urllib.parse.parse_qs(query, keep_blank_values=True)
            match, methods = self._route(path)
            route = methods.get(self.command, "none") if match else "none"
            self._check_proxy()
            self._check_origin()
            if route not in ("healthz",) and not (route == "metrics" and self.server.config.metrics_open):
                self._authenticate()
            if match is None:
                raise HttpError(404, "not_found", "Resource not found", f"{self.command} {path}")
            if self.command == "OPTIONS":
                self._send(200, b"", {"Allow": ", ".join([*methods, "OPTIONS"])})
                return
            if self.command not in methods:
                allow = ", ".join(methods)
                raise HttpError(405, "method_not_allowed", f"Method {self.command} not allowed for {path}", headers={"Allow": allow})
            getattr(self, "handle_" + methods[self.command])(*match.groups())
        except HttpError as error:
            self._send_error(error)
        except JobrunnerError as error:
            self._send_error(_error_for(error))
        except TimeoutError:
            raise  # a silent client: the stdlib drops the connection
        except Exception:
            log.exception("unexpected error answering %s %s", self.command, self.path)
            self._send_error(HttpError(500, "server_error", "Unexpected server error. Please try again"))
        finally:
            self.server.observe(route, self.last_status, time.perf_counter() - started)

    def _route(self, path: str):
        for pattern, methods in ROUTES:
            match = pattern.fullmatch(path)
            if match:
                return match, methods
        return None, {}

    def _check_proxy(self) -> None:
        if self.headers.get("X-Forwarded-Proto") == "http" and not self.server.config.allow_unencrypted_proxy_traffic:
            raise HttpError(403, "insecure_request", "Connection not sent over TLS", "Please use https")

    def _check_origin(self) -> None:
        """A browser holding an operator's credentials must not change jobs for another site's page (CSRF).

        Browsers say where a request comes from; API clients (curl, the Python
        client, downstreams) send neither header and are not affected.
        """
        if self.command in ("GET", "HEAD", "OPTIONS"):
            return
        site = self.headers.get("Sec-Fetch-Site", "").lower()
        origin = self.headers.get("Origin")
        if site:
            # the browser's own word; a proxy that rewrites Host cannot make it wrong
            foreign = site not in ("same-origin", "none")
        elif origin:
            foreign = _host_of(origin) != self.headers.get("Host")
        else:
            foreign = False
        if foreign:
            raise HttpError(403, "cross_origin_request", "Requests from another site's page are refused", "Use the API directly, or this server's own dashboard")

    def _authenticate(self) -> None:
        challenge = {"WWW-Authenticate": 'Basic realm="jobrunner"'}
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            raise HttpError(401, "unauthorized", "Unauthorized", "Send HTTP Basic credentials", challenge)
        try:
            user, colon, password = b64decode(encoded.strip(), validate=True).decode().partition(":")
        except ValueError:
            raise HttpError(401, "unauthorized", "Unauthorized", "Malformed Basic credentials", challenge) from None
        if not user:
            raise HttpError(401, "missing_authentication", "Missing authentication", "Basic auth needs a user name", challenge)
        try:
            refused = self.server.authorizer.authorize(user, password)
            if refused is not None:  # an error returned, as Rickover's Authorize did, or a False: never a pass
                log.error("the authorizer returned %r instead of None or raising; refusing the request", refused)
                raise refused if isinstance(refused, (Unauthorized, Forbidden)) else Unauthorized("Unauthorized")
        except Unauthorized as error:
            raise HttpError(401, "unauthorized", str(error) or "Unauthorized", headers=challenge) from None
        except Forbidden as error:
            raise HttpError(403, "forbidden", str(error) or "Forbidden") from None

    # --- bodies and answers ---

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(411, "length_required", "Send the body with a Content-Length, not chunked")
        text = self.headers.get("Content-Length", "0")
        if not _is_number(text):
            self.close_connection = True
            raise HttpError(400, "invalid_request", "Invalid Content-Length header")
        length = int(text) if len(text) <= 12 else 2**63
        if length > self.server.config.max_body_bytes:
            self.close_connection = True
            raise HttpError(413, "entity_too_large", "Request body too large", f"The limit is {self.server.config.max_body_bytes} bytes")
        self.reading_since = time.monotonic()
        body = self.rfile.read(length)
        self.reading_since = None
        self.body_read = len(body) == length
        if len(body) < length:
            self.close_connection = True
            raise HttpError(400, "invalid_request", "The request body ended early")
        return body

    def _read_json(self) -> dict:
        return self._json_object(self._read_body())

    def _json_object(self, body: bytes) -> dict:
        try:
            value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise HttpError(400, "invalid_request", BAD_JSON) from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise HttpError(400, "invalid_request", BAD_JSON, "The body must be a JSON object")
        return value

    def _send_json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value, separators=(",", ":")).encode() + b"\n", {"Content-Type": "application/json; charset=utf-8"})

    def _send_error(self, error: HttpError) -> None:
        body = {"title": error.title, "id": error.error_id, "status_code": error.status}
        if error.detail:
            body["detail"] = error.detail
        body["instance"] = error.instance or getattr(self, "path", "").partition("?")[0]
        headers = {"Content-Type": "application/json; charset=utf-8", **error.headers}
        self._send(error.status, json.dumps(body).encode() + b"\n", headers)

    def _send(self, status: int, body: bytes, headers: dict) -> None:
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
        self._send_error(HttpError(code, "invalid_request", message or HTTPStatus(code).phrase, explain or ""))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _db(self, timeout: float | None = None):
        return self.server.pool.connection(timeout)

    # --- Rickover's routes ---

    def handle_create_job_type(self) -> None:
        body = self._read_json()
        name = _string(body, "name")
        strategy = _string(body, "delivery_strategy")
        attempts = _integer(body, "attempts", MAX_ATTEMPTS, required=False) or 0
        concurrency = _integer(body, "concurrency", MAX_CONCURRENCY, required=False)
        if concurrency is None:
            raise _missing("concurrency")
        with self._db() as conn:
            job_type = services.create_job_type(conn, name, strategy, attempts, concurrency)
        self._send_json(201, job_type_json(job_type))

    def handle_get_job_type(self, name: str) -> None:
        with self._db() as conn:
            job_type = services.get_job_type(conn, name)
        self._send_json(200, job_type_json(job_type))

    def handle_enqueue(self, name: str, id_text: str) -> None:
        body = self._read_json()
        if "data" not in body:
            raise _missing("data")
        run_after = _timestamp(body, "run_after")
        expires_at = _timestamp(body, "expires_at")
        job_id = new_job_id() if id_text == "random_id" else parse_job_id(id_text)
        if self._data_too_large(body["data"]):
            raise HttpError(413, "entity_too_large", "Data parameter is too large (100KB max)")
        try:
            job = self.server.enqueuer.enqueue(job_id, name, body["data"], run_after, expires_at)
        except UnknownJobType:
            raise HttpError(404, "job_type_not_found", f"Job type {name!r} not found", instance=f"/v1/jobs/{name}") from None
        self.server.metrics.enqueued.inc(name)
        self._send_json(202, job_json(job))

    def _data_too_large(self, data: Any) -> bool:
        # cheap first: the data cannot be larger than the whole body (its length was checked on reading)
        if int(self.headers.get("Content-Length", "0")) <= MAX_DATA_BYTES:
            return False
        return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()) > MAX_DATA_BYTES

    def handle_record_status(self, name: str, id_text: str) -> None:
        body = self._read_json()
        status = _string(body, "status")
        attempt = _integer(body, "attempt", MAX_ATTEMPTS)
        if status not in ("succeeded", "failed"):
            raise HttpError(400, "invalid_status", f"Invalid job status: {status}", "Status must be succeeded or failed")
        retryable = body.get("retryable", True)
        if not isinstance(retryable, bool):
            raise HttpError(400, "invalid_request", BAD_JSON, "retryable must be true or false")
        job_id = parse_job_id(id_text)
        try:
            job = self.server.callbacks_batcher.handle_status_callback(job_id, name, status, attempt, retryable)
        except (JobAlreadyArchived, UnknownJob, JobNameMismatch) as error:
            raise HttpError(400, "duplicate_status_request", "This job has already been archived, or was never queued", str(error)) from None
        self.server.metrics.outcome(job)
        self._send_json(200, job_json(job))

    def handle_get_job(self, *groups: str) -> None:
        name, id_text = (None, *groups) if len(groups) == 1 else groups
        if id_text == "random_id":
            raise HttpError(400, "invalid_uuid", "random_id names no job: use a job id")
        job_id = parse_job_id(id_text)
        with self._db() as conn:
            job = services.get_job(conn, job_id, name)
        self._send_json(200, job_json(job))

    def handle_replay(self, name: str | None, id_text: str) -> None:
        self._read_body()  # ignored, as Rickover did; read so the connection stays usable
        job_id = parse_job_id(id_text)
        with self._db() as conn:
            job = services.replay(conn, job_id, name)
        self.server.metrics.enqueued.inc(job.name)
        self._send_json(201, job_json(job))

    def handle_homepage(self) -> None:
        config = self.server.config
        with self._db() as conn:
            overview = services.overview(conn)
        page = dashboard.render(overview, config.homepage_title, config.homepage_iframe_url)
        self._send(200, page, {"Content-Type": "text/html; charset=utf-8", **dashboard.HEADERS})

    # --- jobrunner's additions ---

    def handle_list_job_types(self) -> None:
        with self._db() as conn:
            counts = services.list_job_types_with_counts(conn)
        types = [{**job_type_json(c.job_type), "queued": c.queued, "in_progress": c.in_progress, "due": c.due} for c in counts]
        self._send_json(200, {"job_types": types})

    def handle_update_job_type(self, name: str) -> None:
        body = self._read_json()
        attempts = _integer(body, "attempts", MAX_ATTEMPTS, required=False)
        concurrency = _integer(body, "concurrency", MAX_CONCURRENCY, required=False)
        with self._db() as conn:
            job_type = services.update_job_type(conn, name, attempts, concurrency)
        self._send_json(200, job_type_json(job_type))

    def handle_list_jobs(self, name: str) -> None:
        status = self._query_param("status")
        limit_text = self._query_param("limit") or "50"
        if not _is_number(limit_text) or len(limit_text) > 6:
            raise HttpError(400, "invalid_parameter", f"Invalid limit: must be a whole number from 1 to {services.MAX_PAGE}")
        with self._db() as conn:
            jobs, cursor = services.list_jobs(conn, name, status, int(limit_text), self._query_param("cursor"))
        self._send_json(200, {"jobs": [job_json(job) for job in jobs], "next_cursor": cursor})

    def _query_param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def handle_cancel(self, name: str, id_text: str) -> None:
        self._read_body()
        job_id = parse_job_id(id_text)
        with self._db() as conn:
            job = services.cancel(conn, job_id, name)
        self.server.metrics.outcome(job)
        self._send_json(200, job_json(job))

    def handle_pause(self, name: str) -> None:
        self._read_body()
        with self._db() as conn:
            job_type = services.pause_job_type(conn, name)
        self._send_json(200, job_type_json(job_type))

    def handle_resume(self, name: str) -> None:
        body = self._read_body()
        concurrency = _integer(self._json_object(body), "concurrency", MAX_CONCURRENCY, required=False) if body else None
        with self._db() as conn:
            job_type = services.resume_job_type(conn, name, concurrency)
        self._send_json(200, job_type_json(job_type))

    def handle_healthz(self) -> None:
        try:
            with self._db(timeout=1.0) as conn:
                store.ping(conn)
        except DatabaseUnavailable:
            # no detail: this route needs no credentials, and the driver's message names hosts and users
            raise HttpError(503, "service_unavailable", "The database is unavailable") from None
        self._send_json(200, {"status": "ok"})

    def handle_metrics(self) -> None:
        server = self.server
        if server.publisher:
            server.publisher.publish()  # this server's counts, fresh, in the files every server adds up
            counted = metrics.collect(server.publisher.directory)
        else:
            counted = server.metrics
        gauges, names = self._queue_gauges()
        counted.include_job_types(names)
        text = counted.render() + "\n".join(gauges) + "\n"
        self._send(200, text.encode(), {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _queue_gauges(self) -> tuple[list[str], list[str]]:
        """What every host shares, from the database at scrape time (and the job types' names); without it, only that it is down."""
        up = ["# HELP jobrunner_database_up 1 if this server reached the database for this scrape", "# TYPE jobrunner_database_up gauge"]
        try:
            with self._db(timeout=1.0) as conn:
                counts = services.list_job_types_with_counts(conn)
        except DatabaseUnavailable:
            return up + ["jobrunner_database_up 0"], []
        lines = up + ["jobrunner_database_up 1"]
        for metric, doc, value in (
            ("jobrunner_jobs_queued", "jobs waiting, due or not, by job type", lambda c: c.queued),
            ("jobrunner_jobs_due", "jobs waiting whose time has come, by job type", lambda c: c.due),
            ("jobrunner_jobs_in_progress", "jobs sent and awaiting their callback, by job type", lambda c: c.in_progress),
            ("jobrunner_job_type_concurrency", "the job type's concurrency (0: paused)", lambda c: c.job_type.concurrency),
        ):
            lines += render_gauges(metric, doc, "name", {c.job_type.name: value(c) for c in counts})
        return lines, [c.job_type.name for c in counts]


# --- the server ----------------------------------------------------------------


class APIServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on an already-bound socket, with a bound on threads and a graceful stop."""

    # Wait for in-flight requests on close (ThreadingHTTPServer's default daemon threads would not).
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        sock: socket.socket,
        config,
        pool: store.Pool,
        authorizer: Authorizer,
        counted: ServiceMetrics | None = None,
        publisher: metrics.Publisher | None = None,
    ):
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        # Other servers (more processes, or a reload's next generation) accept on the same
        # socket: all wake for a connection and one takes it; the others' accept() must
        # come back empty-handed, not block until the next connection (deaf to their stop).
        sock.setblocking(False)
        self.socket = sock
        self.server_address = sock.getsockname()
        self.config = config
        self.pool = pool
        self.enqueuer = services.EnqueueBatcher(pool)
        self.callbacks_batcher = services.CallbackBatcher(pool)
        self.metrics = counted or ServiceMetrics()  # this process's
        self.publisher = publisher  # with the other processes of its supervisor, for /metrics (None: this one alone)
        self.authorizer = authorizer
        self.stopping = False
        self.connections: set[Handler] = set()
        self._next_slow_check = 0.0
        self._slots = threading.BoundedSemaphore(config.max_request_threads)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.metrics.http_requests.inc(route, str(status))
        self.metrics.http_latency.observe(seconds, route)

    def service_actions(self) -> None:
        """Between polls of the accept loop: now and then, drop connections whose request is too slow to arrive.

        The read timeout bounds each silence, so a client that sends a byte now and
        then would otherwise hold its thread for ever (slowloris). The wait for a
        request and its head get twice the read timeout, and so does its body's
        read; a handler at work is never timed.
        """
        now = time.monotonic()
        if now < self._next_slow_check:
            return
        self._next_slow_check = now + 1.0
        for handler in list(self.connections):
            since = handler.reading_since
            if since is not None and now - since > 2 * self.config.read_timeout and handler.reading_since is since:
                _hang_up(handler)

    def handle_error(self, request, client_address) -> None:
        """A bug, not the client's doing (handlers answer those): once, in the log, with its traceback."""
        log.exception("unhandled error serving %s:%s", *client_address[:2])

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        body = json.dumps({"title": "Too many connections; try again shortly", "id": "service_unavailable", "status_code": 503}).encode() + b"\n"
        head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        try:
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)
        self.metrics.http_requests.inc("busy", "503")

    def stop(self) -> None:
        """Stop accepting, close kept-alive connections once quiet, and wait for in-flight requests.

        A connection that is busy gets `Connection: close` with its next answer. One
        that is idle is closed only once it has been quiet for QUIET_BEFORE_CLOSE: a
        client that reuses it at once is answered rather than cut off (the race every
        keep-alive server has, narrowed to clients silent for that long).
        """
        self.stopping = True
        self.shutdown()
        deadline = time.monotonic() + self.config.read_timeout
        while self.connections and time.monotonic() < deadline:
            for handler in list(self.connections):
                idle_since = handler.idle_since
                if idle_since is not None and time.monotonic() - idle_since >= QUIET_BEFORE_CLOSE:
                    _hang_up(handler)
            time.sleep(QUIET_BEFORE_CLOSE / 4)  # a bounded wait for connections to finish, not a test
        for handler in list(self.connections):
            if handler.reading_since is not None:
                _hang_up(handler)  # still sending its request (slowly): it must not hold the stop up
        self.server_close()
        self.enqueuer.close()
        self.callbacks_batcher.close()
        self.pool.close()


def _hang_up(handler: "Handler") -> None:
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)


def serve(
    config, sock: socket.socket, stop: threading.Event, ready: Callable[[], None] | None = None, metrics_dir: str | None = None
) -> None:
    """Answer HTTP on `sock` until `stop` is set, then stop gracefully; the caller owns `sock`'s binding.

    `ready` is called once requests are being served and the database has answered.
    /metrics adds up what every process publishes in `metrics_dir` (see metrics.py).
    """
    counted = ServiceMetrics()
    publisher = metrics.Publisher(counted, metrics_dir) if metrics_dir else None
    server = build(config, sock=sock, counted=counted, publisher=publisher)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http-accept")
    thread.start()
    if ready and _database_answers(server.pool, stop):
        ready()
    try:
        stop.wait()
    finally:
        server.stop()
        thread.join()
        if publisher:
            publisher.close()


def build(
    config,
    authorizer: Authorizer | None = None,
    sock: socket.socket | None = None,
    counted: ServiceMetrics | None = None,
    publisher: metrics.Publisher | None = None,
) -> APIServer:
    """The API server, for an application's own process (Rickover's `server.Get(authorizer)`).

    `authorizer` defaults to the one the config names (or its users); `sock`, to
    one bound to the config's host and port. Call `serve_forever()` in a thread;
    once it runs, `stop()` stops gracefully and closes the database connections.
    """
    if authorizer is None and not config.users and not config.authorizer:
        raise ConfigError("JOBRUNNER_USERS (users): no API users and no authorizer: every request would be refused")
    authorizer = authorizer or plugins.build_authorizer(config)  # first: if the application's factory raises, nothing is open yet
    if sock is None:
        sock = socket.create_server((config.host, config.port), backlog=1024)
    pool = store.Pool(config.database_url, config.server_pool_size, config.db_timeout, name="server")
    return APIServer(sock, config, pool, authorizer, counted, publisher)


def _database_answers(pool: store.Pool, stop: threading.Event) -> bool:
    """Wait until the database answers (True), or until stopped (False)."""
    while not stop.is_set():
        try:
            with pool.connection(timeout=1.0) as conn:
                store.ping(conn)
            return True
        except JobrunnerError:
            stop.wait(0.5)
    return False

"""The HTTP API: Rickover's v1 routes and jobrunner's additions (the HTTP/1.1 itself is protocol.py's).

A handler decodes and validates the request, calls one service, and turns the
result or the error into JSON. Jobs change state only through the services.
"""

import importlib.resources
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from base64 import b64decode
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from . import batching, dashboard, metrics, plugins, policies, schedules, services, store, timetable
from .config import ConfigError
from .errors import (
    CallbackForbidden,
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
    NotInProgress,
    NotPaused,
    NotReplayable,
    ScheduleExists,
    StaleCallback,
    UnknownJob,
    UnknownJobType,
    UnknownSchedule,
    Unauthorized,
)
from .metrics import ServiceMetrics, render_gauges
from .models import (
    CALLBACK_TOKEN_HEADER,
    MAX_ATTEMPTS,
    MAX_CONCURRENCY,
    MAX_PRIORITY,
    MIN_PRIORITY,
    ArchivedJob,
    JobType,
    QueuedJob,
    Schedule,
    format_job_id,
    new_job_id,
    parse_job_id,
)
from .plugins import Authorizer
from .protocol import HttpError, ProtocolHandler, ProtocolServer, is_number

log = logging.getLogger(__name__)

MAX_DATA_BYTES = 102400  # Rickover's limit on a job's data
BAD_JSON = "Invalid request: bad JSON. Double check the types of the fields you sent"
UPDATE_JOB_TYPE_FIELDS = ("attempts", "concurrency", *policies.SETTINGS)
CREATE_JOB_TYPE_FIELDS = ("name", "delivery_strategy", *UPDATE_JOB_TYPE_FIELDS)
# What PostgreSQL and Python's datetime both hold, with a day to spare at each end: a
# retry's run_after (up to a day later) and a time shown in any zone must still fit.
EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc)
LATEST = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=timezone.utc)
OUTAGE_LOG_INTERVAL = 60.0  # seconds: an outage fails many requests, and is logged once a minute, not per request
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")

# Answered without credentials: a load balancer's probe, and the API's own description (nothing not in the repository).
PUBLIC_ROUTES = ("healthz", "openapi")
OPENAPI = importlib.resources.files(__package__).joinpath("openapi.json").read_bytes()

# (path pattern, {method: handler}); the first pattern that matches the path wins.
ROUTES = (
    (re.compile(r"/v1/jobs"), {"GET": "list_job_types", "POST": "create_job_type"}),
    (re.compile(r"/v1/jobs/(job_[^\s/]+)"), {"GET": "get_job"}),
    (re.compile(r"/v1/jobs/([^\s/]+)"), {"GET": "get_job_type", "POST": "update_job_type"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/jobs"), {"GET": "list_jobs"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/(job_[^\s/]+|random_id)"), {"GET": "get_job", "POST": "record_status", "PUT": "enqueue"}),
    (re.compile(r"/v1/jobs(?:/([^\s/]+))?/(job_[^\s/]+)/replay"), {"POST": "replay"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/(job_[^\s/]+)/cancel"), {"POST": "cancel"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/(job_[^\s/]+)/heartbeat"), {"POST": "heartbeat"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/pause"), {"POST": "pause"}),
    (re.compile(r"/v1/jobs/([^\s/]+)/resume"), {"POST": "resume"}),
    (re.compile(r"/v1/schedules"), {"GET": "list_schedules", "POST": "create_schedule"}),
    (re.compile(r"/v1/schedules/([^\s/]+)"), {"GET": "get_schedule", "POST": "update_schedule", "DELETE": "delete_schedule"}),
    (re.compile(r"/v1/schedules/([^\s/]+)/pause"), {"POST": "pause_schedule"}),
    (re.compile(r"/v1/schedules/([^\s/]+)/resume"), {"POST": "resume_schedule"}),
    (re.compile(r"/v1/schedules/([^\s/]+)/run"), {"POST": "run_schedule"}),
    (re.compile(r"/"), {"GET": "homepage"}),
    (re.compile(r"/healthz"), {"GET": "healthz"}),
    (re.compile(r"/openapi\.json"), {"GET": "openapi"}),
    (re.compile(r"/metrics"), {"GET": "metrics"}),
)


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
    if isinstance(error, (UnknownJobType, UnknownJob, UnknownSchedule)):
        return HttpError(404, "not_found", message)
    if isinstance(error, ScheduleExists):
        return HttpError(409, "schedule_exists", message)
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
    if isinstance(error, NotInProgress):
        return HttpError(400, "job_not_in_progress", message)
    if isinstance(error, CallbackForbidden):
        return HttpError(403, "forbidden", message, f"Send the {CALLBACK_TOKEN_HEADER} header that came with the job's POST")
    if isinstance(error, DatabaseUnavailable):
        # no detail: the driver's message names hosts, ports and users (APIServer.note_outage logs it)
        return HttpError(503, "service_unavailable", "The database is unavailable; try again shortly", headers={"Retry-After": "1"})
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
        **policies.policy_json(job_type.policy),
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
            "priority": job.priority,
        }
    return {
        "id": job.job_id,
        "name": job.name,
        "attempts": job.attempts,
        "status": job.status,
        "created_at": timestamp(job.created_at),
        "data": job.data,
        "expires_at": timestamp(job.expires_at),
        "priority": job.priority,
    }


def schedule_json(schedule: Schedule, last_job_status: str | None) -> dict:
    return {
        "name": schedule.name,
        "job_type": schedule.job_type,
        "data": schedule.data,
        "cron": schedule.cron,
        "time_zone": schedule.time_zone,
        "interval_seconds": schedule.interval_seconds,
        "run_after_offset": schedule.run_after_offset,
        "expires_after": schedule.expires_after,
        "misfire": schedule.misfire,
        "misfire_limit": schedule.misfire_limit,
        "paused": schedule.paused,
        "config_owned": schedule.config_owned,
        "next_tick": timestamp(schedule.next_tick),
        "next_tick_local": _local_time(schedule.next_tick, schedule.time_zone) if schedule.cron else None,
        "last_tick": timestamp(schedule.last_tick),
        "last_job_id": None if schedule.last_job_id is None else format_job_id(schedule.last_job_id),
        "last_job_status": last_job_status,
        "error": None if schedule.error is None else {"message": schedule.error, "failures": schedule.failures, "retry_at": timestamp(schedule.retry_at)},
        "created_at": timestamp(schedule.created_at),
        "updated_at": timestamp(schedule.updated_at),
    }


def _local_time(moment: datetime, zone_name: str | None) -> str | None:
    """The instant in the schedule's zone, with its offset; None where this host does not know the zone."""
    try:
        return moment.astimezone(timetable.zone_of(zone_name)).isoformat()
    except InvalidField:
        return None


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


def _integer(body: dict, field: str, high: int, required: bool = True, low: int = 0) -> int | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _missing(field)
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise HttpError(400, "invalid_request", BAD_JSON, f"{field} must be a whole number from {low} to {high}")
    return value


def _number(body: dict, field: str) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise HttpError(400, "invalid_request", BAD_JSON, f"{field} must be a number")
    return value


def _refuse_unknown_fields(body: dict, known: tuple[str, ...]) -> None:
    """A field this route does not know is refused, so that a client never believes it took effect."""
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise HttpError(400, "invalid_parameter", f"Unknown field(s): {', '.join(unknown)}", f"known fields: {', '.join(known)}")


def _timestamp(body: dict, field: str) -> datetime | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise HttpError(400, "invalid_request", BAD_JSON, f"{field} must be an RFC 3339 timestamp with a time zone")
    text = re.sub(r"[Zz]$", "+00:00", value)
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)  # Python keeps microseconds, like Postgres
    try:
        moment = datetime.fromisoformat(text.replace("t", "T"))
    except ValueError:
        raise HttpError(400, "invalid_request", BAD_JSON, f"{field} is not a valid date and time") from None
    try:
        in_range = EARLIEST <= moment.astimezone(timezone.utc) <= LATEST
    except OverflowError:  # its UTC instant is before year 1 or after 9999
        in_range = False
    if not in_range:
        raise HttpError(400, "invalid_parameter", f"Invalid {field}: must be between 0001-01-02 and 9999-12-30 (UTC)")
    return moment


def _host_of(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).netloc
    except ValueError:
        return None  # malformed: not this server


def _refuse_unknown(body: dict, known: tuple[str, ...]) -> None:
    """A field we do not know is a 400: a client must never believe a setting took effect when it did not."""
    unknown = [key if len(key) <= 60 else key[:57] + "..." for key in body if key not in known]
    if unknown:
        what = "not a field" if len(unknown) == 1 else "not fields"
        raise HttpError(400, "invalid_parameter", f"Invalid {', '.join(unknown)}: {what} of this request", f"Known fields: {', '.join(known)}")


def _settings(body: dict) -> dict:
    return {key: body[key] for key in policies.SETTINGS if key in body}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# --- the handler ---------------------------------------------------------------


class Handler(ProtocolHandler):
    """The API's routes: decode and validate, call one service, answer JSON."""

    server: "APIServer"

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
            if route not in PUBLIC_ROUTES and not (route == "metrics" and self.server.config.metrics_open):
                self._authenticate_or_close()
            if match is None:
                raise HttpError(404, "not_found", "Resource not found", f"{self.command} {path}")
            if self.command == "OPTIONS":
                self.send_answer(200, b"", {"Allow": ", ".join([*methods, "OPTIONS"])})
                return
            if self.command not in methods:
                allow = ", ".join(methods)
                raise HttpError(405, "method_not_allowed", f"Method {self.command} not allowed for {path}", headers={"Allow": allow})
            getattr(self, "handle_" + methods[self.command])(*match.groups())
        except HttpError as error:
            self.send_error_answer(error)
        except JobrunnerError as error:
            if isinstance(error, DatabaseUnavailable):
                self.server.note_outage(error)
            self.send_error_answer(_error_for(error))
        except TimeoutError:
            raise  # a silent client: the stdlib drops the connection
        except Exception:
            log.exception("unexpected error answering %s %s", self.command, self.path)
            self.send_error_answer(HttpError(500, "server_error", "Unexpected server error. Please try again"))
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

    def _authenticate_or_close(self) -> None:
        """A client refused its credentials keeps no connection: a socket held without them costs more than a reconnect."""
        try:
            self._authenticate()
        except HttpError:
            self.close_connection = True
            raise

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

    def _read_json(self) -> dict:
        return self._json_object(self.read_body())

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

    def _db(self, timeout: float | None = None):
        return self.server.pool.connection(timeout)

    # --- Rickover's routes ---

    def handle_create_job_type(self) -> None:
        body = self._read_json()
        _refuse_unknown(body, CREATE_JOB_TYPE_FIELDS)
        name = _string(body, "name")
        strategy = _string(body, "delivery_strategy")
        attempts = _integer(body, "attempts", MAX_ATTEMPTS, required=False) or 0
        concurrency = _integer(body, "concurrency", MAX_CONCURRENCY, required=False)
        if concurrency is None:
            raise _missing("concurrency")
        with self._db() as conn:
            job_type = services.create_job_type(conn, name, strategy, attempts, concurrency, _settings(body))
        self.send_json(201, job_type_json(job_type))

    def handle_get_job_type(self, name: str) -> None:
        with self._db() as conn:
            job_type = services.get_job_type(conn, name)
        self.send_json(200, job_type_json(job_type))

    def handle_enqueue(self, name: str, id_text: str) -> None:
        body = self._read_json()
        if "data" not in body:
            raise _missing("data")
        run_after = _timestamp(body, "run_after")
        expires_at = _timestamp(body, "expires_at")
        priority = _integer(body, "priority", MAX_PRIORITY, required=False, low=MIN_PRIORITY) or 0
        job_id = new_job_id() if id_text == "random_id" else parse_job_id(id_text)
        if self._data_too_large(body["data"]):
            raise HttpError(413, "entity_too_large", "Data parameter is too large (100KB max)")
        try:
            job = self.server.enqueuer.enqueue(job_id, name, body["data"], run_after, expires_at, priority)
        except UnknownJobType:
            raise HttpError(404, "job_type_not_found", f"Job type {name!r} not found", instance=f"/v1/jobs/{name}") from None
        self.server.metrics.enqueued.inc(name)
        self.send_json(202, job_json(job))

    def _data_too_large(self, data: Any) -> bool:
        # cheap first: the data cannot be larger than the whole body (its length was checked on reading)
        if int(self.headers.get("Content-Length", "0")) <= MAX_DATA_BYTES:
            return False
        # a lone surrogate ("\ud800") is measured, not a crash: the database refuses it with a 400, whatever the size
        return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")) > MAX_DATA_BYTES

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
            token = self.headers.get(CALLBACK_TOKEN_HEADER)
            job = self.server.callbacks_batcher.handle_status_callback(job_id, name, status, attempt, retryable, token)
        except (JobAlreadyArchived, UnknownJob, JobNameMismatch) as error:
            raise HttpError(400, "duplicate_status_request", "This job has already been archived, or was never queued", str(error)) from None
        self.server.metrics.outcome(job)
        self.send_json(200, job_json(job))

    def handle_get_job(self, *groups: str) -> None:
        name, id_text = (None, *groups) if len(groups) == 1 else groups
        if id_text == "random_id":
            raise HttpError(400, "invalid_uuid", "random_id names no job: use a job id")
        job_id = parse_job_id(id_text)
        with self._db() as conn:
            job = services.get_job(conn, job_id, name)
        self.send_json(200, job_json(job))

    def handle_replay(self, name: str | None, id_text: str) -> None:
        body = self.read_body()  # optional: Rickover's clients send none, or {}
        new_id_text = _string(self._json_object(body), "id", required=False) if body else None
        new_id = parse_job_id(new_id_text) if new_id_text else None  # the client's: a second replay under it is the first
        job_id = parse_job_id(id_text)
        with self._db() as conn:
            job = services.replay(conn, job_id, name, new_id=new_id)
        self.server.metrics.enqueued.inc(job.name)
        self.send_json(201, job_json(job))

    def handle_homepage(self) -> None:
        config = self.server.config
        with self._db() as conn:
            overview = services.overview(conn)
        page = dashboard.render(overview, config.homepage_title, config.homepage_iframe_url)
        self.send_answer(200, page, {"Content-Type": "text/html; charset=utf-8", **dashboard.HEADERS})

    # --- jobrunner's additions ---

    def handle_list_job_types(self) -> None:
        with self._db() as conn:
            counts = services.list_job_types_with_counts(conn)
        types = [{**job_type_json(c.job_type), "queued": c.queued, "in_progress": c.in_progress, "due": c.due} for c in counts]
        self.send_json(200, {"job_types": types})

    def handle_update_job_type(self, name: str) -> None:
        body = self._read_json()
        _refuse_unknown(body, UPDATE_JOB_TYPE_FIELDS)
        attempts = _integer(body, "attempts", MAX_ATTEMPTS, required=False)
        concurrency = _integer(body, "concurrency", MAX_CONCURRENCY, required=False)
        with self._db() as conn:
            job_type = services.update_job_type(conn, name, attempts, concurrency, _settings(body))
        self.send_json(200, job_type_json(job_type))

    def handle_list_jobs(self, name: str) -> None:
        status = self._query_param("status")
        limit_text = self._query_param("limit") or "50"
        if not is_number(limit_text) or len(limit_text) > 6:
            raise HttpError(400, "invalid_parameter", f"Invalid limit: must be a whole number from 1 to {services.MAX_PAGE}")
        with self._db() as conn:
            jobs, cursor = services.list_jobs(conn, name, status, int(limit_text), self._query_param("cursor"))
        self.send_json(200, {"jobs": [job_json(job) for job in jobs], "next_cursor": cursor})

    def _query_param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def handle_cancel(self, name: str, id_text: str) -> None:
        self.read_body()
        job_id = parse_job_id(id_text)
        with self._db() as conn:
            job = services.cancel(conn, job_id, name)
        self.server.metrics.outcome(job)
        self.send_json(200, job_json(job))

    def handle_heartbeat(self, name: str, id_text: str) -> None:
        """The downstream is still working on the attempt: push its callback deadline (and the stuck-job clock) forward."""
        body = self._read_json()
        _refuse_unknown_fields(body, ("attempt", "extend"))
        attempt = _integer(body, "attempt", MAX_ATTEMPTS)
        extend = _number(body, "extend")
        job_id = parse_job_id(id_text)
        timeout = timedelta(seconds=self.server.config.job_timeout)
        with self._db() as conn:
            job, deadline = services.heartbeat(conn, job_id, name, attempt, extend, timeout, self.headers.get(CALLBACK_TOKEN_HEADER))
        self.server.metrics.heartbeats.inc(job.name)
        self.send_json(200, {**job_json(job), "deadline": timestamp(deadline)})

    def handle_pause(self, name: str) -> None:
        self.read_body()
        with self._db() as conn:
            job_type = services.pause_job_type(conn, name)
        self.send_json(200, job_type_json(job_type))

    def handle_resume(self, name: str) -> None:
        body = self.read_body()
        concurrency = _integer(self._json_object(body), "concurrency", MAX_CONCURRENCY, required=False) if body else None
        with self._db() as conn:
            job_type = services.resume_job_type(conn, name, concurrency)
        self.send_json(200, job_type_json(job_type))

    # --- schedules ---

    def handle_create_schedule(self) -> None:
        body = self._read_json()
        config_owned = body.pop("config_owned", False)
        if not isinstance(config_owned, bool):
            raise InvalidField("config_owned", "must be true or false")
        self._check_schedule_data(body)
        definition = timetable.validate(body)
        with self._db() as conn:
            schedules.create_schedule(conn, definition, config_owned)
            found = schedules.get_schedule(conn, definition.name)
        self.send_json(201, schedule_json(*found))

    def handle_list_schedules(self) -> None:
        with self._db() as conn:
            found = schedules.list_schedules(conn)
        self.send_json(200, {"schedules": [schedule_json(*pair) for pair in found]})

    def handle_get_schedule(self, name: str) -> None:
        with self._db() as conn:
            found = schedules.get_schedule(conn, name)
        self.send_json(200, schedule_json(*found))

    def handle_update_schedule(self, name: str) -> None:
        body = self._read_json()
        self._check_schedule_data(body)
        with self._db() as conn:
            schedules.update_schedule(conn, name, body)
            found = schedules.get_schedule(conn, name)
        self.send_json(200, schedule_json(*found))

    def handle_delete_schedule(self, name: str) -> None:
        self.read_body()
        with self._db() as conn:
            deleted = schedules.delete_schedule(conn, name)
        self.send_json(200, schedule_json(deleted, None))

    def handle_pause_schedule(self, name: str) -> None:
        self._schedule_switch(name, schedules.pause_schedule)

    def handle_resume_schedule(self, name: str) -> None:
        self._schedule_switch(name, schedules.resume_schedule)

    def _schedule_switch(self, name: str, switch) -> None:
        self.read_body()
        with self._db() as conn:
            switch(conn, name)
            found = schedules.get_schedule(conn, name)
        self.send_json(200, schedule_json(*found))

    def handle_run_schedule(self, name: str) -> None:
        self.read_body()
        with self._db() as conn:
            job = schedules.run_now(conn, name)
        self.server.metrics.enqueued.inc(job.name)
        self.send_json(201, job_json(job))

    def _check_schedule_data(self, body: dict) -> None:
        if "data" in body and self._data_too_large(body["data"]):
            raise HttpError(413, "entity_too_large", "Data parameter is too large (100KB max)")

    def handle_healthz(self) -> None:
        try:
            with self._db(timeout=1.0) as conn:
                store.ping_writable(conn)  # a load balancer must not send work to a host whose database is a standby
        except DatabaseUnavailable:
            # no detail: this route needs no credentials, and the driver's message names hosts and users
            raise HttpError(503, "service_unavailable", "The database is unavailable") from None
        self.send_json(200, {"status": "ok"})

    def handle_openapi(self) -> None:
        """The API's OpenAPI 3.1 document (jobrunner/openapi.json), for client generators."""
        self.send_answer(200, OPENAPI, {"Content-Type": "application/json; charset=utf-8"})

    def handle_metrics(self) -> None:
        server = self.server
        if server.publisher:
            server.publisher.publish()  # this server's counts, fresh, in the files every server adds up
            counted = metrics.collect(server.publisher.directory)
        else:
            counted = server.metrics
        gauges, names, schedule_names = self._queue_gauges()
        counted.include_job_types(names)
        counted.include_schedules(schedule_names)
        text = counted.render() + "\n".join(gauges) + "\n"
        self.send_answer(200, text.encode(), {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _queue_gauges(self) -> tuple[list[str], list[str], list[str]]:
        """What every host shares, from the database at scrape time (and the job types' and schedules' names); without it, only that it is down."""
        up = ["# HELP jobrunner_database_up 1 if this server reached the database for this scrape", "# TYPE jobrunner_database_up gauge"]
        try:
            with self._db(timeout=1.0) as conn:
                counts = services.list_job_types_with_counts(conn)
                found = [schedule for schedule, _ in schedules.list_schedules(conn)]
        except DatabaseUnavailable:
            return up + ["jobrunner_database_up 0"], [], []
        lines = up + ["jobrunner_database_up 1"]
        for metric, doc, value in (
            ("jobrunner_jobs_queued", "jobs waiting, due or not, by job type", lambda c: c.queued),
            ("jobrunner_jobs_due", "jobs waiting whose time has come, by job type", lambda c: c.due),
            ("jobrunner_jobs_in_progress", "jobs sent and awaiting their callback, by job type", lambda c: c.in_progress),
            ("jobrunner_job_type_concurrency", "the job type's concurrency (0: paused)", lambda c: c.job_type.concurrency),
        ):
            lines += render_gauges(metric, doc, "name", {c.job_type.name: value(c) for c in counts})
        for metric, doc, value in (
            ("jobrunner_schedule_next_tick_timestamp_seconds", "when the schedule's next tick is due (Unix time), by schedule", lambda s: s.next_tick.timestamp()),
            ("jobrunner_schedule_failing", "1 while the schedule cannot be evaluated (its error in the API), by schedule", lambda s: int(s.error is not None)),
            ("jobrunner_schedule_paused", "1 while the schedule is paused, by schedule", lambda s: int(s.paused)),
        ):
            lines += render_gauges(metric, doc, "schedule", {s.name: value(s) for s in found})
        return lines, [c.job_type.name for c in counts], [s.name for s in found]


# --- the server ----------------------------------------------------------------


class APIServer(ProtocolServer):
    """The API on an already-bound socket: its routes, database pool, batchers, metrics and authorizer."""

    def __init__(
        self,
        sock: socket.socket,
        config,
        pool: store.Pool,
        authorizer: Authorizer,
        counted: ServiceMetrics | None = None,
        publisher: metrics.Publisher | None = None,
    ):
        super().__init__(sock, Handler, config.read_timeout, config.max_request_threads, config.max_body_bytes)
        self.config = config
        self.pool = pool
        self.enqueuer = batching.EnqueueBatcher(pool)
        self.callbacks_batcher = batching.CallbackBatcher(pool)
        self.metrics = counted or ServiceMetrics()  # this process's
        self.publisher = publisher  # with the other processes of its supervisor, for /metrics (None: this one alone)
        self.authorizer = authorizer
        self._outage_logged_at = -OUTAGE_LOG_INTERVAL

    def note_outage(self, error: DatabaseUnavailable) -> None:
        """Log why the database is unavailable, once a minute while the outage lasts (the answers say only that it is)."""
        now = time.monotonic()
        if now >= self._outage_logged_at + OUTAGE_LOG_INTERVAL:
            self._outage_logged_at = now
            log.warning("answering 503: %s", error)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.metrics.http_requests.inc(route, str(status))
        self.metrics.http_latency.observe(seconds, route)

    def count_refused(self) -> None:
        self.metrics.http_requests.inc("busy", "503")

    def stop(self) -> None:
        """Stop gracefully (see ProtocolServer.stop_serving), then close the batchers and the database pool."""
        # half the graceful timeout, so that the batchers and the pool close before the supervisor kills
        self.stop_serving(within=min(self.config.read_timeout, self.config.graceful_timeout / 2))
        self.enqueuer.close()
        self.callbacks_batcher.close()
        self.pool.close()


def serve(
    config,
    sock: socket.socket,
    stop: threading.Event,
    ready: Callable[[], None] | None = None,
    counted: ServiceMetrics | None = None,
    publisher: metrics.Publisher | None = None,
) -> None:
    """Answer HTTP on `sock` until `stop` is set, then stop gracefully; the caller owns `sock`'s binding.

    `ready` is called once requests are being served and the database has answered.
    The server counts in `counted`; its /metrics adds up what every process
    publishes beside `publisher` (see metrics.py), or shows `counted` alone.
    """
    server = build(config, sock=sock, counted=counted, publisher=publisher)
    thread = threading.Thread(target=server.serve_forever, name="http-accept")
    thread.start()
    if ready and _database_answers(server.pool, stop):
        ready()
    try:
        stop.wait()
    finally:
        server.stop()
        thread.join()


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
    pool = store.Pool(config.database_url, config.server_pool_size, config.db_timeout, name="server", prepared_statements=config.prepared_statements)
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

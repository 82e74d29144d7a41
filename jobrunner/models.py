"""Job types, jobs, their states, and the rules for ids and names.

These are plain values: no I/O here.
"""

import dataclasses
import re
import uuid
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidField, InvalidJobId

AT_LEAST_ONCE = "at_least_once"
AT_MOST_ONCE = "at_most_once"
DELIVERY_STRATEGIES = (AT_LEAST_ONCE, AT_MOST_ONCE)

# queued_jobs.status
QUEUED = "queued"
IN_PROGRESS = "in-progress"
# archived_jobs.status
SUCCEEDED = "succeeded"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"  # jobrunner's: a queued job cancelled before it was sent
QUEUED_STATUSES = (QUEUED, IN_PROGRESS)
ARCHIVED_STATUSES = (SUCCEEDED, FAILED, EXPIRED, CANCELLED)

JOB_ID_PREFIX = "job_"
MAX_ATTEMPTS = 255  # the callback's `attempt` is a uint8 in Rickover's API
MAX_CONCURRENCY = 32767  # the column is a smallint
MIN_PRIORITY, MAX_PRIORITY = -32768, 32767  # a smallint
MAX_NAME_LENGTH = 100
# Deeper data could be stored (PostgreSQL has no such limit) and then not read back:
# the JSON decoder's recursion runs out at a depth that depends on the reading thread's stack.
MAX_DATA_DEPTH = 100
# Names travel unescaped in URLs (ours and the downstream's), so keep them URL-safe.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # any version


@dataclasses.dataclass(frozen=True)
class TypePolicy:
    """A job type's delivery settings (table jobrunner_job_type_settings); None: today's behaviour."""

    downstream_url: str | None = None  # base URL; /v1/jobs/<name>/<id> is appended
    downstream_timeout: float | None = None  # seconds to wait for the POST's answer
    job_timeout: float | None = None  # seconds a sent job may wait for its callback
    retry_min_backoff: float | None = None
    retry_max_backoff: float | None = None
    retry_max_doublings: int | None = None
    retry_max_duration: float | None = None  # seconds since the job's created_at
    rate_per_second: float | None = None
    rate_burst: int | None = None
    # secrets: never in a repr, so never in a log line
    callback_token: str | None = dataclasses.field(default=None, repr=False)
    signing_secrets: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # whsec_...; two during a rotation, the first signs


DEFAULT_POLICY = TypePolicy()

# A job type's callback token travels in this header: with each of its jobs' POSTs, and back on their callbacks.
CALLBACK_TOKEN_HEADER = "Jobrunner-Callback-Token"


@dataclasses.dataclass(frozen=True)
class JobType:
    name: str
    delivery_strategy: str
    attempts: int
    concurrency: int
    created_at: datetime
    policy: TypePolicy = DEFAULT_POLICY  # its delivery settings (a table of their own)


@dataclasses.dataclass(frozen=True)
class QueuedJob:
    id: uuid.UUID
    name: str
    attempts: int  # attempts remaining
    run_after: datetime
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    status: str  # QUEUED or IN_PROGRESS
    data: Any
    priority: int = 0  # higher first within its type

    @property
    def job_id(self) -> str:
        return format_job_id(self.id)


@dataclasses.dataclass(frozen=True)
class ArchivedJob:
    id: uuid.UUID
    name: str
    attempts: int  # attempts remaining when archived
    status: str  # SUCCEEDED, FAILED, EXPIRED or CANCELLED
    created_at: datetime  # when it was archived (Rickover's meaning)
    data: Any
    expires_at: datetime | None
    priority: int = 0  # what it had queued (a replay keeps it)

    @property
    def job_id(self) -> str:
        return format_job_id(self.id)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """A job type's retry settings (seconds); all None: Rickover's back-off, 2^(attempts used) seconds."""

    min_backoff: float | None = None
    max_backoff: float | None = None
    max_doublings: int | None = None
    max_duration: float | None = None  # since the job's created_at: a failure after it is final


def format_job_id(job_uuid: uuid.UUID) -> str:
    return JOB_ID_PREFIX + str(job_uuid)


def new_job_id() -> uuid.UUID:
    return uuid.uuid4()


def parse_job_id(job_id: str) -> uuid.UUID:
    """Parse `job_<uuid>` as Rickover does, but accept upper case and UUID versions 6-8.

    Like Rickover, the RFC 4122 variant is not checked: Rickover's own generated ids
    have the wrong variant bits and live on in old databases.
    """
    if len(job_id) < 36:
        raise InvalidJobId(f'Could not parse "{job_id}" as a UUID with a prefix')
    prefix, text = job_id[:-36], job_id[-36:].lower()
    # Blame the prefix only when a UUID follows it: `job_` and then garbage is a bad uuid.
    if prefix != JOB_ID_PREFIX and (_UUID_SHAPE.fullmatch(text) or not job_id.startswith(JOB_ID_PREFIX)):
        raise InvalidJobId(f"Please use {JOB_ID_PREFIX} for the uuid prefix, not {prefix}", wrong_prefix=True)
    if prefix != JOB_ID_PREFIX:
        raise InvalidJobId(f"Invalid UUID string: {job_id[len(JOB_ID_PREFIX):]} (expected job_ and a UUID)")
    if not _UUID_PATTERN.fullmatch(text):
        raise InvalidJobId(f"Invalid UUID string: {job_id[-36:]} (expected hex digits, version 1-8)")
    return uuid.UUID(text)


def validate_job_type_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidField("name", "must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidField("name", f"must be at most {MAX_NAME_LENGTH} characters")
    if not _NAME_PATTERN.fullmatch(name):
        raise InvalidField("name", "may hold only letters, digits, '_', '.' and '-', and must start with a letter or digit")
    if name.startswith(JOB_ID_PREFIX) or name == "random_id":
        raise InvalidField("name", f"must not start with {JOB_ID_PREFIX!r} or be 'random_id': such a name clashes with job URLs")
    return name


def validate_delivery_strategy(strategy: Any) -> str:
    if strategy not in DELIVERY_STRATEGIES:
        raise InvalidField("delivery_strategy", f"must be {AT_LEAST_ONCE!r} or {AT_MOST_ONCE!r}, not {strategy!r}")
    return strategy


def validate_data(data: Any) -> Any:
    """A job's data, any JSON, nested at most MAX_DATA_DEPTH arrays and objects deep (counted without recursion)."""
    level = [data]
    for _ in range(MAX_DATA_DEPTH + 1):
        level = [item for value in level if isinstance(value, (list, dict)) for item in (value.values() if isinstance(value, dict) else value)]
        if not level:
            return data
    raise InvalidField("data", f"must be nested at most {MAX_DATA_DEPTH} arrays and objects deep")


def validate_attempts(attempts: Any) -> int:
    """1-255 for both strategies: an at_most_once job uses more than one only when
    an attempt certainly never reached the downstream (Rickover required 1)."""
    return _require_int("attempts", attempts, 1, MAX_ATTEMPTS)


def validate_concurrency(concurrency: Any) -> int:
    return _require_int("concurrency", concurrency, 0, MAX_CONCURRENCY)


def validate_priority(priority: Any) -> int:
    return _require_int("priority", priority, MIN_PRIORITY, MAX_PRIORITY)


def _require_int(field: str, value: Any, low: int, high: int) -> int:
    # bool is an int in Python, but `true` is not a number of attempts.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidField(field, f"must be a whole number from {low} to {high}, not {value!r}")
    return value


# --- schedules -----------------------------------------------------------------

MISFIRE_POLICIES = ("skip", "once", "all")
MAX_MISFIRE_LIMIT = 1000
MAX_SECONDS = 10 * 366 * 86400  # ten years: an interval, offset or expiry beyond that is a typo
# The namespace of the ids of ticks' jobs: uuid5(SCHEDULE_NAMESPACE, "<schedule>@<tick in UTC>").
SCHEDULE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/jobrunner/schedules")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A stored schedule (jobrunner_schedules): a job of `job_type` with `data` at every tick."""

    name: str
    job_type: str
    data: Any
    cron: str | None  # a cron expression in `time_zone` (UTC when None), or
    time_zone: str | None
    interval_seconds: int | None  # ticks on the multiples of this many seconds since the Unix epoch
    run_after_offset: int  # seconds after the tick its job is due
    expires_after: int | None  # seconds after the tick its job expires
    misfire: str  # "skip", "once" or "all"
    misfire_limit: int  # "all": missed ticks enqueued at most
    paused: bool
    config_owned: bool
    next_tick: datetime
    last_tick: datetime | None
    last_job_id: uuid.UUID | None
    failures: int
    error: str | None
    retry_at: datetime | None
    created_at: datetime
    updated_at: datetime


def tick_job_id(schedule_name: str, tick: datetime) -> uuid.UUID:
    """The id of a tick's job: the same on every host for the same (schedule, tick), so enqueueing it twice is one job."""
    utc = tick.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return uuid.uuid5(SCHEDULE_NAMESPACE, f"{schedule_name}@{utc}")


def validate_schedule_name(name: Any) -> str:
    """A schedule's name follows a job type's rules (it travels in URLs too)."""
    return validate_job_type_name(name)

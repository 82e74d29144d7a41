"""When a schedule ticks, and which of its due ticks get a job: pure rules, no I/O.

A schedule's `Definition` is what a client (the API, the command line, a config
file) sets; `validate` builds one and says which field is wrong. Ticks come
from a cron expression in a time zone (cron.py does the calendar and the DST
rules) or from a fixed interval, on the multiples of that many seconds since
the Unix epoch (every 60 s: on the minute; every 3600 s: on the hour, UTC), so
every host computes the same ticks whenever it starts.

`due_ticks` applies the misfire policy to the ticks that came due while nobody
enqueued them (the service or the database was down, or the scheduler was late):
  skip  (default) missed ticks get no job; the latest due tick gets one if it is
        at most MISFIRE_GRACE late, so a slow round is not a misfire;
  once  the latest due tick gets one job, however late: one job for all missed;
  all   every missed tick gets its job, the latest `misfire_limit` of them (backfill).
"""

import dataclasses
import functools
import json
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

from . import cron
from .errors import InvalidField
from .models import MAX_MISFIRE_LIMIT, MAX_SECONDS, MISFIRE_POLICIES, Schedule, validate_data, validate_job_type_name

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MISFIRE_GRACE = timedelta(seconds=60)  # a tick at most this late is on time, not missed (Quartz's misfire threshold)
SCAN_LIMIT = 5000  # ticks one round walks through for one schedule; a longer outage takes more rounds
DEFAULT_MISFIRE_LIMIT = 100


@dataclasses.dataclass(frozen=True)
class Definition:
    """What a client sets on a schedule (the scheduler keeps the rest)."""

    name: str
    job_type: str
    data: Any = None
    cron: str | None = None
    time_zone: str | None = None
    interval_seconds: int | None = None
    run_after_offset: int = 0
    expires_after: int | None = None
    misfire: str = "skip"
    misfire_limit: int = DEFAULT_MISFIRE_LIMIT
    paused: bool = False

    def fields(self) -> dict[str, Any]:
        """Every field but the name, as the store writes them."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "name"}

    def same_ticks(self, other: "Definition") -> bool:
        return (self.cron, self.time_zone, self.interval_seconds) == (other.cron, other.time_zone, other.interval_seconds)


FIELDS = tuple(field.name for field in dataclasses.fields(Definition))
REQUIRED = ("name", "job_type")


def definition_of(schedule: Schedule) -> Definition:
    return Definition(**{field: getattr(schedule, field) for field in FIELDS})


def validate(fields: Mapping[str, Any]) -> Definition:
    """A definition from `fields` (absent or None: the default); InvalidField names the first wrong field."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise InvalidField(unknown[0], f"is not a field of a schedule (unknown: {', '.join(unknown)}; known: {', '.join(FIELDS)})")
    given = {key: value for key, value in fields.items() if value is not None}
    for field in REQUIRED:
        if field not in given:
            raise InvalidField(field, "is required")
    definition = Definition(**given)
    validate_job_type_name(definition.name)
    if not isinstance(definition.job_type, str) or not definition.job_type:
        raise InvalidField("job_type", "must be the name of a job type")
    try:
        validate_data(definition.data)
    except InvalidField as error:
        raise InvalidField("data", error.reason) from None
    _check_timing(definition)
    _whole_seconds("run_after_offset", definition.run_after_offset, 0)
    if definition.expires_after is not None:
        _whole_seconds("expires_after", definition.expires_after, 1)
    if definition.misfire not in MISFIRE_POLICIES:
        raise InvalidField("misfire", f"must be one of {', '.join(MISFIRE_POLICIES)}, not {definition.misfire!r}")
    _whole(definition.misfire_limit, "misfire_limit", 1, MAX_MISFIRE_LIMIT)
    if not isinstance(definition.paused, bool):
        raise InvalidField("paused", "must be true or false")
    return definition


def _check_timing(definition: Definition) -> None:
    if (definition.cron is None) == (definition.interval_seconds is None):
        raise InvalidField("cron", "give either cron (with an optional time_zone) or interval_seconds, not both or neither")
    if definition.interval_seconds is not None:
        if definition.time_zone is not None:
            raise InvalidField("time_zone", "applies to cron schedules only: an interval counts seconds, whatever the zone")
        _whole_seconds("interval_seconds", definition.interval_seconds, 1)
        return
    if not isinstance(definition.cron, str) or not definition.cron.strip():
        raise InvalidField("cron", "must be a cron expression such as '0 2 * * *' or '@daily'")
    if len(definition.cron) > 200:
        raise InvalidField("cron", "must be at most 200 characters")
    if definition.time_zone is not None:
        zone_of(definition.time_zone)
    try:
        _parse(definition.cron)
    except cron.CronError as error:
        raise InvalidField("cron", str(error)) from None


def _whole_seconds(field: str, value: Any, low: int) -> None:
    _whole(value, field, low, MAX_SECONDS, "seconds")


def _whole(value: Any, field: str, low: int, high: int, unit: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        what = f"a whole number of {unit}" if unit else "a whole number"
        raise InvalidField(field, f"must be {what} from {low} to {high}, not {value!r}")


def zone_of(name: str | None) -> tzinfo:
    """The IANA time zone `name` (UTC when None)."""
    if name is None:
        return cron.load_zone("UTC")
    if not isinstance(name, str) or len(name) > 100:
        raise InvalidField("time_zone", "must be an IANA time zone name such as Europe/Berlin")
    try:
        return cron.load_zone(name)
    except ValueError as error:
        raise InvalidField("time_zone", f"{error}: use an IANA name such as Europe/Berlin or UTC") from None


@functools.lru_cache(maxsize=1024)
def _parse(expression: str) -> "cron.Cron":
    return cron.parse(expression)


def parse_config_value(field: str, text: str) -> Any:
    """A definition's field from a config file's text (INI values are strings)."""
    if field == "data":
        try:
            return json.loads(text)
        except ValueError as error:
            raise InvalidField("data", f"is not JSON: {error}") from None
    if field in ("interval_seconds", "run_after_offset", "expires_after", "misfire_limit"):
        try:
            return int(text)
        except ValueError:
            raise InvalidField(field, f"must be a whole number, not {text!r}") from None
    if field == "paused":
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            raise InvalidField("paused", f"must be true or false, not {text!r}")
        return lowered in ("true", "yes", "on", "1")
    return text.strip() or None


# --- ticks ---------------------------------------------------------------------


def next_tick_after(definition: Definition | Schedule, after: datetime) -> datetime:
    """The schedule's first tick strictly after `after` (aware, UTC)."""
    if definition.interval_seconds is not None:
        step = timedelta(seconds=definition.interval_seconds)
        return EPOCH + ((after - EPOCH) // step + 1) * step
    return _parse(definition.cron).next_after(after, zone_of(definition.time_zone)).astimezone(timezone.utc)


@dataclasses.dataclass(frozen=True)
class Due:
    """What one round does with a due schedule."""

    enqueue: list[datetime]  # ticks that get their job, oldest first
    skipped: int  # missed ticks that get no job of their own
    next_tick: datetime  # where the schedule goes on from
    complete: bool  # False: SCAN_LIMIT ticks walked and still due; the next round goes on


def due_ticks(schedule: Schedule, now: datetime) -> Due:
    """Apply the schedule's misfire policy to its ticks from next_tick up to `now`."""
    keep = schedule.misfire_limit if schedule.misfire == "all" else 1
    latest: deque[datetime] = deque(maxlen=keep)
    walked = 0
    tick = schedule.next_tick
    while tick <= now and walked < SCAN_LIMIT:
        latest.append(tick)
        walked += 1
        tick = _later_tick(schedule, tick)
    if tick <= now:
        # a long outage: go on next round from the oldest tick that may still get a job
        return Due([], walked - len(latest), latest[0], complete=False)
    kept = list(latest)
    if schedule.misfire == "skip" and kept and now - kept[-1] > MISFIRE_GRACE:
        kept = []
    return Due(kept, walked - len(kept), tick, complete=True)


def _later_tick(schedule: Schedule, tick: datetime) -> datetime:
    later = next_tick_after(schedule, tick)
    if later <= tick:  # never expected of cron.next_after: a schedule that does not move on must not spin
        raise ValueError(f"the tick after {tick.isoformat()} is not later ({later.isoformat()})")
    return later


"""Cron expressions and interval schedules: when their ticks fall, in a time zone.

Pure stdlib (datetime, zoneinfo-compatible tzinfo); no I/O, no clock: every time is
an argument.

Interface
---------
parse(expression) -> Cron
    Five fields, `minute hour day-of-month month day-of-week`, separated by blanks;
    or a macro: @yearly = @annually (0 0 1 1 *), @monthly (0 0 1 * *),
    @weekly (0 0 * * 0), @daily = @midnight (0 0 * * *), @hourly (0 * * * *).
    Each field is a comma-separated list of elements:
        *        every value of the field
        n        one value
        a-b      a range, both ends included
        */s      every s-th value of the field, from its first (0 or 1)
        a-b/s    every s-th value from a to b
        a/s      every s-th value from a to the field's end
    Ranges: minute 0-59, hour 0-23, day of month 1-31, month 1-12 or JAN-DEC,
    day of week 0-7 or SUN-SAT (0 and 7 are both Sunday; a range may end at
    7 or SUN, as in FRI-SUN). Names and macros are case-insensitive. A step is
    1 up to the field's width minus one (`*/60` in minutes is an error: a
    step never carries into the next hour, use an interval schedule).
    Day rule (Vixie cron's, the cron of most Linux hosts): when both day fields are
    restricted, a day matches if EITHER matches (`0 0 1,15 * MON`: the 1st, the
    15th and every Monday); a day field that starts with `*` is unrestricted, so
    `0 0 */2 * MON` is "odd days of the month that are Mondays" (both must match).
    Raises CronError (a ValueError) naming the field and why: empty, too many or
    too few fields, unknown macro, unknown name, not a number, out of range, a
    backwards range, a bad step, or an expression that can never fire
    (`0 0 30 2 *`, `0 0 31 4,6,9,11 *`).
    Not supported, with why: seconds (a sixth field; use an interval schedule),
    Quartz's `?`, `L`, `W`, `#` (not cron's syntax), `@reboot` (a schedule has no
    boot), `@every` (use an interval schedule).

Cron.next_after(after, zone) -> datetime
    The first tick strictly after `after` (an aware datetime, any zone), as an aware
    UTC datetime, for the expression read as wall-clock time in `zone` (a ZoneInfo).
Cron.matches(wall) -> bool
    Whether a naive wall-clock time (to the minute) matches the fields.
Cron.follows_clock -> bool
    True when the expression fires in every hour of the day (its hour field
    covers 0-23); see the DST rules.
Cron.can_fire() -> bool
    Always True for a parsed Cron (parse refuses the others); kept for callers
    that hold one.
load_zone(name) -> ZoneInfo
    The IANA zone of that name; ValueError "unknown time zone 'X'" otherwise.
Interval(seconds, anchor=EPOCH)
    Ticks at anchor + k * seconds for every integer k (real time, no zone);
    seconds >= 1 (ValueError otherwise); next_after(after, zone) as Cron's,
    the zone is ignored.
ticks_between(schedule, start_exclusive, end_inclusive, zone, limit, *, latest=False)
    The ticks t of a Cron or Interval with start_exclusive < t <= end_inclusive,
    ascending, at most `limit` of them: the earliest ones, or with latest=True the
    latest ones (what misfire handling wants: `skip` and `once` need the last due
    tick, `all` up to N the last N). It jumps field by field (never minute by
    minute), and with latest=True searches backwards from the end in doubling
    windows, so an outage of a year costs about what its last ticks cost.

Time zones and DST
------------------
A Cron is read in the schedule's zone: `30 2 * * *` with Europe/Berlin is 02:30 on
Berlin's clocks, 01:30 UTC in winter and 00:30 UTC in summer. Twice a year the
clock skips an hour (spring forward: a gap of wall times that do not happen) or
repeats one (fall back: an overlap of wall times that happen twice). Two kinds of
expression behave differently there, as in Vixie cron:

* Times of day (the hour field does not cover all 24 hours: `30 2 * * *`,
  `0 9-17 * * MON-FRI`, `*/15 2 * * *`). Each matching wall time on the calendar
  fires exactly once:
    - in a gap, at the first instant after the gap (Berlin, last Sunday of March:
      02:30 does not exist, so `30 2 * * *` fires at 03:00 CEST = 01:00 UTC);
      several matching wall times in one gap fire once, together;
    - in an overlap, at the first occurrence only (Berlin, last Sunday of October:
      02:30 CEST = 00:30 UTC, not 02:30 CET = 01:30 UTC).
  So a daily job runs once every calendar day, never twice, never not at all.
* Clock-following expressions (the hour field covers all 24 hours: `0 * * * *`,
  `*/15 * * * *`, `* * * * *`). They fire at every real instant whose wall time
  matches: a skipped wall time does not fire (the next matching one is one real
  period later anyway), a repeated one fires at each occurrence. So `0 * * * *`
  fires every real hour and `*/15 * * * *` every real 15 minutes through both
  transitions (for zones whose shift is a whole hour).

Two ticks that fall on the same instant are one tick. The zone's rules come from
the system's tz database (or the tzdata package) through zoneinfo; the search
assumes a zone changes its UTC offset at most once in any two days (tzdata since
1970: at least seven days apart).
"""

from __future__ import annotations

import bisect
import calendar
import dataclasses
import re
from collections import deque
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
SECOND = timedelta(seconds=1)
# Offsets are probed this far apart to find a zone's changes between two instants
# (at most one change fits in a probe's span: see the module docstring).
_PROBE = timedelta(days=2)
_DIGITS = re.compile(r"[0-9]+")


class CronError(ValueError):
    """A cron expression that cannot be used; the message names the field and why."""


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] is the value low + i

    def value(self, text: str) -> int:
        if text == "":
            raise CronError(f"field {self.name!r}: a range is missing a number")
        if _DIGITS.fullmatch(text):
            number = int(text)
            top = 7 if self is _DAY_OF_WEEK else self.high  # 7 is Sunday too
            if not self.low <= number <= top:
                raise CronError(f"field {self.name!r}: {number} out of range {self.low}-{top}")
            return number
        if self.names and text.upper() in self.names:
            return self.low + self.names.index(text.upper())
        if self.names:
            raise CronError(f"field {self.name!r}: unknown name {text!r} (use {self.names[0]}-{self.names[-1]} or numbers)")
        raise CronError(f"field {self.name!r}: {text!r} is not a number")


_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DAY_OF_MONTH = _Field("day of month", 1, 31)
_MONTH = _Field("month", 1, 12, _MONTH_NAMES)
_DAY_OF_WEEK = _Field("day of week", 0, 6, _DAY_NAMES)
_FIELDS = (_MINUTE, _HOUR, _DAY_OF_MONTH, _MONTH, _DAY_OF_WEEK)
_FIELD_ORDER = "minute hour day-of-month month day-of-week"

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_UNSUPPORTED_MACROS = {
    "@reboot": "a schedule has no boot",
    "@every": "use an interval schedule",
}


def _parse_element(field: _Field, element: str) -> set[int]:
    if element == "":
        raise CronError(f"field {field.name!r}: empty list element")
    base, slash, step_text = element.partition("/")
    if base == "*":
        low, high = field.low, field.high
    else:
        ends = base.split("-")
        if len(ends) > 2:
            raise CronError(f"field {field.name!r}: {base!r} is not a value or a range")
        low = field.value(ends[0])
        high = field.value(ends[1]) if len(ends) == 2 else (field.high if slash else low)
        if field is _DAY_OF_WEEK and high == 0 and low > 0:
            high = 7  # FRI-SUN: Sunday as 7 ends a week's range
        if low > high:
            raise CronError(f"field {field.name!r}: range {base!r} is backwards")
    step = 1
    if slash:
        width = field.high - field.low
        if not _DIGITS.fullmatch(step_text) or not 1 <= int(step_text) <= width:
            raise CronError(f"field {field.name!r}: step {step_text!r} must be a whole number from 1 to {width}")
        step = int(step_text)
    return {value % 7 if field is _DAY_OF_WEEK else value for value in range(low, high + 1, step)}


def _parse_field(field: _Field, text: str) -> tuple[int, ...]:
    values: set[int] = set()
    for element in text.split(","):
        values |= _parse_element(field, element)
    return tuple(sorted(values))


def parse(expression: str) -> Cron:
    """Parse a five-field cron expression or a macro; raises CronError (see the module docstring)."""
    text = expression.strip()
    if not text:
        raise CronError("empty cron expression")
    if text.startswith("@"):
        macro = text.split()[0].lower()
        if macro in _UNSUPPORTED_MACROS:
            raise CronError(f"{macro} is not supported: {_UNSUPPORTED_MACROS[macro]}")
        if macro not in MACROS:
            raise CronError(f"unknown macro {text!r} (known: {', '.join(MACROS)})")
        if text.lower() != macro:
            raise CronError(f"{macro} takes no fields, got {text!r}")
        fields = MACROS[macro].split()
    else:
        fields = text.split()
    if len(fields) != 5:
        which = "too many" if len(fields) > 5 else "too few"
        raise CronError(f"{which} fields: expected 5 ({_FIELD_ORDER}), got {len(fields)}")
    minutes, hours, days, months, weekdays = (_parse_field(field, part) for field, part in zip(_FIELDS, fields))
    # Vixie cron: a day field starting with `*` does not restrict (see the docstring).
    either_day = not fields[2].startswith("*") and not fields[4].startswith("*")
    cron = Cron(text, minutes, hours, days, months, weekdays, either_day)
    if not cron.can_fire():
        raise CronError(f"never fires: no month of field 'month' ({fields[3]}) has a day of field 'day of month' ({fields[2]})")
    return cron


def load_zone(name: str) -> ZoneInfo:
    """The IANA time zone `name` (e.g. Europe/Berlin); ValueError naming it when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _next_value(values: tuple[int, ...], at_least: int) -> int | None:
    index = bisect.bisect_left(values, at_least)
    return values[index] if index < len(values) else None


def _offset(zone: tzinfo, instant: datetime) -> timedelta:
    return instant.astimezone(zone).utcoffset()


def _first_change(zone: tzinfo, after: datetime, until: datetime, offset: timedelta) -> datetime | None:
    """The first instant in (after, until] where the zone's offset is not `offset`, or None."""
    probe = after
    while probe < until:
        low, probe = probe, min(probe + _PROBE, until)
        if _offset(zone, probe) != offset:
            high = probe
            while high - low > SECOND:
                middle = low + (high - low) / 2
                if _offset(zone, middle) == offset:
                    low = middle
                else:
                    high = middle
            # tz rules change at whole seconds, and (low, high] holds one whole second
            return high.replace(microsecond=0)
    return None


@dataclasses.dataclass(frozen=True)
class Cron:
    """A parsed cron expression; build it with parse()."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]  # 0 = Sunday
    either_day: bool  # both day fields restricted: a day matches if either does

    def __str__(self) -> str:
        return self.expression

    @property
    def follows_clock(self) -> bool:
        return len(self.hours) == 24

    def can_fire(self) -> bool:
        if self.either_day:
            return True  # every month has every weekday
        return any(day <= calendar.monthrange(2000, month)[1] for month in self.months for day in self.days)

    def _day_matches(self, year: int, month: int, day: int) -> bool:
        in_month = day in self.days
        in_week = (calendar.weekday(year, month, day) + 1) % 7 in self.weekdays
        return (in_month or in_week) if self.either_day else (in_month and in_week)

    def matches(self, wall: datetime) -> bool:
        return (
            wall.minute in self.minutes
            and wall.hour in self.hours
            and wall.month in self.months
            and self._day_matches(wall.year, wall.month, wall.day)
        )

    def _next_wall(self, wall: datetime) -> datetime | None:
        """The first matching naive wall time at or after `wall` (whole minutes), None past year 9999."""
        try:
            while True:
                month = _next_value(self.months, wall.month)
                if month != wall.month:
                    wall = datetime(wall.year, month, 1) if month else datetime(wall.year + 1, self.months[0], 1)
                    continue
                if not self._day_matches(wall.year, wall.month, wall.day):
                    wall = datetime(wall.year, wall.month, wall.day) + timedelta(days=1)
                    continue
                hour = _next_value(self.hours, wall.hour)
                if hour is None:
                    wall = datetime(wall.year, wall.month, wall.day) + timedelta(days=1)
                    continue
                if hour != wall.hour:
                    wall = wall.replace(hour=hour, minute=0)
                minute = _next_value(self.minutes, wall.minute)
                if minute is None:
                    wall = wall.replace(minute=0) + timedelta(hours=1)
                    continue
                return wall.replace(minute=minute)
        except (OverflowError, ValueError):
            return None

    def next_after(self, after: datetime, zone: tzinfo) -> datetime:
        """The first tick strictly after `after`, in UTC; the DST rules are in the module docstring."""
        if after.tzinfo is None or after.utcoffset() is None:
            raise ValueError("next_after needs an aware datetime")
        # Walk the zone's stretches of constant offset forward from `after`; in each, wall
        # time and real time move together, so the first matching wall time is the answer
        # unless the offset changes before it.
        after = after.astimezone(UTC)
        offset = _offset(zone, after)
        start = after  # an instant before every instant still to be searched
        wall_from = (after + offset).replace(tzinfo=None, second=0, microsecond=0) + MINUTE
        while True:
            wall = self._next_wall(wall_from)
            if wall is None:
                raise ValueError(f"{self.expression!r} has no tick after {after.isoformat()} before year 10000")
            candidate = (wall - offset).replace(tzinfo=UTC)
            change = _first_change(zone, start, candidate, offset)
            if change is None:
                if self.follows_clock or self._first_occurrence(wall, zone) == candidate:
                    return candidate
                wall_from, start = wall + MINUTE, candidate  # the repeat of an overlap's wall time
                continue
            new_offset = _offset(zone, change)
            gap_end = (change + new_offset).replace(tzinfo=None)
            if new_offset > offset and not self.follows_clock and wall < gap_end:
                return change  # a wall time the gap skipped fires when the gap ends
            # Clock-following expressions see an overlap's wall times again; times of day
            # do not (their first occurrences were before `change`).
            wall_from = _ceil_minute(gap_end)
            if not self.follows_clock:
                wall_from = max(wall_from, wall)
            offset, start = new_offset, change

    @staticmethod
    def _first_occurrence(wall: datetime, zone: tzinfo) -> datetime:
        return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def _ceil_minute(wall: datetime) -> datetime:
    floor = wall.replace(second=0, microsecond=0)
    return floor if floor == wall else floor + MINUTE


@dataclasses.dataclass(frozen=True)
class Interval:
    """Ticks every `seconds` of real time, at anchor + k * seconds; the zone plays no part."""

    seconds: float
    anchor: datetime = EPOCH

    MIN_SECONDS = 1

    def __post_init__(self) -> None:
        if not self.seconds >= self.MIN_SECONDS:
            raise ValueError(f"an interval is at least {self.MIN_SECONDS} second, got {self.seconds}")
        if self.anchor.tzinfo is None:
            raise ValueError("an interval's anchor must be an aware datetime")

    @property
    def step(self) -> timedelta:
        return timedelta(seconds=self.seconds)

    def next_after(self, after: datetime, zone: tzinfo | None = None) -> datetime:
        if after.tzinfo is None or after.utcoffset() is None:
            raise ValueError("next_after needs an aware datetime")
        periods = (after - self.anchor) // self.step + 1
        return (self.anchor + periods * self.step).astimezone(UTC)


def ticks_between(
    schedule: Cron | Interval,
    start_exclusive: datetime,
    end_inclusive: datetime,
    zone: tzinfo,
    limit: int,
    *,
    latest: bool = False,
) -> list[datetime]:
    """Up to `limit` ticks in (start_exclusive, end_inclusive], ascending: the earliest, or the latest ones."""
    if limit < 1 or end_inclusive <= start_exclusive:
        return []
    if not latest:
        return _ticks(schedule, start_exclusive, end_inclusive, zone, limit)
    # Search windows ending at end_inclusive, doubling until one holds `limit` ticks
    # or reaches back to start_exclusive; keep the window's last `limit` ticks.
    width = MINUTE
    while True:
        window_start = max(start_exclusive, end_inclusive - width)
        found = _ticks(schedule, window_start, end_inclusive, zone, None, keep=limit)
        if len(found) >= limit or window_start == start_exclusive:
            return found
        width *= 2


def _ticks(schedule, start_exclusive, end_inclusive, zone, limit, keep=None) -> list[datetime]:
    """Ticks in (start_exclusive, end_inclusive]: the first `limit`, or the last `keep` of them all."""
    found: deque[datetime] = deque(maxlen=keep)
    tick = schedule.next_after(start_exclusive, zone)
    while tick <= end_inclusive and (limit is None or len(found) < limit):
        found.append(tick)
        tick = schedule.next_after(tick, zone)
    return list(found)

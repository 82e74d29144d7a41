"""Cron expressions: parsing, error messages, next ticks, DST in both hemispheres, misfire spans.

Pure functions: no database. The property test checks next_after against a
minute-by-minute simulation of the wall clock (the model the module docstring states).
"""

import functools
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from jobrunner.cron import MACROS, CronError, Interval, load_zone, parse, ticks_between

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
SYDNEY = ZoneInfo("Australia/Sydney")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # a DST shift of 30 minutes
MINUTE = timedelta(minutes=1)


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def walls(times, zone) -> list[str]:
    """Ticks as `local wall time + abbreviation = UTC`, the way the docs state them."""
    return [f"{t.astimezone(zone):%m-%d %H:%M %Z} = {t:%H:%M}Z" for t in times]


# (expression, after (UTC), the next tick (UTC)) read in UTC.
NEXT_TICKS = [
    ("* * * * *", utc(2026, 5, 1, 12, 0, 0), utc(2026, 5, 1, 12, 1)),
    ("* * * * *", utc(2026, 5, 1, 12, 0, 59, 999999), utc(2026, 5, 1, 12, 1)),
    ("*/15 * * * *", utc(2026, 5, 1, 12, 7), utc(2026, 5, 1, 12, 15)),
    ("*/15 * * * *", utc(2026, 5, 1, 12, 45), utc(2026, 5, 1, 13, 0)),
    ("0 * * * *", utc(2026, 12, 31, 23, 0), utc(2027, 1, 1, 0, 0)),
    ("30 2 * * *", utc(2026, 5, 1, 2, 30), utc(2026, 5, 2, 2, 30)),
    ("30 2 * * *", utc(2026, 5, 1, 2, 29, 59), utc(2026, 5, 1, 2, 30)),
    ("5-10/2 8-9 * * *", utc(2026, 5, 1, 8, 9), utc(2026, 5, 1, 9, 5)),
    ("7/20 * * * *", utc(2026, 5, 1, 8, 48), utc(2026, 5, 1, 9, 7)),
    ("0,30 9-17 * * MON-FRI", utc(2026, 5, 1, 17, 30), utc(2026, 5, 4, 9, 0)),  # Friday evening -> Monday
    ("0 0 1 * *", utc(2026, 1, 31, 12), utc(2026, 2, 1)),
    ("0 0 31 * *", utc(2026, 2, 1), utc(2026, 3, 31)),  # skips February and its 28 days
    ("0 12 * JAN,jul *", utc(2026, 2, 1), utc(2026, 7, 1, 12)),
    ("0 0 * * SUN", utc(2026, 5, 1), utc(2026, 5, 3)),
    ("0 0 * * 7", utc(2026, 5, 1), utc(2026, 5, 3)),  # 7 is Sunday too
    ("0 0 * * fri-sun", utc(2026, 5, 3, 1), utc(2026, 5, 8)),  # Sunday -> Friday
    ("0 0 * * 5-7", utc(2026, 5, 3, 1), utc(2026, 5, 8)),
    ("0 0 1,15 * MON", utc(2026, 5, 1, 1), utc(2026, 5, 4)),  # either day field: Monday the 4th first
    ("0 0 1,15 * MON", utc(2026, 5, 11, 1), utc(2026, 5, 15)),  # ... then Friday the 15th
    ("0 0 13 * FRI", utc(2026, 2, 13, 1), utc(2026, 2, 20)),  # Fridays and 13ths
    ("0 0 */2 * MON", utc(2026, 5, 1), utc(2026, 5, 11)),  # `*`-started day field: odd days AND Mondays
    ("0 0 * 2 MON", utc(2026, 1, 1), utc(2026, 2, 2)),  # day of month `*`: only the weekday counts
    ("0 0 29 2 *", utc(2026, 1, 1), utc(2028, 2, 29)),
    ("0 0 29 2 *", utc(2096, 3, 1), utc(2104, 2, 29)),  # 2100 is not a leap year
    ("0 0 29 2 MON", utc(2026, 3, 1), utc(2027, 2, 1)),  # either day: February's Mondays too
    ("@yearly", utc(2026, 1, 1), utc(2027, 1, 1)),
    ("@hourly", utc(2026, 1, 1, 0, 0, 1), utc(2026, 1, 1, 1)),
    ("@weekly", utc(2026, 5, 1), utc(2026, 5, 3)),
    ("@MONTHLY", utc(2026, 5, 1), utc(2026, 6, 1)),
]


@pytest.mark.parametrize("expression,after,expected", NEXT_TICKS)
def test_next_tick(expression, after, expected):
    assert parse(expression).next_after(after, UTC) == expected


def test_next_after_takes_any_aware_time_and_answers_in_utc():
    after = datetime(2026, 5, 1, 14, 10, tzinfo=BERLIN)  # 12:10 UTC
    tick = parse("*/15 * * * *").next_after(after, UTC)
    assert tick == utc(2026, 5, 1, 12, 15) and tick.tzinfo is UTC


def test_next_after_refuses_a_naive_time():
    with pytest.raises(ValueError, match="aware"):
        parse("* * * * *").next_after(datetime(2026, 5, 1), UTC)


def test_the_zone_decides_the_wall_time():
    cron = parse("30 2 * * *")
    assert cron.next_after(utc(2026, 1, 10), BERLIN) == utc(2026, 1, 10, 1, 30)  # CET, +1
    assert cron.next_after(utc(2026, 7, 10), BERLIN) == utc(2026, 7, 10, 0, 30)  # CEST, +2
    assert cron.next_after(utc(2026, 7, 10), SYDNEY) == utc(2026, 7, 10, 16, 30)  # AEST, +10


@pytest.mark.parametrize("macro,fields", sorted(MACROS.items()))
def test_a_macro_is_its_fields(macro, fields):
    by_macro, by_fields = parse(macro), parse(fields)
    after = utc(2026, 3, 5, 6, 7)
    assert [by_macro.next_after(after + timedelta(days=d), BERLIN) for d in range(0, 400, 37)] == [
        by_fields.next_after(after + timedelta(days=d), BERLIN) for d in range(0, 400, 37)
    ]


def test_fields_are_sets_of_values():
    cron = parse("0-10/5,58 */6 1,15-16 jan-MAR/2 sat-sun")
    assert cron.minutes == (0, 5, 10, 58)
    assert cron.hours == (0, 6, 12, 18)
    assert cron.days == (1, 15, 16)
    assert cron.months == (1, 3)
    assert cron.weekdays == (0, 6)
    assert cron.either_day
    assert not parse("0 0 */3 * 1").either_day
    assert str(cron) == "0-10/5,58 */6 1,15-16 jan-MAR/2 sat-sun"


# Every error message, with the expression that earns it.
ERRORS = [
    ("", "empty cron expression"),
    ("   ", "empty cron expression"),
    ("* * * *", "too few fields: expected 5 (minute hour day-of-month month day-of-week), got 4"),
    ("0 * * * * *", "too many fields: expected 5 (minute hour day-of-month month day-of-week), got 6"),
    ("@every 5m", "@every is not supported: use an interval schedule"),
    ("@reboot", "@reboot is not supported: a schedule has no boot"),
    ("@fortnightly", "unknown macro '@fortnightly' (known: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)"),
    ("@daily 5", "@daily takes no fields, got '@daily 5'"),
    ("60 * * * *", "field 'minute': 60 out of range 0-59"),
    ("* 24 * * *", "field 'hour': 24 out of range 0-23"),
    ("* * 0 * *", "field 'day of month': 0 out of range 1-31"),
    ("* * 32 * *", "field 'day of month': 32 out of range 1-31"),
    ("* * * 13 *", "field 'month': 13 out of range 1-12"),
    ("* * * * 8", "field 'day of week': 8 out of range 0-7"),
    ("*/0 * * * *", "field 'minute': step '0' must be a whole number from 1 to 59"),
    ("*/60 * * * *", "field 'minute': step '60' must be a whole number from 1 to 59"),
    ("* */24 * * *", "field 'hour': step '24' must be a whole number from 1 to 23"),
    ("* * * * */7", "field 'day of week': step '7' must be a whole number from 1 to 6"),
    ("*/ * * * *", "field 'minute': step '' must be a whole number from 1 to 59"),
    ("*/x * * * *", "field 'minute': step 'x' must be a whole number from 1 to 59"),
    ("1-5/2/2 * * * *", "field 'minute': step '2/2' must be a whole number from 1 to 59"),
    ("1,,2 * * * *", "field 'minute': empty list element"),
    ("1, * * * *", "field 'minute': empty list element"),
    ("x * * * *", "field 'minute': 'x' is not a number"),
    ("-1 * * * *", "field 'minute': a range is missing a number"),
    ("* 1- * * *", "field 'hour': a range is missing a number"),
    ("* 1-2-3 * * *", "field 'hour': '1-2-3' is not a value or a range"),
    ("* 5-2 * * *", "field 'hour': range '5-2' is backwards"),
    ("* * * JANUARY *", "field 'month': unknown name 'JANUARY' (use JAN-DEC or numbers)"),
    ("* * * * MONDAY", "field 'day of week': unknown name 'MONDAY' (use SUN-SAT or numbers)"),
    ("* * * * JAN", "field 'day of week': unknown name 'JAN' (use SUN-SAT or numbers)"),
    ("* MON * * *", "field 'hour': 'MON' is not a number"),
    ("* * * DEC-JAN *", "field 'month': range 'DEC-JAN' is backwards"),
    ("0 0 30 2 *", "never fires: no month of field 'month' (2) has a day of field 'day of month' (30)"),
    ("0 0 31 4,6,9,11 *", "never fires: no month of field 'month' (4,6,9,11) has a day of field 'day of month' (31)"),
    ("0 0 30-31 feb */2", "never fires: no month of field 'month' (feb) has a day of field 'day of month' (30-31)"),
]


@pytest.mark.parametrize("expression,message", ERRORS)
def test_error_message(expression, message):
    with pytest.raises(CronError) as raised:
        parse(expression)
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


def test_an_impossible_date_fires_when_the_weekday_can():
    # Both day fields restricted: either matches, so February's Mondays fire.
    assert parse("0 0 30 2 MON").next_after(utc(2026, 1, 1), UTC) == utc(2026, 2, 2)
    assert parse("0 0 30 2 MON").can_fire()


# DST. Berlin: 2026-03-29 02:00 CET -> 03:00 CEST (01:00Z); 2026-10-25 03:00 CEST -> 02:00 CET (01:00Z).
# Sydney: 2026-04-05 03:00 AEDT -> 02:00 AEST (04-04 16:00Z); 2026-10-04 02:00 AEST -> 03:00 AEDT (10-03 16:00Z).
DST_TICKS = [
    ("30 2 * * *", BERLIN, utc(2026, 3, 27, 12), ["03-28 02:30 CET = 01:30Z", "03-29 03:00 CEST = 01:00Z", "03-30 02:30 CEST = 00:30Z"]),
    ("30 2 * * *", BERLIN, utc(2026, 10, 23, 12), ["10-24 02:30 CEST = 00:30Z", "10-25 02:30 CEST = 00:30Z", "10-26 02:30 CET = 01:30Z"]),
    ("0 * * * *", BERLIN, utc(2026, 3, 28, 23, 30), ["03-29 01:00 CET = 00:00Z", "03-29 03:00 CEST = 01:00Z", "03-29 04:00 CEST = 02:00Z"]),
    ("0 * * * *", BERLIN, utc(2026, 10, 24, 23, 30), ["10-25 02:00 CEST = 00:00Z", "10-25 02:00 CET = 01:00Z", "10-25 03:00 CET = 02:00Z"]),
    ("*/15 * * * *", BERLIN, utc(2026, 3, 29, 0, 30), ["03-29 01:45 CET = 00:45Z", "03-29 03:00 CEST = 01:00Z", "03-29 03:15 CEST = 01:15Z", "03-29 03:30 CEST = 01:30Z"]),
    ("*/15 * * * *", BERLIN, utc(2026, 10, 25, 0, 30), ["10-25 02:45 CEST = 00:45Z", "10-25 02:00 CET = 01:00Z", "10-25 02:15 CET = 01:15Z", "10-25 02:30 CET = 01:30Z"]),
    ("30 2 * * *", SYDNEY, utc(2026, 4, 3, 0), ["04-04 02:30 AEDT = 15:30Z", "04-05 02:30 AEDT = 15:30Z", "04-06 02:30 AEST = 16:30Z"]),
    ("30 2 * * *", SYDNEY, utc(2026, 10, 2, 0), ["10-03 02:30 AEST = 16:30Z", "10-04 03:00 AEDT = 16:00Z", "10-05 02:30 AEDT = 15:30Z"]),
    ("0 * * * *", SYDNEY, utc(2026, 4, 4, 14, 30), ["04-05 02:00 AEDT = 15:00Z", "04-05 02:00 AEST = 16:00Z", "04-05 03:00 AEST = 17:00Z"]),
    ("0 * * * *", SYDNEY, utc(2026, 10, 3, 14, 30), ["10-04 01:00 AEST = 15:00Z", "10-04 03:00 AEDT = 16:00Z", "10-04 04:00 AEDT = 17:00Z"]),
    ("*/15 * * * *", SYDNEY, utc(2026, 4, 4, 15, 30), ["04-05 02:45 AEDT = 15:45Z", "04-05 02:00 AEST = 16:00Z", "04-05 02:15 AEST = 16:15Z", "04-05 02:30 AEST = 16:30Z"]),
    ("*/15 * * * *", SYDNEY, utc(2026, 10, 3, 15, 30), ["10-04 01:45 AEST = 15:45Z", "10-04 03:00 AEDT = 16:00Z", "10-04 03:15 AEDT = 16:15Z"]),
    # A time of day inside the hour that happens twice fires in its first pass only, and a
    # gap's matching wall times fire together, once, when the gap ends.
    ("*/20 2 * * *", BERLIN, utc(2026, 10, 24, 23), ["10-25 02:00 CEST = 00:00Z", "10-25 02:20 CEST = 00:20Z", "10-25 02:40 CEST = 00:40Z", "10-26 02:00 CET = 01:00Z"]),
    ("*/20 2 * * *", BERLIN, utc(2026, 3, 28, 23), ["03-29 03:00 CEST = 01:00Z", "03-30 02:00 CEST = 00:00Z"]),
    ("0 2,3 * * *", BERLIN, utc(2026, 3, 28, 23), ["03-29 03:00 CEST = 01:00Z", "03-30 02:00 CEST = 00:00Z"]),
]


@pytest.mark.parametrize("expression,zone,after,expected", DST_TICKS)
def test_dst(expression, zone, after, expected):
    ticks = ticks_between(parse(expression), after, after + timedelta(days=3), zone, len(expected))
    assert walls(ticks, zone) == expected


def test_a_tick_asked_for_from_inside_the_repeated_hour():
    cron = parse("*/20 2 * * *")
    # 02:10 CET, the second pass: 02:20 and 02:40 already fired in the first pass.
    assert walls([cron.next_after(utc(2026, 10, 25, 1, 10), BERLIN)], BERLIN) == ["10-26 02:00 CET = 01:00Z"]
    hourly = parse("*/20 * * * *")
    assert walls([hourly.next_after(utc(2026, 10, 25, 1, 10), BERLIN)], BERLIN) == ["10-25 02:20 CET = 01:20Z"]


def test_a_half_hour_shift():
    # Lord Howe: 2026-10-04 02:00 -> 02:30 (+10:30 -> +11, 10-03 15:30Z).
    assert walls(ticks_between(parse("15 2 * * *"), utc(2026, 10, 2), utc(2026, 10, 5), LORD_HOWE, 3), LORD_HOWE) == [
        "10-03 02:15 +1030 = 15:45Z",
        "10-04 02:30 +11 = 15:30Z",
        "10-05 02:15 +11 = 15:15Z",
    ]


def test_follows_clock():
    assert parse("*/15 * * * *").follows_clock
    assert parse("0 0-23 * * *").follows_clock
    assert not parse("30 2 * * *").follows_clock
    assert not parse("0 */2 * * *").follows_clock


def test_a_clock_jump_of_24_hours_yields_each_tick_once_and_no_burst_beyond_the_limit():
    cron = parse("*/15 * * * *")
    before, after_jump = utc(2026, 10, 24, 12), utc(2026, 10, 25, 12)  # across Berlin's fall back
    every = ticks_between(cron, before, after_jump, BERLIN, 1000)
    assert len(every) == 96  # every real quarter hour of the 24 (the repeated wall hour counts once per pass)
    assert len(set(every)) == 96 and every == sorted(every)
    assert all(b - a == timedelta(minutes=15) for a, b in zip(every, every[1:]))
    assert ticks_between(cron, before, after_jump, BERLIN, 3) == every[:3]
    assert ticks_between(cron, before, after_jump, BERLIN, 3, latest=True) == every[-3:]
    assert ticks_between(cron, before, after_jump, BERLIN, 1, latest=True) == [after_jump]
    daily = ticks_between(parse("30 2 * * *"), before, after_jump, BERLIN, 1000)
    assert walls(daily, BERLIN) == ["10-25 02:30 CEST = 00:30Z"]


def test_ticks_between_bounds():
    cron = parse("0 * * * *")
    start = utc(2026, 5, 1, 10)
    assert ticks_between(cron, start, start, UTC, 10) == []
    assert ticks_between(cron, start, start - MINUTE, UTC, 10) == []
    assert ticks_between(cron, start, start + timedelta(hours=3), UTC, 0) == []
    # start excluded, end included
    assert ticks_between(cron, start, start + timedelta(hours=2), UTC, 10) == [utc(2026, 5, 1, 11), utc(2026, 5, 1, 12)]
    assert ticks_between(cron, start, start + timedelta(hours=2), UTC, 10, latest=True) == [utc(2026, 5, 1, 11), utc(2026, 5, 1, 12)]


class CountingZone(ZoneInfo):
    """A zone that counts its conversions, to see how much a search costs."""

    conversions = 0

    def fromutc(self, dt):
        type(self).conversions += 1
        return super().fromutc(dt)


def test_a_yearly_tick_is_found_without_walking_the_year():
    zone = CountingZone.no_cache("Europe/Berlin")
    CountingZone.conversions = 0
    assert parse("0 0 1 1 *").next_after(utc(2026, 1, 2), zone) == utc(2026, 12, 31, 23)
    assert CountingZone.conversions < 400  # a probe every two days, not one a minute (525,600)


def test_the_latest_ticks_of_a_long_outage_cost_what_they_are():
    calls = 0
    cron = parse("* * * * *")

    class Counted:
        def next_after(self, after, zone):
            nonlocal calls
            calls += 1
            return cron.next_after(after, zone)

    ticks = ticks_between(Counted(), utc(2025, 1, 1), utc(2026, 1, 1), BERLIN, 5, latest=True)
    assert ticks == [utc(2025, 12, 31, 23, 56) + n * MINUTE for n in range(5)]
    assert calls < 50  # not the 525,600 minutes of the year


def test_interval():
    every_90s = Interval(90)
    assert every_90s.next_after(utc(2026, 5, 1, 0, 0, 0), None) == utc(2026, 5, 1, 0, 1, 30)
    assert every_90s.next_after(utc(2026, 5, 1, 0, 1, 30), BERLIN) == utc(2026, 5, 1, 0, 3, 0)
    anchored = Interval(2, anchor=utc(2026, 5, 1, 0, 0, 1))
    assert ticks_between(anchored, utc(2026, 5, 1), utc(2026, 5, 1, 0, 0, 7), UTC, 10) == [
        utc(2026, 5, 1, 0, 0, 1),
        utc(2026, 5, 1, 0, 0, 3),
        utc(2026, 5, 1, 0, 0, 5),
        utc(2026, 5, 1, 0, 0, 7),
    ]
    # Real time: the DST change neither adds nor drops a tick.
    hourly = ticks_between(Interval(3600), utc(2026, 10, 24, 22), utc(2026, 10, 25, 3), BERLIN, 100)
    assert hourly == [utc(2026, 10, 24, 23) + timedelta(hours=n) for n in range(5)]


def test_load_zone():
    assert load_zone("Europe/Berlin") == BERLIN
    assert load_zone("Australia/Sydney").utcoffset(datetime(2026, 1, 1)) == timedelta(hours=11)


@pytest.mark.parametrize("name", ["Europe/Atlantis", "", "../../etc/passwd", "/etc/localtime", "Europe/"])
def test_load_zone_refuses_what_is_not_a_zone(name):
    with pytest.raises(ValueError) as raised:
        load_zone(name)
    assert str(raised.value) == f"unknown time zone {name!r}"


@pytest.mark.parametrize("seconds", [0, 0.5, -1, float("nan")])
def test_an_interval_is_at_least_a_second(seconds):
    with pytest.raises(ValueError, match="at least 1 second"):
        Interval(seconds)


# The property: next_after agrees with a simulation of the wall clock, minute by minute.
ZONES = [BERLIN, SYDNEY, NEW_YORK, LORD_HOWE, ZoneInfo("America/Santiago"), UTC]
HORIZON = timedelta(hours=30)


@functools.cache
def transitions(zone) -> tuple[datetime, ...]:
    """The instants (to the minute) where the zone's offset changed in 2025-2027."""
    found, t = [], utc(2025, 1, 1)
    offset = t.astimezone(zone).utcoffset()
    while t < utc(2028, 1, 1):
        if (t + timedelta(days=1)).astimezone(zone).utcoffset() == offset:
            t += timedelta(days=1)
            continue
        for step in (timedelta(hours=1), MINUTE):
            while (t + step).astimezone(zone).utcoffset() == offset:
                t += step
        t += MINUTE
        found.append(t)
        offset = t.astimezone(zone).utcoffset()
    return tuple(found) or (utc(2026, 6, 1),)


def wall(instant, zone) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def simulated_first_tick(cron, after, zone):
    """The first whole minute after `after` where the model fires, within HORIZON, or None.

    Clock-following: the wall clock shows a matching time. Time of day: the wall clock
    reaches a matching time it has never shown before (so a gap's times fire when it
    ends, an overlap's second pass fires nothing).
    """
    t = after.replace(second=0, microsecond=0)
    shown = max(wall(t - n * MINUTE, zone) for n in range(3 * 60))  # the highest wall time shown so far
    while t < after + HORIZON:
        t += MINUTE
        now = wall(t, zone)
        if cron.follows_clock:
            fires = cron.matches(now)
        else:
            passed = now - shown
            fires = passed > timedelta(0) and any(cron.matches(now - n * MINUTE) for n in range(int(passed / MINUTE)))
            shown = max(shown, now)
        if fires and t > after:
            return t
    return None


def field(low, high):
    value = st.integers(low, high)
    element = st.one_of(
        st.just("*"),
        value.map(str),
        st.tuples(value, value).map(lambda p: f"{min(p)}-{max(p)}"),
        st.tuples(st.sampled_from(["*", f"{low}", f"{low + 1}-{high}"]), st.integers(1, high - low)).map(lambda p: f"{p[0]}/{p[1]}"),
    )
    return st.lists(element, min_size=1, max_size=3).map(",".join)


expressions = st.tuples(
    field(0, 59),
    st.one_of(st.just("*"), field(0, 23)),
    st.one_of(st.just("*"), st.just("*"), field(1, 31)),
    st.one_of(st.just("*"), st.just("*"), st.just("*"), field(1, 12)),
    st.one_of(st.just("*"), field(0, 7)),
).map(" ".join)


@st.composite
def near_a_transition(draw):
    zone = draw(st.sampled_from(ZONES))
    change = draw(st.sampled_from(transitions(zone)))
    seconds = draw(st.integers(-26 * 3600, 26 * 3600))
    return zone, change + timedelta(seconds=seconds, microseconds=draw(st.sampled_from([0, 1, 500000])))


@settings(max_examples=examples(80))
@given(expression=expressions, where=near_a_transition())
def test_next_after_agrees_with_the_wall_clock(expression, where):
    try:
        cron = parse(expression)
    except CronError:
        return  # e.g. a never-firing day; the error table covers those
    zone, after = where
    tick = cron.next_after(after, zone)
    assert tick > after and tick.tzinfo is UTC
    if cron.matches(wall(tick, zone)) is False:
        # The documented gap rule: the first instant after a gap that skipped a matching time.
        assert not cron.follows_clock
        assert tick.astimezone(zone).utcoffset() > (tick - MINUTE).astimezone(zone).utcoffset()
    expected = simulated_first_tick(cron, after, zone)
    if expected is None:
        assert tick >= after + HORIZON
    else:
        assert tick == expected


@settings(max_examples=examples(40))
@given(expression=expressions, where=near_a_transition(), hours=st.integers(1, 48), limit=st.integers(1, 5))
def test_ticks_between_is_next_after_repeated(expression, where, hours, limit):
    try:
        cron = parse(expression)
    except CronError:
        return
    zone, start = where
    end = start + timedelta(hours=hours)
    every, tick = [], cron.next_after(start, zone)
    while tick <= end:
        every.append(tick)
        tick = cron.next_after(tick, zone)
    assert ticks_between(cron, start, end, zone, 10**6) == every
    assert ticks_between(cron, start, end, zone, limit) == every[:limit]
    assert ticks_between(cron, start, end, zone, limit, latest=True) == every[-limit:]

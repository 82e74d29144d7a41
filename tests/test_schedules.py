"""Schedules against the real database: ticks, misfire policies, a bad row among good ones, config reconcile.

Time is pinned through the statements' `now` (the database clock in production),
and missed ticks are made by moving a schedule's next_tick into the past.
"""

from datetime import datetime, timedelta, timezone

import pytest
from conftest import count_rows, make_type

from jobrunner import schedules, store, timetable
from jobrunner.errors import InvalidField, ScheduleExists, UnknownSchedule
from jobrunner.models import tick_job_id
from jobrunner.timetable import Definition

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def every(seconds, name="tick", job_type="email", **fields) -> Definition:
    return timetable.validate({"name": name, "job_type": job_type, "interval_seconds": seconds, **fields})


def jobs_of(conn, name="email") -> dict:
    """id -> run_after of every job of the type, queued or archived."""
    rows = conn.execute(
        "SELECT id, run_after FROM queued_jobs WHERE name = %s UNION ALL SELECT id, NULL FROM archived_jobs WHERE name = %s", (name, name)
    ).fetchall()
    return dict(rows)


def set_next_tick(conn, name, tick):
    conn.execute("UPDATE jobrunner_schedules SET next_tick = %s WHERE name = %s", (tick, name))


def fire(conn, now):
    return {f.name: f for f in schedules.enqueue_due_ticks(conn, now=now)}


def test_an_interval_ticks_on_its_multiples_since_the_epoch_and_each_tick_is_one_job(conn):
    make_type(conn)
    created = schedules.create_schedule(conn, every(30), now=T0 + timedelta(seconds=7))
    assert created.next_tick == T0 + timedelta(seconds=30)
    assert fire(conn, T0 + timedelta(seconds=29)) == {}
    done = fire(conn, T0 + timedelta(seconds=30, milliseconds=40))["tick"]
    assert (done.enqueued, done.skipped) == (1, 0)
    assert jobs_of(conn) == {tick_job_id("tick", T0 + timedelta(seconds=30)): T0 + timedelta(seconds=30)}
    assert fire(conn, T0 + timedelta(seconds=31)) == {}  # moved on: the same instant again enqueues nothing
    schedule, status = schedules.get_schedule(conn, "tick")
    assert (schedule.next_tick, schedule.last_tick, status) == (T0 + timedelta(seconds=60), T0 + timedelta(seconds=30), "queued")
    assert schedule.last_job_id == tick_job_id("tick", T0 + timedelta(seconds=30))


def test_a_tick_enqueued_again_is_the_same_job(conn):
    """Were two evaluators ever to reach one tick, its id makes it one job."""
    make_type(conn)
    schedules.create_schedule(conn, every(10), now=T0)
    fire(conn, T0 + timedelta(seconds=10))
    set_next_tick(conn, "tick", T0 + timedelta(seconds=10))
    assert fire(conn, T0 + timedelta(seconds=10))["tick"].enqueued == 0
    assert count_rows(conn, "queued_jobs") == 1


def test_offsets_are_relative_to_the_tick(conn):
    make_type(conn)
    schedules.create_schedule(conn, every(60, run_after_offset=5, expires_after=120), now=T0)
    fire(conn, T0 + timedelta(seconds=61))
    job = conn.execute("SELECT run_after, expires_at FROM queued_jobs").fetchone()
    assert job == (T0 + timedelta(seconds=65), T0 + timedelta(seconds=180))


@pytest.mark.parametrize(
    "misfire, late, enqueued",
    [
        # ten ticks of 100 s missed; "now" 5 s after the last one (within the grace) or 65 s after it
        ("skip", 5, [9]),
        ("skip", 65, []),
        ("once", 65, [9]),
        ("all", 65, [7, 8, 9]),
    ],
)
def test_misfire_policies(conn, misfire, late, enqueued):
    make_type(conn)
    schedules.create_schedule(conn, every(100, misfire=misfire, misfire_limit=3), now=T0)
    first = T0 + timedelta(seconds=100)
    ticks = [first + timedelta(seconds=100 * n) for n in range(10)]
    now = ticks[-1] + timedelta(seconds=late)
    done = fire(conn, now)["tick"]
    assert sorted(jobs_of(conn)) == sorted(tick_job_id("tick", ticks[n]) for n in enqueued)
    assert (done.enqueued, done.skipped) == (len(enqueued), 10 - len(enqueued))
    schedule, _ = schedules.get_schedule(conn, "tick")
    assert schedule.next_tick == ticks[-1] + timedelta(seconds=100)  # the first tick after now: no burst follows
    assert fire(conn, now) == {}


def test_an_outage_longer_than_a_round_walks_is_caught_up_in_rounds_with_the_latest_ticks(conn):
    make_type(conn)
    schedules.create_schedule(conn, every(1, misfire="all", misfire_limit=5), now=T0)
    now = T0 + timedelta(seconds=3 * timetable.SCAN_LIMIT + 0.5)
    rounds = 0
    while done := fire(conn, now):
        rounds += 1
        assert rounds < 10
    assert rounds == 4
    latest = [T0 + timedelta(seconds=3 * timetable.SCAN_LIMIT - n) for n in range(5)]
    assert sorted(jobs_of(conn)) == sorted(tick_job_id("tick", tick) for tick in latest)
    del done


def test_a_schedule_of_a_paused_job_type_still_enqueues(conn):
    make_type(conn, concurrency=0)
    schedules.create_schedule(conn, every(10), now=T0)
    assert fire(conn, T0 + timedelta(seconds=10))["tick"].enqueued == 1


def test_a_broken_schedule_is_kept_aside_and_the_others_go_on(conn):
    make_type(conn)
    schedules.create_schedule(conn, every(10, name="good"), now=T0)
    schedules.create_schedule(conn, every(10, name="bad"), now=T0)
    # a row this host cannot evaluate: a zone its tzdata lacks (written past the API's checks)
    conn.execute("UPDATE jobrunner_schedules SET interval_seconds = NULL, cron = '* * * * *', time_zone = 'Mars/Olympus' WHERE name = 'bad'")
    done = fire(conn, T0 + timedelta(seconds=10))
    assert done["good"].enqueued == 1
    assert done["bad"].error and done["bad"].first_failure
    bad, _ = schedules.get_schedule(conn, "bad")
    assert bad.failures == 1 and "Mars/Olympus" in bad.error and bad.retry_at == T0 + timedelta(seconds=12)
    # backed off: the next round passes it by, the good one goes on
    assert set(fire(conn, T0 + timedelta(seconds=11))) == set()
    again = fire(conn, T0 + timedelta(seconds=20))
    assert again["good"].enqueued == 1 and not again["bad"].first_failure
    assert schedules.get_schedule(conn, "bad")[0].failures == 2
    # a change clears the error
    schedules.update_schedule(conn, "bad", {"interval_seconds": 10}, now=T0 + timedelta(seconds=21))
    fixed, _ = schedules.get_schedule(conn, "bad")
    assert (fixed.failures, fixed.error, fixed.cron, fixed.time_zone) == (0, None, None, None)
    assert fire(conn, T0 + timedelta(seconds=30))["bad"].enqueued == 1


def test_pause_and_resume_skip_the_paused_ticks(conn):
    make_type(conn)
    schedules.create_schedule(conn, every(10), now=T0)
    schedules.pause_schedule(conn, "tick", now=T0 + timedelta(seconds=1))
    assert fire(conn, T0 + timedelta(seconds=100)) == {}
    resumed = schedules.resume_schedule(conn, "tick", now=T0 + timedelta(seconds=105))
    assert resumed.next_tick == T0 + timedelta(seconds=110)
    assert fire(conn, T0 + timedelta(seconds=110))["tick"].enqueued == 1
    assert len(jobs_of(conn)) == 1


def test_run_now_is_an_extra_job_and_leaves_the_ticks_alone(conn):
    make_type(conn)
    schedules.create_schedule(conn, every(10, data={"k": 1}), now=T0)
    job = schedules.run_now(conn, "tick", now=T0 + timedelta(seconds=3))
    again = schedules.run_now(conn, "tick", now=T0 + timedelta(seconds=3))
    assert job.id != again.id and job.data == {"k": 1}
    schedule, status = schedules.get_schedule(conn, "tick")
    assert schedule.next_tick == T0 + timedelta(seconds=10) and schedule.last_job_id == again.id and status == "queued"


def test_changes_and_their_errors(conn):
    make_type(conn)
    schedules.create_schedule(conn, every(10), now=T0)
    with pytest.raises(ScheduleExists):
        schedules.create_schedule(conn, every(10), now=T0)
    with pytest.raises(InvalidField) as error:
        schedules.create_schedule(conn, every(10, name="other", job_type="nope"), now=T0)
    assert error.value.field == "job_type"
    with pytest.raises(InvalidField) as error:
        schedules.update_schedule(conn, "tick", {"colour": "red"})
    assert error.value.field == "colour"
    with pytest.raises(UnknownSchedule):
        schedules.update_schedule(conn, "nope", {"paused": True})
    # new timing starts from the first tick after now; other changes keep the next tick
    moved = schedules.update_schedule(conn, "tick", {"interval_seconds": 60}, now=T0 + timedelta(seconds=5))
    assert moved.next_tick == T0 + timedelta(seconds=60)
    kept = schedules.update_schedule(conn, "tick", {"data": [1]}, now=T0 + timedelta(seconds=6))
    assert kept.next_tick == T0 + timedelta(seconds=60) and kept.data == [1]
    schedules.delete_schedule(conn, "tick")
    with pytest.raises(UnknownSchedule):
        schedules.delete_schedule(conn, "tick")


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"interval_seconds": 0}, "interval_seconds"),
        ({"interval_seconds": 0.5}, "interval_seconds"),
        ({"interval_seconds": True}, "interval_seconds"),
        ({"cron": "* * * * *", "interval_seconds": None, "time_zone": "Not/AZone"}, "time_zone"),
        ({"time_zone": "UTC"}, "time_zone"),
        ({"interval_seconds": None}, "cron"),
        ({"misfire": "sometimes"}, "misfire"),
        ({"misfire_limit": 0}, "misfire_limit"),
        ({"run_after_offset": -1}, "run_after_offset"),
        ({"expires_after": 0}, "expires_after"),
        ({"paused": "no"}, "paused"),
        ({"name": "bad name"}, "name"),
        ({"job_type": 3}, "job_type"),
        ({"extra": 1}, "extra"),
    ],
)
def test_validation_names_the_field(fields, field):
    with pytest.raises(InvalidField) as error:
        timetable.validate({"name": "s", "job_type": "email", "interval_seconds": 5, **fields})
    assert error.value.field == field


def test_reconcile_owns_only_config_owned_schedules(conn):
    make_type(conn)
    make_type(conn, "report")
    schedules.create_schedule(conn, every(10, name="by-api"), now=T0)
    declared = (every(10, name="a"), every(20, name="by-api"))
    done = schedules.reconcile(conn, declared, now=T0)
    assert (done.created, done.updated, done.deleted, done.not_owned) == (["a"], [], [], ["by-api"])
    assert schedules.get_schedule(conn, "by-api")[0].interval_seconds == 10  # the API's, untouched
    assert schedules.get_schedule(conn, "a")[0].config_owned
    # changed, then dropped from the config
    done = schedules.reconcile(conn, (every(30, name="a", job_type="report"),), now=T0)
    assert done.updated == ["a"] and schedules.get_schedule(conn, "a")[0].job_type == "report"
    assert schedules.reconcile(conn, (every(30, name="a", job_type="report"),), now=T0).updated == []
    # handed over to the config: now it is reconciled like the others
    schedules.update_schedule(conn, "by-api", {"config_owned": True})
    done = schedules.reconcile(conn, (every(30, name="a", job_type="report"),), now=T0)
    assert done.deleted == ["by-api"]
    # one bad declaration: nothing changes
    with pytest.raises(InvalidField) as error:
        schedules.reconcile(conn, (every(5, name="b"), every(5, name="c", job_type="missing")), now=T0)
    assert error.value.field == "[schedule c] job_type"
    assert [s.name for s, _ in schedules.list_schedules(conn)] == ["a"]
    assert store.config_owned_schedules(conn) == ["a"]


# --- DST and clock jumps, through cron.next_after ---------------------------------

BERLIN = "Europe/Berlin"


def cron_schedule(conn, expression, created, name="tick", **fields):
    definition = timetable.validate({"name": name, "job_type": "email", "cron": expression, "time_zone": BERLIN, **fields})
    return schedules.create_schedule(conn, definition, now=created)


def run_rounds(conn, start, end, latency=timedelta(milliseconds=250)):
    """The scheduler's rounds from `start` to `end`, as a running one makes them: each when the database says
    the next tick is due, `latency` late."""
    now = start
    while now <= end:
        while fire(conn, now):  # a round that left ticks due runs again at once
            pass
        due_in = schedules.next_due_in(conn, now)
        if due_in is None:
            return
        now += timedelta(seconds=due_in) + latency


def ticks_enqueued(conn) -> list[datetime]:
    return sorted(run_after for run_after in jobs_of(conn).values())


@pytest.mark.parametrize(
    "start, days",
    [
        (datetime(2026, 3, 26, 12, tzinfo=timezone.utc), ["03-27", "03-28", "03-29", "03-30", "03-31"]),  # spring forward on the 29th
        (datetime(2026, 10, 22, 12, tzinfo=timezone.utc), ["10-23", "10-24", "10-25", "10-26", "10-27"]),  # fall back on the 25th
    ],
)
def test_a_daily_time_in_berlin_fires_once_every_calendar_day_across_a_dst_change(conn, start, days):
    make_type(conn)
    cron_schedule(conn, "30 2 * * *", start)
    run_rounds(conn, start, start + timedelta(days=5))
    local = [tick.astimezone(timetable.zone_of(BERLIN)) for tick in ticks_enqueued(conn)]
    assert [f"{tick:%m-%d}" for tick in local] == days  # no gap, no double
    assert all(tick.hour in (2, 3) for tick in local)  # 02:30, or 03:00 where 02:30 did not happen


@pytest.mark.parametrize(
    "day, hours",
    [(datetime(2026, 3, 29, tzinfo=timezone.utc), 23), (datetime(2026, 10, 25, tzinfo=timezone.utc), 25)],
)
def test_an_hourly_cron_fires_every_real_hour_across_a_dst_change(conn, day, hours):
    make_type(conn)
    zone = timetable.zone_of(BERLIN)
    midnight = day.replace(tzinfo=zone).astimezone(timezone.utc)  # the local day's start
    cron_schedule(conn, "0 * * * *", midnight - timedelta(minutes=1))
    run_rounds(conn, midnight - timedelta(minutes=1), midnight + timedelta(hours=hours) - timedelta(minutes=1))
    ticks = ticks_enqueued(conn)
    assert ticks == [midnight + timedelta(hours=n) for n in range(hours)]  # the local day's 23 or 25 hours, each once


@pytest.mark.parametrize("misfire, missed_jobs", [("skip", 0), ("once", 1), ("all", 3)])
def test_a_jump_of_days_makes_no_burst_and_no_gap_beyond_the_policy(conn, misfire, missed_jobs):
    """The service (or the host's clock) jumps three days and a bit: the policy decides the missed days, then one a day again."""
    make_type(conn)
    start = datetime(2026, 10, 22, 12, tzinfo=timezone.utc)
    cron_schedule(conn, "30 2 * * *", start, misfire=misfire)
    run_rounds(conn, start, start + timedelta(hours=20))  # the 23rd's tick
    assert len(ticks_enqueued(conn)) == 1
    after_jump = start + timedelta(days=3, hours=20)  # the 24th, 25th (fall back) and 26th missed
    run_rounds(conn, after_jump, after_jump)
    assert len(ticks_enqueued(conn)) == 1 + missed_jobs
    run_rounds(conn, after_jump, after_jump + timedelta(days=2))
    local = [f"{tick.astimezone(timetable.zone_of(BERLIN)):%m-%d}" for tick in ticks_enqueued(conn)]
    assert local == ["10-23", *["10-24", "10-25", "10-26"][3 - missed_jobs :], "10-27", "10-28"]


@pytest.mark.parametrize("misfire, jobs", [("skip", 1), ("once", 1), ("all", 100)])
def test_a_24_hour_jump_of_a_2_second_interval(conn, misfire, jobs):
    make_type(conn)
    schedules.create_schedule(conn, every(2, misfire=misfire), now=T0)
    fire(conn, T0 + timedelta(seconds=2))
    later = T0 + timedelta(hours=24, seconds=1)
    skipped = 0
    while done := fire(conn, later):
        skipped += done["tick"].skipped
    assert len(jobs_of(conn)) == 1 + jobs
    assert skipped == 24 * 3600 // 2 - 1 - jobs  # every tick from the 2nd to the last due: counted once each
    latest = T0 + timedelta(hours=24)
    assert tick_job_id("tick", latest) in jobs_of(conn)
    assert schedules.get_schedule(conn, "tick")[0].next_tick == latest + timedelta(seconds=2)

"""Schedules' lifecycle: the only code that changes a schedule, and the one transaction that turns its due ticks into jobs.

Exactly one job per tick, whatever the number of hosts: `enqueue_due_ticks` locks
the due schedules (FOR UPDATE SKIP LOCKED, due by the database's now()),
enqueues each tick's job under the id `tick_job_id(schedule, tick)` through the
ordinary idempotent enqueue, and moves the schedule's next_tick past now() in
the same transaction. Another scheduler either skips the locked row or, once
this one commits, no longer finds it due; and were a tick ever enqueued twice,
its id makes it one job (an archived id is never queued again).

A schedule that cannot be evaluated (a time zone this host's tzdata lacks, a
cron expression this version refuses) is undone alone (its own savepoint),
keeps its error on its row for the API and the dashboard, and is tried again
with back-off: the other schedules go on.

`now` is for tests that pin the instant; production passes nothing and the
database clock decides.
"""

import dataclasses
import logging
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from . import store, timetable
from .errors import DatabaseUnavailable, InvalidField, ScheduleExists, UnknownSchedule
from .models import QueuedJob, Schedule, new_job_id, tick_job_id
from .store import Connection, NewJob
from .timetable import Definition

log = logging.getLogger(__name__)

DUE_BATCH = 100  # schedules one transaction enqueues for
MAX_ERROR_DELAY = timedelta(minutes=5)  # the longest back-off of a schedule that fails


# --- changes -------------------------------------------------------------------


def create_schedule(conn: Connection, definition: Definition, config_owned: bool = False, now: datetime | None = None) -> Schedule:
    """A new schedule; its first tick is the first one after now (by the database's clock)."""
    with store.transaction(conn):
        _require_job_type(conn, definition.job_type)
        fields = {**definition.fields(), "config_owned": config_owned, "next_tick": _first_tick(conn, definition, now)}
        created = store.create_schedule(conn, definition.name, fields, now)
        if created is None:
            raise ScheduleExists(definition.name)
    return created


def update_schedule(conn: Connection, name: str, changes: dict[str, Any], now: datetime | None = None) -> Schedule:
    """Change some fields (a field set to None goes back to its default; absent ones stay).

    New timing (cron, time zone, interval), or a resume, starts from the first tick
    after now: the ticks a paused schedule passed are not misfires. `config_owned`
    may be among the changes.
    """
    changes = dict(changes)
    config_owned = changes.pop("config_owned", None)
    if config_owned is not None and not isinstance(config_owned, bool):
        raise InvalidField("config_owned", "must be true or false")
    with store.transaction(conn):
        current = _locked(conn, name)
        if "name" in changes and changes["name"] != name:
            raise InvalidField("name", "cannot change: create a schedule under the new name and delete this one")
        fields = {**dataclasses.asdict(timetable.definition_of(current)), **_switch_timing(changes), "name": name}
        new = timetable.validate(fields)
        return _rewrite(conn, current, new, current.config_owned if config_owned is None else config_owned, now)


def _switch_timing(changes: dict[str, Any]) -> dict[str, Any]:
    """A cron given to an interval schedule replaces its interval, and the other way round."""
    if changes.get("cron") is not None:
        return {"interval_seconds": None, **changes}
    if changes.get("interval_seconds") is not None:
        return {"cron": None, "time_zone": None, **changes}
    return changes


def _rewrite(conn: Connection, current: Schedule, new: Definition, config_owned: bool, now: datetime | None) -> Schedule:
    old = timetable.definition_of(current)
    if new.job_type != old.job_type:
        _require_job_type(conn, new.job_type)
    resumed = old.paused and not new.paused
    next_tick = current.next_tick if new.same_ticks(old) and not resumed else _first_tick(conn, new, now)
    fields = {**new.fields(), "config_owned": config_owned, "next_tick": next_tick}
    return store.update_schedule(conn, current.name, fields, now)


def pause_schedule(conn: Connection, name: str, now: datetime | None = None) -> Schedule:
    """No job for the ticks from now on, until resumed (a job already enqueued stays)."""
    return update_schedule(conn, name, {"paused": True}, now)


def resume_schedule(conn: Connection, name: str, now: datetime | None = None) -> Schedule:
    """Tick again from the first tick after now; a schedule that is not paused is left as it is."""
    return update_schedule(conn, name, {"paused": False}, now)


def delete_schedule(conn: Connection, name: str) -> Schedule:
    """Delete a schedule; the jobs it enqueued stay."""
    deleted = store.delete_schedule(conn, name)
    if deleted is None:
        raise UnknownSchedule(name)
    return deleted


def run_now(conn: Connection, name: str, now: datetime | None = None) -> QueuedJob:
    """An extra job now, with the schedule's data and offsets, under an id of its own: the ticks are not touched."""
    with store.transaction(conn):
        schedule = _locked(conn, name)
        at = store.database_now(conn, now)
        job_id = new_job_id()
        job = store.enqueue_job(conn, job_id, schedule.job_type, schedule.data, *_job_times(schedule, at), now)
        if job is None:
            raise InvalidField("job_type", f"job type {schedule.job_type!r} does not exist")
        store.set_last_job(conn, name, job_id)
    return job


def get_schedule(conn: Connection, name: str) -> tuple[Schedule, str | None]:
    """The schedule and the status of its last job."""
    found = store.list_schedules(conn, name)
    if not found:
        raise UnknownSchedule(name)
    return found[0]


def list_schedules(conn: Connection) -> list[tuple[Schedule, str | None]]:
    """Every schedule with the status of its last job (None once that job is no longer kept)."""
    return store.list_schedules(conn)


def _locked(conn: Connection, name: str) -> Schedule:
    schedule = store.get_schedule(conn, name, lock=True)
    if schedule is None:
        raise UnknownSchedule(name)
    return schedule


def _require_job_type(conn: Connection, name: str) -> None:
    if store.get_job_type(conn, name) is None:
        raise InvalidField("job_type", f"no job type named {name!r}: create it first")


def _first_tick(conn: Connection, definition: Definition, now: datetime | None) -> datetime:
    return timetable.next_tick_after(definition, store.database_now(conn, now))


def _job_times(schedule: Schedule, tick: datetime) -> tuple[datetime, datetime | None]:
    """A tick's job is due run_after_offset after the tick, and expires expires_after after it."""
    expires = None if schedule.expires_after is None else tick + timedelta(seconds=schedule.expires_after)
    return tick + timedelta(seconds=schedule.run_after_offset), expires


# --- config-declared schedules ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reconciled:
    created: list[str]
    updated: list[str]
    deleted: list[str]
    not_owned: list[str]  # declared, but a schedule of that name was made through the API: left alone


def reconcile(conn: Connection, declared: tuple[Definition, ...], now: datetime | None = None) -> Reconciled:
    """Make the config-owned schedules what the config declares, in one transaction (all or nothing).

    Creates what is missing, rewrites what differs and deletes config-owned ones no
    longer declared; a schedule made through the API is left alone unless marked
    config-owned. InvalidField (naming the schedule) when one cannot be stored.
    """
    done = Reconciled([], [], [], [])
    names = {definition.name for definition in declared}
    with store.transaction(conn):
        store.lock_schedule_reconcile(conn)  # another host's scheduler starting at the same moment waits
        for definition in declared:
            try:
                _reconcile_one(conn, definition, done, now)
            except InvalidField as error:
                raise InvalidField(f"[schedule {definition.name}] {error.field}", error.reason) from None
        for name in store.config_owned_schedules(conn):
            if name not in names:
                store.delete_schedule(conn, name)
                done.deleted.append(name)
    return done


def _reconcile_one(conn: Connection, definition: Definition, done: Reconciled, now: datetime | None) -> None:
    current = store.get_schedule(conn, definition.name, lock=True)
    if current is None:
        create_schedule(conn, definition, config_owned=True, now=now)
        done.created.append(definition.name)
    elif not current.config_owned:
        done.not_owned.append(definition.name)
    elif timetable.definition_of(current) != definition:
        _rewrite(conn, current, definition, True, now)
        done.updated.append(definition.name)


# --- ticks ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fired:
    """What a round did for one due schedule."""

    name: str
    enqueued: int = 0  # jobs inserted for its ticks
    skipped: int = 0  # missed ticks that got no job
    complete: bool = True  # False: a long outage's ticks are walked in several rounds
    error: str | None = None  # it could not be evaluated; tried again later
    first_failure: bool = False  # this error starts a run of failures: log it


def enqueue_due_ticks(conn: Connection, limit: int = DUE_BATCH, now: datetime | None = None) -> list[Fired]:
    """Enqueue the jobs of the due ticks of up to `limit` schedules and move them on, in one transaction."""
    with store.transaction(conn):
        at = store.database_now(conn, now)
        return [_fire(conn, schedule, at, now) for schedule in store.lock_due_schedules(conn, limit, now)]


def _fire(conn: Connection, schedule: Schedule, at: datetime, now: datetime | None) -> Fired:
    try:
        with store.transaction(conn):  # a savepoint: a schedule that fails is undone alone
            due = timetable.due_ticks(schedule, at)
            jobs = [NewJob(tick_job_id(schedule.name, tick), schedule.job_type, schedule.data, *_job_times(schedule, tick)) for tick in due.enqueue]
            inserted = store.enqueue_jobs(conn, jobs) if jobs else []
            last = due.enqueue[-1] if due.enqueue else None
            last_id: UUID | None = jobs[-1].id if jobs else None
            store.advance_schedule(conn, schedule.name, due.next_tick, last, last_id)
        return Fired(schedule.name, sum(job is not None for job in inserted), due.skipped, due.complete)
    except DatabaseUnavailable:
        raise
    except Exception as error:  # one bad row never stops the others: any error of this row's is kept on it
        before = store.record_schedule_error(conn, schedule.name, f"{type(error).__name__}: {error}", MAX_ERROR_DELAY, now)
        return Fired(schedule.name, error=str(error), first_failure=before == 0)


def next_due_in(conn: Connection, now: datetime | None = None) -> float | None:
    """Seconds until a schedule is due by the database's clock; None when none is active."""
    return store.next_schedule_due_in(conn, now)

"""Every SQL statement jobrunner runs, and nothing else.

Each statement is a named constant with named parameters, run by a function of
the same name. Statements that depend on the time take `now`: production passes
None and the database clock decides (one clock for every host); tests pass a
fixed instant. psycopg errors are turned into jobrunner errors here, so nothing
above this module imports psycopg.

Connections are in autocommit mode: a single statement is its own transaction,
and services open `store.transaction(conn)` around the few that need more than one.
"""

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Collection, Iterator
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import DatabaseError, DatabaseUnavailable, InvalidField, JobTypeExists, SchemaMissing
from .models import DEFAULT_POLICY, EXPIRED, FAILED, QUEUED, SUCCEEDED, ArchivedJob, JobType, QueuedJob, RetryPolicy, Schedule, TypePolicy

Connection = psycopg.Connection

# First key of jobrunner's two-key advisory locks, so they never meet an
# application's own advisory locks on the same database.
ADVISORY_LOCK_SPACE = 0x6A6F62  # "job"
SCHEMA_LOCK_KEY = 0
STOP_CHECK = 0.25  # seconds: how often a wait for a pooled connection looks at its stop event


@contextlib.contextmanager
def translated_errors(field: str = "request") -> Iterator[None]:
    """Turn psycopg errors into jobrunner errors; `field` names what bad data came from."""
    try:
        yield
    except (pg_errors.DataError, pg_errors.IntegrityError) as error:
        raise InvalidField(field, _reason(error)) from None
    except pg_errors.ReadOnlySqlTransaction as error:
        # a standby (or a primary being demoted): no write can succeed here until a failover ends
        raise DatabaseUnavailable(f"The database is read-only, a standby? ({_reason(error)})") from None
    except pg_errors.UndefinedTable as error:
        raise SchemaMissing(f"The database has no jobrunner schema ({_reason(error)}): run `jobrunner migrate`") from None
    except psycopg.OperationalError as error:
        raise DatabaseUnavailable(f"The database is unavailable: {_reason(error)}") from None
    except (psycopg.InternalError, psycopg.InterfaceError) as error:
        if error.sqlstate is not None:  # sent by the server: a statement it refused
            raise DatabaseError(f"The database refused a statement: {_reason(error)}") from error
        # raised by the client library on a connection that broke mid-statement (a pooler
        # dropping its server connection answers "received 2 results from command 'BEGIN'")
        raise DatabaseUnavailable(f"The database connection broke mid-statement: {_reason(error)}") from None
    except psycopg.Error as error:
        raise DatabaseError(f"The database refused a statement: {_reason(error)}") from error


@contextlib.contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    """One transaction (a savepoint when nested): all of the block's statements commit, or none."""
    with translated_errors(), conn.transaction():
        yield


def _reason(error: psycopg.Error) -> str:
    return (error.diag.message_primary or str(error)).strip()


def connect(url: str, name: str = "", *, prepared_statements: bool = True, **kwargs: Any) -> Connection:
    """An autocommit connection; `name` becomes its application_name unless the URL sets one.

    `prepared_statements=False` for a pooler in transaction mode that loses them (PgBouncer before 1.22).
    """
    with translated_errors():
        return psycopg.connect(url, autocommit=True, **application_name(url, name), **_preparing(prepared_statements), **kwargs)


def _preparing(prepared_statements: bool) -> dict[str, Any]:
    """psycopg prepares a statement run 5 times by default; prepare_threshold=None never does."""
    return {} if prepared_statements else {"prepare_threshold": None}


def application_name(url: str, name: str) -> dict[str, str]:
    """`jobrunner-<name>:<pid>` in pg_stat_activity tells an operator which process holds a connection."""
    try:
        if not name or "application_name" in conninfo_to_dict(url):
            return {}
    except psycopg.Error:
        return {}  # a malformed URL: connecting will say what is wrong with it
    return {"application_name": f"jobrunner-{name}:{os.getpid()}"}


# --- connection pools ----------------------------------------------------------


class Pool:
    """A fixed-size pool of autocommit connections that recovers by itself when the database returns."""

    def __init__(self, url: str, size: int, timeout: float, name: str = "", *, prepared_statements: bool = True):
        self._pool = ConnectionPool(
            url,
            min_size=size,
            max_size=size,
            kwargs={"autocommit": True, **application_name(url, name), **_preparing(prepared_statements)},
            timeout=timeout,
            # psycopg_pool doubles its reconnect delay until this timeout, then drops
            # the slot and grows back on demand: a short one keeps recovery quick
            reconnect_timeout=10,
            open=False,
            name=name or "jobrunner",
        )
        self._pool.open(wait=False)
        self._checking = threading.Lock()

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None, stop: threading.Event | None = None) -> Iterator[Connection]:
        """Borrow a connection; DatabaseUnavailable when none is to be had within the timeout, or once `stop` is set."""
        try:
            with translated_errors():
                conn = self._wait_for_connection(timeout, stop)
                try:
                    with conn:  # psycopg_pool's own connection(): commit or roll back, then give it back
                        yield conn
                finally:
                    self._pool.putconn(conn)
        except PoolTimeout:
            raise DatabaseUnavailable("The database is unavailable: no connection could be had in time") from None
        except DatabaseUnavailable:
            self._drop_broken_connections()
            raise

    def _wait_for_connection(self, timeout: float | None, stop: threading.Event | None) -> Connection:
        if stop is None:
            return self._pool.getconn(timeout=timeout)
        # in slices, so that a stop is heard while the database is down
        deadline = time.monotonic() + (self._pool.timeout if timeout is None else timeout)
        while True:
            try:
                return self._pool.getconn(timeout=max(0.001, min(STOP_CHECK, deadline - time.monotonic())))
            except PoolTimeout:
                if stop.is_set() or time.monotonic() >= deadline:
                    raise

    def _drop_broken_connections(self) -> None:
        # After a restart every idle connection is dead but does not know it yet:
        # test them all now rather than failing one request per connection.
        if self._checking.acquire(blocking=False):
            try:
                self._pool.check()
            finally:
                self._checking.release()

    def close(self) -> None:
        self._pool.close()


PING = "SELECT 1"


def ping(conn: Connection) -> None:
    with translated_errors():
        conn.execute(PING)


READ_ONLY = "SELECT current_setting('transaction_read_only') = 'on'"


def ping_writable(conn: Connection) -> None:
    """The database answers and takes writes: a standby (or a read-only setting) is as good as down for jobrunner."""
    with translated_errors():
        read_only = conn.execute(READ_ONLY).fetchone()[0]
    if read_only:
        raise DatabaseUnavailable("The database is read-only, a standby?")


# --- schema versions -----------------------------------------------------------

# Held until the end of the transaction that applies one migration, so that two
# `jobrunner migrate` at once take turns, and the second finds the work done.
LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(%(space)s, %(key)s)"

# The migrations' own record; made by `migrate` before the first migration, so it is
# part of no migration and of no schema.sql.
CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS jobrunner_schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamp with time zone NOT NULL DEFAULT now()
)
"""

# A query, not the table's absence as an error, so that a standby can answer it.
SCHEMA_MIGRATIONS_EXIST = "SELECT to_regclass('jobrunner_schema_migrations') IS NOT NULL"

SCHEMA_MIGRATIONS = "SELECT version, name, applied_at FROM jobrunner_schema_migrations ORDER BY version"

RECORD_SCHEMA_MIGRATION = "INSERT INTO jobrunner_schema_migrations (version, name) VALUES (%(version)s, %(name)s)"


def lock_schema(conn: Connection) -> None:
    """Wait for, then hold until the transaction ends, the lock every schema change takes; and
    make sure the record of migrations exists."""
    with translated_errors():
        conn.execute(LOCK_SCHEMA, {"space": ADVISORY_LOCK_SPACE, "key": SCHEMA_LOCK_KEY})
        conn.execute(CREATE_SCHEMA_MIGRATIONS)


def schema_migrations(conn: Connection) -> dict[int, tuple[str, datetime]] | None:
    """The migrations applied to the database, {version: (name, applied_at)}; None before any was recorded."""
    with translated_errors():
        if not conn.execute(SCHEMA_MIGRATIONS_EXIST).fetchone()[0]:
            return None
        return {version: (name, applied_at) for version, name, applied_at in conn.execute(SCHEMA_MIGRATIONS)}


def apply_migration(conn: Connection, version: int, name: str, sql: str) -> None:
    """Run one migration's SQL and record it; the caller holds the transaction and the lock."""
    try:
        conn.execute(sql.encode())  # bytes: a script of several statements, no parameters
    except psycopg.OperationalError as error:
        raise DatabaseUnavailable(f"The database is unavailable: {_reason(error)}") from None
    except psycopg.Error as error:  # not the caller's bad data, nor a missing schema: the migration's own failure
        raise DatabaseError(f"Migration {version:04d}_{name} failed: {_reason(error)}") from error
    with translated_errors():
        conn.execute(RECORD_SCHEMA_MIGRATION, {"version": version, "name": name})


# --- job types ---------------------------------------------------------------

# Creating or changing a type tells the workers at once (sent on commit).
CREATE_JOB_TYPE = """
WITH created AS (
    INSERT INTO jobs (name, delivery_strategy, attempts, concurrency)
    VALUES (%(name)s, %(delivery_strategy)s, %(attempts)s, %(concurrency)s)
    RETURNING *
)
SELECT *, pg_notify('jobrunner_types', name) AS notified FROM created
"""

GET_JOB_TYPE = "SELECT * FROM jobs WHERE name = %(name)s"

LIST_JOB_TYPES = "SELECT * FROM jobs ORDER BY name"

UPDATE_JOB_TYPE = """
WITH updated AS (
    UPDATE jobs
    SET attempts = coalesce(%(attempts)s, attempts),
        concurrency = coalesce(%(concurrency)s, concurrency)
    WHERE name = %(name)s
    RETURNING *
)
SELECT *, pg_notify('jobrunner_types', name) AS notified FROM updated
"""


def create_job_type(conn: Connection, name: str, delivery_strategy: str, attempts: int, concurrency: int) -> JobType:
    params = {"name": name, "delivery_strategy": delivery_strategy, "attempts": attempts, "concurrency": concurrency}
    with translated_errors("job type"), conn.cursor(row_factory=dict_row) as cur:
        try:
            return JobType(**_without(cur.execute(CREATE_JOB_TYPE, params).fetchone(), "notified"))
        except pg_errors.UniqueViolation:
            raise JobTypeExists(name) from None


def get_job_type(conn: Connection, name: str) -> JobType | None:
    with translated_errors(), conn.cursor(row_factory=class_row(JobType)) as cur:
        return cur.execute(GET_JOB_TYPE, {"name": name}).fetchone()


def list_job_types(conn: Connection) -> list[JobType]:
    with translated_errors(), conn.cursor(row_factory=class_row(JobType)) as cur:
        return cur.execute(LIST_JOB_TYPES).fetchall()


LIST_JOB_TYPES_WITH_COUNTS = """
SELECT j.*,
       count(q.id) FILTER (WHERE q.status = 'queued') AS queued,
       count(q.id) FILTER (WHERE q.status = 'in-progress') AS in_progress,
       count(q.id) FILTER (WHERE q.status = 'queued' AND q.run_after <= coalesce(%(now)s, now())) AS due
FROM jobs j
LEFT JOIN queued_jobs q ON q.name = j.name
GROUP BY j.name
ORDER BY j.name
"""


@dataclasses.dataclass(frozen=True)
class JobTypeCounts:
    job_type: JobType
    queued: int  # waiting, due or not
    in_progress: int
    due: int  # queued and due now


def list_job_types_with_counts(conn: Connection, now: datetime | None = None) -> list[JobTypeCounts]:
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(LIST_JOB_TYPES_WITH_COUNTS, {"now": now}).fetchall()
    counts = []
    for row in rows:
        queued, in_progress, due = row.pop("queued"), row.pop("in_progress"), row.pop("due")
        counts.append(JobTypeCounts(JobType(**row), queued, in_progress, due))
    return counts


# A job's retry back-off counts the attempts it used, from the total its type had
# when it was enqueued; the job row keeps only what remains. So before a type's
# attempts change, its queued jobs keep their total here (a table of jobrunner's
# own: Rickover reads every column of queued_jobs). An earlier total is truer
# and stays. The type's row is locked first: FOR UPDATE waits for enqueues in
# flight (they hold a key-share lock on it, see ENQUEUE_JOBS), so they are in the
# snapshot, and makes later ones wait and read the new attempts.
LOCK_JOB_TYPE_FOR_CHANGE = "SELECT 1 FROM jobs WHERE name = %(name)s FOR UPDATE"

SNAPSHOT_TOTAL_ATTEMPTS = """
INSERT INTO jobrunner_job_attempts (id, total_attempts)
SELECT q.id, j.attempts
FROM jobs j
JOIN queued_jobs q ON q.name = j.name
WHERE j.name = %(name)s AND j.attempts <> %(attempts)s
ON CONFLICT (id) DO NOTHING
"""


def update_job_type(conn: Connection, name: str, attempts: int | None, concurrency: int | None) -> JobType | None:
    params = {"name": name, "attempts": attempts, "concurrency": concurrency}
    with transaction(conn), translated_errors("job type"), conn.cursor(row_factory=dict_row) as cur:
        if attempts is not None:
            cur.execute(LOCK_JOB_TYPE_FOR_CHANGE, params)
            cur.execute(SNAPSHOT_TOTAL_ATTEMPTS, params)
        row = cur.execute(UPDATE_JOB_TYPE, params).fetchone()
    return None if row is None else JobType(**_without(row, "notified"))


# Pausing remembers the concurrency to go back to; a second pause keeps the first one's.
REMEMBER_CONCURRENCY = """
INSERT INTO jobrunner_paused_job_types (name, concurrency)
SELECT name, concurrency FROM jobs WHERE name = %(name)s AND concurrency > 0
FOR UPDATE  -- waits for a change of the type in flight, then reads what it committed
ON CONFLICT (name) DO NOTHING
"""

FORGET_CONCURRENCY = "DELETE FROM jobrunner_paused_job_types WHERE name = %(name)s RETURNING concurrency"

PAUSED_JOB_TYPES = "SELECT name, concurrency FROM jobrunner_paused_job_types"


def remember_concurrency(conn: Connection, name: str) -> None:
    with translated_errors():
        conn.execute(REMEMBER_CONCURRENCY, {"name": name})


def forget_concurrency(conn: Connection, name: str) -> int | None:
    """The concurrency the type had when it was paused (None if it was not), no longer remembered."""
    with translated_errors():
        row = conn.execute(FORGET_CONCURRENCY, {"name": name}).fetchone()
    return None if row is None else row[0]


def paused_job_types(conn: Connection) -> dict[str, int]:
    """Paused job types and the concurrency each goes back to on resume."""
    with translated_errors():
        return dict(conn.execute(PAUSED_JOB_TYPES).fetchall())



# --- job type settings -----------------------------------------------------------

# A type's delivery settings live in a side table (Rickover reads every column of
# `jobs`); a type without a row has today's behaviour. Saving one tells the workers
# at once (sent on commit), as a change of the type does.
JOB_TYPE_POLICIES = "SELECT * FROM jobrunner_job_type_settings"

JOB_TYPE_POLICY = "SELECT * FROM jobrunner_job_type_settings WHERE name = %(name)s"

SAVE_JOB_TYPE_POLICY = """
WITH saved AS (
    INSERT INTO jobrunner_job_type_settings (
        name, downstream_url, downstream_timeout, job_timeout,
        retry_min_backoff, retry_max_backoff, retry_max_doublings, retry_max_duration,
        rate_per_second, rate_burst, callback_token, signing_secrets)
    VALUES (
        %(name)s, %(downstream_url)s, %(downstream_timeout)s, %(job_timeout)s,
        %(retry_min_backoff)s, %(retry_max_backoff)s, %(retry_max_doublings)s, %(retry_max_duration)s,
        %(rate_per_second)s, %(rate_burst)s, %(callback_token)s, %(signing_secrets)s)
    ON CONFLICT (name) DO UPDATE SET
        downstream_url = EXCLUDED.downstream_url,
        downstream_timeout = EXCLUDED.downstream_timeout,
        job_timeout = EXCLUDED.job_timeout,
        retry_min_backoff = EXCLUDED.retry_min_backoff,
        retry_max_backoff = EXCLUDED.retry_max_backoff,
        retry_max_doublings = EXCLUDED.retry_max_doublings,
        retry_max_duration = EXCLUDED.retry_max_duration,
        rate_per_second = EXCLUDED.rate_per_second,
        rate_burst = EXCLUDED.rate_burst,
        callback_token = EXCLUDED.callback_token,
        signing_secrets = EXCLUDED.signing_secrets,
        updated_at = now()
    RETURNING name
)
SELECT pg_notify('jobrunner_types', name) FROM saved
"""

# Back to every default: no row at all, as for a type that never had settings.
DELETE_JOB_TYPE_POLICY = """
WITH deleted AS (DELETE FROM jobrunner_job_type_settings WHERE name = %(name)s RETURNING name)
SELECT pg_notify('jobrunner_types', name) FROM deleted
"""

_POLICY_FIELDS = tuple(field.name for field in dataclasses.fields(TypePolicy))


def _policy(row: dict) -> TypePolicy:
    values = {field: row[field] for field in _POLICY_FIELDS}
    return TypePolicy(**{**values, "signing_secrets": tuple(values["signing_secrets"] or ())})


def job_type_policies(conn: Connection) -> dict[str, TypePolicy]:
    """The settings of the job types that have any (the others have DEFAULT_POLICY)."""
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        return {row["name"]: _policy(row) for row in cur.execute(JOB_TYPE_POLICIES)}


def job_type_policy(conn: Connection, name: str) -> TypePolicy:
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(JOB_TYPE_POLICY, {"name": name}).fetchone()
    return DEFAULT_POLICY if row is None else _policy(row)


# The callback tokens of the named types that have one: their callbacks must present it.
CALLBACK_TOKENS = """
SELECT name, callback_token FROM jobrunner_job_type_settings
WHERE name = ANY(%(names)s) AND callback_token IS NOT NULL
"""


def callback_tokens(conn: Connection, names: Collection[str]) -> dict[str, str]:
    """Each named type's callback token, for those that have one."""
    with translated_errors():
        return dict(conn.execute(CALLBACK_TOKENS, {"names": list(names)}).fetchall())


def save_job_type_policy(conn: Connection, name: str, policy: TypePolicy) -> None:
    """Store a type's whole policy (the caller has validated it); DEFAULT_POLICY deletes its row."""
    with translated_errors("job type settings"):
        if policy == DEFAULT_POLICY:
            conn.execute(DELETE_JOB_TYPE_POLICY, {"name": name})
            return
        params = {"name": name, **dataclasses.asdict(policy)}
        conn.execute(SAVE_JOB_TYPE_POLICY, {**params, "signing_secrets": list(policy.signing_secrets) or None})


# --- enqueue and lookup --------------------------------------------------------

# Jobs inserted as queued, due at run_after (now when none). The batch travels as
# one JSON array: serialising it is one C call, where binding five Python lists as
# Postgres arrays costs more than the insert itself. One job is a batch of one.
ENQUEUE_JOBS = """
INSERT INTO queued_jobs (id, name, attempts, run_after, expires_at, created_at, updated_at, status, data, priority)
SELECT r.id, j.name, j.attempts, coalesce(r.run_after, %(now)s, now()), r.expires_at,
       coalesce(%(now)s, now()), coalesce(%(now)s, now()), 'queued',
       coalesce(r.data, 'null'),  -- jsonb_to_recordset reads a JSON null as SQL NULL
       r.priority
FROM jsonb_to_recordset(%(jobs)s::jsonb) AS r (id uuid, name text, run_after timestamptz, expires_at timestamptz, data jsonb, priority smallint)
JOIN jobs j ON j.name = r.name
-- an archived id is never queued again
WHERE NOT EXISTS (SELECT 1 FROM archived_jobs a WHERE a.id = r.id)
-- FOR KEY SHARE: a change of the type's attempts in flight is waited for and read
-- (see SNAPSHOT_TOTAL_ATTEMPTS); the foreign key takes this lock anyway
FOR KEY SHARE OF j
-- an id queued already, or repeated within the batch, is left as it is
ON CONFLICT (id) DO NOTHING
RETURNING id, attempts, run_after, expires_at, created_at
"""

# The insert above may have waited for a callback that was archiving one of these
# very ids (ON CONFLICT waits on the row being deleted, then inserts), and its NOT
# EXISTS used a snapshot from before that. This statement's snapshot is fresh: it
# undoes such an insert, so an id is never both queued and archived.
UNDO_ENQUEUES_OF_ARCHIVED_IDS = """
DELETE FROM queued_jobs
WHERE id = ANY (%(ids)s::text::uuid[]) AND EXISTS (SELECT 1 FROM archived_jobs a WHERE a.id = queued_jobs.id)
RETURNING id
"""


@dataclasses.dataclass(frozen=True)
class NewJob:
    id: UUID
    name: str
    data: Any
    run_after: datetime | None
    expires_at: datetime | None
    priority: int = 0


def enqueue_job(
    conn: Connection,
    job_id: UUID,
    name: str,
    data: Any,
    run_after: datetime | None,
    expires_at: datetime | None,
    now: datetime | None = None,
    priority: int = 0,
) -> QueuedJob | None:
    """Insert a queued job; None when nothing was inserted (id taken, archived, or no such type)."""
    [job] = enqueue_jobs(conn, [NewJob(job_id, name, data, run_after, expires_at, priority)], now)
    return job


def enqueue_jobs(conn: Connection, jobs: list[NewJob], now: datetime | None = None) -> list[QueuedJob | None]:
    """Insert many jobs in one transaction; for each, the job inserted, or None when it was not
    (its id taken or archived, its type unknown, or it repeats an id earlier in the list).

    InvalidField when a job cannot be stored and read back: nothing is stored. For a
    batch of one it names the field; for more, the callers enqueue one by one to learn it.
    The jobs returned carry the data as given: reading back what jsonb made of it
    would cost the server about 5 us more a job (batches of 200, 3.0 against 1.9 ms of client CPU).
    """
    firsts = {job.id: job for job in reversed(jobs)}  # a repeated id: its first job
    params = {"jobs": _json_batch(list(firsts.values())), "now": now}
    inserted: dict[UUID, QueuedJob] = {}
    with transaction(conn):
        with translated_errors("data"):
            try:
                with _reading_rows():
                    rows = conn.execute(ENQUEUE_JOBS, params).fetchall()
            except _Unreadable as error:
                # stored, but it could never be read, claimed or listed: undo it (the transaction rolls back)
                field = _unreadable_field(conn, next(iter(firsts))) if len(firsts) == 1 else "request"
                raise InvalidField(field, f"cannot be stored and read back ({error})") from None
        for job_id, attempts, run_after, expires_at, created_at in rows:
            job = firsts[job_id]
            inserted[job_id] = QueuedJob(job_id, job.name, attempts, run_after, expires_at, created_at, created_at, QUEUED, job.data, job.priority)
        if inserted:
            ids = "{" + ",".join(str(job_id) for job_id in inserted) + "}"  # an array literal: cheaper to send than a list
            for (job_id,) in conn.execute(UNDO_ENQUEUES_OF_ARCHIVED_IDS, {"ids": ids}):
                del inserted[job_id]
        if inserted:
            conn.execute(NOTIFY_JOBS, {"names": sorted({job.name for job in inserted.values()})})
    return [inserted.get(job.id) if firsts[job.id] is job else None for job in jobs]


def _json_batch(jobs: list[NewJob]) -> str:
    """The jobs as one JSON array; data which is not JSON is the caller's error, not the driver's."""
    try:
        return json.dumps(
            [
                {
                    "id": str(job.id),
                    "name": job.name,
                    "run_after": job.run_after and job.run_after.isoformat(),
                    "expires_at": job.expires_at and job.expires_at.isoformat(),
                    "data": job.data,
                    "priority": job.priority,
                }
                for job in jobs
            ],
            allow_nan=False,
        )
    except (TypeError, ValueError) as error:
        raise InvalidField("data", f"is not JSON: {error}") from None


# Each field of a just-inserted job that may hold what Postgres stores but Python cannot read.
READ_BACK_FIELDS = {
    "run_after": "SELECT run_after FROM queued_jobs WHERE id = %(id)s",
    "expires_at": "SELECT expires_at FROM queued_jobs WHERE id = %(id)s",
    "data": "SELECT data FROM queued_jobs WHERE id = %(id)s",
}


def _unreadable_field(conn: Connection, job_id: UUID) -> str:
    """The first field of a stored job that cannot be read back ("request" if none alone)."""
    for field, statement in READ_BACK_FIELDS.items():
        try:
            with translated_errors(), _reading_rows():
                conn.execute(statement, {"id": job_id}).fetchall()
        except _Unreadable:
            return field
    return "request"


# Wake the workers: these types have new jobs (sent on commit; repeats in one
# transaction are folded into one by Postgres).
NOTIFY_JOBS = "SELECT pg_notify('jobrunner_jobs', name) FROM unnest(%(names)s::text[]) AS name"

GET_QUEUED_JOB = "SELECT * FROM queued_jobs WHERE id = %(id)s"

GET_ARCHIVED_JOB = "SELECT * FROM archived_jobs WHERE id = %(id)s"

# A page of one type's jobs, queued and archived, newest first; the cursor is the
# (created_at, id) of the last job of the previous page. Each branch is limited
# on its own so that it can stop early.
LIST_JOBS = """
(
    SELECT 'queued' AS source, id, name, attempts, status::text, created_at, data, expires_at, priority, run_after, updated_at
    FROM queued_jobs
    WHERE name = %(name)s
      AND (%(statuses)s::text[] IS NULL OR status::text = ANY (%(statuses)s))
      AND (%(after_at)s::timestamptz IS NULL OR (created_at, id) < (%(after_at)s, %(after_id)s::uuid))
    ORDER BY created_at DESC, id DESC
    LIMIT %(limit)s
)
UNION ALL
(
    SELECT 'archived', id, name, attempts, status::text, created_at, data, expires_at, priority, NULL, NULL
    FROM archived_jobs
    WHERE name = %(name)s
      AND (%(statuses)s::text[] IS NULL OR status::text = ANY (%(statuses)s))
      AND (%(after_at)s::timestamptz IS NULL OR (created_at, id) < (%(after_at)s, %(after_id)s::uuid))
    ORDER BY created_at DESC, id DESC
    LIMIT %(limit)s
)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""


def list_jobs(
    conn: Connection, name: str, statuses: list[str] | None, limit: int, after: tuple[datetime, UUID] | None
) -> list[QueuedJob | ArchivedJob]:
    after_at, after_id = after or (None, None)
    params = {"name": name, "statuses": statuses, "limit": limit, "after_at": after_at, "after_id": after_id}
    jobs: list[QueuedJob | ArchivedJob] = []
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(LIST_JOBS, params):
            if row.pop("source") == "queued":
                jobs.append(QueuedJob(**row))
            else:
                del row["run_after"], row["updated_at"]
                jobs.append(ArchivedJob(**row))
    return jobs


def get_queued_job(conn: Connection, job_id: UUID) -> QueuedJob | None:
    with translated_errors(), conn.cursor(row_factory=class_row(QueuedJob)) as cur:
        return cur.execute(GET_QUEUED_JOB, {"id": job_id}).fetchone()


def get_archived_job(conn: Connection, job_id: UUID) -> ArchivedJob | None:
    with translated_errors(), conn.cursor(row_factory=class_row(ArchivedJob)) as cur:
        return cur.execute(GET_ARCHIVED_JOB, {"id": job_id}).fetchone()


# --- claim -------------------------------------------------------------------

# Claims of one job type are serialised by this lock, held to the end of the
# claim's transaction. The claim statement runs after it is granted, so its
# snapshot sees every claim committed before: counting in-progress jobs is then
# exact. (Counting inside one statement alone is racy under READ COMMITTED.)
# An advisory lock, not a row lock on `jobs`: it writes nothing and does not
# meet the key-share locks that enqueues take on the same row.
LOCK_JOB_TYPE_FOR_CLAIM = "SELECT pg_advisory_xact_lock(%(space)s, hashtext(%(name)s))"

CLAIM_JOBS = """
WITH RECURSIVE free_slots AS (
    -- the type's concurrency now (so a change applies at the next claim) less what is in flight
    SELECT greatest(0, j.concurrency - (
        SELECT count(*) FROM queued_jobs WHERE name = %(name)s AND status = 'in-progress'
    )) AS n
    FROM jobs j
    WHERE j.name = %(name)s
),
priorities AS (
    -- the priorities of the type's queued jobs, highest first, one index probe each
    -- (a loose index scan), read only as far as the candidates below need: one
    -- probe when every job has the same priority. Not one scan in (priority DESC,
    -- run_after) order: it would read past every job not yet due of a higher
    -- priority (a million scheduled for tomorrow) to reach the due ones below.
    (SELECT priority FROM queued_jobs WHERE name = %(name)s AND status = 'queued' ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (
        SELECT q.priority FROM queued_jobs q
        WHERE q.name = %(name)s AND q.status = 'queued' AND q.priority < p.priority
        ORDER BY q.priority DESC LIMIT 1
    )
    FROM priorities p
    WHERE p.priority IS NOT NULL
),
candidates AS MATERIALIZED (
    -- MATERIALIZED: a LIMIT subquery inlined into the UPDATE may run more than once
    -- and claim more rows than asked. Highest priority first (the nested loop keeps
    -- the order of `priorities`), then oldest due first, in exactly the order of the
    -- index queued_jobs_claim_by_priority (name, priority DESC, run_after, id): each
    -- scan stops after `limit` rows whatever the statistics say and however long
    -- the backlog. Rows another transaction holds (a cancel, a callback) are
    -- skipped, not waited for.
    SELECT c.id, p.priority, c.run_after
    FROM priorities p
    CROSS JOIN LATERAL (
        SELECT id, run_after
        FROM queued_jobs
        WHERE name = %(name)s AND status = 'queued' AND priority = p.priority
          AND run_after <= coalesce(%(now)s, now())
          AND (expires_at IS NULL OR expires_at > coalesce(%(now)s, now()))
        ORDER BY run_after, id
        LIMIT least(%(limit)s, coalesce((SELECT n FROM free_slots), 0))
        FOR UPDATE SKIP LOCKED
    ) c
    LIMIT least(%(limit)s, coalesce((SELECT n FROM free_slots), 0))
),
expiring AS MATERIALIZED (
    -- due jobs whose expires_at has passed are never sent, and take no slot; locked
    -- here, archived by the caller in this transaction (ARCHIVE_JOBS)
    SELECT *
    FROM queued_jobs
    WHERE name = %(name)s AND status = 'queued' AND expires_at <= coalesce(%(now)s, now())
      AND run_after <= coalesce(%(now)s, now())
    ORDER BY expires_at
    LIMIT %(expire_limit)s
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    -- = ANY(ARRAY(...)): primary-key lookups; a join here is planned as a scan of the whole table
    UPDATE queued_jobs q
    SET status = 'in-progress', updated_at = coalesce(%(now)s, now())
    WHERE q.id = ANY (ARRAY(SELECT id FROM candidates))
    RETURNING q.*
)
SELECT false AS expired, * FROM claimed
UNION ALL
SELECT true AS expired, * FROM expiring
ORDER BY priority DESC, run_after, id
"""
# At most this many expired jobs are archived by one claim; the next claim takes the rest.
EXPIRE_BATCH = 1000


# Seconds until job type j's next queued job comes due (<= 0: one is due now, and
# waits for a free slot); NULL when nothing is queued. One index probe. Written
# once, and made part of the two statements below (a constant, never data).
NEXT_DUE_IN = """(
    SELECT extract(epoch FROM min(q.run_after) - coalesce(%(now)s, now()))::float8
    FROM queued_jobs q WHERE q.name = j.name AND q.status = 'queued'
)"""

# After a claim that took fewer than it asked: when to look again.
NEXT_DUE = "SELECT " + NEXT_DUE_IN + " FROM (SELECT %(name)s::text AS name) AS j"

# A rate-limited type's token bucket, refilled for the time since its last claim
# and read, under the type's claim lock (LOCK_JOB_TYPE_FOR_CLAIM): no other claim
# of the type, in any process or host, runs until this transaction ends, so the
# bucket needs no lock of its own. A new bucket starts full. The limit is read
# here, from the settings, not from the worker's copy: a claim never spends under
# a limit that has changed. No row when the type has no limit (any more): the
# claim is not limited. The burst defaults to one second's worth, at least one
# job (policies.effective_burst). clock_timestamp(), not now(): the transaction
# began before the lock was granted, maybe long before; the refill never goes
# backwards (greatest), whatever the order in which claims got the lock.
TAKE_RATE_TOKENS = """
INSERT INTO jobrunner_rate_limits AS b (name, tokens, per_second, burst, refilled_at)
SELECT s.name, l.burst, s.rate_per_second, l.burst, coalesce(%(now)s, clock_timestamp())
FROM jobrunner_job_type_settings s
CROSS JOIN LATERAL (SELECT coalesce(s.rate_burst, greatest(1, ceil(s.rate_per_second)))::float8 AS burst) AS l
WHERE s.name = %(name)s AND s.rate_per_second > 0
ON CONFLICT (name) DO UPDATE SET
    tokens = least(
        EXCLUDED.burst,
        b.tokens + EXCLUDED.per_second * greatest(0, extract(epoch FROM EXCLUDED.refilled_at - b.refilled_at))
    ),
    per_second = EXCLUDED.per_second,
    burst = EXCLUDED.burst,
    refilled_at = greatest(b.refilled_at, EXCLUDED.refilled_at)
RETURNING tokens, per_second
"""

# The tokens a claim spent: one a job claimed.
SPEND_RATE_TOKENS = "UPDATE jobrunner_rate_limits SET tokens = tokens - %(spent)s WHERE name = %(name)s"


@dataclasses.dataclass
class Claim:
    jobs: list[QueuedJob]  # now in progress, yours to dispatch
    expired: list[QueuedJob]  # archived as expired instead, never to be sent
    # when fewer than asked were claimed: see NEXT_DUE; when due jobs wait for the
    # type's rate limit, the seconds until its next token
    next_due_in: float | None = None
    quarantined: list["Quarantined"] = dataclasses.field(default_factory=list)  # unreadable, archived failed
    next_token_in: float | None = None  # seconds until the rate limit's next token, when no whole one is left
    rate_limited: bool = False  # due jobs were left for want of a token


@dataclasses.dataclass(frozen=True)
class Quarantined:
    """A queued job whose row this code cannot read, archived `failed` so that it stops no claim."""

    id: UUID
    name: str
    reason: str


class ClaimOutcomeUnknown(DatabaseUnavailable):
    """The claim's COMMIT failed without an answer: its jobs may be in progress, or still queued.

    They were never sent: hand them back (`release_unsent_jobs`) once the database answers.
    """

    def __init__(self, message: str, jobs: list[QueuedJob]):
        super().__init__(message)
        self.jobs = jobs


class _Unreadable(Exception):
    """Rows came back that this code cannot decode (see `_unreadable_reason`)."""


def _unreadable_reason(error: BaseException) -> str | None:
    """Why a row could not be decoded, or None when `error` is something else.

    Postgres stores what Python cannot hold: a timestamptz outside years 1-9999 (a
    manual UPDATE, an old Rickover database), JSON nested deeper than Python parses.
    psycopg's loaders raise DataError without an SQLSTATE (the server's errors have one).
    """
    if isinstance(error, RecursionError):
        return f"data nested too deep to be read ({error})"
    if isinstance(error, psycopg.DataError) and error.sqlstate is None:
        return str(error)
    return None


@contextlib.contextmanager
def _reading_rows() -> Iterator[None]:
    try:
        yield
    except (psycopg.DataError, RecursionError) as error:
        reason = _unreadable_reason(error)
        if reason is None:
            raise
        raise _Unreadable(reason) from None


def claim_jobs(conn: Connection, name: str, limit: int, now: datetime | None = None, rate_limited: bool = False) -> Claim:
    """Claim up to `limit` due jobs of one type; jobs whose rows cannot be read are archived failed first.

    With `rate_limited`, the type's rate limit, if it still has one, bounds the claim
    too (TAKE_RATE_TOKENS); without, the claim reads nothing of rate limits.
    ClaimOutcomeUnknown when the commit got no answer (the claimed jobs travel with it).
    """
    quarantined: list[Quarantined] = []
    while True:
        try:
            claim = _claim_jobs_once(conn, name, limit, now, rate_limited)
        except _Unreadable as error:
            found = quarantine_unreadable_jobs(conn, name, limit, now)
            if not found:  # not where a claim reads (a race, or a bug): the type's error, backed off
                raise DatabaseError(f"A job of type {name!r} cannot be read: {error}") from None
            quarantined += found
            continue
        claim.quarantined = quarantined
        return claim


def _claim_jobs_once(conn: Connection, name: str, limit: int, now: datetime | None, rate_limited: bool) -> Claim:
    claim = Claim(jobs=[], expired=[])
    bucket = None
    decoded = False
    # The claim's snapshot is taken after the lock is granted: it sees every earlier
    # claim committed. Not pipelined: psycopg's pipeline mode cost more CPU than the
    # round trips it saves (drain 1,720 -> 1,981 jobs/s without it, bench/drain.py).
    try:
        with translated_errors(), conn.transaction():
            conn.execute(LOCK_JOB_TYPE_FOR_CLAIM, {"space": ADVISORY_LOCK_SPACE, "name": name})
            if rate_limited:
                bucket = conn.execute(TAKE_RATE_TOKENS, {"name": name, "now": now}).fetchone()
            allowed = limit if bucket is None else min(limit, math.floor(bucket[0]))
            params = {"name": name, "limit": allowed, "expire_limit": EXPIRE_BATCH, "now": now}
            with conn.cursor(row_factory=dict_row) as cur, _reading_rows():
                for row in cur.execute(CLAIM_JOBS, params).fetchall():
                    target = claim.expired if row.pop("expired") else claim.jobs
                    target.append(QueuedJob(**row))
            if claim.expired:
                archive_jobs(conn, [(job.id, job.name) for job in claim.expired], EXPIRED, expected_status=QUEUED, now=now)
            if bucket is not None and claim.jobs:
                conn.execute(SPEND_RATE_TOKENS, {"name": name, "spent": len(claim.jobs)})
            if len(claim.jobs) < limit:
                claim.next_due_in = conn.execute(NEXT_DUE, {"name": name, "now": now}).fetchone()[0]
                if bucket is not None:
                    _wait_for_tokens(claim, tokens_left=bucket[0] - len(claim.jobs), per_second=bucket[1])
            decoded = True  # what follows is the COMMIT
    except DatabaseUnavailable as error:
        # Lost at the COMMIT: it may have committed or not. The jobs were never
        # sent, and must not count as sent: the caller hands them back.
        if decoded and claim.jobs:
            raise ClaimOutcomeUnknown(str(error), claim.jobs) from None
        raise
    return claim


def _wait_for_tokens(claim: Claim, tokens_left: float, per_second: float) -> None:
    """Without a whole token left, the next claim waits (next_due_in) for the next token too."""
    if tokens_left >= 1 or claim.next_due_in is None:
        return  # a token is left, or nothing is queued
    claim.next_token_in = (1 - tokens_left) / per_second
    claim.rate_limited = claim.next_due_in <= 0  # due jobs are left for want of a token
    claim.next_due_in = max(claim.next_due_in, claim.next_token_in)


# The rows a claim of the type reads: due queued jobs in the claim's order, and due
# expired ones (see CLAIM_JOBS). Only their ids, which can always be read. Rare (a
# row that cannot be decoded), so one scan of the claim's index is good enough.
CLAIMABLE_JOB_IDS = """
(SELECT id FROM queued_jobs
 WHERE name = %(name)s AND status = 'queued' AND run_after <= coalesce(%(now)s, now())
 ORDER BY priority DESC, run_after, id LIMIT %(limit)s)
UNION
(SELECT id FROM queued_jobs
 WHERE name = %(name)s AND status = 'queued' AND expires_at <= coalesce(%(now)s, now())
   AND run_after <= coalesce(%(now)s, now())
 ORDER BY expires_at LIMIT %(expire_limit)s)
"""

READ_QUEUED_JOBS = "SELECT * FROM queued_jobs WHERE id = ANY (%(ids)s)"

READ_QUEUED_JOB_DATA = "SELECT data FROM queued_jobs WHERE id = %(id)s"

# An unreadable job is archived failed (with ARCHIVE_JOBS, in a transaction of its
# own), but not as it is, so that the archived row can be read: first an expires_at
# too near the ends of what Python holds (a day of margin covers any session time
# zone) becomes NULL, and unreadable data is kept as its text.
MAKE_QUEUED_JOB_READABLE = """
UPDATE queued_jobs
SET data = CASE WHEN %(data_readable)s THEN data ELSE to_jsonb(data::text) END,
    expires_at = CASE WHEN expires_at BETWEEN '0001-01-02T00:00:00Z' AND '9999-12-30T00:00:00Z' THEN expires_at END
WHERE id = %(id)s AND status = 'queued'
"""


def quarantine_unreadable_jobs(conn: Connection, name: str, limit: int, now: datetime | None = None) -> list[Quarantined]:
    """Archive as failed the jobs a claim of `name` would read but cannot decode; what was archived."""
    params = {"name": name, "limit": limit, "expire_limit": EXPIRE_BATCH, "now": now}
    with translated_errors():
        ids = [job_id for (job_id,) in conn.execute(CLAIMABLE_JOB_IDS, params)]
    quarantined = []
    for job_id, reason in _unreadable_jobs(conn, ids):
        with translated_errors():
            try:
                with _reading_rows():
                    conn.execute(READ_QUEUED_JOB_DATA, {"id": job_id}).fetchall()
                data_readable = True
            except _Unreadable:
                data_readable = False
        with transaction(conn):
            conn.execute(MAKE_QUEUED_JOB_READABLE, {"id": job_id, "data_readable": data_readable})
            if archive_job(conn, job_id, name, FAILED, 0, expected_status=QUEUED, now=now) is not None:
                quarantined.append(Quarantined(job_id, name, reason))
    return quarantined


def _unreadable_jobs(conn: Connection, ids: list[UUID]) -> list[tuple[UUID, str]]:
    """(id, reason) of each job of `ids` whose row cannot be decoded: read in halves, down to the bad rows."""
    if not ids:
        return []
    try:
        with translated_errors(), _reading_rows(), conn.cursor(row_factory=class_row(QueuedJob)) as cur:
            cur.execute(READ_QUEUED_JOBS, {"ids": ids}).fetchall()
        return []
    except _Unreadable as error:
        if len(ids) == 1:
            return [(ids[0], str(error))]
    middle = len(ids) // 2
    return _unreadable_jobs(conn, ids[:middle]) + _unreadable_jobs(conn, ids[middle:])


# A claim's jobs whose COMMIT got no answer go back to the queue, without using an
# attempt: they were never sent. Only if still exactly as that claim left them
# (attempts and updated_at): if it did not commit, or something moved them on since,
# this changes nothing.
RELEASE_UNSENT_JOBS = """
WITH released AS (
    UPDATE queued_jobs q
    SET status = 'queued', updated_at = now()
    FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(updated_at)s::timestamptz[]) AS c (id, attempts, updated_at)
    WHERE q.id = c.id AND q.status = 'in-progress' AND q.attempts = c.attempts AND q.updated_at = c.updated_at
    RETURNING q.id, q.name
)
SELECT id, pg_notify('jobrunner_jobs', name) AS notified FROM released
"""


def release_unsent_jobs(conn: Connection, jobs: list[QueuedJob]) -> list[UUID]:
    """Queue again claimed jobs that were never sent (see ClaimOutcomeUnknown); the ids that were in progress."""
    params = {
        "ids": [job.id for job in jobs],
        "attempts": [job.attempts for job in jobs],
        "updated_at": [job.updated_at for job in jobs],
    }
    with translated_errors():
        return [job_id for job_id, _ in conn.execute(RELEASE_UNSENT_JOBS, params)]


# What a worker needs to know of every type: how many may run, whether one is
# due now, and in how many seconds the next comes due. One index probe per type.
POLL_JOB_TYPES = "SELECT j.name, j.concurrency, " + NEXT_DUE_IN + " AS next_due_in FROM jobs j ORDER BY j.name"


@dataclasses.dataclass(frozen=True)
class JobTypeState:
    name: str
    concurrency: int
    next_due_in: float | None  # seconds; <= 0 means due now; None means nothing queued


def poll_job_types(conn: Connection, now: datetime | None = None) -> list[JobTypeState]:
    with translated_errors(), conn.cursor(row_factory=class_row(JobTypeState)) as cur:
        return cur.execute(POLL_JOB_TYPES, {"now": now}).fetchall()


# --- maintenance (the watcher) -------------------------------------------------

# Due jobs whose expires_at has passed, of every type, locked to be archived as
# expired (a claim does the same for its type; this covers paused and idle types).
LOCK_EXPIRED_JOBS = """
SELECT id, name FROM queued_jobs
WHERE status = 'queued' AND expires_at <= coalesce(%(now)s, now()) AND run_after <= coalesce(%(now)s, now())
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

# Archived jobs older than the retention, one type and one small batch at a time
# (through the (name, created_at) index, so that no statement holds many locks).
DELETE_OLD_ARCHIVED_JOBS = """
DELETE FROM archived_jobs
WHERE id IN (
    SELECT id FROM archived_jobs
    WHERE name = %(name)s AND created_at < coalesce(%(now)s, now()) - %(older_than)s
    LIMIT %(limit)s
)
"""


# Totals kept for jobs that are archived now (see SNAPSHOT_TOTAL_ATTEMPTS), a small batch at a time.
DELETE_ATTEMPTS_OF_ARCHIVED_JOBS = """
DELETE FROM jobrunner_job_attempts
WHERE id IN (
    SELECT t.id FROM jobrunner_job_attempts t
    WHERE NOT EXISTS (SELECT 1 FROM queued_jobs q WHERE q.id = t.id)
    LIMIT %(limit)s
)
"""


def delete_attempts_of_archived_jobs(conn: Connection, limit: int) -> int:
    with translated_errors():
        return conn.execute(DELETE_ATTEMPTS_OF_ARCHIVED_JOBS, {"limit": limit}).rowcount


def archive_expired_jobs(conn: Connection, limit: int, now: datetime | None = None) -> list[str]:
    """The job type of each job archived as expired (at most `limit`)."""
    with transaction(conn):
        expiring = conn.execute(LOCK_EXPIRED_JOBS, {"limit": limit, "now": now}).fetchall()
        archived = archive_jobs(conn, expiring, EXPIRED, expected_status=QUEUED, now=now, with_data=False) if expiring else []
    return [job.name for job in archived if job is not None]


def delete_old_archived_jobs(conn: Connection, name: str, older_than: timedelta, limit: int, now: datetime | None = None) -> int:
    with translated_errors():
        return conn.execute(DELETE_OLD_ARCHIVED_JOBS, {"name": name, "older_than": older_than, "limit": limit, "now": now}).rowcount


# --- a job type's current error ------------------------------------------------
# A worker that cannot claim (or otherwise serve) a type records why here, for
# the dashboard of any host, and deletes the row when the type recovers. A row
# no worker has refreshed for a while is stale (its worker stopped): the watcher
# deletes it.

RECORD_TYPE_ERROR = """
INSERT INTO jobrunner_type_errors (name, stage, message, failures, since, last_at)
VALUES (%(name)s, %(stage)s, %(message)s, 1, now(), now())
ON CONFLICT (name) DO UPDATE
SET stage = excluded.stage, message = excluded.message,
    failures = jobrunner_type_errors.failures + 1, last_at = excluded.last_at
"""

CLEAR_TYPE_ERROR = "DELETE FROM jobrunner_type_errors WHERE name = %(name)s"

TYPE_ERRORS = "SELECT name, stage, message, failures, since, last_at FROM jobrunner_type_errors ORDER BY name"

DELETE_STALE_TYPE_ERRORS = "DELETE FROM jobrunner_type_errors WHERE last_at < coalesce(%(now)s, now()) - %(older_than)s"


@dataclasses.dataclass(frozen=True)
class JobTypeError:
    name: str
    stage: str  # what failed: "claim"
    message: str  # the last error
    failures: int  # failed tries since `since`, by every worker
    since: datetime  # the first failure of this outage
    last_at: datetime  # the latest failure


def record_type_error(conn: Connection, name: str, stage: str, message: str) -> None:
    with translated_errors():
        conn.execute(RECORD_TYPE_ERROR, {"name": name, "stage": stage, "message": message})


def clear_type_error(conn: Connection, name: str) -> None:
    with translated_errors():
        conn.execute(CLEAR_TYPE_ERROR, {"name": name})


def type_errors(conn: Connection) -> dict[str, JobTypeError]:
    """Each job type with a current error: its name -> what failed, why, how often, since when."""
    with translated_errors(), conn.cursor(row_factory=class_row(JobTypeError)) as cur:
        return {error.name: error for error in cur.execute(TYPE_ERRORS)}


def delete_stale_type_errors(conn: Connection, older_than: timedelta, now: datetime | None = None) -> int:
    with translated_errors():
        return conn.execute(DELETE_STALE_TYPE_ERRORS, {"older_than": older_than, "now": now}).rowcount


# --- the dashboard ---------------------------------------------------------------
# Each reads the archive one type at a time through (name, created_at), so that a
# refresh costs what the last day archived, however large the archive has grown.

# Jobs archived in the last hour, per type, minute and status.
ARCHIVED_PER_MINUTE = """
SELECT j.name, date_trunc('minute', a.created_at) AS minute, a.status::text, count(*)
FROM jobs j
CROSS JOIN LATERAL (
    SELECT created_at, status FROM archived_jobs
    WHERE name = j.name AND created_at > coalesce(%(now)s, now()) - interval '1 hour'
) a
GROUP BY 1, 2, 3
ORDER BY 2
"""

# Jobs archived in the last day, per type and status.
ARCHIVED_LAST_DAY = """
SELECT j.name, a.status::text, count(*)
FROM jobs j
CROSS JOIN LATERAL (
    SELECT status FROM archived_jobs
    WHERE name = j.name AND created_at > coalesce(%(now)s, now()) - interval '1 day'
) a
GROUP BY 1, 2
"""

# Failed and expired jobs of the last day, newest first.
RECENT_FAILURES = """
SELECT a.* FROM jobs j
CROSS JOIN LATERAL (
    SELECT * FROM archived_jobs
    WHERE name = j.name AND status IN ('failed', 'expired') AND created_at > coalesce(%(now)s, now()) - interval '1 day'
    ORDER BY created_at DESC
    LIMIT %(limit)s
) a
ORDER BY a.created_at DESC
LIMIT %(limit)s
"""

# Jobs waiting to be sent (cancellable), soonest first.
WAITING_JOBS = """
SELECT q.* FROM jobs j
CROSS JOIN LATERAL (
    -- find_queued_job's order: the scan stops after `limit`
    SELECT * FROM queued_jobs WHERE name = j.name AND status = 'queued' ORDER BY run_after LIMIT %(limit)s
) q
ORDER BY q.run_after, q.id
LIMIT %(limit)s
"""

# Jobs waiting out a retry's back-off: queued, not yet due, with attempts used (the
# total they started with is their type's attempts, or the one kept when it changed).
BACKING_OFF_JOBS = """
SELECT q.name, count(*) AS jobs
FROM queued_jobs q
JOIN jobs j ON j.name = q.name
LEFT JOIN jobrunner_job_attempts a ON a.id = q.id
WHERE q.status = 'queued' AND q.run_after > coalesce(%(now)s, now()) AND q.attempts < coalesce(a.total_attempts, j.attempts)
GROUP BY q.name
"""

# Types whose due jobs wait for a token: the bucket as the last claim left it,
# refilled to now, holds less than one job (only types still limited count).
RATE_LIMITED_TYPES = """
SELECT b.name
FROM jobrunner_rate_limits b
JOIN jobrunner_job_type_settings s ON s.name = b.name AND s.rate_per_second IS NOT NULL
WHERE least(b.burst, b.tokens + b.per_second * extract(epoch FROM coalesce(%(now)s, now()) - b.refilled_at)) < 1
  AND EXISTS (SELECT 1 FROM queued_jobs q WHERE q.name = b.name AND q.status = 'queued' AND q.run_after <= coalesce(%(now)s, now()))
"""

DATABASE_NOW = "SELECT coalesce(%(now)s, now())"


def archived_per_minute(conn: Connection, now: datetime | None = None) -> list[tuple[str, datetime, str, int]]:
    with translated_errors():
        return conn.execute(ARCHIVED_PER_MINUTE, {"now": now}).fetchall()


def archived_last_day(conn: Connection, now: datetime | None = None) -> list[tuple[str, str, int]]:
    with translated_errors():
        return conn.execute(ARCHIVED_LAST_DAY, {"now": now}).fetchall()


def recent_failures(conn: Connection, limit: int, now: datetime | None = None) -> list[ArchivedJob]:
    with translated_errors(), conn.cursor(row_factory=class_row(ArchivedJob)) as cur:
        return cur.execute(RECENT_FAILURES, {"limit": limit, "now": now}).fetchall()


def waiting_jobs(conn: Connection, limit: int) -> list[QueuedJob]:
    with translated_errors(), conn.cursor(row_factory=class_row(QueuedJob)) as cur:
        return cur.execute(WAITING_JOBS, {"limit": limit}).fetchall()


def backing_off_jobs(conn: Connection, now: datetime | None = None) -> dict[str, int]:
    """Job type -> how many of its jobs wait for a retry (types with none are left out)."""
    with translated_errors():
        return dict(conn.execute(BACKING_OFF_JOBS, {"now": now}).fetchall())


def rate_limited_types(conn: Connection, now: datetime | None = None) -> set[str]:
    """Job types whose due jobs wait for their rate limit's next token."""
    with translated_errors():
        return {name for (name,) in conn.execute(RATE_LIMITED_TYPES, {"now": now})}


def database_now(conn: Connection, now: datetime | None = None) -> datetime:
    with translated_errors():
        return conn.execute(DATABASE_NOW, {"now": now}).fetchone()[0]


# --- notifications -------------------------------------------------------------

JOBS_CHANNEL = "jobrunner_jobs"  # payload: a job type that may have due jobs or a free slot
TYPES_CHANNEL = "jobrunner_types"  # payload: a job type that was created or changed
LISTEN = "LISTEN jobrunner_jobs; LISTEN jobrunner_types"


class Listener:
    """One connection that LISTENs (to the workers' channels unless `listen` says others); behind PgBouncer it needs a session-pooled or direct URL."""

    def __init__(self, url: str, name: str = "", *, prepared_statements: bool = True, listen: str = LISTEN, **kwargs: Any):
        self._conn = connect(url, name, prepared_statements=prepared_statements, **kwargs)
        with translated_errors():
            self._conn.execute(listen)

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """(channel, payload) of every notification that arrives within `timeout` seconds, at least one if any."""
        with translated_errors():
            first = list(self._conn.notifies(timeout=timeout, stop_after=1))
            rest = list(self._conn.notifies(timeout=0.0)) if first else []
        return [(n.channel, n.payload) for n in first + rest]

    @property
    def connection(self) -> Connection:
        """The listening connection, for statements between waits (the scheduler needs no other)."""
        return self._conn

    def close(self) -> None:
        self._conn.close()


# --- outcomes: archive and retry ---------------------------------------------

# A locked job with what its type says: total_attempts (the job's own, see
# SNAPSHOT_TOTAL_ATTEMPTS, else its type's), its delivery strategy, its retry
# settings (NULL: Rickover's back-off), and the transaction's now (one clock for
# the decision and the statements that carry it out). Constants, joined below.
LOCKED_JOB_COLUMNS = """
q.*, coalesce(t.total_attempts, j.attempts) AS total_attempts, j.delivery_strategy,
s.retry_min_backoff, s.retry_max_backoff, s.retry_max_doublings, s.retry_max_duration,
coalesce(%(now)s, now()) AS locked_at
"""
LOCKED_JOB_TABLES = """
queued_jobs q
JOIN jobs j ON j.name = q.name
LEFT JOIN jobrunner_job_attempts t ON t.id = q.id
LEFT JOIN jobrunner_job_type_settings s ON s.name = q.name
"""

LOCK_JOB = "SELECT " + LOCKED_JOB_COLUMNS + " FROM " + LOCKED_JOB_TABLES + " WHERE q.id = %(id)s FOR UPDATE OF q"

# In-progress jobs past their deadline: the last heartbeat's (only while the job is
# as that heartbeat left it: the same attempt, not updated since), else the type's
# job_timeout (or the default `timeout`) after it was claimed; plus `margin` (the
# watcher's, behind the workers). First, a bound read once: no job can be due
# before the shortest of those times has passed since its updated_at, so the
# joins meet only the rows old enough (10,000 jobs in flight, none due: 0.3 ms, not 12).
LOCK_STUCK_JOBS = (
    "SELECT " + LOCKED_JOB_COLUMNS + " FROM " + LOCKED_JOB_TABLES
    + """
LEFT JOIN jobrunner_job_deadlines d ON d.id = q.id AND d.attempts = q.attempts AND d.beat_at = q.updated_at
WHERE q.status = 'in-progress'
  AND q.updated_at < coalesce(%(now)s, now()) - %(margin)s - least(
      %(timeout)s,
      (SELECT min(job_timeout) * interval '1 second' FROM jobrunner_job_type_settings),
      (SELECT min(deadline - beat_at) FROM jobrunner_job_deadlines)
  )
  AND coalesce(d.deadline, q.updated_at + coalesce(s.job_timeout * interval '1 second', %(timeout)s)) + %(margin)s
      < coalesce(%(now)s, now())
ORDER BY q.updated_at
LIMIT %(limit)s
FOR UPDATE OF q SKIP LOCKED
"""
)

# The one way into the archive: each job deleted from queued_jobs and inserted into
# archived_jobs by one statement, so it is never both queued and archived, nor neither.
# Every outcome comes here: callbacks (one, or a batch of succeeded ones), a cancel,
# a stuck job, expiry (a claim's, the watcher's) and quarantine.
ARCHIVE_JOBS = """
WITH finished AS (
    -- each job under the name it was asked for; = ANY(...): primary-key lookups
    -- (a join with the batch is planned as a scan of the whole table)
    DELETE FROM queued_jobs q
    WHERE q.id = ANY (%(ids)s::text::uuid[]) AND q.name = %(names)s::jsonb ->> q.id::text
      -- a guard, when the caller expects a particular state (a failed callback, the watcher)
      AND q.attempts = coalesce(%(expected_attempts)s, q.attempts)
      AND q.status = coalesce(%(expected_status)s::job_status, q.status)
      AND (NOT %(only_if_expired)s OR q.expires_at <= coalesce(%(now)s, now()))
    RETURNING q.*
),
archived AS (
    -- an id archived already (an old Rickover database may hold one both queued and
    -- archived) keeps its first outcome; the queued row is removed all the same
    INSERT INTO archived_jobs (id, name, attempts, status, created_at, data, expires_at, priority)
    SELECT id, name, greatest(0, attempts - %(attempts_used)s), %(status)s, coalesce(%(now)s, now()), data, expires_at, priority
    FROM finished
    ON CONFLICT (id) DO NOTHING
    RETURNING *
),
notified AS (
    -- a slot of each type may be free: tell the workers, once a type (sent on commit)
    SELECT pg_notify('jobrunner_jobs', name) FROM (SELECT DISTINCT name FROM archived) AS types
)
-- the data only when asked: the watcher counts what it archived, and must not
-- stop at data it cannot decode (a claim quarantines such a job instead)
SELECT id, name, attempts, status, created_at, CASE WHEN %(with_data)s THEN data END AS data, expires_at, priority,
       (SELECT count(*) FROM notified) AS notified
FROM archived
"""


def archive_jobs(
    conn: Connection,
    jobs: list[tuple[UUID, str]],
    status: str,
    attempts_used: int = 0,
    expected_attempts: int | None = None,
    expected_status: str | None = None,
    only_if_expired: bool = False,
    now: datetime | None = None,
    with_data: bool = True,
) -> list[ArchivedJob | None]:
    """Move each (id, name) from queued_jobs to archived_jobs, in one statement.

    For each, the archived job, or None when no job matched: not queued under that
    name, not as expected, or an id repeated in `jobs` (it is answered once).
    """
    names = {str(job_id): name for job_id, name in reversed(jobs)}  # a repeated id: its first name
    params = {
        "ids": "{" + ",".join(names) + "}",  # an array literal: cheaper to send than a list
        "names": json.dumps(names),
        "status": status,
        "attempts_used": attempts_used,
        "expected_attempts": expected_attempts,
        "expected_status": expected_status,
        "only_if_expired": only_if_expired,
        "now": now,
        "with_data": with_data,
    }
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        archived = {row["id"]: ArchivedJob(**_without(row, "notified")) for row in cur.execute(ARCHIVE_JOBS, params)}
    answered = set()
    results = []
    for job_id, name in jobs:
        job = archived.get(job_id)
        results.append(job if job is not None and job.name == name and job_id not in answered else None)
        answered.add(job_id)
    return results


def archive_job(
    conn: Connection,
    job_id: UUID,
    name: str,
    status: str,
    attempts_used: int,
    expected_attempts: int | None = None,
    expected_status: str | None = None,
    only_if_expired: bool = False,
    now: datetime | None = None,
) -> ArchivedJob | None:
    """Move one job from queued_jobs to archived_jobs (see archive_jobs); None when it did not match."""
    [archived] = archive_jobs(conn, [(job_id, name)], status, attempts_used, expected_attempts, expected_status, only_if_expired, now)
    return archived


def archive_succeeded_jobs(conn: Connection, jobs: list[tuple[UUID, str]]) -> list[ArchivedJob | None]:
    """Many `succeeded` callbacks at once (see archive_jobs)."""
    return archive_jobs(conn, jobs, SUCCEEDED)


RETRY_JOB = """
WITH retried AS (
    UPDATE queued_jobs
    SET status = 'queued',
        attempts = attempts - 1,
        run_after = coalesce(%(now)s, now()) + %(delay)s,
        updated_at = coalesce(%(now)s, now())
    WHERE id = %(id)s AND attempts = %(expected_attempts)s AND status = 'in-progress'
    RETURNING *
)
-- a slot is free, and a job will be due: tell the workers (sent on commit)
SELECT *, pg_notify('jobrunner_jobs', name) AS notified FROM retried
"""


@dataclasses.dataclass(frozen=True)
class LockedJob:
    """A queued job, row-locked until the transaction ends, with what its type says."""

    job: QueuedJob
    total_attempts: int
    delivery_strategy: str
    retry: RetryPolicy  # the type's retry settings (all None: Rickover's back-off)
    now: datetime  # the transaction's (the database's clock, or the caller's `now`)


def _locked_job(row: dict) -> LockedJob:
    retry = RetryPolicy(
        row.pop("retry_min_backoff"), row.pop("retry_max_backoff"), row.pop("retry_max_doublings"), row.pop("retry_max_duration")
    )
    total_attempts, delivery_strategy, now = row.pop("total_attempts"), row.pop("delivery_strategy"), row.pop("locked_at")
    return LockedJob(QueuedJob(**row), total_attempts, delivery_strategy, retry, now)


def lock_job(conn: Connection, job_id: UUID, now: datetime | None = None) -> LockedJob | None:
    """Lock a queued job for the rest of the caller's transaction."""
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(LOCK_JOB, {"id": job_id, "now": now}).fetchone()
    return None if row is None else _locked_job(row)


def lock_stuck_jobs(
    conn: Connection, timeout: timedelta, limit: int, now: datetime | None = None, margin: timedelta = timedelta(0)
) -> list[LockedJob]:
    """Lock up to `limit` in-progress jobs past their deadline (see LOCK_STUCK_JOBS) and `margin`, oldest first."""
    params = {"timeout": timeout, "margin": margin, "limit": limit, "now": now}
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        return [_locked_job(row) for row in cur.execute(LOCK_STUCK_JOBS, params)]


def retry_job(
    conn: Connection, job_id: UUID, expected_attempts: int, delay: timedelta, now: datetime | None = None
) -> QueuedJob | None:
    """Queue an in-progress job again with one attempt fewer, due after `delay`; None when no job matched."""
    params = {"id": job_id, "expected_attempts": expected_attempts, "delay": delay, "now": now}
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(RETRY_JOB, params).fetchone()
    return None if row is None else QueuedJob(**_without(row, "notified"))


# --- heartbeats ----------------------------------------------------------------

# A heartbeat of the attempt in progress: its deadline becomes now + `extend` (None:
# the type's job_timeout, else the default `timeout`), and updated_at now (the clock
# Rickover's watcher reads). Another attempt, or a job queued or archived, matches
# nothing and nothing changes. The deadline row holds only while the job is as the
# heartbeat left it (same attempt and updated_at, see LOCK_STUCK_JOBS).
HEARTBEAT = """
WITH beat AS (
    UPDATE queued_jobs
    SET updated_at = coalesce(%(now)s, now())
    WHERE id = %(id)s AND name = %(name)s AND attempts = %(attempt)s AND status = 'in-progress'
    RETURNING *
),
deadline AS (
    INSERT INTO jobrunner_job_deadlines (id, attempts, beat_at, deadline)
    SELECT b.id, b.attempts, b.updated_at,
           b.updated_at + coalesce(%(extend)s, s.job_timeout * interval '1 second', %(timeout)s)
    FROM beat b LEFT JOIN jobrunner_job_type_settings s ON s.name = b.name
    ON CONFLICT (id) DO UPDATE SET attempts = excluded.attempts, beat_at = excluded.beat_at, deadline = excluded.deadline
    RETURNING deadline
)
SELECT beat.*, deadline.deadline FROM beat, deadline
"""

# Deadlines no job holds any more (archived, retried, claimed again), a small batch at a time.
DELETE_PAST_DEADLINES = """
DELETE FROM jobrunner_job_deadlines
WHERE id IN (
    SELECT d.id FROM jobrunner_job_deadlines d
    WHERE NOT EXISTS (
        SELECT 1 FROM queued_jobs q
        WHERE q.id = d.id AND q.status = 'in-progress' AND q.attempts = d.attempts AND q.updated_at = d.beat_at
    )
    LIMIT %(limit)s
)
"""


def heartbeat(
    conn: Connection, job_id: UUID, name: str, attempt: int, extend: timedelta | None, timeout: timedelta, now: datetime | None = None
) -> tuple[QueuedJob, datetime] | None:
    """Push the deadline of the attempt in progress (see HEARTBEAT): the job and its new deadline; None when nothing matched."""
    params = {"id": job_id, "name": name, "attempt": attempt, "extend": extend, "timeout": timeout, "now": now}
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(HEARTBEAT, params).fetchone()
    if row is None:
        return None
    deadline = row.pop("deadline")
    return QueuedJob(**row), deadline


def delete_past_deadlines(conn: Connection, limit: int) -> int:
    with translated_errors():
        return conn.execute(DELETE_PAST_DEADLINES, {"limit": limit}).rowcount


def _without(row: dict, *keys: str) -> dict:
    for key in keys:
        del row[key]
    return row


# --- schedules -----------------------------------------------------------------

SCHEDULES_CHANNEL = "jobrunner_schedules"  # payload: a schedule that was created, changed or deleted
LISTEN_SCHEDULES = "LISTEN jobrunner_schedules"

_SCHEDULE_FIELDS = (
    "job_type", "data", "cron", "time_zone", "interval_seconds", "run_after_offset", "expires_after",
    "misfire", "misfire_limit", "paused", "config_owned", "next_tick",
)  # what a create or an update writes; the rest is the scheduler's bookkeeping

# Every change tells the schedulers at once (sent on commit): the next tick may be sooner.
CREATE_SCHEDULE = """
WITH created AS (
    INSERT INTO jobrunner_schedules (name, job_type, data, cron, time_zone, interval_seconds, run_after_offset,
                                     expires_after, misfire, misfire_limit, paused, config_owned, next_tick,
                                     created_at, updated_at)
    VALUES (%(name)s, %(job_type)s, %(data)s, %(cron)s, %(time_zone)s, %(interval_seconds)s, %(run_after_offset)s,
            %(expires_after)s, %(misfire)s, %(misfire_limit)s, %(paused)s, %(config_owned)s, %(next_tick)s,
            coalesce(%(now)s, now()), coalesce(%(now)s, now()))
    ON CONFLICT (name) DO NOTHING
    RETURNING *
)
SELECT *, pg_notify('jobrunner_schedules', name) AS notified FROM created
"""

# A change clears the row's error: what failed may be what was changed.
UPDATE_SCHEDULE = """
WITH updated AS (
    UPDATE jobrunner_schedules
    SET job_type = %(job_type)s, data = %(data)s, cron = %(cron)s, time_zone = %(time_zone)s,
        interval_seconds = %(interval_seconds)s, run_after_offset = %(run_after_offset)s,
        expires_after = %(expires_after)s, misfire = %(misfire)s, misfire_limit = %(misfire_limit)s,
        paused = %(paused)s, config_owned = %(config_owned)s, next_tick = %(next_tick)s,
        failures = 0, error = NULL, retry_at = NULL, updated_at = coalesce(%(now)s, now())
    WHERE name = %(name)s
    RETURNING *
)
SELECT *, pg_notify('jobrunner_schedules', name) AS notified FROM updated
"""

DELETE_SCHEDULE = """
WITH deleted AS (DELETE FROM jobrunner_schedules WHERE name = %(name)s RETURNING *)
SELECT *, pg_notify('jobrunner_schedules', name) AS notified FROM deleted
"""

GET_SCHEDULE = "SELECT * FROM jobrunner_schedules WHERE name = %(name)s"

# A change of a schedule waits for the scheduler's round that holds it, and the other way round.
LOCK_SCHEDULE = "SELECT * FROM jobrunner_schedules WHERE name = %(name)s FOR UPDATE"

# Every schedule with the status of its last job (NULL once that job is gone, by retention).
LIST_SCHEDULES = """
SELECT s.*, coalesce(q.status::text, a.status::text) AS last_job_status
FROM jobrunner_schedules s
LEFT JOIN queued_jobs q ON q.id = s.last_job_id
LEFT JOIN archived_jobs a ON a.id = s.last_job_id
WHERE %(name)s::text IS NULL OR s.name = %(name)s
ORDER BY s.name
"""

# Due schedules, locked: another host's scheduler skips them (and finds them moved
# on once this transaction commits). A row that failed waits for its retry_at.
LOCK_DUE_SCHEDULES = """
SELECT *
FROM jobrunner_schedules
WHERE NOT paused AND next_tick <= coalesce(%(now)s, now())
  AND (retry_at IS NULL OR retry_at <= coalesce(%(now)s, now()))
ORDER BY next_tick
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

ADVANCE_SCHEDULE = """
UPDATE jobrunner_schedules
SET next_tick = %(next_tick)s,
    last_tick = coalesce(%(last_tick)s, last_tick),
    last_job_id = coalesce(%(last_job_id)s, last_job_id),
    failures = 0, error = NULL, retry_at = NULL
WHERE name = %(name)s
"""

SET_LAST_JOB = "UPDATE jobrunner_schedules SET last_job_id = %(last_job_id)s WHERE name = %(name)s"

# Back-off of a row that fails: 2^failures seconds, at most `max_delay`. The
# failures before this one: 0 means it is new, and is logged.
RECORD_SCHEDULE_ERROR = """
UPDATE jobrunner_schedules
SET failures = failures + 1, error = %(error)s,  -- SET reads the row as it was
    retry_at = coalesce(%(now)s, now()) + least(power(2, least(failures + 1, 20)) * interval '1 second', %(max_delay)s)
WHERE name = %(name)s
RETURNING failures - 1
"""

# Seconds until the earliest schedule is due (0 if one is), None when none is active.
NEXT_SCHEDULE_DUE_IN = """
SELECT greatest(0, extract(epoch FROM min(greatest(next_tick, coalesce(retry_at, next_tick))) - coalesce(%(now)s, now())))::float8
FROM jobrunner_schedules
WHERE NOT paused
"""

# Config-declared schedules are reconciled by one process at a time (every host's scheduler starts with it).
LOCK_SCHEDULE_RECONCILE = "SELECT pg_advisory_xact_lock(%(space)s, %(key)s)"
SCHEDULE_RECONCILE_LOCK_KEY = 1

CONFIG_OWNED_SCHEDULES = "SELECT name FROM jobrunner_schedules WHERE config_owned ORDER BY name"


def _schedule(row: dict | None) -> Schedule | None:
    return None if row is None else Schedule(**_without(row, "notified"))


def _schedule_params(name: str, fields: dict, now: datetime | None) -> dict:
    params = {field: fields[field] for field in _SCHEDULE_FIELDS}
    return {**params, "data": Jsonb(params["data"]), "name": name, "now": now}


def create_schedule(conn: Connection, name: str, fields: dict, now: datetime | None = None) -> Schedule | None:
    """Insert a schedule with `fields` (every one of _SCHEDULE_FIELDS); None when the name is taken."""
    with translated_errors("schedule"), conn.cursor(row_factory=dict_row) as cur:
        return _schedule(cur.execute(CREATE_SCHEDULE, _schedule_params(name, fields, now)).fetchone())


def update_schedule(conn: Connection, name: str, fields: dict, now: datetime | None = None) -> Schedule | None:
    with translated_errors("schedule"), conn.cursor(row_factory=dict_row) as cur:
        return _schedule(cur.execute(UPDATE_SCHEDULE, _schedule_params(name, fields, now)).fetchone())


def delete_schedule(conn: Connection, name: str) -> Schedule | None:
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        return _schedule(cur.execute(DELETE_SCHEDULE, {"name": name}).fetchone())


def get_schedule(conn: Connection, name: str, lock: bool = False) -> Schedule | None:
    """The schedule; with `lock`, locked until the caller's transaction ends."""
    with translated_errors(), conn.cursor(row_factory=class_row(Schedule)) as cur:
        return cur.execute(LOCK_SCHEDULE if lock else GET_SCHEDULE, {"name": name}).fetchone()


def list_schedules(conn: Connection, name: str | None = None) -> list[tuple[Schedule, str | None]]:
    """Every schedule (or the one named), by name, with the status of its last job (None: no job, or no longer kept)."""
    with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(LIST_SCHEDULES, {"name": name}).fetchall()
    return [(Schedule(**{key: value for key, value in row.items() if key != "last_job_status"}), row["last_job_status"]) for row in rows]


def lock_due_schedules(conn: Connection, limit: int, now: datetime | None = None) -> list[Schedule]:
    with translated_errors(), conn.cursor(row_factory=class_row(Schedule)) as cur:
        return cur.execute(LOCK_DUE_SCHEDULES, {"limit": limit, "now": now}).fetchall()


def advance_schedule(
    conn: Connection, name: str, next_tick: datetime, last_tick: datetime | None, last_job_id: UUID | None
) -> None:
    """Move a schedule to its next tick (and record the last tick and job, when there is one), clearing its error."""
    params = {"name": name, "next_tick": next_tick, "last_tick": last_tick, "last_job_id": last_job_id}
    with translated_errors():
        conn.execute(ADVANCE_SCHEDULE, params)


def set_last_job(conn: Connection, name: str, job_id: UUID) -> None:
    with translated_errors():
        conn.execute(SET_LAST_JOB, {"name": name, "last_job_id": job_id})


def record_schedule_error(conn: Connection, name: str, error: str, max_delay: timedelta, now: datetime | None = None) -> int:
    """Keep why a schedule failed and when to try it again; the failures it had before this one."""
    params = {"name": name, "error": error, "max_delay": max_delay, "now": now}
    with translated_errors():
        row = conn.execute(RECORD_SCHEDULE_ERROR, params).fetchone()
    return 0 if row is None else row[0]


def next_schedule_due_in(conn: Connection, now: datetime | None = None) -> float | None:
    """Seconds until a schedule is due by the database's clock (0: one is); None when none is active."""
    with translated_errors():
        return conn.execute(NEXT_SCHEDULE_DUE_IN, {"now": now}).fetchone()[0]


def lock_schedule_reconcile(conn: Connection) -> None:
    with translated_errors():
        conn.execute(LOCK_SCHEDULE_RECONCILE, {"space": ADVISORY_LOCK_SPACE, "key": SCHEDULE_RECONCILE_LOCK_KEY})


def config_owned_schedules(conn: Connection) -> list[str]:
    with translated_errors():
        return [name for (name,) in conn.execute(CONFIG_OWNED_SCHEDULES)]

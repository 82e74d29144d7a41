"""Versioned schema migrations: applied in order and once, safe side by side, safe over a database
Rickover's migrations built; `check` refuses a schema older or newer than the code; schema.sql
equals the result of all migrations."""

import difflib
import fnmatch
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCHEMA_SQL, free_port, make_type, new_id, package_data, run_concurrently, running_service, wait_until

from jobrunner import migrate, services, store
from jobrunner.errors import DatabaseError, SchemaMissing, SchemaTooNew

RICKOVER_SCHEMA = (Path(__file__).parent / "rickover_schema.sql").read_text()
MIGRATIONS_TABLE = "jobrunner_schema_migrations"

# The schema as a set of lines: two databases with equal sets have the same tables, columns
# (in order), types, defaults, constraints, indexes, enums, views, functions and triggers.
CATALOG = """
SELECT 'relation ' || relname || ' ' || relkind::text || ' ' || relpersistence::text FROM pg_class
WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v', 'm', 'S', 'p')
UNION ALL
SELECT 'extension ' || extname FROM pg_extension WHERE extname <> 'plpgsql'
UNION ALL
SELECT 'column ' || table_name || '.' || column_name
       || ' #' || row_number() OVER (PARTITION BY table_name ORDER BY ordinal_position)
       || ' ' || data_type || ' ' || udt_name || ' ' || is_nullable || ' ' || coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint ' || conrelid::regclass || '.' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'enum ' || t.typname || ' ' || e.enumlabel || ' after ' || coalesce(
    (SELECT string_agg(p.enumlabel, ',' ORDER BY p.enumsortorder) FROM pg_enum p
     WHERE p.enumtypid = t.oid AND p.enumsortorder < e.enumsortorder), '')
FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
UNION ALL
SELECT 'view ' || viewname || ' ' || definition FROM pg_views WHERE schemaname = 'public'
UNION ALL
SELECT 'function ' || pg_get_functiondef(p.oid) FROM pg_proc p WHERE pronamespace = 'public'::regnamespace AND prokind IN ('f', 'p')
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
"""
# an object dropped and created again gets a new oid
OIDS = "SELECT 'oid ' || relname || ' ' || oid FROM pg_class WHERE relnamespace = 'public'::regnamespace"
# Rows as Rickover's columns hold them (jobrunner's added columns are checked on their own).
ROWS = """
SELECT 'jobs', to_jsonb(j) FROM jobs j
UNION ALL SELECT 'queued', to_jsonb(q) - 'priority' FROM queued_jobs q
UNION ALL SELECT 'archived', to_jsonb(a) - 'priority' FROM archived_jobs a
"""
PRIORITIES = "SELECT priority FROM queued_jobs UNION ALL SELECT priority FROM archived_jobs"
TABLE_COLUMNS = "SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default FROM information_schema.columns WHERE table_name IN ('jobs', 'queued_jobs', 'archived_jobs') ORDER BY 1, 2"
# jobrunner's own tables of 0001_base, beside Rickover's (later migrations add more, named jobrunner_...)
JOBRUNNER_TABLES = ("jobrunner_paused_job_types", "jobrunner_job_attempts", "jobrunner_type_errors")
JOBRUNNER_ADDITIONS = {"queued_jobs_claim_by_priority", "queued_jobs_in_progress", "queued_jobs_expires_at", "archived_jobs_failures"}


def catalog(conn, oids=False) -> set[str]:
    """The schema's lines, without the record of migrations (the framework's, in no migration and not in schema.sql)."""
    lines = {row[0] for row in conn.execute(CATALOG + (" UNION ALL " + OIDS if oids else ""))}
    return {line for line in lines if MIGRATIONS_TABLE not in line}


def rows(conn):
    return sorted((row[0], str(row[1])) for row in conn.execute(ROWS))


def recorded(conn) -> list[tuple[int, str]]:
    return [tuple(row) for row in conn.execute(f"SELECT version, name FROM {MIGRATIONS_TABLE} ORDER BY version")]


# What Rickover's code writes (it names its columns): a type, a job in progress, one queued, one archived.
RICKOVER_ROWS = """
INSERT INTO jobs (name, delivery_strategy, attempts, concurrency) VALUES ('email', 'at_least_once', 3, 2);
INSERT INTO queued_jobs (id, name, attempts, run_after, expires_at, status, data)
VALUES (gen_random_uuid(), 'email', 3, now(), NULL, 'in-progress', '{"hello": "world"}'),
       (gen_random_uuid(), 'email', 3, now(), NULL, 'queued', '{"hello": "world"}');
INSERT INTO archived_jobs (id, name, attempts, status, data, expires_at)
VALUES (gen_random_uuid(), 'email', 3, 'succeeded', '{"hello": "world"}', NULL);
"""


def add_some_jobs(conn):
    make_type(conn, "email", concurrency=2)
    for _ in range(3):
        services.enqueue(conn, new_id(), "email", {"hello": "world"})
    [job, _] = services.claim(conn, "email", limit=5).jobs
    services.handle_status_callback(conn, job.id, "email", "succeeded", 3)


@pytest.fixture
def empty_conn(make_database):
    """A database without any schema."""
    connection = store.connect(make_database(template="template0"))
    yield connection
    connection.close()


def test_the_shipped_migrations_are_numbered_from_0001_base_in_order_and_run_in_a_transaction():
    migrations = migrate.known()
    assert migrations[0].version == 1 and migrations[0].name == "base"
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    assert all(m.sql.strip() for m in migrations)
    # `migrate` runs each file in a transaction of its own and records it there: a file that
    # ends it (COMMIT) or needs none (CONCURRENTLY, VACUUM) would half-apply or fail
    for migration in migrations:
        code = re.sub(r"--[^\n]*", "", migration.sql)
        assert not re.search(r"\b(COMMIT|ROLLBACK|CONCURRENTLY|VACUUM)\b", code, re.IGNORECASE), migration.label


def test_every_migration_is_package_data():
    """Read from the installed package: setup.cfg must ship each file, or `migrate` in a wheel knows none."""
    patterns = package_data()
    files = sorted(path.name for path in (Path(migrate.__file__).parent / "migrations").glob("*.sql"))
    assert files == [f"{m.label}.sql" for m in migrate.known()]
    assert all(any(fnmatch.fnmatch(f"migrations/{name}", pattern) for pattern in patterns) for name in files), patterns


def test_an_empty_database_gets_every_migration_in_order_and_a_second_run_changes_nothing(empty_conn):
    applied = migrate.apply(empty_conn)

    assert [m.version for m in applied] == [m.version for m in migrate.known()]
    assert recorded(empty_conn) == [(m.version, m.name) for m in migrate.known()]
    migrate.check(empty_conn)  # up to date: no error
    add_some_jobs(empty_conn)
    before, data = catalog(empty_conn, oids=True), rows(empty_conn)
    applied_at = empty_conn.execute(f"SELECT array_agg(applied_at ORDER BY version) FROM {MIGRATIONS_TABLE}").fetchone()

    assert migrate.apply(empty_conn) == []

    assert catalog(empty_conn, oids=True) == before and rows(empty_conn) == data
    assert empty_conn.execute(f"SELECT array_agg(applied_at ORDER BY version) FROM {MIGRATIONS_TABLE}").fetchone() == applied_at


def test_a_database_an_older_migrate_built_is_upgraded_keeping_everything(conn):
    """`jobrunner migrate` applied schema.sql before versions were recorded: no record of migrations."""
    conn.execute(f"DROP TABLE {MIGRATIONS_TABLE}")
    add_some_jobs(conn)
    before, data = catalog(conn, oids=True), rows(conn)
    with pytest.raises(SchemaMissing, match="run `jobrunner migrate`"):
        migrate.check(conn)

    assert [m.version for m in migrate.apply(conn)] == [m.version for m in migrate.known()]

    assert catalog(conn, oids=True) == before  # 0001 is idempotent: nothing dropped, nothing rebuilt
    assert rows(conn) == data
    migrate.check(conn)


def test_pending_migrations_are_applied_in_order_each_in_its_own_transaction(conn, monkeypatch):
    shipped = migrate.known()
    later = (
        migrate.Migration(9001, "first_later", "CREATE TABLE later_one (id integer PRIMARY KEY)"),
        migrate.Migration(9002, "broken", "CREATE TABLE later_two (id integer); SELECT * FROM no_such_table"),
    )
    monkeypatch.setattr(migrate, "known", lambda: shipped + later)
    with pytest.raises(SchemaMissing, match=r"missing migrations 9001_first_later, 9002_broken\): run `jobrunner migrate`"):
        migrate.check(conn)

    reported = []
    with pytest.raises(DatabaseError, match="Migration 9002_broken failed: relation \"no_such_table\" does not exist"):
        migrate.apply(conn, reported.append)

    # the first is applied, recorded and reported; nothing of the second is left
    assert reported == [later[0]]
    assert recorded(conn)[-1] == (9001, "first_later")
    tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'later_%'")}
    assert tables == {"later_one"}
    with pytest.raises(SchemaMissing, match=r"missing migrations 9002_broken\)"):
        migrate.check(conn)


def test_a_failing_migration_records_nothing_and_leaves_nothing(empty_conn):
    # a view where 0001 alters a table: its last statements fail, after it created others
    empty_conn.execute("CREATE VIEW archived_jobs AS SELECT 1 AS id")

    with pytest.raises(DatabaseError, match="Migration 0001_base failed"):
        migrate.apply(empty_conn)

    assert {row[0] for row in empty_conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")} == set()
    assert store.schema_migrations(empty_conn) is None


def test_migrations_at_once_each_apply_every_migration_once(make_database):
    url = make_database(template="template0")
    connections = [store.connect(url) for _ in range(4)]
    try:
        results = run_concurrently([lambda conn=conn: migrate.apply(conn) for conn in connections])
        applied = sorted(m.version for result in results for m in result)
        assert applied == [m.version for m in migrate.known()]  # each by exactly one of them
        assert recorded(connections[0]) == [(m.version, m.name) for m in migrate.known()]
    finally:
        for conn in connections:
            conn.close()


def test_two_migrate_processes_started_together_wait_for_each_other(make_database):
    """Both are held at the schema's lock until both wait there, so they meet for sure."""
    url = make_database(template="template0")
    holder = store.connect(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "JOBRUNNER_"))} | {"DATABASE_URL": url}
    try:
        with store.transaction(holder):
            store.lock_schema(holder)
            processes = [subprocess.Popen([sys.executable, "-m", "jobrunner", "migrate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                         for _ in range(2)]
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            wait_until(lambda: holder.execute(waiting).fetchone()[0] == 2, "both migrations to wait for the lock", timeout=30)
        outputs = [process.communicate(timeout=60) for process in processes]
        assert [process.returncode for process in processes] == [0, 0], outputs
        lines = sorted(line for stdout, _ in outputs for line in stdout.splitlines() if "applied migration" in line)
        assert lines == sorted(f"jobrunner: applied migration {m.label}" for m in migrate.known())
        assert recorded(holder) == [(m.version, m.name) for m in migrate.known()]
    finally:
        holder.close()


def test_rickovers_database_keeps_everything_gains_jobrunners_additions_and_runs_both(conn, make_database):
    rickover = store.connect(make_database(template="template0"))
    rickover.execute(RICKOVER_SCHEMA)
    rickover.execute(RICKOVER_ROWS)  # jobrunner's own code needs its columns: it cannot write to Rickover's schema
    before, data, columns = catalog(rickover, oids=True), rows(rickover), set(rickover.execute(TABLE_COLUMNS))

    migrate.apply(rickover)

    after = catalog(rickover, oids=True)
    assert rows(rickover) == data
    assert [priority for (priority,) in rickover.execute(PRIORITIES)] == [0, 0, 0]
    assert before <= after, "something Rickover built was changed or dropped"
    added = after - before
    # new tables are jobrunner's own, named jobrunner_...
    new_tables = {line.split()[1] for line in added if line.startswith("relation ") and line.split()[2] == "r"}
    assert set(JOBRUNNER_TABLES) <= new_tables and all(table.startswith("jobrunner_") for table in new_tables), new_tables
    on_rickovers = {line for line in added if not any(table in line for table in new_tables)}
    assert {line.split()[0] for line in on_rickovers} <= {"index", "oid", "enum", "column"}, on_rickovers
    assert {line for line in added if line.startswith("enum")} == {"enum archived_job_status cancelled after succeeded,failed,expired"}
    assert {name for name in JOBRUNNER_ADDITIONS if any(f" {name} " in line for line in added)} == JOBRUNNER_ADDITIONS
    # a column added to Rickover's tables is nullable or has a default: Rickover's INSERTs do not name it
    new_columns = set(rickover.execute(TABLE_COLUMNS)) - columns
    assert all(nullable == "YES" or default is not None for *_, nullable, default in new_columns), new_columns
    # Rickover's three tables are exactly the ones jobrunner builds on an empty database
    assert rickover.execute(TABLE_COLUMNS).fetchall() == conn.execute(TABLE_COLUMNS).fetchall()
    migrate.check(rickover)
    # jobrunner runs on it
    [job] = services.claim(rickover, "email", limit=5).jobs
    assert services.handle_status_callback(rickover, job.id, "email", "failed", 3).attempts == 2
    # and so do Rickover's own statements, which name their columns
    rickover_runs_on(rickover)
    rickover.close()


def rickover_runs_on(conn):
    """Rickover's statements, with the column lists of its models (jobs, queued_jobs, archived_jobs), in our words."""
    conn.execute("INSERT INTO jobs (name, delivery_strategy, attempts, concurrency) VALUES ('sms', 'at_most_once', 2, 1)")
    [created_at] = conn.execute("SELECT name, delivery_strategy, attempts, concurrency, created_at FROM jobs WHERE name = 'sms'").fetchone()[4:]
    assert created_at is not None
    job_id = new_id()
    enqueued = conn.execute(
        """INSERT INTO queued_jobs (id, name, attempts, run_after, expires_at, status, data)
           SELECT %(id)s, name, attempts, now(), NULL, 'queued', '{"to": "x"}' FROM jobs WHERE name = 'sms'
           AND NOT EXISTS (SELECT id FROM archived_jobs WHERE id = %(id)s)
           RETURNING 'job_' || id, name, attempts, run_after, expires_at, status, data, created_at, updated_at""",
        {"id": job_id},
    ).fetchone()
    assert enqueued[0] == f"job_{job_id}" and enqueued[5] == "queued"
    acquired = conn.execute(
        """WITH queued_job AS (SELECT id AS inner_id FROM queued_jobs WHERE status = 'queued' AND name = 'sms'
                                 AND run_after <= now() ORDER BY created_at LIMIT 1 FOR UPDATE)
           UPDATE queued_jobs SET status = 'in-progress', updated_at = now() FROM queued_job
           WHERE queued_jobs.id = queued_job.inner_id AND status = 'queued'
           RETURNING 'job_' || id, name, attempts, run_after, expires_at, status, data, created_at, updated_at"""
    ).fetchone()
    assert acquired[0] == f"job_{job_id}" and acquired[5] == "in-progress"
    decremented = conn.execute(
        """UPDATE queued_jobs SET status = 'queued', updated_at = now(), attempts = attempts - 1, run_after = now()
           WHERE id = %(id)s AND attempts = 2
           RETURNING 'job_' || id, name, attempts, run_after, expires_at, status, data, created_at, updated_at""",
        {"id": job_id},
    ).fetchone()
    assert decremented[2] == 1
    with store.transaction(conn):
        archived = conn.execute(
            """INSERT INTO archived_jobs (id, name, attempts, status, data, expires_at)
               SELECT id, 'sms', 0, 'succeeded', data, expires_at FROM queued_jobs WHERE id = %(id)s AND name = 'sms'
               RETURNING 'job_' || id, name, attempts, status, data, created_at, expires_at""",
            {"id": job_id},
        ).fetchone()
        conn.execute("DELETE FROM queued_jobs WHERE id = %(id)s", {"id": job_id})
    assert archived[3] == "succeeded"
    counts = conn.execute("SELECT name, count(*) FROM queued_jobs WHERE status = 'queued' GROUP BY name").fetchall()
    assert dict(counts) == {"email": 1}  # of the three enqueued, one succeeded and one is in progress


def test_a_database_without_the_schema_is_refused_naming_migrate(empty_conn):
    with pytest.raises(SchemaMissing, match=r"no jobrunner schema version .*: run `jobrunner migrate`"):
        migrate.check(empty_conn)
    with pytest.raises(SchemaMissing, match="jobrunner migrate"):  # and at runtime, a missing table says the same
        services.get_job_type(empty_conn, "email")


def test_a_database_a_newer_jobrunner_migrated_is_refused_by_check_and_by_migrate(conn):
    conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES (9999, 'from_the_future')")
    before = recorded(conn)

    for refused in (migrate.check, migrate.apply):
        with pytest.raises(SchemaTooNew, match=r"newer than this jobrunner: it has migrations 9999_from_the_future .* Upgrade jobrunner"):
            refused(conn)
    assert recorded(conn) == before


def test_a_number_recorded_under_another_name_is_refused_as_unknown(conn):
    """Two branches that took the same number: the database has the other one, not this code's."""
    conn.execute(f"UPDATE {MIGRATIONS_TABLE} SET name = 'someone_elses' WHERE version = 1")

    with pytest.raises(SchemaTooNew, match="it has migrations 0001_someone_elses that this version does not know"):
        migrate.check(conn)
    assert migrate.status(conn).pending == ()  # and this code's 0001 is not applied over it


def test_schema_sql_builds_the_same_schema_as_all_migrations(conn, empty_conn):
    """schema.sql is the readable whole: a migration added without its objects in schema.sql (or the reverse) fails here."""
    empty_conn.execute(SCHEMA_SQL.encode())

    from_schema_sql, from_migrations = sorted(catalog(empty_conn)), sorted(catalog(conn))

    diff = "\n".join(difflib.unified_diff(from_schema_sql, from_migrations, "schema.sql", "jobrunner/migrations", lineterm="", n=0))
    assert from_schema_sql == from_migrations, f"schema.sql and the migrations build different schemas:\n{diff}"


# --- the command line -----------------------------------------------------------


def jobrunner(*args, url: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "JOBRUNNER_", "DOWNSTREAM", "PORT"))}
    env |= {"DATABASE_URL": url, "JOBRUNNER_USERS": "admin:s3cret", "DOWNSTREAM_URL": "http://127.0.0.1:1", "PORT": str(free_port())}
    return subprocess.run([sys.executable, "-m", "jobrunner", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_migrate_says_what_it_applied_then_that_the_schema_is_up_to_date_and_lists_them(make_database):
    url = make_database(template="template0")

    first, second, status = jobrunner("migrate", url=url), jobrunner("migrate", url=url), jobrunner("migrate", "--status", url=url)

    assert first.returncode == second.returncode == status.returncode == 0, (first.stderr, second.stderr, status.stderr)
    assert first.stdout.splitlines() == [f"jobrunner: applied migration {m.label}" for m in migrate.known()]
    assert second.stdout.splitlines() == ["jobrunner: the schema is up to date"]
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [[m.label, "applied"] for m in migrate.known()]


def test_migrate_status_lists_pending_and_unknown_migrations_and_changes_nothing(conn, db_url):
    conn.execute(f"DELETE FROM {MIGRATIONS_TABLE} WHERE version = 1")
    conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES (9999, 'from_the_future')")
    before = recorded(conn)

    status = jobrunner("migrate", "--status", url=db_url)

    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "0001_base  pending" in lines
    assert any(line.startswith("9999_from_the_future  applied ") and line.endswith("(unknown to this jobrunner)") for line in lines), lines
    assert recorded(conn) == before


@pytest.mark.parametrize("command", [("run",), ("serve",), ("work",), ("check-config", "--production")])
def test_commands_that_use_the_database_refuse_one_without_the_schema_naming_migrate(make_database, command):
    result = jobrunner(*command, url=make_database(template="template0"), timeout=30)

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"jobrunner {command[0]}: The database has no jobrunner schema version" in result.stderr
    assert result.stderr.rstrip().endswith("run `jobrunner migrate`")


@pytest.mark.parametrize("command", ["run", "work"])
def test_commands_refuse_a_schema_newer_than_the_code_naming_its_versions(conn, db_url, command):
    conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES (9999, 'from_the_future')")

    result = jobrunner(command, url=db_url, timeout=30)

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "newer than this jobrunner: it has migrations 9999_from_the_future" in result.stderr
    assert "Upgrade jobrunner" in result.stderr


def test_a_reload_onto_a_database_without_the_schema_is_refused_and_the_running_generation_stays(db_url, make_database, detached_downstream):
    elsewhere = make_database(template="template0")
    with running_service(db_url, detached_downstream.url, config=f"workers = 1\ndatabase_url = {db_url}\n") as service:
        before = service.children()
        with open(service.config_path, "w") as file:
            file.write(f"[jobrunner]\nworkers = 1\ndatabase_url = {elsewhere}\n")

        service.signal(signal.SIGHUP)

        refused = "SIGHUP: the new configuration is invalid, keeping the running one: DATABASE_URL (database_url): The database has no jobrunner schema version"
        wait_until(lambda: refused in service.log(), "the reload to be refused")
        assert "run `jobrunner migrate`" in service.log()
        assert service.children() == before
        service.signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0

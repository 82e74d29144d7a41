"""schema.sql: idempotent, safe to apply over a database Rickover's migrations built, and concurrent-safe."""

from pathlib import Path

import pytest
from conftest import make_type, new_id, run_concurrently

from jobrunner import services, store
from jobrunner.cli import schema_sql
from jobrunner.errors import SchemaMissing

RICKOVER_SCHEMA = (Path(__file__).parent / "rickover_schema.sql").read_text()

CATALOG = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' ' || udt_name || ' '
       || is_nullable || ' ' || coalesce(column_default, '')
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
-- an object dropped and created again gets a new oid
SELECT 'oid ' || relname || ' ' || oid FROM pg_class WHERE relnamespace = 'public'::regnamespace
"""
ROWS = """
SELECT 'jobs', to_jsonb(j) FROM jobs j
UNION ALL SELECT 'queued', to_jsonb(q) FROM queued_jobs q
UNION ALL SELECT 'archived', to_jsonb(a) FROM archived_jobs a
"""
TABLE_COLUMNS = "SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default FROM information_schema.columns WHERE table_name IN ('jobs', 'queued_jobs', 'archived_jobs') ORDER BY 1, 2"
# jobrunner's own tables, beside Rickover's (which it never changes)
JOBRUNNER_TABLES = (
    "jobrunner_paused_job_types", "jobrunner_job_attempts", "jobrunner_type_errors", "jobrunner_job_type_settings", "jobrunner_job_deadlines",
)
JOBRUNNER_ADDITIONS = {"queued_jobs_claim", "queued_jobs_in_progress", "queued_jobs_expires_at", "archived_jobs_failures"}


def snapshot(conn):
    return set(row[0] for row in conn.execute(CATALOG))


def rows(conn):
    return sorted((row[0], str(row[1])) for row in conn.execute(ROWS))


def add_some_jobs(conn):
    make_type(conn, "email", concurrency=2)
    for _ in range(3):
        services.enqueue(conn, new_id(), "email", {"hello": "world"})
    [job, _] = services.claim(conn, "email", limit=5).jobs
    services.handle_status_callback(conn, job.id, "email", "succeeded", 3)


def test_applying_the_schema_again_changes_nothing(conn):
    add_some_jobs(conn)
    catalog, data = snapshot(conn), rows(conn)

    store.apply_schema(conn, schema_sql())
    store.apply_schema(conn, schema_sql())

    assert snapshot(conn) == catalog
    assert rows(conn) == data
    assert {"index CREATE INDEX find_queued_job ON public.queued_jobs USING btree (name, run_after) WHERE (status = 'queued'::job_status)"} <= catalog


def test_schema_over_rickovers_keeps_everything_and_adds_only_indexes_a_status_and_tables_of_its_own(conn, make_database):
    rickover = store.connect(make_database(template="template0"))
    rickover.execute(RICKOVER_SCHEMA)
    add_some_jobs(rickover)
    catalog, data = snapshot(rickover), rows(rickover)

    store.apply_schema(rickover, schema_sql())

    after = snapshot(rickover)
    assert rows(rickover) == data
    assert catalog <= after, "something Rickover built was changed or dropped"
    added = after - catalog
    own_tables = {line for line in added if any(f"{table}." in line or f" {table}_" in line or f" {table} " in line for table in JOBRUNNER_TABLES)}
    assert {table for table in JOBRUNNER_TABLES if f"column {table}." in " ".join(own_tables)} == set(JOBRUNNER_TABLES)
    assert {line.split()[0] for line in added - own_tables} <= {"index", "oid", "enum"}, added - own_tables
    assert {line for line in added if line.startswith("enum")} == {"enum archived_job_status cancelled after succeeded,failed,expired"}
    assert {name for name in JOBRUNNER_ADDITIONS if any(f" {name} " in line for line in added)} == JOBRUNNER_ADDITIONS
    # Rickover's three tables are exactly jobrunner's three tables
    assert rickover.execute(TABLE_COLUMNS).fetchall() == conn.execute(TABLE_COLUMNS).fetchall()
    # and jobrunner runs on it
    [job] = services.claim(rickover, "email", limit=5).jobs
    assert services.handle_status_callback(rickover, job.id, "email", "failed", 3).attempts == 2
    rickover.close()


def test_a_database_without_the_schema_says_to_migrate(make_database):
    conn = store.connect(make_database(template="template0"))
    with pytest.raises(SchemaMissing, match="jobrunner migrate"):
        services.get_job_type(conn, "email")
    conn.close()


def test_concurrent_migrations_wait_for_each_other(make_database):
    url = make_database(template="template0")
    connections = [store.connect(url) for _ in range(4)]
    try:
        # each migration raises if it fails; one still running after the timeout fails the test
        run_concurrently([lambda conn=conn: store.apply_schema(conn, schema_sql()) for conn in connections])
        assert connections[0].execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    finally:
        for conn in connections:
            conn.close()

"""Test databases: a throwaway PostgreSQL cluster, a template with the schema, a fresh database per test.

Set JOBRUNNER_TEST_DATABASE_URL to use an existing server instead (the role needs
CREATEDB); otherwise a private cluster is started with the machine's initdb/pg_ctl.
"""

import itertools
import os
import shutil
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from jobrunner import services, store
from jobrunner.cli import schema_sql
from jobrunner.localdb import LocalPostgres

TEMPLATE = f"jobrunner_template_{os.getpid()}"
# Durability is worthless in a throwaway cluster, and speed is not.
TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200"}
_database_numbers = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> str:
    """Connection info of a server where tests may create databases."""
    url = os.environ.get("JOBRUNNER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    workdir = tempfile.mkdtemp(prefix="jobrunner-test-")
    os.chmod(workdir, 0o755)  # as root, the cluster runs as `postgres`, which must reach its data directory
    cluster = LocalPostgres(Path(workdir) / "data", settings=TEST_SETTINGS)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def admin_execute(server: str, *statements: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture(scope="session")
def template_database(pg_server: str) -> str:
    admin_execute(pg_server, f"DROP DATABASE IF EXISTS {TEMPLATE}", f"CREATE DATABASE {TEMPLATE} TEMPLATE template0")
    conn = store.connect(make_conninfo(pg_server, dbname=TEMPLATE))
    store.apply_schema(conn, schema_sql())
    conn.close()
    yield TEMPLATE
    admin_execute(pg_server, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")


@pytest.fixture
def make_database(pg_server: str, template_database: str):
    """Create databases for this test (from the schema template, or empty) and drop them after it."""
    created = []

    def make(template: str = template_database) -> str:
        name = f"jobrunner_test_{os.getpid()}_{next(_database_numbers)}"
        admin_execute(pg_server, f"CREATE DATABASE {name} TEMPLATE {template}")
        created.append(name)
        return make_conninfo(pg_server, dbname=name)

    yield make
    for name in created:
        admin_execute(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(make_database) -> str:
    """A fresh database with jobrunner's schema, for this test alone."""
    return make_database()


@pytest.fixture
def conn(db_url: str):
    connection = store.connect(db_url)
    yield connection
    connection.close()


@pytest.fixture
def connect(db_url: str):
    """Open more connections to the test's database; they are closed after the test."""
    opened = []

    def open_connection():
        connection = store.connect(db_url)
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        connection.close()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def make_type(conn, name="email", strategy="at_least_once", attempts=3, concurrency=5):
    return services.create_job_type(conn, name, strategy, attempts, concurrency)


def enqueue_many(conn, name, count, **kwargs):
    return [services.enqueue(conn, new_id(), name, {"n": n}, **kwargs) for n in range(count)]


def wait_until(condition, what: str, timeout: float = 10.0, interval: float = 0.005):
    """Wait for `condition()` to be true, failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)

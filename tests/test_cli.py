"""The `jobrunner` command line, run as a real process."""

import os
import subprocess
import sys

from jobrunner import store


def run_cli(*args, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "jobrunner", *args], capture_output=True, text=True, env=environment, timeout=60)


def test_migrate_applies_the_schema_to_database_url(make_database):
    url = make_database(template="template0")
    result = run_cli("migrate", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    conn = store.connect(url)
    tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    conn.close()
    assert tables == {"jobs", "queued_jobs", "archived_jobs"}


def test_migrate_without_a_database_names_the_setting():
    result = run_cli("migrate")
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr


def test_migrate_with_an_unreachable_database_fails_cleanly(tmp_path):
    result = run_cli("migrate", "--database-url", f"postgresql:///x?host={tmp_path}&port=1&connect_timeout=2")
    assert result.returncode == 1
    assert "database is unavailable" in result.stderr
    assert "Traceback" not in result.stderr

"""A claim costs the same whatever the statistics say and however long the backlog is (issue 15).

After a burst onto a queue whose statistics say it is empty (the normal state
after a quiet night: autovacuum analyzes again only after its next nap), the
claim must still be an index scan that stops after the batch: no sort of the
backlog, whichever plan Postgres caches (custom, or generic once psycopg has
prepared the statement). With priorities (issue 16) too: jobs of a higher
priority not due yet (a million scheduled for tomorrow) are not read to reach
the due ones below them.
"""

import json
import re

import pytest
from conftest import make_type, utcnow

from jobrunner import services, store
from jobrunner.cli import migrate

BATCH = 7
DUE_ROWS = 100_000
# A claim reads its batch, plus a few rows for the count of in-progress jobs: far
# from the backlog. Generous, so that only a plan that reads the backlog fails.
MOST_ROWS_READ = 10 * BATCH
# The pages a claim touches (index and heap): its batch's rows and their new index entries
# (about 120), a few for each priority and
# for the count; reading past 100,000 index entries touches hundreds more.
MOST_PAGES_READ = 250

BURST = """
INSERT INTO queued_jobs (id, name, attempts, run_after, created_at, updated_at, status, data)
SELECT gen_random_uuid(), 'email', 3, now() - interval '1 hour' + n * interval '10 ms', now(), now(), 'queued', '{}'
FROM generate_series(1, %(rows)s) AS n
"""


@pytest.fixture
def burst_with_stale_statistics(conn):
    """DUE_ROWS due jobs of one type, in a table whose statistics were taken when it was empty."""
    make_type(conn, concurrency=BATCH * 10)
    conn.execute("ALTER TABLE queued_jobs SET (autovacuum_enabled = off)")  # no analyze behind the test's back
    conn.execute("ANALYZE queued_jobs")
    conn.execute(BURST, {"rows": DUE_ROWS})
    assert conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'queued_jobs'::regclass").fetchone()[0] <= 0
    return conn


# Jobs of a higher priority than the burst's, due only tomorrow, and a few due now
# of a priority between the two.
SCHEDULED_HIGHER = """
INSERT INTO queued_jobs (id, name, attempts, run_after, created_at, updated_at, status, data, priority)
SELECT gen_random_uuid(), 'email', 3, now() + interval '1 day' + n * interval '10 ms', now(), now(), 'queued', '{}', 10
FROM generate_series(1, %(rows)s) AS n
"""
DUE_AT_5 = 3
URGENT = """
INSERT INTO queued_jobs (id, name, attempts, run_after, created_at, updated_at, status, data, priority)
SELECT gen_random_uuid(), 'email', 3, now() - n * interval '1 s', now(), now(), 'queued', '{}', 5
FROM generate_series(1, %(rows)s) AS n
"""


@pytest.fixture
def burst_under_scheduled_priorities(burst_with_stale_statistics):
    """The burst (priority 0), DUE_ROWS jobs of priority 10 due tomorrow, DUE_AT_5 due now of priority 5: stale statistics."""
    conn = burst_with_stale_statistics
    conn.execute(SCHEDULED_HIGHER, {"rows": DUE_ROWS})
    conn.execute(URGENT, {"rows": DUE_AT_5})
    return conn


def _nodes(plan):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _explain_claim(conn, plan_cache_mode):
    """The executed plan of CLAIM_JOBS (rolled back), as the server caches it in `plan_cache_mode`."""
    params = {"name": "email", "limit": BATCH, "expire_limit": store.EXPIRE_BATCH, "now": utcnow()}
    statement, values = _numbered(store.CLAIM_JOBS, params)
    with conn.transaction(force_rollback=True):
        conn.execute(f"SET LOCAL plan_cache_mode = {plan_cache_mode}")
        conn.execute(f"PREPARE claim_under_test (text, int, int, timestamptz) AS {statement}")
        try:
            literals = ", ".join(conn.execute("SELECT quote_nullable(%s::text)", [value]).fetchone()[0] for value in values)
            [[explained]] = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim_under_test ({literals})").fetchall()
        finally:
            conn.execute("DEALLOCATE claim_under_test")
    return explained[0]["Plan"] if isinstance(explained, list) else json.loads(explained)[0]["Plan"]


def _numbered(statement, params):
    """`statement` with $1..$4 for its named parameters (a PREPARE needs them), and their values in order."""
    order = ["name", "limit", "expire_limit", "now"]
    numbered = re.sub(r"%\((\w+)\)s", lambda match: f"${order.index(match.group(1)) + 1}", statement)
    return numbered, [params[name] for name in order]


def _outline(plan, depth=0):
    """One line per node: type, index, rows out and rows read and thrown away."""
    line = f"{'  ' * depth}{plan.get('Subplan Name', '')} {plan['Node Type']} {plan.get('Index Name', '')} rows={plan['Actual Rows']}"
    if plan.get("Rows Removed by Filter"):
        line += f" removed={plan['Rows Removed by Filter']}"
    return "\n".join([line] + [_outline(child, depth + 1) for child in plan.get("Plans", [])])


def _assert_reads_its_batch_not_the_backlog(plan):
    [candidates] = [node for node in _nodes(plan) if node.get("Subplan Name") == "CTE candidates"]
    assert [node["Node Type"] for node in _nodes(candidates) if "Sort" in node["Node Type"]] == [], _outline(plan)
    scans = [node for node in _nodes(plan) if "Relation Name" in node]
    most_read = max(node["Actual Rows"] + node.get("Rows Removed by Filter", 0) for node in scans)
    assert most_read <= MOST_ROWS_READ, f"a claim of {BATCH} read {most_read} rows of a backlog of {DUE_ROWS}:\n{_outline(plan)}"
    assert "Index Scan" in [node["Node Type"] for node in _nodes(candidates)], _outline(plan)
    # index entries passed over inside a scan (a condition that bounds no range) are
    # counted as no row: the pages touched show them
    pages = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    assert pages <= MOST_PAGES_READ, f"a claim of {BATCH} touched {pages} pages:\n{_outline(plan)}"


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_a_claim_after_a_burst_with_stale_statistics_reads_its_batch_not_the_backlog(burst_with_stale_statistics, plan_cache_mode):
    _assert_reads_its_batch_not_the_backlog(_explain_claim(burst_with_stale_statistics, plan_cache_mode))


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_a_claim_reads_no_job_of_a_higher_priority_that_is_not_due(burst_under_scheduled_priorities, plan_cache_mode):
    _assert_reads_its_batch_not_the_backlog(_explain_claim(burst_under_scheduled_priorities, plan_cache_mode))


def test_the_claim_takes_the_highest_priority_due_first_then_the_oldest(burst_under_scheduled_priorities):
    conn = burst_under_scheduled_priorities
    urgent = [row[0] for row in conn.execute("SELECT id FROM queued_jobs WHERE priority = 5 ORDER BY run_after")]
    oldest = [row[0] for row in conn.execute("SELECT id FROM queued_jobs WHERE priority = 0 ORDER BY run_after LIMIT %s", [BATCH - DUE_AT_5])]

    claim = services.claim(conn, "email", limit=BATCH)

    assert [job.id for job in claim.jobs] == urgent + oldest
    assert [job.priority for job in claim.jobs] == [5] * DUE_AT_5 + [0] * (BATCH - DUE_AT_5)


def test_the_claim_takes_the_oldest_due_jobs_of_the_burst(burst_with_stale_statistics):
    conn = burst_with_stale_statistics
    oldest = [row[0] for row in conn.execute("SELECT id FROM queued_jobs ORDER BY run_after LIMIT %s", [BATCH])]

    claim = services.claim(conn, "email", limit=BATCH)

    assert [job.id for job in claim.jobs] == oldest


def test_migrate_replaces_the_claim_index_of_before_priorities_and_again_changes_nothing(conn, db_url):
    # a database migrated before priorities (0003)
    conn.execute("DROP INDEX queued_jobs_claim_by_priority")
    conn.execute("ALTER TABLE queued_jobs DROP COLUMN priority")
    conn.execute("ALTER TABLE archived_jobs DROP COLUMN priority")
    conn.execute("CREATE INDEX queued_jobs_claim ON queued_jobs (name, run_after, id) WHERE status = 'queued'")
    conn.execute("DELETE FROM jobrunner_schema_migrations WHERE version >= 3")

    migrate(db_url)
    migrate(db_url)

    indexes = dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'queued_jobs_claim%%'").fetchall())
    assert list(indexes) == ["queued_jobs_claim_by_priority"]
    assert indexes["queued_jobs_claim_by_priority"].endswith("USING btree (name, priority DESC, run_after, id) WHERE (status = 'queued'::job_status)")

"""Database faults at every statement of the claim, callback, not-delivered, stuck-job,
enqueue, cancel and replay paths: the connection is really dropped (pg_terminate_backend from
an admin connection) before a statement runs, after it ran, before the commit and after it.

Each path is run once without a fault to learn its points, then once per point with the
connection dropped there. After each fault the caller does what the real one does (the
downstream and API clients retry; the worker does not re-send a claim it never saw), the
watcher and a worker settle the queue (clock pinned far ahead), and then:
- the fault surfaced as DatabaseUnavailable, never a raw driver error;
- no job is both queued and archived, none is lost, none stays in progress;
- a job that never reached the downstream is not archived as failed (it is sent once it can be);
- an at_most_once job that may have reached the downstream is not sent again;
- a replay the client retried after the fault did not make two jobs.
"""

import contextlib
import dataclasses
import inspect
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from jobrunner import services, store
from jobrunner.errors import DatabaseUnavailable, JobrunnerError

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
JOB_TIMEOUT = timedelta(minutes=5)


class FaultPlan:
    """Counts the points a path passes; at point `fail_at` it drops the connection."""

    def __init__(self, admin, fail_at: int | None = None):
        self.admin, self.fail_at = admin, fail_at
        self.points: list[str] = []
        self.fired = ""

    def reach(self, label: str, conn, raise_after: bool) -> None:
        index = len(self.points)
        self.points.append(label)
        if index != self.fail_at:
            return
        self.fired = label
        self.admin.execute("SELECT pg_terminate_backend(%s, 5000)", [conn.info.backend_pid])
        if raise_after:
            # the statement (or commit) was done; its answer never reaches the client
            raise psycopg.OperationalError(f"server closed the connection unexpectedly (dropped {label})")


class FaultyCursor(psycopg.Cursor):
    def execute(self, query, params=None, **kwargs):
        label = " ".join(str(query).split())[:60]
        self.connection.plan.reach(f"before {label}", self.connection, raise_after=False)
        result = super().execute(query, params, **kwargs)
        self.connection.plan.reach(f"after {label}", self.connection, raise_after=True)
        return result


class FaultyConnection(psycopg.Connection):
    plan: FaultPlan
    _depth = 0

    @contextlib.contextmanager
    def transaction(self, *args, **kwargs):
        outermost = self._depth == 0
        self._depth += 1
        try:
            with super().transaction(*args, **kwargs) as tx:
                yield tx
                if outermost:
                    self.plan.reach("before commit", self, raise_after=False)
        finally:
            self._depth -= 1
        if outermost:
            self.plan.reach("after commit", self, raise_after=True)


def faulty_connection(url: str, plan: FaultPlan) -> FaultyConnection:
    conn = FaultyConnection.connect(url, autocommit=True)
    conn.cursor_factory = FaultyCursor
    conn.plan = plan
    return conn


# --- the paths under test ----------------------------------------------------------------


@dataclasses.dataclass
class Scene:
    """What a path starts from: a type, its jobs, and which of them reached the downstream."""

    conn: object
    name: str
    strategy: str
    jobs: list = dataclasses.field(default_factory=list)  # QueuedJob or ArchivedJob as set up
    delivered: set = dataclasses.field(default_factory=set)  # ids that may have reached the downstream
    sent: dict = dataclasses.field(default_factory=dict)  # id -> times sent
    before: set = dataclasses.field(default_factory=set)  # ids stored before the path ran


def stored_ids(conn) -> set:
    return {row[0] for row in stored(conn)}


def set_up(conn, strategy: str, claimed: bool, delivered: bool = True) -> Scene:
    conn.execute("TRUNCATE queued_jobs, archived_jobs, jobrunner_paused_job_types, jobs CASCADE")  # and the types' settings
    scene = Scene(conn, "faulty", strategy)
    services.create_job_type(conn, scene.name, strategy, 2, 2)
    scene.jobs = [services.enqueue(conn, uuid.uuid4(), scene.name, {"n": n}, now=T0) for n in range(2)]
    if claimed:
        scene.jobs = services.claim(conn, scene.name, 2, now=T0).jobs
        for job in scene.jobs:
            scene.sent[job.id] = 1
            if delivered or job is not scene.jobs[0]:  # delivered=False: the first one (the path's) never arrived
                scene.delivered.add(job.id)
    return scene


def archived_one(conn, strategy):
    scene = set_up(conn, strategy, claimed=True)
    services.handle_status_callback(conn, scene.jobs[0].id, scene.name, "succeeded", scene.jobs[0].attempts, now=T0)
    return scene


def release_unsent(conn, error: Exception) -> None:
    """The worker's answer to a claim whose COMMIT got no answer: queue its jobs again, unsent (worker._release_unsent)."""
    if isinstance(error, store.ClaimOutcomeUnknown):
        services.release_unsent_jobs(conn, error.jobs)


@dataclasses.dataclass(frozen=True)
class Path:
    name: str
    set_up: Callable  # (conn, strategy) -> Scene
    run: Callable  # (conn, scene) -> None
    retried: bool  # the real caller retries it after an error (a downstream's callback, an API client, the worker)
    recover: Callable | None = None  # (conn, scene, error) -> None: what the real caller does instead of a retry


PATHS = [
    Path(
        "claim",
        lambda c, s: set_up(c, s, claimed=False),
        lambda conn, sc: services.claim(conn, sc.name, 5, now=T0),
        retried=False,
        recover=lambda conn, sc, error: release_unsent(conn, error),
    ),
    Path(
        "callback succeeded",
        lambda c, s: set_up(c, s, claimed=True),
        lambda conn, sc: services.handle_status_callback(conn, sc.jobs[0].id, sc.name, "succeeded", sc.jobs[0].attempts, now=T0),
        retried=True,
    ),
    Path(
        "callback failed",
        lambda c, s: set_up(c, s, claimed=True),
        lambda conn, sc: services.handle_status_callback(conn, sc.jobs[0].id, sc.name, "failed", sc.jobs[0].attempts, now=T0),
        retried=True,
    ),
    Path(
        "not delivered",
        lambda c, s: set_up(c, s, claimed=True, delivered=False),
        lambda conn, sc: services.record_not_delivered(conn, sc.jobs[0], now=T0),
        retried=True,  # the worker records an outcome until the database takes it (worker._record)
    ),
    Path(
        "stuck round",
        lambda c, s: set_up(c, s, claimed=True),
        lambda conn, sc: services.archive_stuck_jobs(conn, JOB_TIMEOUT, now=T0 + 2 * JOB_TIMEOUT),
        retried=True,  # the next tick of the worker or the watcher
    ),
    Path("enqueue", lambda c, s: set_up(c, s, claimed=False), lambda conn, sc: sc.jobs.append(services.enqueue(conn, ENQUEUED_ID, sc.name, {"n": 9}, now=T0)), retried=True),
    Path("cancel", lambda c, s: set_up(c, s, claimed=False), lambda conn, sc: services.cancel(conn, sc.jobs[0].id, sc.name, now=T0), retried=True),
    Path("replay", archived_one, lambda conn, sc: replay_once(conn, sc), retried=True),
]
ENQUEUED_ID = uuid.UUID("00000000-0000-4000-8000-00000000e0e0")
REPLAY_ID = uuid.UUID("00000000-0000-4000-8000-0000000000ee")


def replay_once(conn, scene: Scene):
    """A replay as a careful client sends it: with its own new id (the idempotency key) once replay takes one."""
    key = {"new_id": REPLAY_ID} if "new_id" in inspect.signature(services.replay).parameters else {}
    return services.replay(conn, scene.jobs[0].id, scene.name, now=T0, **key)


# --- recovery and the invariants --------------------------------------------------------------

JOBS = "SELECT id, 'queued' AS t, status::text, name FROM queued_jobs UNION ALL SELECT id, 'archived', status::text, name FROM archived_jobs"


def stored(conn) -> list[tuple]:
    return conn.execute(JOBS).fetchall()


def settle(scene: Scene) -> None:
    """The watcher and a worker, with the clock far ahead: rescue what is stuck, send what is due, succeed it."""
    conn, now = scene.conn, T0
    for _ in range(10):
        now += timedelta(days=2)
        services.archive_stuck_jobs(conn, JOB_TIMEOUT, now=now)
        claim = services.claim(conn, scene.name, 100, now=now)
        for job in claim.jobs:
            if scene.strategy == "at_most_once":
                assert job.id not in scene.delivered, f"at_most_once job {job.job_id} sent again after it may have arrived"
            scene.sent[job.id] = scene.sent.get(job.id, 0) + 1
            scene.delivered.add(job.id)
            services.handle_status_callback(conn, job.id, job.name, "succeeded", job.attempts, now=now)
        if not conn.execute("SELECT count(*) FROM queued_jobs").fetchone()[0]:
            return


def check_after_fault(scene: Scene, what: str) -> None:
    before = scene.before
    rows = stored(scene.conn)
    ids = [row[0] for row in rows]
    assert len(ids) == len(set(ids)), f"{what}: a job both queued and archived: {rows}"
    lost = before - set(ids)
    assert not lost, f"{what}: jobs lost: {lost}"
    settle(scene)
    rows = stored(scene.conn)
    left = [row for row in rows if row[1] == "queued"]
    assert not left, f"{what}: still queued or in progress after the rescue: {left}"
    for job_id, _, status, _ in rows:
        if job_id not in scene.delivered:
            assert status != "failed", f"{what}: job {job_id} never reached the downstream, and was archived as failed"
    made = len(ids) - len(before)
    assert made <= 1, f"{what}: {made} jobs made by one enqueue or replay the client retried"


@pytest.fixture(scope="module")
def admin(module_db_url):
    conn = store.connect(module_db_url)
    yield conn
    conn.close()


def run_with_fault(url: str, admin, path: Path, strategy: str, fail_at: int | None) -> tuple[FaultPlan, Scene, Exception | None]:
    scene = path.set_up(admin, strategy)
    scene.before = stored_ids(admin)
    plan = FaultPlan(admin, fail_at)
    conn = faulty_connection(url, plan)
    try:
        path.run(conn, scene)
        return plan, scene, None
    except Exception as error:  # the outcome under test
        return plan, scene, error
    finally:
        conn.close()


@pytest.mark.parametrize("strategy", ["at_least_once", "at_most_once"])
@pytest.mark.parametrize("path", PATHS, ids=[path.name for path in PATHS])
def test_a_dropped_connection_at_any_point_loses_nothing(module_db_url, admin, path, strategy):
    clean, _, error = run_with_fault(module_db_url, admin, path, strategy, fail_at=None)
    assert error is None, error
    assert clean.points, "the path ran no statement"
    for index, point in enumerate(clean.points):
        plan, scene, error = run_with_fault(module_db_url, admin, path, strategy, fail_at=index)
        what = f"{path.name} ({strategy}), connection dropped {point}"
        assert plan.fired == point, f"{what}: the path took another way ({plan.points})"
        assert isinstance(error, DatabaseUnavailable), f"{what}: raised {error!r}, not DatabaseUnavailable"
        if path.retried:
            with contextlib.suppress(JobrunnerError):  # it may find its own change done: a 4xx for the client
                path.run(admin, scene)
        if path.recover:
            path.recover(admin, scene, error)
        check_after_fault(scene, what)

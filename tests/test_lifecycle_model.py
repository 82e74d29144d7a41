"""A stateful model of the job lifecycle: random sequences of the services' operations on a
real database, checked step by step against a small reference model.

Operations: create a type, enqueue, claim (= sent), a dispatch that certainly did not arrive
(record_not_delivered), callbacks (fresh, stale, duplicate, for another type), replay, cancel,
pause, resume, update the type, stuck-job rounds, expiry rounds, clock jumps. Time is pinned
with the services' `now=`; the clock only moves when a rule moves it.

Invariants, after every step:
- a job is in exactly one table, with the status and attempts the model expects, and nothing
  appears that was not enqueued or replayed (nothing lost, nothing made up);
- attempts never increase;
- a claim never takes a type past its concurrency, and takes exactly the free slots' worth;
- an at_most_once job is never sent twice, unless the send before was certainly not delivered;
- a retry is due 2^(attempts the job has used) s later (capped at a day), also after the
  type's attempts were changed.
"""

import dataclasses
import itertools
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from conftest import examples
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, precondition, rule, run_state_machine_as_test

from jobrunner import services, store
from jobrunner.errors import DatabaseError, DatabaseUnavailable, JobrunnerError

START = datetime(2030, 1, 1, tzinfo=timezone.utc)
MAX_DELAY = timedelta(days=1)
ARCHIVED = ("succeeded", "failed", "expired", "cancelled")


@dataclasses.dataclass
class ModelType:
    strategy: str
    attempts: int
    concurrency: int
    remembered: int | None = None  # the concurrency a resume gives back


@dataclasses.dataclass
class ModelJob:
    id: uuid.UUID
    name: str
    status: str  # queued, in-progress, or an archived status
    attempts: int  # remaining
    enqueued_with: int  # the attempts it was enqueued with: "attempts used" counts from these
    run_after: datetime
    expires_at: datetime | None
    updated_at: datetime | None = None  # when claimed
    sent: object = None  # the QueuedJob handed to the dispatcher by the last claim
    may_have_arrived: bool = False  # sent, and not known to have missed the downstream
    lowest_attempts: int = 0  # the fewest attempts the database ever showed

    def due_and_live(self, now: datetime) -> bool:
        return self.status == "queued" and self.run_after <= now and (self.expires_at is None or self.expires_at > now)


def expected_delay(job: ModelJob, remaining: int) -> timedelta:
    used = job.enqueued_with - remaining
    return min(timedelta(seconds=2**used), MAX_DELAY) if used < 40 else MAX_DELAY


offsets = st.one_of(st.none(), st.integers(-5, 30).map(lambda s: timedelta(seconds=s)))


class Lifecycle(RuleBasedStateMachine):
    conn = None  # the database connection, set by the test

    def __init__(self):
        super().__init__()
        # and the types' settings and rate limits (CASCADE), and what is kept per job id: every
        # example numbers its jobs from 1, and an earlier example's total of attempts for
        # an id would change this one's back-off
        self.conn.execute(
            "TRUNCATE queued_jobs, archived_jobs, jobrunner_paused_job_types, jobrunner_job_attempts, jobrunner_job_deadlines, jobs CASCADE"
        )
        self.now = START
        self.types: dict[str, ModelType] = {}
        self.jobs: dict[uuid.UUID, ModelJob] = {}
        self.type_numbers = itertools.count()
        self.job_numbers = itertools.count(1)

    types = Bundle("types")
    job_ids = Bundle("job_ids")

    def new_id(self) -> uuid.UUID:
        return uuid.UUID(f"00000000-0000-4000-8000-{next(self.job_numbers):012x}")

    # --- job types ---

    @initialize(target=types, strategy=st.sampled_from(["at_least_once", "at_most_once"]), attempts=st.integers(1, 4), concurrency=st.integers(1, 3))
    def first_type(self, strategy, attempts, concurrency):
        """Every sequence starts with a type that can run jobs, so that claims and outcomes happen early."""
        return self.create_type(strategy, attempts, concurrency)

    @precondition(lambda self: len(self.types) < 3)
    @rule(target=types, strategy=st.sampled_from(["at_least_once", "at_most_once"]), attempts=st.integers(1, 4), concurrency=st.integers(0, 3))
    def create_type(self, strategy, attempts, concurrency):
        name = f"t{next(self.type_numbers)}"
        services.create_job_type(self.conn, name, strategy, attempts, concurrency)
        self.types[name] = ModelType(strategy, attempts, concurrency)
        return name

    @rule(name=types)
    def pause(self, name):
        model = self.types[name]
        paused = services.pause_job_type(self.conn, name)
        if model.concurrency > 0 and model.remembered is None:
            model.remembered = model.concurrency
        model.concurrency = 0
        assert paused.concurrency == 0

    @rule(name=types, concurrency=st.one_of(st.none(), st.integers(1, 3)))
    def resume(self, name, concurrency):
        model = self.types[name]
        back = concurrency or model.remembered
        try:
            resumed = services.resume_job_type(self.conn, name, concurrency)
        except JobrunnerError as error:
            assert back is None and model.concurrency == 0, f"resume refused: {error}"
            assert not isinstance(error, (DatabaseError, DatabaseUnavailable)), error
            model.remembered = None
            return
        model.remembered = None
        if back is not None:
            model.concurrency = back
        assert resumed.concurrency == model.concurrency

    @rule(name=types, attempts=st.one_of(st.none(), st.integers(1, 6)), concurrency=st.one_of(st.none(), st.integers(0, 3)))
    def update_type(self, name, attempts, concurrency):
        model = self.types[name]
        if attempts is None and concurrency is None:
            with pytest.raises(JobrunnerError):
                services.update_job_type(self.conn, name, attempts, concurrency)
            return
        updated = services.update_job_type(self.conn, name, attempts, concurrency)
        model.attempts = attempts or model.attempts
        if concurrency is not None:
            model.concurrency, model.remembered = concurrency, None
        assert (updated.attempts, updated.concurrency) == (model.attempts, model.concurrency)

    # --- jobs ---

    @rule(target=job_ids, name=types, run_after=offsets, expires_at=offsets)
    def enqueue(self, name, run_after, expires_at):
        job_id = self.new_id()
        run_at = None if run_after is None else self.now + run_after
        expires = None if expires_at is None else self.now + expires_at
        job = services.enqueue(self.conn, job_id, name, {"n": job_id.int}, run_at, expires, now=self.now)
        attempts = self.types[name].attempts
        self.jobs[job_id] = ModelJob(job_id, name, "queued", attempts, attempts, run_at or self.now, expires, lowest_attempts=attempts)
        assert (job.status, job.attempts, job.run_after, job.expires_at) == ("queued", attempts, run_at or self.now, expires)
        return job_id

    @rule(name=types, limit=st.integers(1, 4))
    def claim(self, name, limit):
        model = self.types[name]
        mine = [job for job in self.jobs.values() if job.name == name]
        in_progress = sum(job.status == "in-progress" for job in mine)
        due = [job for job in mine if job.due_and_live(self.now)]
        expiring = {job.id for job in mine if job.status == "queued" and job.run_after <= self.now and job.expires_at is not None and job.expires_at <= self.now}
        claim = services.claim(self.conn, name, limit, now=self.now)
        claimed = {job.id: job for job in claim.jobs}
        free = max(0, model.concurrency - in_progress)
        assert len(claimed) == min(limit, free, len(due)), (
            f"claimed {len(claimed)} with limit {limit}, {free} free slots (concurrency {model.concurrency}, {in_progress} in progress), {len(due)} due"
        )
        assert {job.id for job in claim.expired} == expiring
        assert set(claimed) <= {job.id for job in due}, "claimed a job that was not due"
        if claimed and len(claimed) < len(due):  # oldest due first
            assert max(self.jobs[i].run_after for i in claimed) <= min(job.run_after for job in due if job.id not in claimed)
        for job_id in expiring:
            self.jobs[job_id].status = "expired"
        for job_id, sent in claimed.items():
            job = self.jobs[job_id]
            assert sent.attempts == job.attempts
            if self.types[name].strategy == "at_most_once":
                assert not job.may_have_arrived, f"at_most_once job {job_id} sent twice: the send before may have arrived"
            job.status, job.updated_at, job.sent, job.may_have_arrived = "in-progress", self.now, sent, True

    @rule(job_id=job_ids)
    def not_delivered(self, job_id):
        """The dispatcher's POST certainly never reached the downstream (refused connection)."""
        job = self.jobs[job_id]
        if job.sent is None:
            return
        current = job.status == "in-progress" and job.attempts == job.sent.attempts
        try:
            result = services.record_not_delivered(self.conn, job.sent, now=self.now)
        except JobrunnerError as error:
            assert not current, f"not delivered refused for the attempt in progress: {error}"
            assert not isinstance(error, (DatabaseError, DatabaseUnavailable)), error
            return
        assert current, f"not delivered accepted for a stale attempt: {result}"
        job.may_have_arrived = False
        self.fail_attempt(job, result, retryable=True, delivered=False)

    @rule(
        job_id=job_ids,
        status=st.sampled_from(["succeeded", "failed"]),
        attempt_offset=st.sampled_from([0, 0, 0, 1, -1]),
        retryable=st.booleans(),
        other_name=st.booleans(),
    )
    def callback(self, job_id, status, attempt_offset, retryable, other_name):
        job = self.jobs[job_id]
        name = f"{job.name}-other" if other_name else job.name
        attempt = job.attempts + attempt_offset
        if status == "succeeded":
            accepted = job.status in ("queued", "in-progress") and not other_name
        else:
            accepted = job.status == "in-progress" and attempt_offset == 0 and not other_name
        try:
            result = services.handle_status_callback(self.conn, job_id, name, status, attempt, retryable, now=self.now)
        except JobrunnerError as error:
            assert not accepted, f"{status} callback for attempt {attempt} of {job} refused: {error}"
            assert not isinstance(error, (DatabaseError, DatabaseUnavailable)), error
            return
        assert accepted, f"{status} callback for attempt {attempt} accepted, model job {job}: {result}"
        if status == "succeeded":
            job.status = "succeeded"
            assert (result.status, result.attempts) == ("succeeded", job.attempts)
        else:
            self.fail_attempt(job, result, retryable, delivered=True)

    def fail_attempt(self, job: ModelJob, result, retryable: bool, delivered: bool) -> None:
        """What services._fail must have done: retry with back-off, or archive as failed."""
        remaining = job.attempts - 1
        at_most_once = self.types[job.name].strategy == "at_most_once"
        if not retryable or remaining <= 0 or (delivered and at_most_once):
            job.status, job.attempts = "failed", max(0, remaining)
            assert (result.status, result.attempts) == ("failed", job.attempts), result
            return
        delay = expected_delay(job, remaining)
        job.status, job.attempts, job.run_after = "queued", remaining, self.now + delay
        assert result.status == "queued" and result.attempts == remaining, result
        assert result.run_after - self.now == delay, (
            f"retry of a job enqueued with {job.enqueued_with} attempts, {remaining} left (type now has "
            f"{self.types[job.name].attempts}): due in {result.run_after - self.now}, expected {delay}"
        )

    @rule(job_id=job_ids)
    def cancel(self, job_id):
        job = self.jobs[job_id]
        try:
            result = services.cancel(self.conn, job_id, job.name, now=self.now)
        except JobrunnerError as error:
            assert job.status != "queued", f"cancel of a queued job refused: {error}"
            assert not isinstance(error, (DatabaseError, DatabaseUnavailable)), error
            return
        assert job.status == "queued", f"cancelled a job that was {job.status}"
        job.status = "cancelled"
        assert (result.status, result.attempts) == ("cancelled", job.attempts)

    @rule(target=job_ids, job_id=job_ids)
    def replay(self, job_id):
        job = self.jobs[job_id]
        try:
            replayed = services.replay(self.conn, job_id, job.name, now=self.now)
        except JobrunnerError as error:
            assert job.status not in ARCHIVED, f"replay of an archived job refused: {error}"
            assert not isinstance(error, (DatabaseError, DatabaseUnavailable)), error
            return multiple()
        assert job.status in ARCHIVED, f"replayed a job that is {job.status}"
        attempts = self.types[job.name].attempts
        self.jobs[replayed.id] = ModelJob(replayed.id, job.name, "queued", attempts, attempts, self.now, job.expires_at, lowest_attempts=attempts)
        assert (replayed.status, replayed.attempts, replayed.run_after, replayed.expires_at) == ("queued", attempts, self.now, job.expires_at)
        return replayed.id

    @rule(job_id=job_ids)
    def expire_before_sending(self, job_id):
        """The dispatcher, between 503 resends, finds the job's expires_at passed."""
        job = self.jobs[job_id]
        if job.sent is None:
            return
        expected = job.status == "in-progress" and job.attempts == job.sent.attempts and job.expires_at is not None and job.expires_at <= self.now
        result = services.expire_in_progress(self.conn, job.sent, now=self.now)
        assert (result is not None) == expected, (job, result)
        if expected:
            job.status = "expired"

    # --- rounds and the clock ---

    @rule(older_than=st.integers(1, 600))
    def stuck_round(self, older_than):
        cutoff = self.now - timedelta(seconds=older_than)
        stuck = [job for job in self.jobs.values() if job.status == "in-progress" and job.updated_at < cutoff]
        results = {result.id: result for result in services.archive_stuck_jobs(self.conn, timedelta(seconds=older_than), now=self.now)}
        assert set(results) == {job.id for job in stuck}
        for job in stuck:
            self.fail_attempt(job, results[job.id], retryable=True, delivered=True)

    @rule()
    def expiry_round(self):
        expiring = [job for job in self.jobs.values() if job.status == "queued" and job.run_after <= self.now and job.expires_at is not None and job.expires_at <= self.now]
        names = store.archive_expired_jobs(self.conn, 1000, now=self.now)
        assert sorted(names) == sorted(job.name for job in expiring)
        for job in expiring:
            job.status = "expired"

    @rule(jump=st.one_of(st.integers(-30, 30), st.integers(0, 600), st.sampled_from([3600, 86400, 2 * 86400])))
    def move_clock(self, jump):
        self.now += timedelta(seconds=jump)

    # --- the invariants ---

    @invariant()
    def database_matches_model(self):
        queued = {row[0]: row[1:] for row in self.conn.execute("SELECT id, name, status::text, attempts, run_after, expires_at FROM queued_jobs")}
        archived = {row[0]: row[1:] for row in self.conn.execute("SELECT id, name, status::text, attempts, expires_at FROM archived_jobs")}
        both = set(queued) & set(archived)
        assert not both, f"jobs both queued and archived: {both}"
        stored = set(queued) | set(archived)
        assert stored == set(self.jobs), f"lost: {set(self.jobs) - stored}, unexpected: {stored - set(self.jobs)}"
        for job in self.jobs.values():
            if job.status in ARCHIVED:
                assert job.id in archived, f"{job} is not archived"
                name, status, attempts, _ = archived[job.id]
            else:
                assert job.id in queued, f"{job} is not queued"
                name, status, attempts, run_after, _ = queued[job.id]
                assert run_after == job.run_after, f"{job.id}: run_after {run_after}, model {job.run_after}"
            assert (name, status, attempts) == (job.name, job.status, job.attempts), f"database {name, status, attempts}, model {job}"
            assert attempts <= job.lowest_attempts, f"{job.id}: attempts went up from {job.lowest_attempts} to {attempts}"
            job.lowest_attempts = attempts

    @invariant()
    def types_match_model(self):
        stored = {row[0]: row[1:] for row in self.conn.execute("SELECT name, attempts, concurrency FROM jobs")}
        assert stored == {name: (t.attempts, t.concurrency) for name, t in self.types.items()}


@pytest.fixture(scope="module")
def conn(module_db_url):
    connection = store.connect(module_db_url)
    yield connection
    connection.close()


def test_lifecycle_sequences_keep_the_promises(conn):
    Lifecycle.conn = conn
    run_state_machine_as_test(Lifecycle, settings=settings(max_examples=examples(60), stateful_step_count=40))

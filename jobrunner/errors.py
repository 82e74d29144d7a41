"""The errors jobrunner raises: each names what went wrong in words a person can act on.

Nothing above the store sees a psycopg exception; the store turns them into these.
The HTTP server maps each class to a status code and a Rickover error id.
"""


class JobrunnerError(Exception):
    """Base class: `str(error)` is the message shown to the client."""


class InvalidField(JobrunnerError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"Invalid {field}: {reason}")
        self.field = field
        self.reason = reason


class InvalidJobId(JobrunnerError):
    """A job id that is not `job_` followed by a UUID; `wrong_prefix` tells which part is wrong."""

    def __init__(self, message: str, wrong_prefix: bool = False):
        super().__init__(message)
        self.wrong_prefix = wrong_prefix


class UnknownJobType(JobrunnerError):
    def __init__(self, name: str):
        super().__init__(f"Job type {name!r} does not exist")
        self.name = name


class JobTypeExists(JobrunnerError):
    def __init__(self, name: str):
        super().__init__(f"A job type named {name!r} already exists")
        self.name = name


class UnknownJob(JobrunnerError):
    def __init__(self, job_id: str):
        super().__init__(f"Job {job_id} does not exist")
        self.job_id = job_id


class JobNameMismatch(JobrunnerError):
    """The job exists, but under another job type than the one named."""

    def __init__(self, job_id: str, name: str, actual_name: str):
        super().__init__(f"Job {job_id} exists, but with job type {actual_name!r}, not {name!r}")
        self.job_id = job_id
        self.actual_name = actual_name


class JobAlreadyArchived(JobrunnerError):
    def __init__(self, job_id: str, status: str):
        super().__init__(f"Job {job_id} is already archived as {status}")
        self.job_id = job_id
        self.status = status


class JobIdInUse(JobrunnerError):
    """An id already used by another job: an enqueue under another type (Rickover returned that job), or a replay's chosen id."""

    def __init__(self, job_id: str, actual_name: str):
        super().__init__(f"Job {job_id} is already used by another job (type {actual_name!r})")
        self.job_id = job_id
        self.actual_name = actual_name


class StaleCallback(JobrunnerError):
    """A failed callback (or a heartbeat) for an attempt that is not the one in progress: it changes nothing."""

    def __init__(self, job_id: str, attempt: int, stored_attempts: int, status: str, what: str = "a failed callback"):
        super().__init__(
            f"Job {job_id} is {status} with {stored_attempts} attempts remaining; "
            f"{what} for attempt {attempt} is stale and changes nothing"
        )
        self.job_id = job_id
        self.attempt = attempt
        self.stored_attempts = stored_attempts


class NotInProgress(JobrunnerError):
    """A heartbeat for a job that is queued, not sent: there is no attempt to keep alive."""

    def __init__(self, job_id: str):
        super().__init__(f"Job {job_id} is queued, not in progress: a heartbeat is only for a job sent and not yet called back")
        self.job_id = job_id


class NotReplayable(JobrunnerError):
    def __init__(self, job_id: str, status: str):
        super().__init__(f"Job {job_id} is still {status}; only archived jobs can be replayed")
        self.job_id = job_id
        self.status = status


class NotCancellable(JobrunnerError):
    def __init__(self, job_id: str, status: str):
        super().__init__(f"Job {job_id} is {status}: only a queued job that has not been sent can be cancelled")
        self.job_id = job_id
        self.status = status


class NotPaused(JobrunnerError):
    def __init__(self, name: str):
        super().__init__(f"Job type {name!r} has concurrency 0 but was not paused: give the concurrency to resume with")
        self.name = name


class UnknownSchedule(JobrunnerError):
    def __init__(self, name: str):
        super().__init__(f"Schedule {name!r} does not exist")
        self.name = name


class ScheduleExists(JobrunnerError):
    def __init__(self, name: str):
        super().__init__(f"A schedule named {name!r} already exists")
        self.name = name


class CallbackForbidden(JobrunnerError):
    """A callback for a job type with a callback token that did not present it (403): it changes nothing."""

    def __init__(self, name: str):
        super().__init__(f"Callbacks for job type {name!r} must carry its callback token")
        self.name = name


class Unauthorized(JobrunnerError):
    """Who is asking is not known (401): raised by an Authorizer."""


class Forbidden(JobrunnerError):
    """Who is asking is known, and may not do this (403): raised by an Authorizer."""


class DatabaseUnavailable(JobrunnerError):
    """PostgreSQL did not answer; the caller may retry later (HTTP 503)."""


class SchemaMissing(DatabaseUnavailable):
    """The database has no jobrunner tables yet, or an older schema than this code needs: `jobrunner migrate`."""


class SchemaTooNew(JobrunnerError):
    """The database has migrations this code does not know: a newer jobrunner migrated it."""


class DatabaseError(JobrunnerError):
    """The database refused a statement for a reason that is jobrunner's bug, not the caller's."""

"""The built-in job handler: POST each claimed job to the downstream and say what the POST proved.

`HttpDelivery` is what runs when no application handler is configured
(Rickover's `services.JobProcessor`, still importable by that name). It changes
no job's state itself: it returns an outcome (`outcomes`), and the worker records
it through `services.record_outcome`, as it does an application handler's.
"""

import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

from . import services, store
from .downstream import Delivery, Downstream, error_kind
from .errors import JobrunnerError
from .metrics import ServiceMetrics
from .models import DEFAULT_POLICY, QueuedJob, TypePolicy
from .outcomes import Accepted, ExpiredMeanwhile, MaybeDelivered, NotDelivered, Outcome, Rejected, SettledMeanwhile

log = logging.getLogger(__name__)

# Base of the back-off between resends of a job the downstream answered 503 to.
UNAVAILABLE_SLEEP_FACTOR = timedelta(milliseconds=500)
UNAVAILABLE_RESENDS = 3


class HttpDelivery:
    """POST each job to the downstream (a `plugins.JobHandler`); its callback, or the timeout, reports how the job went.

    A 503 is resent a few times with back-off, without using an attempt, as long
    as the job is still in progress at that attempt and not expired. Each job goes
    to its type's `downstream_url` within its `downstream_timeout` (`policies`,
    replaced by the worker whenever it reads the types), else to the defaults.
    """

    def __init__(self, pool: store.Pool, downstream: Downstream, stop: threading.Event, counted: ServiceMetrics | None = None):
        self.pool, self.downstream, self.stop = pool, downstream, stop
        self.metrics = counted or ServiceMetrics()
        self.policies: Mapping[str, TypePolicy] = {}  # job type -> its settings (only types with some)

    def do_work(self, job: QueuedJob) -> Outcome:
        """Send one attempt; what it proved. Never raises: an unexpected error after the POST may have gone out is MaybeDelivered."""
        try:
            return self._deliver(job)
        except Exception:  # a bug; the POST may have been delivered: its callback, or the timeout, settles it
            log.exception("job %s (%s): unexpected error while delivering; waiting for its callback", job.job_id, job.name)
            return MaybeDelivered("unexpected error")

    def _deliver(self, job: QueuedJob) -> Outcome:
        result, reason = self._post(job)
        for resend in range(UNAVAILABLE_RESENDS):
            # 503: the downstream is busy; try again soon without using an attempt
            if result is not Delivery.UNAVAILABLE:
                break
            if self.stop.wait(UNAVAILABLE_SLEEP_FACTOR.total_seconds() * 2**resend):
                break
            meanwhile = self._settled_meanwhile(job, reason)
            if meanwhile is not None:
                return meanwhile
            result, reason = self._post(job)
        return self._outcome(job, result, reason)

    def _settled_meanwhile(self, job: QueuedJob, reason: str) -> Outcome | None:
        """Before a resend: None if the job is still to send; else why not.

        A proxy may answer 503 while the downstream works on the job and calls back:
        once the job is archived or moved on, it is not sent again.
        """
        try:
            with self.pool.connection() as conn:
                in_progress = services.is_in_progress(conn, job)
        except JobrunnerError as error:  # the 503s stand: the worker records them once the database answers
            log.info("job %s (%s) not delivered (%s), and not resent: %s", job.job_id, job.name, reason, error)
            return NotDelivered(reason)
        if not in_progress:
            log.info("job %s (%s) was settled while the downstream answered 503: not sent again", job.job_id, job.name)
            return SettledMeanwhile()
        if job.expires_at is not None and job.expires_at <= datetime.now(timezone.utc):
            return ExpiredMeanwhile()
        return None

    def _outcome(self, job: QueuedJob, result: Delivery, reason: str) -> Outcome:
        if result is Delivery.ACCEPTED:
            return Accepted()
        if result is Delivery.MAYBE_DELIVERED:
            log.info("job %s (%s) may have been delivered (%s): waiting for its callback", job.job_id, job.name, reason)
            return MaybeDelivered(reason)
        if result is Delivery.REJECTED:
            log.info("job %s (%s) rejected by the downstream: %s", job.job_id, job.name, reason)
            return Rejected(reason)
        log.info("job %s (%s) not delivered: %s", job.job_id, job.name, reason)  # refused, unreachable, or 503s
        return NotDelivered(reason)

    def _post(self, job: QueuedJob) -> tuple[Delivery, str]:
        policy = self.policies.get(job.name, DEFAULT_POLICY)
        started = time.perf_counter()
        result, reason = self.downstream.post(
            job,
            base_url=policy.downstream_url,
            timeout=policy.downstream_timeout,
            signing_secrets=policy.signing_secrets,
            callback_token=policy.callback_token,
        )
        self.metrics.downstream_latency.observe(time.perf_counter() - started, job.name)
        if result is Delivery.ACCEPTED:
            self.metrics.dispatched.inc(job.name)
        else:
            self.metrics.downstream_errors.inc(job.name, error_kind(result, reason))
        return result, reason


# Rickover's name for it (its services.JobProcessor); jobrunner.JobProcessor and services.JobProcessor point here
JobProcessor = HttpDelivery

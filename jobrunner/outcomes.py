"""What one attempt of a job came to: the values a job handler returns, and the one vocabulary
`services.record_outcome` turns into a change of the job's state.

An application's handler returns `Succeeded()` or `Failed(...)` (or None: reported
later by other means). The built-in HTTP delivery (`delivery.HttpDelivery`) says
what its POST proved: the others below.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Succeeded:
    """The attempt did the job: it is archived `succeeded`."""


@dataclasses.dataclass(frozen=True)
class Failed:
    """The attempt failed: retried with back-off while attempts remain, unless not `retryable`."""

    retryable: bool = True


@dataclasses.dataclass(frozen=True)
class Accepted:
    """The downstream took the job (or a handler will report it later): its callback, or the timeout, settles it."""


@dataclasses.dataclass(frozen=True)
class MaybeDelivered:
    """The POST went out and its answer did not come back whole: wait for the callback, never resend."""

    reason: str = ""


@dataclasses.dataclass(frozen=True)
class NotDelivered:
    """The downstream certainly never got this attempt (refused, unreachable, 503 to the last resend)."""

    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Rejected:
    """The downstream answered with an error (not a 503): it arrived, so it may have been acted on."""

    reason: str = ""


@dataclasses.dataclass(frozen=True)
class SettledMeanwhile:
    """While the downstream answered 503, the job was called back or timed out: nothing more to do."""


@dataclasses.dataclass(frozen=True)
class ExpiredMeanwhile:
    """While the downstream answered 503, the job's expires_at passed: archive it `expired`, never send it again."""


Outcome = Succeeded | Failed | Accepted | MaybeDelivered | NotDelivered | Rejected | SettledMeanwhile | ExpiredMeanwhile
OUTCOMES = (Succeeded, Failed, Accepted, MaybeDelivered, NotDelivered, Rejected, SettledMeanwhile, ExpiredMeanwhile)

"""Logging an outage once: its first failure and its recovery, not every failed try in between.

One copy for every child's loops (the worker's database access, LISTEN connection and
each job type's claims; the watcher's rounds), so that an operator reads the same two
lines for every outage, whichever process had it.
"""

import logging

from .errors import JobrunnerError


class OutageLog:
    """The first failure of an outage and the recovery, on `log`; `retrying` says what happens meanwhile."""

    def __init__(self, what: str, log: logging.Logger, retrying: str = "retrying with back-off until it recovers"):
        self.what = what
        self.log = log
        self.retrying = retrying
        self.failures = 0

    def failed(self, error: Exception) -> None:
        if self.failures == 0:
            # anything but a jobrunner error is a bug: its traceback says where
            bug = not isinstance(error, JobrunnerError)
            self.log.warning("%s failed: %s; %s", self.what, error, self.retrying, exc_info=bug)
        self.failures += 1

    def recovered(self) -> None:
        if self.failures:
            self.log.warning("%s recovered after %d failed tries", self.what, self.failures)
        self.failures = 0

"""What an application plugs into jobrunner, and how jobrunner finds it by import path.

A **job handler** does one attempt of a job; its public name is `jobrunner.Worker`
(Rickover's `dequeuer.Worker`, and the `default_worker`/`job_workers` settings).
The default, `delivery.HttpDelivery`, POSTs the job to the downstream, whose
callback later says how it went. Another handler, named in the configuration as
`package.module:factory` (`default_worker`, or per job type in `job_workers`),
runs in the worker process and says how it went by returning `Succeeded()` or
`Failed(retryable=...)`. Either way the worker process records the outcome
through `services.record_outcome`, where an application's result takes the path
HTTP callbacks take, so retries, back-off, concurrency, timeouts and the watcher
treat both alike.

An **Authorizer** decides who may use the API (Rickover's `server.Authorizer`).
The default checks the configured users; another can be named in `authorizer`.

Each factory is called with the `Config` and returns the object.
"""

import hmac
import importlib
from collections.abc import Callable
from typing import Any, Protocol

from .errors import Unauthorized
from .models import QueuedJob
from .outcomes import Failed, Succeeded  # what a handler returns (jobrunner.Succeeded, jobrunner.Failed)


class JobHandler(Protocol):
    def do_work(self, job: QueuedJob) -> Succeeded | Failed | None:
        """Do one attempt of `job` (its `attempts` is the attempt's number, as callbacks name it).

        Return the outcome, or None when it will be reported later by other means
        (an HTTP callback, as the downstream's). Raising is a failed, retryable
        attempt; its traceback is logged once. A job still unreported after
        job_timeout counts as failed, as an HTTP job without its callback does.
        """

    def sleep(self, failed_attempts: int) -> float:
        """Seconds until the next safety poll (which covers lost notifications), after `failed_attempts` polls so far.

        Asked of the default handler only, and optional: without it, the built-in
        pacing (10 ms x sleep_factor^n, capped).
        """


# The public name (jobrunner.Worker, docs/library.md, examples/): Rickover's dequeuer.Worker
Worker = JobHandler


class Authorizer(Protocol):
    def authorize(self, user: str, password: str) -> None:
        """Return if `user` may use the API with `password`; raise `Unauthorized` (401) or `Forbidden` (403)."""


class ConfiguredUsers:
    """The built-in Authorizer: the `users` setting's name:password pairs, compared in constant time."""

    def __init__(self, users: tuple[tuple[str, str], ...]):
        self._passwords = {name.encode(): password.encode() for name, password in users}

    def authorize(self, user: str, password: str) -> None:
        expected = self._passwords.get(user.encode())
        # compared even for an unknown user, so that the time taken does not tell which users exist
        matches = hmac.compare_digest(password.encode(), expected or b"\0")
        if expected is None or not matches:
            raise Unauthorized("Incorrect user name or password")


def import_factory(path: str) -> Callable[..., Any]:
    """The callable at `package.module:name` (ValueError, saying what is wrong, otherwise)."""
    module_name, colon, attribute = path.strip().partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"must be package.module:factory, not {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # not only ImportError: the module's own code may fail (a SyntaxError, a KeyError...)
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {type(error).__name__}: {error}") from None
    try:
        factory = getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no {attribute!r} (from {path!r})") from None
    if not callable(factory):
        raise ValueError(f"{path!r} is not callable")
    return factory


def build_handlers(config, default: JobHandler) -> tuple[JobHandler, dict[str, JobHandler]]:
    """The default handler, and each job type's own (one object per import path, shared by its types)."""
    made: dict[str, JobHandler] = {}

    def make(path: str) -> JobHandler:
        if path not in made:
            made[path] = import_factory(path)(config)
        return made[path]

    chosen_default = make(config.default_worker) if config.default_worker else default
    return chosen_default, {name: make(path) for name, path in config.job_workers}


def build_authorizer(config) -> Authorizer:
    return import_factory(config.authorizer)(config) if config.authorizer else ConfiguredUsers(config.users)

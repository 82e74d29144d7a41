"""A Worker and an Authorizer for tests, named by import path as an application's would be."""

import threading

from jobrunner import Failed, Forbidden, Succeeded, Unauthorized


class ScriptedWorker:
    """Does what each job's data says: {"do": "succeed" | "fail" | "fail_for_good" | "raise" | "hang_first"}."""

    made: list["ScriptedWorker"] = []

    def __init__(self, config):
        self.config = config
        self.calls: list[tuple[str, int]] = []  # (job id, attempt)
        self.running = 0
        self.most_running = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        ScriptedWorker.made.append(self)

    def do_work(self, job):
        with self._lock:
            self.calls.append((job.job_id, job.attempts))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            return self._act(job)
        finally:
            with self._lock:
                self.running -= 1

    def _act(self, job):
        action = job.data.get("do", "succeed")
        if action == "raise":
            raise RuntimeError("the mail server is down")
        if action == "fail":
            return Failed()
        if action == "fail_for_good":
            return Failed(retryable=False)
        if action == "hang_first" and len([call for call in self.calls if call[0] == job.job_id]) == 1:
            self.release.wait(30)
            return Failed()  # late: by now the attempt timed out, so this report is stale
        if action == "block":
            self.release.wait(30)
        return Succeeded()

    def sleep(self, failed_attempts: int) -> float:
        return 0.05


def not_a_factory_but_a_string():
    pass


NOT_CALLABLE = "just a string"


class TokenAuthorizer:
    """Accepts robot:token-1; knows intruder but forbids it; records every call."""

    calls: list[tuple[str, str]] = []

    def __init__(self, config):
        self.config = config

    def authorize(self, user: str, password: str) -> None:
        TokenAuthorizer.calls.append((user, password))
        if user == "intruder":
            raise Forbidden("intruder may not use this API")
        if (user, password) != ("robot", "token-1"):
            raise Unauthorized("unknown token")


class ReturnsNonsense:
    """Returns the class, not an instance: a slip a user can make."""

    def __init__(self, config):
        pass

    def do_work(self, job):
        from jobrunner import errors

        if job.data.get("do") == "raise_ours":
            raise errors.DatabaseError("a jobrunner error from the application's code")
        return Succeeded


class ReturnsItsVerdict:
    """Returns the error instead of raising it, as Rickover's Go Authorize did; or False."""

    def __init__(self, config):
        pass

    def authorize(self, user: str, password: str):
        return False if user == "robot" else Unauthorized("no")

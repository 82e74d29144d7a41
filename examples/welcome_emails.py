"""Welcome e-mails sent by jobrunner's own worker processes: a complete application.

jobrunner's workers usually POST each job to a downstream service, which calls
back to say how it went. Here they call a local function instead, and the
outcome is what `do_work` returns. The application is this one file:

    DATABASE_URL=postgresql:///jobs JOBRUNNER_USERS=admin:secret \
        WELCOME_OUTBOX=/tmp/outbox.txt python examples/welcome_emails.py

It serves jobrunner's HTTP API (PORT, default 9090) until SIGTERM or Ctrl-C. Every
other setting comes from the environment as for `jobrunner run` (docs/library.md).
Create the job type `welcome_email` and enqueue jobs with data
`{"to": "ada@example.com", "name": "Ada"}`; each becomes a message in the outbox.
"""

import logging
import os
import re
import sys

import jobrunner

log = logging.getLogger("welcome_emails")
ADDRESS = re.compile(r"[^@\s]+@[^@\s]+")  # one line, for a header: no spaces or line breaks

SETTINGS = {
    # The configuration names workers by import path, because each worker process builds its own.
    # Run as a script, this file is `__main__` and its directory is on sys.path: jobrunner imports it
    # again as `welcome_emails`. That second copy only defines things; main() runs in the first.
    "job_workers": "welcome_email=welcome_emails:WelcomeEmails",
    # Every other job type: nothing to POST them to, so no downstream and no DOWNSTREAM_URL.
    "default_worker": "welcome_emails:NoOtherWork",
}


def send_welcome_email(to: str, name: str) -> None:
    """Stands in for an SMTP client: append the message to the file $WELCOME_OUTBOX, or print it.

    An OSError (the outbox cannot be written) is left to propagate: it is transient.
    """
    message = f"To: {to}\nSubject: Welcome, {name}!\n\nHello {name}, and welcome aboard.\n\n"
    outbox = os.environ.get("WELCOME_OUTBOX")
    if not outbox:
        print(message, end="", flush=True)
        return
    with open(outbox, "a") as file:
        file.write(message)  # one write to a file opened for appending: messages never interleave


class WelcomeEmails:
    """The Worker of job type `welcome_email`: one e-mail per job, data {"to": address, "name": name}."""

    def __init__(self, config: jobrunner.Config):
        """Called once in each worker process, after the fork: open clients here, not at import."""
        self.config = config  # jobrunner's settings; this worker needs none of them

    def do_work(self, job: jobrunner.QueuedJob) -> jobrunner.Succeeded | jobrunner.Failed:
        data = job.data if isinstance(job.data, dict) else {}
        to, name = data.get("to"), " ".join(str(data.get("name") or "friend").split())
        if not isinstance(to, str) or not ADDRESS.fullmatch(to):
            # no retry can fix the job's own data: archive it as failed now
            log.warning("job %s: no e-mail address in %r; not retried", job.job_id, job.data)
            return jobrunner.Failed(retryable=False)
        send_welcome_email(to, name)  # raising is a failed attempt, retried with back-off
        return jobrunner.Succeeded()


class NoOtherWork:
    """The default Worker: a job of a type this application has no worker for fails at once."""

    def __init__(self, config: jobrunner.Config):
        self.config = config

    def do_work(self, job: jobrunner.QueuedJob) -> jobrunner.Failed:
        log.error("job %s: this application has no worker for job type %r; not retried", job.job_id, job.name)
        return jobrunner.Failed(retryable=False)

    def sleep(self, failed_attempts: int) -> float:
        """The pace of the safety poll behind notifications: from 20 ms, doubling up to 10 s."""
        return min(0.01 * 2**failed_attempts, 10.0)


def main() -> int:
    try:
        config = jobrunner.load_config(os.environ, overrides=SETTINGS)
    except jobrunner.ConfigError as error:
        print(f"welcome_emails: bad configuration: {error}", file=sys.stderr)
        return 2
    # Logging is the application's: jobrunner's processes (forked from this one) inherit it.
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # it warns at each reconnect; jobrunner logs an outage once
    try:
        return jobrunner.run(config)  # the supervisor, its server, workers and watcher; until SIGTERM
    except jobrunner.ConfigError as error:
        print(f"welcome_emails: bad configuration: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

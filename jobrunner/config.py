"""Settings: one name, one type, one default and one line of documentation each, in this module.

Sources, later wins: defaults < config file (INI, section [jobrunner], keys are
setting names) < environment variables < command-line flags. `load_config` builds
and validates an immutable `Config`; processes receive it and never read the
environment themselves.
"""

import configparser
import dataclasses
import os
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from . import timetable
from .errors import InvalidField
from .plugins import import_factory
from .policies import MAX_SECRETS
from .signing import check_secret


class ConfigError(Exception):
    """A setting has a bad value; the message names the setting and where it is set."""


def _int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}, not {value}")
        return value

    return parse


def _number(low: float, high: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be {what}, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be {what} from {low:g} to {high:g}, not {text}")
        return value

    return parse


_seconds = _number(0.001, 10**7, "a number of seconds")


def _sleep_factor(text: str) -> float:
    """At least 1. Below 1 the idle poll's interval shrinks towards nothing, and 0 (Rickover's "no
    sleep") is nothing at once: a busy poll of the database, which LISTEN/NOTIFY makes needless."""
    value = _number(0, 100, "a number")(text)
    if value < 1:
        raise ValueError(f"must be at least 1, not {text}: below 1 the idle poll would never sleep, a busy loop on the database")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, not {text!r}")


def _users(text: str) -> tuple[tuple[str, str], ...]:
    """`name:password,name2:password2` (a password may contain ':', not ',')."""
    users = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, colon, password = entry.partition(":")
        if not name or not colon or not password:
            raise ValueError("must be name:password pairs separated by commas (one entry has no name or password)")
        users.append((name, password))
    return tuple(users)


def _http_url(text: str) -> str:
    if text:
        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"must be an http:// or https:// URL, not {text!r}")
    return text.rstrip("/")


def _signing_secrets(text: str) -> tuple[str, ...]:
    """`whsec_...,whsec_...`: the first signs; every one is a signature, so during a rotation either verifies."""
    secrets = [part.strip() for part in text.split(",") if part.strip()]
    if len(secrets) > MAX_SECRETS:
        raise ValueError(f"must be at most {MAX_SECRETS} secrets (the new one first, and the old one during a rotation), not {len(secrets)}")
    for number, secret in enumerate(secrets, 1):
        try:
            check_secret(secret)
        except ValueError as error:  # the message never repeats the secret: it would reach the logs
            raise ValueError(f"secret {number} of {len(secrets)}: {error}") from None
    return tuple(secrets)


def _import_path(text: str) -> str:
    """`package.module:factory`, importable now (so that a typo fails at start, not in a child); empty for the built-in."""
    if text.strip():
        import_factory(text)
    return text.strip()


def _job_workers(text: str) -> tuple[tuple[str, str], ...]:
    """`type=package.module:factory,type2=...`: the job types served by their own worker."""
    chosen = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, equals, path = entry.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"must be job_type=package.module:factory pairs separated by commas, not {entry!r}")
        import_factory(path)
        chosen.append((name.strip(), path.strip()))
    return tuple(chosen)


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, not {text!r}")
    return level


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    env: str
    parse: Callable[[str], Any]
    default: str
    doc: str
    needs_restart: bool = False
    secret: bool = False  # never shown in a repr or a log


SETTINGS = (
    Setting("database_url", "DATABASE_URL", str, "", "PostgreSQL URL; empty starts a private cluster in data_dir (development)", secret=True),
    Setting("data_dir", "JOBRUNNER_DATA_DIR", str, ".jobrunner", "where the private development cluster lives", True),
    Setting("host", "JOBRUNNER_HOST", str, "0.0.0.0", "address the HTTP server listens on", True),
    Setting("port", "PORT", _int(0, 65535), "9090", "port the HTTP server listens on", True),
    Setting("users", "JOBRUNNER_USERS", _users, "", "API users for HTTP Basic auth: name:password,name2:password2", secret=True),
    Setting("authorizer", "JOBRUNNER_AUTHORIZER", _import_path, "", "package.module:factory of the Authorizer for the API (default: check users)"),
    Setting("metrics_open", "JOBRUNNER_METRICS_OPEN", _bool, "false", "serve /metrics without authentication"),
    Setting("server_pool_size", "PG_SERVER_POOL_SIZE", _int(1, 1000), "10", "database connections of the HTTP server"),
    Setting("worker_pool_size", "PG_WORKER_POOL_SIZE", _int(1, 1000), "4", "database connections of each worker process"),
    Setting("prepared_statements", "JOBRUNNER_PREPARED_STATEMENTS", _bool, "on", "let psycopg prepare statements it runs often; off behind PgBouncer in transaction mode before 1.22 (Debian 12 ships 1.18)"),
    Setting("db_timeout", "JOBRUNNER_DB_TIMEOUT", _seconds, "5", "seconds to wait for a database connection before answering 503"),
    Setting("max_request_threads", "JOBRUNNER_MAX_REQUEST_THREADS", _int(1, 10000), "128", "open HTTP connections served at once; more get a quick 503"),
    Setting("read_timeout", "JOBRUNNER_READ_TIMEOUT", _seconds, "15", "seconds a client may stay silent (mid-request or idle keep-alive) before it is dropped"),
    Setting("max_body_bytes", "JOBRUNNER_MAX_BODY_BYTES", _int(1024, 2**30), "262144", "largest request body accepted; larger gets 413"),
    Setting("homepage_title", "HOMEPAGE_TITLE", str, "jobrunner", "title of the page at /"),
    Setting("homepage_iframe_url", "HOMEPAGE_IFRAME_URL", str, "", "a page to embed at / (Rickover's setting)"),
    Setting("allow_unencrypted_proxy_traffic", "ALLOW_UNENCRYPTED_PROXY_TRAFFIC", _bool, "false", "accept requests a proxy marks X-Forwarded-Proto: http"),
    Setting("downstream_url", "DOWNSTREAM_URL", _http_url, "", "base URL of the service jobs are POSTed to"),
    Setting("downstream_password", "DOWNSTREAM_WORKER_AUTH", str, "", "Basic auth password (user 'jobs') for the downstream", secret=True),
    Setting("signing_secrets", "JOBRUNNER_SIGNING_SECRETS", _signing_secrets, "", "Standard Webhooks secrets (whsec_..., comma-separated, two during a rotation) signing every POST to a downstream, for types without their own; empty: unsigned", secret=True),
    Setting("listen_database_url", "JOBRUNNER_LISTEN_DATABASE_URL", str, "", "URL for the workers' LISTEN connection when DATABASE_URL goes through a transaction pooler (default: DATABASE_URL)", secret=True),
    Setting("default_worker", "JOBRUNNER_DEFAULT_WORKER", _import_path, "", "package.module:factory of the Worker for job types without their own (default: POST to the downstream)"),
    Setting("job_workers", "JOBRUNNER_JOB_WORKERS", _job_workers, "", "job types served by their own Worker in the worker process: type=package.module:factory,..."),
    Setting("dispatch_threads", "JOBRUNNER_DISPATCH_THREADS", _int(1, 1000), "16", "jobs each worker process works on at once (POSTs to the downstream, or in-process work)"),
    Setting("downstream_timeout", "JOBRUNNER_DOWNSTREAM_TIMEOUT", _seconds, "6.5", "seconds to wait for the downstream to answer a POST (then: may have been delivered)"),
    Setting("job_timeout", "JOBRUNNER_JOB_TIMEOUT", _seconds, "300", "seconds a sent job may wait for its callback before it counts as failed"),
    Setting("sleep_factor", "JOBRUNNER_SLEEP_FACTOR", _sleep_factor, "2", "growth of the idle safety poll interval: 10 ms x factor^empty polls, at most x1024; at least 1"),
    Setting("stuck_job_interval", "JOBRUNNER_STUCK_JOB_INTERVAL", _seconds, "60", "seconds between the watcher's rounds"),
    Setting("stuck_job_timeout", "JOBRUNNER_STUCK_JOB_TIMEOUT", _seconds, "420", "the watcher fails in-progress jobs not updated for this long (longer than job_timeout)"),
    Setting("archive_retention_days", "JOBRUNNER_ARCHIVE_RETENTION_DAYS", _int(0, 100000), "0", "the watcher deletes archived jobs older than this many days; 0 keeps them all"),
    Setting("servers", "JOBRUNNER_SERVERS", _int(1, 64), "1", "HTTP server processes, all accepting on the one listening socket; each holds server_pool_size connections"),
    Setting("workers", "JOBRUNNER_WORKERS", _int(0, 256), str(os.cpu_count() or 1), "number of worker processes"),
    Setting("start_timeout", "JOBRUNNER_START_TIMEOUT", _seconds, "60", "seconds a reload's new children have to start and reach the database, else the reload is abandoned"),
    Setting("graceful_timeout", "JOBRUNNER_GRACEFUL_TIMEOUT", _seconds, "30", "seconds a graceful stop may take before what remains is killed"),
    Setting("log_level", "JOBRUNNER_LOG_LEVEL", _log_level, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)

Config = dataclasses.make_dataclass(
    "Config",
    [(s.name, Any, dataclasses.field(repr=not s.secret)) for s in SETTINGS]
    + [("config_file", Any, dataclasses.field(default=None)), ("schedules", Any, dataclasses.field(default=()))],
    frozen=True,
)
Config.__doc__ = "An immutable, validated set of settings (see SETTINGS for each one's meaning)."
_BY_NAME = {setting.name: setting for setting in SETTINGS}


def load_config(
    environ: Mapping[str, str], config_file: str | None = None, overrides: Mapping[str, str] | None = None
) -> "Config":
    """Build the config from defaults, then the file, then `environ`, then `overrides` (flags)."""
    raw = {setting.name: (setting.default, "default") for setting in SETTINGS}
    schedules: tuple = ()
    if config_file:
        entries, schedules = _read_file(config_file)
        for name, text in entries.items():
            raw[name] = (text, f"{config_file}")
    for setting in SETTINGS:
        if setting.env in environ:
            raw[setting.name] = (environ[setting.env], f"${setting.env}")
    for name, text in (overrides or {}).items():
        if name not in _BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        raw[name] = (str(text), "the command line")
    values = {}
    for name, (text, source) in raw.items():
        setting = _BY_NAME[name]
        try:
            values[name] = setting.parse(text)
        except ValueError as error:
            raise ConfigError(f"{setting.env} ({name}, from {source}): {error}") from None
    sources = {name: source for name, (_, source) in raw.items()}
    for longer, shorter, why in MUST_BE_LONGER:
        if values[longer] <= values[shorter]:
            raise ConfigError(f"{_named(longer, values, sources)} must be longer than {_named(shorter, values, sources)}: {why}")
    return Config(**values, config_file=config_file, schedules=schedules)


# Pairs of settings, each valid alone, that contradict each other unless the first is the longer.
MUST_BE_LONGER = (
    ("stuck_job_timeout", "job_timeout", "the watcher would fail sent jobs that are still waiting for their callback"),
)


def _named(name: str, values: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    return f"{_BY_NAME[name].env} ({name}, {values[name]:g} from {sources[name]})"


SCHEDULE_SECTION = "schedule "  # [schedule nightly-report]: a schedule the deploy owns


def _read_file(path: str) -> tuple[dict[str, str], tuple]:
    """The [jobrunner] section's settings, and the schedules its [schedule <name>] sections declare."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as file:
            parser.read_file(file)
    except (OSError, configparser.Error) as error:
        raise ConfigError(f"config file {path}: {error}") from None
    sections = [section for section in parser.sections() if not section.startswith(SCHEDULE_SECTION)]
    if sections != ["jobrunner"]:
        raise ConfigError(f"config file {path}: must hold one section [jobrunner], and [schedule <name>] sections, not {sections}")
    entries = dict(parser["jobrunner"])
    for name in entries:
        if name not in _BY_NAME:
            raise ConfigError(f"config file {path}: unknown setting {name!r}")
    schedules = tuple(
        _schedule(path, section[len(SCHEDULE_SECTION):].strip(), dict(parser[section]))
        for section in parser.sections()
        if section.startswith(SCHEDULE_SECTION)
    )
    return entries, schedules


def _schedule(path: str, name: str, entries: dict[str, str]):
    """A [schedule <name>] section as a timetable.Definition; ConfigError names the section and the key."""
    where = f"config file {path}, [schedule {name}]"
    try:
        fields = {key: timetable.parse_config_value(key, text) for key, text in entries.items() if key in timetable.FIELDS}
        return timetable.validate({**entries, **fields, "name": name})
    except InvalidField as error:
        raise ConfigError(f"{where} {error.field}: {error.reason}") from None


def changes_needing_restart(old: "Config", new: "Config") -> list[str]:
    """Settings that differ but cannot change without a restart (the listen address, the data dir)."""
    return [s.name for s in SETTINGS if s.needs_restart and getattr(old, s.name) != getattr(new, s.name)]


def describe() -> str:
    """One line per setting, for `jobrunner check-config --help` and the docs."""
    return "\n".join(f"{s.env:34} {s.name:32} default {s.default!r:14} {s.doc}" for s in SETTINGS)


def effective_settings(config: "Config") -> str:
    """Every setting's value and where it can be set, secrets masked."""
    lines = []
    for s in SETTINGS:
        value = getattr(config, s.name)
        shown = ("****" if value else "(empty)") if s.secret else repr(value)
        lines.append(f"{s.name:32} {shown:24} ${s.env}")
    return "\n".join(lines)


# What a process holds open besides its connections: standard streams, the listening socket, the
# pipes to the supervisor, log and metrics files, the interpreter's own.
OWN_OPEN_FILES = 32


def open_file_warnings(config: "Config", limit: int) -> list[str]:
    """Warnings for the processes whose connections may not fit under `limit` open files (RLIMIT_NOFILE).

    Past the limit accept() and connect() fail with EMFILE: clients wait and deliveries fail.
    """
    processes = {
        "an HTTP server": (("max_request_threads", "client connections"), ("server_pool_size", "database connections")),
        "a worker": (("dispatch_threads", "downstream connections"), ("worker_pool_size", "database connections")),
    }
    warnings = []
    for process, uses in processes.items():
        listen = 1 if process == "a worker" else 0  # the worker's LISTEN connection
        needed = sum(getattr(config, name) for name, _ in uses) + listen + OWN_OPEN_FILES
        if needed > limit:
            parts = " + ".join(f"{_BY_NAME[name].env} ({getattr(config, name)}) {what}" for name, what in uses)
            listening = " + 1 LISTEN connection" if listen else ""
            warnings.append(
                f"{process} process may need {needed} open files ({parts}{listening} + about {OWN_OPEN_FILES} of its own), "
                f"more than RLIMIT_NOFILE {limit} allows: lower those settings, or raise the limit (ulimit -n, systemd's LimitNOFILE=)"
            )
    return warnings


def check_runnable(config: "Config") -> None:
    """What `jobrunner run` needs beyond valid values: users for the API, a downstream for workers."""
    if not config.users and not config.authorizer:
        raise ConfigError("JOBRUNNER_USERS (users): no API users configured; set name:password pairs")
    if config.workers and not config.downstream_url and not config.default_worker:
        raise ConfigError("DOWNSTREAM_URL (downstream_url): workers need the URL of the service that runs the jobs")

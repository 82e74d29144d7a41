"""The `jobrunner` command line."""

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import queue
import resource
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from . import client_cli, schedules, store
from . import migrate as migrations
from .children import PARENT_CHECK_INTERVAL
from .config import Config, ConfigError, check_runnable, describe, effective_settings, load_config, open_file_warnings
from .errors import DatabaseError, DatabaseUnavailable, InvalidField, JobrunnerError, SchemaMissing, SchemaTooNew
from .localdb import LocalPostgres, LocalPostgresError

log = logging.getLogger("jobrunner")


def _configure_logging(level: str, environ: dict) -> None:
    from .systemd import JournalFormatter, stderr_is_journal

    handler = logging.StreamHandler()
    if stderr_is_journal(environ):
        handler.setFormatter(JournalFormatter("%(processName)s %(name)s: %(message)s"))  # journald adds the time
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # psycopg_pool warns at every failed reconnect; our processes log an outage once
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def migrate(database_url: str, applied: Callable[[migrations.Migration], None] = lambda migration: None) -> list[migrations.Migration]:
    """Apply the migrations the database lacks; the ones applied, each also passed to `applied` as it commits."""
    conn = store.connect(database_url, "migrate")
    try:
        return migrations.apply(conn, applied)
    finally:
        conn.close()


def migration_status(database_url: str) -> str:
    """`jobrunner migrate --status`: each migration, applied (when) or pending, and any this code does not know."""
    conn = store.connect(database_url, "migrate")
    try:
        state = migrations.status(conn)
    finally:
        conn.close()
    known = {migration.version: migration for migration in migrations.known()}
    lines = [f"{migrations.label(version, name)}  applied {applied_at:%Y-%m-%d %H:%M:%S %Z}" + ("" if version in known else "  (unknown to this jobrunner)")
             for version, (name, applied_at) in sorted(state.applied.items())]
    lines += [f"{migration.label}  pending" for migration in state.pending]
    return "\n".join(sorted(lines))


def check_schema(config: Config) -> None:
    """Refuse to start against a database whose schema this code does not match, naming what to do
    (`jobrunner migrate`, or a newer jobrunner); in development mode `database()` migrates instead.
    A database that does not answer is not refused: the service rides out outages, and says so."""
    if not config.database_url:
        return
    try:
        conn = store.connect(config.database_url, "check", connect_timeout=max(2, round(config.db_timeout)))
    except DatabaseUnavailable as error:
        log.warning("could not check the database's schema version: %s", error)
        return
    try:
        migrations.check(conn)
    except SchemaMissing:
        raise
    except DatabaseUnavailable as error:
        log.warning("could not check the database's schema version: %s", error)
    finally:
        conn.close()


@contextlib.contextmanager
def database(config: Config) -> Iterator[Config]:
    """The config to run with: as given, or with a private cluster (and a generated user) when DATABASE_URL is unset."""
    if config.database_url:
        if not config.users and not config.authorizer:
            raise ConfigError("JOBRUNNER_USERS (users): no API users configured; set name:password pairs")
        yield config
        return
    cluster = LocalPostgres(os.path.join(config.data_dir, "postgres"))
    url = cluster.start()
    try:
        migrate(url, lambda migration: log.info("development mode: applied migration %s", migration.label))
        users = config.users or (("admin", _development_password(config.data_dir)),)
        print(f"jobrunner: development mode, database {url}", flush=True)
        if not config.users:
            print(f"jobrunner: development mode, API user admin, password {users[0][1]} (kept in {config.data_dir}/api-password)", flush=True)
        yield dataclasses.replace(config, database_url=url, users=users)
    finally:
        cluster.stop()


@contextlib.contextmanager
def development_url(config: Config, sock: socket.socket) -> Iterator[None]:
    """In development mode (no DATABASE_URL), where the API serves, kept beside its password while it
    runs: the command line sends that password to this URL alone."""
    if config.database_url:
        yield
        return
    host, port = sock.getsockname()[:2]
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    path = os.path.join(config.data_dir, "api-url")
    with open(path, "w") as file:
        file.write(url)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _development_password(data_dir: str) -> str:
    """Generated once, then kept beside the private database, so that it survives restarts."""
    path = os.path.join(data_dir, "api-password")
    with contextlib.suppress(FileNotFoundError), open(path) as file:
        password = file.read().strip()
        if password:
            return password
    # none yet, or an empty file (a crash before it was written): an empty password must never work
    password = secrets.token_urlsafe(16)
    fd, partial = tempfile.mkstemp(dir=data_dir, prefix=".api-password.")  # a new file, mode 0600
    try:
        with open(fd, "w") as file:
            file.write(password)
        os.replace(partial, path)  # whole or not at all
    except BaseException:
        os.unlink(partial)
        raise
    return password


def check_prepared_statements(config: Config) -> None:
    """Refuse prepared statements behind a pooler that loses them, naming both: found at start, not as
    random "prepared statement "_pg3_N" does not exist" errors under load.

    A pooler in transaction mode (PgBouncer before 1.22, or without max_prepared_statements)
    hands each transaction whichever server session is free. The probe: a statement
    prepared on one connection runs again while a second connection holds, in a
    transaction, the session the first one used. Directly or in session mode the first
    connection still has its own session and the statement; in transaction mode it is
    handed another session, where the statement is missing. (That probe leaves one
    `SELECT 1` prepared in one of the pooler's sessions; only a psycopg client with
    prepared statements on could trip on it ("... already exists"), which is the mistake refused here.)
    """
    if not config.prepared_statements or not config.database_url:
        return
    timeout = max(2, round(config.db_timeout))
    try:
        first = store.connect(config.database_url, "check", connect_timeout=timeout, prepare_threshold=0)  # prepare every statement
    except DatabaseUnavailable as error:
        log.warning("could not check how DATABASE_URL pools connections: %s", error)
        return
    try:
        second = store.connect(config.database_url, "check", connect_timeout=timeout)
        try:
            store.ping(first)
            with store.transaction(second):
                store.ping(second)
                store.ping(first)
        finally:
            second.close()
    except DatabaseError as error:  # "... does not exist", or "... already exists" in a session another client prepared in
        raise ConfigError(
            "JOBRUNNER_PREPARED_STATEMENTS (prepared_statements) is on, but DATABASE_URL goes through a pooler in "
            f"transaction mode that loses a session's prepared statements ({error}): PgBouncer before 1.22, or "
            "without max_prepared_statements. Set JOBRUNNER_PREPARED_STATEMENTS=off, or use session mode or a direct URL"
        ) from None
    except DatabaseUnavailable as error:
        log.warning("could not check how DATABASE_URL pools connections: %s", error)
    finally:
        first.close()


def apply_config_schedules(config: Config) -> None:
    """Make the config file's [schedule] sections the config-owned schedules, before the children start.

    A declaration the database refuses (an unknown job type) is a ConfigError: `run`
    does not start, and a SIGHUP keeps the running config. With the database
    unreachable it is only logged: the scheduler applies them once it can.
    """
    if not config.config_file:
        return  # no file, no declarations: config-owned schedules are left as they are
    try:
        conn = store.connect(config.database_url, "config", connect_timeout=max(2, round(config.db_timeout)))
    except DatabaseUnavailable as error:
        log.warning("the config file's schedules are applied once the database answers (%s)", error)
        return
    try:
        done = schedules.reconcile(conn, config.schedules)
    except InvalidField as error:
        raise ConfigError(f"config file {config.config_file}, {error.field}: {error.reason}") from None
    except DatabaseUnavailable as error:
        log.warning("the config file's schedules are applied once the database answers (%s)", error)
        return
    finally:
        conn.close()
    for verb, names in (("created", done.created), ("updated", done.updated), ("deleted", done.deleted)):
        if names:
            log.info("config file schedules %s: %s", verb, ", ".join(names))
    for name in done.not_owned:
        log.warning("schedule %r in the config file exists and was made through the API: left alone (mark it config_owned to hand it over)", name)


# an orphaned child stops within the graceful timeout of noticing its parent is gone, or exits anyway
PARENT_GONE_NOTICED = 2 * PARENT_CHECK_INTERVAL + 2.0


def listening_socket(config: Config) -> socket.socket:
    """Bind the API's socket. A port still in use may be held by the children of a supervisor
    that was killed: they stop by themselves within the graceful timeout, so wait that long."""
    deadline = time.monotonic() + config.graceful_timeout + PARENT_GONE_NOTICED
    waiting = False
    while True:
        try:
            return socket.create_server((config.host, config.port), backlog=1024)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise ConfigError(f"PORT (port) / JOBRUNNER_HOST (host): cannot listen on {config.host}:{config.port}: {error.strerror}") from None
            if not waiting:
                log.warning("%s:%d is in use; waiting up to %.0f s for it to be released", config.host, config.port, deadline - time.monotonic())
                waiting = True
            time.sleep(0.2)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT. The handler only records the signal
    (SimpleQueue.put is safe there; Event.set is not); a thread acts on it."""
    signals: queue.SimpleQueue = queue.SimpleQueue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: signals.put(signum))
    stop = threading.Event()
    threading.Thread(target=lambda: (signals.get(), stop.set()), name="signals", daemon=True).start()
    return stop


def serve(config: Config) -> None:
    """The HTTP server alone, in this process, until SIGTERM or SIGINT."""
    from . import server

    check_prepared_statements(config)
    check_schema(config)
    stop = stop_on_signals()
    with database(config) as running:
        sock = listening_socket(running)
        log.info("serving HTTP on %s:%d", *sock.getsockname()[:2])
        with development_url(config, sock):
            server.serve(running, sock, stop)
        sock.close()


def work(config: Config) -> None:
    """One worker process alone, until SIGTERM or SIGINT."""
    from . import worker

    if not config.database_url:
        raise ConfigError("DATABASE_URL (database_url): a worker needs the database the server uses")
    if not config.downstream_url and not config.default_worker:
        raise ConfigError("DOWNSTREAM_URL (downstream_url): where should jobs be sent?")
    check_prepared_statements(config)
    check_schema(config)
    stop = stop_on_signals()
    log.info("worker sending jobs to %s", config.downstream_url or config.default_worker)
    worker.run(config, stop)


def run(config: Config, reread: Callable[[], Config] | None = None) -> int:
    """The service: a supervisor with a server, workers and a watcher (and, in development, an example downstream).

    Until SIGTERM or SIGINT; the exit status. On SIGHUP the children restart with
    `reread()`'s config (default: `config` again). `jobrunner run` and
    `jobrunner.run(config)` from an application's own entry point both come here.
    """
    reread = reread or (lambda: config)
    from .supervisor import Supervisor
    from .systemd import Notifier

    check_prepared_statements(config)
    check_schema(config)
    with database(config) as running:
        sockets = {"api": listening_socket(running)}
        if not config.database_url and not running.downstream_url:
            sockets["downstream"] = socket.create_server(("127.0.0.1", 0))
            running = dataclasses.replace(running, downstream_url=f"http://127.0.0.1:{sockets['downstream'].getsockname()[1]}")
            print(f"jobrunner: development mode, example downstream on {running.downstream_url}", flush=True)
        check_runnable(running)
        apply_config_schedules(running)
        runtime = {name: getattr(running, name) for name in ("database_url", "users", "downstream_url")}

        def reload() -> Config:
            fresh = reread()
            # what development mode chose at start stays, unless the file now sets it
            fresh = dataclasses.replace(fresh, **{name: value for name, value in runtime.items() if not getattr(fresh, name)})
            check_runnable(fresh)
            if fresh.database_url != running.database_url:  # another database: its schema too, as at start
                try:
                    check_schema(fresh)
                except (SchemaMissing, SchemaTooNew) as error:
                    raise ConfigError(f"DATABASE_URL (database_url): {error}") from None
            apply_config_schedules(fresh)
            return fresh

        with development_url(config, sockets["api"]):
            return Supervisor(running, sockets, reload, Notifier(dict(os.environ))).run()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobrunner", description="A Postgres-backed job queue.")
    parser.add_argument("--config", default=None, help="INI config file with a [jobrunner] section (default: $JOBRUNNER_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate_cmd = commands.add_parser("migrate", help="apply the schema migrations the database lacks, in order")
    migrate_cmd.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    migrate_cmd.add_argument("--status", action="store_true", help="list the migrations applied and pending; change nothing")
    serve_cmd = commands.add_parser("serve", help="run the HTTP API server alone")
    serve_cmd.add_argument("--host", help="listen address (default: $JOBRUNNER_HOST or 0.0.0.0)")
    serve_cmd.add_argument("--port", help="listen port (default: $PORT or 9090)")
    run_cmd = commands.add_parser("run", help="run the service: supervisor, HTTP server, workers, watcher")
    run_cmd.add_argument("--host", help="listen address (default: $JOBRUNNER_HOST or 0.0.0.0)")
    run_cmd.add_argument("--port", help="listen port (default: $PORT or 9090)")
    run_cmd.add_argument("--workers", help="worker processes (default: $JOBRUNNER_WORKERS or the number of CPUs)")
    commands.add_parser("work", help="run one worker process alone (needs DATABASE_URL and DOWNSTREAM_URL)")
    check_cmd = commands.add_parser(
        "check-config", help="validate the configuration and exit", epilog=describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check_cmd.add_argument(
        "--production", action="store_true",
        help="also require what `run` needs in production: DATABASE_URL (no private development database), users, a downstream",
    )
    client_cli.add_parsers(commands)
    return parser


def _warn_of_the_open_file_limit(config: Config) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        for warning in open_file_warnings(config, soft):
            log.warning("%s", warning)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in client_cli.COMMANDS:
        return client_cli.run(args)
    flags = {name: value for name in ("database_url", "host", "port", "workers") if (value := getattr(args, name, None)) is not None}
    config_file = args.config or os.environ.get("JOBRUNNER_CONFIG")
    environ = dict(os.environ)
    try:
        config = load_config(environ, config_file, flags)
        _configure_logging(config.log_level, environ)
        if args.command in ("run", "check-config"):
            _warn_of_the_open_file_limit(config)
        if args.command == "migrate":
            if not config.database_url:
                print("jobrunner migrate: DATABASE_URL is not set (or pass --database-url)", file=sys.stderr)
                return 2
            if args.status:
                print(migration_status(config.database_url))
                return 0
            if not migrate(config.database_url, lambda migration: print(f"jobrunner: applied migration {migration.label}", flush=True)):
                print("jobrunner: the schema is up to date")
        elif args.command == "serve":
            serve(config)
        elif args.command == "work":
            work(config)
        elif args.command == "run":
            return run(config, lambda: load_config(environ, config_file, flags))
        elif args.command == "check-config":
            if args.production:
                if not config.database_url:
                    raise ConfigError("DATABASE_URL (database_url): not set; without it jobrunner would start a private development database")
                check_runnable(config)
                check_prepared_statements(config)
                check_schema(config)
            print(effective_settings(config))
            if config.schedules:
                print(f"schedules declared in {config.config_file}: {', '.join(schedule.name for schedule in config.schedules)}")
            print("jobrunner: configuration is valid")
    except ConfigError as error:
        print(f"jobrunner {args.command}: bad configuration: {error}", file=sys.stderr)
        return 2
    except (JobrunnerError, LocalPostgresError) as error:
        print(f"jobrunner {args.command}: {error}", file=sys.stderr)
        return 1
    return 0

"""The command line's client commands: job types, enqueue, jobs, replay, schedules, over the HTTP API (`jobrunner.client`).

Where the API is, and who asks: --url, --user, --password, or $JOBRUNNER_URL,
$JOBRUNNER_API_USER, $JOBRUNNER_API_PASSWORD. By default the development
service of `make run`: http://127.0.0.1:9090, user admin, the password kept in
.jobrunner/api-password, which is sent only to the URL that service serves
(.jobrunner/api-url, written while it runs). Output is for people; --json prints the API's answer.

Exit codes: 0 done; 1 the API refused (the reason is printed); 2 bad usage;
3 the API could not be reached.
"""

import argparse
import json
import os
import re
import sys
import urllib.parse
from datetime import datetime, timedelta, timezone

from .client import ApiError, Client, Unreachable
from .policies import describe

COMMANDS = ("types", "enqueue", "job", "jobs", "replay", "schedules")
DEV_PASSWORD_FILE = os.path.join(".jobrunner", "api-password")
DEV_URL_FILE = os.path.join(".jobrunner", "api-url")  # where the development service serves, while it runs


def add_parsers(commands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("JOBRUNNER_URL", "http://127.0.0.1:9090"), help="the API (default: $JOBRUNNER_URL or http://127.0.0.1:9090)")
    common.add_argument("--user", default=os.environ.get("JOBRUNNER_API_USER", "admin"), help="API user (default: $JOBRUNNER_API_USER or admin)")
    common.add_argument("--password", default=os.environ.get("JOBRUNNER_API_PASSWORD"), help="(default: $JOBRUNNER_API_PASSWORD, else .jobrunner/api-password)")
    common.add_argument("--json", action="store_true", help="print the API's answer as JSON")

    types = commands.add_parser("types", help="list, create, change, pause or resume job types").add_subparsers(dest="action", required=True)
    types.add_parser("list", parents=[common], help="every job type with its counts and settings")
    types.add_parser("get", parents=[common], help="one job type: every field and setting").add_argument("name")
    create = types.add_parser("create", parents=[common], help="a new job type", epilog=SETTINGS_HELP)
    create.add_argument("name")
    create.add_argument("--strategy", choices=["at_least_once", "at_most_once"], default="at_least_once")
    create.add_argument("--attempts", type=int, default=3)
    create.add_argument("--concurrency", type=int, default=5)
    _add_setting_flags(create)
    update = types.add_parser("update", parents=[common], help="change attempts, concurrency (0 pauses the type) or settings", epilog=SETTINGS_HELP)
    update.add_argument("name")
    update.add_argument("--attempts", type=int)
    update.add_argument("--concurrency", type=int)
    _add_setting_flags(update)
    types.add_parser("pause", parents=[common], help="concurrency 0, the old one kept for resume").add_argument("name")
    resume = types.add_parser("resume", parents=[common], help="back to the concurrency it had when paused")
    resume.add_argument("name")
    resume.add_argument("--concurrency", type=int, help="this concurrency instead")

    enqueue = commands.add_parser("enqueue", parents=[common], help="enqueue one job")
    enqueue.add_argument("name")
    enqueue.add_argument("--data", required=True, help="the job's data, JSON")
    enqueue.add_argument("--id", help="job_<uuid> (default: a new one)")
    enqueue.add_argument("--run-after", help="RFC 3339 time, e.g. 2030-01-01T00:00:00Z")
    enqueue.add_argument("--expires-at", help="RFC 3339 time")
    enqueue.add_argument("--priority", type=int, help="higher first within its type (default 0; -32768 to 32767)")

    job = commands.add_parser("job", help="one job: get, replay or cancel").add_subparsers(dest="action", required=True)
    for action, doc in (("get", "the job, queued or archived"), ("replay", "a new job with an archived job's data"),
                        ("cancel", "archive a queued job as cancelled")):
        job.add_parser(action, parents=[common], help=doc).add_argument("id")

    jobs = commands.add_parser("jobs", help="a type's jobs").add_subparsers(dest="action", required=True)
    listing = jobs.add_parser("list", parents=[common], help="newest first")
    listing.add_argument("name")
    listing.add_argument("--status", help="queued, in-progress, succeeded, failed, expired or cancelled")
    listing.add_argument("--limit", type=int, default=50)

    _add_schedule_parsers(commands, common)

    replay = commands.add_parser("replay", parents=[common], help="replay many archived jobs of a type, with progress")
    replay.add_argument("name")
    replay.add_argument("--status", required=True, choices=["failed", "expired", "succeeded", "cancelled"])
    replay.add_argument("--since", default="1h", help="how far back, by archive time: 30m, 6h, 2d (default 1h)")


# --- a job type's delivery settings (docs/api.md, "Job-type settings") ---

SETTINGS_HELP = (
    "Durations are seconds, or a number and s, m, h or d (30m). On update, the value `none` clears a setting "
    "(back to the global default); a setting not given is left as it is. `-` reads a callback token, or the "
    "signing secrets (one a line), from stdin, so that they do not show in the process list."
)
_UNSET = object()  # a flag not given: the setting is left as it is


def _seconds(text: str):
    if text.strip().lower() == "none":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, or a number and s, m, h or d (30m), or none")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _or_none(parse):
    def convert(text: str):
        if text.strip().lower() == "none":
            return None
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {parse.__name__}, nor none") from None
        if isinstance(value, float) and not (0 <= value < float("inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of jobs a second")
        return value
    return convert


# (flag, where the value goes in the API's body, how to read it); the flag is the field's path, `-` for `_` and `.`
SETTING_FLAGS = (
    ("--downstream-url", ("downstream_url",), _or_none(str), "base URL this type's jobs are POSTed to"),
    ("--downstream-timeout", ("downstream_timeout",), _seconds, "how long to wait for the POST's answer"),
    ("--job-timeout", ("job_timeout",), _seconds, "how long a sent job may wait for its callback"),
    ("--retry-min-backoff", ("retry", "min_backoff"), _seconds, "wait before the first retry"),
    ("--retry-max-backoff", ("retry", "max_backoff"), _seconds, "longest wait between attempts"),
    ("--retry-max-doublings", ("retry", "max_doublings"), _or_none(int), "times the wait doubles (0-62)"),
    ("--retry-max-retry-duration", ("retry", "max_retry_duration"), _seconds, "after this long since its creation a failing job is archived"),
    ("--rate-limit-per-second", ("rate_limit", "per_second"), _or_none(float), "jobs sent per second, all hosts together (0.5: one every 2 s)"),
    ("--rate-limit-burst", ("rate_limit", "burst"), _or_none(int), "jobs that may go at once after a quiet spell"),
    ("--callback-token", ("callback_token",), _or_none(str), "token a callback for this type must present (- : from stdin)"),
)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("delivery settings (none: the global default)")
    for flag, _, parse, doc in SETTING_FLAGS:
        group.add_argument(flag, type=parse, default=_UNSET, help=doc)
    group.add_argument("--signing-secret", action="append", help="whsec_ secret to sign requests with; twice during a rotation, the first signs (- : from stdin)")


def _settings(args: argparse.Namespace) -> dict:
    """The API body's settings from the flags given."""
    body: dict = {}
    for flag, path, _, _ in SETTING_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is _UNSET:
            continue
        if path == ("callback_token",) and value == "-":
            value = sys.stdin.readline().strip()
        if len(path) == 1:
            body[path[0]] = value
        else:
            body.setdefault(path[0], {})[path[1]] = value
    if args.signing_secret is not None:
        secrets = args.signing_secret
        if "-" in secrets:
            secrets = [line.strip() for line in sys.stdin if line.strip()]
        body["signing_secrets"] = None if [s.lower() for s in secrets] == ["none"] else secrets
    return body


def _add_schedule_parsers(commands, common) -> None:
    schedules = commands.add_parser("schedules", help="recurring jobs: list, get, create, update, delete, pause, resume, run").add_subparsers(dest="action", required=True)
    schedules.add_parser("list", parents=[common], help="every schedule, its next run and last job")
    for action, doc in (("get", "one schedule"), ("delete", "delete a schedule (its jobs stay)"), ("pause", "no job for its ticks until resumed"),
                        ("resume", "tick again from the next tick"), ("run", "an extra job now")):
        schedules.add_parser(action, parents=[common], help=doc).add_argument("name")
    for action, doc in (("create", "a new schedule: --cron (and --time-zone) or --every"), ("update", "change the options given")):
        parser = schedules.add_parser(action, parents=[common], help=doc)
        parser.add_argument("name")
        if action == "create":
            parser.add_argument("--job-type", required=True)
        else:
            parser.add_argument("--job-type")
        parser.add_argument("--cron", help="5 fields or @daily, ..., e.g. '0 2 * * *'")
        parser.add_argument("--time-zone", help="IANA zone of --cron, e.g. Europe/Berlin (default UTC)")
        parser.add_argument("--every", type=int, metavar="SECONDS", help="a tick every SECONDS (instead of --cron)")
        parser.add_argument("--data", help="each job's data, JSON")
        parser.add_argument("--run-after-offset", type=int, metavar="SECONDS", help="each job due SECONDS after its tick")
        parser.add_argument("--expires-after", type=int, metavar="SECONDS", help="each job expires SECONDS after its tick")
        parser.add_argument("--misfire", choices=["skip", "once", "all"], help="what missed ticks get (default skip)")
        parser.add_argument("--misfire-limit", type=int, help="--misfire all: the most missed ticks enqueued")


def run(args: argparse.Namespace) -> int:
    try:
        password = args.password if args.password is not None else _development_password(args.url)
        client = Client(args.url, args.user, password)
        return _COMMANDS[(args.command, getattr(args, "action", None))](client, args)
    except ApiError as error:
        print(f"jobrunner {args.command}: {error}", file=sys.stderr)
        return 1
    except Unreachable as error:
        print(f"jobrunner {args.command}: cannot reach the API: {error}", file=sys.stderr)
        return 3
    except UsageError as error:
        print(f"jobrunner {args.command}: {error}", file=sys.stderr)
        return 2


class UsageError(Exception):
    pass


def _development_password(url: str) -> str:
    """The development service's password, for that service's own URL only: sent to any
    other --url it would hand the password to whoever answers there."""
    try:
        with open(DEV_URL_FILE) as file:
            served = file.read().strip()
        with open(DEV_PASSWORD_FILE) as file:
            password = file.read().strip()
    except OSError:
        return ""
    return password if _origin(url) == _origin(served) else ""


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urllib.parse.urlsplit(url)
    host = "127.0.0.1" if parsed.hostname == "localhost" else parsed.hostname
    try:
        port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    except ValueError:
        port = None  # not a port: it matches nothing the service wrote
    return parsed.scheme, host or "", port


def _types_list(client: Client, args) -> int:
    types = client.types()
    if args.json:
        return _print_json(types)
    columns = ("name", "delivery_strategy", "attempts", "concurrency", "queued", "due", "in_progress")
    header = ["NAME", "STRATEGY", "ATTEMPTS", "CONCURRENCY", "QUEUED", "DUE", "IN PROGRESS"]
    rows = [[str(t.get(c, "")) for c in columns] for t in types]
    settings = [", ".join(describe(t)) or "-" for t in types]
    if any(text != "-" for text in settings):  # a column only when some type has settings
        header, rows = [*header, "SETTINGS"], [[*row, text] for row, text in zip(rows, settings)]
    _table(rows, header)
    return 0


def _types_get(client: Client, args) -> int:
    job_type = client.type(args.name)
    if args.json:
        return _print_json(job_type)
    fields = []
    for key, value in job_type.items():
        inner = value.items() if isinstance(value, dict) else [(None, value)]
        fields += [(f"{key}.{part}" if part else key, "-" if item is None else str(item).lower() if isinstance(item, bool) else str(item)) for part, item in inner]
    _table([list(field) for field in fields[1:]], [job_type["name"], ""])
    return 0


def _types_create(client: Client, args) -> int:
    created = client.create_type(args.name, args.strategy, args.attempts, args.concurrency, **_settings(args))
    return _print_json(created) if args.json else _say(f"created {created['name']}: {created['delivery_strategy']}, "
                                                          f"{created['attempts']} attempts, concurrency {created['concurrency']}{_described(created)}")


def _types_update(client: Client, args) -> int:
    settings = _settings(args)
    if args.attempts is None and args.concurrency is None and not settings:
        raise UsageError("give --attempts, --concurrency or a setting to change (see --help)")
    updated = client.update_type(args.name, args.attempts, args.concurrency, **settings)
    return _print_json(updated) if args.json else _say(f"{updated['name']}: {updated['attempts']} attempts, concurrency {updated['concurrency']}{_described(updated)}")


def _described(job_type: dict) -> str:
    parts = describe(job_type)
    return f"; {', '.join(parts)}" if parts else ""


def _types_pause(client: Client, args) -> int:
    paused = client.pause(args.name)
    return _print_json(paused) if args.json else _say(f"{paused['name']} paused (concurrency 0)")


def _types_resume(client: Client, args) -> int:
    resumed = client.resume(args.name, args.concurrency)
    return _print_json(resumed) if args.json else _say(f"{resumed['name']} resumed: concurrency {resumed['concurrency']}")


def _enqueue(client: Client, args) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as error:
        raise UsageError(f"--data is not JSON: {error}") from None
    job = client.enqueue(args.name, data, args.id, args.run_after, args.expires_at, args.priority)
    return _print_json(job) if args.json else _say(f"{job['id']} {job['status']}, runs after {job.get('run_after', '-')}")


def _job(action):
    def command(client: Client, args) -> int:
        job = {"get": client.get, "replay": client.replay, "cancel": client.cancel}[action](args.id)
        if args.json:
            return _print_json(job)
        return _say(f"{job['id']} {job['name']} {job['status']}, attempts left {job['attempts']}\n"
                    f"data: {json.dumps(job.get('data'))}")
    return command


def _jobs_list(client: Client, args) -> int:
    jobs = list(client.jobs(args.name, args.status, args.limit))
    if args.json:
        return _print_json(jobs)
    _table([[j["id"], j["status"], str(j.get("priority", 0)), str(j["attempts"]), j.get("created_at", "")] for j in jobs],
           ["ID", "STATUS", "PRIORITY", "ATTEMPTS LEFT", "CREATED (ARCHIVED)"])
    return 0


def _replay_many(client: Client, args) -> int:
    since = datetime.now(timezone.utc) - _duration(args.since)
    chosen = []
    for job in client.jobs(args.name, args.status):
        if datetime.fromisoformat(job["created_at"].replace("Z", "+00:00")) < since:
            break  # newest first: the rest are older
        chosen.append(job["id"])
    replayed = []
    for number, job_id in enumerate(chosen, 1):
        replayed.append(client.replay(job_id)["id"])
        if not args.json and sys.stderr.isatty():
            print(f"\rreplayed {number}/{len(chosen)}", end="", file=sys.stderr, flush=True)
    if args.json:
        return _print_json([{"replayed": old, "as": new} for old, new in zip(chosen, replayed)])
    if sys.stderr.isatty() and chosen:
        print(file=sys.stderr)
    return _say(f"replayed {len(replayed)} {args.status} {args.name} jobs archived since {since:%Y-%m-%d %H:%M:%S} UTC")


SCHEDULE_OPTIONS = {"job_type": "job_type", "cron": "cron", "time_zone": "time_zone", "every": "interval_seconds",
                    "run_after_offset": "run_after_offset", "expires_after": "expires_after", "misfire": "misfire", "misfire_limit": "misfire_limit"}


def _schedule_fields(args) -> dict:
    fields = {field: getattr(args, option) for option, field in SCHEDULE_OPTIONS.items() if getattr(args, option) is not None}
    if args.data is not None:
        try:
            fields["data"] = json.loads(args.data)
        except ValueError as error:
            raise UsageError(f"--data is not JSON: {error}") from None
    return fields


def _schedules_list(client: Client, args) -> int:
    found = client.schedules()
    if args.json:
        return _print_json(found)
    _table([_schedule_row(s) for s in found], ["NAME", "JOB TYPE", "WHEN", "NEXT (UTC)", "NEXT (ITS ZONE)", "LAST JOB", "STATE"])
    return 0


def _schedule_row(schedule: dict) -> list[str]:
    when = f"{schedule['cron']} {schedule['time_zone'] or 'UTC'}" if schedule["cron"] else f"every {schedule['interval_seconds']} s"
    state = "error: " + schedule["error"]["message"] if schedule["error"] else ("paused" if schedule["paused"] else "active")
    last = f"{schedule['last_job_id']} {schedule['last_job_status'] or ''}".strip() if schedule["last_job_id"] else "-"
    return [schedule["name"], schedule["job_type"], when, schedule["next_tick"], schedule["next_tick_local"] or "-", last, state]


def _schedule(action):
    def command(client: Client, args) -> int:
        if action == "create":
            fields = _schedule_fields(args)
            schedule = client.create_schedule(args.name, fields.pop("job_type"), fields.pop("data", None), **fields)
        elif action == "update":
            fields = _schedule_fields(args)
            if not fields:
                raise UsageError("give at least one option to change")
            schedule = client.update_schedule(args.name, **fields)
        else:
            schedule = getattr(client, {"get": "schedule"}.get(action, f"{action}_schedule"))(args.name)
        if args.json:
            return _print_json(schedule)
        if action == "run":
            return _say(f"{schedule['id']} {schedule['status']}")
        row = _schedule_row(schedule)
        return _say(f"{row[0]} ({row[6]}): {row[1]} {row[2]}; next {row[3]}" + (f" ({row[4]})" if row[4] != "-" else "") + f"; last job {row[5]}")
    return command


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise UsageError(f"--since {text!r}: give a number and s, m, h or d, e.g. 30m")
    return timedelta(seconds=int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)])


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_json(value) -> int:
    print(json.dumps(value, indent=2))
    return 0


def _say(text: str) -> int:
    print(text)
    return 0


_COMMANDS = {
    ("types", "list"): _types_list,
    ("types", "get"): _types_get,
    ("types", "create"): _types_create,
    ("types", "update"): _types_update,
    ("types", "pause"): _types_pause,
    ("types", "resume"): _types_resume,
    ("enqueue", None): _enqueue,
    ("job", "get"): _job("get"),
    ("job", "replay"): _job("replay"),
    ("job", "cancel"): _job("cancel"),
    ("jobs", "list"): _jobs_list,
    ("replay", None): _replay_many,
    ("schedules", "list"): _schedules_list,
    **{("schedules", action): _schedule(action) for action in ("get", "create", "update", "delete", "pause", "resume", "run")},
}

"""Generated requests against the real server and database: every route, generated bodies,
headers, ids, timestamps, numbers, unicode, JSON nesting and sizes.

The invariants, for every answer:
- never a 5xx (the database is up), and every error a JSON body with a title and an id;
- never a traceback, nor an error, in the server's log;
- a 4xx changes nothing stored (queued_jobs, archived_jobs, jobs, the paused types);
- a job that was stored can be read, listed, cancelled and claimed.

One server and one database serve the whole module (a server per example would cost
more than the examples); each example that needs a clean slate makes its own job type.
Budgets: `conftest.examples`; the profiles are in conftest.py.
"""

import base64
import dataclasses
import itertools
import json
import logging
import re
import urllib.parse
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from conftest import API_PASSWORD, API_USER, examples, running_server, wait_until
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jobrunner import schedules, server, services, store, timetable
from jobrunner.server import MAX_DATA_BYTES

# The server's threads (psycopg_pool's connection jitter) use the global `random` while
# Hypothesis draws; Hypothesis would take that for a strategy using it.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

# --- the server under test, and what it logs -------------------------------------------


class LogRecorder(logging.Handler):
    """Every record of the jobrunner loggers at ERROR or above, or carrying a traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return [self.format(record) for record in taken]


@dataclasses.dataclass
class Env:
    api: object
    conn: object
    log: LogRecorder
    names: list  # job types that exist
    job_ids: list  # jobs that exist (queued, in progress or archived)


_type_numbers = itertools.count()


def fresh_type(conn, strategy="at_least_once", attempts=3, concurrency=5) -> str:
    name = f"gen-{next(_type_numbers)}"
    services.create_job_type(conn, name, strategy, attempts, concurrency)
    return name


@pytest.fixture(scope="module")
def env(module_db_url):
    recorder = LogRecorder()
    recorder.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("jobrunner")
    logger.addHandler(recorder)
    conn = store.connect(module_db_url)
    names = [fresh_type(conn), fresh_type(conn, "at_most_once", 1, 1)]
    ids = []
    for name in names:  # a job in each state: queued, in progress, archived
        jobs = [services.enqueue(conn, uuid.uuid4(), name, {"to": "someone"}) for _ in range(3)]
        ids += [job.job_id for job in jobs]
        claimed = services.claim(conn, name, 1).jobs[0]
        services.cancel(conn, next(job.id for job in jobs if job.id != claimed.id), name)
        schedules.create_schedule(conn, timetable.validate({"name": name, "job_type": name, "interval_seconds": 3600}))
    try:
        with running_server(module_db_url, read_timeout="3") as api:
            wait_for_full_pool(conn)
            yield Env(api, conn, recorder, names, ids)
    finally:
        logger.removeHandler(recorder)
        conn.close()


def wait_for_full_pool(conn, size: int = 10) -> None:
    """Wait until the server's pool has opened its connections: psycopg_pool draws from the global
    `random` as it opens each, which Hypothesis would take for a strategy using it."""
    opened = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'jobrunner-server%%'"
    wait_until(lambda: conn.execute(opened).fetchone()[0] >= size, "the server's pool to open")


# --- what is stored -----------------------------------------------------------------------

# Rows as Postgres prints them: a row Python cannot read (year 10000) is compared all the same.
SNAPSHOT = """
SELECT (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM queued_jobs t),
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM archived_jobs t),
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.name), '')) FROM jobs t),
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.name), '')) FROM jobrunner_paused_job_types t),
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.name), '')) FROM jobrunner_job_type_settings t),
       (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.name), '')) FROM jobrunner_schedules t)
"""


def snapshot(conn) -> tuple:
    return conn.execute(SNAPSHOT).fetchone()


# --- the invariants -------------------------------------------------------------------------


def check_answer(env: Env, method: str, path: str, response, before: tuple) -> None:
    """No 5xx, a JSON error with title and id, no traceback logged, a 4xx changes nothing."""
    logged = env.log.take()
    what = f"{method} {path[:200]} -> {response.status} {response.body[:300]!r}"
    assert response.status < 500, f"5xx: {what}\nlogged: {logged}"
    assert b"Traceback" not in response.body, what
    assert not logged, f"the server logged an error: {logged}\n{what}"
    if response.status >= 400:
        if method != "HEAD":
            assert response.headers.get("content-type", "").startswith("application/json"), what
            error = json.loads(response.body)
            assert isinstance(error, dict) and error.get("title") and error.get("id"), what
        assert snapshot(env.conn) == before, f"a {response.status} changed what is stored: {what}"


def check_stored_job_usable(env: Env, name: str, job: dict, cancel: bool) -> None:
    """A job that was stored can be read, listed, seen on the dashboard, and cancelled or claimed."""
    job_id = job["id"]
    for path in (f"/v1/jobs/{name}/{job_id}", f"/v1/jobs/{job_id}"):
        got = env.api.get(path)
        assert got.status == 200 and got.json["id"] == job_id, (path, got.status, got.body[:300])
    listed = env.api.get(f"/v1/jobs/{name}/jobs?limit=500")
    assert listed.status == 200, listed.body[:300]
    assert job_id in [j["id"] for j in listed.json["jobs"]]
    for path in ("/", "/v1/jobs", "/metrics"):
        seen = env.api.get(path)
        assert seen.status == 200, (path, seen.status, seen.body[:300])
    if cancel:
        cancelled = env.api.post(f"/v1/jobs/{name}/{job_id}/cancel")
        assert cancelled.status == 200 and cancelled.json["status"] == "cancelled", cancelled.body[:300]
    else:
        due = datetime.fromisoformat(job["run_after"].replace("Z", "+00:00"))
        claim = services.claim(env.conn, name, 100, now=due)
        assert job_id in [j.job_id for j in claim.jobs + claim.expired], (job, claim)
    assert not env.log.take()


# --- strategies -------------------------------------------------------------------------------

# JSON numbers as text, so that forms Python would never write are sent too.
ODD_NUMBERS = [
    "1e400", "-1e400", "-0", "0.0", "1E+2", "1.5", "2e-400", "123456789012345678901234567890",
    "-9223372036854775809", "9223372036854775808", "32767", "32768", "255", "256", "-1", "0", "1",
    "1" + "0" * 4400, "0." + "0" * 400 + "1",
]
# JSON string escapes: lone surrogates, NUL, right-to-left marks, a valid pair.
ODD_STRINGS = [
    r'"\ud800"', r'"\udc00x"', r'"x\ud800"', r'"\u0000"', r'"a\u0000b"', r'"\u202eabc\u202c"',
    r'"\ud83d\ude00"', r'"\ufeff"', r'"\uffff"', '"\u05d0\u05d1\u200f"', '"' + "\u00e9" * 2000 + '"',
]
json_leaf = st.one_of(
    st.sampled_from(["null", "true", "false"]),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.sampled_from(ODD_NUMBERS),
    st.text(max_size=30).map(json.dumps),
    st.sampled_from(ODD_STRINGS),
)


def _object(pairs) -> str:
    return "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"


json_text = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(st.one_of(st.text(max_size=8).map(json.dumps), st.sampled_from(ODD_STRINGS)), inner), max_size=4).map(_object),
    ),
    max_leaves=12,
)
# Deep nesting, around Python's recursion limit and Postgres's stack depth.
deep_json = st.integers(1, 1500).map(lambda depth: "[" * depth + "]" * depth)
any_json = st.one_of(json_text, deep_json)

EXTREME_TIMESTAMPS = [
    "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z",
    "0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z", "9999-12-31T23:00:00-23:59", "0001-01-01T00:59:59+23:59",
    "2024-02-29T12:00:00Z", "2023-02-29T12:00:00Z", "2000-02-29T00:00:00+14:00", "1900-02-29T00:00:00Z",
    "2026-12-01T24:00:00Z", "2026-12-01T23:59:60Z", "1970-01-01T00:00:00.000000001Z", "2026-01-01t00:00:00z",
    "2026-01-01T00:00:00+99:99", "2026-01-01T00:00:00-00:00", "1969-12-31T23:59:59.999999+00:01",
]


@st.composite
def rfc3339(draw) -> str:
    year = draw(st.one_of(st.integers(0, 9999), st.sampled_from([1, 2, 1582, 1900, 1969, 1970, 2000, 2038, 9998, 9999])))
    month = draw(st.one_of(st.integers(1, 12), st.sampled_from([0, 13])))
    day = draw(st.one_of(st.integers(1, 28), st.sampled_from([0, 29, 30, 31, 32])))
    hour, minute, second = draw(st.integers(0, 24)), draw(st.integers(0, 60)), draw(st.integers(0, 61))
    fraction = draw(st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,12}", fullmatch=True)))
    offset = draw(
        st.one_of(
            st.sampled_from(["Z", "z", "+00:00", "-00:00"]),
            st.tuples(st.sampled_from("+-"), st.integers(0, 30), st.integers(0, 70)).map(lambda o: f"{o[0]}{o[1]:02d}:{o[2]:02d}"),
        )
    )
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}{fraction}{offset}"


timestamp_text = st.one_of(
    st.sampled_from(EXTREME_TIMESTAMPS).map(json.dumps),
    rfc3339().map(json.dumps),
    st.datetimes(timezones=st.timezones()).map(lambda moment: json.dumps(moment.isoformat())),
    json_leaf,
)

names = st.one_of(
    st.text(min_size=1, max_size=20),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,110}", fullmatch=True),
    st.sampled_from(["random_id", "job_x", "jobs", "..", ".", "%2F", "a b", "\u202eevil", "x" * 5000]),
)
id_texts = st.one_of(
    st.uuids().map(lambda u: f"job_{u}"),
    st.uuids().map(lambda u: f"job_{str(u).upper()}"),
    st.uuids().map(str),
    st.text(max_size=60),
    st.sampled_from(["random_id", "job_not-a-uuid-at-all-but-long-enough-000", "job_" + "0" * 36, "job_", "Job_" + str(uuid.UUID(int=1))]),
)
queries = st.one_of(
    st.just(""),
    st.dictionaries(st.sampled_from(["limit", "status", "cursor", "x"]), st.one_of(st.text(max_size=20), st.integers(-5, 10**7).map(str)), max_size=3).map(
        lambda q: "?" + urllib.parse.urlencode(q) if q else ""
    ),
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
extra_headers = st.dictionaries(
    st.sampled_from(["Content-Type", "Accept", "Origin", "Sec-Fetch-Site", "X-Forwarded-Proto", "Expect", "Connection", "Accept-Encoding", "Cookie", "X-Request-Id", "Range"]),
    st.one_of(header_text, st.sampled_from(["application/json", "text/plain", "http", "https", "100-continue", "close", "keep-alive", "same-origin", "cross-site", "null", "http://evil.example"])),
    max_size=3,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


authorizations = st.one_of(
    st.just(basic(API_USER, API_PASSWORD)),
    st.just(basic(API_USER, API_PASSWORD)),
    st.sampled_from(["", "Basic", "Basic !!!", "Bearer x", basic("", API_PASSWORD), basic(API_USER, "wrong"), "Basic " + base64.b64encode(b"\xff\xfe:x").decode()]),
    header_text.map(lambda text: "Basic " + text),
)

# Every route of server.ROUTES, with its path's parts to fill in.
ROUTE_TEMPLATES = [
    ("GET", "/v1/jobs"), ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{name}"), ("POST", "/v1/jobs/{name}"),
    ("GET", "/v1/jobs/{name}/jobs{query}"),
    ("GET", "/v1/jobs/{name}/{id}"), ("POST", "/v1/jobs/{name}/{id}"), ("PUT", "/v1/jobs/{name}/{id}"),
    ("POST", "/v1/jobs/{name}/{id}/replay"), ("POST", "/v1/jobs/{id}/replay"),
    ("POST", "/v1/jobs/{name}/{id}/cancel"), ("POST", "/v1/jobs/{name}/{id}/heartbeat"),
    ("POST", "/v1/jobs/{name}/pause"), ("POST", "/v1/jobs/{name}/resume"),
    ("GET", "/"), ("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/openapi.json"),
    ("GET", "/v1/schedules"), ("POST", "/v1/schedules"),
    ("GET", "/v1/schedules/{name}"), ("POST", "/v1/schedules/{name}"), ("DELETE", "/v1/schedules/{name}"),
    ("POST", "/v1/schedules/{name}/pause"), ("POST", "/v1/schedules/{name}/resume"), ("POST", "/v1/schedules/{name}/run"),
]
seconds_text = st.one_of(st.integers(-2, 400_000_000).map(str), st.sampled_from(ODD_NUMBERS), json_leaf)
CRONS = ["0 2 * * *", "*/15 * * * *", "@daily", "@reboot", "0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 29 2 *", "* * * * * *", "61 * * * *",
         "0 9-17 * JAN-MAR mon-fri", "0 0 */2 * MON", "5/20 * * * *", "0 10 * * FRI-SUN", "*/60 * * * *", "", " ", "0 0 1,15 * 7"]
ZONES = ["Europe/Berlin", "UTC", "Australia/Lord_Howe", "America/St_Johns", "Mars/Olympus", "../../etc/passwd", "", "Europe/berlin", "EST5EDT"]
SCHEDULE_FIELDS = {
    "job_type": st.one_of(names.map(json.dumps), json_leaf),
    "data": any_json,
    "cron": st.one_of(st.sampled_from(CRONS).map(json.dumps), st.text(max_size=20).map(json.dumps), json_leaf),
    "time_zone": st.one_of(st.sampled_from(ZONES).map(json.dumps), json_leaf),
    "interval_seconds": seconds_text,
    "run_after_offset": seconds_text,
    "expires_after": seconds_text,
    "misfire": st.one_of(st.sampled_from(['"skip"', '"once"', '"all"', '"ALL"']), json_leaf),
    "misfire_limit": st.one_of(st.integers(-2, 2000).map(str), json_leaf),
    "paused": st.one_of(st.sampled_from(["true", "false", '"true"']), json_leaf),
    "config_owned": st.one_of(st.sampled_from(["true", "false", "1"]), json_leaf),
}
# The fields each route reads, so that generated bodies reach past "missing field".
FIELDS = {
    # settings only where the type is new: one on the shared types would slow their claims for the other examples
    "POST /v1/jobs": ["name", "delivery_strategy", "attempts", "concurrency", "downstream_url", "job_timeout", "retry", "rate_limit", "signing_secrets"],
    "POST /v1/jobs/{name}": ["attempts", "concurrency"],
    "POST /v1/jobs/{name}/{id}": ["status", "attempt", "retryable"],
    "PUT /v1/jobs/{name}/{id}": ["data", "run_after", "expires_at"],
    "POST /v1/jobs/{name}/resume": ["concurrency"],
    "POST /v1/schedules": list(SCHEDULE_FIELDS),
    "POST /v1/schedules/{name}": list(SCHEDULE_FIELDS),
}
PLAUSIBLE = {
    "name": st.one_of(names.map(json.dumps), json_leaf),
    "delivery_strategy": st.one_of(st.sampled_from(['"at_least_once"', '"at_most_once"', '"AT_MOST_ONCE"', '""']), json_leaf),
    "attempts": st.one_of(st.integers(-2, 300).map(str), st.sampled_from(ODD_NUMBERS), json_leaf),
    "attempt": st.one_of(st.integers(-2, 300).map(str), st.sampled_from(ODD_NUMBERS), json_leaf),
    "concurrency": st.one_of(st.integers(-2, 40000).map(str), st.sampled_from(ODD_NUMBERS), json_leaf),
    "status": st.one_of(st.sampled_from(['"succeeded"', '"failed"', '"SUCCEEDED"', '"queued"']), json_leaf),
    "retryable": st.one_of(st.sampled_from(["true", "false", "0", '"true"']), json_leaf),
    "data": any_json,
    "run_after": timestamp_text,
    "expires_at": timestamp_text,
    "downstream_url": st.one_of(st.sampled_from(['"https://h.example:8443/x/"', '"ftp://h"', '"http://"', '"http://u:p@h"', '"http://h/?q"']), json_leaf),
    "job_timeout": st.one_of(st.integers(-2, 700000).map(str), st.sampled_from(ODD_NUMBERS), json_leaf),
    "retry": st.one_of(
        st.lists(st.tuples(st.sampled_from(['"min_backoff"', '"max_backoff"', '"max_doublings"', '"max_retry_duration"', '"max_backof"']),
                           st.one_of(st.integers(-2, 100).map(str), st.sampled_from(ODD_NUMBERS), json_leaf)), max_size=4).map(_object),
        json_leaf,
    ),
    "rate_limit": st.one_of(
        st.lists(st.tuples(st.sampled_from(['"per_second"', '"burst"']), st.one_of(st.sampled_from(ODD_NUMBERS), json_leaf)), max_size=2).map(_object),
        json_leaf,
    ),
    **SCHEDULE_FIELDS,
    "signing_secrets": st.one_of(st.sampled_from(['["whsec_' + "A" * 32 + '"]', '["whsec_!"]', "[]", '"whsec_' + "A" * 32 + '"']), json_leaf),
}


def test_every_route_has_generated_requests():
    """A new route must be added to ROUTE_TEMPLATES, so that it gets generated requests too."""
    covered = set()
    for method, template in ROUTE_TEMPLATES:
        path = template.format(name="some-type", id="job_" + str(uuid.uuid4()), query="")
        for pattern, methods in server.ROUTES:
            if pattern.fullmatch(path):
                covered.add((pattern.pattern, method))
                break
    every = {(pattern.pattern, method) for pattern, methods in server.ROUTES for method in methods}
    assert every <= covered, every - covered


@st.composite
def body_for(draw, route: str) -> bytes | None:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "raw", "none"]))
    if kind == "none":
        return None
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return draw(any_json).encode()
    fields = FIELDS.get(route, [])
    chosen = draw(st.lists(st.sampled_from(fields), unique=True)) if fields else []
    pairs = [(json.dumps(field), draw(PLAUSIBLE[field])) for field in chosen]
    pairs += draw(st.lists(st.tuples(st.text(max_size=10).map(json.dumps), json_leaf), max_size=2))
    return _object(pairs).encode()


def fill(draw, env: Env, template: str) -> str:
    name = draw(st.one_of(st.sampled_from(env.names), names))
    job_id = draw(st.one_of(st.sampled_from(env.job_ids), id_texts))
    pieces = {
        "name": urllib.parse.quote(name, safe="") if name not in env.names else name,
        "id": urllib.parse.quote(job_id, safe=""),
        "query": draw(queries),
    }
    return template.format(**pieces)


def send(env: Env, method: str, path: str, body: bytes | None, headers: dict, authorization: str | None):
    all_headers = dict(headers)
    if authorization is not None:
        all_headers["Authorization"] = authorization
    return env.api.request(method, path, body=body, auth=None, headers=all_headers)


@settings(max_examples=examples(400))
@given(data=st.data())
def test_generated_requests_to_every_route(env, data):
    method, template = data.draw(st.sampled_from(ROUTE_TEMPLATES), label="route")
    method = data.draw(st.one_of(st.just(method), st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"])), label="method")
    path = fill(data.draw, env, template)
    body = data.draw(body_for(f"{method} {template}"), label="body")
    headers = data.draw(extra_headers, label="headers")
    authorization = data.draw(st.one_of(authorizations, st.none()), label="authorization")
    before = snapshot(env.conn)
    response = send(env, method, path, body, headers, authorization)
    check_answer(env, method, path, response, before)


@st.composite
def enqueue_bodies(draw) -> bytes:
    pairs = [('"data"', draw(any_json))]
    for field in ("run_after", "expires_at"):
        if draw(st.booleans()):
            pairs.append((json.dumps(field), draw(timestamp_text)))
    pairs += draw(st.lists(st.tuples(st.text(max_size=10).map(json.dumps), json_leaf), max_size=2))
    return _object(draw(st.permutations(pairs))).encode()


@settings(max_examples=examples(150))
@given(
    body=enqueue_bodies(),
    job_id=st.one_of(st.just("random_id"), st.uuids().map(lambda u: f"job_{u}")),
    strategy=st.sampled_from(["at_least_once", "at_most_once"]),
    cancel=st.booleans(),
)
@example(body=b'{"data": 1, "expires_at": "9999-12-31T23:59:59-01:00"}', job_id="random_id", strategy="at_least_once", cancel=False)
@example(body=b'{"data": 1, "run_after": "0001-01-01T00:00:00+01:00"}', job_id="random_id", strategy="at_least_once", cancel=False)
def test_generated_enqueues_store_only_usable_jobs(env, body, job_id, strategy, cancel):
    name = fresh_type(env.conn, strategy)
    path = f"/v1/jobs/{name}/{job_id}"
    before = snapshot(env.conn)
    response = env.api.put(path, body=body)
    check_answer(env, "PUT", path, response, before)
    if response.status == 202:
        check_stored_job_usable(env, name, response.json, cancel)


LONE_SURROGATES_AND_FRIENDS = [r"\ud800", r"\udfff", r"\u0000", r"\ud83d\ude00", "\u00e9", r"\"", "\\\\", ""]


@settings(max_examples=examples(40))
@given(
    size=st.one_of(st.integers(MAX_DATA_BYTES - 64, MAX_DATA_BYTES + 64), st.integers(MAX_DATA_BYTES // 2, 3 * MAX_DATA_BYTES)),
    poison=st.sampled_from(LONE_SURROGATES_AND_FRIENDS),
    where=st.floats(0, 1),
)
@example(size=MAX_DATA_BYTES + 10, poison=r"\ud800", where=0.5)
def test_bodies_around_the_data_limit(env, size, poison, where):
    """Data just under and over 100 KiB, with an escape somewhere in it: a 202 or a 4xx, never a 500."""
    name = fresh_type(env.conn)
    padding = "x" * max(0, size - 20)
    cut = int(len(padding) * where)
    body = ('{"data":{"pad":"' + padding[:cut] + poison + padding[cut:] + '"}}').encode()
    path = f"/v1/jobs/{name}/random_id"
    before = snapshot(env.conn)
    response = env.api.put(path, body=body)
    check_answer(env, "PUT", path, response, before)
    if response.status == 202:
        check_stored_job_usable(env, name, response.json, cancel=True)


@settings(max_examples=examples(100))
@given(
    fields=st.fixed_dictionaries(
        {}, optional={"status": PLAUSIBLE["status"], "attempt": PLAUSIBLE["attempt"], "retryable": PLAUSIBLE["retryable"]}
    ),
    attempt_offset=st.sampled_from([None, 0, 0, -1, 1]),
    strategy=st.sampled_from(["at_least_once", "at_most_once"]),
    claimed=st.booleans(),
    other_type=st.booleans(),
)
def test_generated_callbacks(env, fields, attempt_offset, strategy, claimed, other_type):
    """Callbacks with generated fields for a queued or in-progress job: a 4xx changes nothing; a 200 is a real change."""
    name = fresh_type(env.conn, strategy)
    job = services.enqueue(env.conn, uuid.uuid4(), name, {"n": 1})
    if claimed:
        job = services.claim(env.conn, name, 1).jobs[0]
    if attempt_offset is not None:
        fields["attempt"] = str(job.attempts + attempt_offset)
    path = f"/v1/jobs/{env.names[0] if other_type else name}/{job.job_id}"
    before = snapshot(env.conn)
    response = env.api.post(path, body=_object([(json.dumps(k), v) for k, v in fields.items()]).encode())
    check_answer(env, "POST", path, response, before)
    if response.status == 200:
        assert snapshot(env.conn) != before, "a 200 callback changed nothing"
        got = env.api.get(f"/v1/jobs/{job.job_id}")
        assert got.status == 200 and got.json["status"] == response.json["status"]


@settings(max_examples=examples(60))
@given(
    attempts=PLAUSIBLE["attempts"],
    concurrency=PLAUSIBLE["concurrency"],
    strategy=PLAUSIBLE["delivery_strategy"],
    update=st.booleans(),
)
def test_generated_job_type_numbers(env, attempts, concurrency, strategy, update):
    """Numbers for a type's attempts and concurrency (huge, negative, floats, bools): a 4xx changes nothing."""
    if update:
        name, path = env.names[0], f"/v1/jobs/{env.names[0]}"
        body = _object([('"attempts"', attempts), ('"concurrency"', concurrency)])
    else:
        name, path = f"gen-n-{next(_type_numbers)}", "/v1/jobs"
        body = _object([('"name"', json.dumps(name)), ('"delivery_strategy"', strategy), ('"attempts"', attempts), ('"concurrency"', concurrency)])
    before = snapshot(env.conn)
    response = env.api.post(path, body=body.encode())
    check_answer(env, "POST", path, response, before)
    if response.status in (200, 201):
        stored = env.api.get(f"/v1/jobs/{name}")
        assert stored.status == 200 and stored.json == response.json
    if update:  # give the shared type its usual settings back, for the other examples
        services.update_job_type(env.conn, env.names[0], 3, 5)


@st.composite
def schedule_bodies(draw) -> bytes:
    timing = draw(st.sampled_from(["cron", "interval_seconds"]))
    chosen = draw(st.lists(st.sampled_from(list(SCHEDULE_FIELDS)), unique=True, max_size=5))
    pairs = [(json.dumps(field), draw(SCHEDULE_FIELDS[field])) for field in dict.fromkeys([timing, *chosen]) if field != "job_type"]
    pairs += draw(st.lists(st.tuples(st.text(max_size=10).map(json.dumps), json_leaf), max_size=1))
    return pairs


@settings(max_examples=examples(150))
@given(pairs=schedule_bodies())
@example(pairs=[('"cron"', '"30 2 * * *"'), ('"time_zone"', '"Australia/Lord_Howe"'), ('"misfire"', '"all"')])
@example(pairs=[('"interval_seconds"', "316224000"), ('"expires_after"', "316224000"), ('"run_after_offset"', "316224000")])
def test_generated_schedules_store_only_usable_schedules(env, pairs):
    """A schedule created from generated fields answers GET, list, the dashboard and /metrics, and its next tick makes its job."""
    name = fresh_type(env.conn, concurrency=0)
    body = _object([('"name"', json.dumps(name)), ('"job_type"', json.dumps(name)), *pairs]).encode()
    before = snapshot(env.conn)
    response = env.api.post("/v1/schedules", body=body)
    check_answer(env, "POST", "/v1/schedules", response, before)
    if response.status != 201:
        return
    for path in (f"/v1/schedules/{name}", "/v1/schedules", "/", "/metrics"):
        seen = env.api.get(path)
        assert seen.status == 200, (path, seen.status, seen.body[:300])
    tick = datetime.fromisoformat(response.json["next_tick"].replace("Z", "+00:00"))
    fired = {f.name: f for f in schedules.enqueue_due_ticks(env.conn, now=tick)}
    if response.json["paused"]:
        assert name not in fired
    else:
        assert fired[name].error is None and fired[name].enqueued == 1, fired[name]
        stored = env.api.get(f"/v1/schedules/{name}").json
        job = env.api.get(f"/v1/jobs/{stored['last_job_id']}")
        assert job.status == 200 and job.json["data"] == response.json["data"], job.body[:300]
        assert stored["next_tick"] > response.json["next_tick"]
    assert env.api.request("DELETE", f"/v1/schedules/{name}").status == 200  # the next examples' rounds find only theirs due
    assert not env.log.take()


def test_every_stored_job_can_still_be_read_listed_and_claimed(env):
    """After everything above: each stored job answers GET, each type's pages list, each type can be claimed."""
    ids = [row[0] for row in env.conn.execute("SELECT id FROM queued_jobs UNION ALL SELECT id FROM archived_jobs")]
    unreadable = []
    for job_uuid in ids:
        got = env.api.get(f"/v1/jobs/job_{job_uuid}")
        if got.status != 200:
            unreadable.append((job_uuid, got.status, got.body[:200]))
    assert not unreadable, unreadable[:5]
    for (name,) in env.conn.execute("SELECT name FROM jobs").fetchall():
        cursor, pages = "", 0
        while cursor is not None and pages < 100:
            page = env.api.get(f"/v1/jobs/{name}/jobs?limit=500" + (f"&cursor={cursor}" if cursor else ""))
            assert page.status == 200, (name, page.body[:300])
            cursor, pages = page.json["next_cursor"], pages + 1
        services.claim(env.conn, name, 100, now=datetime(9999, 12, 30, tzinfo=timezone.utc))
    assert not env.log.take()

"""A job type's delivery settings over the real API: saved, merged, shown, refused.

Generated settings bodies are checked against a small model of the rules
(written apart from jobrunner.policies): a valid body round-trips through create,
update, GET and the list; an invalid one is a 400 whose title names the field,
and changes nothing stored. One server and one database serve the module.
"""

import base64
import json
import threading
import uuid

import pytest
from conftest import examples, running_server
from hypothesis import given, settings
from hypothesis import strategies as st

from jobrunner import dashboard, services, store
from jobrunner.models import DEFAULT_POLICY

# The server's threads (psycopg_pool's connection jitter) use the global `random` while Hypothesis draws.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

DAY = 86400
RETRY_KEYS = ("min_backoff", "max_backoff", "max_doublings", "max_retry_duration")
RATE_KEYS = ("per_second", "burst")
WHOLE = {"retry.max_doublings", "rate_limit.burst"}
NEW_TYPE = {"delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 1}


def secret(size: int = 32, fill: int = 7) -> str:
    return "whsec_" + base64.b64encode(bytes([fill]) * size).decode()


@pytest.fixture(scope="module")
def env(module_db_url):
    conn = store.connect(module_db_url)
    with running_server(module_db_url) as api:
        yield api, conn
    conn.close()


_numbers = iter(range(10**9))


def new_name() -> str:
    return f"settings-{next(_numbers)}"


# --- the model ------------------------------------------------------------------------------


def model_apply(state: dict, patch: dict) -> dict:
    """A merge patch on flat settings (`retry.min_backoff`, ...), values as sent."""
    state = dict(state)
    for key, value in patch.items():
        if key in ("retry", "rate_limit"):
            subkeys = RETRY_KEYS if key == "retry" else RATE_KEYS
            for sub in subkeys if value is None else value:
                state[f"{key}.{sub}"] = None if value is None else value[sub]
        elif key == "downstream_url" and value is not None:
            state[key] = value.rstrip("/")
        else:
            state[key] = value
    return {key: value for key, value in state.items() if value is not None}


def model_refusal(state: dict) -> str | None:
    """The field a whole set of settings breaks a rule between settings with, or None."""
    if "retry.min_backoff" in state and "retry.max_backoff" in state and state["retry.min_backoff"] > state["retry.max_backoff"]:
        return "retry.min_backoff"
    if "rate_limit.burst" in state and "rate_limit.per_second" not in state:
        return "rate_limit.per_second"
    if "job_timeout" in state and "downstream_timeout" in state and state["job_timeout"] <= state["downstream_timeout"]:
        return "job_timeout"
    return None


def model_view(state: dict) -> dict:
    """What GET must show for these settings."""

    def number(key):
        value = state.get(key)
        return value if value is None or key in WHOLE else float(value)

    def group(prefix, keys):
        shown = {key: number(f"{prefix}.{key}") for key in keys}
        return shown if any(value is not None for value in shown.values()) else None

    return {
        "downstream_url": state.get("downstream_url"),
        "downstream_timeout": number("downstream_timeout"),
        "job_timeout": number("job_timeout"),
        "retry": group("retry", RETRY_KEYS),
        "rate_limit": group("rate_limit", RATE_KEYS),
        "callback_token_set": "callback_token" in state,
        "signing_secrets_set": len(state.get("signing_secrets", [])),
    }


def settings_of(job_type: dict) -> dict:
    return {key: job_type[key] for key in model_view({})}


# --- strategies -----------------------------------------------------------------------------


def seconds(high: float, zero: bool = False):
    return st.one_of(st.integers(0 if zero else 1, int(high)), st.floats(0, high, exclude_min=not zero, allow_nan=False))


hosts = st.from_regex(r"[a-z][a-z0-9-]{0,15}(\.[a-z]{2,6}){0,2}", fullmatch=True)
urls = st.builds(
    "{}://{}{}{}{}".format,
    st.sampled_from(["http", "https"]),
    hosts,
    st.sampled_from(["", ":8080", ":1", ":65535"]),
    st.sampled_from(["", "/base", "/a/b-c_d.e", "/%7Euser"]),
    st.sampled_from(["", "/"]),
)
tokens = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=16, max_size=80)
secrets = st.lists(st.binary(min_size=24, max_size=64).map(lambda key: "whsec_" + base64.b64encode(key).decode()), min_size=1, max_size=2, unique=True)


def nullable(strategy):
    return st.one_of(st.none(), strategy)


retries = st.fixed_dictionaries(
    {},
    optional={
        "min_backoff": nullable(seconds(7 * DAY, zero=True)),
        "max_backoff": nullable(seconds(7 * DAY, zero=True)),
        "max_doublings": nullable(st.integers(0, 62)),
        "max_retry_duration": nullable(seconds(366 * DAY)),
    },
)
rate_limits = st.fixed_dictionaries(
    {}, optional={"per_second": nullable(st.floats(1 / DAY, 100000)), "burst": nullable(st.integers(1, 100000))}
)
patches = st.fixed_dictionaries(
    {},
    optional={
        "downstream_url": nullable(urls),
        "downstream_timeout": nullable(seconds(3600)),
        "job_timeout": nullable(seconds(7 * DAY)),
        "retry": nullable(retries),
        "rate_limit": nullable(rate_limits),
        "callback_token": nullable(tokens),
        "signing_secrets": nullable(secrets),
    },
)

# (a part of a body, the field its 400 must name): each is wrong on its own
INVALID = [
    ({"downstream_url": "ftp://h.example/x"}, "downstream_url"),
    ({"downstream_url": "http://"}, "downstream_url"),
    ({"downstream_url": "h.example/x"}, "downstream_url"),
    ({"downstream_url": "http://user:pass@h.example"}, "downstream_url"),
    ({"downstream_url": "http://user@h.example"}, "downstream_url"),
    ({"downstream_url": "http://h.example/?q=1"}, "downstream_url"),
    ({"downstream_url": "http://h.example/p#f"}, "downstream_url"),
    ({"downstream_url": "http://h.example:99999"}, "downstream_url"),
    ({"downstream_url": "http://h.example:port"}, "downstream_url"),
    ({"downstream_url": "http://h example"}, "downstream_url"),
    ({"downstream_url": "http://h\u00e9.example"}, "downstream_url"),
    ({"downstream_url": "http://h.example/\n"}, "downstream_url"),
    ({"downstream_url": "http://h.example/" + "a" * 2048}, "downstream_url"),
    ({"downstream_url": ""}, "downstream_url"),
    ({"downstream_url": 5}, "downstream_url"),
    ({"downstream_url": ["http://h.example"]}, "downstream_url"),
    ({"downstream_timeout": 0}, "downstream_timeout"),
    ({"downstream_timeout": -1}, "downstream_timeout"),
    ({"downstream_timeout": 3600.5}, "downstream_timeout"),
    ({"downstream_timeout": True}, "downstream_timeout"),
    ({"downstream_timeout": "5"}, "downstream_timeout"),
    ({"downstream_timeout": 10**400}, "downstream_timeout"),
    ({"job_timeout": 0.0}, "job_timeout"),
    ({"job_timeout": 7 * DAY + 1}, "job_timeout"),
    ({"job_timeout": False}, "job_timeout"),
    ({"job_timeout": {}}, "job_timeout"),
    ({"job_timeout": 5, "downstream_timeout": 10}, "job_timeout"),
    ({"job_timeout": 10, "downstream_timeout": 10}, "job_timeout"),
    ({"retry": 5}, "retry"),
    ({"retry": []}, "retry"),
    ({"retry": "2^n"}, "retry"),
    ({"retry": {"max_backof": 60}}, "retry.max_backof"),
    ({"retry": {"min_backoff": -1}}, "retry.min_backoff"),
    ({"retry": {"max_backoff": 7 * DAY + 1}}, "retry.max_backoff"),
    ({"retry": {"max_doublings": 63}}, "retry.max_doublings"),
    ({"retry": {"max_doublings": -1}}, "retry.max_doublings"),
    ({"retry": {"max_doublings": 1.5}}, "retry.max_doublings"),
    ({"retry": {"max_doublings": True}}, "retry.max_doublings"),
    ({"retry": {"max_retry_duration": 0}}, "retry.max_retry_duration"),
    ({"retry": {"max_retry_duration": "1d"}}, "retry.max_retry_duration"),
    ({"retry": {"min_backoff": 5, "max_backoff": 1}}, "retry.min_backoff"),
    ({"rate_limit": "10/s"}, "rate_limit"),
    ({"rate_limit": {"per_second": 0}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": -2}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": 100001}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": 1e-9}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": True}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_second": 1, "burst": 0}}, "rate_limit.burst"),
    ({"rate_limit": {"per_second": 1, "burst": 2.5}}, "rate_limit.burst"),
    ({"rate_limit": {"per_second": 1, "burst": 100001}}, "rate_limit.burst"),
    ({"rate_limit": {"burst": 2}}, "rate_limit.per_second"),
    ({"rate_limit": {"per_seconds": 2}}, "rate_limit.per_seconds"),
    ({"callback_token": "too-short"}, "callback_token"),
    ({"callback_token": "x" * 257}, "callback_token"),
    ({"callback_token": "has spaces in it, sixteen+"}, "callback_token"),
    ({"callback_token": "\u00e9" * 20}, "callback_token"),
    ({"callback_token": 1234567890123456789}, "callback_token"),
    ({"signing_secrets": []}, "signing_secrets"),
    ({"signing_secrets": secret()}, "signing_secrets"),
    ({"signing_secrets": [secret(), secret(fill=8), secret(fill=9)]}, "signing_secrets"),
    ({"signing_secrets": [secret(), secret()]}, "signing_secrets"),
    ({"signing_secrets": ["abc"]}, "signing_secrets[0]"),
    ({"signing_secrets": [secret(), "whsec_!!!!"]}, "signing_secrets[1]"),
    ({"signing_secrets": [secret(23)]}, "signing_secrets[0]"),
    ({"signing_secrets": [secret(65)]}, "signing_secrets[0]"),
    ({"signing_secrets": [5]}, "signing_secrets[0]"),
    ({"rate_limt": {"per_second": 10}}, "rate_limt"),
    ({"priority": 3}, "priority"),
    ({"Retry": None}, "Retry"),
]


def assert_refused(response, field: str) -> None:
    assert response.status == 400, (field, response.status, response.body[:300])
    error = response.json
    assert error["id"] == "invalid_parameter" and error["title"].startswith(f"Invalid {field}:"), (field, error)


def stored(conn) -> tuple:
    return conn.execute(
        "SELECT (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.name), '')) FROM jobs t),"
        " (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t.name), '')) FROM jobrunner_job_type_settings t)"
    ).fetchone()


# --- generated ----------------------------------------------------------------------------------


@settings(max_examples=examples(60))
@given(first=patches, second=patches)
def test_valid_settings_round_trip_through_create_update_get_and_list(env, first, second):
    api, conn = env
    name = new_name()
    state = model_apply({}, first)
    created = api.post("/v1/jobs", {"name": name, **NEW_TYPE, **first})
    if model_refusal(state):
        assert_refused(created, model_refusal(state))
        assert api.get(f"/v1/jobs/{name}").status == 404
        return
    assert created.status == 201, created.body[:300]
    assert settings_of(created.json) == model_view(state)
    before = stored(conn)
    updated = api.post(f"/v1/jobs/{name}", second) if second else None
    if second:
        changed = model_apply(state, second)
        if model_refusal(changed):
            assert_refused(updated, model_refusal(changed))
            assert stored(conn) == before
        else:
            assert updated.status == 200, updated.body[:300]
            assert settings_of(updated.json) == model_view(changed)
            state = changed
    assert settings_of(api.get(f"/v1/jobs/{name}").json) == model_view(state)
    listed = {t["name"]: t for t in api.get("/v1/jobs").json["job_types"]}
    assert settings_of(listed[name]) == model_view(state)
    has_row = conn.execute("SELECT count(*) FROM jobrunner_job_type_settings WHERE name = %s", (name,)).fetchone()[0]
    assert has_row == (1 if state else 0)  # the defaults are no row at all


@pytest.mark.parametrize(("fragment", "field"), INVALID, ids=[field for _, field in INVALID])
def test_each_invalid_setting_is_refused_on_create_and_update(env, fragment, field):
    api, conn = env
    name = new_name()
    before = stored(conn)
    assert_refused(api.post("/v1/jobs", {"name": name, **NEW_TYPE, **fragment}), field)
    assert stored(conn) == before
    api.post("/v1/jobs", {"name": name, **NEW_TYPE})
    before = stored(conn)
    assert_refused(api.post(f"/v1/jobs/{name}", fragment), field)
    assert stored(conn) == before


valid_bases = patches.filter(lambda patch: model_refusal(model_apply({}, patch)) is None)


@settings(max_examples=examples(80))
@given(case=st.sampled_from(INVALID), base=valid_bases, update=st.booleans())
def test_an_invalid_setting_is_refused_naming_it_and_nothing_is_saved(env, case, base, update):
    api, conn = env
    fragment, field = case
    body = {**{key: value for key, value in base.items() if key not in fragment}, **fragment}
    if update:
        name = new_name()
        assert api.post("/v1/jobs", {"name": name, **NEW_TYPE}).status == 201
        before = stored(conn)
        assert_refused(api.post(f"/v1/jobs/{name}", {"concurrency": 7, **body}), field)
        assert api.get(f"/v1/jobs/{name}").json["concurrency"] == 1  # not half-saved
    else:
        name = new_name()
        before = stored(conn)
        assert_refused(api.post("/v1/jobs", {"name": name, **NEW_TYPE, **body}), field)
        assert api.get(f"/v1/jobs/{name}").status == 404
    assert stored(conn) == before


# --- the rules, one by one ---------------------------------------------------------------------


def test_a_type_without_settings_shows_them_null_and_has_no_row(env):
    api, conn = env
    name = new_name()
    created = api.post("/v1/jobs", {"name": name, **NEW_TYPE}).json
    assert settings_of(created) == model_view({})
    assert services.get_job_type(conn, name).policy == DEFAULT_POLICY
    assert conn.execute("SELECT count(*) FROM jobrunner_job_type_settings WHERE name = %s", (name,)).fetchone()[0] == 0


def test_an_update_is_a_merge_patch_absent_leaves_and_null_clears(env):
    api, conn = env
    name = new_name()
    full = {
        "downstream_url": "https://a.example/x/",
        "downstream_timeout": 5,
        "job_timeout": 1800,
        "retry": {"min_backoff": 1, "max_backoff": 600, "max_doublings": 8, "max_retry_duration": DAY},
        "rate_limit": {"per_second": 0.5, "burst": 3},
        "callback_token": "t" * 32,
        "signing_secrets": [secret(), secret(fill=1)],
    }
    api.post("/v1/jobs", {"name": name, **NEW_TYPE, **full})
    left = api.post(f"/v1/jobs/{name}", {"attempts": 5}).json
    assert settings_of(left) == model_view(model_apply({}, full)) and left["downstream_url"] == "https://a.example/x"
    inner = api.post(f"/v1/jobs/{name}", {"retry": {"max_doublings": None, "max_backoff": 900}}).json
    assert inner["retry"] == {"min_backoff": 1.0, "max_backoff": 900.0, "max_doublings": None, "max_retry_duration": float(DAY)}
    assert inner["rate_limit"] == {"per_second": 0.5, "burst": 3}
    cleared = api.post(f"/v1/jobs/{name}", {key: None for key in full}).json
    assert settings_of(cleared) == model_view({}) and cleared["attempts"] == 5
    assert conn.execute("SELECT count(*) FROM jobrunner_job_type_settings WHERE name = %s", (name,)).fetchone()[0] == 0


def test_a_rule_between_settings_is_checked_against_what_is_stored(env):
    api, _ = env
    name = new_name()
    api.post("/v1/jobs", {"name": name, **NEW_TYPE, "retry": {"max_backoff": 60}, "downstream_timeout": 30})
    assert_refused(api.post(f"/v1/jobs/{name}", {"retry": {"min_backoff": 90}}), "retry.min_backoff")
    assert_refused(api.post(f"/v1/jobs/{name}", {"job_timeout": 30}), "job_timeout")
    assert api.post(f"/v1/jobs/{name}", {"downstream_timeout": None, "job_timeout": 30}).status == 200
    assert api.post(f"/v1/jobs/{name}", {"rate_limit": {"per_second": 2}}).status == 200
    assert api.post(f"/v1/jobs/{name}", {"rate_limit": {"burst": 9}}).json["rate_limit"] == {"per_second": 2.0, "burst": 9}


def test_an_infinite_number_is_refused_naming_its_field(env):
    api, _ = env
    name = new_name()
    api.post("/v1/jobs", {"name": name, **NEW_TYPE})
    for text, field in (('{"job_timeout": 1e400}', "job_timeout"), ('{"retry": {"min_backoff": -1e400}}', "retry.min_backoff")):
        assert_refused(api.post(f"/v1/jobs/{name}", text.encode()), field)


def test_unknown_fields_of_a_type_are_refused_by_name_on_create_and_update(env):
    api, conn = env
    name = new_name()
    before = stored(conn)
    refused = api.post("/v1/jobs", {"name": name, **NEW_TYPE, "downstream_urls": "https://a.example"})
    assert_refused(refused, "downstream_urls")
    assert "downstream_url" in refused.json["detail"]  # the known fields, to spot the typo
    assert stored(conn) == before
    api.post("/v1/jobs", {"name": name, **NEW_TYPE})
    for body, field in (({"name": name, "concurrency": 2}, "name"), ({"delivery_strategy": "at_most_once"}, "delivery_strategy"), ({"queued": 0}, "queued")):
        assert_refused(api.post(f"/v1/jobs/{name}", body), field)
    assert api.get(f"/v1/jobs/{name}").json["concurrency"] == 1
    both = api.post(f"/v1/jobs/{name}", {"rate_limt": 1, "retries": {}}).json
    assert both["title"] == "Invalid rate_limt, retries: not fields of this request"


def test_an_error_quotes_a_huge_value_cut_short(env):
    api, _ = env
    name = new_name()
    api.post("/v1/jobs", {"name": name, **NEW_TYPE})
    for body in ({"job_timeout": 10**4000}, {"downstream_url": "gopher://" + "h" * 2000}, {"x" * 5000: 1}):
        answer = api.post(f"/v1/jobs/{name}", body)
        assert answer.status == 400 and len(answer.json["title"]) < 200, answer.json["title"][:300]


def test_secrets_are_write_only(env):
    api, conn = env
    name, token, secrets = new_name(), "callback-token-0123456789", [secret(fill=3), secret(fill=4)]
    answers = [api.post("/v1/jobs", {"name": name, **NEW_TYPE, "callback_token": token, "signing_secrets": secrets})]
    answers += [api.get(f"/v1/jobs/{name}"), api.get("/v1/jobs"), api.post(f"/v1/jobs/{name}/pause"), api.get("/")]
    for answer in answers:
        assert answer.status in (200, 201)
        assert token.encode() not in answer.body and not any(s.encode() in answer.body for s in secrets)
    assert answers[1].json["callback_token_set"] is True and answers[1].json["signing_secrets_set"] == 2
    policy = store.job_type_policy(conn, name)
    assert policy.callback_token == token and policy.signing_secrets == tuple(secrets)
    assert token not in repr(services.get_job_type(conn, name)) and secrets[0] not in repr(policy)


def test_a_change_of_settings_alone_notifies_the_workers(env, module_db_url):
    api, _ = env
    name = new_name()
    api.post("/v1/jobs", {"name": name, **NEW_TYPE})
    with store.connect(module_db_url) as listener:
        listener.execute("LISTEN jobrunner_types")
        assert api.post(f"/v1/jobs/{name}", {"rate_limit": {"per_second": 3}}).status == 200
        assert name in [n.payload for n in listener.notifies(timeout=5, stop_after=1)]


# --- concurrency ------------------------------------------------------------------------------------


def test_concurrent_updates_of_different_settings_lose_none(env):
    """Each update reads the stored settings and writes them back merged: without the type's row lock one would undo the other."""
    api, _ = env
    name = new_name()
    api.post("/v1/jobs", {"name": name, **NEW_TYPE})
    rounds, errors = 40, []

    def change(body_for):
        for n in range(1, rounds + 1):
            answer = api.post(f"/v1/jobs/{name}", body_for(n))
            if answer.status != 200:
                errors.append(answer.body)

    threads = [
        threading.Thread(target=change, args=(lambda n: {"retry": {"max_doublings": n % 63}},)),
        threading.Thread(target=change, args=(lambda n: {"rate_limit": {"per_second": n}},)),
        threading.Thread(target=change, args=(lambda n: {"downstream_timeout": n},)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    final = api.get(f"/v1/jobs/{name}").json
    assert (final["retry"]["max_doublings"], final["rate_limit"]["per_second"], final["downstream_timeout"]) == (rounds % 63, rounds, rounds)


def test_concurrent_creates_of_one_name_save_the_winners_settings_only(env):
    api, conn = env
    for _ in range(5):
        name, answers = new_name(), {}
        barrier = threading.Barrier(4)

        def create(n):
            barrier.wait()
            answers[n] = api.post("/v1/jobs", {"name": name, **NEW_TYPE, "job_timeout": 100 + n, "rate_limit": {"per_second": n + 1}})

        threads = [threading.Thread(target=create, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [n for n, answer in answers.items() if answer.status == 201]
        assert len(winners) == 1 and all(answers[n].status == 400 for n in answers if n not in winners)
        policy = store.job_type_policy(conn, name)
        assert (policy.job_timeout, policy.rate_per_second) == (100 + winners[0], winners[0] + 1)


def test_a_listing_never_sees_a_type_without_the_settings_it_was_created_with(env):
    api, _ = env
    names = [new_name() for _ in range(30)]
    seen_without, done = [], threading.Event()

    def watch():
        while not done.is_set():
            for job_type in api.get("/v1/jobs").json["job_types"]:
                if job_type["name"] in names and job_type["job_timeout"] is None:
                    seen_without.append(job_type["name"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for name in names:
            assert api.post("/v1/jobs", {"name": name, **NEW_TYPE, "job_timeout": 60}).status == 201
    finally:
        done.set()
        watcher.join()
    assert not seen_without


# --- the dashboard ------------------------------------------------------------------------------------


def test_the_dashboard_shows_each_types_policy_and_its_jobs_backing_off(conn):
    services.create_job_type(conn, "email", "at_least_once", 3, 5, {"downstream_url": "https://mail.example", "job_timeout": 1800,
                                                                     "rate_limit": {"per_second": 0.5}, "callback_token": "z" * 20})
    services.create_job_type(conn, "sms", "at_least_once", 3, 5)
    for name in ("email", "sms"):
        job = services.enqueue(conn, uuid.uuid4(), name, {})
        claimed = services.claim(conn, name, 1).jobs[0]
        assert claimed.id == job.id
        if name == "email":  # fails, and waits 2 s for its retry
            services.handle_status_callback(conn, job.id, name, "failed", claimed.attempts)
    overview = services.overview(conn)
    page = dashboard.render(overview, "jobrunner").decode()
    email_row = page.split('<tr data-type="email">')[1].split("</tr>")[0]
    sms_row = page.split('<tr data-type="sms">')[1].split("</tr>")[0]
    assert overview.backing_off == {"email": 1}
    assert "1 backing off" in email_row and "backing off" not in sms_row
    assert "to https://mail.example, callback within 30m, 0.5/s, callback token" in email_row
    assert "z" * 20 not in page and 'class="sub policy"' not in sms_row


def test_the_dashboard_shows_a_type_whose_due_jobs_wait_for_its_rate_limit(conn):
    services.create_job_type(conn, "partner", "at_least_once", 3, 5, {"rate_limit": {"per_second": 0.01, "burst": 1}})
    services.create_job_type(conn, "email", "at_least_once", 3, 5)
    for name in ("partner", "email"):
        for _ in range(3):
            services.enqueue(conn, uuid.uuid4(), name, {})
    assert len(services.claim(conn, "partner", 10, rate_limited=True).jobs) == 1  # its one token: the others wait 100 s for the next
    assert len(services.claim(conn, "email", 1).jobs) == 1  # a concurrency-bound wait is not a rate limit
    overview = services.overview(conn)
    page = dashboard.render(overview, "jobrunner").decode()
    assert overview.rate_limited == {"partner"}
    assert "rate limited" in page.split('<tr data-type="partner">')[1].split("</tr>")[0]
    assert "rate limited" not in page.split('<tr data-type="email">')[1].split("</tr>")[0]

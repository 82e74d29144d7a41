"""The schedules' HTTP routes: create, list, get, update, pause, resume, run now, delete; bad input is a 400 naming the field."""

from datetime import datetime

import pytest
from conftest import create_type

DEEP: list = [1]
for _ in range(101):
    DEEP = [DEEP]
SCHEDULE = {"name": "nightly", "job_type": "email", "cron": "0 2 * * *", "time_zone": "Europe/Berlin", "data": {"report": "daily"}}


@pytest.fixture
def typed(api):
    create_type(api)
    return api


def test_create_get_list_update_and_delete(typed):
    api = typed
    created = api.post("/v1/schedules", SCHEDULE)
    assert created.status == 201, created.body
    body = created.json
    assert {key: body[key] for key in SCHEDULE} == SCHEDULE
    assert (body["misfire"], body["misfire_limit"], body["paused"], body["config_owned"], body["last_job_id"]) == ("skip", 100, False, False, None)
    assert body["next_tick"].endswith("Z") and body["next_tick_local"][-6:] in ("+01:00", "+02:00")
    assert api.get("/v1/schedules/nightly").json == body
    assert [s["name"] for s in api.get("/v1/schedules").json["schedules"]] == ["nightly"]
    assert api.post("/v1/schedules", SCHEDULE).status == 409
    # a change: the interval replaces the cron (and its zone)
    updated = api.post("/v1/schedules/nightly", {"interval_seconds": 60, "misfire": "all", "misfire_limit": 5})
    assert updated.status == 200, updated.body
    assert (updated.json["cron"], updated.json["time_zone"], updated.json["interval_seconds"], updated.json["misfire"]) == (None, None, 60, "all")
    assert updated.json["next_tick_local"] is None
    cleared = api.post("/v1/schedules/nightly", {"data": None})
    assert cleared.json["data"] is None
    deleted = api.request("DELETE", "/v1/schedules/nightly")
    assert deleted.status == 200 and deleted.json["name"] == "nightly"
    assert api.get("/v1/schedules/nightly").status == 404
    assert api.request("DELETE", "/v1/schedules/nightly").status == 404


def test_pause_resume_and_run_now(typed):
    api = typed
    api.post("/v1/schedules", SCHEDULE)
    paused = api.post("/v1/schedules/nightly/pause")
    assert paused.status == 200 and paused.json["paused"] is True
    resumed = api.post("/v1/schedules/nightly/resume")
    assert resumed.status == 200 and resumed.json["paused"] is False
    job = api.post("/v1/schedules/nightly/run")
    assert job.status == 201, job.body
    assert (job.json["name"], job.json["data"], job.json["status"]) == ("email", {"report": "daily"}, "queued")
    again = api.post("/v1/schedules/nightly/run").json
    assert again["id"] != job.json["id"]
    schedule = api.get("/v1/schedules/nightly").json
    assert (schedule["last_job_id"], schedule["last_job_status"]) == (again["id"], "queued")
    for action in ("pause", "resume", "run"):
        assert api.post(f"/v1/schedules/nope/{action}").status == 404


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"cron": "0 0 30 2 *"}, "cron"),  # never fires
        ({"cron": "61 * * * *"}, "cron"),
        ({"time_zone": "Europe/Atlantis"}, "time_zone"),
        ({"cron": None, "time_zone": None, "interval_seconds": 0}, "interval_seconds"),
        ({"cron": None, "time_zone": None, "interval_seconds": 0.5}, "interval_seconds"),
        ({"cron": None, "time_zone": None}, "cron"),
        ({"job_type": "unknown"}, "job_type"),
        ({"every": "day"}, "every"),
        ({"misfire": "never"}, "misfire"),
        ({"name": "no spaces"}, "name"),
        ({"name": None}, "name"),
        ({"config_owned": "yes"}, "config_owned"),
        ({"data": DEEP}, "data"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(typed, changes, field):
    answer = typed.post("/v1/schedules", {**SCHEDULE, **changes})
    assert answer.status == 400, answer.body
    assert answer.json["title"].startswith(f"Invalid {field}:"), answer.json


def test_bad_updates_are_400s_and_change_nothing(typed):
    api = typed
    api.post("/v1/schedules", SCHEDULE)
    before = api.get("/v1/schedules/nightly").json
    for changes, field in (({"time_zone": "Nowhere/Town"}, "time_zone"), ({"interval_seconds": -5}, "interval_seconds"), ({"colour": 1}, "colour")):
        answer = api.post("/v1/schedules/nightly", changes)
        assert answer.status == 400 and answer.json["title"].startswith(f"Invalid {field}:"), answer.body
    assert api.get("/v1/schedules/nightly").json == before
    assert api.post("/v1/schedules/nightly", b"[1]").status == 400
    assert api.post("/v1/schedules/nope", {"paused": True}).status == 404


def test_metrics_show_every_schedule(typed, conn):
    api = typed
    api.post("/v1/schedules", SCHEDULE)
    api.post("/v1/schedules", {"name": "broken", "job_type": "email", "interval_seconds": 60})
    conn.execute("UPDATE jobrunner_schedules SET error = 'ValueError: x', failures = 1 WHERE name = 'broken'")
    api.post("/v1/schedules/nightly/pause")
    text = api.get("/metrics").body.decode()
    lines = set(text.splitlines())
    for metric in ("ticks_enqueued_total", "misfires_skipped_total", "errors_total"):
        assert f'jobrunner_schedule_{metric}{{schedule="nightly"}} 0' in lines  # at 0 before the first event
    next_tick = api.get("/v1/schedules/broken").json["next_tick"]
    unix = int(datetime.fromisoformat(next_tick.replace("Z", "+00:00")).timestamp())
    assert f'jobrunner_schedule_next_tick_timestamp_seconds{{schedule="broken"}} {unix}' in lines
    assert {'jobrunner_schedule_failing{schedule="broken"} 1', 'jobrunner_schedule_failing{schedule="nightly"} 0'} <= lines
    assert {'jobrunner_schedule_paused{schedule="nightly"} 1', 'jobrunner_schedule_paused{schedule="broken"} 0'} <= lines
    page = api.get("/").body.decode()
    assert 'data-schedule="broken"' in page and "failing" in page and "ValueError: x" in page

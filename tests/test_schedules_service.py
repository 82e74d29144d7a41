"""Schedules in `jobrunner run`: two supervisors on one database make each tick's job once; config-declared schedules."""

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

from conftest import API_PASSWORD, API_USER, make_type, running_service, wait_until

from jobrunner import schedules, timetable
from jobrunner.models import tick_job_id

NO_WORKERS = "workers = 0\n"  # the jobs stay where the ticks put them: counted by id
UNUSED_DOWNSTREAM = "http://127.0.0.1:9"


def every(seconds, name="every2", job_type="email", **fields):
    return timetable.validate({"name": name, "job_type": job_type, "interval_seconds": seconds, **fields})


def tick_jobs(conn, name="email") -> list[tuple]:
    """(id, run_after) of every job of the type, queued and archived: one row per job, a job in both counts twice."""
    return conn.execute(
        "SELECT id, run_after FROM queued_jobs WHERE name = %(name)s UNION ALL SELECT id, NULL FROM archived_jobs WHERE name = %(name)s",
        {"name": name},
    ).fetchall()


def ticks_enqueued(service, schedule: str) -> int:
    text = service.api.get("/metrics").body.decode()
    found = re.search(rf'^jobrunner_schedule_ticks_enqueued_total{{schedule="{schedule}"}} (\d+)$', text, re.M)
    return int(found.group(1)) if found else 0


def test_two_supervisors_on_one_database_make_each_tick_one_job(db_url, conn):
    make_type(conn, concurrency=0)  # paused: its jobs wait, and the schedule goes on enqueueing
    schedules.create_schedule(conn, every(2))
    with running_service(db_url, UNUSED_DOWNSTREAM, NO_WORKERS) as one, running_service(db_url, UNUSED_DOWNSTREAM, NO_WORKERS) as two:
        started = time.monotonic()
        wait_until(lambda: len(tick_jobs(conn)) >= 30, "a minute of 2-second ticks", timeout=120, interval=0.5)
        assert time.monotonic() - started >= 50  # no burst: 30 ticks take a minute
        jobs = tick_jobs(conn)
        wait_until(lambda: ticks_enqueued(one, "every2") + ticks_enqueued(two, "every2") >= len(jobs), "the metrics to be published")
        counted = ticks_enqueued(one, "every2") + ticks_enqueued(two, "every2")
    ticks = sorted(run_after for _, run_after in jobs)
    assert len({job_id for job_id, _ in jobs}) == len(jobs), "a job both queued and archived"
    assert [job_id for job_id, _ in sorted(jobs, key=lambda job: job[1])] == [tick_job_id("every2", tick) for tick in ticks]
    # contiguous: every tick from the first to the last, each once
    assert ticks == [ticks[0] + timedelta(seconds=2 * n) for n in range(len(ticks))]
    assert counted >= len(jobs)  # each host counts what it inserted: together, at least every job (the rest came since)
    assert counted <= len(tick_jobs(conn))


def test_a_schedule_created_while_the_scheduler_sleeps_wakes_it(db_url, conn):
    make_type(conn, concurrency=0)
    with running_service(db_url, UNUSED_DOWNSTREAM, NO_WORKERS) as service:
        # the scheduler found no schedule (its last statement asked when one is due): it sleeps a minute unless told
        asleep = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'jobrunner-scheduler:%%' AND state = 'idle' AND query LIKE '%%min(greatest(next_tick%%'"
        wait_until(lambda: conn.execute(asleep).fetchone()[0] == 1, "the scheduler to sleep")
        created = schedules.create_schedule(conn, every(2))
        wait_until(lambda: tick_jobs(conn), "the first tick's job", timeout=10, interval=0.05)
        [(job_id, run_after)] = tick_jobs(conn)[:1]
        assert run_after == created.next_tick and job_id == tick_job_id("every2", created.next_tick)


CONFIG = """workers = 0

[schedule from-config]
job_type = email
interval_seconds = {seconds}
data = {{"source": "config"}}
misfire = once
"""


def test_config_schedules_are_applied_at_start_and_on_sighup_and_a_bad_one_is_refused(db_url, conn):
    make_type(conn, concurrency=0)
    schedules.create_schedule(conn, every(3600, name="by-api"))
    with running_service(db_url, UNUSED_DOWNSTREAM, CONFIG.format(seconds=2)) as service:
        schedule, _ = schedules.get_schedule(conn, "from-config")
        assert (schedule.config_owned, schedule.interval_seconds, schedule.data, schedule.misfire) == (True, 2, {"source": "config"}, "once")
        wait_until(lambda: tick_jobs(conn), "a tick of the config's schedule", timeout=10, interval=0.05)
        # changed in the file: SIGHUP applies it
        _rewrite(service, CONFIG.format(seconds=7))
        service.signal(signal.SIGHUP)
        wait_until(lambda: schedules.get_schedule(conn, "from-config")[0].interval_seconds == 7, "the reloaded schedule")
        # a schedule for a job type that does not exist: the reload is refused, the running schedules stay
        _rewrite(service, CONFIG.format(seconds=7).replace("job_type = email", "job_type = missing"))
        service.signal(signal.SIGHUP)
        service.wait_for_log("the new configuration is invalid, keeping the running one")
        assert "[schedule from-config] job_type" in service.log()
        assert schedules.get_schedule(conn, "from-config")[0].job_type == "email"
        # dropped from the file: deleted; the API's schedule is never touched
        _rewrite(service, "workers = 0\n")
        service.signal(signal.SIGHUP)
        wait_until(lambda: [s.name for s, _ in schedules.list_schedules(conn)] == ["by-api"], "the config's schedule to be deleted")


def _rewrite(service, config: str) -> None:
    with open(service.config_path, "w") as file:
        file.write("[jobrunner]\n" + config)


def test_a_bad_schedule_in_the_config_file_stops_the_start_naming_it(db_url, conn, tmp_path):
    make_type(conn)
    path = tmp_path / "jobrunner.ini"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("JOBRUNNER_", "DATABASE_URL", "DOWNSTREAM", "PORT"))}
    environment.update(DATABASE_URL=db_url, JOBRUNNER_USERS=f"{API_USER}:{API_PASSWORD}", PORT="0", JOBRUNNER_HOST="127.0.0.1")
    for section, named in (
        ("job_type = email\ncron = 0 0 30 2 *\n", "[schedule bad] cron"),
        ("job_type = email\ninterval_seconds = 5\ntime_zone = Europe/Berlin\n", "[schedule bad] time_zone"),
        ("job_type = nope\ninterval_seconds = 5\n", "[schedule bad] job_type"),
    ):
        path.write_text("[jobrunner]\nworkers = 0\n\n[schedule bad]\n" + section)
        done = subprocess.run([sys.executable, "-m", "jobrunner", "--config", str(path), "run"], env=environment, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert named in done.stderr
    assert schedules.list_schedules(conn) == []


def test_check_config_names_the_declared_schedules_and_refuses_a_bad_one(tmp_path):
    path = tmp_path / "jobrunner.ini"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("JOBRUNNER_", "DATABASE_URL", "DOWNSTREAM", "PORT"))}
    command = [sys.executable, "-m", "jobrunner", "--config", str(path), "check-config"]
    path.write_text("[jobrunner]\n\n[schedule nightly]\njob_type = email\ncron = @daily\ntime_zone = Europe/Berlin\n\n[schedule ping]\njob_type = ping\ninterval_seconds = 30\n")
    good = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and f"schedules declared in {path}: nightly, ping" in good.stdout, good.stderr
    path.write_text("[jobrunner]\n\n[schedule nightly]\njob_type = email\ncron = @daily\nmisfire = sometimes\n")
    bad = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "[schedule nightly] misfire: must be one of skip, once, all" in bad.stderr, bad.stderr

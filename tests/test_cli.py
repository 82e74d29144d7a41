"""The `jobrunner` command line, run as a real process."""

import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from conftest import SCHEMA_SQL, Api, wait_until

from jobrunner import cli, store


def run_cli(*args, env=None, cwd=None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "JOBRUNNER_", "DOWNSTREAM", "PORT"))}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "jobrunner", *args], capture_output=True, text=True, env=environment, timeout=60, cwd=cwd)


def test_migrate_applies_the_schema_to_database_url(make_database):
    url = make_database(template="template0")
    result = run_cli("migrate", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    conn = store.connect(url)
    tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    conn.close()
    declared = set(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", SCHEMA_SQL))
    assert {"jobs", "queued_jobs", "archived_jobs", "jobrunner_paused_job_types"} <= declared
    assert tables == declared | {"jobrunner_schema_migrations"}
    assert "applied migration 0001_base" in result.stdout


def test_migrate_without_a_database_names_the_setting():
    result = run_cli("migrate")
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr


def test_migrate_with_an_unreachable_database_fails_cleanly(tmp_path):
    result = run_cli("migrate", "--database-url", f"postgresql:///x?host={tmp_path}&port=1&connect_timeout=2")
    assert result.returncode == 1
    assert "database is unavailable" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_to_start_without_users_naming_the_setting(db_url):
    result = run_cli("serve", env={"DATABASE_URL": db_url})
    assert result.returncode == 2
    assert "JOBRUNNER_USERS" in result.stderr


def test_bad_settings_fail_fast_naming_the_setting(db_url):
    result = run_cli("serve", env={"DATABASE_URL": db_url, "JOBRUNNER_USERS": "a:b", "PORT": "eighty"})
    assert result.returncode == 2
    assert "PORT (port, from $PORT): must be a whole number" in result.stderr
    result = run_cli("check-config", env={"JOBRUNNER_USERS": "nopassword"})
    assert result.returncode == 2
    assert "JOBRUNNER_USERS" in result.stderr
    assert "nopassword" not in result.stderr  # secrets are never echoed


def test_serve_without_database_url_runs_a_private_database_and_stops_on_sigterm():
    workdir = tempfile.mkdtemp(prefix="jobrunner-dev-")
    os.chmod(workdir, 0o755)  # as root, the cluster runs as `postgres`, which must reach it
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "JOBRUNNER_USERS")}
    environment.update({"JOBRUNNER_DATA_DIR": f"{workdir}/data", "PORT": "0", "JOBRUNNER_HOST": "127.0.0.1"})
    process = subprocess.Popen(
        [sys.executable, "-m", "jobrunner", "serve"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().startswith("jobrunner: development mode, database postgresql://")
        password = process.stdout.readline().split("password ")[1].split()[0]
        with open(f"{workdir}/data/api-password") as kept:
            assert kept.read() == password
        port = None
        while port is None:
            line = process.stderr.readline()
            assert line, "the server exited before it served"
            if "serving HTTP on" in line:
                port = int(line.rsplit(":", 1)[1])
        api = Api(port)
        assert api.get("/v1/jobs", auth=("admin", password)).json == {"job_types": []}
        assert api.get("/v1/jobs", auth=("admin", "wrong")).status == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def test_check_config_prints_the_effective_settings_with_secrets_masked(tmp_path):
    config = tmp_path / "jobrunner.ini"
    config.write_text("[jobrunner]\nworkers = 3\nhomepage_title = Jobs\n")
    result = run_cli("--config", str(config), "check-config", env={"JOBRUNNER_USERS": "ops:hunter2", "PORT": "8080"})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line.split()[-1].startswith("$")}
    assert (lines["workers"], lines["port"], lines["homepage_title"], lines["users"]) == ("3", "8080", "'Jobs'", "****")
    assert "hunter2" not in result.stdout
    bad = tmp_path / "bad.ini"
    bad.write_text("[jobrunner]\nworkers = many\n")
    result = run_cli("--config", str(bad), "check-config")
    assert result.returncode == 2
    assert "JOBRUNNER_WORKERS (workers, from" in result.stderr


def test_check_config_production_refuses_to_run_without_a_database_url():
    result = run_cli("check-config", "--production", env={"JOBRUNNER_USERS": "ops:hunter2", "DOWNSTREAM_URL": "http://127.0.0.1:1"})
    assert result.returncode == 2
    assert "DATABASE_URL (database_url): not set" in result.stderr
    result = run_cli("check-config", "--production", env={"JOBRUNNER_USERS": "ops:hunter2", "DATABASE_URL": "postgresql:///x"})
    assert result.returncode == 2
    assert "DOWNSTREAM_URL (downstream_url)" in result.stderr
    complete = {"JOBRUNNER_USERS": "ops:hunter2", "DATABASE_URL": "postgresql:///x", "DOWNSTREAM_URL": "http://127.0.0.1:1"}
    assert run_cli("check-config", "--production", env=complete).returncode == 0


def test_an_empty_development_password_file_gets_a_new_password(tmp_path):
    (tmp_path / "api-password").write_text("")  # a crash between creating the file and writing it
    password = cli._development_password(str(tmp_path))
    assert len(password) >= 16
    assert (tmp_path / "api-password").read_text() == password
    assert oct((tmp_path / "api-password").stat().st_mode & 0o777) == "0o600"
    assert cli._development_password(str(tmp_path)) == password  # kept from then on


def _run_on_a_held_port(db_url, graceful_timeout):
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBRUNNER_", "DOWNSTREAM", "PORT"))}
    env.update(DATABASE_URL=db_url, JOBRUNNER_USERS="ops:hunter2", JOBRUNNER_WORKERS="0", JOBRUNNER_HOST="127.0.0.1",
               PORT=str(port), JOBRUNNER_GRACEFUL_TIMEOUT=str(graceful_timeout))
    process = subprocess.Popen([sys.executable, "-m", "jobrunner", "run"], env=env, stderr=subprocess.PIPE, text=True)
    return holder, port, process


def test_run_waits_for_a_port_that_a_killed_supervisors_children_still_hold(db_url):
    holder, port, process = _run_on_a_held_port(db_url, graceful_timeout=20)
    try:
        waiting = ""
        deadline = time.monotonic() + 30
        while "in use; waiting" not in waiting and time.monotonic() < deadline:
            if select.select([process.stderr], [], [], 1)[0]:
                waiting = process.stderr.readline()
        assert "in use; waiting" in waiting
        holder.close()  # the old server child exits
        def serving():
            try:
                return Api(port).get("/healthz", auth=None).status == 200
            except ConnectionRefusedError:
                return False  # not bound yet

        wait_until(serving, "the server on the freed port")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        holder.close()
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def test_run_on_a_port_held_for_good_names_the_setting_without_a_traceback(db_url):
    holder, port, process = _run_on_a_held_port(db_url, graceful_timeout=1)
    try:
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 2
        assert f"PORT (port) / JOBRUNNER_HOST (host): cannot listen on 127.0.0.1:{port}" in stderr
        assert "Traceback" not in stderr
    finally:
        holder.close()


def test_a_stuck_job_timeout_not_longer_than_the_job_timeout_is_refused_naming_both(tmp_path):
    # the watcher would fail jobs that are still waiting for their callback
    # (without users: were the setting let through, `run` would still stop, at the users)
    contradicting = {"DATABASE_URL": "postgresql:///x", "JOBRUNNER_JOB_TIMEOUT": "600"}
    for command in ("check-config", "run"):
        result = run_cli(command, env=contradicting)
        assert result.returncode == 2, result.stderr
        assert "JOBRUNNER_STUCK_JOB_TIMEOUT (stuck_job_timeout" in result.stderr
        assert "JOBRUNNER_JOB_TIMEOUT (job_timeout" in result.stderr
    config = tmp_path / "jobrunner.ini"
    config.write_text("[jobrunner]\nstuck_job_timeout = 300\n")
    result = run_cli("--config", str(config), "check-config")
    assert result.returncode == 2 and "must be longer than JOBRUNNER_JOB_TIMEOUT (job_timeout" in result.stderr
    assert run_cli("check-config", env={"JOBRUNNER_JOB_TIMEOUT": "60", "JOBRUNNER_STUCK_JOB_TIMEOUT": "61"}).returncode == 0


def test_a_sleep_factor_below_one_is_refused_because_the_idle_poll_would_never_sleep():
    for factor in ("0", "0.5"):
        for command in ("check-config", "run"):
            result = run_cli(command, env={"DATABASE_URL": "postgresql:///x", "JOBRUNNER_SLEEP_FACTOR": factor})
            assert result.returncode == 2, result.stderr
            assert "JOBRUNNER_SLEEP_FACTOR (sleep_factor" in result.stderr and "never sleep" in result.stderr
    assert run_cli("check-config", env={"JOBRUNNER_SLEEP_FACTOR": "1"}).returncode == 0


def _with_open_file_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def test_settings_that_need_more_open_files_than_the_limit_are_warned_about():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "JOBRUNNER_", "DOWNSTREAM", "PORT"))}
    env.update(JOBRUNNER_MAX_REQUEST_THREADS="200", JOBRUNNER_DISPATCH_THREADS="150")
    command = [sys.executable, "-m", "jobrunner", "check-config"]
    low = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, preexec_fn=_with_open_file_limit(128))
    assert low.returncode == 0, low.stderr  # a warning, not a refusal
    server, worker = (line for line in low.stderr.splitlines() if "open files" in line)
    assert "JOBRUNNER_MAX_REQUEST_THREADS (200)" in server and "PG_SERVER_POOL_SIZE (10)" in server and "RLIMIT_NOFILE 128" in server
    assert "JOBRUNNER_DISPATCH_THREADS (150)" in worker and "PG_WORKER_POOL_SIZE (4)" in worker and "RLIMIT_NOFILE 128" in worker
    # `run` says so too, before anything else can stop it (here: no users)
    ran = subprocess.run([sys.executable, "-m", "jobrunner", "run"], capture_output=True, text=True, env={**env, "DATABASE_URL": "postgresql:///x"},
                         timeout=60, preexec_fn=_with_open_file_limit(128))
    assert ran.returncode == 2 and "JOBRUNNER_MAX_REQUEST_THREADS (200)" in ran.stderr
    enough = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, preexec_fn=_with_open_file_limit(1024))
    assert enough.returncode == 0 and "open files" not in enough.stderr


def _start_development_service(workdir: str) -> tuple[subprocess.Popen, int]:
    """`jobrunner run` without DATABASE_URL in `workdir`, and the port it serves on once it is serving."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "JOBRUNNER_", "DOWNSTREAM", "PORT"))}
    environment.update(PORT="0", JOBRUNNER_HOST="127.0.0.1", JOBRUNNER_WORKERS="1")
    process = subprocess.Popen([sys.executable, "-m", "jobrunner", "run"], cwd=workdir, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        assert line, f"jobrunner run exited with {process.wait()} before it served"
        if re.search(r"supervisor \d+: .* listening on \d+$", line):
            return process, int(line.rsplit(" ", 1)[1])
    raise AssertionError("jobrunner run did not serve within 60 s")


def test_development_mode_starts_again_after_its_supervisor_was_killed():
    workdir = tempfile.mkdtemp(prefix="jobrunner-dev-")
    os.chmod(workdir, 0o755)  # as root, the cluster runs as `postgres`, which must reach it
    processes = []
    try:
        first, _ = _start_development_service(workdir)
        processes.append(first)
        first.kill()  # its private PostgreSQL stays behind
        first.wait(timeout=10)
        second, port = _start_development_service(workdir)
        processes.append(second)
        wait_until(lambda: Api(port).get("/healthz", auth=None).status == 200, "the restarted service to answer")
        # the command line finds the service's URL beside its password, and sends the password there
        with open(f"{workdir}/.jobrunner/api-url") as served:
            assert served.read() == f"http://127.0.0.1:{port}"
        listing = run_cli("types", "list", "--url", f"http://127.0.0.1:{port}", cwd=workdir)
        assert listing.returncode == 0, listing.stderr
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        assert not os.path.exists(f"{workdir}/.jobrunner/api-url")
        assert not os.path.exists(f"{workdir}/.jobrunner/postgres/postmaster.pid"), "the private database was left running"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)
        subprocess.run([sys.executable, "-c", "import sys; from jobrunner.localdb import LocalPostgres; LocalPostgres(sys.argv[1]).stop_leftover()",
                        f"{workdir}/.jobrunner/postgres"], timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)

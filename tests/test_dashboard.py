"""The dashboard in a real browser: headless Chromium, against the real server and a real database.

The browser logs in the way a person's does, with HTTP Basic credentials it then
reuses for the page's own fetch() calls (here given in the URL, as a person types
them into the browser's prompt). Should a Chromium ever refuse credentials in
URLs, an Authorization header set through the DevTools protocol works as well:
browser.cdp("Network.enable"), then browser.cdp("Network.setExtraHTTPHeaders", ...).
"""

import contextlib
import os
import subprocess
import sys
import threading
import urllib.parse
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import API_PASSWORD, API_USER, running_server, utcnow, wait_until
from webdriver import Browser, find_chromedriver, find_chromium

from jobrunner import services

ROOT = Path(__file__).resolve().parent.parent

MISSING = [name for name, path in (("chromium", find_chromium()), ("chromedriver", find_chromedriver())) if not path]
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"{' and '.join(MISSING)} not installed (scripts/ensure-chromium installs them; in CI this fails)", allow_module_level=True)

EMAIL = {"name": "email", "delivery_strategy": "at_least_once", "attempts": 3, "concurrency": 5}
HOSTILE = {"to": "a@example.com", "note": "<script>alert('x')</script> & <b>bold</b>"}


@pytest.fixture(scope="module")
def browser():
    with Browser() as started:
        yield started


def open_dashboard(browser: Browser, port: int) -> None:
    browser.get(f"http://{API_USER}:{urllib.parse.quote(API_PASSWORD, safe='')}@127.0.0.1:{port}/")
    wait_until(lambda: browser.execute("return document.readyState") == "complete", "the page to load")


def fail_a_job(api, conn, data) -> str:
    """Enqueue a job, claim it as a worker would, and call back `failed`, not retryable: it is archived as failed."""
    job_id = api.put("/v1/jobs/email/random_id", {"data": data}).json["id"]
    [claimed] = services.claim(conn, "email", 1).jobs
    assert claimed.job_id == job_id
    answer = api.post(f"/v1/jobs/email/{job_id}", {"status": "failed", "attempt": claimed.attempts, "retryable": False})
    assert answer.json["status"] == "failed"
    return job_id


def queued_jobs(api, name="email") -> list[dict]:
    return api.get(f"/v1/jobs/{name}/jobs?status=queued").json["jobs"]


def concurrency(api, name="email") -> int:
    return api.get(f"/v1/jobs/{name}").json["concurrency"]


def test_the_dashboard_shows_jobs_and_acts_on_them(api, conn, browser):
    api.post("/v1/jobs", EMAIL)
    api.post("/v1/jobs", {**EMAIL, "name": "sms", "concurrency": 0})  # stopped by hand: a resume asks for a concurrency
    failed_id = fail_a_job(api, conn, HOSTILE)
    later = {"data": {"to": "later@example.com"}, "run_after": (utcnow() + timedelta(hours=1)).isoformat()}
    later_id = api.put("/v1/jobs/email/random_id", later).json["id"]

    open_dashboard(browser, api.port)
    assert "email" in browser.text('#types tr[data-type="email"]')
    failure = browser.text(f'#failures tr[data-job="{failed_id}"]')
    assert "failed" in failure and HOSTILE["note"] in failure  # job data shown as text, not markup
    assert browser.alert_text() is None
    assert "later@example.com" in browser.text(f'#waiting tr[data-job="{later_id}"]')

    replay = f'#failures tr[data-job="{failed_id}"] button[data-action="replay"]'
    new_id = browser.find_all(replay)[0].get_attribute("data-new-id")
    browser.click(replay)
    wait_until(lambda: any(job["data"] == HOSTILE for job in queued_jobs(api)), "the replayed job to be queued")
    [replayed] = [job for job in queued_jobs(api) if job["data"] == HOSTILE]
    assert replayed["id"] == new_id  # the page names the new job, so a second click finds this one
    wait_until(lambda: browser.text("#status") == f"Replayed {failed_id} as {replayed['id']}", "the replay's result")
    wait_until(lambda: browser.find_all(f'#waiting tr[data-job="{replayed["id"]}"]'), "the replayed job on the page")

    browser.click(f'#waiting tr[data-job="{later_id}"] button[data-action="cancel"]')
    wait_until(browser.alert_text, "the confirmation")
    browser.accept_alert()
    wait_until(lambda: api.get(f"/v1/jobs/{later_id}").json["status"] == "cancelled", "the job to be cancelled")

    browser.click('#types tr[data-type="email"] button[data-action="pause"]')
    wait_until(lambda: concurrency(api) == 0, "email to be paused")
    browser.click('#types tr[data-type="email"] button[data-action="resume"]')
    wait_until(lambda: concurrency(api) == EMAIL["concurrency"], "email to be resumed at its old concurrency")

    browser.click('#types tr[data-type="sms"] button[data-action="resume"]')
    assert "concurrency" in wait_until(browser.alert_text, "the prompt for a concurrency")
    browser.answer_prompt("3")
    wait_until(lambda: concurrency(api, "sms") == 3, "sms to be resumed at the concurrency typed in")


def test_an_action_that_fails_shows_the_errors_title(api, browser):
    api.post("/v1/jobs", EMAIL)
    job_id = api.put("/v1/jobs/email/random_id", {"data": {"n": 1}, "run_after": (utcnow() + timedelta(hours=1)).isoformat()}).json["id"]
    open_dashboard(browser, api.port)
    browser.execute("getSelection().selectAllChildren(document.querySelector('h1'))")  # holds the periodic refresh off
    api.post(f"/v1/jobs/email/{job_id}/cancel")  # the page still offers to cancel it

    browser.click(f'#waiting tr[data-job="{job_id}"] button[data-action="cancel"]')
    wait_until(browser.alert_text, "the confirmation")
    browser.accept_alert()

    expected = f"Cancel failed: Job {job_id} is already archived as cancelled"
    wait_until(lambda: browser.text("#status") == expected, f"the status line to say {expected!r}")
    wait_until(lambda: not browser.find_all(f'#waiting tr[data-job="{job_id}"]'), "the refresh after the action")


def test_the_page_refreshes_itself(api, browser):
    api.post("/v1/jobs", EMAIL)
    open_dashboard(browser, api.port)
    job_id = api.put("/v1/jobs/email/random_id", {"data": {"n": 2}}).json["id"]
    wait_until(lambda: browser.find_all(f'#waiting tr[data-job="{job_id}"]'), "the new job to appear", timeout=8)
    assert browser.execute("return document.querySelectorAll('main').length") == 1


def test_the_page_obeys_its_content_security_policy(api, browser):
    browser.console()  # what earlier tests left
    open_dashboard(browser, api.port)
    assert browser.execute("return getComputedStyle(document.body).backgroundColor") == "rgb(244, 245, 247)"  # its style applies
    assert not [message for message in browser.console() if "Content Security Policy" in message]

    browser.execute(
        "document.body.insertAdjacentHTML('beforeend', '<p id=injected style=\"color: rgb(255, 0, 0)\">x</p>');"
        "const frame = document.createElement('iframe'); frame.src = 'http://localhost:9/'; document.body.append(frame);"
    )
    assert browser.execute("return getComputedStyle(document.getElementById('injected')).color") != "rgb(255, 0, 0)"
    seen: list[str] = []  # the browser reports each violation when it happens, the frame's a moment later

    def both_refused() -> bool:
        seen.extend(browser.console())
        refused = " ".join(seen)
        return "style-src" in refused and "frame-src 'none'" in refused

    wait_until(both_refused, "the style and the frame to be refused")


def test_the_homepage_iframe_url_is_embedded(db_url, browser):
    """Rickover's HOMEPAGE_IFRAME_URL, from another origin (localhost is not 127.0.0.1): the page's policy admits it."""
    with embedded_page(b"<!doctype html><p id=hello>all systems go</p>") as url, running_server(db_url, homepage_iframe_url=url) as api:
        browser.console()
        open_dashboard(browser, api.port)
        browser.switch_to_frame(".embedded iframe")
        try:
            assert browser.text("#hello") == "all systems go"
        finally:
            browser.switch_to_frame(None)
        assert not [message for message in browser.console() if "Content Security Policy" in message]


@contextlib.contextmanager
def embedded_page(body: bytes):
    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/status"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_screenshot_script_runs(tmp_path):
    """scripts/dashboard-screenshot end to end (its own database, service and traffic), with a short run."""
    output = tmp_path / "dashboard.png"
    script = ROOT / "scripts" / "dashboard-screenshot"
    answer = subprocess.run([sys.executable, str(script), "--seconds", "2", "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    png = output.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1280, 900)


def test_the_schedules_panel_shows_next_runs_and_last_jobs_and_pauses_and_resumes(api, browser):
    api.post("/v1/jobs", {**EMAIL, "concurrency": 0})
    schedule = {"name": "nightly", "job_type": "email", "cron": "30 2 * * *", "time_zone": "Europe/Berlin", "data": {"n": 1}}
    assert api.post("/v1/schedules", schedule).status == 201
    job = api.post("/v1/schedules/nightly/run").json
    open_dashboard(browser, api.port)
    row = browser.text('#schedules tr[data-schedule="nightly"]')
    assert "30 2 * * * (Europe/Berlin)" in row
    assert "02:30:00 CET" in row or "02:30:00 CEST" in row  # in its zone
    assert "UTC" in row and job["id"] in row and "queued" in row
    browser.click('#schedules tr[data-schedule="nightly"] button[data-action="pause-schedule"]')
    wait_until(lambda: api.get("/v1/schedules/nightly").json["paused"], "the schedule to be paused")
    wait_until(lambda: browser.text("#status") == "Paused schedule nightly", "the pause's result")
    wait_until(lambda: browser.find_all('#schedules tr[data-schedule="nightly"] button[data-action="resume-schedule"]'), "the resume button")
    browser.click('#schedules tr[data-schedule="nightly"] button[data-action="resume-schedule"]')
    wait_until(lambda: not api.get("/v1/schedules/nightly").json["paused"], "the schedule to be resumed")

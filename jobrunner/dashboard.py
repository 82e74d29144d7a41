"""The dashboard at `/`: job types, schedules, throughput, recent failures and waiting jobs, with their actions.

One HTML page rendered from an `Overview`, with a small inline style sheet and
script and nothing else to fetch: no build step, no CDN, it works offline. The
script fetches `/` again every few seconds and swaps in the new <main>, and sends
the actions (replay, cancel, pause, resume a type or a schedule) to the API with the credentials the
browser already holds; the server's origin check admits them because they come
from this page.

Everything shown is escaped: job data is whatever JSON the API's clients sent.
The Content-Security-Policy is constant (HEADERS): the script and the style sheet
are allowed by their hashes, fetch() only to this origin, nothing else. The one
per-page part, which site the embedded HOMEPAGE_IFRAME_URL may come from, is a
<meta> policy of the page, which narrows the header's (a browser obeys both).
"""

import hashlib
import html
import json
import urllib.parse
from base64 import b64encode
from datetime import datetime, timedelta, timezone

from . import timetable
from .errors import InvalidField
from .models import EXPIRED, FAILED, SUCCEEDED, ArchivedJob, QueuedJob, Schedule, TypePolicy, format_job_id, new_job_id
from .policies import describe, policy_json
from .services import Overview
from .store import JobTypeCounts, JobTypeError

REFRESH_SECONDS = 5
CHART_MINUTES = 60
DATA_PREVIEW_CHARS = 500  # of a job's pretty-printed data; the rest is counted, not shown
DATA_PREVIEW_LINES = 14
STATUS_COLUMNS = (SUCCEEDED, FAILED, EXPIRED)

STYLE = """
:root{--fg:#1f2630;--muted:#6b7585;--faint:#b5bcc7;--line:#e4e7ec;--bg:#f4f5f7;--ok:#2f9461;--bad:#d2453d;--warn:#b7791f;--accent:#2c5fcc}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;align-items:baseline;gap:1rem;padding:.75rem 1.5rem;background:#fff;border-bottom:1px solid var(--line)}
h1{font-size:1.2rem;margin:0}
#status{margin:0 0 0 auto;color:var(--muted);text-align:right;font-weight:600}
#status.ok{color:var(--ok)}
#status.error{color:var(--bad)}
main,.embedded{display:grid;gap:1rem;padding:1rem 1.5rem}
.embedded{padding-top:0}
section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:.75rem 1rem;overflow-x:auto}
h2{font-size:1rem;margin:0 0 .5rem}
h2 small,.muted,.when small{font-weight:normal;color:var(--muted)}
#updated{margin:0;color:var(--muted);font-size:.85rem;white-space:nowrap}
table{border-collapse:collapse;width:100%}
th,td{padding:.35rem .6rem;text-align:left;border-bottom:1px solid var(--line);vertical-align:top}
tr:last-child td{border-bottom:0}
th{font-weight:600;color:var(--muted);font-size:.78rem;white-space:nowrap}
th.group{text-align:center;border-bottom:1px solid var(--faint)}
.n{text-align:right;font-variant-numeric:tabular-nums}
.zero{color:var(--faint)}
.bad{color:var(--bad);font-weight:600}
.warn{color:var(--warn);font-weight:600}
.name{font-weight:600}
.sub{display:block;font-size:.78rem;color:var(--muted);font-weight:normal}
.when{white-space:nowrap}
.when small{display:block;font-size:.75rem}
.badge{display:inline-block;padding:0 .5rem;border-radius:999px;font-size:.75rem;font-weight:600;white-space:nowrap}
.badge.failed{background:#fde7e5;color:#b4271f}
.badge.expired{background:#fdf1d8;color:#8a5a0b}
.badge.paused,.badge.stopped{background:#e8edf7;color:#33518f}
.badge.due{background:#e4f4ea;color:#22683f}
.badge.scheduled,.badge.queued,.badge.cancelled{background:#eef0f3;color:var(--muted)}
.badge.succeeded{background:#e4f4ea;color:#22683f}
.badge.in-progress{background:#e8edf7;color:#33518f}
.badge.backoff{background:#fdf1d8;color:#8a5a0b}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
code{white-space:nowrap}
pre{margin:0;white-space:pre-wrap;word-break:break-word;max-width:40rem;background:var(--bg);padding:.3rem .5rem;border-radius:4px}
pre .more{color:var(--muted)}
button{font:inherit;font-size:.82rem;padding:.15rem .7rem;border:1px solid #c6ccd5;border-radius:4px;background:#fff;color:var(--fg);cursor:pointer}
button:hover{border-color:var(--accent);color:var(--accent)}
button.danger:hover{border-color:var(--bad);color:var(--bad)}
button:disabled{opacity:.5;cursor:progress}
.empty{color:var(--muted);margin:.25rem 0}
.legend{display:flex;gap:1.25rem;align-items:center;font-size:.85rem;color:var(--muted);margin-bottom:.25rem}
.legend i{display:inline-block;width:.7rem;height:.7rem;border-radius:2px;margin-right:.35rem;vertical-align:-1px}
.legend .ok,.chart .ok{background:var(--ok);fill:var(--ok)}
.legend .bad,.chart .bad{background:var(--bad);fill:var(--bad)}
.chart{display:block;width:100%;height:auto}
.chart text{fill:var(--muted);font-size:11px}
.chart .grid{stroke:var(--line)}
.chart .axis{stroke:var(--faint)}
.chart .hit{fill:transparent}
.chart .hit:hover{fill:rgba(40,60,90,.07)}
iframe{width:100%;height:480px;border:1px solid var(--line);border-radius:6px;background:#fff}
"""

SCRIPT = """
"use strict";
const REFRESH_MS = %d;
const status = document.getElementById("status");
let timer = null, generation = 0, refreshFailed = false;

function say(text, kind) {
  status.textContent = text;
  status.className = kind;
}

async function problem(response) {
  try {
    const body = await response.json();
    if (body && body.title) return body.title;
  } catch (error) {}
  return response.status + " " + response.statusText;
}

async function refresh(forced) {
  clearTimeout(timer);
  timer = setTimeout(refresh, REFRESH_MS, false);
  // not while hidden, nor under a reader selecting text to copy; an action's result is shown at once
  if (!forced && (document.hidden || !document.getSelection().isCollapsed)) return;
  const mine = ++generation;
  try {
    const response = await fetch(location.origin + "/", {cache: "no-store"});
    if (!response.ok) throw new Error(await problem(response));
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.getElementById("overview");
    if (!fresh) throw new Error("the answer is not the dashboard");
    if (mine !== generation) return;
    document.getElementById("overview").replaceWith(document.adoptNode(fresh));
    document.getElementById("updated").textContent = fresh.dataset.updated;
    if (refreshFailed) say("", "");
    refreshFailed = false;
  } catch (error) {
    if (mine !== generation) return;
    refreshFailed = true;
    say("Refresh failed: " + error.message + " (the figures below are older)", "error");
  }
}

function done(action, button, job) {
  if (action === "pause-schedule") return "Paused schedule " + job.name;
  if (action === "resume-schedule") return "Resumed schedule " + job.name + ": next run " + job.next_tick;
  if (action === "replay") return "Replayed " + button.dataset.id + " as " + job.id;
  if (action === "cancel") return "Cancelled " + button.dataset.id;
  if (action === "pause") return "Paused " + job.name;
  return "Resumed " + job.name + " at concurrency " + job.concurrency;
}

function askConcurrency(button) {
  if (button.dataset.concurrency) return null;
  const answer = prompt("Resume " + button.dataset.name + " with what concurrency?", "1");
  if (answer === null) return undefined;
  const concurrency = Number(answer.trim());
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    say("Not a concurrency: " + answer, "error");
    return undefined;
  }
  return JSON.stringify({concurrency: concurrency});
}

async function act(button) {
  const {action, name, id} = button.dataset;
  // a replay names its new job, so a second click (or a retry) finds the first one instead of making another
  const body = action === "resume" ? askConcurrency(button) : action === "replay" ? JSON.stringify({id: button.dataset.newId}) : null;
  if (body === undefined) return;
  if (action === "cancel" && !confirm("Cancel " + id + "? It will never be sent.")) return;
  const path = action.endsWith("-schedule")
    ? "/v1/schedules/" + encodeURIComponent(name) + "/" + action.split("-")[0]
    : "/v1/jobs/" + encodeURIComponent(name) + (id ? "/" + encodeURIComponent(id) : "") + "/" + action;
  button.disabled = true;
  try {
    const headers = body ? {"Content-Type": "application/json"} : {};
    const response = await fetch(location.origin + path, {method: "POST", headers: headers, body: body});
    if (!response.ok) throw new Error(await problem(response));
    say(done(action, button, await response.json()), "ok");
  } catch (error) {
    say(button.textContent + " failed: " + error.message, "error");
  }
  refreshFailed = false;
  refresh(true);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button) act(button);
});
timer = setTimeout(refresh, REFRESH_MS, false);
""" % (REFRESH_SECONDS * 1000)


def _source_hash(text: str) -> str:
    return "'sha256-" + b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    f"script-src {_source_hash(SCRIPT)}",
    f"style-src {_source_hash(STYLE)}",
    "connect-src 'self'",  # the refresh and the actions
    "frame-src http: https:",  # narrowed by each page's <meta> policy to HOMEPAGE_IFRAME_URL's site, or to none
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))

HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def render(overview: Overview, title: str, iframe_url: str = "") -> bytes:
    """The whole page; `iframe_url` (Rickover's HOMEPAGE_IFRAME_URL), when set, is embedded below the dashboard."""
    frame_source = _frame_source(iframe_url)
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="frame-src {_escape(frame_source or "'none'")}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>{_escape(title)}</h1><p id="status" role="status" aria-live="polite"></p><p id="updated">{_updated(overview.now)}</p></header>
{_main(overview)}
{_embedded(iframe_url, frame_source)}
<script>{SCRIPT}</script>
</body>
</html>
"""
    return page.encode()


def _main(overview: Overview) -> str:
    """The part the page's script swaps on each refresh."""
    now = overview.now
    return f"""<main id="overview" data-updated="{_updated(now)}">
{_types_section(overview)}
{_schedules_section(overview)}
{_chart_section(overview)}
{_failures_section(overview.recent_failures, now)}
{_waiting_section(overview)}
</main>"""


# --- job types -----------------------------------------------------------------


def _types_section(overview: Overview) -> str:
    if not overview.types:
        return '<section id="types"><h2>Job types</h2><p class="empty">No job types yet: create one with POST /v1/jobs.</p></section>'
    rows = "\n".join(_type_row(counts, overview) for counts in overview.types)
    finished = "".join(f'<th class="n">{status}</th>' for status in STATUS_COLUMNS) * 2
    return f"""<section id="types"><h2>Job types</h2>
<table>
<thead>
<tr><th rowspan="2">Type</th><th rowspan="2" class="n">Concurrency</th><th rowspan="2" class="n">Queued</th><th rowspan="2" class="n">Due</th>
<th rowspan="2" class="n">In progress</th><th colspan="3" class="group">Last hour</th><th colspan="3" class="group">Last day</th><th rowspan="2"></th></tr>
<tr>{finished}</tr>
</thead>
<tbody>
{rows}
</tbody>
</table></section>"""


def _type_row(counts: JobTypeCounts, overview: Overview) -> str:
    job_type = counts.job_type
    name = job_type.name
    strategy = job_type.delivery_strategy.replace("_", " ")
    hour = [overview.archived.get((name, status), (0, 0))[0] for status in STATUS_COLUMNS]
    day = [overview.archived.get((name, status), (0, 0))[1] for status in STATUS_COLUMNS]
    finished = "".join(_count_cell(count, status) for count, status in zip(hour + day, STATUS_COLUMNS * 2))
    return (
        f'<tr data-type="{_escape(name)}"><td><span class="name">{_escape(name)}</span>'
        f'<span class="sub">{_escape(strategy)}, {job_type.attempts} attempt{"s" if job_type.attempts != 1 else ""}</span>'
        f"{_policy(job_type.policy)}{_rate_limited(name in overview.rate_limited)}{_backing_off(overview.backing_off.get(name, 0))}"
        f"{_type_error(overview.type_errors.get(name), overview.now)}</td>"
        f'<td class="n">{_concurrency(job_type.concurrency, overview.paused.get(name))}</td>'
        f"{_count_cell(counts.queued)}{_count_cell(counts.due)}{_count_cell(counts.in_progress)}{finished}"
        f"<td>{_pause_button(name, job_type.concurrency, overview.paused.get(name))}</td></tr>"
    )


def _policy(policy: TypePolicy) -> str:
    """The type's delivery settings in a line (nothing for a type that sets none); secrets only as set or not."""
    parts = describe(policy_json(policy))
    return f'<span class="sub policy">{_escape(", ".join(parts))}</span>' if parts else ""


def _rate_limited(limited: bool) -> str:
    if not limited:
        return ""
    return '<span class="badge backoff" title="due jobs wait for the rate limit\'s next token">rate limited</span>'


def _backing_off(jobs: int) -> str:
    if not jobs:
        return ""
    return f'<span class="badge backoff" title="queued again after a failed attempt, waiting out the retry back-off">{jobs:,} backing off</span>'


def _type_error(error: JobTypeError | None, now: datetime) -> str:
    """A type whose claims fail right now (the other types go on): since when, how often, why."""
    if error is None:
        return ""
    tries = f"{error.failures:,} failed tr{'y' if error.failures == 1 else 'ies'}"
    return (
        f'<span class="badge failed">{_escape(error.stage)} failing</span>'
        f'<span class="sub type-error">{tries} since {_when(error.since, now)}: {_escape(error.message)}</span>'
    )


def _concurrency(concurrency: int, resumes_at: int | None) -> str:
    if resumes_at is not None:
        return f'<span class="badge paused">paused</span><span class="sub">resumes at {resumes_at}</span>'
    if concurrency == 0:
        return '<span class="badge stopped">0</span><span class="sub">set by hand</span>'
    return f"{concurrency:,}"


def _pause_button(name: str, concurrency: int, resumes_at: int | None) -> str:
    if concurrency > 0:
        return f'<button data-action="pause" data-name="{_escape(name)}">Pause</button>'
    remembered = "" if resumes_at is None else str(resumes_at)  # none: the page asks for one
    return f'<button data-action="resume" data-name="{_escape(name)}" data-concurrency="{remembered}">Resume</button>'


def _count_cell(count: int, status: str = "") -> str:
    if count == 0:
        return '<td class="n zero">0</td>'
    emphasis = {FAILED: " bad", EXPIRED: " warn"}.get(status, "")
    return f'<td class="n{emphasis}">{count:,}</td>'


# --- schedules -----------------------------------------------------------------


def _schedules_section(overview: Overview) -> str:
    heading = "<h2>Schedules <small>next run in the schedule's zone and in UTC</small></h2>"
    if not overview.schedules:
        return f'<section id="schedules">{heading}<p class="empty">No schedules: create one with POST /v1/schedules.</p></section>'
    rows = "\n".join(_schedule_row(schedule, status, overview.now) for schedule, status in overview.schedules)
    return f"""<section id="schedules">{heading}
<table>
<thead><tr><th>Schedule</th><th>When</th><th>Next run</th><th>Last job</th><th></th></tr></thead>
<tbody>
{rows}
</tbody>
</table></section>"""


def _schedule_row(schedule: Schedule, last_status: str | None, now: datetime) -> str:
    name = _escape(schedule.name)
    when = f"{schedule.cron} ({schedule.time_zone or 'UTC'})" if schedule.cron else f"every {schedule.interval_seconds:,} s"
    owner = ", config file" if schedule.config_owned else ""
    state = ""
    if schedule.paused:
        state = '<span class="badge paused">paused</span>'
    if schedule.error is not None:
        state += (
            f'<span class="badge failed">failing</span><span class="sub schedule-error">{schedule.failures:,} failed '
            f'tr{"y" if schedule.failures == 1 else "ies"}: {_escape(schedule.error)}</span>'
        )
    action = "resume-schedule" if schedule.paused else "pause-schedule"
    return (
        f'<tr data-schedule="{name}"><td><span class="name">{name}</span>'
        f'<span class="sub">{_escape(schedule.job_type)}, misfire {_escape(schedule.misfire)}{owner}</span>{state}</td>'
        f"<td><code>{_escape(when)}</code></td>"
        f"<td>{_next_run(schedule, now)}</td>"
        f"<td>{_last_job(schedule, last_status)}</td>"
        f'<td><button data-action="{action}" data-name="{name}">{"Resume" if schedule.paused else "Pause"}</button></td></tr>'
    )


def _next_run(schedule: Schedule, now: datetime) -> str:
    if schedule.paused:
        return '<span class="muted">paused</span>'
    local = ""
    if schedule.cron:
        try:
            moment = schedule.next_tick.astimezone(timetable.zone_of(schedule.time_zone))
            local = f'<span class="sub">{_escape(f"{moment:%Y-%m-%d %H:%M:%S %Z}")}</span>'
        except InvalidField:
            local = '<span class="sub">(zone unknown here)</span>'
    return f'<span class="when">{_relative(schedule.next_tick, now)}{local}<small>{_escape(_utc(schedule.next_tick))}</small></span>'


def _last_job(schedule: Schedule, status: str | None) -> str:
    if schedule.last_job_id is None:
        return '<span class="muted">none yet</span>'
    badge = f'<span class="badge {_escape(status)}">{_escape(status)}</span>' if status else '<span class="muted">no longer kept</span>'
    return f'{badge}<code class="sub">{_escape(format_job_id(schedule.last_job_id))}</code>'


# --- the chart -----------------------------------------------------------------

WIDTH, HEIGHT = 960, 170
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 24


def _chart_section(overview: Overview) -> str:
    minutes = _minutes(overview)
    succeeded = sum(ok for _, ok, _ in minutes)
    failed = sum(bad for _, _, bad in minutes)
    summary = f"{succeeded:,} succeeded, {failed:,} failed or expired in the last {CHART_MINUTES} minutes"
    return f"""<section id="throughput"><h2>Throughput <small>jobs finished per minute, all types</small></h2>
<div class="legend"><span><i class="ok"></i>succeeded</span><span><i class="bad"></i>failed or expired</span><span>{summary}</span></div>
{_chart(minutes)}
</section>"""


def _minutes(overview: Overview) -> list[tuple[datetime, int, int]]:
    """(minute, succeeded, failed or expired) for each of the last CHART_MINUTES minutes, oldest first."""
    counts: dict[tuple[datetime, bool], int] = {}
    for minute, status, count in overview.per_minute:
        if status in STATUS_COLUMNS:
            key = (_minute_of(minute), status == SUCCEEDED)
            counts[key] = counts.get(key, 0) + count
    last = _minute_of(overview.now)
    minutes = [last - timedelta(minutes=back) for back in range(CHART_MINUTES - 1, -1, -1)]
    return [(minute, counts.get((minute, True), 0), counts.get((minute, False), 0)) for minute in minutes]


def _minute_of(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(second=0, microsecond=0)


def _chart(minutes: list[tuple[datetime, int, int]]) -> str:
    top = _nice_ceiling(max(ok + bad for _, ok, bad in minutes))
    plot_height = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / len(minutes)
    parts = []
    for fraction in (0, 0.5, 1):
        y = TOP + plot_height * (1 - fraction)
        value = top * fraction
        label = f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
        parts.append(f'<line class="{"axis" if fraction == 0 else "grid"}" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for index, (minute, ok, bad) in enumerate(minutes):
        x = LEFT + index * slot
        if minute.minute % 10 == 0:
            parts.append(f'<text x="{x + slot / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">{minute:%H:%M}</text>')
        parts.append(_bar(x, slot, minute, ok, bad, plot_height / top))
    label = "Jobs finished per minute over the last hour: succeeded, and failed or expired"
    return f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label}">{"".join(parts)}</svg>'


def _bar(x: float, slot: float, minute: datetime, ok: int, bad: int, scale: float) -> str:
    """One minute: succeeded at the bottom, failed or expired on top, and a hover area with the figures."""
    base = HEIGHT - BOTTOM
    width, left = slot * 0.7, x + slot * 0.15
    shapes = []
    for count, kind, bottom in ((ok, "ok", base), (bad, "bad", base - ok * scale)):
        if count:
            height = max(count * scale, 1.0)
            shapes.append(f'<rect class="{kind}" x="{left:.1f}" y="{bottom - height:.1f}" width="{width:.1f}" height="{height:.1f}"/>')
    tip = f"{minute:%H:%M} UTC: {ok:,} succeeded, {bad:,} failed or expired"
    hit = f'<rect class="hit" x="{x:.1f}" y="{TOP}" width="{slot:.1f}" height="{base - TOP}"/>'
    return f"<g><title>{tip}</title>{''.join(shapes)}{hit}</g>"


def _nice_ceiling(value: int) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value` (at least 1)."""
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


# --- jobs ----------------------------------------------------------------------


def _failures_section(jobs: list[ArchivedJob], now: datetime) -> str:
    heading = '<h2>Recent failures <small>failed and expired jobs of the last day, newest first</small></h2>'
    if not jobs:
        return f'<section id="failures">{heading}<p class="empty">No job failed or expired in the last day.</p></section>'
    rows = "\n".join(
        f'<tr data-job="{_escape(job.job_id)}"><td>{_when(job.created_at, now)}</td><td>{_job(job)}</td>'
        f'<td><span class="badge {_escape(job.status)}">{_escape(job.status)}</span></td>'
        f'<td>{_data(job.data)}</td>'
        f'<td><button data-action="replay" data-name="{_escape(job.name)}" data-id="{_escape(job.job_id)}"'
        f' data-new-id="{format_job_id(new_job_id())}">Replay</button></td></tr>'
        for job in jobs
    )
    return f"""<section id="failures">{heading}
<table>
<thead><tr><th>Archived</th><th>Job</th><th>Status</th><th>Data</th><th></th></tr></thead>
<tbody>
{rows}
</tbody>
</table></section>"""


def _waiting_section(overview: Overview) -> str:
    jobs, now = overview.waiting, overview.now
    total = sum(counts.queued for counts in overview.types)
    shown = f"{len(jobs):,} of {total:,}, soonest first" if total > len(jobs) else "soonest first"
    heading = f"<h2>Waiting <small>queued jobs not yet sent, {shown}</small></h2>"
    if not jobs:
        return f'<section id="waiting">{heading}<p class="empty">No job is waiting.</p></section>'
    stopped = {counts.job_type.name for counts in overview.types if counts.job_type.concurrency == 0}
    rows = "\n".join(
        f'<tr data-job="{_escape(job.job_id)}"><td>{_when(job.run_after, now)}</td><td>{_waiting_state(job, now, stopped)}</td>'
        f'<td>{_job(job)}</td>'
        f'<td class="n">{job.attempts}</td><td>{_expires(job, now)}</td>'
        f"<td>{_data(job.data)}</td>"
        f'<td><button class="danger" data-action="cancel" data-name="{_escape(job.name)}" data-id="{_escape(job.job_id)}">Cancel</button></td></tr>'
        for job in jobs
    )
    return f"""<section id="waiting">{heading}
<table>
<thead><tr><th>Run after</th><th></th><th>Job</th><th class="n">Attempts left</th><th>Expires</th><th>Data</th><th></th></tr></thead>
<tbody>
{rows}
</tbody>
</table></section>"""


def _waiting_state(job: QueuedJob, now: datetime, stopped: set[str]) -> str:
    if job.run_after > now:
        return '<span class="badge scheduled">scheduled</span>'
    if job.name in stopped:
        return '<span class="badge paused">type paused</span>'
    return '<span class="badge due">due</span>'


def _job(job: QueuedJob | ArchivedJob) -> str:
    return f'<span class="name">{_escape(job.name)}</span><code class="sub">{_escape(job.job_id)}</code>'


def _expires(job: QueuedJob, now: datetime) -> str:
    return _when(job.expires_at, now) if job.expires_at else '<span class="muted">never</span>'


def _data(data) -> str:
    """A job's data, pretty-printed and cut to a preview."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    lines = text.splitlines()
    preview = "\n".join(lines[:DATA_PREVIEW_LINES])[:DATA_PREVIEW_CHARS]
    more = len(text) - len(preview)
    tail = f'\n<span class="more">… {more:,} more characters</span>' if more > 0 else ""
    return f"<pre>{_escape(preview)}{tail}</pre>"


# --- times and text ------------------------------------------------------------


def _updated(now: datetime) -> str:
    return _escape(f"Updated {_utc(now)} (the database's clock), every {REFRESH_SECONDS} s")


def _when(moment: datetime, now: datetime) -> str:
    return f'<span class="when">{_relative(moment, now)}<small>{_escape(_utc(moment))}</small></span>'


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def _relative(moment: datetime, now: datetime) -> str:
    """"3 min ago", "in 2 h"; "now" within a few seconds."""
    seconds = (moment - now).total_seconds()
    size = abs(seconds)
    if size < 5:
        return "now"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if size >= length:
            amount = f"{int(size // length)} {unit}"
            break
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


def _frame_source(url: str) -> str | None:
    """The CSP source that admits `url` in a frame: its scheme and host; None when it cannot be embedded."""
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme and not parts.netloc and url.startswith("/"):
        return "'self'"  # a page of this server
    if parts.scheme not in ("http", "https"):
        return None
    try:
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return None
    if not host:
        return None
    if not all(c.isascii() and (c.isalnum() or c in ".-") for c in host):
        return f"{parts.scheme}:"  # an IPv6 address: a CSP source cannot name it, so admit the scheme
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def _embedded(url: str, source: str | None) -> str:
    if not url.strip():
        return ""
    if source is None:
        return '<div class="embedded"><p class="muted">HOMEPAGE_IFRAME_URL is not an http(s) URL or a path, so it is not shown.</p></div>'
    return f'<div class="embedded"><iframe src="{_escape(url.strip())}" title="Embedded page" referrerpolicy="no-referrer"></iframe></div>'


def _escape(text: str) -> str:
    return html.escape(text, quote=True)

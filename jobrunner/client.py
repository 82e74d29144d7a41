"""A Python client for jobrunner's HTTP API: stdlib only, one import.

    from jobrunner.client import Client

    jobs = Client("http://127.0.0.1:9090", "admin", "secret")
    jobs.create_type("email", "at_least_once", attempts=3, concurrency=5)
    jobs.update_type("email", job_timeout=1800, rate_limit={"per_second": 10})
    job = jobs.enqueue("email", {"to": "someone@example.com"})
    jobs.get(job["id"])["status"]              # "queued", later "succeeded"
    jobs.replay(job["id"])                     # a new job with the same data
    jobs.create_schedule("nightly", "email", {"report": "daily"}, cron="0 2 * * *", time_zone="Europe/Berlin")
    for job in jobs.jobs("email", status="failed"):
        print(job["id"])

A downstream checks that a job's POST came from jobrunner with `verify_webhook`
(Standard Webhooks signatures, see `jobrunner.signing` and docs/client.md).

Requests that are safe to repeat are retried on network errors and 503s, with
a short back-off: reads, and enqueues. An enqueue carries its id (the client
makes one), so sending it again cannot enqueue twice. Every other error is an
`ApiError` with the server's status, error id and message.
"""

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from .signing import WebhookVerificationError
from .signing import verify as verify_webhook

__all__ = ["ApiError", "Client", "Unreachable", "WebhookVerificationError", "verify_webhook"]

RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds before each retry of a request that is safe to repeat
# A job type's delivery settings (docs/api.md, "Job-type settings"): keyword arguments of create_type and update_type.
TYPE_SETTINGS = ("downstream_url", "downstream_timeout", "job_timeout", "retry", "rate_limit", "callback_token", "signing_secrets")


class ApiError(Exception):
    """The API refused a request: `status` (HTTP), `id` (e.g. "job_type_not_found"), `title`, `detail`."""

    def __init__(self, status: int, body: dict, retried: bool = False):
        self.status = status
        self.retried = retried  # the request had been sent before: its first answer was lost
        self.id = body.get("id", "")
        self.title = body.get("title", "")
        self.detail = body.get("detail", "")
        super().__init__(f"{status} {self.id}: {self.title}" + (f" ({self.detail})" if self.detail else ""))


class Unreachable(Exception):
    """The API could not be reached (or kept answering 503) after every retry."""


class Client:
    def __init__(self, url: str = "http://127.0.0.1:9090", user: str = "", password: str = "", timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json", "Accept": "application/json"}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- job types ---

    def types(self) -> list[dict]:
        return self._request("GET", "/v1/jobs", retry=True)["job_types"]

    def type(self, name: str) -> dict:
        return self._request("GET", f"/v1/jobs/{_quote(name)}", retry=True)

    def create_type(self, name: str, delivery_strategy: str, attempts: int, concurrency: int, **settings: Any) -> dict:
        """A new job type; `settings` are its delivery settings, e.g. `job_timeout=1800, rate_limit={"per_second": 5}`."""
        body = {"name": name, "delivery_strategy": delivery_strategy, "attempts": attempts, "concurrency": concurrency}
        return self._request("POST", "/v1/jobs", {**body, **_settings("create_type", settings)})

    def update_type(self, name: str, attempts: int | None = None, concurrency: int | None = None, **settings: Any) -> dict:
        """Change what is given: a setting given as None is cleared (back to the default), one not given is left as it is;
        `retry` and `rate_limit` change key by key the same way (`retry={"max_doublings": None}`)."""
        body = {key: value for key, value in (("attempts", attempts), ("concurrency", concurrency)) if value is not None}
        return self._request("POST", f"/v1/jobs/{_quote(name)}", {**body, **_settings("update_type", settings)})

    def pause(self, name: str) -> dict:
        """Concurrency 0 (jobs in flight finish); the old concurrency is kept for `resume`."""
        return self._request("POST", f"/v1/jobs/{_quote(name)}/pause")

    def resume(self, name: str, concurrency: int | None = None) -> dict:
        """Back to the concurrency it had when paused, or `concurrency`."""
        body = {} if concurrency is None else {"concurrency": concurrency}
        return self._request("POST", f"/v1/jobs/{_quote(name)}/resume", body)

    # --- jobs ---

    def enqueue(self, name: str, data: Any, id: str | None = None, run_after: datetime | str | None = None,
                expires_at: datetime | str | None = None, priority: int | None = None) -> dict:
        """Enqueue one job (its id: `id`, or a new one); safe to retry, as it is done under that id.

        Of a type's due jobs, those of a higher `priority` (default 0) are sent first."""
        job_id = id or f"job_{uuid.uuid4()}"
        body: dict[str, Any] = {"data": data}
        for key, value in (("run_after", run_after), ("expires_at", expires_at)):
            if value is not None:
                body[key] = value.isoformat() if isinstance(value, datetime) else value
        if priority is not None:
            body["priority"] = priority
        try:
            return self._request("PUT", f"/v1/jobs/{_quote(name)}/{job_id}", body, retry=True)
        except ApiError as error:
            # a retry after a lost answer to an enqueue that was done, and whose job has already run
            if error.id == "job_already_archived" and error.retried:
                return self.get(job_id)
            raise

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}", retry=True)

    def replay(self, job_id: str, new_id: str | None = None) -> dict:
        """A new job (its id: `new_id`, or a new one) with the archived job's type and data; safe to retry, as it is done under that id."""
        body = {"id": new_id or f"job_{uuid.uuid4()}"}
        return self._request("POST", f"/v1/jobs/{job_id}/replay", body, retry=True)

    def cancel(self, job_id: str, name: str | None = None) -> dict:
        """Archive a queued job as cancelled (before it is sent)."""
        name = name or self.get(job_id)["name"]
        return self._request("POST", f"/v1/jobs/{_quote(name)}/{job_id}/cancel", {})

    def heartbeat(self, name: str, job_id: str, attempt: int, extend: float | None = None, callback_token: str | None = None) -> dict:
        """For a downstream still working on `attempt` of a job: push its callback deadline to now + `extend`
        seconds (default: the type's job_timeout). `callback_token`: the Jobrunner-Callback-Token the job's
        POST carried, for a type that has one. The job, with its new "deadline"; safe to retry."""
        body: dict[str, Any] = {"attempt": attempt}
        if extend is not None:
            body["extend"] = extend
        headers = {} if callback_token is None else {"Jobrunner-Callback-Token": callback_token}
        return self._request("POST", f"/v1/jobs/{_quote(name)}/{job_id}/heartbeat", body, retry=True, headers=headers)

    def jobs(self, name: str, status: str | None = None, limit: int | None = None, page_size: int = 100) -> Iterator[dict]:
        """A type's jobs, newest first, page after page; at most `limit`."""
        cursor, given = None, 0
        while limit is None or given < limit:
            query = {"limit": min(page_size, limit - given) if limit else page_size}
            if status:
                query["status"] = status
            if cursor:
                query["cursor"] = cursor
            page = self._request("GET", f"/v1/jobs/{_quote(name)}/jobs?{urllib.parse.urlencode(query)}", retry=True)
            for job in page["jobs"]:
                yield job
                given += 1
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # --- schedules ---

    def schedules(self) -> list[dict]:
        return self._request("GET", "/v1/schedules", retry=True)["schedules"]

    def schedule(self, name: str) -> dict:
        return self._request("GET", f"/v1/schedules/{_quote(name)}", retry=True)

    def create_schedule(self, name: str, job_type: str, data: Any = None, **fields: Any) -> dict:
        """A schedule: `cron="0 2 * * *"` (and `time_zone="Europe/Berlin"`) or `interval_seconds=30`, and the
        other fields of docs/schedules.md (run_after_offset, expires_after, misfire, misfire_limit, paused, config_owned)."""
        return self._request("POST", "/v1/schedules", {"name": name, "job_type": job_type, "data": data, **fields})

    def update_schedule(self, name: str, **changes: Any) -> dict:
        """Change the fields given (None puts one back to its default)."""
        return self._request("POST", f"/v1/schedules/{_quote(name)}", changes)

    def delete_schedule(self, name: str) -> dict:
        return self._request("DELETE", f"/v1/schedules/{_quote(name)}")

    def pause_schedule(self, name: str) -> dict:
        return self._request("POST", f"/v1/schedules/{_quote(name)}/pause")

    def resume_schedule(self, name: str) -> dict:
        """Tick again, from the first tick after now."""
        return self._request("POST", f"/v1/schedules/{_quote(name)}/resume")

    def run_schedule(self, name: str) -> dict:
        """An extra job now (not retried: each call is one more job); the ticks are not touched."""
        return self._request("POST", f"/v1/schedules/{_quote(name)}/run")

    # --- the wire ---

    def _request(self, method: str, path: str, body: Any = None, retry: bool = False, headers: dict[str, str] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        for attempt, delay in enumerate((*(RETRY_DELAYS if retry else ()), None)):  # None: the last try
            request = urllib.request.Request(self.url + path, data=data, headers={**self._headers, **(headers or {})}, method=method)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    answer = response.read()
                    return json.loads(answer) if answer else None
            except urllib.error.HTTPError as error:
                if error.code != 503 or delay is None:
                    raise ApiError(error.code, _json(error.read(65536)), retried=attempt > 0) from None
            except (http.client.HTTPException, OSError) as error:
                if delay is None:
                    raise Unreachable(f"{method} {self.url}{path}: {error}") from None
            time.sleep(delay)


def _settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    for key in settings:
        if key not in TYPE_SETTINGS:
            raise TypeError(f"{method}() got an unexpected keyword argument {key!r} (settings: {', '.join(TYPE_SETTINGS)})")
    return {key: list(value) if key == "signing_secrets" and isinstance(value, tuple) else value for key, value in settings.items()}


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _json(answer: bytes) -> dict:
    try:
        value = json.loads(answer)
    except ValueError:
        return {"title": answer.decode("utf-8", "replace")[:200]}
    return value if isinstance(value, dict) else {"title": str(value)[:200]}

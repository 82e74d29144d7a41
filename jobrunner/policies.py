"""A job type's delivery settings as the API speaks them: checked, applied, shown.

A settings body is a JSON Merge Patch (RFC 7396) of the type's settings: a key
that is absent leaves its setting, null clears it (back to the global setting or
Rickover's default), and inside `retry` and `rate_limit` the same holds key by
key. Every value is checked before anything is saved; an error names the field
(`retry.max_backoff`). Plain values: no I/O here.
"""

import dataclasses
import math
import urllib.parse
from collections.abc import Mapping
from typing import Any

from . import signing
from .errors import InvalidField
from .models import TypePolicy

DAY = 86400.0
MAX_URL_LENGTH = 2048
MAX_DOWNSTREAM_TIMEOUT = 3600.0  # a POST answers in seconds; a long job sends its callback later
MAX_JOB_TIMEOUT = 7 * DAY  # longer work heartbeats or calls back "failed, retry" and starts again
MAX_BACKOFF = 7 * DAY
MAX_DOUBLINGS = 62  # 2^62 fits in the int64 of a back-off computed in integers
MAX_RETRY_DURATION = 366 * DAY
MIN_PER_SECOND = 1 / DAY  # one job a day
MAX_PER_SECOND = 100000.0
MAX_BURST = 100000
TOKEN_LENGTHS = (16, 256)
MAX_SECRETS = 2  # the new and the old one, during a rotation

RETRY_KEYS = {
    "min_backoff": "retry_min_backoff",
    "max_backoff": "retry_max_backoff",
    "max_doublings": "retry_max_doublings",
    "max_retry_duration": "retry_max_duration",
}
RATE_LIMIT_KEYS = {"per_second": "rate_per_second", "burst": "rate_burst"}


def apply(policy: TypePolicy, settings: Mapping[str, Any]) -> TypePolicy:
    """`policy` with the merge patch `settings` applied, checked field by field and as a whole."""
    changes: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in _PARSERS:
            raise InvalidField(key, f"is not a job type setting (known: {', '.join(SETTINGS)})")
        changes.update(_PARSERS[key](value))
    merged = dataclasses.replace(policy, **changes)
    _check_together(merged)
    return merged


def policy_json(policy: TypePolicy) -> dict:
    """The settings as GET shows them; the callback token and signing secrets are write-only."""
    return {
        "downstream_url": policy.downstream_url,
        "downstream_timeout": policy.downstream_timeout,
        "job_timeout": policy.job_timeout,
        "retry": _group_json(policy, RETRY_KEYS),
        "rate_limit": _group_json(policy, RATE_LIMIT_KEYS),
        "callback_token_set": policy.callback_token is not None,
        "signing_secrets_set": len(policy.signing_secrets),
    }


def effective_burst(policy: TypePolicy) -> int | None:
    """The bucket's size: the type's burst, else one second's worth (at least one job); None without a limit."""
    if policy.rate_per_second is None:
        return None
    return policy.rate_burst or max(1, math.ceil(policy.rate_per_second))


def describe(view: Mapping[str, Any]) -> list[str]:
    """A type's settings as `policy_json` shows them, a few words each, for people (the CLI, the dashboard); [] when none is set."""
    parts = []
    if view.get("downstream_url"):
        parts.append(f"to {view['downstream_url']}")
    if view.get("downstream_timeout") is not None:
        parts.append(f"answer within {duration(view['downstream_timeout'])}")
    if view.get("job_timeout") is not None:
        parts.append(f"callback within {duration(view['job_timeout'])}")
    retry = view.get("retry") or {}
    said = {"min_backoff": "min {}", "max_backoff": "max {}", "max_doublings": "{} doublings", "max_retry_duration": "for {}"}
    retry_parts = [text.format(duration(retry[key]) if key != "max_doublings" else retry[key]) for key, text in said.items() if retry.get(key) is not None]
    if retry_parts:
        parts.append("retry " + " ".join(retry_parts))
    rate = view.get("rate_limit") or {}
    if rate.get("per_second") is not None:
        parts.append(f"{rate['per_second']:g}/s" + (f" burst {rate['burst']}" if rate.get("burst") is not None else ""))
    if view.get("callback_token_set"):
        parts.append("callback token")
    if view.get("signing_secrets_set"):
        parts.append(f"signed ({view['signing_secrets_set']} secret{'s' if view['signing_secrets_set'] != 1 else ''})")
    return parts


def duration(seconds: float) -> str:
    """90 -> "90s", 1800 -> "30m", 86400 -> "1d": the largest unit that divides it."""
    for unit, size in (("d", DAY), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _group_json(policy: TypePolicy, keys: Mapping[str, str]) -> dict | None:
    group = {key: getattr(policy, column) for key, column in keys.items()}
    return group if any(value is not None for value in group.values()) else None


# --- one setting each ------------------------------------------------------------


def _downstream_url(value: Any) -> dict:
    if value is None:
        return {"downstream_url": None}
    field = "downstream_url"
    if not isinstance(value, str) or not value:
        raise InvalidField(field, "must be an http:// or https:// URL")
    if len(value) > MAX_URL_LENGTH:
        raise InvalidField(field, f"must be at most {MAX_URL_LENGTH} characters")
    if not value.isascii() or not value.isprintable() or " " in value:
        raise InvalidField(field, "must be printable ASCII without spaces (percent-encode the rest)")
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as error:
        raise InvalidField(field, f"is not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidField(field, f"must start with http:// or https://, not {_shown(value)}")
    if not parts.hostname:
        raise InvalidField(field, f"has no host: {_shown(value)}")
    if parts.username is not None or parts.password is not None:
        # GET shows the URL: credentials would leak; the downstream password is the global DOWNSTREAM_WORKER_AUTH
        raise InvalidField(field, "must not hold credentials (user:password@)")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise InvalidField(field, "must not have a query or fragment: /v1/jobs/<name>/<id> is appended to it")
    return {"downstream_url": value.rstrip("/")}


def _seconds(field: str, column: str, high: float, low: float = 0.0, low_allowed: bool = False):
    def parse(value: Any) -> dict:
        if value is None:
            return {column: None}
        if not _is_number(value) or not (low <= value if low_allowed else low < value) or value > high:
            bound = f"from {low:g}" if low_allowed else f"more than {low:g}"
            raise InvalidField(field, f"must be a number of seconds {bound} to {high:g}, not {_shown(value)}")
        return {column: float(value)}

    return parse


def _whole(field: str, column: str, low: int, high: int):
    def parse(value: Any) -> dict:
        if value is None:
            return {column: None}
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidField(field, f"must be a whole number from {low} to {high}, not {_shown(value)}")
        return {column: value}

    return parse


def _shown(value: Any, limit: int = 60) -> str:
    """The value in an error message, cut short: it comes from the client, and may be huge."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit
        return "a number with too many digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    # bool is an int in Python, but JSON `true` is not a number of seconds
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _group(field: str, parsers: Mapping[str, Any]):
    def parse(value: Any) -> dict:
        if value is None:
            return {column: None for parser in parsers.values() for column in parser(None)}
        if not isinstance(value, dict):
            raise InvalidField(field, f"must be an object with keys {', '.join(parsers)}, or null")
        changes = {}
        for key, item in value.items():
            if key not in parsers:
                raise InvalidField(f"{field}.{key}", f"is not a {field} setting (known: {', '.join(parsers)})")
            changes.update(parsers[key](item))
        return changes

    return parse


def _callback_token(value: Any) -> dict:
    low, high = TOKEN_LENGTHS
    if value is not None and (not isinstance(value, str) or not low <= len(value) <= high):
        raise InvalidField("callback_token", f"must be a string of {low} to {high} characters")
    # it travels in a header: visible ASCII only, no spaces
    if value is not None and not all("!" <= char <= "~" for char in value):
        raise InvalidField("callback_token", "may hold only visible ASCII characters (no spaces)")
    return {"callback_token": value}


def _signing_secrets(value: Any) -> dict:
    field = "signing_secrets"
    if value is None:
        return {field: ()}
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SECRETS:
        raise InvalidField(field, f"must be a list of 1 or {MAX_SECRETS} secrets (the first signs), or null")
    for index, secret in enumerate(value):
        _check_secret(f"{field}[{index}]", secret)
    if len(set(value)) < len(value):
        raise InvalidField(field, "holds the same secret twice")
    return {field: tuple(value)}


def _check_secret(field: str, secret: Any) -> None:
    """The rule JOBRUNNER_SIGNING_SECRETS follows too (`signing.check_secret`)."""
    if not isinstance(secret, str):
        raise InvalidField(field, f"must be a string: {signing.PREFIX} followed by base64")
    try:
        signing.check_secret(secret)
    except ValueError as error:  # the message never repeats the secret
        raise InvalidField(field, str(error)) from None


_PARSERS = {
    "downstream_url": _downstream_url,
    "downstream_timeout": _seconds("downstream_timeout", "downstream_timeout", MAX_DOWNSTREAM_TIMEOUT),
    "job_timeout": _seconds("job_timeout", "job_timeout", MAX_JOB_TIMEOUT),
    "retry": _group(
        "retry",
        {
            "min_backoff": _seconds("retry.min_backoff", "retry_min_backoff", MAX_BACKOFF, low_allowed=True),
            "max_backoff": _seconds("retry.max_backoff", "retry_max_backoff", MAX_BACKOFF, low_allowed=True),
            "max_doublings": _whole("retry.max_doublings", "retry_max_doublings", 0, MAX_DOUBLINGS),
            "max_retry_duration": _seconds("retry.max_retry_duration", "retry_max_duration", MAX_RETRY_DURATION),
        },
    ),
    "rate_limit": _group(
        "rate_limit",
        {
            "per_second": _seconds("rate_limit.per_second", "rate_per_second", MAX_PER_SECOND, MIN_PER_SECOND, low_allowed=True),
            "burst": _whole("rate_limit.burst", "rate_burst", 1, MAX_BURST),
        },
    ),
    "callback_token": _callback_token,
    "signing_secrets": _signing_secrets,
}
SETTINGS = tuple(_PARSERS)  # the keys of a settings body


# --- the settings as a whole -----------------------------------------------------------


def _check_together(policy: TypePolicy) -> None:
    """Rules between settings, each valid alone; checked on the merged result, so an update cannot break them."""
    low, high = policy.retry_min_backoff, policy.retry_max_backoff
    if low is not None and high is not None and low > high:
        raise InvalidField("retry.min_backoff", f"must not exceed retry.max_backoff ({low:g} > {high:g})")
    if policy.rate_burst is not None and policy.rate_per_second is None:
        raise InvalidField("rate_limit.per_second", "is required: a burst alone limits nothing")
    sent, answered = policy.job_timeout, policy.downstream_timeout
    if sent is not None and answered is not None and sent <= answered:
        raise InvalidField("job_timeout", f"must be longer than downstream_timeout ({sent:g} <= {answered:g}): the job would time out while its POST is still waiting")


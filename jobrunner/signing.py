"""Standard Webhooks signatures: how jobrunner signs what it POSTs to a downstream, and how a downstream checks it.

The Standard Webhooks specification 1.0.0 (github.com/standard-webhooks/standard-webhooks,
spec/standard-webhooks.md), symmetric scheme: the signed content is
`<webhook-id>.<webhook-timestamp>.<body>`, signed with HMAC-SHA256 under the
secret's bytes; the header `webhook-signature` holds `v1,<base64>`, several of them
space-separated while a secret is rotated. Secrets are written `whsec_<base64>`.
Standard library only: `jobrunner.client` re-exports `verify` for downstreams.
"""

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

PREFIX = "whsec_"
VERSION = "v1"  # the symmetric scheme's signature identifier
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64  # the specification's range for a random secret
TOLERANCE = 300  # seconds a webhook-timestamp may be off the receiver's clock, either way


class WebhookVerificationError(ValueError):
    """A request is not proved to come from the holder of the secret; the message says why."""


def secret_bytes(secret: str) -> bytes:
    """The key in a secret, `whsec_<base64>` or the base64 alone (padding optional, as the reference libraries read it)."""
    encoded = secret.removeprefix(PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a signing secret must be whsec_ followed by base64") from None
    if not key:
        raise ValueError("a signing secret must not be empty")
    return key


def check_secret(secret: str) -> str:
    """`secret` if jobrunner may sign with it: `whsec_`, base64, 24 to 64 bytes of key; else ValueError saying what is wrong."""
    if not secret.startswith(PREFIX):
        raise ValueError(f"a signing secret must start with {PREFIX} (followed by base64)")
    length = len(secret_bytes(secret))
    if not MIN_SECRET_BYTES <= length <= MAX_SECRET_BYTES:
        raise ValueError(f"a signing secret must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes of key, not {length}")
    return secret


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    """The base64 HMAC-SHA256 of `msg_id.timestamp.body`."""
    content = b".".join((msg_id.encode(), timestamp.encode(), body))
    return base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of the request."""
    return f"{VERSION},{_digest(secret_bytes(secret), msg_id, str(timestamp), body).decode()}"


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of a signed request, one signature per secret (a receiver holding any of them verifies)."""
    if not secrets:
        raise ValueError("signing needs at least one secret")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(secret, msg_id, timestamp, body) for secret in secrets),
    }


def verify(
    secrets: str | Sequence[str],
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance: float = TOLERANCE,
    now: float | None = None,
) -> None:
    """Raise WebhookVerificationError unless `body` and `headers` carry a valid signature by one of `secrets`.

    `secrets`: one secret or several (during a rotation). `headers`: any mapping
    (a dict, `http.client.HTTPMessage`, a framework's headers), names in any case.
    `body`: the raw bytes received, before any JSON parsing. The timestamp must be
    within `tolerance` seconds of `now` (default: this host's clock), which bounds
    the replay of a captured request.
    """
    keys = [secret_bytes(secret) for secret in ([secrets] if isinstance(secrets, str) else secrets)]
    if not keys:
        raise ValueError("verifying needs at least one secret")
    lowered = {str(name).lower(): value for name, value in headers.items()}
    msg_id, stamp, signatures = (lowered.get(name) for name in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not stamp.isascii() or not stamp.isdigit():
        raise WebhookVerificationError(f"webhook-timestamp is not a whole number of seconds: {stamp[:20]!r}")
    now = time.time() if now is None else now
    if int(stamp) < now - tolerance:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if int(stamp) > now + tolerance:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")
    raw = body.encode() if isinstance(body, str) else body
    expected = [_digest(key, msg_id, stamp, raw) for key in keys]  # the header's own text is what was signed
    for candidate in signatures.split():
        version, _, encoded = candidate.partition(",")
        if version != VERSION:
            continue  # another scheme (v1a) or a future one: not ours to check
        presented = encoded.encode("utf-8", "replace")
        if any(hmac.compare_digest(presented, digest) for digest in expected):
            return
    raise WebhookVerificationError("no valid signature")

"""The dashboard at `/` (placeholder until the real page lands)."""

import html

from .services import Overview

HEADERS: dict[str, str] = {"Cache-Control": "no-store"}


def render(overview: Overview, title: str, iframe_url: str = "") -> bytes:
    rows = "".join(f"<li>{html.escape(c.job_type.name)}</li>" for c in overview.types)
    return f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1><ul>{rows}</ul>".encode()

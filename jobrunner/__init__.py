"""jobrunner: a Postgres-backed job queue and scheduler, compatible with Rickover's v1 HTTP API.

What an application imports (docs/library.md). The names are loaded on first
use, so that `jobrunner.client` (the standard library alone) does not pull in
the database driver.
"""

import importlib
from typing import Any

# public name -> the module that defines it
_PUBLIC = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "QueuedJob": "models",
    "Worker": "plugins",
    "Authorizer": "plugins",
    "ConfiguredUsers": "plugins",
    "Succeeded": "plugins",
    "Failed": "plugins",
    "Unauthorized": "errors",
    "Forbidden": "errors",
    "JobProcessor": "delivery",  # Rickover's name for the built-in HTTP delivery
    "HttpDelivery": "delivery",
    "run": "cli",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jobrunner' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)

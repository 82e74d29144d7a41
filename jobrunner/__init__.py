"""jobrunner: a Postgres-backed job queue and scheduler, compatible with Rickover's v1 HTTP API."""

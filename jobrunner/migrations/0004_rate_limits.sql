-- jobrunner: each rate-limited job type's token bucket (issue 16), in the
-- database so that the limit holds across every worker, process and host. Read
-- and written only by a claim of the type, under its claim lock: `tokens` as
-- they were at `refilled_at`, under the limit (`per_second`, `burst`) of that
-- claim. A type without a limit has no row and never reads the table.
CREATE TABLE IF NOT EXISTS jobrunner_rate_limits (
    name text PRIMARY KEY REFERENCES jobs (name),
    tokens double precision NOT NULL,
    per_second double precision NOT NULL CHECK (per_second > 0),
    burst double precision NOT NULL CHECK (burst >= 1),
    refilled_at timestamp with time zone NOT NULL
);

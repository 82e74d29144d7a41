-- jobrunner's database schema: the whole picture, to read.
--
-- `jobrunner migrate` does not apply this file: it applies the numbered files
-- in jobrunner/migrations/ in order, and tests/test_migrations.py checks that
-- this file builds the same schema as all of them. A new migration adds its
-- objects here too, in a section of its own at the end.
--
-- Rickover's tables and enum types, with the same names, columns and
-- constraints, plus the indexes jobrunner's queries need.

-- 0001_base ------------------------------------------------------------------

-- Postgres has no CREATE TYPE IF NOT EXISTS.
DO $$
BEGIN
    IF to_regtype('delivery_strategy') IS NULL THEN
        CREATE TYPE delivery_strategy AS ENUM ('at_most_once', 'at_least_once');
    END IF;
    IF to_regtype('job_status') IS NULL THEN
        CREATE TYPE job_status AS ENUM ('queued', 'in-progress');
    END IF;
    IF to_regtype('archived_job_status') IS NULL THEN
        CREATE TYPE archived_job_status AS ENUM ('succeeded', 'failed', 'expired');
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS jobs (
    name text PRIMARY KEY,
    delivery_strategy delivery_strategy NOT NULL,
    attempts smallint NOT NULL CONSTRAINT jobs_attempts_check CHECK (attempts > 0),
    concurrency smallint NOT NULL CONSTRAINT jobs_concurrency_check CHECK (concurrency >= 0),
    created_at timestamp with time zone NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS queued_jobs (
    id uuid PRIMARY KEY,
    name text NOT NULL REFERENCES jobs (name),
    attempts smallint NOT NULL CONSTRAINT queued_jobs_attempts_check CHECK (attempts >= 0),
    run_after timestamp with time zone NOT NULL,
    expires_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    status job_status NOT NULL,
    data jsonb NOT NULL
);

CREATE TABLE IF NOT EXISTS archived_jobs (
    id uuid PRIMARY KEY,
    name text NOT NULL REFERENCES jobs (name),
    attempts smallint NOT NULL CHECK (attempts >= 0),
    status archived_job_status NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    data jsonb NOT NULL
);

-- jobrunner: a queued job cancelled before it was sent (POST .../cancel).
ALTER TYPE archived_job_status ADD VALUE IF NOT EXISTS 'cancelled';

-- Added by a later Rickover migration; a no-op where it exists.
ALTER TABLE archived_jobs ADD COLUMN IF NOT EXISTS expires_at timestamp with time zone;

-- Rickover's claim index; kept for Rickover's code, which orders by run_after alone.
CREATE INDEX IF NOT EXISTS find_queued_job ON queued_jobs (name, run_after) WHERE status = 'queued';

-- jobrunner: due jobs whose expires_at has passed, archived at claim time
-- without scanning the backlog. Only jobs with an expires_at are in it.
CREATE INDEX IF NOT EXISTS queued_jobs_expires_at ON queued_jobs (name, expires_at)
    WHERE status = 'queued' AND expires_at IS NOT NULL;

-- jobrunner: paging through a type's archived jobs, newest first.
CREATE INDEX IF NOT EXISTS archived_jobs_name_created_at ON archived_jobs (name, created_at, id);

-- jobrunner: the dashboard's recent failed and expired jobs, without reading a
-- day of succeeded ones. Only those rows are in it, so archiving a success
-- costs nothing more.
CREATE INDEX IF NOT EXISTS archived_jobs_failures ON archived_jobs (name, created_at)
    WHERE status IN ('failed', 'expired');

-- jobrunner: in-progress jobs, counted per type at every claim and scanned by
-- updated_at for stuck jobs. Only in-flight rows are in it, so it stays small.
CREATE INDEX IF NOT EXISTS queued_jobs_in_progress ON queued_jobs (name, updated_at) WHERE status = 'in-progress';

-- jobrunner: the concurrency a paused job type goes back to on resume
-- (POST /v1/jobs/<name>/pause sets it to 0). A table of its own, so that
-- Rickover's code, which reads every column of `jobs`, never sees a new one.
CREATE TABLE IF NOT EXISTS jobrunner_paused_job_types (
    name text PRIMARY KEY REFERENCES jobs (name),
    concurrency smallint NOT NULL CHECK (concurrency > 0),
    paused_at timestamp with time zone NOT NULL DEFAULT now()
);

-- jobrunner: the total attempts of a queued job whose type's attempts changed
-- after it was enqueued (its retry back-off counts the attempts it used). Rows
-- of archived jobs are deleted by the watcher.
CREATE TABLE IF NOT EXISTS jobrunner_job_attempts (
    id uuid PRIMARY KEY,
    total_attempts integer NOT NULL CHECK (total_attempts > 0)
);

-- jobrunner: a job type's current error (a claim that fails), for the dashboard
-- of any host; deleted when the type recovers.
CREATE TABLE IF NOT EXISTS jobrunner_type_errors (
    name text PRIMARY KEY,
    stage text NOT NULL,
    message text NOT NULL,
    failures integer NOT NULL,
    since timestamp with time zone NOT NULL,
    last_at timestamp with time zone NOT NULL
);

-- 0002_job_type_settings ----------------------------------------------------


-- jobrunner: a job type's delivery settings (issue 16); every column NULL (or
-- no row at all) means today's behaviour. A table of its own, so that
-- Rickover's code, which reads every column of `jobs`, never sees a new one.
CREATE TABLE IF NOT EXISTS jobrunner_job_type_settings (
    name text PRIMARY KEY REFERENCES jobs (name),
    downstream_url text,                 -- base URL; /v1/jobs/<name>/<id> appended as today
    downstream_timeout double precision, -- seconds to wait for the POST's answer
    job_timeout double precision,        -- seconds a sent job may wait for its callback
    retry_min_backoff double precision,
    retry_max_backoff double precision,
    retry_max_doublings integer,
    retry_max_duration double precision, -- seconds since the job's created_at
    rate_per_second double precision,
    rate_burst integer,
    callback_token text,
    signing_secrets text[],              -- whsec_... ; two during a rotation; first signs
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);

-- 0003_priority --------------------------------------------------------------

-- jobrunner: a job's priority (issue 16): higher first within its type, 0 by
-- default. Defaulted, so Rickover's code, which names its columns, never sees it;
-- archived jobs keep it, so that a replay is queued at the same priority.
ALTER TABLE queued_jobs ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;
ALTER TABLE archived_jobs ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;

-- jobrunner: the claim. It reads each priority of the type in turn, highest
-- first, and within one its due jobs in (run_after, id) order: this index's
-- order after the name and priority, so every read is an index scan that stops
-- after the batch, even when the statistics say the queue is empty (after a
-- burst onto a quiet queue, an ORDER BY the index did not cover sorted the
-- whole backlog). It replaces the claim's index of before priorities.
DROP INDEX IF EXISTS queued_jobs_claim;
CREATE INDEX IF NOT EXISTS queued_jobs_claim_by_priority ON queued_jobs (name, priority DESC, run_after, id)
    WHERE status = 'queued';

-- 0004_rate_limits ---------------------------------------------------------

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

-- 0005_job_deadlines ---------------------------------------------------------

-- jobrunner: the callback deadline a downstream's heartbeat set
-- (POST /v1/jobs/<name>/<id>/heartbeat). It holds while the job is as the
-- heartbeat left it: in progress at that attempt, updated_at = beat_at. Rows
-- no job holds any more are deleted by the watcher.
CREATE TABLE IF NOT EXISTS jobrunner_job_deadlines (
    id uuid PRIMARY KEY,
    attempts smallint NOT NULL,
    beat_at timestamp with time zone NOT NULL,
    deadline timestamp with time zone NOT NULL
);

-- 0006_schedules ------------------------------------------------------------


-- jobrunner: schedules, recurring jobs (issue 17).
--
-- One row per schedule. The scheduler (one per host, in the watcher process)
-- locks the due rows (FOR UPDATE SKIP LOCKED, by the database's now()),
-- enqueues each tick's job under an id derived from (name, tick) and moves
-- next_tick past now() in the same transaction: any number of hosts make one
-- job per tick. Changes NOTIFY jobrunner_schedules so that the schedulers wake.
CREATE TABLE IF NOT EXISTS jobrunner_schedules (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$'),
    job_type text NOT NULL REFERENCES jobs (name),
    data jsonb NOT NULL DEFAULT 'null',
    -- either a cron expression (in time_zone, UTC when NULL) or a fixed interval
    cron text CHECK (length(cron) BETWEEN 1 AND 200),
    time_zone text CHECK (length(time_zone) BETWEEN 1 AND 100),
    interval_seconds integer CHECK (interval_seconds >= 1),
    run_after_offset integer NOT NULL DEFAULT 0 CHECK (run_after_offset >= 0),  -- seconds after the tick the job is due
    expires_after integer CHECK (expires_after >= 1),  -- seconds after the tick the job expires (NULL: never)
    misfire text NOT NULL DEFAULT 'skip' CHECK (misfire IN ('skip', 'once', 'all')),
    misfire_limit integer NOT NULL DEFAULT 100 CHECK (misfire_limit BETWEEN 1 AND 1000),  -- 'all': missed ticks enqueued at most
    paused boolean NOT NULL DEFAULT false,
    config_owned boolean NOT NULL DEFAULT false,  -- declared in a config file: reconciled on start and SIGHUP
    next_tick timestamp with time zone NOT NULL,  -- the next tick to enqueue
    last_tick timestamp with time zone,
    last_job_id uuid,  -- the last job enqueued: a tick's, or a run-now's
    -- a row that cannot be evaluated (a time zone this host lacks...): why, and when to try again
    failures integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    error text,
    retry_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    CONSTRAINT jobrunner_schedules_cron_or_interval CHECK ((cron IS NULL) <> (interval_seconds IS NULL)),
    CONSTRAINT jobrunner_schedules_zone_with_cron CHECK (time_zone IS NULL OR cron IS NOT NULL)
);

-- the scheduler's "what is due" and "when is the next one", without reading paused rows
CREATE INDEX IF NOT EXISTS jobrunner_schedules_due ON jobrunner_schedules (next_tick) WHERE NOT paused;

-- Migration 0006: schedules, recurring jobs (issue 17).
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

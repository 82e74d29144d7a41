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

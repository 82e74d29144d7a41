-- The schema as Rickover's goose migrations (db/migrations, 2016-02-04 .. 2016-05-24)
-- leave it, written out for the test that applies jobrunner's schema.sql over it.
-- pg_stat_statements is left out: it is not part of Rickover's tables.
CREATE TABLE goose_db_version (
    id serial PRIMARY KEY,
    version_id bigint NOT NULL,
    is_applied boolean NOT NULL,
    tstamp timestamp DEFAULT now()
);
INSERT INTO goose_db_version (version_id, is_applied) VALUES (0, true), (20160524124708, true);

CREATE TYPE delivery_strategy AS ENUM ('at_most_once', 'at_least_once');
CREATE TABLE jobs (
    name text PRIMARY KEY,
    delivery_strategy delivery_strategy NOT NULL,
    attempts smallint NOT NULL,
    concurrency smallint NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now()
);
ALTER TABLE jobs ADD CONSTRAINT jobs_attempts_check CHECK (attempts > 0);
ALTER TABLE jobs ADD CONSTRAINT jobs_concurrency_check CHECK (concurrency >= 0);

CREATE TYPE job_status AS ENUM ('queued', 'in-progress');
CREATE TABLE queued_jobs (
    id uuid PRIMARY KEY,
    name text NOT NULL REFERENCES jobs (name),
    attempts smallint NOT NULL,
    run_after timestamp with time zone NOT NULL,
    expires_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    status job_status NOT NULL,
    data jsonb NOT NULL
);
ALTER TABLE queued_jobs ADD CONSTRAINT queued_jobs_attempts_check CHECK (attempts >= 0);
CREATE INDEX find_queued_job ON queued_jobs (name, run_after) WHERE status = 'queued';
CREATE INDEX queued_jobs_created_at ON queued_jobs (created_at ASC);

CREATE TYPE archived_job_status AS ENUM ('succeeded', 'failed', 'expired');
CREATE TABLE archived_jobs (
    id uuid PRIMARY KEY,
    name text NOT NULL REFERENCES jobs (name),
    attempts smallint NOT NULL CHECK (attempts >= 0),
    status archived_job_status NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    data jsonb NOT NULL
);
ALTER TABLE archived_jobs ADD COLUMN expires_at timestamp with time zone;

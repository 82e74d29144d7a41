-- The callback deadline a downstream's heartbeat set (POST /v1/jobs/<name>/<id>/heartbeat).
-- It holds while the job is as the heartbeat left it: in progress at that
-- attempt, updated_at = beat_at. Rows no job holds any more are deleted by the watcher.
CREATE TABLE IF NOT EXISTS jobrunner_job_deadlines (
    id uuid PRIMARY KEY,
    attempts smallint NOT NULL,
    beat_at timestamp with time zone NOT NULL,
    deadline timestamp with time zone NOT NULL
);

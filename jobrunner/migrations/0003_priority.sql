-- jobrunner: a job's priority (issue 16): higher first within its type, 0 by
-- default. Defaulted, so Rickover's code, which names its columns, never sees it
-- (a constant default: no rewrite of the tables). Archived jobs keep it, so that
-- a replay is queued at the same priority.
ALTER TABLE queued_jobs ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;
ALTER TABLE archived_jobs ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;

-- The claim reads each priority of the type in turn, highest first, and within
-- one its due jobs in (run_after, id) order: this index's order after the name
-- and priority, so every read is an index scan that stops after the batch
-- whatever the statistics say. It replaces queued_jobs_claim (name, run_after,
-- id); Rickover's find_queued_job stays for Rickover's code and for "next due".
-- Building it holds enqueues and claims back until it is built.
DROP INDEX IF EXISTS queued_jobs_claim;
CREATE INDEX IF NOT EXISTS queued_jobs_claim_by_priority ON queued_jobs (name, priority DESC, run_after, id)
    WHERE status = 'queued';

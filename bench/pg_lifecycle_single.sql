-- The database's ceiling for one job lifecycle, as three single-row autocommit
-- transactions (enqueue; claim one with SKIP LOCKED; archive it), run by
-- bench/drain.py with pgbench against a job type named `pgbench`. The same
-- lifecycle as ../shared/bench/pg_lifecycle_single.sql.
INSERT INTO queued_jobs (id, name, attempts, run_after, status, data) VALUES (gen_random_uuid(), 'pgbench', 3, now(), 'queued', '{"user-agent": "pgbench"}');
WITH c AS (UPDATE queued_jobs SET status = 'in-progress', updated_at = now() WHERE id = (SELECT id FROM queued_jobs WHERE status = 'queued' AND name = 'pgbench' AND run_after <= now() ORDER BY run_after LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING queued_jobs.id) SELECT coalesce((SELECT id FROM c), '00000000-0000-0000-0000-000000000000'::uuid)::text AS id \gset
WITH d AS (DELETE FROM queued_jobs WHERE id = :id::uuid RETURNING id, name, attempts, data, expires_at) INSERT INTO archived_jobs (id, name, attempts, status, data, expires_at) SELECT id, name, attempts, 'succeeded', data, expires_at FROM d;

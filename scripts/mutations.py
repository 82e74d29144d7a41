"""The one-line mutations scripts/mutate applies, one at a time, to the lifecycle code.

Each names the rule it breaks (as docs/lifecycle.md and docs/api.md state it),
the exact text changed (it must occur once in the file), the replacement, and
the tests that must notice. A mutation that survives on purpose says why in
`survives`; any other survivor is a hole in the suite.

When code moves, a mutation turns `not-applicable`: point it at the new place.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    rule: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    survives: str = ""  # why surviving is acceptable; empty: it must be killed


SERVICES = "jobrunner/services.py"
STORE = "jobrunner/store.py"
BATCHING = "jobrunner/batching.py"
DELIVERY = "jobrunner/delivery.py"
WORKER = "jobrunner/worker.py"
PROMISES = "tests/test_promises.py"
CRON = "jobrunner/cron.py"
CRON_TESTS = ("tests/test_cron.py",)
POLICIES = "jobrunner/policies.py"
SERVER = "jobrunner/server.py"
SETTINGS_TESTS = ("tests/test_type_settings.py", "tests/test_policies.py")
SCHEDULES = "jobrunner/schedules.py"
TIMETABLE = "jobrunner/timetable.py"
SCHEDULE_TESTS = ("tests/test_schedules.py",)
SIGNING = "jobrunner/signing.py"
DOWNSTREAM = "jobrunner/downstream.py"
SIGNING_TESTS = ("tests/test_signing.py",)
TOKEN_TESTS = ("tests/test_callback_token.py",)
WATCHER = "jobrunner/watcher.py"
POLICY_TESTS = "tests/test_delivery_policy.py"
HEARTBEAT_TESTS = "tests/test_heartbeats.py"

MUTATIONS = [
    # --- pause / resume ------------------------------------------------------------------
    Mutation(
        "resume-explicit",
        "resume with an explicit concurrency uses it, not the remembered one",
        SERVICES,
        "concurrency = concurrency or remembered",
        "concurrency = remembered or concurrency",
        ("tests/test_job_types.py", "tests/test_http_api.py::test_pause_and_resume"),
    ),
    Mutation(
        "pause-forgets",
        "pause remembers the concurrency for resume",
        SERVICES,
        "        store.remember_concurrency(conn, name)\n",
        "",
        ("tests/test_job_types.py",),
    ),
    Mutation(
        "hand-set-kept",
        "a concurrency set by hand while paused is not undone by resume",
        SERVICES,
        "store.forget_concurrency(conn, name)  # set by hand",
        "None  # set by hand",
        ("tests/test_job_types.py",),
    ),
    # --- callbacks -----------------------------------------------------------------------
    Mutation(
        "stale-attempt",
        "a failed callback must name the attempt in progress",
        SERVICES,
        "if job.status != IN_PROGRESS or job.attempts != attempt:",
        "if job.status != IN_PROGRESS:",
        ("tests/test_callbacks.py",),
        survives="equivalent: the archive and retry statements match only `expected_attempts`, so a stale attempt "
        "changes no row and _fail raises the same StaleCallback from its result-is-None branch; the check is a second guard "
        "(only a job Rickover left both queued and archived would answer its archived copy instead)",
    ),
    Mutation(
        "callback-other-type",
        "a callback under another type's name does not touch the job",
        SERVICES,
        "if locked is None or locked.job.name != name:",
        "if locked is None:",
        ("tests/test_callbacks.py",),
    ),
    Mutation(
        "last-attempt-retried",
        "a failed last attempt is archived failed, not retried",
        SERVICES,
        "remaining <= 0",
        "remaining < 0",
        ("tests/test_callbacks.py",),
    ),
    Mutation(
        "not-retryable-retried",
        "a failed callback with retryable false is archived failed whatever attempts remain",
        SERVICES,
        "if not retryable or remaining <= 0",
        "if remaining <= 0",
        ("tests/test_callbacks.py",),
    ),
    Mutation(
        "group-commit-never-batches",
        "concurrent PUTs and callbacks share a transaction (group commit)",
        BATCHING,
        "max_batch: int = 200",
        "max_batch: int = 1",
        (PROMISES,),
    ),
    # --- at_most_once --------------------------------------------------------------------
    Mutation(
        "at-most-once-not-delivered",
        "an at_most_once job that never reached the downstream is retried while attempts remain",
        SERVICES,
        "return _record_failed_post(conn, job, delivered=False, now=now)",
        "return _record_failed_post(conn, job, delivered=True, now=now)",
        ("tests/test_callbacks.py", "tests/test_delivery.py"),
    ),
    Mutation(
        "at-most-once-rejected",
        "an at_most_once job answered with an error is archived failed, never sent again",
        SERVICES,
        "return _record_failed_post(conn, job, delivered=True, now=now)",
        "return _record_failed_post(conn, job, delivered=False, now=now)",
        ("tests/test_callbacks.py", "tests/test_delivery.py"),
    ),
    # --- back-off ------------------------------------------------------------------------
    Mutation(
        "backoff-flat",
        "a retry waits 2^(attempts used) seconds",
        SERVICES,
        "exponent = max(0, total_attempts - remaining_attempts)",
        "exponent = 1",
        ("tests/test_callbacks.py", "tests/test_timing.py"),
    ),
    Mutation(
        "backoff-database-clock",
        "the back-off counts from the database's clock when no `now` is given (production)",
        STORE,
        "run_after = coalesce(%(now)s, now()) + %(delay)s,",
        "run_after = coalesce(%(now)s, now() - %(delay)s) + %(delay)s,",
        (PROMISES,),
    ),
    # --- stuck jobs ----------------------------------------------------------------------
    Mutation(
        "stuck-not-retried",
        "a stuck job is failed as a retryable callback would (retried while attempts remain)",
        SERVICES,
        "return _fail(conn, locked, locked.job.attempts, retryable=True, now=now)",
        "return _fail(conn, locked, locked.job.attempts, retryable=False, now=now)",
        ("tests/test_stuck_jobs.py",),
    ),
    Mutation(
        "stuck-database-clock",
        "stuck detection counts from the database's clock when no `now` is given (production)",
        STORE,
        "q.updated_at < coalesce(%(now)s, now()) - %(older_than)s",
        "q.updated_at < coalesce(%(now)s, now() + %(older_than)s) - %(older_than)s",
        (PROMISES,),
    ),
    # --- claim, concurrency, expiry ------------------------------------------------------
    Mutation(
        "claim-past-concurrency",
        "a claim never takes a type past its concurrency",
        STORE,
        "LIMIT least(%(limit)s, coalesce((SELECT n FROM free_slots), 0))",
        "LIMIT %(limit)s",
        ("tests/test_claim.py",),
    ),
    Mutation(
        "claim-not-due",
        "a claim takes only due jobs (run_after passed)",
        STORE,
        "WHERE name = %(name)s AND status = 'queued' AND run_after <= coalesce(%(now)s, now())\n      AND (expires_at IS NULL",
        "WHERE name = %(name)s AND status = 'queued'\n      AND (expires_at IS NULL",
        ("tests/test_claim.py",),
    ),
    Mutation(
        "claim-sends-expired",
        "a claim never sends an expired job",
        STORE,
        "AND (expires_at IS NULL OR expires_at > coalesce(%(now)s, now()))",
        "AND (expires_at IS NULL OR expires_at > coalesce(%(now)s, now()) - interval '1 day')",
        ("tests/test_claim.py",),
    ),
    Mutation(
        "expired-during-503s",
        "a job that expires while its 503s are resent is not sent again",
        DELIVERY,
        "            return ExpiredMeanwhile()\n",
        "            return None\n",
        (PROMISES,),
    ),
    Mutation(
        "expired-meanwhile-not-archived",
        "a job that expired while its 503s were resent is archived expired, using no attempt",
        SERVICES,
        "return expire_in_progress(conn, job, now) or record_not_delivered(conn, job, now)",
        "return record_not_delivered(conn, job, now)",
        (PROMISES,),
    ),
    Mutation(
        "resent-after-settled",
        "a job settled (called back) while the downstream answered 503 is not sent again",
        DELIVERY,
        "        if not in_progress:\n",
        "        if False:\n",
        ("tests/test_worker.py", "tests/test_delivery.py"),
    ),
    Mutation(
        "settled-meanwhile-recorded",
        "a job settled meanwhile (or called back before its POST was answered) is left as its callback left it",
        SERVICES,
        "    if isinstance(outcome, (Accepted, MaybeDelivered, SettledMeanwhile)):\n        return None",
        "    if isinstance(outcome, (Accepted, MaybeDelivered, SettledMeanwhile)):\n        return record_not_delivered(conn, job, now)",
        ("tests/test_callbacks.py", "tests/test_delivery.py"),
    ),
    Mutation(
        "one-type-takes-every-thread",
        "no type holds every dispatch thread: a hanging downstream of one type leaves threads to the others",
        WORKER,
        "taken = max(0, min(wanted, self._free, self._share - busy))",
        "taken = max(0, min(wanted, self._free))",
        ("tests/test_isolation.py::test_a_type_whose_downstream_hangs_never_holds_every_dispatch_thread",),
    ),
    # --- cron: the syntax and DST rules of docs/schedules.md -----------------------------
    Mutation(
        "cron-gap-fires-at-its-end",
        "a time of day skipped by a spring-forward gap fires at the first instant after the gap",
        CRON,
        "if new_offset > offset and not self.follows_clock and wall < gap_end:",
        "if False:",
        CRON_TESTS,
    ),
    Mutation(
        "cron-overlap-fires-once",
        "a time of day repeated by a fall-back overlap fires at its first occurrence only",
        CRON,
        "if self.follows_clock or self._first_occurrence(wall, zone) == candidate:",
        "if True:",
        CRON_TESTS,
    ),
    Mutation(
        "cron-clock-following-repeats",
        "a clock-following expression fires in both passes of a fall-back overlap",
        CRON,
        "            if not self.follows_clock:\n                wall_from = max(wall_from, wall)",
        "            if True:\n                wall_from = max(wall_from, wall)",
        CRON_TESTS,
    ),
    Mutation(
        "cron-strictly-after",
        "the next tick is strictly after the time asked about",
        CRON,
        "wall_from = (after + offset).replace(tzinfo=None, second=0, microsecond=0) + MINUTE",
        "wall_from = (after + offset).replace(tzinfo=None, second=0, microsecond=0)",
        CRON_TESTS,
    ),
    Mutation(
        "cron-vixie-day-rule",
        "a day field starting with `*` is unrestricted (Vixie cron): `*/2 * MON` needs both",
        CRON,
        'either_day = not fields[2].startswith("*") and not fields[4].startswith("*")',
        'either_day = fields[2] != "*" and fields[4] != "*"',
        CRON_TESTS,
    ),
    Mutation(
        "cron-sunday-is-7",
        "day of week 7 is Sunday, like 0",
        CRON,
        "return {value % 7 if field is _DAY_OF_WEEK else value for value in range(low, high + 1, step)}",
        "return {value for value in range(low, high + 1, step)}",
        CRON_TESTS,
    ),
    Mutation(
        "cron-never-fires-refused",
        "an expression that can never fire is refused",
        CRON,
        "    if not cron.can_fire():\n",
        "    if False:\n",
        CRON_TESTS,
    ),
    Mutation(
        "cron-leap-day",
        "February 29 is a day that fires (in leap years)",
        CRON,
        "calendar.monthrange(2000, month)",
        "calendar.monthrange(2001, month)",
        CRON_TESTS,
    ),
    Mutation(
        "ticks-latest",
        "ticks_between(latest=True) gives the last ticks of the whole span, not of its last minute",
        CRON,
        "if len(found) >= limit or window_start == start_exclusive:",
        "if True:",
        CRON_TESTS,
    ),
    # --- job-type settings: the rules of docs/api.md, "Job-type settings" ----------------
    Mutation(
        "settings-create-atomic",
        "a type is created with its settings or not at all",
        SERVICES,
        "    with store.transaction(conn):\n        job_type = store.create_job_type(",
        "    if True:\n        job_type = store.create_job_type(",
        SETTINGS_TESTS,
    ),
    Mutation(
        "settings-unknown-key",
        "an unknown key in a new type's body is a 400 naming it",
        SERVER,
        "        _refuse_unknown(body, CREATE_JOB_TYPE_FIELDS)\n",
        "",
        SETTINGS_TESTS,
    ),
    Mutation(
        "settings-min-not-over-max",
        "retry.min_backoff may not exceed retry.max_backoff, checked on the merged settings",
        POLICIES,
        "if low is not None and high is not None and low > high:",
        "if False:",
        SETTINGS_TESTS,
    ),
    Mutation(
        "settings-burst-needs-rate",
        "a burst without per_second is refused",
        POLICIES,
        "if policy.rate_burst is not None and policy.rate_per_second is None:",
        "if False:",
        SETTINGS_TESTS,
    ),
    Mutation(
        "settings-job-timeout-longer",
        "job_timeout must be longer than downstream_timeout (equal is refused)",
        POLICIES,
        "sent <= answered",
        "sent < answered",
        SETTINGS_TESTS,
    ),
    Mutation(
        "settings-true-is-not-a-number",
        "JSON true is not a number of seconds",
        POLICIES,
        "return isinstance(value, int) and not isinstance(value, bool)",
        "return isinstance(value, int)",
        SETTINGS_TESTS,
    ),
    Mutation(
        "settings-no-credentials-in-url",
        "a downstream_url with user:password@ is refused (GET shows the URL)",
        POLICIES,
        "if parts.username is not None or parts.password is not None:",
        "if False:",
        SETTINGS_TESTS,
    ),
    Mutation(
        "settings-null-clears-group",
        "retry: null clears every retry setting",
        POLICIES,
        "return {column: None for parser in parsers.values() for column in parser(None)}",
        "return {}",
        SETTINGS_TESTS,
    ),
    Mutation(
        "settings-token-write-only",
        "GET shows whether a callback token is set, never the token",
        POLICIES,
        '"callback_token_set": policy.callback_token is not None,',
        '"callback_token_set": policy.callback_token,',
        SETTINGS_TESTS,
    ),
    # --- a type's delivery policy and heartbeats ---------------------------------------
    Mutation(
        "policy-url-ignored",
        "a type's jobs go to its own downstream_url",
        DELIVERY,
        "base_url=policy.downstream_url,",
        "base_url=None,",
        (f"{POLICY_TESTS}::test_each_type_is_posted_to_its_own_downstream",),
    ),
    Mutation(
        "policy-timeout-ignored",
        "a type's POSTs keep to its own downstream_timeout",
        DELIVERY,
        "timeout=policy.downstream_timeout,",
        "timeout=None,",
        (f"{POLICY_TESTS}::test_a_type_whose_downstream_is_gone_hangs_or_does_not_resolve_holds_up_no_other",),
    ),
    Mutation(
        "idle-connections-kept",
        "connections idle past MAX_IDLE are closed: a thread keeps only the hosts it sent to lately",
        DOWNSTREAM,
        "        self._sweep()\n",
        "",
        (f"{POLICY_TESTS}::test_connections_idle_past_max_idle_are_closed_so_many_hosts_keep_memory_flat",),
    ),
    Mutation(
        "type-job-timeout-ignored",
        "the overdue and stuck checks count from the type's own job_timeout",
        STORE,
        "coalesce(s.job_timeout * interval '1 second', %(timeout)s)) + %(margin)s",
        "%(timeout)s) + %(margin)s",
        (f"{POLICY_TESTS}::test_the_overdue_check_counts_each_type_from_its_own_job_timeout",),
    ),
    Mutation(
        "watcher-no-margin",
        "the watcher fails a job stuck_job_timeout - job_timeout after the workers would",
        WATCHER,
        "services.archive_stuck_jobs(conn, self.job_timeout, now, self.margin)",
        "services.archive_stuck_jobs(conn, self.job_timeout, now)",
        (f"{POLICY_TESTS}::test_the_watcher_gives_a_type_with_its_own_job_timeout_the_same_margin_behind_the_workers",),
    ),
    Mutation(
        "heartbeat-deadline-ignored",
        "the overdue check counts from a heartbeat's deadline",
        STORE,
        "coalesce(d.deadline, q.updated_at",
        "coalesce(NULL, q.updated_at",
        (HEARTBEAT_TESTS,),
    ),
    Mutation(
        "deadline-outlives-its-attempt",
        "a heartbeat's deadline holds for its attempt only",
        STORE,
        "ON d.id = q.id AND d.attempts = q.attempts AND d.beat_at = q.updated_at",
        "ON d.id = q.id",
        (f"{HEARTBEAT_TESTS}::test_a_deadline_holds_for_its_attempt_only",),
    ),
    Mutation(
        "stuck-bound-without-types",
        "the overdue check's first bound allows for a type's job_timeout shorter than the default",
        STORE,
        "      (SELECT min(job_timeout) * interval '1 second' FROM jobrunner_job_type_settings),\n",
        "",
        (f"{POLICY_TESTS}::test_the_overdue_check_counts_each_type_from_its_own_job_timeout",),
    ),
    Mutation(
        "stuck-bound-without-heartbeats",
        "the overdue check's first bound allows for a heartbeat's extend shorter than the default",
        STORE,
        "      (SELECT min(deadline - beat_at) FROM jobrunner_job_deadlines)\n",
        "      NULL\n",
        (HEARTBEAT_TESTS,),
    ),
    Mutation(
        "heartbeat-any-attempt",
        "a heartbeat for another attempt changes nothing",
        STORE,
        "WHERE id = %(id)s AND name = %(name)s AND attempts = %(attempt)s AND status = 'in-progress'",
        "WHERE id = %(id)s AND name = %(name)s AND status = 'in-progress'",
        (HEARTBEAT_TESTS,),
    ),
    Mutation(
        "heartbeat-without-token",
        "a heartbeat for a type with a callback token must carry it",
        SERVICES,
        "    check_callback_token(conn, name, callback_token)\n",
        "",
        (f"{HEARTBEAT_TESTS}::test_a_type_with_a_callback_token_takes_heartbeats_that_carry_it_only",),
    ),
    Mutation(
        "retry-policy-ignored",
        "a failed attempt waits its type's retry back-off",
        SERVICES,
        "delay=retry_delay(locked.total_attempts, remaining, locked.retry)",
        "delay=retry_delay(locked.total_attempts, remaining)",
        (POLICY_TESTS,),
    ),
    Mutation(
        "max-retry-duration-ignored",
        "a failure past the type's max_retry_duration since created_at is final",
        SERVICES,
        "out_of_time = locked.retry.max_duration is not None and",
        "out_of_time = False and",
        (POLICY_TESTS,),
    ),
    Mutation(
        "backoff-doubles-forever",
        "the back-off's ceiling doubles max_doublings times at most",
        SERVICES,
        "min(attempts_used - 1, doublings, MAX_EXPONENT)",
        "min(attempts_used - 1, MAX_EXPONENT)",
        (POLICY_TESTS,),
    ),
    Mutation(
        "backoff-no-jitter",
        "a type's back-off is jittered: jobs failed together do not come back together",
        SERVICES,
        "return timedelta(seconds=random.uniform(*backoff_bounds(retry, max(1, exponent))))",
        "return timedelta(seconds=backoff_bounds(retry, max(1, exponent))[1])",
        (f"{POLICY_TESTS}::test_a_type_with_retry_settings_backs_off_between_its_bounds_with_full_jitter",),
    ),
    # --- schedules: docs/schedules.md ------------------------------------------------------
    Mutation(
        "schedule-tick-id",
        "a tick's job id is derived from (schedule, tick): a tick enqueued twice is one job",
        SCHEDULES,
        "jobs = [NewJob(tick_job_id(schedule.name, tick),",
        "jobs = [NewJob(new_job_id(),",
        SCHEDULE_TESTS,
    ),
    Mutation(
        "schedule-advance",
        "the schedule moves past now in the transaction that enqueues its ticks",
        SCHEDULES,
        "            store.advance_schedule(conn, schedule.name, due.next_tick, last, last_id)\n",
        "",
        SCHEDULE_TESTS,
    ),
    Mutation(
        "schedule-skip-grace",
        "skip: the latest due tick gets its job only when at most the grace late",
        TIMETABLE,
        "now - kept[-1] > MISFIRE_GRACE",
        "now - kept[-1] > MISFIRE_GRACE * 1000",
        SCHEDULE_TESTS,
    ),
    Mutation(
        "schedule-all-bound",
        "all: at most misfire_limit missed ticks are enqueued",
        TIMETABLE,
        'keep = schedule.misfire_limit if schedule.misfire == "all" else 1',
        'keep = SCAN_LIMIT if schedule.misfire == "all" else 1',
        SCHEDULE_TESTS,
    ),
    Mutation(
        "schedule-zone",
        "a cron expression is read in the schedule's time zone",
        TIMETABLE,
        "return _parse(definition.cron).next_after(after, zone_of(definition.time_zone))",
        "return _parse(definition.cron).next_after(after, zone_of(None))",
        SCHEDULE_TESTS,
    ),
    Mutation(
        "schedule-bad-row-isolated",
        "one schedule that cannot be evaluated never stops the others",
        SCHEDULES,
        "    except DatabaseUnavailable:\n        raise\n    except Exception as error:",
        "    except DatabaseUnavailable:\n        raise\n    except ZeroDivisionError as error:",
        SCHEDULE_TESTS,
    ),
    Mutation(
        "schedule-resume-from-now",
        "a resumed schedule starts at the next tick after now: the paused ticks are not misfires",
        SCHEDULES,
        "resumed = old.paused and not new.paused",
        "resumed = False",
        SCHEDULE_TESTS,
    ),
    # --- signed requests and callback scope (issue 16 items 5 and 6) -----------------------
    Mutation(
        "callback-token-batch",
        "a succeeded callback in the group commit is checked against its type's token",
        SERVICES,
        "allowed = [_token_accepted(tokens.get(name), presented) for _, name, presented in callbacks]",
        "allowed = [True for _ in callbacks]",
        TOKEN_TESTS,
    ),
    Mutation(
        "callback-token-alone",
        "a callback done alone (failed, or left by the batch) is checked against its type's token",
        BATCHING,
        "            services.check_callback_token(conn, name, callback_token)\n",
        "",
        TOKEN_TESTS,
    ),
    Mutation(
        "callback-token-any",
        "a callback must present its type's token, not just any token",
        SERVICES,
        'hmac.compare_digest(expected.encode(), (presented or "").encode("utf-8", "replace"))',
        "bool(presented)",
        TOKEN_TESTS,
    ),
    Mutation(
        "signing-too-old",
        "a webhook-timestamp more than the tolerance in the past is refused",
        SIGNING,
        "if int(stamp) < now - tolerance:",
        "if int(stamp) < now - tolerance - 1:",
        SIGNING_TESTS,
    ),
    Mutation(
        "signing-too-new",
        "a webhook-timestamp more than the tolerance in the future is refused",
        SIGNING,
        "if int(stamp) > now + tolerance:",
        "if int(stamp) > now + 2 * tolerance:",
        SIGNING_TESTS,
    ),
    Mutation(
        "signing-every-secret",
        "during a rotation every secret signs, so a downstream holding either verifies",
        SIGNING,
        '" ".join(signature(secret, msg_id, timestamp, body) for secret in secrets)',
        "signature(secrets[0], msg_id, timestamp, body)",
        SIGNING_TESTS,
    ),
    Mutation(
        "signing-version",
        "only v1 signatures are checked: the right digest under another scheme's name is refused",
        SIGNING,
        "if version != VERSION:",
        "if not version:",
        SIGNING_TESTS,
    ),
    Mutation(
        "signing-type-secrets-first",
        "a type's own signing secrets replace the global ones",
        DOWNSTREAM,
        "signing_secrets or self.signing_secrets",
        "self.signing_secrets or signing_secrets",
        SIGNING_TESTS,
    ),
    Mutation(
        "webhook-id-per-attempt",
        "webhook-id names the attempt: the next attempt of a job is a new message",
        DOWNSTREAM,
        'return f"{job.job_id}-{job.attempts}"',
        "return job.job_id",
        SIGNING_TESTS,
    ),
]

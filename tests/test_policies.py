"""jobrunner.policies as plain functions: the defaults it promises and the words it shows."""

import pytest

from jobrunner import policies
from jobrunner.errors import InvalidField
from jobrunner.models import DEFAULT_POLICY, TypePolicy


@pytest.mark.parametrize(("per_second", "burst", "bucket"), [(None, None, None), (0.5, None, 1), (1.0, None, 1), (20.5, None, 21), (20.0, 3, 3)])
def test_a_rate_limits_bucket_holds_one_seconds_worth_unless_its_burst_is_set(per_second, burst, bucket):
    assert policies.effective_burst(TypePolicy(rate_per_second=per_second, rate_burst=burst)) == bucket


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "0.25s"), (90, "90s"), (120, "2m"), (5400, "90m"), (7200, "2h"), (86400, "1d"), (172800.0, "2d")])
def test_durations_are_shown_in_the_largest_unit_that_divides_them(seconds, text):
    assert policies.duration(seconds) == text


def test_no_settings_describe_to_nothing_and_all_of_them_to_a_line():
    assert policies.describe(policies.policy_json(DEFAULT_POLICY)) == []
    policy = policies.apply(DEFAULT_POLICY, {
        "downstream_url": "http://b.example/", "downstream_timeout": 5, "job_timeout": 3600,
        "retry": {"min_backoff": 0.5, "max_backoff": 600, "max_doublings": 6, "max_retry_duration": 86400},
        "rate_limit": {"per_second": 2, "burst": 4}, "callback_token": "k" * 16,
        "signing_secrets": ["whsec_" + "A" * 32],
    })
    assert ", ".join(policies.describe(policies.policy_json(policy))) == (
        "to http://b.example, answer within 5s, callback within 1h, retry min 0.5s max 10m 6 doublings for 1d, "
        "2/s burst 4, callback token, signed (1 secret)"
    )


def test_a_python_caller_gets_the_same_checks_as_the_api():
    with pytest.raises(InvalidField, match="rate_limt"):
        policies.apply(DEFAULT_POLICY, {"rate_limt": {}})
    with pytest.raises(InvalidField, match="job_timeout"):
        policies.apply(DEFAULT_POLICY, {"job_timeout": float("nan")})
    assert policies.apply(TypePolicy(job_timeout=60.0), {"job_timeout": None}) == DEFAULT_POLICY

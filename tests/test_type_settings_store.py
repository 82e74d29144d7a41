"""The store of job-type settings: a side table, one row per type that has any."""

from jobrunner import store
from jobrunner.models import DEFAULT_POLICY, TypePolicy

from conftest import make_type


def test_a_type_without_settings_has_the_default_policy_and_no_row(conn):
    make_type(conn, "email")
    assert store.job_type_policy(conn, "email") == DEFAULT_POLICY
    assert store.job_type_policies(conn) == {}


def test_a_saved_policy_reads_back_whole_and_notifies_the_workers(conn, connect):
    make_type(conn, "email")
    make_type(conn, "sms")
    listener = connect()
    listener.execute("LISTEN jobrunner_types")
    policy = TypePolicy(
        downstream_url="https://a.example/base",
        downstream_timeout=2.5,
        job_timeout=3600.0,
        retry_min_backoff=0.5,
        retry_max_backoff=60.0,
        retry_max_doublings=4,
        retry_max_duration=86400.0,
        rate_per_second=0.5,
        rate_burst=3,
        callback_token="t" * 32,
        signing_secrets=("whsec_a", "whsec_b"),
    )
    store.save_job_type_policy(conn, "email", policy)
    assert store.job_type_policy(conn, "email") == policy
    assert store.job_type_policies(conn) == {"email": policy}
    assert store.job_type_policy(conn, "sms") == DEFAULT_POLICY
    assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["email"]


def test_saving_the_default_policy_deletes_the_row(conn):
    make_type(conn, "email")
    store.save_job_type_policy(conn, "email", TypePolicy(job_timeout=10.0))
    store.save_job_type_policy(conn, "email", DEFAULT_POLICY)
    assert store.job_type_policies(conn) == {}

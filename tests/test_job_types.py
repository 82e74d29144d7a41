"""Job types: create with validation, get, list, change attempts and concurrency while running."""

import pytest
from conftest import make_type

from jobrunner import services
from jobrunner.errors import InvalidField, JobTypeExists, NotPaused, UnknownJobType


def test_create_get_and_list(conn):
    created = services.create_job_type(conn, "email", "at_least_once", 3, 5)
    services.create_job_type(conn, "charge", "at_most_once", 1, 0)

    assert (created.name, created.delivery_strategy, created.attempts, created.concurrency) == ("email", "at_least_once", 3, 5)
    assert created.created_at is not None
    assert services.get_job_type(conn, "email") == created
    assert [t.name for t in services.list_job_types(conn)] == ["charge", "email"]


def test_a_name_is_taken_once(conn):
    make_type(conn, "email")
    with pytest.raises(JobTypeExists, match="'email' already exists"):
        make_type(conn, "email")


def test_unknown_type(conn):
    with pytest.raises(UnknownJobType, match="'nope' does not exist"):
        services.get_job_type(conn, "nope")
    with pytest.raises(UnknownJobType):
        services.update_job_type(conn, "nope", concurrency=1)


@pytest.mark.parametrize(
    "name, strategy, attempts, concurrency, field",
    [
        ("", "at_least_once", 1, 1, "name"),
        (None, "at_least_once", 1, 1, "name"),
        ("has space", "at_least_once", 1, 1, "name"),
        ("a/b", "at_least_once", 1, 1, "name"),
        ("job_thing", "at_least_once", 1, 1, "name"),
        ("random_id", "at_least_once", 1, 1, "name"),
        ("-leading-dash", "at_least_once", 1, 1, "name"),
        ("x" * 101, "at_least_once", 1, 1, "name"),
        ("ok", "", 1, 1, "delivery_strategy"),
        ("ok", "exactly_once", 1, 1, "delivery_strategy"),
        ("ok", "at_least_once", 0, 1, "attempts"),
        ("ok", "at_least_once", 256, 1, "attempts"),
        ("ok", "at_least_once", True, 1, "attempts"),
        ("ok", "at_least_once", 1.5, 1, "attempts"),
        ("ok", "at_least_once", "3", 1, "attempts"),
        ("ok", "at_least_once", 1, -1, "concurrency"),
        ("ok", "at_least_once", 1, 32768, "concurrency"),
        ("ok", "at_least_once", 1, None, "concurrency"),
    ],
)
def test_invalid_fields_are_refused_with_the_field_named(conn, name, strategy, attempts, concurrency, field):
    with pytest.raises(InvalidField) as raised:
        services.create_job_type(conn, name, strategy, attempts, concurrency)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"Invalid {field}: ")
    assert services.list_job_types(conn) == []


def test_names_may_use_url_safe_punctuation(conn):
    assert services.create_job_type(conn, "Billing.invoice-v2_x", "at_least_once", 1, 1).name == "Billing.invoice-v2_x"


def test_update_attempts_and_concurrency(conn):
    make_type(conn, attempts=3, concurrency=5)
    assert services.update_job_type(conn, "email", concurrency=0).concurrency == 0
    updated = services.update_job_type(conn, "email", attempts=7)
    assert (updated.attempts, updated.concurrency) == (7, 0)
    assert services.get_job_type(conn, "email") == updated


def test_update_is_validated(conn):
    make_type(conn, "charge", strategy="at_most_once", attempts=1)
    with pytest.raises(InvalidField, match="attempts"):
        services.update_job_type(conn, "charge", attempts=0)
    with pytest.raises(InvalidField, match="concurrency"):
        services.update_job_type(conn, "charge", concurrency=-2)
    with pytest.raises(InvalidField, match="give attempts, concurrency or both"):
        services.update_job_type(conn, "charge")
    assert services.get_job_type(conn, "charge").attempts == 1


def test_at_most_once_types_may_have_several_attempts(conn):
    # used only for attempts that certainly never reached the downstream (Rickover required 1)
    assert services.create_job_type(conn, "charge", "at_most_once", 3, 1).attempts == 3
    assert services.update_job_type(conn, "charge", attempts=5).attempts == 5


def test_new_attempts_apply_to_jobs_enqueued_afterwards(conn):
    from conftest import new_id

    make_type(conn, attempts=3)
    before = services.enqueue(conn, new_id(), "email", {})
    services.update_job_type(conn, "email", attempts=6)
    after = services.enqueue(conn, new_id(), "email", {})
    assert (services.get_job(conn, before.id).attempts, after.attempts) == (3, 6)


def test_pause_keeps_the_concurrency_and_resume_gives_it_back(conn):
    make_type(conn, "email", concurrency=7)

    assert services.pause_job_type(conn, "email").concurrency == 0
    assert services.pause_job_type(conn, "email").concurrency == 0  # a second pause keeps the first's memory
    assert services.resume_job_type(conn, "email").concurrency == 7
    assert services.resume_job_type(conn, "email").concurrency == 7  # not paused: left as it is


def test_resuming_a_paused_type_with_a_concurrency_uses_that_concurrency_not_the_remembered_one(conn):
    """docs/api.md: resume gives back the concurrency before the pause, "or the one given"."""
    make_type(conn, "email", concurrency=7)
    services.pause_job_type(conn, "email")
    assert services.resume_job_type(conn, "email", concurrency=3).concurrency == 3
    assert services.get_job_type(conn, "email").concurrency == 3
    services.pause_job_type(conn, "email")
    assert services.resume_job_type(conn, "email").concurrency == 3  # the explicit value was the one remembered next


def test_resume_with_a_concurrency_and_a_type_stopped_by_hand(conn):
    make_type(conn, "email", concurrency=7)
    services.update_job_type(conn, "email", concurrency=0)  # stopped by hand: nothing to go back to
    with pytest.raises(NotPaused):
        services.resume_job_type(conn, "email")
    assert services.resume_job_type(conn, "email", concurrency=3).concurrency == 3

    services.pause_job_type(conn, "email")
    services.update_job_type(conn, "email", concurrency=2)  # set by hand while paused: it wins
    assert services.resume_job_type(conn, "email").concurrency == 2
    with pytest.raises(InvalidField, match="concurrency"):
        services.resume_job_type(conn, "email", concurrency=0)
    with pytest.raises(UnknownJobType):
        services.pause_job_type(conn, "nope")

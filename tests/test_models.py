"""Job ids: `job_<uuid>` as Rickover parses them, with its rough edges fixed."""

import uuid

import pytest

from jobrunner.errors import InvalidJobId
from jobrunner.models import format_job_id, new_job_id, parse_job_id

RICKOVER_GENERATED = "job_4f353315-49b5-4d59-7847-1c2340f285b9"  # wrong variant bits, still valid


@pytest.mark.parametrize(
    "job_id",
    [
        "job_6740b44e-13b9-475d-af06-979627e0e0d6",
        RICKOVER_GENERATED,
        "job_6740B44E-13B9-475D-AF06-979627E0E0D6",  # upper case (Rickover refused it)
        "job_01890a5d-ac96-774b-bcce-b302099a8057",  # UUIDv7 (Rickover refused it)
    ],
)
def test_valid_ids(job_id):
    parsed = parse_job_id(job_id)
    assert format_job_id(parsed) == job_id.lower()


@pytest.mark.parametrize(
    "job_id, message, wrong_prefix",
    [
        ("job_123", 'Could not parse "job_123" as a UUID with a prefix', False),
        ("jb_6740b44e-13b9-475d-af06-979627e0e0d6", "Please use job_ for the uuid prefix, not jb_", True),
        ("6740b44e-13b9-475d-af06-979627e0e0d6", "Please use job_ for the uuid prefix, not ", True),
        ("job_x6740b44e-13b9-475d-af06-979627e0e0d6", "Please use job_ for the uuid prefix, not job_x", True),
        ("job_00000000-0000-0000-0000-000000000000", "Invalid UUID string", False),
        ("job_6740b44e-13b9-975d-af06-979627e0e0d6", "Invalid UUID string", False),
        ("job_6740b44g-13b9-475d-af06-979627e0e0d6", "Invalid UUID string", False),
        ("job_6740b44e+13b9-475d-af06-979627e0e0d6", "Invalid UUID string", False),
        # the right prefix and no UUID after it: the uuid is wrong, not the prefix
        ("job_not-a-uuid-at-all-but-long-enough-000", "Invalid UUID string", False),
        ("job_6740b44e-13b9-475d-af06-979627e0e0d6-extra", "Invalid UUID string", False),
    ],
)
def test_invalid_ids_say_what_is_wrong(job_id, message, wrong_prefix):
    with pytest.raises(InvalidJobId) as raised:
        parse_job_id(job_id)
    assert str(raised.value).startswith(message)
    assert raised.value.wrong_prefix is wrong_prefix


def test_new_ids_are_valid_rfc4122_version_4():
    job_uuid = new_job_id()
    assert (job_uuid.version, job_uuid.variant) == (4, uuid.RFC_4122)
    assert parse_job_id(format_job_id(job_uuid)) == job_uuid


def nested(depth: int):
    value = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_data_may_nest_up_to_the_limit_and_not_deeper():
    from jobrunner.errors import InvalidField
    from jobrunner.models import MAX_DATA_DEPTH, validate_data

    assert validate_data(nested(MAX_DATA_DEPTH)) == nested(MAX_DATA_DEPTH)
    assert validate_data(None) is None and validate_data([]) == []
    with pytest.raises(InvalidField, match="nested at most"):
        validate_data(nested(MAX_DATA_DEPTH + 1))
    with pytest.raises(InvalidField):
        validate_data([1, 2, nested(MAX_DATA_DEPTH + 1)])  # deep anywhere, not only first

"""get_sleep_duration(): the idle back-off of a worker."""

from datetime import timedelta

import pytest

from jobrunner.services import DEFAULT_TIMEOUT, UNAVAILABLE_SLEEP_FACTOR, get_sleep_duration

MS = timedelta(milliseconds=1)


def test_constants():
    assert DEFAULT_TIMEOUT == timedelta(minutes=5)
    assert UNAVAILABLE_SLEEP_FACTOR == 500 * MS


@pytest.mark.parametrize(
    "sleep_factor, failed_attempts, expected",
    [
        (2, 0, 10 * MS),
        (2, 1, 20 * MS),
        (2, 3, 80 * MS),
        (2, 10, 10240 * MS),
        (2, 11, 10240 * MS),  # the multiplier is capped at 2^10
        (2, 10**6, 10240 * MS),  # and never overflows
        (1.5, 2, 22.5 * MS),
        (1, 50, 10 * MS),
        (0.5, 1, 5 * MS),
    ],
)
def test_ten_milliseconds_times_factor_to_the_attempts_jittered(sleep_factor, failed_attempts, expected):
    samples = [get_sleep_duration(sleep_factor, failed_attempts) for _ in range(300)]
    assert all(0.8 * expected <= sample <= 1.2 * expected for sample in samples)
    # jitter really spreads the samples, both ways
    assert min(samples) < 0.9 * expected and max(samples) > 1.1 * expected


def test_jitter_is_uniform_between_the_bounds():
    # 4,000 samples: the share below the middle is 0.5 +- 0.008 (one standard deviation)
    samples = [get_sleep_duration(2, 0) / (10 * MS) for _ in range(4000)]
    low = sum(s < 1.0 for s in samples) / len(samples)
    assert 0.45 < low < 0.55


@pytest.mark.parametrize("failed_attempts", [0, 1, 30])
def test_factor_zero_means_no_sleep(failed_attempts):
    assert get_sleep_duration(0, failed_attempts) == timedelta(0)

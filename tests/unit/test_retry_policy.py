"""The retry policy: tenacity's jittered exponential wait from the stored attempt count, Retry-After, limits."""

from __future__ import annotations

import email.utils

from adapter.config import RetrySettings
from adapter.forwarder import RetryPolicy
from adapter.targets import parse_retry_after

POLICY = RetryPolicy(RetrySettings(max_attempts=5, initial_seconds=1.0, max_seconds=30.0, max_age_seconds=3600.0))


def test_backoff_grows_with_the_stored_attempt_count_up_to_the_cap() -> None:
    lows = [min(POLICY.delay(n, None) for _ in range(20)) for n in (1, 3, 5, 12)]
    assert 1.0 <= lows[0] <= 2.0  # initial, plus at most one second of jitter
    assert 4.0 <= lows[1] <= 5.0
    assert lows[2] >= 16.0
    assert max(POLICY.delay(12, None) for _ in range(20)) <= 30.0  # the cap holds, jitter included


def test_retry_after_is_a_floor_within_the_cap() -> None:
    assert POLICY.delay(1, 10.0) >= 10.0
    assert POLICY.delay(1, 100_000.0) == 30.0  # a bad header cannot park a row for days


def test_limits_by_attempts_and_by_age() -> None:
    assert POLICY.gives_up(4, 10.0) is None
    assert POLICY.gives_up(5, 10.0) == "gave up after 5 attempts"
    assert POLICY.gives_up(1, 3600.0) == "gave up after 3600 s undelivered"


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = email.utils.formatdate(1_800_000_060, usegmt=True)
    assert parse_retry_after(date, now=1_800_000_000) == 60.0
    assert parse_retry_after(date, now=1_800_000_100) == 0.0  # a date in the past: now

"""Write failures: reasons for the metric, a bounded rate of warnings, and "full"."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3

import pytest

from pullthrough.cache.space import REASONS, WARN_EVERY_SECONDS, WriteFailures, reason_of


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (oserror(errno.ENOSPC), "no_space"),
        (oserror(errno.EDQUOT), "quota"),
        (oserror(errno.EIO), "io"),
        (oserror(errno.EROFS), "read_only"),
        (oserror(errno.EACCES), "permission"),
        (oserror(errno.ENAMETOOLONG), "other"),
        (sqlite3.OperationalError("database or disk is full"), "no_space"),
        (sqlite3.OperationalError("disk I/O error"), "io"),
    ],
)
def test_reasons_are_a_small_fixed_set(error: Exception, reason: str) -> None:
    assert reason_of(error) == reason
    assert reason in REASONS


def test_warnings_are_rate_limited_and_say_how_many_were_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    counted: list[str] = []
    failures = WriteFailures(counted.append, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="pullthrough.cache.space"):
        for _ in range(5):
            failures.record("blob sha256:x", oserror(errno.ENOSPC))
        failures.record("blob sha256:y", oserror(errno.EIO))  # another reason: its own
        now[0] += WARN_EVERY_SECONDS + 1
        failures.record("blob sha256:z", oserror(errno.ENOSPC))
    assert counted == ["no_space"] * 5 + ["io", "no_space"]  # every one is counted
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "4 more since the last warning" in messages[2]


def test_full_until_something_is_kept_again() -> None:
    failures = WriteFailures()
    seen = []
    failures.record("blob", oserror(errno.EIO))
    seen.append(failures.full)
    failures.record("blob", oserror(errno.EDQUOT))
    seen.append(failures.full)
    failures.committed()
    seen.append(failures.full)
    assert seen == [False, True, False]

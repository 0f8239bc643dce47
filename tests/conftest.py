"""Shared fixtures. Under CI (``CI`` set) a missing component fails a test; it never skips."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings


def missing(what: str) -> None:
    """Skip locally, fail under CI: CI must have every component installed."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, and under CI nothing may be skipped")
    pytest.skip(f"{what} is missing")


# Property tests explore new random examples locally; under CI they replay a fixed sequence, so
# a run's verdict depends on the code, not on the draw (a failure found locally is kept in
# hypothesis's example database and becomes a regular test case).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="also run the longer tier (tests marked long: more crash points)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``--long`` the tests marked ``long`` are deselected (not skipped: the PR tier
    simply does not contain them)."""
    if config.getoption("--long"):
        return
    long = [item for item in items if item.get_closest_marker("long") is not None]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if item.get_closest_marker("long") is None]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures the tests measured (fault cases, crash points, rejected images...)."""
    from tests.figures import FIGURES

    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for topic, lines in FIGURES.items():
        for line in lines:
            terminalreporter.write_line(line if line.startswith(topic) else f"{topic}: {line}")


def mode_of(path: Path) -> int:
    """A file's permission bits, not following a symlink."""
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask for the test (children such as qemu-img and `blockctl up` inherit
    it): what blockctl creates must be owner-only under either."""
    value: int = request.param
    old = os.umask(value)
    try:
        yield value
    finally:
        os.umask(old)

"""Shared fixtures. Under CI (``CI`` set) a missing component fails a test; it never skips."""

from __future__ import annotations

import os
import secrets
import stat
import threading
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import Phase, settings


def missing(what: str) -> None:
    """Skip locally, fail under CI: CI must have every component installed."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, and under CI nothing may be skipped")
    pytest.skip(f"{what} is missing")


# Property tests draw fresh examples on every run, locally and under CI (a fixed sequence
# would test the same few thousand inputs forever). Under CI every run has one seed, printed
# in the header (pytest_report_header) and on a failure (print_blob: the failing example as
# a @reproduce_failure blob), so a failure is replayed with
# `pytest --hypothesis-seed=SEED`. A failure found locally is kept in hypothesis's example
# database and tried first next time.
settings.register_profile("ci", derandomize=False, print_blob=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
# Mutation testing (scripts/mutation-score, `--hypothesis-profile=mutation`): the same fixed
# sequence, no shrinking (the first failing example kills the mutant; shrinking it only costs
# time), no example database (every mutant starts alike) and no deadline (a slow run on a
# loaded machine must not count as a kill).
settings.register_profile(
    "mutation",
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
)


# scripts/mutation-score sets BLOCKCTL_MUTATION_TEST_LIMIT (seconds). In a mutant's worker
# (mutmut names the mutant in MUTANT_UNDER_TEST; its stats and clean runs are not timed) a test
# that runs longer than that is stopped: the worker exits with mutmut's "timeout" code, which
# counts as killed, as mutmut's own timeout does. A mutant that stalls a job would otherwise
# make its test wait for the job's deadline, or mutmut's timeout for the sum of all the tests
# that reach the function (about 20 s for `_jobs`); the slowest unit test in scope takes 0.6 s.
MUTMUT_TIMEOUT_EXIT = 36  # mutmut.stats.status_by_exit_code: "timeout"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    limit = os.environ.get("BLOCKCTL_MUTATION_TEST_LIMIT")
    if not limit or "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return (yield)
    # A thread, not SIGALRM: an exception raised in the event loop could be caught by the code
    # under test (or by the mutant), and the test would go on waiting.
    watchdog = threading.Timer(float(limit), os._exit, args=(MUTMUT_TIMEOUT_EXIT,))
    watchdog.daemon = True
    watchdog.start()
    try:
        return (yield)
    finally:
        watchdog.cancel()


def pytest_configure(config: pytest.Config) -> None:
    """Under CI without ``--hypothesis-seed``: draw this run's seed (reported in the header)."""
    if os.environ.get("CI") and config.getoption("hypothesis_seed", None) is None:
        import hypothesis.core

        seed = secrets.randbits(32)
        config.option.hypothesis_seed = str(seed)
        hypothesis.core.global_force_seed = seed  # type: ignore[assignment]


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("hypothesis_seed", None)
    if seed is None:
        return None
    return f"hypothesis seed: {seed} (to replay this run's examples: --hypothesis-seed={seed})"


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

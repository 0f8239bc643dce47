"""Figures the suite prints at its end (the README's "Reliability" section quotes them).

A test that measures something adds one line with :func:`report`; ``pytest_terminal_summary``
in ``tests/conftest.py`` prints every line under one heading, whatever the capture mode.

A figure is computed from checks, never written as text: a :class:`Tally` records, per case,
which of its checks passed. A case counts as passed only when it reached its end with every
check recorded (an assertion that fails leaves the case tried but not passed), and a phrase
such as "no node left" is printed with the number of cases whose check held
(:meth:`Tally.phrases`). A figure test calls :func:`require_any` (a selection that tried
nothing has no figure, and fails rather than printing one) and :meth:`Tally.require_cases`
(every selected case was tried).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

#: topic -> lines, in the order the tests reported them.
FIGURES: dict[str, list[str]] = {}


def report(topic: str, line: str) -> None:
    """Record one figure line under ``topic`` (for example ``"fault injection"``)."""
    FIGURES.setdefault(topic, []).append(line)


class Tally:
    """The cases behind one figure, and which of their checks passed.

    ``checks`` maps each check's key to the phrase the figure prints for it (``"bytes":
    "the device read the same"``). A case runs in ``with tally.case(name) as ok:`` and
    calls ``ok.add(key)`` right after the assertion of that check; the case is recorded
    when the block ends without an exception.
    """

    def __init__(self, checks: Mapping[str, str]) -> None:
        self.checks = dict(checks)
        self.tried: list[str] = []
        self.passed: dict[str, frozenset[str]] = {}
        self.required: dict[str, frozenset[str]] = {}

    @contextmanager
    def case(self, name: str, required: frozenset[str] | None = None) -> Iterator[set[str]]:
        """One case; ``required``: the checks it must run (default: every declared one)."""
        assert name not in self.tried, f"two cases named {name!r}: one would hide the other"
        self.tried.append(name)
        self.required[name] = frozenset(self.checks) if required is None else required
        done: set[str] = set()
        yield done
        unknown = done - set(self.checks)
        assert not unknown, f"{name}: checks not declared for the figure: {unknown}"
        missing = self.required[name] - done
        assert not missing, f"{name}: ended without running the checks {sorted(missing)}"
        self.passed[name] = frozenset(done)

    def held(self, check: str) -> int:
        """Cases that passed and ran ``check`` (and saw it hold)."""
        return sum(check in done for done in self.passed.values())

    def complete(self) -> list[str]:
        """Cases that passed with every check they required, in the order they ran."""
        return [name for name, done in self.passed.items() if done >= self.required[name]]

    def failed(self) -> list[str]:
        return [name for name in self.tried if name not in self.passed]

    def require_cases(self, expected: int) -> None:
        """Every case the selection holds (``expected``) was tried: a test that returned
        before its case began, or ran twice, fails the figure."""
        assert len(self.tried) == expected, f"{len(self.tried)} cases tried, {expected} selected"

    def phrases(self, *only: str) -> str:
        """``phrase (n of m)`` for each check, ``m`` the cases tried that require it: "the
        device read the same (48 of 48)" is true of what ran, whatever failed."""
        keys = only or tuple(self.checks)
        out = []
        for k in keys:
            total = sum(k in self.required[name] for name in self.tried)
            out.append(f"{self.checks[k]} ({self.held(k)} of {total})")
        return ", ".join(out)

    def summary(self) -> str:
        """``n of m cases passed every check`` and, if any did not, which."""
        complete, failed = self.complete(), self.failed()
        text = f"{len(complete)} of {len(self.tried)} cases passed every check"
        if failed:
            text += f" (failed: {', '.join(failed)})"
        return text


def require_any(*tallies: Tally) -> None:
    """A figure needs cases: a selection that tried none has no figure, and fails."""
    assert any(t.tried for t in tallies), "no case was tried: there is no figure to print"

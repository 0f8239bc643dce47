"""Figures the suite prints at its end (the README's "Reliability" section quotes them).

A test that measures something adds one line with :func:`report`; ``pytest_terminal_summary``
in ``tests/conftest.py`` prints every line under one heading, whatever the capture mode.
"""

from __future__ import annotations

#: topic -> lines, in the order the tests reported them.
FIGURES: dict[str, list[str]] = {}


def report(topic: str, line: str) -> None:
    """Record one figure line under ``topic`` (for example ``"fault injection"``)."""
    FIGURES.setdefault(topic, []).append(line)

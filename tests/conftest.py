"""Shared fixtures. Under CI (``CI`` set) a missing component fails a test; it never skips."""

from __future__ import annotations

import os

import pytest


def missing(what: str) -> None:
    """Skip locally, fail under CI: CI must have every component installed."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, and under CI nothing may be skipped")
    pytest.skip(f"{what} is missing")

"""Logging conventions: structlog events named ``blockctl.<area>.<event>`` with key-value fields.

This module never configures structlog; the CLI (or the embedding application) does.
"""

from __future__ import annotations

from typing import Any

import structlog


def get_logger(**initial: Any) -> Any:
    """The blockctl logger, with ``initial`` fields bound to every event it emits."""
    # Lazy: the real logger is built on first use, so a structlog.configure() made later (by
    # the CLI or the embedding application) still applies to module-level loggers.
    return structlog.get_logger("blockctl", **initial)

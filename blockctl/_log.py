"""Logging conventions: structlog events named ``blockctl.<area>.<event>`` with key-value fields.

This module never configures structlog; the CLI (or the embedding application) does.
"""

from __future__ import annotations

from typing import Any

import structlog


def get_logger(**initial: Any) -> Any:
    """The blockctl logger, with ``initial`` fields bound to every event it emits."""
    return structlog.get_logger("blockctl").bind(**initial)

"""Logging conventions: structlog events named ``blockctl.<area>.<event>`` with key-value fields.

A library must not print unless its application asks: blockctl's events go nowhere until
structlog is configured (``structlog.configure(...)``, any configuration; the CLI does it for
``-v`` and ``--log-json``). An unconfigured structlog would print every event, debug ones and
whole QMP replies included, to stdout. This module never configures structlog itself.
"""

from __future__ import annotations

from typing import Any

import structlog


class _Logger:
    """A structlog logger that drops events while structlog is unconfigured.

    The real logger is looked up on every event, so a ``structlog.configure()`` made after
    import (by the CLI, by the embedding application, by ``structlog.testing.capture_logs``)
    applies to module-level loggers too.
    """

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context

    def bind(self, **values: Any) -> _Logger:
        return _Logger({**self._context, **values})

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            logger = structlog.get_logger("blockctl", **self._context)
            getattr(logger, level)(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit("exception", event, fields)


def get_logger(**initial: Any) -> _Logger:
    """The blockctl logger, with ``initial`` fields bound to every event it emits."""
    return _Logger(dict(initial))

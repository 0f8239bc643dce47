"""Logging conventions: structlog events named ``blockctl.<area>.<event>`` with key-value fields.

A library must not print unless its application asks: blockctl's events go nowhere until
structlog is configured (``structlog.configure(...)``, any configuration; the CLI does it for
``-v`` and ``--log-json``). An unconfigured structlog would print every event, debug ones and
whole QMP replies included, to stdout. This module never configures structlog itself, and
never imports it: an application that did not import structlog has not configured it either.

An application that shows only some events (the command line: warnings, unless ``-v``) can
leave its configuration to the first event it shows (:func:`configure_on_demand`); a run that
shows nothing then never imports structlog (its package imports its console renderer, and that
imports rich: the largest single part of a short command's start-up).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

#: stdlib ``logging`` levels, by method name.
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "exception": 40}

#: The level from which events need structlog configured, and what configures it (called with
#: that level), or None: see :func:`configure_on_demand`.
_on_demand: tuple[int, Callable[[int], None]] | None = None


def configure_on_demand(level: int, configure: Callable[[int], None]) -> None:
    """Call ``configure(level)`` just before the first event at ``level`` or above (``logging``
    levels) if structlog is not configured by then; events below ``level`` are dropped
    meanwhile, as a logger filtering at ``level`` would drop them."""
    global _on_demand
    _on_demand = (level, configure)


def raise_level_on_demand(level: int) -> bool:
    """Raise the level of the pending :func:`configure_on_demand` to ``level`` (it configures
    for that level if it happens); False if no configuration is pending."""
    global _on_demand
    if _on_demand is None:
        return False
    _on_demand = (max(level, _on_demand[0]), _on_demand[1])
    return True


def _structlog(level: str) -> Any:
    """structlog, if an event at ``level`` is to go to it; None if not."""
    global _on_demand
    structlog = sys.modules.get("structlog")
    if structlog is not None and structlog.is_configured():
        return structlog
    if _on_demand is None or _LEVELS[level] < _on_demand[0]:
        return None
    threshold, configure = _on_demand
    _on_demand = None
    configure(threshold)
    return sys.modules["structlog"]


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
        structlog = _structlog(level)
        if structlog is not None:
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

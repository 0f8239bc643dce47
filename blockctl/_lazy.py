"""Imports made on first use, so that a short command does not pay for the whole package.

Two tools, both for the start-up of ``import blockctl`` and of the ``blockctl`` command:

- :func:`exports` gives a package's ``__init__`` a PEP 562 ``__getattr__`` and ``__dir__``:
  ``from blockctl import open_vm`` imports ``blockctl._machine`` then, not at ``import blockctl``
  (which every ``import blockctl.X`` runs first). The names stay the same objects and
  ``__all__`` stays the curated list; the module keeps the real imports under
  ``if TYPE_CHECKING:`` for type checkers, and a unit test checks that the two name the same
  objects.
- :func:`module` returns a module that is imported (executed) when one of its attributes is
  first read (:class:`importlib.util.LazyLoader`). The command line uses it for the modules only
  some commands need. The first read must not race another thread's (Python 3.11's
  ``LazyLoader`` is not thread-safe): the command line reads them in its main thread.
  The layers contract (import-linter) sees neither the name nor the ``TYPE_CHECKING`` import
  beside it, so only the top layer (the command line) uses it, for modules below it.

``python -X importtime -m blockctl status VM`` shows what a command imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

__all__ = ["exports", "module"]


def exports(
    package: str, origins: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose public names are imported on first
    use. ``origins`` maps a module to the names it gives (``"backup as create"``: an alias)."""
    where: dict[str, tuple[str, str]] = {}
    for origin, names in origins.items():
        for entry in names:
            name, _, alias = entry.partition(" as ")
            where[alias or name] = (origin, name)

    def __getattr__(name: str) -> Any:
        try:
            origin, attribute = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(origin), attribute)
        setattr(sys.modules[package], name, value)  # the next read is a plain one
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__


def module(name: str) -> ModuleType:
    """The module ``name``, executed when one of its attributes is first read."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    lazy = importlib.util.module_from_spec(spec)
    sys.modules[name] = lazy
    loader.exec_module(lazy)
    parent, _, child = name.rpartition(".")
    if parent:  # as the import system does: the package holds its submodule
        setattr(sys.modules[parent], child, lazy)
    return lazy

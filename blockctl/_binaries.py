"""Which QEMU programs blockctl runs: the one place that reads the environment for them.

Each program is, in order: its own variable (``BLOCKCTL_QEMU_SYSTEM``, ``BLOCKCTL_QEMU_IMG``,
``BLOCKCTL_QEMU_IO``, ``BLOCKCTL_QEMU_NBD``, ``BLOCKCTL_QEMU_STORAGE_DAEMON``); else
``$BLOCKCTL_QEMU_PREFIX/bin/<program>`` (a QEMU installed beside the system's, e.g. by
``scripts/install-qemu10``); else the program's name, looked up on PATH.
An empty variable counts as unset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final, Literal

from blockctl.errors import ConfigError

Program = Literal["qemu-system-x86_64", "qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"]

PROGRAMS: Final[tuple[Program, ...]] = (
    "qemu-system-x86_64",
    "qemu-img",
    "qemu-io",
    "qemu-nbd",
    "qemu-storage-daemon",
)
ENV_VARS: Final[dict[Program, str]] = {
    "qemu-system-x86_64": "BLOCKCTL_QEMU_SYSTEM",
    "qemu-img": "BLOCKCTL_QEMU_IMG",
    "qemu-io": "BLOCKCTL_QEMU_IO",
    "qemu-nbd": "BLOCKCTL_QEMU_NBD",
    "qemu-storage-daemon": "BLOCKCTL_QEMU_STORAGE_DAEMON",
}
PREFIX_VAR: Final = "BLOCKCTL_QEMU_PREFIX"
_PACKAGES: Final[dict[Program, str]] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
}


#: The configuration file's ``[qemu]`` table: ``prefix = "/opt/qemu-10"`` and/or per-program
#: paths (``qemu-system-x86_64 = "..."``, ``qemu-img = "..."``, ...). Environment variables win.
CONFIG_VAR: Final = "BLOCKCTL_CONFIG"


def config_path() -> Path:
    """``$BLOCKCTL_CONFIG``, else ``$XDG_CONFIG_HOME/blockctl/config.toml`` (or ~/.config/...)."""
    explicit = os.environ.get(CONFIG_VAR)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "blockctl" / "config.toml"


def _configured() -> dict[str, str]:
    path = config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError("config", f"{path}: {exc}") from None
    import tomllib  # here: most runs have no config file (tomllib is some 2 ms of a start-up)

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path}: {exc}") from None
    table = data.get("qemu", {})
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ConfigError("config", f"{path}: [qemu] holds strings: prefix, or program paths")
    unknown = set(table) - {"prefix", *PROGRAMS}
    if unknown:
        raise ConfigError(
            "config",
            f"{path}: unknown [qemu] keys {sorted(unknown)}; known: prefix, {', '.join(PROGRAMS)}",
        )
    return dict(table)


def binary(program: Program) -> str:
    """The command to run for ``program`` (a path, or a bare name for PATH lookup).

    In order: its environment variable, ``$BLOCKCTL_QEMU_PREFIX/bin/<program>``, the
    configuration file's ``[qemu]`` path for it, then its ``prefix``, then PATH.
    """
    explicit = os.environ.get(ENV_VARS[program])
    if explicit:
        return explicit
    prefix = os.environ.get(PREFIX_VAR)
    if prefix:
        return str(Path(prefix) / "bin" / program)
    configured = _configured()
    if configured.get(program):
        return configured[program]
    if configured.get("prefix"):
        return str(Path(configured["prefix"]) / "bin" / program)
    return program


def install_hint(program: Program) -> str:
    """What to do when ``program`` is missing (for :class:`~blockctl.errors.MissingComponent`)."""
    return (
        f"install {_PACKAGES[program]} (Debian), or set {ENV_VARS[program]} to a {program} "
        f"binary or {PREFIX_VAR} to a directory with bin/{program}"
    )


def qemu_system() -> str:
    return binary("qemu-system-x86_64")


def qemu_img() -> str:
    return binary("qemu-img")


def qemu_io() -> str:
    return binary("qemu-io")


def qemu_nbd() -> str:
    return binary("qemu-nbd")


def qemu_storage_daemon() -> str:
    return binary("qemu-storage-daemon")

"""What every command module shares: the :class:`Command` shape, :func:`emit` (text, or JSON
with ``--json``), the exit codes and the global options."""

from __future__ import annotations

import argparse
import enum
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from blockctl.types import IscsiSource, MachineConfig, NfsSource


def iscsi_options(parser: argparse.ArgumentParser) -> None:
    """How a command given an ``iscsi://`` URL logs in (QEMU's initiator)."""
    parser.add_argument("--initiator-name", help="the IQN QEMU logs in to iSCSI as")
    parser.add_argument("--chap-user", help="iSCSI CHAP user name")
    parser.add_argument(
        "--chap-password-file", type=Path, help="a 0600 file holding the CHAP password"
    )


def image_location(text: str, args: argparse.Namespace) -> Path | IscsiSource | NfsSource:
    """A command's image argument: an ``iscsi://`` URL (with :func:`iscsi_options`), an
    ``nfs://`` URL, or a local path (absolute). The iSCSI options with anything else are a
    mistake, said so."""
    # Imported here: every command's start-up goes through this module (test_start_up).
    from dataclasses import replace

    from blockctl.errors import ConfigError
    from blockctl.types import IscsiSource, NfsSource

    if text.startswith("iscsi://"):
        password = args.chap_password_file
        return replace(
            IscsiSource.from_url(text),
            initiator_name=args.initiator_name,
            user=args.chap_user,
            password_file=None if password is None else password.absolute(),
        )
    for option in ("initiator_name", "chap_user", "chap_password_file"):
        if getattr(args, option) is not None:
            raise ConfigError(option.replace("_", "-"), "is for an iscsi:// source")
    if text.startswith("nfs://"):
        return NfsSource.from_url(text)
    return Path(text).absolute()


#: The VM name when neither the command line nor the config gives one.
DEFAULT_NAME = "default"


def emit(args: argparse.Namespace, data: object, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=None if not sys.stdout.isatty() else 2, default=str))
    elif human:
        print(human)


class Command:
    name: ClassVar[str]
    help: ClassVar[str]
    #: Leave with os._exit once the output is flushed, skipping the interpreter's finalization
    #: (for a command whose library's threads cannot survive it).
    exit_hard: ClassVar[bool] = False

    def configure(self, parser: argparse.ArgumentParser) -> None:
        pass

    async def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


class ExitCode(enum.IntEnum):
    """The command line's exit codes: one meaning each."""

    OK = 0
    ERROR = 1  #: a BlockctlError: one line on stderr naming its class (and JSON with --json)
    USAGE = 2  #: the command line itself is wrong (unknown option, missing argument)
    PENDING = 3  #: not failed, not done: unplug pending, job cancelled by another client,
    #: an interrupted operation that needs attention
    DIFFERENT = 4  #: a check found a problem: images differ, an image is corrupt, a backup
    #: failed verification
    BUSY = 5  #: refused: another operation runs on that disk (errors.Conflict)
    INTERRUPTED = 130  #: Ctrl-C (what was done is reported)
    BROKEN_PIPE = 141  #: the reader of stdout went away (``| head``); nothing more is printed


EXIT_CODES_HELP = """exit codes:
  0    ok
  1    error (one line on stderr naming the error class; with --json also {"error": ...})
  2    usage error (with --json also {"error": ...} on stdout)
  3    pending: unplug pending, job cancelled by another client, a record needing attention
  4    a check found a problem: images differ, an image is corrupt, a backup failed
       verification
  5    busy: refused, another operation runs on that disk (named: kind, job, client pid)
  130  interrupted (Ctrl-C; what was done is reported)
"""


def global_options(parent: bool) -> argparse.ArgumentParser:
    """``--json``, ``-v`` and ``--log-json``, accepted before the command and after it. After
    it they default to SUPPRESS so they never undo what was given before it. (A parent parser
    only lends its arguments and never parses: the parsers that do are ``main._Parser``.)"""
    options = argparse.ArgumentParser(add_help=False)
    default: Any = False if parent else argparse.SUPPRESS
    options.add_argument(
        "--json", action="store_true", default=default, help="machine-readable output"
    )
    options.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="show the event stream"
    )
    options.add_argument(
        "--log-json",
        action="store_true",
        default=default,
        help="events on stderr as one JSON object per line (for log pipelines)",
    )
    return options


def load_config(path: Path, name: str | None) -> MachineConfig:
    import tomllib  # here: only `up CONFIG` and `restore --launch` read TOML (about 2 ms)

    from blockctl.errors import ConfigError
    from blockctl.types import MachineConfig

    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    if name is not None:
        data["name"] = name
    data.setdefault("name", DEFAULT_NAME)
    return MachineConfig.from_mapping(data, base=path.parent)

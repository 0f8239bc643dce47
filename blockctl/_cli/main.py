"""The ``blockctl`` command line: a thin shell over the library.

One class per subcommand (``name``, ``help``, ``configure()``, ``async run()``), in a module
per domain (``vm``, ``drives``, ``chains``, ``jobs``, ``backup``, ``img``, ``agent``; what they
share is in ``common``); here the parser is assembled from them (a table names each command's
module, imported only when needed: see :data:`COMMANDS`), and one runner turns
a :class:`BlockctlError` into one clear line on stderr and its exit code (:class:`ExitCode`:
the table in ``--help`` and the README). Every command takes ``--json``, ``-v`` and
``--log-json``, before or after its name.
This is the only place that configures logging or calls ``anyio.run``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn

from blockctl import _log
from blockctl._cli.common import EXIT_CODES_HELP, Command, ExitCode, global_options


def configure_logging(verbose: bool, log_json: bool = False) -> None:
    """structlog to stderr: debug events with ``-v``, warnings only otherwise; one JSON object
    per line with ``--log-json`` (or when stderr is not a terminal). Without ``-v`` structlog
    is configured (and imported) only when a warning comes."""
    if verbose:
        _configure_structlog(logging.DEBUG, log_json)
    else:
        _log.configure_on_demand(
            logging.WARNING, lambda level: _configure_structlog(level, log_json)
        )


def _configure_structlog(level: int, log_json: bool) -> None:
    import structlog

    renderer: Any
    if sys.stderr.isatty() and not log_json:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer(default=repr)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


#: Every command, in the order the help lists them: its name, and the module of
#: ``blockctl._cli`` and the class that implement it. A command's module is imported when the
#: command line names it (``main`` builds that command's parser alone), or when every parser is
#: built (help, a usage error): a short command does not pay for the others' imports.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("up", "vm", "Up"),
    ("ls", "vm", "Ls"),
    ("status", "vm", "Status"),
    ("resume", "vm", "Resume"),
    ("qmp", "vm", "Qmp"),
    ("down", "vm", "Down"),
    ("drives", "drives", "Drives"),
    ("attach", "drives", "AttachDrive"),
    ("detach", "drives", "DetachDrive"),
    ("media", "drives", "MediaCommand"),
    ("cache", "drives", "CacheCommand"),
    ("resize", "drives", "ResizeCommand"),
    ("throttle", "drives", "ThrottleCommand"),
    ("apply", "drives", "ApplyCommand"),
    ("chain", "chains", "Chain"),
    ("snapshot", "chains", "SnapshotCommand"),
    ("commit", "chains", "CommitCommand"),
    ("stream", "chains", "StreamCommand"),
    ("jobs", "jobs", "Jobs"),
    ("recover", "backup", "RecoverCommand"),
    ("backup", "backup", "BackupCommand"),
    ("restore", "backup", "RestoreCommand"),
    ("agent", "agent", "AgentCommand"),
    ("img", "img", "Img"),
    ("guest", "vm", "Guest"),
    ("demo", "vm", "Demo"),
    ("fleet", "fleet", "Fleet"),
)


def command_class(module: str, name: str) -> type[Command]:
    """The class ``name`` of ``blockctl._cli.<module>`` (imported now)."""
    cls = getattr(importlib.import_module(f"blockctl._cli.{module}"), name)
    if not (isinstance(cls, type) and issubclass(cls, Command)):
        raise TypeError(f"blockctl._cli.{module}.{name} is not a Command")
    return cls


class _Parser(argparse.ArgumentParser):
    """Usage errors as JSON on stdout too when ``--json`` is anywhere on the command line."""

    argv: ClassVar[Sequence[str]] = ()

    def error(self, message: str) -> NoReturn:
        if "--json" in _Parser.argv:
            print(json.dumps({"error": {"type": "UsageError", "message": message}}))
        super().error(message)


class _Version(argparse.Action):
    """``--version``: blockctl's version (``{"version": ...}`` with ``--json``):
    ``blockctl.__version__``, which is the distribution's (pyproject.toml reads it there), so
    that importlib.metadata (slow to import) is not needed."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        from blockctl import __version__ as version

        as_json = "--json" in _Parser.argv
        print(json.dumps({"version": version}) if as_json else f"blockctl {version}")
        parser.exit()


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The parser, with every command, or with the command ``only`` alone (what ``main``
    builds when the command line names it: the others' parsers cost a short command some
    15 ms; the top level's usage line is the same, since it names no command)."""
    parser: argparse.ArgumentParser = _Parser(
        prog="blockctl",
        description=__doc__.splitlines()[0] if __doc__ else None,
        parents=[global_options(parent=True)],
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print blockctl's version and exit")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    commands: dict[str, Command] = {}
    for name, module, class_name in COMMANDS:
        if only is not None and name != only:
            continue
        cls = command_class(module, class_name)
        command = cls()
        p = sub.add_parser(
            name,
            help=cls.help,
            description=cls.help,
            parents=[global_options(parent=False)],
            conflict_handler="resolve",
        )
        p.add_argument(
            "--vm-name",
            metavar="NAME",
            help="the identity of a QEMU attached by socket path or host:port (default: its "
            "-name); it names snapshot overlays, backup points and its state directory",
        )
        command.configure(p)
        commands[name] = command
    return parser, commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """A parser's subcommands: name → (its parser, its one-line help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (p, helps.get(name, "")) for name, p in action.choices.items()}
    return {}


def _synopsis(parser: argparse.ArgumentParser) -> str:
    """The positional arguments: ``VM [list|cancel|…] [JOB]``."""
    words = []
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        if action.choices:
            word = "|".join(str(c) for c in action.choices)
        else:
            metavar = action.metavar if isinstance(action.metavar, str) else None
            word = (metavar or action.dest).upper()
        words.append(f"[{word}]" if action.nargs in ("?", "*") else word)
    return " ".join(words)


def command_reference() -> str:
    """Every command and sub-action with its arguments and what it does, as the README's
    command reference table (``tests/unit/test_cli_grammar.py`` keeps the two equal)."""
    parser, _ = build_parser()
    rows = ["| command | what it does |", "|---|---|"]
    for name, (sub, help_text) in _subcommands(parser).items():
        actions = _subcommands(sub)
        leaves = [(f"{name} {a}", leaf, h or help_text) for a, (leaf, h) in actions.items()]
        for words, leaf, what in leaves or [(name, sub, help_text)]:
            usage = f"blockctl {words} {_synopsis(leaf)}".rstrip().replace("|", "\\|")
            rows.append(f"| `{usage}` | {what} |")
    return "\n".join(rows) + "\n"


def _check_single_values(args: argparse.Namespace) -> None:
    """A positional argument that takes one value must hold one value. Python 3.11's argparse
    drops a literal ``--`` given as such a value and hands the command an empty list (found by
    the injection property test: ``attach VM -- '' --``)."""
    from blockctl.errors import ConfigError

    for name, value in vars(args).items():
        if name in SINGLE_POSITIONALS and isinstance(value, list):
            raise ConfigError(
                name,
                "'--' cannot be given as a value here (the argument parser drops it); "
                "use a path such as ./--",
            )


#: Positional arguments that take exactly one value, in any command.
SINGLE_POSITIONALS = frozenset({"vm", "file", "device", "dest", "backup_id", "job", "tag"})


def _named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names when only global flags come before it (``""``: none, for
    ``--version``, which exits when parsed); else None (``main`` then builds every command's
    parser: for help, an unknown command, an abbreviation)."""
    for arg in argv:
        if arg == "--version":
            return ""
        if arg not in ("--json", "-v", "--verbose", "--log-json"):
            return arg if any(name == arg for name, _, _ in COMMANDS) else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    _Parser.argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = build_parser(only=_named_command(_Parser.argv))
    args = parser.parse_args(argv)
    try:
        code = _run(args, commands)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        if commands[args.subcommand].exit_hard:
            sys.stderr.flush()
            os._exit(code)
        return code
    except BrokenPipeError:
        # The reader went away (`blockctl qmp VM query-qmp-schema | head`): no traceback, and
        # nothing more written (stdout points at /dev/null so the exit flush is quiet too).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE


def _run(args: argparse.Namespace, commands: dict[str, Command]) -> int:
    # Imported here: what parsing alone ends (`--version`, help, a usage error) needs none of
    # them (anyio and the error tree are most of the cost of that import).
    import anyio

    from blockctl._cli import interrupt
    from blockctl._cli.progress import close_all
    from blockctl.errors import BlockctlError, Conflict, ProcessFailed

    configure_logging(args.verbose, args.log_json)
    started = time.monotonic()
    try:
        _check_single_values(args)
        return anyio.run(
            interrupt.run_interruptible, commands[args.subcommand].run, args, backend="asyncio"
        )
    except BlockctlError as exc:
        close_all()  # a live progress display ends before the error line
        first, _, rest = str(exc).partition("\n")
        # One line; for a failed process, the last line it printed is usually the reason.
        said = [
            line.strip()[1:].strip() for line in rest.splitlines() if line.strip().startswith("|")
        ]
        # (A ProcessFailed names its reason in its first line already.)
        suffix = (
            f" — {said[-1]}"
            if said and not args.verbose and not isinstance(exc, ProcessFailed)
            else ""
        )
        print(f"blockctl: {type(exc).__name__}: {first}{suffix}", file=sys.stderr)
        if rest and args.verbose:
            print(rest, file=sys.stderr)
        if args.json:
            error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
            if isinstance(exc, Conflict):  # what is running, for a script to wait on
                error["running"] = {
                    "kind": exc.kind,
                    "job_id": exc.job_id,
                    "device": exc.device,
                    "pid": exc.pid,
                }
            print(json.dumps({"error": error}))
        return exc.exit_code
    except KeyboardInterrupt:  # before the command's SIGINT handler was in place
        return interrupt.EXIT_INTERRUPTED
    finally:
        close_all()
        _log.get_logger().debug(
            "blockctl.cli.done",
            command=args.subcommand,
            seconds=round(time.monotonic() - started, 3),
            pid=os.getpid(),
        )


if __name__ == "__main__":
    sys.exit(main())

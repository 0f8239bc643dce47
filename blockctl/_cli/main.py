"""The ``blockctl`` command line: a thin shell over the library.

One class per subcommand (``name``, ``help``, ``configure()``, ``async run()``); one runner turns
a :class:`BlockctlError` into one clear line on stderr and exit code 1. Every command takes
``--json``. This is the only place that configures logging or calls ``anyio.run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import structlog

from blockctl import _guest, _images, _runtime
from blockctl._machine import (
    Timeouts,
    attach,
    launch_detached,
    shutdown_detached,
)
from blockctl.errors import BlockctlError, ConfigError
from blockctl.types import Drive, ImageFormat, MachineConfig

DEFAULT_NAME = "default"
DEFAULT_DISK_BYTES = 64 << 20


def configure_logging(verbose: bool) -> None:
    """structlog to stderr: debug events with ``-v``, warnings only otherwise."""
    renderer: Any
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer(default=repr)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.WARNING
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def emit(args: argparse.Namespace, data: object, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=None if not sys.stdout.isatty() else 2, default=str))
    elif human:
        print(human)


def default_config(name: str, disk: Path) -> MachineConfig:
    """The embedded default: the bundled test guest with one virtio qcow2 disk."""
    guest = _guest.find_guest()
    return MachineConfig(
        name=name,
        memory_mib=256,
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        drives=(Drive(file=disk, format=ImageFormat.QCOW2, serial="blockctl-disk0"),),
    )


def load_config(path: Path, name: str | None) -> MachineConfig:
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


class Command:
    name: ClassVar[str]
    help: ClassVar[str]

    def configure(self, parser: argparse.ArgumentParser) -> None:
        pass

    async def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


class Up(Command):
    name = "up"
    help = "launch a VM that keeps running until `blockctl down` (default: the bundled guest)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("config", nargs="?", type=Path, help="a TOML machine config")
        parser.add_argument(
            "--name", help=f"VM name (default: from the config, or {DEFAULT_NAME!r})"
        )

    async def run(self, args: argparse.Namespace) -> int:
        if args.config is not None:
            config = load_config(args.config, args.name)
            record = await launch_detached(config)
        else:
            name = args.name or DEFAULT_NAME
            _guest.find_guest()  # fail before creating anything if the guest is not built

            async def prepare(run_dir: Path) -> MachineConfig:
                disk = run_dir / "disk0.qcow2"
                await _images.create(disk, ImageFormat.QCOW2, size=DEFAULT_DISK_BYTES)
                return default_config(name, disk)

            record = await launch_detached(MachineConfig(name=name), prepare=prepare)
        emit(
            args,
            {
                "name": record.name,
                "pid": record.pid,
                "monitor": record.monitor,
                "console": record.console_socket,
                "accel": record.accel,
            },
            f"{record.name}: running (pid {record.pid}, {record.accel})\n"
            f"  QMP:     {record.monitor}\n  console: {record.console_socket}",
        )
        return 0


class Ls(Command):
    name = "ls"
    help = "list the VMs in the runtime directory"

    async def run(self, args: argparse.Namespace) -> int:
        rows = []
        for record in _runtime.list_records():
            rows.append(
                {
                    "name": record.name,
                    "pid": record.pid,
                    "state": "running" if _runtime.is_alive(record) else "dead",
                    "accel": record.accel,
                    "monitor": record.monitor,
                    "started": record.started,
                }
            )
        lines = [f"{'NAME':<20} {'STATE':<8} {'PID':>8}  ACCEL"]
        lines += [f"{r['name']:<20} {r['state']:<8} {r['pid']:>8}  {r['accel']}" for r in rows]
        emit(args, rows, "\n".join(lines) if rows else "no VMs")
        return 0


class Status(Command):
    name = "status"
    help = "show a VM's run state, QEMU version and drives"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm", help="VM name, or a QMP socket path")

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm) as vm:
            status = await vm.status()
            version = await vm.version()
            devices = await vm.block_devices()
        drives = []
        for dev in devices:
            node = dev.inserted
            drives.append(
                {
                    "device": dev.device_id,
                    "node": node.node_name if node else None,
                    "driver": node.driver if node else None,
                    "file": node.file if node else None,
                    "read_only": node.read_only if node else None,
                    "size": node.virtual_size if node else None,
                    "cache": None
                    if node is None
                    else {
                        "writeback": node.cache.writeback,
                        "direct": node.cache.direct,
                        "no_flush": node.cache.no_flush,
                    },
                }
            )
        data = {
            "name": vm.name,
            "pid": vm.pid,
            "status": status.status,
            "running": status.running,
            "qemu": str(version),
            "drives": drives,
        }
        lines = [f"{vm.name}: {status.status} (pid {vm.pid}, QEMU {version})"]
        for d in drives:
            if d["node"] is None:
                lines.append(f"  {d['device']}: empty")
            else:
                lines.append(
                    f"  {d['device']}: {d['driver']} {d['file']} size={d['size']} "
                    f"ro={d['read_only']}"
                )
        emit(args, data, "\n".join(lines))
        return 0


class Qmp(Command):
    name = "qmp"
    help = "send one QMP command to a VM and print QEMU's reply"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm", help="VM name, or a QMP socket path")
        parser.add_argument("command", help="e.g. query-status")
        parser.add_argument("arguments", nargs="?", help="the arguments, as a JSON object")

    async def run(self, args: argparse.Namespace) -> int:
        arguments = None
        if args.arguments is not None:
            try:
                arguments = json.loads(args.arguments)
            except json.JSONDecodeError as exc:
                raise ConfigError("arguments", f"not JSON: {exc}") from None
            if not isinstance(arguments, dict):
                raise ConfigError("arguments", "must be a JSON object")
        async with attach(args.vm) as vm:
            reply = await vm.command(args.command, arguments)
        emit(args, reply, json.dumps(reply, indent=2))
        return 0


class Down(Command):
    name = "down"
    help = "stop a VM: ACPI power-off (optional), quit, SIGTERM, SIGKILL"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument(
            "--powerdown-timeout",
            type=float,
            default=None,
            metavar="SECONDS",
            help="press the power button first and wait this long",
        )

    async def run(self, args: argparse.Namespace) -> int:
        await shutdown_detached(args.vm, timeouts=Timeouts(powerdown=args.powerdown_timeout))
        emit(args, {"name": args.vm, "stopped": True}, f"{args.vm}: stopped")
        return 0


class Guest(Command):
    name = "guest"
    help = "build or locate the bundled test guest (kernel + busybox initramfs)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("action", choices=["build", "path"])
        parser.add_argument("--force", action="store_true", help="rebuild even if cached")

    async def run(self, args: argparse.Namespace) -> int:
        if args.action == "build":
            image = await _guest.build_guest(force=args.force)
        else:
            image = _guest.find_guest()
        emit(
            args,
            {
                "kernel": str(image.kernel),
                "initrd": str(image.initrd),
                "append": image.append,
                "kernel_version": image.kernel_version,
            },
            f"kernel: {image.kernel}\ninitrd: {image.initrd}",
        )
        return 0


class Demo(Command):
    name = "demo"
    help = "boot the bundled guest, write through its disk, and check the data on the host"

    async def run(self, args: argparse.Namespace) -> int:
        from blockctl._demo import run_demo

        report = await run_demo(progress=None if args.json else print)
        emit(args, report, "demo: OK" if report["ok"] else "demo: FAILED")
        return 0 if report["ok"] else 1


COMMANDS: tuple[type[Command], ...] = (Up, Ls, Status, Qmp, Down, Guest, Demo)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="blockctl", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the event stream")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    commands: dict[str, Command] = {}
    for cls in COMMANDS:
        command = cls()
        p = sub.add_parser(cls.name, help=cls.help, description=cls.help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        command.configure(p)
        commands[cls.name] = command
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    started = time.monotonic()
    try:
        return anyio.run(commands[args.subcommand].run, args, backend="asyncio")
    except BlockctlError as exc:
        first, _, rest = str(exc).partition("\n")
        # One line; for a failed process, the last line it printed is usually the reason.
        said = [
            line.strip()[1:].strip() for line in rest.splitlines() if line.strip().startswith("|")
        ]
        suffix = f" — {said[-1]}" if said and not args.verbose else ""
        print(f"blockctl: {type(exc).__name__}: {first}{suffix}", file=sys.stderr)
        if rest and args.verbose:
            print(rest, file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}))
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        structlog.get_logger("blockctl").debug(
            "blockctl.cli.done",
            command=args.subcommand,
            seconds=round(time.monotonic() - started, 3),
            pid=os.getpid(),
        )


if __name__ == "__main__":
    sys.exit(main())

"""The ``blockctl`` command line: a thin shell over the library.

One class per subcommand (``name``, ``help``, ``configure()``, ``async run()``); one runner turns
a :class:`BlockctlError` into one clear line on stderr and its exit code (:class:`ExitCode`:
the table in ``--help`` and the README). Every command takes ``--json``, ``-v`` and
``--log-json``, before or after its name.
This is the only place that configures logging or calls ``anyio.run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import anyio

from blockctl import _agent, _images, _journal, _lazy, _log, _runtime
from blockctl._cli import interrupt
from blockctl._cli.output import human_size, table
from blockctl._cli.progress import ProgressDisplay, close_all
from blockctl._jobs import (
    JobControl,
    JobHook,
    JobIOError,
    JobProgress,
    JobResult,
    JobSample,
    JobStatus,
    JobTransition,
    StructlogJobHook,
    adopt_jobs,
    measured_rate,
)
from blockctl._log import get_logger
from blockctl._machine import (
    VM,
    Timeouts,
    attach,
    launch_detached,
    shutdown_detached,
)
from blockctl._ops import drives
from blockctl._ops.drives import DriveInfo
from blockctl._qmp import wire
from blockctl._qmp.models import JOB_FINAL
from blockctl.errors import BlockctlError, ConfigError, Conflict, ProcessFailed, QuiesceFailed
from blockctl.types import (
    CacheMode,
    DeprecatedInput,
    Drive,
    ErrorPolicy,
    ImageFormat,
    MachineConfig,
    coerce_enum,
    parse_size,
)

if TYPE_CHECKING:
    from blockctl import _guest
    from blockctl import backup as backup_ops
    from blockctl._backup import control as control_ops
    from blockctl._ops import apply as apply_ops
    from blockctl._ops import chains, vm_recovery
else:
    # Imported when first used: `status`, `drives`, `ls` and `--version` need none of them.
    _guest = _lazy.module("blockctl._guest")
    backup_ops = _lazy.module("blockctl.backup")
    control_ops = _lazy.module("blockctl._backup.control")
    apply_ops = _lazy.module("blockctl._ops.apply")
    chains = _lazy.module("blockctl._ops.chains")
    vm_recovery = _lazy.module("blockctl._ops.vm_recovery")

DEFAULT_NAME = "default"
DEFAULT_DISK_BYTES = 64 << 20


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


def emit(args: argparse.Namespace, data: object, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=None if not sys.stdout.isatty() else 2, default=str))
    elif human:
        print(human)


def default_config(name: str, disk: Path, *, agent: bool = False) -> MachineConfig:
    """The embedded default: the bundled test guest with one virtio qcow2 disk (``agent``: the
    guest variant with qemu-ga, and its channel)."""
    guest = _guest.find_guest(agent=agent)
    return MachineConfig(
        name=name,
        memory_mib=256,
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        drives=(Drive(file=disk, format=ImageFormat.QCOW2, serial="blockctl-disk0"),),
        guest_agent=agent,
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
        parser.add_argument(
            "--strict",
            action="store_true",
            help="make QEMU reject deprecated commands and arguments "
            "(-compat deprecated-input=reject)",
        )
        parser.add_argument(
            "--agent",
            action="store_true",
            help="the bundled guest with qemu-ga and a guest-agent channel "
            "(`blockctl guest build --agent` first); with a config: add the channel",
        )

    async def run(self, args: argparse.Namespace) -> int:
        if args.config is not None:
            config = load_config(args.config, args.name)
            if args.strict:
                config = dataclasses.replace(config, deprecated_input=DeprecatedInput.REJECT)
            if args.agent:
                config = dataclasses.replace(config, guest_agent=True)
            record = await launch_detached(config)
        else:
            name = args.name or DEFAULT_NAME
            # Fail before creating anything if the guest is not built.
            _guest.find_guest(agent=args.agent)

            async def prepare(run_dir: Path) -> MachineConfig:
                disk = run_dir / "disk0.qcow2"
                await _images.create(disk, ImageFormat.QCOW2, size=DEFAULT_DISK_BYTES)
                config = default_config(name, disk, agent=args.agent)
                if args.strict:
                    config = dataclasses.replace(config, deprecated_input=DeprecatedInput.REJECT)
                return config

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
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            status = await vm.status()
            version = await vm.version()
            infos = await drives.list_drives(vm)
            slots = await drives.hotplug_slots(vm)
            # A record whose writer still runs is another client's operation in progress;
            # the others were left by a controller that died: `blockctl recover` settles them.
            running, interrupted = operations_on_record(vm.run_dir)
        # The same facts as `blockctl drives` (image file, the device's write cache).
        rows = []
        for info in infos:
            cache = info.cache
            rows.append(
                {
                    "device": info.device_id,
                    "node": info.top_node,
                    "driver": info.chain[0].driver if info.chain else None,
                    "file": info.file,
                    "read_only": info.read_only,
                    "size": info.size,
                    "cache": None
                    if cache is None
                    else {
                        "writeback": cache.writeback,
                        "direct": cache.direct,
                        "no_flush": cache.no_flush,
                    },
                }
            )
        data = {
            "name": vm.name,
            "pid": vm.pid,
            "status": status.status,
            "running": status.running,
            "qemu": str(version),
            "drives": rows,
            "interrupted_operations": interrupted,
            "running_operations": running,
            "hotplug_slots": slots.as_dict(),
        }
        lines = [f"{vm.name}: {status.status} (pid {vm.pid}, QEMU {version})"]
        if slots.pcie:
            lines.append(
                f"  hot-plug slots: {slots.free_count} of {len(slots.ports)} PCIe root ports free"
            )
        else:
            lines.append(f"  hot-plug slots: {slots.free_count} free on the PCI root bus")
        for op in running:
            job = f", job {op['job_id']}" if op.get("job_id") else ""
            lines.append(f"  running: {op['what']} (pid {op['pid']}{job})")
        if interrupted:
            lines.append(
                f"  {interrupted} interrupted operation(s) on record: run `blockctl recover "
                f"{vm.name}`"
            )
        for d in rows:
            if d["node"] is None:
                lines.append(f"  {d['device']}: empty")
            else:
                lines.append(
                    f"  {d['device']}: {d['driver']} {d['file']} size={d['size']} "
                    f"ro={d['read_only']}"
                )
        emit(args, data, "\n".join(lines))
        return 0


def operations_on_record(run_dir: Path | None) -> tuple[list[dict[str, Any]], int]:
    """The journal's and the freeze records' operations whose writer still runs (each as
    ``{id, kind, what, step, job_id, pid}``), and how many others there are (interrupted)."""
    running: list[dict[str, Any]] = []
    interrupted = 0
    for item in _journal.load_all(run_dir):
        if isinstance(item, _journal.Intent) and _journal.owner_alive(item):
            running.append(
                {
                    "id": item.id,
                    "kind": item.kind.value,
                    "what": item.describe(),
                    "step": item.step.value,
                    "job_id": item.job_id,
                    "pid": item.pid,
                }
            )
        else:
            interrupted += 1
    for freeze in _agent.load_freeze_records(run_dir):
        if isinstance(freeze, _agent.FreezeRecord) and _agent.writer_alive(freeze):
            running.append(
                {
                    "id": freeze.id,
                    "kind": "freeze",
                    "what": f"freeze of the guest's filesystems for {freeze.operation}",
                    "step": "frozen",
                    "job_id": None,
                    "pid": freeze.pid,
                }
            )
        else:
            interrupted += 1
    return running, interrupted


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
        async with attach(args.vm, vm_name=args.vm_name) as vm:
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
        parser.add_argument(
            "--agent", action="store_true", help="the variant with qemu-ga (cached separately)"
        )

    async def run(self, args: argparse.Namespace) -> int:
        if args.action == "build":
            image = await _guest.build_guest(force=args.force, agent=args.agent)
        else:
            image = _guest.find_guest(agent=args.agent)
        emit(
            args,
            {
                "kernel": str(image.kernel),
                "initrd": str(image.initrd),
                "append": image.append,
                "kernel_version": image.kernel_version,
                "agent": image.agent,
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


def drive_row(info: DriveInfo) -> list[object]:
    """One row of the ``drives`` table (DRIVE_HEADERS)."""
    if info.top_node is None:
        state = "empty (tray open)" if info.tray_open else "empty"
        return [info.device_id, info.device_driver or "?", state, None, None, None, None]
    cache = info.cache
    flags = (
        []
        if cache is None
        else [
            f"wce={'on' if cache.writeback else 'off'}",
            f"direct={'on' if cache.direct else 'off'}",
            f"no-flush={'on' if cache.no_flush else 'off'}",
        ]
    )
    if info.read_only:
        flags.append("ro")
    if info.io_limits is not None and info.io_limits.limited:
        flags.append("throttled")
    if info.pending_unplug:
        flags.append("UNPLUG-PENDING")
    chain = " ← ".join(f"{n.node_name}({n.driver})" for n in info.chain)
    return [
        info.device_id,
        info.device_driver or "?",
        info.format or "?",
        None if info.size is None else human_size(info.size),
        " ".join(flags),
        info.file,
        chain,
    ]


DRIVE_HEADERS = ("DEVICE", "DRIVER", "FORMAT", "SIZE", "FLAGS", "FILE", "NODES")


def drive_lines(info: DriveInfo) -> str:
    """One drive, headed (what attach, cache, resize and throttle print)."""
    return table(DRIVE_HEADERS, [drive_row(info)], right={"SIZE"})


class Drives(Command):
    name = "drives"
    help = "list a VM's drives: device, node chain, format, cache flags, size, throttling"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            infos = await drives.list_drives(vm)
        emit(
            args,
            [i.to_json() for i in infos],
            table(DRIVE_HEADERS, [drive_row(i) for i in infos], right={"SIZE"})
            if infos
            else "no drives",
        )
        return 0


class AttachDrive(Command):
    name = "attach"
    help = "hot-plug a disk into a running VM"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("file", type=Path)
        parser.add_argument("--format", required=True, help="image format (never probed)")
        parser.add_argument("--bus", default="virtio", help="virtio | scsi")
        parser.add_argument("--cache", default="writeback")
        parser.add_argument("--aio", default="threads")
        parser.add_argument("--discard", default="ignore")
        parser.add_argument("--serial")
        parser.add_argument("--read-only", action="store_true")
        parser.add_argument("--bootindex", type=int)

    async def run(self, args: argparse.Namespace) -> int:
        drive = Drive.from_mapping(
            {
                "file": str(args.file.absolute()),
                "format": args.format,
                "interface": args.bus,
                "cache": args.cache,
                "aio": args.aio,
                "discard": args.discard,
                "serial": args.serial,
                "read_only": args.read_only,
                "bootindex": args.bootindex,
            }
        )
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            info = await drives.hotplug(vm, drive)
        emit(args, info.to_json(), f"attached {info.device_id}\n{drive_lines(info)}")
        return 0


class DetachDrive(Command):
    name = "detach"
    help = "unplug a drive: device_del, wait for the guest, then remove its nodes"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("device", help="device id, e.g. disk1 (see `blockctl drives`)")
        parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            result = await drives.unplug(vm, args.device, timeout=args.timeout)
        pending = result.state is drives.UnplugState.PENDING
        emit(
            args,
            {
                "device": result.device_id,
                "state": result.state.value,
                "deleted_nodes": list(result.deleted_nodes),
            },
            f"{result.device_id}: "
            + (
                "unplug pending: the guest has not released it yet; "
                "its nodes are kept. Run detach again later."
                if pending
                else "detached"
            ),
        )
        return ExitCode.PENDING if pending else ExitCode.OK


class MediaCommand(Command):
    name = "media"
    help = "insert, eject or change the medium of a cdrom"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("action", choices=["insert", "eject", "change"])
        parser.add_argument("device")
        parser.add_argument("file", type=Path, nargs="?")
        parser.add_argument("--format", help="image format (insert/change)")
        parser.add_argument("--force", action="store_true", help="open a tray the guest locked")

    async def run(self, args: argparse.Namespace) -> int:
        if args.action != "eject" and (args.file is None or args.format is None):
            raise ConfigError("file", f"{args.action} needs FILE and --format")
        fmt = None if args.format is None else coerce_enum(ImageFormat, args.format, "format")
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            if args.action == "eject":
                await drives.eject(vm, args.device, force=args.force)
                info = await drives.drive_info(vm, args.device)
            elif args.action == "insert":
                assert fmt is not None
                info = await drives.insert(vm, args.device, args.file.absolute(), fmt)
            else:
                assert fmt is not None
                info = await drives.change_medium(
                    vm, args.device, args.file.absolute(), fmt, force=args.force
                )
        emit(args, info.to_json(), drive_lines(info))
        return 0


class CacheCommand(Command):
    name = "cache"
    help = "change the cache mode of a live drive (blockdev-reopen)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("device")
        parser.add_argument("mode", help="writeback | none | writethrough | directsync | unsafe")

    async def run(self, args: argparse.Namespace) -> int:
        mode = coerce_enum(CacheMode, args.mode, "mode")
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            info = await drives.set_cache(vm, args.device, mode)
        emit(args, info.to_json(), drive_lines(info))
        return 0


class ResizeCommand(Command):
    name = "resize"
    help = "grow a live drive (shrinking needs --shrink)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("device")
        parser.add_argument("size", help="bytes, or 64M, 10G, ...")
        parser.add_argument("--shrink", action="store_true", help="allow making it smaller")

    async def run(self, args: argparse.Namespace) -> int:
        size = parse_size(args.size)
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            info = await drives.resize(vm, args.device, size, allow_shrink=args.shrink)
        emit(args, info.to_json(), drive_lines(info))
        return 0


class ThrottleCommand(Command):
    name = "throttle"
    help = "set I/O limits of a live drive (omitted limits become unlimited)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("device")
        for key in ("bps", "bps-rd", "bps-wr", "iops", "iops-rd", "iops-wr"):
            parser.add_argument(f"--{key}", default="0")
        parser.add_argument("--group", help="share the limits with other drives in this group")

    async def run(self, args: argparse.Namespace) -> int:
        limits = {}
        for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
            raw = getattr(args, key)
            limits[key] = parse_size(raw, key) if key.startswith("bps") else int(raw)
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            info = await drives.set_throttle(vm, args.device, limits, group=args.group)
        emit(args, info.to_json(), drive_lines(info))
        return 0


class ApplyCommand(Command):
    name = "apply"
    help = "make a VM's drives match a TOML file: print the plan, then carry it out"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("file", type=Path)
        parser.add_argument("--dry-run", action="store_true", help="only print the plan")

    async def run(self, args: argparse.Namespace) -> int:
        desired = apply_ops.load_desired(args.file)
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            plan = await apply_ops.apply(vm, desired, dry_run=args.dry_run)
        verb = "would do" if args.dry_run else "did"
        emit(
            args,
            {
                "steps": [s.to_json() for s in plan.steps],
                "conflicts": list(plan.conflicts),
                "applied": not args.dry_run,
            },
            plan.render() if plan.empty else f"{verb}:\n{plan.render()}",
        )
        # A real apply with conflicts raised before changing anything; a dry run says so too.
        return ExitCode.ERROR if plan.conflicts else ExitCode.OK


class ProgressBar:
    """A qemu-img run's progress (it reports percent): a line on stderr (never with --json)."""

    def __init__(self, args: argparse.Namespace, label: str) -> None:
        self.display = ProgressDisplay(enabled=not args.json)
        self.label = label

    def __call__(self, percent: float) -> None:
        self.display.update(self.label, self.label, percent, 100.0, unit="%")

    def done(self) -> None:
        self.display.finish(self.label)


class Img(Command):
    name = "img"
    help = "qemu-img, with explicit formats and JSON output: info, check, commit, rebase, ..."

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        p = sub.add_parser(
            "info",
            parents=[_global_options(parent=False)],
            help="image info (--chain: with backing files)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("--chain", action="store_true")
        p.add_argument("--untrusted", action="store_true", help="under CPU and memory limits")
        p = sub.add_parser(
            "check",
            parents=[_global_options(parent=False)],
            help="consistency check (exit 4: corrupt)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p = sub.add_parser(
            "create",
            parents=[_global_options(parent=False)],
            help="create an image (a backing file needs -F)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("size", nargs="?")
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-b", "--backing", type=Path)
        p.add_argument("-F", "--backing-format")
        p = sub.add_parser(
            "commit",
            parents=[_global_options(parent=False)],
            help="merge an image into its backing file (offline)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-b", "--base", type=Path)
        p.add_argument("-d", "--drop", action="store_true", help="leave the image as it is")
        p = sub.add_parser(
            "rebase",
            parents=[_global_options(parent=False)],
            help="point an image at another backing file",
        )
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-b", "--backing", type=Path, help="omit to flatten")
        p.add_argument("-F", "--backing-format")
        p.add_argument("-u", "--unsafe", action="store_true", help="rewrite the header only")
        p = sub.add_parser(
            "convert",
            parents=[_global_options(parent=False)],
            help="copy an image into another format",
        )
        p.add_argument("source", type=Path)
        p.add_argument("target", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-O", "--output-format", required=True)
        p.add_argument("-c", "--compress", action="store_true")
        p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
        p = sub.add_parser(
            "resize",
            parents=[_global_options(parent=False)],
            help="change the virtual size (--shrink to make smaller)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("size")
        p.add_argument("-f", "--format", required=True)
        p.add_argument("--shrink", action="store_true")
        p = sub.add_parser(
            "snapshot",
            parents=[_global_options(parent=False)],
            help="internal snapshots of a qcow2: list/create/apply/delete",
        )
        p.add_argument("image", type=Path)
        p.add_argument("snapshot_action", choices=["list", "create", "apply", "delete"])
        p.add_argument("tag", nargs="?")
        p = sub.add_parser(
            "compare",
            parents=[_global_options(parent=False)],
            help="whether two images read the same (exit 4: differ)",
        )
        p.add_argument("first", type=Path)
        p.add_argument("second", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-F", "--second-format", required=True)
        p.add_argument("-s", "--strict", action="store_true")
        p = sub.add_parser("map", parents=[_global_options(parent=False)], help="allocation map")
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p = sub.add_parser(
            "measure", parents=[_global_options(parent=False)], help="space a new image needs"
        )
        p.add_argument("-O", "--output-format", required=True)
        p.add_argument("--size")
        p.add_argument("--image", type=Path)
        p.add_argument("-f", "--format")

    async def run(self, args: argparse.Namespace) -> int:
        def fmt(value: str | None, where: str = "format") -> ImageFormat:
            return coerce_enum(ImageFormat, value, where)

        bar = ProgressBar(args, args.action)
        data: Any
        human = ""
        code = 0
        if args.action == "info":
            infos = await _images.info(
                args.image, fmt(args.format), backing_chain=args.chain, untrusted=args.untrusted
            )
            data = [dataclasses.asdict(i) for i in infos]
            human = "\n".join(
                f"{i.filename}: {i.format}, {i.virtual_size} bytes"
                + (
                    f", backing {i.backing_filename} ({i.backing_format})"
                    if i.backing_filename
                    else ""
                )
                for i in infos
            )
        elif args.action == "check":
            result = await _images.check(args.image, fmt(args.format))
            data = dataclasses.asdict(result)
            human = (
                "no errors"
                if result.clean
                else f"corrupt: {result.corruptions}"
                if result.corrupt
                else f"leaked clusters: {result.leaks}; check errors: {result.check_errors}"
            )
            code = ExitCode.DIFFERENT if result.corrupt else ExitCode.OK
        elif args.action == "create":
            backing_fmt = (
                None if args.backing_format is None else fmt(args.backing_format, "backing_format")
            )
            size = None if args.size is None else parse_size(args.size)
            await _images.create(
                args.image,
                fmt(args.format),
                size=size,
                backing=args.backing,
                backing_format=backing_fmt,
            )
            data, human = {"image": str(args.image)}, f"created {args.image}"
        elif args.action == "commit":
            await _images.commit(
                args.image, fmt(args.format), base=args.base, drop=args.drop, progress=bar
            )
            data, human = {"committed": str(args.image)}, f"committed {args.image}"
        elif args.action == "rebase":
            backing_fmt = (
                None if args.backing_format is None else fmt(args.backing_format, "backing_format")
            )
            await _images.rebase(
                args.image,
                fmt(args.format),
                args.backing,
                backing_fmt,
                unsafe=args.unsafe,
                progress=bar,
            )
            data, human = {"rebased": str(args.image)}, f"rebased {args.image}"
        elif args.action == "convert":
            options = {}
            for option in args.option:
                key, eq, value = option.partition("=")
                if not eq or not key or not value:
                    raise ConfigError(
                        "option",
                        f"-o {option!r}: needs KEY=VALUE (e.g. -o cluster_size=64k, "
                        "-o lazy_refcounts=on); nothing was converted",
                    )
                options[key] = value
            await _images.convert(
                args.source,
                fmt(args.format),
                args.target,
                fmt(args.output_format, "output_format"),
                compress=args.compress,
                options=options,
                progress=bar,
            )
            data, human = {"target": str(args.target)}, f"wrote {args.target}"
        elif args.action == "resize":
            await _images.resize(
                args.image, fmt(args.format), parse_size(args.size), shrink=args.shrink
            )
            data, human = {"resized": str(args.image)}, f"resized {args.image}"
        elif args.action == "snapshot":
            snaps = await _images.snapshot(args.image, args.snapshot_action, args.tag)
            data = [dataclasses.asdict(s) for s in snaps]
            human = "\n".join(f"{s.id:>4} {s.name}" for s in snaps) or "no snapshots"
        elif args.action == "compare":
            same = await _images.compare(
                args.first,
                fmt(args.format),
                args.second,
                fmt(args.second_format, "second_format"),
                strict=args.strict,
            )
            data, human = {"identical": same}, "identical" if same else "different"
            code = ExitCode.OK if same else ExitCode.DIFFERENT
        elif args.action == "map":
            extents = await _images.map_extents(args.image, fmt(args.format))
            data = [dataclasses.asdict(e) for e in extents]
            human = "\n".join(
                f"{e.start:>14} {e.length:>14} depth={e.depth} "
                f"{'data' if e.data else 'zero' if e.zero else 'hole'}"
                for e in extents
            )
        else:
            image = None if args.image is None else (args.image, fmt(args.format))
            size = None if args.size is None else parse_size(args.size)
            needed = await _images.measure(
                fmt(args.output_format, "output_format"), size=size, image=image
            )
            data = dataclasses.asdict(needed)
            human = f"required {needed.required}, fully allocated {needed.fully_allocated}"
        bar.done()
        emit(args, data, human)
        return code


class JobBar:
    """A JobHook that shows each job's progress on stderr: bytes, rate and ETA, a line per job
    (blockctl._cli.progress; never with --json)."""

    def __init__(self, args: argparse.Namespace, label: str) -> None:
        self.args = args
        self.label = label
        self.display = ProgressDisplay(enabled=not args.json)

    def on_transition(self, transition: JobTransition) -> None:
        if transition.status in (JobStatus.CONCLUDED, JobStatus.NULL):
            self.display.finish(transition.job_id)

    def on_progress(self, progress: JobProgress) -> None:
        if progress.total:
            self.display.update(
                progress.job_id,
                f"{self.label} ({progress.job_id})",
                progress.done,
                progress.total,
                rate=progress.rate,
                eta=progress.eta,
            )

    def on_io_error(self, error: JobIOError) -> None:
        side = "source read" if error.operation == "read" else "target write"
        if error.action == "stop":
            say_paused(self.args, error)
        elif error.action in ("retry", "ignore") and error.count == 1:
            print(
                f"blockctl: job {error.job_id}: {side} error, retrying (error policy ignore)",
                file=sys.stderr,
            )


def say_paused(args: argparse.Namespace, error: JobIOError) -> None:
    """The command that resumes a paused job. Said even with --json (on stderr): a paused
    job waits for a human to act."""
    side = "source read" if error.operation == "read" else "target write"
    words = getattr(args, "words", None) or ["VM"]
    vm = getattr(args, "vm", None) or words[0]
    print(
        f"blockctl: job {error.job_id} paused on a {side} error; fix the cause, then "
        f"run `blockctl jobs {vm} resume {error.job_id}` within "
        f"{error.pause_timeout:g} s, or it is cancelled",
        file=sys.stderr,
    )


def error_policy_options(parser: argparse.ArgumentParser, *flags: str) -> None:
    """``--on-error``-style options (QEMU's job error policies) and ``--pause-timeout``."""
    for flag in flags:
        parser.add_argument(
            flag,
            choices=[p.value for p in ErrorPolicy],
            default=ErrorPolicy.REPORT.value,
            help="on an I/O error: fail (report, the default), pause until resumed (stop), "
            "pause only when out of space (enospc), or retry (ignore; bounded)",
        )
    parser.add_argument(
        "--pause-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a job paused on an I/O error waits for `blockctl jobs VM resume ID`",
    )


def job_hooks(args: argparse.Namespace, label: str) -> tuple[JobHook, ...]:
    return (StructlogJobHook(), JobBar(args, label), interrupt.TRACKER)


def job_control(args: argparse.Namespace, hooks: Sequence[JobHook]) -> JobControl:
    """A job command's ``--speed``, ``--timeout``, ``--on-error`` and ``--pause-timeout``
    (those it has)."""
    speed = getattr(args, "speed", None)
    return JobControl(
        speed=None if speed is None else parse_size(speed, "speed"),
        deadline=args.timeout,
        on_error=ErrorPolicy(getattr(args, "on_error", ErrorPolicy.REPORT)),
        pause_timeout=getattr(args, "pause_timeout", 60.0),
        hooks=hooks,
    )


def chain_result_json(result: chains.ChainResult) -> dict[str, Any]:
    return {
        "device": result.device,
        "job": result.job.job_id,
        "transitions": [t.value for t in result.job.transitions],
        "bytes": result.job.length,
        "seconds": round(result.job.seconds, 3),
        "removed_nodes": list(result.removed_nodes),
        "removed_files": list(result.removed_files),
        "chain": list(result.chain),
    }


class Chain(Command):
    name = "chain"
    help = "show a VM's block graph: devices, nodes, backing chains, bitmaps"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            graph = await chains.read_graph(vm)
        emit(args, graph.to_json(), graph.render_text())
        return 0


class SnapshotCommand(Command):
    name = "snapshot"
    help = "external (create/list/delete) and internal (save/load/delete --internal) snapshots"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("action", choices=["create", "list", "delete", "save", "load"])
        parser.add_argument("tag", nargs="?")
        parser.add_argument(
            "--dir", type=Path, help="where overlays go (default: beside each disk's current image)"
        )
        parser.add_argument(
            "--disk",
            action="append",
            help="device to snapshot, load or delete (repeat; default: every writable disk; "
            "a writable disk not named is left out of an internal snapshot)",
        )
        parser.add_argument(
            "--vmstate",
            metavar="DEVICE",
            help="save/load: the disk that holds the VM state (default: the first disk)",
        )
        parser.add_argument("--internal", action="store_true", help="delete an internal one")
        parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
        add_quiesce_options(parser, "create and save")

    async def run(self, args: argparse.Namespace) -> int:
        if args.action != "list" and not args.tag:
            raise ConfigError("tag", f"snapshot {args.action} needs a TAG")
        quiesce = quiesce_option(args)
        if args.disk and args.action == "list":
            raise ConfigError("disk", "snapshot list shows every disk; --disk does not apply")
        if args.vmstate is not None and args.action not in ("save", "load"):
            raise ConfigError("vmstate", f"snapshot {args.action} has no VM state to place")
        if quiesce is not _agent.Quiesce.OFF and args.action not in ("create", "save"):
            raise ConfigError("quiesce", f"snapshot {args.action} does not quiesce the guest")
        hooks = job_hooks(args, args.action)
        data: Any
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            if args.action == "create":
                snap = await chains.external_snapshot(
                    vm,
                    args.tag,
                    args.dir,
                    devices=args.disk,
                    quiesce=quiesce,
                    freeze_deadline=freeze_deadline_option(args),
                )
                data = {
                    "tag": snap.tag,
                    "overlays": {k: str(v) for k, v in snap.overlays.items()},
                    "frozen": snap.frozen,
                    "quiesced": snap.quiesced,
                }
                human = "\n".join(
                    f"{d}: {snap.frozen[d]} frozen; writes go to {o}"
                    for d, o in snap.overlays.items()
                ) + ("\n(filesystem-consistent: the guest was quiesced)" if snap.quiesced else "")
            elif args.action == "list":
                external = await chains.list_external(vm)
                internal = await chains.list_internal(vm)
                data = {"external": external, "internal": internal}
                lines = [f"{dev}: {' ← '.join(layers)}" for dev, layers in external.items()]
                lines += [
                    f"{dev}: internal {', '.join(tags) or '(none)'}"
                    for dev, tags in internal.items()
                ]
                human = "\n".join(lines)
            elif args.action == "delete" and not args.internal:
                results = await chains.delete_external(
                    vm, args.tag, devices=args.disk, control=job_control(args, hooks)
                )
                data = [chain_result_json(r) for r in results]
                human = "\n".join(
                    f"{r.device}: merged; chain {' ← '.join(r.chain)}" for r in results
                )
            else:
                if args.action == "save":
                    result = await chains.save_internal(
                        vm,
                        args.tag,
                        control=job_control(args, hooks),
                        quiesce=quiesce,
                        freeze_deadline=freeze_deadline_option(args, 60.0),
                        devices=args.disk,
                        vmstate=args.vmstate,
                    )
                elif args.action == "load":
                    result = await chains.load_internal(
                        vm,
                        args.tag,
                        control=job_control(args, hooks),
                        devices=args.disk,
                        vmstate=args.vmstate,
                    )
                else:
                    result = await chains.delete_internal(
                        vm, args.tag, devices=args.disk, control=job_control(args, hooks)
                    )
                data = {
                    "job": result.job_id,
                    "tag": args.tag,
                    "transitions": [t.value for t in result.transitions],
                }
                human = f"{args.action} {args.tag}: done in {result.seconds:.2f} s"
        emit(args, data, human)
        return 0


class CommitCommand(Command):
    name = "commit"
    help = "block-commit a layer of a live chain into a lower one (active: pivot)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("device")
        parser.add_argument("--top", help="node or file (default: the active layer)")
        parser.add_argument("--base", help="node or file (default: right below top)")
        parser.add_argument("--speed", help="bytes/s limit (e.g. 50M)")
        parser.add_argument(
            "--allow-shared-base",
            action="store_true",
            help="commit even though something else uses the base",
        )
        parser.add_argument(
            "--delete-files",
            action="store_true",
            help="delete the image files of the merged layers",
        )
        parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
        error_policy_options(parser, "--on-error")

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            result = await chains.commit(
                vm,
                args.device,
                top=args.top,
                base=args.base,
                allow_shared_base=args.allow_shared_base,
                delete_files=args.delete_files,
                control=job_control(args, job_hooks(args, "commit")),
            )
        emit(
            args,
            chain_result_json(result),
            f"{result.device}: committed {result.job.length} bytes in "
            f"{result.job.seconds:.2f} s; chain {' ← '.join(result.chain)}",
        )
        return 0


class StreamCommand(Command):
    name = "stream"
    help = "block-stream backing data into the active layer (and drop those layers)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("device")
        parser.add_argument("--base", help="keep this layer and below (default: none)")
        parser.add_argument("--speed", help="bytes/s limit (e.g. 50M)")
        parser.add_argument("--delete-files", action="store_true")
        parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
        error_policy_options(parser, "--on-error")

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            result = await chains.stream(
                vm,
                args.device,
                base=args.base,
                delete_files=args.delete_files,
                control=job_control(args, job_hooks(args, "stream")),
            )
        emit(
            args,
            chain_result_json(result),
            f"{result.device}: streamed {result.job.length} bytes in "
            f"{result.job.seconds:.2f} s; chain {' ← '.join(result.chain)}",
        )
        return 0


class Jobs(Command):
    name = "jobs"
    help = (
        "list a VM's jobs, whichever process started them, or pause, resume, re-speed or cancel one"
    )

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument(
            "action",
            nargs="?",
            default="list",
            choices=["list", "cancel", "pause", "resume", "speed"],
        )
        parser.add_argument("job", nargs="?")
        parser.add_argument("speed", nargs="?", help="bytes/s, for `speed` (0: unlimited)")
        parser.add_argument(
            "--sample",
            type=float,
            default=0.5,
            metavar="SECONDS",
            help="list: measure each job's rate over this long (default 0.5; 0: no rate/ETA)",
        )

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            if args.action == "list":
                # A concluded job is dismissed (its outcome read) only when no other client is
                # attached: otherwise its owner may be about to read it (issue 14).
                jobs = await adopt_jobs(vm.session, dismiss=not vm.other_clients())
                rates = await sample_rates(vm, args.sample) if jobs else {}
                rows: list[dict[str, Any]] = []
                for job in jobs:
                    info = await job.info()
                    rate, eta = rates.get(job.id, (None, None))
                    outcome = job.outcome
                    # "failed"/"nospace": paused on an I/O error, waiting for a resume.
                    io_status = await job.io_status() if info else None
                    status = info.status.value if info else "dismissed"
                    done = info.current_progress if info else None
                    total = info.total_progress if info else None
                    # A backup's job only holds its point in time; the copy (its progress,
                    # its pause) is the backup process's, asked on its control socket.
                    copy = await control_ops.ask(vm.run_dir, job.id, "status") if info else None
                    if copy is not None:
                        status, io_status = copy["status"], copy["io_status"]
                        done, total = copy["done"], copy["total"]
                    rows.append(
                        {
                            "id": job.id,
                            "type": job.type,
                            "status": status,
                            "io_status": io_status,
                            "done": done,
                            "total": total,
                            "percent": None
                            if not total or done is None
                            else round(100 * done / total, 1),
                            "outcome": None
                            if outcome is None
                            else ("ok" if isinstance(outcome, JobResult) else str(outcome)),
                            "rate": None if rate is None else round(rate),
                            "eta": None if eta is None else round(eta, 1),
                            "sampled": args.sample if job.id in rates else None,
                            "driven_by": None if copy is None else copy["pid"],
                            "speed": None if copy is None else copy["speed"],
                        }
                    )
                emit(args, rows, job_table(rows) if rows else "no jobs")
                return 0
            if args.job is None:
                raise ConfigError("job", "give the job's id (see `blockctl jobs VM`)")
            speed = None if args.speed is None else parse_size(args.speed, "speed")
            by = await control_ops.control_job(vm, args.job, args.action, speed=speed)
        emit(
            args,
            {"job": args.job, "action": args.action, "by": by},
            f"{args.job}: {args.action} sent (to {'the backup' if by == 'backup' else 'QEMU'})",
        )
        return 0


def job_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``jobs`` rows as a headed table, sizes and rates in binary units."""

    def size(n: int | None) -> str | None:
        return None if n is None else human_size(n)

    def note(r: Mapping[str, Any]) -> str:
        words = [] if r["outcome"] is None else [str(r["outcome"])]
        if r["io_status"] not in (None, "ok"):
            words.append(f"paused on an I/O error: {r['io_status']}")
        if r.get("driven_by") is not None:
            words.append(f"copied by pid {r['driven_by']}")
        return "; ".join(words)

    return table(
        ("ID", "TYPE", "STATUS", "DONE", "TOTAL", "%", "RATE", "ETA", "NOTE"),
        [
            (
                r["id"],
                r["type"],
                r["status"],
                size(r["done"]),
                size(r["total"]),
                r["percent"],
                None if r["rate"] is None else f"{human_size(r['rate'])}/s",
                None if r["eta"] is None else f"{r['eta']:.0f} s",
                note(r),
            )
            for r in rows
        ],
        right={"DONE", "TOTAL", "%", "RATE", "ETA"},
    )


async def sample_rates(vm: VM, interval: float) -> dict[str, tuple[float | None, float | None]]:
    """Each running job's measured rate and ETA: two ``query-jobs`` ``interval`` s apart
    (:func:`blockctl._jobs.measured_rate`). Nothing when ``interval`` is 0."""
    if interval <= 0:
        return {}

    async def sample() -> dict[str, JobSample]:
        samples = {}
        for j in await wire.query_jobs(vm.session):
            if j.status in JOB_FINAL:
                continue
            done, total = j.current_progress, j.total_progress
            copy = await control_ops.ask(vm.run_dir, j.id, "status")
            if copy is not None:  # a backup: its copy's progress, not its job's
                done, total = copy["done"], copy["total"]
            samples[j.id] = JobSample(at=time.monotonic(), done=done, total=total)
        return samples

    first = await sample()
    if not first:
        return {}
    await anyio.sleep(interval)
    second = await sample()
    return {i: measured_rate(first[i], second[i]) for i in first.keys() & second.keys()}


class RecoverCommand(Command):
    name = "recover"
    help = "finish or report operations a stopped controller left (the journal vs QEMU)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("--repo", type=Path, help="also recover backups into this repository")
        parser.add_argument("--key-file", type=Path, help="the repository's key file (encrypted)")
        parser.add_argument(
            "--forget", action="store_true", help="drop records that need attention (checked)"
        )
        parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")

    async def run(self, args: argparse.Namespace) -> int:
        repo = None if args.repo is None else open_repo(args)
        alive, results, notes = await vm_recovery.recover_vm(
            args.vm, repo=repo, deadline=args.timeout, forget=args.forget
        )
        data = {
            "qemu_running": alive,
            "operations": [r.to_json() for r in results],
            "backup": notes,
        }
        lines = [f"{r.verdict.value}: {r.message}" for r in results]
        lines += [f"backup: {n}" for n in notes]
        emit(args, data, "\n".join(lines) or "nothing to recover")
        return ExitCode.PENDING if any(r.kept for r in results) else ExitCode.OK


class BackupProgress:
    """A progress hook: a line per disk with bytes read, rate and ETA on stderr
    (blockctl._cli.progress: live on a terminal, a plain line every 5 s otherwise; nothing
    with --json), and the command that resumes a copy paused on a write error."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.display = ProgressDisplay(enabled=not args.json)

    def on_transition(self, transition: JobTransition) -> None:
        pass

    def on_io_error(self, error: JobIOError) -> None:
        say_paused(self.args, error)

    def on_progress(self, progress: JobProgress) -> None:
        if progress.job_type != "backup-read":
            return
        disk = progress.job_id.removeprefix("read-")
        self.display.update(
            disk,
            f"{disk} read",
            progress.done,
            progress.total,
            rate=progress.rate,
            eta=progress.eta,
        )


def repo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="the backup repository")
    parser.add_argument(
        "--key-file",
        type=Path,
        help="an encrypted repository's key file (mode 0600; its content is the secret)",
    )


def open_repo(args: argparse.Namespace) -> backup_ops.Repository:
    return backup_ops.open_repository(args.repo, key_file=args.key_file)


def manifest_json(manifest: backup_ops.Manifest) -> dict[str, Any]:
    return {**manifest.to_json(), **backup_ops.summary(manifest)}


def manifest_line(m: backup_ops.Manifest) -> str:
    figures = backup_ops.summary(m)
    dedup = figures["dedup_ratio"]
    ratio = "-" if dedup is None else f"{dedup:.1f}x"
    return (
        f"{m.id}  {m.kind:<11}  {human_size(m.bytes_read):>10}  {human_size(m.bytes_new):>10}  "
        f"{human_size(m.bytes_stored):>10}  {ratio:>6}  {m.consistency:<10}"
        + (f"  (full because {m.fallback_reason})" if m.fallback_reason else "")
    )


MANIFEST_HEADER = (
    f"{'POINT':<27}  {'KIND':<11}  {'READ':>10}  {'NEW':>10}  {'STORED':>10}  {'DEDUP':>6}  "
    "CONSISTENCY"
)


class BackupCommand(Command):
    name = "backup"
    help = "backups into a chunked repository: init, create, list, verify, prune, gc"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        p = sub.add_parser(
            "init", parents=[_global_options(parent=False)], help="create a repository (owner-only)"
        )
        repo_options(p)
        p.add_argument("--chunk-size", help="fixed chunk size (default 4M; 64K to 32M)")
        p.add_argument("--compression", choices=["zstd", "none"], default="zstd")
        p = sub.add_parser(
            "create",
            parents=[_global_options(parent=False)],
            help="back up a running VM (incremental since this repository's last point, or "
            "full when there is none)",
        )
        p.add_argument("vm")
        repo_options(p)
        p.add_argument("--full", action="store_true", help="read every non-zero chunk")
        p.add_argument("--disk", action="append", help="device (repeat; default: all)")
        p.add_argument("--connections", type=int, default=2, help="NBD connections per disk")
        p.add_argument(
            "--speed", help="read at most this many bytes/s, all disks together (e.g. 100M)"
        )
        p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS")
        p.add_argument(
            "--scratch-dir", type=Path, help="where the fleecing overlays go (default: TMPDIR)"
        )
        p.add_argument(
            "--on-error",
            choices=["report", "enospc", "stop"],
            default="report",
            help="a repository write error fails the backup (report, the default), or pauses "
            "the copy until `blockctl jobs VM resume ID`: when out of space (enospc), or on "
            "any write error (stop)",
        )
        p.add_argument(
            "--pause-timeout",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="how long a paused backup waits for the resume before it fails",
        )
        add_quiesce_options(p, "a backup")
        p = sub.add_parser(
            "list", parents=[_global_options(parent=False)], help="a VM's backup points"
        )
        p.add_argument("vm")
        repo_options(p)
        p = sub.add_parser(
            "verify",
            parents=[_global_options(parent=False)],
            help="check every chunk a point depends on (default: every point of the VM)",
        )
        p.add_argument("vm")
        p.add_argument("backup_id", nargs="?")
        repo_options(p)
        p.add_argument(
            "--sample", type=float, metavar="FRACTION", help="check this fraction of the chunks"
        )
        p = sub.add_parser(
            "prune",
            parents=[_global_options(parent=False)],
            help="delete old points, then unreferenced chunks",
        )
        p.add_argument("vm")
        repo_options(p)
        p.add_argument("--keep", type=int, help="how many points to keep")
        p.add_argument(
            "--keep-within", type=float, metavar="SECONDS", help="also keep points newer than this"
        )
        p.add_argument("--no-gc", action="store_true", help="leave the chunks for a later gc")
        p = sub.add_parser(
            "gc", parents=[_global_options(parent=False)], help="remove chunks no point references"
        )
        repo_options(p)

    async def run(self, args: argparse.Namespace) -> int:
        action = args.action
        if action == "init":
            key = None if args.key_file is None else args.key_file
            chunk = None if args.chunk_size is None else parse_size(args.chunk_size, "chunk_size")
            repo = backup_ops.init_repository(
                args.repo, key_file=key, chunk_size=chunk, compression=args.compression
            )
            emit(
                args,
                {
                    "repository": str(repo.path),
                    "id": repo.config.id,
                    "chunk_size": repo.chunk_size,
                    "compression": repo.config.compression,
                    "encrypted": repo.encrypted,
                },
                f"created {'an encrypted ' if repo.encrypted else 'a '}repository at {repo.path} "
                f"(chunks of {human_size(repo.chunk_size)}, {repo.config.compression})",
            )
            return 0
        repo = open_repo(args)
        if action == "list":
            manifests = repo.manifests(args.vm)
            lines = [MANIFEST_HEADER, *(manifest_line(m) for m in manifests)]
            emit(
                args,
                [manifest_json(m) for m in manifests],
                "\n".join(lines) if manifests else f"no backups of {args.vm} in {repo.path}",
            )
            return 0
        if action == "verify":
            ids = [args.backup_id] if args.backup_id else [m.id for m in repo.manifests(args.vm)]
            if not ids:
                raise ConfigError("backup", f"no backups of {args.vm} in {repo.path} to verify")
            reports = [
                await backup_ops.verify(repo, args.vm, point, sample=args.sample) for point in ids
            ]
            emit(
                args,
                [
                    {
                        "id": r.point,
                        "ok": r.ok,
                        "problems": list(r.problems),
                        "chunks_checked": r.chunks_checked,
                        "bytes_checked": r.bytes_checked,
                        "affected": list(r.affected),
                    }
                    for r in reports
                ],
                "\n".join(
                    f"{r.point}: ok ({r.chunks_checked} chunks, {human_size(r.bytes_checked)})"
                    if r.ok
                    else f"{r.point}: FAILED\n  " + "\n  ".join(r.problems)
                    for r in reports
                ),
            )
            return ExitCode.OK if all(r.ok for r in reports) else ExitCode.DIFFERENT
        if action == "prune":
            result = await backup_ops.prune(
                repo,
                args.vm,
                keep_last=args.keep,
                keep_within=args.keep_within,
                gc=not args.no_gc,
            )
            human = (
                f"deleted {len(result.deleted)} point(s), kept {len(result.kept)}; removed "
                f"{result.chunks_removed} chunk(s), {human_size(result.bytes_removed)}"
            )
            if result.gc_skipped:
                human += f"; chunks not collected: {result.gc_skipped}"
            emit(args, dataclasses.asdict(result), human)
            return 0
        if action == "gc":
            gc = await anyio.to_thread.run_sync(repo.gc)
            emit(
                args,
                dataclasses.asdict(gc),
                f"removed {gc.chunks_removed} chunk(s) ({human_size(gc.bytes_removed)}), "
                f"kept {gc.chunks_kept}",
            )
            return 0
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            manifest = await backup_ops.create(
                vm,
                repo,
                kind="full" if args.full else "incremental",
                devices=args.disk,
                options=backup_ops.BackupOptions(
                    quiesce=quiesce_option(args),
                    freeze_deadline=freeze_deadline_option(args),
                    connections=args.connections,
                    scratch_dir=args.scratch_dir,
                ),
                control=job_control(
                    args, (StructlogJobHook(), BackupProgress(args), interrupt.TRACKER)
                ),
            )
        note = f" (full because {manifest.fallback_reason})" if manifest.fallback_reason else ""
        emit(
            args,
            manifest_json(manifest),
            f"{manifest.id}: {manifest.kind} backup of {len(manifest.disks)} disk(s): read "
            f"{human_size(manifest.bytes_read)}, new {human_size(manifest.bytes_new)}, stored "
            f"{human_size(manifest.bytes_stored)}{note}",
        )
        return 0


def add_quiesce_options(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quiesce",
        action="store_const",
        const=_agent.Quiesce.REQUIRED,
        dest="quiesce",
        help=f"{what}: freeze the guest's filesystems (guest agent) around the point in "
        "time; fail if there is no agent",
    )
    group.add_argument(
        "--quiesce-if-possible",
        action="store_const",
        const=_agent.Quiesce.IF_POSSIBLE,
        dest="quiesce",
        help="as --quiesce, but go on crash-consistent (with a warning) without an agent",
    )
    parser.add_argument(
        "--freeze-deadline",
        type=float,
        metavar="SECONDS",
        help="thaw and fail if the point-in-time operation takes longer than this "
        f"(default {_agent.DEFAULT_FREEZE_DEADLINE:g}; internal snapshots 60)",
    )


def quiesce_option(args: argparse.Namespace) -> _agent.Quiesce:
    mode = getattr(args, "quiesce", None) or _agent.Quiesce.OFF
    if args.freeze_deadline is not None and mode is _agent.Quiesce.OFF:
        raise ConfigError("freeze-deadline", "only with --quiesce or --quiesce-if-possible")
    if args.freeze_deadline is not None and not args.freeze_deadline > 0:
        raise ConfigError("freeze-deadline", "must be a positive number of seconds")
    return mode


def freeze_deadline_option(
    args: argparse.Namespace, default: float = _agent.DEFAULT_FREEZE_DEADLINE
) -> float:
    return default if args.freeze_deadline is None else float(args.freeze_deadline)


class AgentCommand(Command):
    name = "agent"
    help = "the VM's guest agent (qemu-ga): ping, info, fsinfo, status, freeze, thaw"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument(
            "action", choices=["ping", "info", "fsinfo", "status", "freeze", "thaw"]
        )
        parser.add_argument(
            "--mountpoint",
            action="append",
            help="freeze: only this mountpoint (repeat; default: every filesystem)",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=_agent.DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help="for connecting and each command (a freeze gets "
            f"{_agent.FREEZE_TIMEOUT:g} s to flush)",
        )

    async def run(self, args: argparse.Namespace) -> int:
        if args.mountpoint and args.action != "freeze":
            raise ConfigError("mountpoint", "only for freeze")
        data: Any
        async with (
            attach(args.vm, vm_name=args.vm_name) as vm,
            _agent.connect_agent(vm, timeout=args.timeout) as ga,
        ):
            started = time.monotonic()
            if args.action == "ping":
                await ga.ping(timeout=args.timeout)
                ms = round((time.monotonic() - started) * 1000, 2)
                data, human = {"ok": True, "ms": ms}, f"pong ({ms} ms)"
            elif args.action == "info":
                info = await ga.info()
                data = dataclasses.asdict(info)
                enabled = sum(c.enabled for c in info.commands)
                human = (
                    f"qemu-ga {info.version}: {enabled} of {len(info.commands)} commands enabled"
                )
            elif args.action == "fsinfo":
                filesystems = await ga.get_fsinfo()
                data = [dataclasses.asdict(fs) for fs in filesystems]
                human = (
                    "\n".join(
                        f"{fs.mountpoint}  {fs.type}  {fs.name}  "
                        f"{', '.join(d.dev or d.bus_type for d in fs.disks)}"
                        for fs in filesystems
                    )
                    or "no filesystems on block devices"
                )
            elif args.action == "status":
                status = await ga.fsfreeze_status()
                data, human = {"status": status.value}, status.value
            elif args.action == "freeze":
                # Left frozen on purpose: the guest's writes block until `agent VM thaw`.
                count = await ga.fsfreeze_freeze(args.mountpoint)
                ms = round((time.monotonic() - started) * 1000, 1)
                get_logger().info(
                    "blockctl.agent.freeze", vm=vm.name, count=count, ms=ms, manual=True
                )
                data = {"frozen": count, "ms": ms}
                human = (
                    f"froze {count} filesystem(s) in {ms} ms; the guest's writes block "
                    f"until `blockctl agent {args.vm} thaw`"
                )
                if args.mountpoint and count < len(set(args.mountpoint)):
                    # Not what was asked: undo it rather than leave a partial freeze behind.
                    await ga.fsfreeze_thaw()
                    raise QuiesceFailed(
                        f"froze {count} of {len(set(args.mountpoint))} listed mountpoints "
                        "(qemu-ga freezes 0 for a path that is not a mounted block-device "
                        "filesystem); thawed again",
                        frozen=count,
                        expected=len(set(args.mountpoint)),
                    )
            else:
                count = await ga.fsfreeze_thaw()
                status = await ga.fsfreeze_status()
                ms = round((time.monotonic() - started) * 1000, 1)
                get_logger().info(
                    "blockctl.agent.thaw", vm=vm.name, count=count, ms=ms, manual=True
                )
                data = {"thawed": count, "status": status.value, "ms": ms}
                human = f"thawed {count} filesystem(s) in {ms} ms; status {status.value}"
                if status is _agent.FreezeStatus.THAWED:
                    # A freeze record of a controller that died frozen is settled now.
                    removed = _agent.remove_dead_freeze_records(vm.run_dir)
                    if removed:
                        data["records_removed"] = removed
                        human += f"; removed {len(removed)} stale freeze record(s)"
        emit(args, data, human)
        return 0


class RestoreCommand(Command):
    name = "restore"
    help = "rebuild a disk at a backup point into a new image (every chunk verified)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm")
        parser.add_argument("backup_id")
        parser.add_argument("device")
        parser.add_argument("dest", type=Path)
        repo_options(parser)
        parser.add_argument("-O", "--output-format", default="qcow2", choices=["qcow2", "raw"])
        parser.add_argument(
            "--attach", metavar="TARGET_VM", help="hot-plug the restored disk into this running VM"
        )

    async def run(self, args: argparse.Namespace) -> int:
        fmt = coerce_enum(ImageFormat, args.output_format, "output_format")
        repo = open_repo(args)
        result = await backup_ops.restore(
            repo, args.vm, args.backup_id, args.device, args.dest.absolute(), fmt
        )
        attached = None
        if args.attach:
            async with attach(args.attach, vm_name=args.vm_name) as vm:
                attached = (await drives.hotplug(vm, Drive(file=result.path, format=fmt))).device_id
        emit(
            args,
            {
                "restored": str(result.path),
                "format": fmt.value,
                "device": args.device,
                "point": args.backup_id,
                "bytes_written": result.bytes_written,
                "chunks_verified": result.chunks_verified,
                "seconds": result.seconds,
                "attached": attached,
            },
            f"restored {args.device} of {args.backup_id} to {result.path} "
            f"({human_size(result.bytes_written)} written, {result.chunks_verified} chunks "
            "verified)" + (f", attached to {args.attach} as {attached}" if attached else ""),
        )
        return 0


COMMANDS: tuple[type[Command], ...] = (
    Up,
    Ls,
    Status,
    Qmp,
    Down,
    Drives,
    AttachDrive,
    DetachDrive,
    MediaCommand,
    CacheCommand,
    ResizeCommand,
    ThrottleCommand,
    ApplyCommand,
    Chain,
    SnapshotCommand,
    CommitCommand,
    StreamCommand,
    Jobs,
    RecoverCommand,
    BackupCommand,
    RestoreCommand,
    AgentCommand,
    Img,
    Guest,
    Demo,
)


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


class _Parser(argparse.ArgumentParser):
    """Usage errors as JSON on stdout too when ``--json`` is anywhere on the command line."""

    argv: ClassVar[Sequence[str]] = ()

    def error(self, message: str) -> NoReturn:
        if "--json" in _Parser.argv:
            print(json.dumps({"error": {"type": "UsageError", "message": message}}))
        super().error(message)


class _Version(argparse.Action):
    """``--version``: the installed distribution's version (``{"version": ...}`` with
    ``--json``), looked up only when asked (importlib.metadata is slow to import)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        from importlib import metadata

        try:
            version = metadata.version("blockctl")
        except metadata.PackageNotFoundError:  # run from a checkout that was never installed
            version = "unknown (not installed)"
        as_json = "--json" in _Parser.argv
        print(json.dumps({"version": version}) if as_json else f"blockctl {version}")
        parser.exit()


def _global_options(parent: bool) -> _Parser:
    """``--json``, ``-v`` and ``--log-json``, accepted before the command and after it. After
    it they default to SUPPRESS so they never undo what was given before it."""
    options = _Parser(add_help=False)
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


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = _Parser(
        prog="blockctl",
        description=__doc__.splitlines()[0] if __doc__ else None,
        parents=[_global_options(parent=True)],
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print blockctl's version and exit")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    commands: dict[str, Command] = {}
    for cls in COMMANDS:
        command = cls()
        p = sub.add_parser(
            cls.name,
            help=cls.help,
            description=cls.help,
            parents=[_global_options(parent=False)],
            conflict_handler="resolve",
        )
        p.add_argument(
            "--vm-name",
            metavar="NAME",
            help="the identity of a QEMU attached by socket path or host:port (default: its "
            "-name); it names snapshot overlays, backup points and its state directory",
        )
        command.configure(p)
        commands[cls.name] = command
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
    for name, value in vars(args).items():
        if name in SINGLE_POSITIONALS and isinstance(value, list):
            raise ConfigError(
                name,
                "'--' cannot be given as a value here (the argument parser drops it); "
                "use a path such as ./--",
            )


#: Positional arguments that take exactly one value, in any command.
SINGLE_POSITIONALS = frozenset({"vm", "file", "device", "dest", "backup_id", "job", "tag"})


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    _Parser.argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        code = _run(args, commands)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return code
    except BrokenPipeError:
        # The reader went away (`blockctl qmp VM query-qmp-schema | head`): no traceback, and
        # nothing more written (stdout points at /dev/null so the exit flush is quiet too).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE


def _run(args: argparse.Namespace, commands: dict[str, Command]) -> int:
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
        get_logger().debug(
            "blockctl.cli.done",
            command=args.subcommand,
            seconds=round(time.monotonic() - started, 3),
            pid=os.getpid(),
        )


if __name__ == "__main__":
    sys.exit(main())

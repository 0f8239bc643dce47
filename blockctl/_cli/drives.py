"""The drive commands: ``drives``, ``attach``, ``detach``, ``media``, ``cache``, ``resize``,
``throttle`` and ``apply``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockctl import _lazy
from blockctl._cli.common import Command, ExitCode, emit, image_location, iscsi_options
from blockctl._cli.output import human_size, table
from blockctl._machine import attach
from blockctl._ops import drives
from blockctl._ops.drives import DriveInfo
from blockctl.errors import ConfigError
from blockctl.types import (
    CacheMode,
    Drive,
    ImageFormat,
    IscsiSource,
    NfsSource,
    coerce_enum,
    parse_size,
)

if TYPE_CHECKING:
    from blockctl._ops import apply as apply_ops
else:
    # Imported when first used: `status`, `drives`, `ls` and `--version` do not need it.
    apply_ops = _lazy.module("blockctl._ops.apply")


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
    if info.io_error:
        flags.append(f"IO-ERROR({info.io_status})")
    chain = " ← ".join(f"{n.node_name}({n.driver})" for n in info.chain)
    vhost = info.vhost_user
    if vhost is not None:
        # Its nodes are the daemon's, not QEMU's: say where they are instead.
        state = "running" if vhost.daemon_running else "NOT RUNNING"
        chain = f"in qemu-storage-daemon pid {vhost.daemon_pid} ({state}), socket {vhost.socket}"
    return [
        info.device_id,
        info.device_driver or "?",
        (vhost.format if vhost is not None else info.format) or "?",
        None if info.size is None else human_size(info.size),
        " ".join(flags),
        vhost.file if vhost is not None else info.file,
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
        parser.add_argument(
            "file",
            help="an image file, an iscsi://host[:port]/iqn/lun or an "
            "nfs://server/path/file[?uid=U&gid=G] URL",
        )
        parser.add_argument("--format", required=True, help="image format (never probed)")
        parser.add_argument("--bus", default="virtio", help="virtio | scsi")
        parser.add_argument(
            "--passthrough",
            nargs="?",
            const="block",
            choices=("block", "generic"),
            help="iSCSI LUN passthrough (--bus scsi, --format raw): block (the default: "
            "scsi-block) or generic (scsi-generic)",
        )
        parser.add_argument(
            "--cdrom",
            action="store_true",
            help="a CD drive (scsi-cd, --bus scsi, read-only): an image file, or a block device "
            "(a host CD drive) opened with QEMU's host_cdrom driver",
        )
        iscsi_options(parser)
        parser.add_argument("--cache", default="writeback")
        parser.add_argument("--aio", default="threads")
        parser.add_argument("--discard", default="ignore")
        parser.add_argument("--serial")
        parser.add_argument("--read-only", action="store_true")
        parser.add_argument("--bootindex", type=int)
        parser.add_argument(
            "--rerror",
            help="on a failed read: report | ignore | stop (pause the VM until `blockctl resume`)",
        )
        parser.add_argument(
            "--werror",
            help="on a failed write: report | ignore | enospc | stop (pause the VM until "
            "`blockctl resume`)",
        )

    async def run(self, args: argparse.Namespace) -> int:
        source: dict[str, Any] = {}
        where = image_location(args.file, args)
        if isinstance(where, IscsiSource):
            source["iscsi"] = where
        elif isinstance(where, NfsSource):
            source["nfs"] = where
        else:
            source["file"] = str(where)
        drive = Drive.from_mapping(
            {
                **source,
                "passthrough": args.passthrough,
                "media": "cdrom" if args.cdrom else "disk",
                "format": args.format,
                "interface": args.bus,
                "cache": args.cache,
                "aio": args.aio,
                "discard": args.discard,
                "serial": args.serial,
                "read_only": args.read_only,
                "bootindex": args.bootindex,
                "rerror": args.rerror,
                "werror": args.werror,
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
        parser.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="how long to wait for the guest to release each disk detached (default 10)",
        )

    async def run(self, args: argparse.Namespace) -> int:
        desired = apply_ops.load_desired(args.file)
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            plan = await apply_ops.apply(
                vm, desired, dry_run=args.dry_run, unplug_timeout=args.timeout
            )
        verb = "would do" if args.dry_run else "did"
        text = plan.render() if plan.empty else f"{verb}:\n{plan.render()}"
        if plan.pending:
            text += (
                f"\nnot applied yet: the guest has not released {', '.join(plan.pending)}; "
                "run apply again once it has (it deletes their nodes), or reset the VM"
            )
        emit(
            args,
            {
                "steps": [s.to_json() for s in plan.steps],
                "conflicts": list(plan.conflicts),
                "pending": list(plan.pending),
                "applied": not args.dry_run and not plan.pending,
            },
            text,
        )
        # A real apply with conflicts raised before changing anything; a dry run says so too.
        if plan.conflicts:
            return ExitCode.ERROR
        return ExitCode.PENDING if plan.pending else ExitCode.OK

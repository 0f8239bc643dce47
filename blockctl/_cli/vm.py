"""The VM commands: ``up``, ``ls``, ``status``, ``qmp``, ``down``, ``guest`` and ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockctl import _images, _journal, _lazy, _runtime
from blockctl._cli.common import DEFAULT_NAME, Command, emit, load_config
from blockctl._machine import (
    Timeouts,
    attach,
    daemon_journal_dir,
    launch_detached,
    shutdown_detached,
)
from blockctl._ops import drives
from blockctl.errors import ConfigError, VMError
from blockctl.types import DeprecatedInput, Drive, ImageFormat, MachineConfig

if TYPE_CHECKING:
    from blockctl import _agent, _guest
else:
    # Imported when first used: `status`, `drives`, `ls` and `--version` do not need them
    # (`status` reads the guest agent's freeze records only when there is one).
    _agent = _lazy.module("blockctl._agent")
    _guest = _lazy.module("blockctl._guest")


DEFAULT_DISK_BYTES = 64 << 20


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
                    # "starting": QEMU runs and has not greeted its launcher yet (or its
                    # launcher died there: `blockctl recover` takes it over).
                    "state": ("starting" if record.starting else "running")
                    if _runtime.is_alive(record)
                    else "dead",
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
            # And those that ran in a vhost-user-blk disk's qemu-storage-daemon.
            for device, record in vm.registry.drives.items():
                if record.daemon is not None and vm.run_dir is not None:
                    more, more_interrupted = operations_on_record(
                        daemon_journal_dir(vm.run_dir, device)
                    )
                    running += more
                    interrupted += more_interrupted
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
                    "io_status": info.io_status,
                    "vhost_user": None if info.vhost_user is None else info.vhost_user.to_json(),
                }
            )
        failed = [i.device_id for i in infos if i.io_error]
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
            "io_error_drives": failed,
        }
        lines = [f"{vm.name}: {status.status} (pid {vm.pid}, QEMU {version})"]
        if status.status == "io-error":
            lines.append(
                "  paused on an I/O error of "
                + (", ".join(failed) if failed else "a drive")
                + f": bring its storage back, then `blockctl resume {vm.name}`"
            )
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
                io = f" io-status={d['io_status']}" if d["io_status"] not in (None, "ok") else ""
                lines.append(
                    f"  {d['device']}: {d['driver']} {d['file']} size={d['size']} "
                    f"ro={d['read_only']}{io}"
                )
        emit(args, data, "\n".join(lines))
        return 0


class Resume(Command):
    name = "resume"
    help = "resume a paused VM (e.g. paused on an I/O error once its storage is back)"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("vm", help="VM name, or a QMP socket path")
        parser.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="how long to keep resuming a VM that pauses again on an I/O error",
        )

    async def run(self, args: argparse.Namespace) -> int:
        async with attach(args.vm, vm_name=args.vm_name) as vm:
            status = await vm.resume(timeout=args.timeout)
            failed = (
                [i.device_id for i in await drives.list_drives(vm) if i.io_error]
                if status.status == "io-error"
                else []
            )
        if status.status == "io-error":
            # QEMU retried the failed requests and they failed again: the storage is still away.
            raise VMError(
                vm.name,
                f"{vm.name} paused again on an I/O error of {', '.join(failed) or 'a drive'}: "
                f"its storage is still unreachable (nothing was lost); bring it back and run "
                f"`blockctl resume {vm.name}` again",
            )
        emit(
            args,
            {"name": vm.name, "status": status.status, "running": status.running},
            f"{vm.name}: {status.status}",
        )
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
    has_freeze = run_dir is not None and any(run_dir.glob(f"{_journal.FREEZE_PREFIX}*"))
    for freeze in _agent.load_freeze_records(run_dir) if has_freeze else ():
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

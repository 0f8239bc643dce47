"""``fleet``: blockctl on Temporal (the ``blockctl[fleet]`` extra). ``worker`` runs a host's
worker; ``backup`` runs a fleet backup over an inventory and prints each VM's point;
``verify``, ``prune``, ``restore``, ``snapshot`` and ``commit`` verify each VM's newest
point, prune its points, restore a point into new files, take and commit back an external
snapshot, on its host's worker; ``attach`` and ``detach`` hot-plug and unplug one device of
one VM on its host's worker; ``status`` shows each VM's last point, running backups and
last failure (and, for hosts without VMs named, the VMs their workers list; its last fleet
verify, prune and restore), and the last fleet backups Temporal has; ``schedule`` creates,
lists and deletes Temporal Schedules that run a fleet backup.

temporalio is imported only when a fleet command runs: every other command, and this one's
parser, work without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from blockctl._cli.common import Command, ExitCode, emit, global_options
from blockctl._cli.output import human_size, table
from blockctl.errors import ConfigError, MissingComponent

if TYPE_CHECKING:
    from blockctl._fleet.inventory import FleetBackupRequest, VMBackup, VMPruneResult
    from blockctl._fleet.status import FleetStatus, ScheduleStatus

DEFAULT_ADDRESS = "127.0.0.1:7233"


def prune_line(r: VMPruneResult) -> str:
    """One VM's prune, as ``fleet prune`` says it."""
    if r.error is not None:
        return f"{r.host}/{r.vm}: FAILED: {r.error}"
    what = (
        f"deleted {len(r.deleted)} point(s), kept {len(r.kept)}; removed "
        f"{r.chunks_removed} chunk(s), {human_size(r.bytes_removed)}"
    )
    for point, reason in r.served.items():
        what += f"; kept {point}: {reason}"
    if r.gc_skipped:
        what += f"; chunks not collected: {r.gc_skipped}"
    return f"{r.host}/{r.vm}: {what}"


def _require_temporalio() -> None:
    try:
        import temporalio  # noqa: F401
    except ImportError:
        raise MissingComponent(
            "temporalio (the fleet's Temporal SDK)", "pip install 'blockctl[fleet]'"
        ) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1.0 <= value <= 86400.0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, 1 to 86400")
    return value


def _limit(text: str) -> int:
    from blockctl._fleet.inventory import MAX_LIMIT

    if not text.isdigit() or not 0 <= int(text) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a number of backups at once, 1 to {MAX_LIMIT} (0: no limit)"
        )
    return int(text)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1.0 <= value <= 31 * 86400.0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, 1 to {31 * 86400} (31 days)")
    return value


def _keep(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of points to keep, at least 1")
    return int(text)


def _runs(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of runs, 1 to 100")
    return int(text)


class Fleet(Command):
    name = "fleet"
    help = "blockctl on Temporal: a worker per host, fleet backups over an inventory"
    # The Temporal client's threads can crash CPython's finalization (sdk-python issue 300):
    # main() leaves with os._exit once the output is flushed.
    exit_hard = True

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        p = sub.add_parser(
            "worker",
            parents=[global_options(parent=False)],
            help="run this host's worker on task queue blockctl@HOST until Ctrl-C",
        )
        p.add_argument("--host", required=True, help="this host's name in the inventory")
        p.add_argument(
            "--runtime-dir",
            type=Path,
            help="where this host's VMs are found (default: $BLOCKCTL_RUNTIME_DIR, ...)",
        )
        self._server_options(p)
        p = sub.add_parser(
            "backup",
            parents=[global_options(parent=False)],
            help="back up every VM of an inventory, each on its host's worker (exit 1: one failed)",
        )
        p.add_argument("inventory", type=Path, help="a TOML inventory: [hosts.NAME] vms = [...]")
        p.add_argument("--workflow-id", help="the workflow's id (default: fleet-backup-<uuid>)")
        self._backup_options(p)
        self._server_options(p)

        p = sub.add_parser(
            "verify",
            parents=[global_options(parent=False)],
            help="verify each VM's newest point on its host's worker (exit 4: one is damaged)",
        )
        p.add_argument("inventory", type=Path, help="a TOML inventory: [hosts.NAME] vms = [...]")
        p.add_argument("--workflow-id", help="the workflow's id (default: fleet-verify-<uuid>)")
        self._heartbeat_option(p)
        p.add_argument(
            "--per-host",
            type=_limit,
            metavar="N",
            help="at most N verifies at once on one host (default: the inventory's; 0: none)",
        )
        self._server_options(p)

        p = sub.add_parser(
            "prune",
            parents=[global_options(parent=False)],
            help="keep each VM's newest N points, on its host's worker (exit 1: one failed)",
        )
        p.add_argument("inventory", type=Path, help="a TOML inventory: [hosts.NAME] vms = [...]")
        p.add_argument(
            "--keep", type=_keep, required=True, metavar="N", help="how many points to keep"
        )
        p.add_argument("--workflow-id", help="the workflow's id (default: fleet-prune-<uuid>)")
        self._heartbeat_option(p)
        self._server_options(p)

        p = sub.add_parser(
            "restore",
            parents=[global_options(parent=False)],
            help="restore each VM's newest point (or --point) into new files on its host "
            "(exit 1: one failed)",
        )
        p.add_argument("inventory", type=Path, help="a TOML inventory: [hosts.NAME] vms = [...]")
        p.add_argument(
            "--dest-dir",
            type=Path,
            required=True,
            metavar="DIR",
            help="where each host writes its VMs' files, VM.POINT.DEVICE.qcow2 (a directory "
            "on that host)",
        )
        p.add_argument("--point", metavar="ID", help="this point of each VM (default: its newest)")
        p.add_argument(
            "--vm",
            action="append",
            dest="only_vms",  # not ``vm``: that name is a single positional's elsewhere
            metavar="NAME",
            help="only this VM of the inventory (repeatable; default: all of them)",
        )
        p.add_argument("--workflow-id", help="the workflow's id (default: fleet-restore-<uuid>)")
        self._heartbeat_option(p)
        p.add_argument(
            "--per-host",
            type=_limit,
            metavar="N",
            help="at most N restores at once on one host (default: the inventory's; 0: none)",
        )
        self._server_options(p)

        for action, what in (
            ("snapshot", "take external snapshot TAG of each VM's disks on its host"),
            ("commit", "commit each VM's external snapshot TAG back into its disks' images"),
        ):
            p = sub.add_parser(
                action,
                parents=[global_options(parent=False)],
                help=f"{what} (exit 1: one failed)",
            )
            p.add_argument(
                "inventory", type=Path, help="a TOML inventory: [hosts.NAME] vms = [...]"
            )
            p.add_argument("tag", help="the snapshot's tag (what finds it again on a retry)")
            if action == "snapshot":
                p.add_argument(
                    "--dir",
                    type=Path,
                    metavar="DIR",
                    help="the overlays' directory on each host (default: beside each image)",
                )
            p.add_argument(
                "--vm",
                action="append",
                dest="only_vms",
                metavar="NAME",
                help="only this VM of the inventory (repeatable; default: all of them)",
            )
            p.add_argument(
                "--workflow-id", help=f"the workflow's id (default: fleet-{action}-<uuid>)"
            )
            self._heartbeat_option(p)
            p.add_argument(
                "--per-host",
                type=_limit,
                metavar="N",
                help="at most N at once on one host (default: the inventory's; 0: none)",
            )
            self._server_options(p)

        p = sub.add_parser(
            "attach",
            parents=[global_options(parent=False)],
            help="hot-plug an image into one running VM on its host's worker (exit 1: failed)",
        )
        p.add_argument("host", help="the VM's host (its worker's --host)")
        p.add_argument("vm", help="the running VM's name on that host")
        p.add_argument("--file", required=True, help="the image, a path on that host")
        p.add_argument(
            "--format",
            default="qcow2",
            choices=["qcow2", "raw"],
            help="the image's format (never probed; default qcow2)",
        )
        p.add_argument(
            "--id",
            dest="device_id",
            metavar="DEVICE_ID",
            help="the guest device's id (what finds it again on a retry; default: "
            "fleet-<digest of the file's path>)",
        )
        p.add_argument("--read-only", action="store_true")
        self._heartbeat_option(p)
        self._server_options(p)
        p = sub.add_parser(
            "detach",
            parents=[global_options(parent=False)],
            help="unplug a device of one running VM on its host's worker (exit 1: failed; "
            "3: unplug pending)",
        )
        p.add_argument("host", help="the VM's host (its worker's --host)")
        p.add_argument("vm", help="the running VM's name on that host")
        p.add_argument("device_id", metavar="DEVICE_ID", help="the device's id")
        p.add_argument(
            "--timeout",
            type=_seconds,
            default=10.0,
            metavar="SECONDS",
            help="how long to wait for the guest to release it (default 10)",
        )
        self._heartbeat_option(p)
        self._server_options(p)

        p = sub.add_parser(
            "status",
            parents=[global_options(parent=False)],
            help="each VM's last point, running backups and last failure; the last fleet backups",
        )
        p.add_argument(
            "--inventory",
            type=Path,
            metavar="FILE",
            help="only this inventory's VMs (a host without vms: those its worker lists), and "
            "the runs backing up one of them at least (default: every VM the server has "
            "backups of and every VM the polling workers list, every run)",
        )
        p.add_argument(
            "--runs",
            type=_runs,
            default=5,
            metavar="N",
            help="how many of the last fleet backup runs to show (default 5)",
        )
        self._server_options(p)

        p = sub.add_parser(
            "schedule",
            parents=[global_options(parent=False)],
            help="create, update, list or delete a Temporal Schedule running an inventory's "
            "fleet backup",
        )
        p.add_argument("schedule_action", choices=["create", "update", "list", "delete"])
        p.add_argument("name", nargs="?", help="the schedule's name (create, update, delete)")
        p.add_argument(
            "inventory", nargs="?", type=Path, help="create, update: the TOML inventory, read now"
        )
        when = p.add_mutually_exclusive_group()
        when.add_argument(
            "--every",
            type=_interval,
            metavar="SECONDS",
            help="create, update: a run every SECONDS (update: default, the times it had)",
        )
        when.add_argument(
            "--cron", metavar="SPEC", help='create, update: runs at a cron line ("0 2 * * *")'
        )
        self._backup_options(p)
        self._server_options(p)

    @staticmethod
    def _heartbeat_option(p: argparse.ArgumentParser) -> None:
        from blockctl._fleet.inventory import DEFAULT_HEARTBEAT_TIMEOUT

        p.add_argument(
            "--heartbeat-timeout",
            type=_seconds,
            default=DEFAULT_HEARTBEAT_TIMEOUT,
            metavar="SECONDS",
            help="a worker silent this long is taken as lost and its work retried (default 30)",
        )

    @classmethod
    def _backup_options(cls, p: argparse.ArgumentParser) -> None:
        cls._heartbeat_option(p)
        p.add_argument(
            "--per-host",
            type=_limit,
            metavar="N",
            help="at most N backups at once on one host (default: the inventory's; 0: none)",
        )
        p.add_argument(
            "--per-repository",
            type=_limit,
            metavar="N",
            help="at most N at once into one repository (default: the inventory's; 0: none)",
        )

    @staticmethod
    def _server_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--address",
            default=DEFAULT_ADDRESS,
            help=f"the Temporal server (default {DEFAULT_ADDRESS})",
        )
        p.add_argument("--namespace", default="default")

    async def run(self, args: argparse.Namespace) -> int:
        if args.action == "worker":
            return await self._worker(args)
        if args.action == "status":
            return await self._status(args)
        if args.action == "schedule":
            return await self._schedule(args)
        if args.action == "verify":
            return await self._verify(args)
        if args.action == "prune":
            return await self._prune(args)
        if args.action == "restore":
            return await self._restore(args)
        if args.action in ("snapshot", "commit"):
            return await self._chain(args)
        if args.action in ("attach", "detach"):
            return await self._plug(args)
        return await self._backup(args)

    async def _worker(self, args: argparse.Namespace) -> int:
        from blockctl._fleet.inventory import check_host, task_queue

        check_host(args.host)
        if args.runtime_dir is not None:
            os.environ["BLOCKCTL_RUNTIME_DIR"] = str(args.runtime_dir.absolute())
        _require_temporalio()
        from blockctl._fleet.worker import run_worker

        def ready() -> None:
            queue = task_queue(args.host)
            emit(
                args,
                {"host": args.host, "task_queue": queue, "address": args.address},
                f"{args.host}: polling {queue} at {args.address} (Ctrl-C to stop)",
            )
            sys.stdout.flush()

        await run_worker(args.host, args.address, args.namespace, on_ready=ready)
        return ExitCode.OK

    @staticmethod
    def _request(args: argparse.Namespace) -> FleetBackupRequest:
        """The inventory's fleet backup, with the command line's heartbeat timeout and limits."""
        from dataclasses import replace

        from blockctl._fleet.inventory import load_inventory

        request = replace(load_inventory(args.inventory), heartbeat_timeout=args.heartbeat_timeout)
        if args.per_host is not None:
            request = replace(request, per_host=args.per_host)
        if args.per_repository is not None:
            request = replace(request, per_repository=args.per_repository)
        return request

    @staticmethod
    async def _listed(request: FleetBackupRequest, args: argparse.Namespace) -> FleetBackupRequest:
        """``request`` with the VMs of the hosts it names without VMs, as their workers list
        them now (a workflow's input names every VM)."""
        if not request.listed:
            return request
        from blockctl._fleet.inventory import with_listed
        from blockctl._fleet.worker import list_hosts_vms

        found = await list_hosts_vms([h.host for h in request.listed], args.address, args.namespace)
        return with_listed(request, found)

    async def _verify(self, args: argparse.Namespace) -> int:
        from blockctl._fleet.inventory import FleetVerifyRequest, VMVerify, load_inventory

        inventory = load_inventory(args.inventory)
        _require_temporalio()
        from blockctl._fleet.worker import fleet_verify

        inventory = await self._listed(inventory, args)
        request = FleetVerifyRequest(
            [VMVerify(b.host, b.vm, b.repository) for b in inventory.backups],
            args.heartbeat_timeout,
            inventory.per_host if args.per_host is None else args.per_host,
        )
        result = await fleet_verify(request, args.address, args.namespace, args.workflow_id)
        lines = []
        for r in result.results:
            if r.error is not None:
                what = f"FAILED: {r.error}"
            elif r.point is None:
                what = "no point"
            elif r.ok:
                what = f"{r.point}: ok ({r.chunks_checked} chunks, {human_size(r.bytes_checked)})"
            else:
                what = f"{r.point}: DAMAGED: " + "; ".join(r.problems)
            lines.append(f"{r.host}/{r.vm}: {what}")
        failed = [r for r in result.results if r.error is not None]
        damaged = [r for r in result.results if r.error is None and r.point and not r.ok]
        lines.append(f"{len(result.results)} VMs: {len(damaged)} damaged, {len(failed)} failed")
        emit(
            args,
            {
                "results": [dataclasses.asdict(r) for r in result.results],
                "damaged": len(damaged),
                "failed": len(failed),
            },
            "\n".join(lines),
        )
        if damaged:
            return ExitCode.DIFFERENT
        return ExitCode.ERROR if failed else ExitCode.OK

    async def _prune(self, args: argparse.Namespace) -> int:
        from blockctl._fleet.inventory import FleetPruneRequest, VMPrune, load_inventory

        inventory = load_inventory(args.inventory)
        _require_temporalio()
        from blockctl._fleet.worker import fleet_prune

        inventory = await self._listed(inventory, args)
        request = FleetPruneRequest(
            [VMPrune(b.host, b.vm, b.repository, args.keep) for b in inventory.backups],
            args.heartbeat_timeout,
        )
        result = await fleet_prune(request, args.address, args.namespace, args.workflow_id)
        lines = [prune_line(r) for r in result.results]
        failed = [r for r in result.results if r.error is not None]
        lines.append(f"{len(result.results) - len(failed)} pruned, {len(failed)} failed")
        emit(
            args,
            {
                "results": [dataclasses.asdict(r) for r in result.results],
                "failed": len(failed),
            },
            "\n".join(lines),
        )
        return ExitCode.ERROR if failed else ExitCode.OK

    async def _restore(self, args: argparse.Namespace) -> int:
        from blockctl._fleet.inventory import FleetRestoreRequest, VMRestore, load_inventory

        inventory = load_inventory(args.inventory)
        _require_temporalio()
        from blockctl._fleet.worker import fleet_restore

        inventory = await self._listed(inventory, args)
        backups = _only(inventory.backups, args)
        dest_dir = str(args.dest_dir.absolute())
        request = FleetRestoreRequest(
            [VMRestore(b.host, b.vm, b.repository, dest_dir, args.point) for b in backups],
            args.heartbeat_timeout,
            inventory.per_host if args.per_host is None else args.per_host,
        )
        result = await fleet_restore(request, args.address, args.namespace, args.workflow_id)
        lines = []
        for r in result.results:
            if r.error is not None:
                what = f"FAILED: {r.error}"
            elif r.point is None:
                what = "no point"
            else:
                what = f"{r.point}: " + ", ".join(
                    f + (" (an earlier attempt's)" if f in r.reused else "") for f in r.files
                )
            lines.append(f"{r.host}/{r.vm}: {what}")
        failed = [r for r in result.results if r.error is not None]
        lines.append(f"{len(result.results) - len(failed)} restored, {len(failed)} failed")
        emit(
            args,
            {
                "results": [dataclasses.asdict(r) for r in result.results],
                "failed": len(failed),
            },
            "\n".join(lines),
        )
        return ExitCode.ERROR if failed else ExitCode.OK

    async def _chain(self, args: argparse.Namespace) -> int:
        from blockctl._fleet.inventory import FleetChainRequest, VMChain, load_inventory

        inventory = load_inventory(args.inventory)
        _require_temporalio()
        from blockctl._fleet.worker import fleet_chain

        inventory = await self._listed(inventory, args)
        directory = getattr(args, "dir", None)
        where = None if directory is None else str(directory.absolute())
        request = FleetChainRequest(
            [VMChain(b.host, b.vm, args.tag, where) for b in _only(inventory.backups, args)],
            args.heartbeat_timeout,
            inventory.per_host if args.per_host is None else args.per_host,
        )
        result = await fleet_chain(
            args.action, request, args.address, args.namespace, args.workflow_id
        )
        done = "snapshotted" if args.action == "snapshot" else "committed"
        lines = []
        for r in result.results:
            if r.error is not None:
                what = f"FAILED: {r.error}"
            else:
                what = ", ".join(f"{d} {f}" for d, f in r.overlays.items()) or "-"
                what = f"{done} {what}" + (" (by an earlier attempt)" if r.reused else "")
            lines.append(f"{r.host}/{r.vm}: {what}")
        failed = [r for r in result.results if r.error is not None]
        lines.append(f"{len(result.results) - len(failed)} {done}, {len(failed)} failed")
        emit(
            args,
            {
                "results": [dataclasses.asdict(r) for r in result.results],
                "failed": len(failed),
            },
            "\n".join(lines),
        )
        return ExitCode.ERROR if failed else ExitCode.OK

    async def _plug(self, args: argparse.Namespace) -> int:
        from blockctl._fleet.inventory import (
            VMAttach,
            VMDetach,
            check_host,
            plug_device_id,
        )

        check_host(args.host)
        request: VMAttach | VMDetach
        if args.action == "attach":
            file = args.file
            if not file.startswith("/"):
                # Made absolute by no one: it names a file on the VM's host, not here.
                raise ConfigError(
                    "file", f"{file!r}: give the image's absolute path on {args.host}"
                )
            request = VMAttach(
                args.host,
                args.vm,
                file,
                args.format,
                args.device_id or plug_device_id(file),
                args.read_only,
                args.heartbeat_timeout,
            )
        else:
            request = VMDetach(
                args.host, args.vm, args.device_id, args.timeout, args.heartbeat_timeout
            )
        _require_temporalio()
        from blockctl._fleet.worker import fleet_plug

        r = await fleet_plug(request, args.address, args.namespace)
        where = f"{r.host}/{r.vm} {r.device_id}"
        if r.error is not None:
            line = f"{where}: FAILED: {r.error}"
        elif r.state == "attached":
            line = f"{where}: attached {r.file}"
        elif r.state == "pending":
            line = (
                f"{where}: unplug pending: the guest has not released it yet; its nodes are "
                "kept. Run fleet detach again later."
            )
        else:
            line = f"{where}: detached"
        if r.error is None and r.reused:
            line += " (by an earlier attempt)"
        emit(args, dataclasses.asdict(r), line)
        if r.error is not None:
            return ExitCode.ERROR
        return ExitCode.PENDING if r.state == "pending" else ExitCode.OK

    async def _schedule(self, args: argparse.Namespace) -> int:
        from blockctl._fleet.inventory import check_schedule_name
        from blockctl._fleet.status import schedules_to_json
        from blockctl.errors import ConfigError

        action = args.schedule_action
        if action == "list":
            if args.name is not None:
                raise ConfigError("name", "fleet schedule list takes no name")
            _require_temporalio()
            from blockctl._fleet.worker import list_schedules

            found = await list_schedules(args.address, args.namespace)
            emit(args, schedules_to_json(found), render_schedules(found))
            return ExitCode.OK
        if args.name is None:
            raise ConfigError("name", f"fleet schedule {action} NAME: the schedule's name")
        name = check_schedule_name(args.name)
        if action == "delete":
            if args.inventory is not None:
                raise ConfigError("inventory", "fleet schedule delete takes a name only")
            _require_temporalio()
            from blockctl._fleet.worker import delete_schedule

            await delete_schedule(name, args.address, args.namespace)
            emit(args, {"deleted": name}, f"deleted schedule {name}")
            return ExitCode.OK
        if args.inventory is None:
            raise ConfigError("inventory", f"fleet schedule {action} NAME INVENTORY")
        if action == "create" and args.every is None and args.cron is None:
            raise ConfigError("every", "--every SECONDS or --cron SPEC: when the runs start")
        request = self._request(args)
        _require_temporalio()
        from blockctl._fleet.worker import create_schedule, update_schedule

        request = await self._listed(request, args)
        inventory = str(args.inventory.absolute())
        make = create_schedule if action == "create" else update_schedule
        await make(name, request, inventory, args.every, args.cron, args.address, args.namespace)
        if args.every is not None:
            spec = f"every {args.every:g} s"
        elif args.cron is not None:
            spec = f"cron {args.cron!r}"
        else:
            spec = "at the times it had"
        done = "created" if action == "create" else "updated"
        emit(
            args,
            {done: name, "every": args.every, "cron": args.cron, "inventory": inventory},
            f"{done} schedule {name}: the fleet backup of {inventory}, {spec}",
        )
        return ExitCode.OK

    async def _backup(self, args: argparse.Namespace) -> int:
        request = self._request(args)
        _require_temporalio()
        from blockctl._fleet.worker import fleet_backup

        request = await self._listed(request, args)

        result = await fleet_backup(request, args.address, args.namespace, args.workflow_id)
        lines = []
        for r in result.results:
            what = f"{r.point} ({r.kind})" if r.error is None else f"FAILED: {r.error}"
            lines.append(f"{r.host}/{r.vm}: {what}")
        failed = len(result.failed)
        lines.append(f"{len(result.results) - failed} backed up, {failed} failed")
        emit(
            args,
            {
                "results": [dataclasses.asdict(r) for r in result.results],
                "failed": failed,
            },
            "\n".join(lines),
        )
        return ExitCode.ERROR if failed else ExitCode.OK

    async def _status(self, args: argparse.Namespace) -> int:
        from blockctl._fleet.inventory import ListResult, load_inventory
        from blockctl._fleet.status import (
            FleetStatus,
            known_vms,
            to_json,
            vm_points,
            with_checks,
            with_workers_vms,
        )

        inventory = None if args.inventory is None else load_inventory(args.inventory)
        _require_temporalio()
        from blockctl._fleet.worker import (
            list_hosts_vms,
            recent_runs,
            vm_checks,
            vm_work,
            worker_hosts,
        )

        work = await vm_work(args.address, args.namespace)
        if inventory is None:
            # Every VM the server has backups of, and every VM the polling workers list.
            backups = known_vms(work)
            hosts = sorted(set(await worker_hosts(args.address, args.namespace)))
            repositories: dict[str, str] = {}
        else:
            backups = inventory.backups
            hosts = [h.host for h in inventory.listed]
            repositories = {h.host: h.repository for h in inventory.listed}
        found = (
            await list_hosts_vms(hosts, args.address, args.namespace) if hosts else ListResult([])
        )
        # A VM both listed and backed up keeps its newest backup's repository (or the
        # inventory's); one only listed has its host's inventory repository, else none.
        backups, states = with_workers_vms(backups, found.hosts, repositories)
        if inventory is None:
            backups = sorted(backups, key=lambda b: (b.host, b.vm))
        vms = with_checks(
            vm_points(backups, work, states), await vm_checks(args.address, args.namespace)
        )
        # With an inventory: the runs that back up one of its VMs at least.
        named = None if inventory is None else {(b.host, b.vm) for b in backups}
        runs = await recent_runs(args.address, args.namespace, args.runs, named)
        status = FleetStatus(vms, runs, found.hosts)
        emit(args, to_json(status), render_status(status))
        return ExitCode.OK


def _only(backups: list[VMBackup], args: argparse.Namespace) -> list[VMBackup]:
    """The inventory's VMs, or those of them ``--vm`` names (a name it has not: an error)."""
    from blockctl.errors import ConfigError

    if args.only_vms is None:
        return backups
    missing = sorted(set(args.only_vms) - {b.vm for b in backups})
    if missing:
        raise ConfigError("vm", f"{missing[0]!r} is not a VM of {args.inventory}")
    return [b for b in backups if b.vm in args.only_vms]


def _when(stamp: float | None) -> str:
    return "" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _vm_notes(status: FleetStatus) -> list[str]:
    """Each VM's running backups and last failure, and a repository not read, a line each."""
    notes = [f"{h.host}: VMs not listed: {h.error}" for h in status.hosts if h.error is not None]
    for v in status.vms:
        if v.unreadable is not None:
            notes.append(f"{v.host}/{v.vm}: repository not read: {v.unreadable}")
        for r in v.running:
            what = (
                "its backup not scheduled yet"
                if r.attempt is None
                else f"attempt {r.attempt}, {r.state}, last heartbeat {_when(r.last_heartbeat)}"
            )
            after = "" if r.last_failure is None else f" (previous attempt: {r.last_failure})"
            notes.append(f"{v.host}/{v.vm}: running {r.workflow_id}: {what}{after}")
        f = v.last_failure
        if f is not None:
            notes.append(
                f"{v.host}/{v.vm}: last failure {f.workflow_id} ({f.status} {_when(f.closed)}): "
                f"{f.error}"
            )
        if (c := v.checks.verify) is not None:
            if c.error is not None:
                what = f"FAILED: {c.error}"
            elif c.point is None:
                what = "no point"
            else:
                what = f"{c.point} ok" if c.ok else f"{c.point} DAMAGED: " + "; ".join(c.problems)
            notes.append(
                f"{v.host}/{v.vm}: last verify {c.workflow_id} ({_when(c.closed)}): {what}"
            )
        if (p := v.checks.prune) is not None:
            what = f"FAILED: {p.error}" if p.error else f"deleted {p.deleted}, kept {p.kept}"
            notes.append(f"{v.host}/{v.vm}: last prune {p.workflow_id} ({_when(p.closed)}): {what}")
        if (last := v.checks.restore) is not None:
            if last.error is not None:
                what = f"FAILED: {last.error}"
            elif last.point is None:
                what = "no point"
            else:
                what = f"{last.point} into " + ", ".join(last.files)
            notes.append(
                f"{v.host}/{v.vm}: last restore {last.workflow_id} ({_when(last.closed)}): {what}"
            )
    return notes


def render_status(status: FleetStatus) -> str:
    """Two tables: the VMs with their last points, the runs with their outcomes; then each
    VM's running backups and last failure, each failed VM of a completed run, and each ended
    run's error."""
    # The STATE column (a VM as its host's worker listed it) when workers were asked.
    listed = bool(status.hosts)
    vms = table(
        ["HOST", "VM", *(["STATE"] if listed else []), "LAST POINT", "KIND", "COMPLETED",
         "RUNNING"],
        [
            (
                v.host,
                v.vm,
                *([v.state or "-"] if listed else []),
                "(no point)" if v.last is None else v.last.id,
                None if v.last is None else v.last.kind,
                None if v.last is None else _when(v.last.completed),
                len(v.running) or None,
            )
            for v in status.vms
        ],
        right={"RUNNING"},
    )  # fmt: skip
    if not status.vms:
        vms = "no VM backups on the server"
    if vm_notes := _vm_notes(status):
        vms = f"{vms}\n\n" + "\n".join(vm_notes)
    if not status.runs:
        return f"{vms}\n\nno fleet backup runs on the server"
    runs = table(
        ["WORKFLOW", "STATUS", "STARTED", "CLOSED", "BACKED UP", "FAILED"],
        [
            (
                r.workflow_id,
                r.status,
                _when(r.started),
                _when(r.closed),
                r.backed_up,
                None if r.backed_up is None else len(r.failed),
            )
            for r in status.runs
        ],
        right={"BACKED UP", "FAILED"},
    )
    notes = [f"{r.workflow_id}: {f.host}/{f.vm}: {f.error}" for r in status.runs for f in r.failed]
    notes += [f"{r.workflow_id}: {r.error}" for r in status.runs if r.error is not None]
    return "\n\n".join([vms, runs, *(["\n".join(notes)] if notes else [])])


def render_schedules(schedules: list[ScheduleStatus]) -> str:
    """A table of the schedules: name, spec, VMs, next run, last run started."""
    if not schedules:
        return "no fleet backup schedules on the server"
    return table(
        ["NAME", "WHEN", "VMS", "NEXT RUN", "LAST RUN", "INVENTORY"],
        [
            (
                s.name,
                (f"every {s.every:g} s" if s.every is not None else f"cron {s.cron}")
                + (" (paused)" if s.paused else ""),
                s.vms,
                _when(s.next_runs[0]) if s.next_runs else None,
                s.recent[-1].workflow_id if s.recent else None,
                s.inventory,
            )
            for s in schedules
        ],
        right={"VMS"},
    )

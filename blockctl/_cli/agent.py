"""``agent`` (the guest agent), and the ``--quiesce`` options of the commands that take a point in
time (``snapshot``, ``backup create``)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from blockctl import _agent
from blockctl._cli.common import Command, emit
from blockctl._log import get_logger
from blockctl._machine import attach
from blockctl.errors import ConfigError, QuiesceFailed


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

"""``fleet``: blockctl on Temporal (the ``blockctl[fleet]`` extra). ``worker`` runs a host's
worker; ``backup`` runs a fleet backup over an inventory and prints each VM's point.

temporalio is imported only when a fleet command runs: every other command, and this one's
parser, work without it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from blockctl._cli.common import Command, ExitCode, emit, global_options
from blockctl.errors import MissingComponent

DEFAULT_ADDRESS = "127.0.0.1:7233"


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
        from blockctl._fleet.inventory import DEFAULT_HEARTBEAT_TIMEOUT

        p.add_argument(
            "--heartbeat-timeout",
            type=_seconds,
            default=DEFAULT_HEARTBEAT_TIMEOUT,
            metavar="SECONDS",
            help="a worker silent this long is taken as lost and its backups retried (default 30)",
        )
        self._server_options(p)

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

    async def _backup(self, args: argparse.Namespace) -> int:
        from dataclasses import replace

        from blockctl._fleet.inventory import load_inventory

        request = replace(load_inventory(args.inventory), heartbeat_timeout=args.heartbeat_timeout)
        _require_temporalio()
        from blockctl._fleet.worker import fleet_backup

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
                "results": [
                    {
                        "host": r.host,
                        "vm": r.vm,
                        "repository": r.repository,
                        "point": r.point,
                        "kind": r.kind,
                        "bytes_read": r.bytes_read,
                        "error": r.error,
                    }
                    for r in result.results
                ],
                "failed": failed,
            },
            "\n".join(lines),
        )
        return ExitCode.ERROR if failed else ExitCode.OK

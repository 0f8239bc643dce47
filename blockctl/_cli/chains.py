"""The backing-chain commands: ``chain``, ``snapshot``, ``commit`` and ``stream``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockctl import _agent, _lazy
from blockctl._cli.agent import add_quiesce_options, freeze_deadline_option, quiesce_option
from blockctl._cli.common import Command, emit
from blockctl._cli.jobs import error_policy_options, job_control, job_hooks
from blockctl._machine import attach
from blockctl.errors import ConfigError

if TYPE_CHECKING:
    from blockctl._ops import chains
else:
    # Imported when first used: `status`, `drives`, `ls` and `--version` do not need it.
    chains = _lazy.module("blockctl._ops.chains")


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
            in_daemons = await chains.daemon_graphs(vm)
        data = graph.to_json()
        text = graph.render_text()
        if in_daemons:
            # A vhost-user-blk disk's nodes are in its qemu-storage-daemon, read on its QMP.
            data["storage_daemons"] = {d: g.to_json() for d, g in sorted(in_daemons.items())}
            for device, daemon_graph in sorted(in_daemons.items()):
                text += f"{device}'s qemu-storage-daemon:\n" + "".join(
                    f"  {line}\n" for line in daemon_graph.render_text().splitlines()
                )
        emit(args, data, text)
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

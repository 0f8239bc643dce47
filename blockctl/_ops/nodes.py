"""What chains and recovery both need from a running VM's nodes: the block graph as QEMU
reports it now, and a flush of a device's chain. Below both (recovery runs before every chain
operation, and finishes what an interrupted one left), so neither imports the other for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import anyio

from blockctl._graph import BlockGraph, GraphNode
from blockctl._log import get_logger
from blockctl._machine import VM
from blockctl._qmp import wire
from blockctl._registry import DriveRecord
from blockctl.errors import BlockctlError, CommandFailed, PassedThrough

_log = get_logger()


async def read_graph(vm: VM) -> BlockGraph:
    """The VM's block graph as QEMU reports it now."""
    nodes = await wire.query_named_block_node_details(vm.session)
    return BlockGraph.from_qmp(nodes, await vm.block_devices(), vm.registry.backing_hints())


async def flush_chain(vm: VM, device: str) -> bool:
    """Flush every node blockctl opened for ``device`` to stable storage.

    QMP has no flush command; ``blockdev-reopen`` flushes each node it reopens before
    anything else, so the nodes are reopened with the complete options they have now
    (nothing changes). False when blockctl did not open the device (nothing was flushed).
    """
    record = vm.registry.drives.get(device)
    if record is None or not record.nodes:
        _log.warning("blockctl.chain.flush_skipped", vm=vm.name, device=device)
        return False
    graph = await read_graph(vm)
    # The chain's format nodes and their protocol nodes only (filters on top may not support
    # reopening, and hold no data of their own).
    names = {name for layer in graph.chain_of(device) for name in graph.layer_nodes(layer)}
    options = [dict(n) for n in record.nodes if n["node-name"] in names]
    if options:
        await wire.blockdev_reopen(vm.session, options)
        _log.info("blockctl.chain.flushed", vm=vm.name, device=device, nodes=len(options))
    return bool(options)


def node_options(record: DriveRecord | None, name: str) -> dict[str, Any] | None:
    if record is None:
        return None
    return next((dict(n) for n in record.nodes if n["node-name"] == name), None)


async def set_read_only(
    vm: VM, device: str, graph: BlockGraph, node: GraphNode, read_only: bool
) -> None:
    """Reopen a layer (format node and its file node) read-write or read-only, sending the
    complete option sets blockctl opened them with."""
    record = vm.registry.drives.get(device)
    options = []
    for name in reversed(graph.layer_nodes(node)):  # file node first
        recorded = node_options(record, name)
        if recorded is None:
            return  # not opened by blockctl: leave it to QEMU (it says why if it must)
        # A node recorded without "read-only" is read-write (QEMU's default), and a layer
        # already in the wanted mode is not reopened. On QEMU 7.2 a needless reopen of the
        # active qcow2 layer right before an intermediate commit, with the guest writing,
        # corrupted that layer (3 runs of 8 of test_snapshot_commit_stream_under_writing_guest;
        # 0 of 10 without the reopen).
        if recorded.get("read-only", False) != read_only:
            option = {**recorded, "read-only": read_only}
            if "backing" in recorded and name in graph.nodes:
                # The live link, not the recorded one: after an intermediate commit the
                # overlay above top backs onto base, and reopening it with the old backing
                # would attach the dropped layer again (blockdev-del then fails: "busy").
                option["backing"] = graph.nodes[name].backing
            options.append(option)
    if options:
        await wire.blockdev_reopen(vm.session, options)
        if record is not None:
            changed = {str(o["node-name"]): o for o in options}
            vm.registry.put(
                replace(
                    record, nodes=tuple(changed.get(str(n["node-name"]), n) for n in record.nodes)
                )
            )


async def delete_nodes(vm: VM, added: Sequence[str], *, event: str) -> dict[str, BlockctlError]:
    """Roll back nodes an operation added (``added`` in the order they were added): delete
    them top-down, shielded from cancellation, every one tried whatever the others did. The
    nodes QEMU refused to delete (still in use: the operation took effect after all) are
    returned with QEMU's refusal, each also logged as ``event``."""
    refused: dict[str, BlockctlError] = {}
    with anyio.CancelScope(shield=True):
        for name in reversed(added):
            try:
                await wire.blockdev_del(vm.session, name)
            except BlockctlError as exc:
                refused[name] = exc
                if not vm.session.lost:  # QEMU gone: its nodes went with it, nothing is kept
                    _log.warning(event, node=name, error=str(exc))
    return refused


async def delete_secrets(vm: VM, ids: Sequence[str]) -> None:
    """Delete the ``secret`` objects of a drive's nodes once no node uses them (one already
    gone, e.g. deleted by another client finishing the same removal, is not an error)."""
    for object_id in ids:
        with contextlib.suppress(CommandFailed):
            await wire.object_del(vm.session, object_id)


#: Guest devices that send the guest's SCSI commands to the LUN as they are (SG_IO through
#: the block layer, which only the iscsi node answers: measured, a qcow2 overlay above one
#: fails every guest read and write with EIO while QEMU reports the snapshot done). Their
#: writes are ioctls: no dirty bitmap records them and no copy-before-write filter sees them.
PASSTHROUGH_DEVICES = frozenset({"scsi-block", "scsi-generic"})


async def refuse_passed_through(
    vm: VM, graph: BlockGraph, devices: Sequence[str], operation: str
) -> None:
    """Refuse ``operation`` on any of ``devices`` that is a passed-through LUN, by the QOM
    type of the guest device QEMU has (not a record: a foreign VM has none)."""
    for device in devices:
        qdev = graph.devices[device].qdev
        if not qdev:
            continue  # a block backend with no guest device: nothing passes through
        # QEMU names a device by its id when it has one, else by its QOM path.
        path = qdev if qdev.startswith("/") else f"/machine/peripheral/{qdev}"
        kind = str(await vm.qom_get(path, "type"))
        if kind in PASSTHROUGH_DEVICES:
            raise PassedThrough(operation, device, device_driver=kind)

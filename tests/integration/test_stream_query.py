"""QEMU's crash at ``query-named-block-nodes`` while a stream job is concluded and not yet
dismissed (README, "Live restore"; ``scripts/repro_stream_query.py``): blockctl's own streams
never sit in that state (finalized at PENDING, auto-dismissed by QEMU), and blockctl's read of
the node list waits while another tool's stream does, or refuses, instead of sending the query
that kills the VM. A firmware-idle VM (no guest: the firmware finds nothing to boot), small
chains."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from blockctl import attach, chains, open_vm
from blockctl._ops.nodes import read_graph
from blockctl._qmp import wire
from blockctl.errors import Conflict
from blockctl.types import Drive, ImageFormat, MachineConfig
from tests.integration.conftest import STRICT, pattern, qcow2_image, run

MIB = 1 << 20


async def test_the_node_list_is_not_read_while_a_stream_is_concluded_and_not_dismissed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another tool's stream of a two-layer chain, left concluded (auto-dismiss off, as
    libvirt starts its jobs): a graph read refuses with a Conflict naming the job (before the
    guard, QEMU segfaulted on this very read: ConnectionLost, tried on 7.2 and 10.0.2);
    dismissed while the read waits, the read returns a one-layer chain and no copy-on-read
    filter, and QEMU runs on."""
    base = await qcow2_image(tmp_path / "base.qcow2", pattern(1, MIB), 4 * MIB)
    top = tmp_path / "top.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    config = MachineConfig(
        memory_mib=64,
        drives=(Drive(file=top, format=ImageFormat.QCOW2),),
        deprecated_input=STRICT,
    )
    async with open_vm(config) as vm:
        (device,) = vm.registry.drives
        before = await read_graph(vm)
        assert len(before.chain_of(device)) == 2
        job_id = "bc-stream-segv"
        with wire.job_events(vm.session) as events:
            top_node = before.chain_of(device)[0].name
            await vm.session.execute(
                "block-stream", {"job-id": job_id, "device": top_node, "auto-dismiss": False}
            )
            await events.wait_for(
                lambda e: (
                    e.name == "JOB_STATUS_CHANGE"
                    and e.data["id"] == job_id
                    and e.data["status"] == "concluded"
                )
            )
        monkeypatch.setattr(wire, "STREAM_DISMISS_WAIT", 0.2)
        with pytest.raises(Conflict) as refused:
            await read_graph(vm)
        assert refused.value.job_id == job_id and "job-dismiss" in str(refused.value)
        monkeypatch.setattr(wire, "STREAM_DISMISS_WAIT", 60.0)

        async def dismiss_later() -> None:
            await anyio.sleep(0.5)  # the read below has looked at the jobs by then
            await wire.job_dismiss(vm.session, job_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(dismiss_later)
            after = await read_graph(vm)
        assert len(after.chain_of(device)) == 1
        assert not [n for n in after.nodes.values() if n.driver == "copy-on-read"]
        assert await wire.query_jobs(vm.session) == ()
        assert (await wire.query_status(vm.session)).running


async def test_another_clients_graph_reads_in_a_loop_survive_blockctls_streams(
    tmp_path: Path, runtime_dir: Path
) -> None:
    """blockctl streams a two-layer chain three times (a new overlay each time) while another
    client sends ``query-named-block-nodes`` in a loop, with no guard (as a monitoring tool
    would): QEMU runs on, every stream succeeds with ``offset == len``, and the chain ends one
    layer deep with no job left. Before blockctl's streams were finalized at PENDING and
    dismissed by QEMU in the same step, the loop landed between the conclusion and blockctl's
    ``job-dismiss`` and QEMU segfaulted (ConnectionLost)."""
    base = await qcow2_image(tmp_path / "base.qcow2", pattern(3, MIB), 4 * MIB)
    config = MachineConfig(
        name="stream-reads",
        memory_mib=64,
        drives=(Drive(file=base, format=ImageFormat.QCOW2),),
        deprecated_input=STRICT,
    )
    async with open_vm(config, monitors=2) as vm, attach("stream-reads") as other:
        (device,) = vm.registry.drives
        reads = 0
        streaming = True

        async def read_in_a_loop() -> None:
            nonlocal reads
            while streaming:
                await other.session.execute("query-named-block-nodes", {"flat": True})
                reads += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_in_a_loop)
            for round_ in range(3):
                await chains.external_snapshot(vm, f"s{round_}", tmp_path)
                before = reads
                result = await chains.stream(vm, device)
                assert result.job.offset == result.job.length > 0
                assert reads > before  # the other client read during this stream
            streaming = False
        assert len((await read_graph(vm)).chain_of(device)) == 1
        assert await wire.query_jobs(vm.session) == ()
        assert (await wire.query_status(vm.session)).running

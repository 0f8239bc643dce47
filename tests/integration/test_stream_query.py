"""QEMU's crash at ``query-named-block-nodes`` while a stream job is concluded and not yet
dismissed (README, "Live restore"; ``scripts/repro_stream_query.py``): blockctl's read of the
node list waits for the dismissal, or refuses, instead of sending the query that kills the VM.
A firmware-idle VM (no guest: the firmware finds nothing to boot), one small chain."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from blockctl import open_vm
from blockctl._ops.nodes import read_graph
from blockctl._qmp import wire
from blockctl.errors import Conflict
from blockctl.types import Drive, ImageFormat, MachineConfig
from tests.integration.conftest import STRICT, pattern, qcow2_image, run

MIB = 1 << 20


async def test_the_node_list_is_not_read_while_a_stream_is_concluded_and_not_dismissed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream of a two-layer chain, left concluded (auto-dismiss off, as blockctl starts
    every job): a graph read refuses with a Conflict naming the job (before the guard, QEMU
    segfaulted on this very read: ConnectionLost, tried on 7.2 and 10.0.2); dismissed while
    the read waits, the read returns a one-layer chain and no copy-on-read filter, and QEMU
    runs on."""
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
            await wire.block_stream(
                vm.session, job_id=job_id, device=before.chain_of(device)[0].name
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

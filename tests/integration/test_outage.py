"""Issue 17, outages: an NBD server killed mid-I/O under ``werror``/``rerror`` ``stop`` pauses
the guest (QEMU's run state ``io-error``, and ``blockctl status`` names the drive); once the
server is back on the same socket, ``blockctl resume`` resumes it and every record the guest
wrote is in the served file: nothing lost.

The server is ``qemu-nbd`` on a raw file, started and killed (SIGKILL: no goodbye to its
clients) by its process id. The guest writes numbered 4 KiB records, one per block, with
O_DIRECT, and counts a record only once its write returned: the file must hold every counted
record.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from blockctl import GuestImage, LaunchedVM, open_vm
from blockctl.types import DeviceErrorPolicy, Drive, ImageFormat, NbdSource
from tests.figures import report
from tests.integration.conftest import base_config, cli_json, qemu_binary, raw_image

pytestmark = pytest.mark.guest

MIB = 1 << 20
BLOCKS = 2048  # 8 MiB of 4 KiB records
RECORD = "SEQ %08d\n"
#: Numbered records, record i into block i, each counted (/tmp/seq) once its write returned.
WRITER = (
    "( i=0; while [ ! -e /tmp/stop ] && [ $i -lt "
    f"{BLOCKS}"
    " ]; do printf 'SEQ %08d\\n' $i | dd of=/dev/vda bs=4096 seek=$i conv=sync,notrunc "
    "oflag=direct 2>/dev/null && echo $i > /tmp/seq || echo $i > /tmp/failed; i=$((i+1)); "
    "done; touch /tmp/seq.done ) &"
)


async def sh(vm: LaunchedVM, command: str, timeout: float = 60) -> str:
    assert vm.console is not None
    return await vm.console.check(command, timeout=timeout)


async def last_record(vm: LaunchedVM) -> int:
    return int((await sh(vm, "cat /tmp/seq 2>/dev/null || echo -1")).split()[-1])


async def start_server(image: Path, sock: Path) -> Process:
    """``qemu-nbd`` serving ``image`` (raw) on ``sock``; the caller stops it by its pid."""
    sock.unlink(missing_ok=True)  # a killed server leaves its socket file behind
    server = await anyio.open_process(
        [
            qemu_binary("qemu-nbd"),
            "--format=raw",
            "--persistent",
            "--shared=4",
            f"--socket={sock}",
            str(image),
        ]
    )
    try:
        with anyio.fail_after(20):
            while not sock.exists():  # noqa: ASYNC110 - qemu-nbd has no readiness signal
                await anyio.sleep(0.05)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stop_server(server, signal.SIGTERM)
        raise
    return server


async def stop_server(server: Process, how: signal.Signals) -> None:
    if server.returncode is None:
        os.kill(server.pid, how)
    await server.wait()
    await server.aclose()


async def wait_status(vm: LaunchedVM, status: str, timeout: float = 120) -> None:
    """Poll ``query-status`` until it says ``status`` (``timeout`` only ends a hang)."""
    with anyio.fail_after(timeout):
        while (await vm.status()).status != status:  # noqa: ASYNC110 - QMP poll, no event here
            await anyio.sleep(0.1)


@pytest.mark.parametrize("reconnect_delay", [0, 2])
async def test_a_killed_nbd_server_pauses_the_guest_and_nothing_is_lost(
    guest: GuestImage, images: Path, runtime_dir: Path, reconnect_delay: int
) -> None:
    image = await raw_image(images / "served.raw", b"", BLOCKS * 4096)
    sock = runtime_dir / "nbd.sock"
    drive = Drive(
        nbd=NbdSource(socket=sock, reconnect_delay=reconnect_delay),
        format=ImageFormat.RAW,
        rerror=DeviceErrorPolicy.STOP,
        werror=DeviceErrorPolicy.STOP,
    )
    servers = [await start_server(image, sock)]
    try:
        async with open_vm(base_config(guest, drive, name="outage")) as vm:
            assert vm.console is not None
            await vm.console.wait_ready()
            await sh(vm, WRITER)
            before_kill = await sh(
                vm,
                "until [ -s /tmp/seq ] && [ $(cat /tmp/seq) -ge 20 ]; do usleep 10000; done; "
                "cat /tmp/seq",
            )

            # Mid-I/O: the writer is still running when its server dies without a goodbye.
            await stop_server(servers[0], signal.SIGKILL)
            await wait_status(vm, "io-error")
            status = await cli_json("status", vm.name)
            assert (status["status"], status["running"]) == ("io-error", False)
            assert status["io_error_drives"] == ["disk0"]
            assert [d["io_status"] for d in status["drives"]] == ["failed"]
            said = await anyio.run_process([sys.executable, "-m", "blockctl", "status", vm.name])
            assert b"paused on an I/O error of disk0" in said.stdout
            assert b"io-status=failed" in said.stdout

            # Still away: resume retries for its timeout, then says so; the VM stays paused.
            early = await anyio.run_process(
                [sys.executable, "-m", "blockctl", "resume", vm.name, "--timeout", "1"],
                check=False,
            )
            assert early.returncode == 1
            assert b"paused again on an I/O error of disk0" in early.stderr
            assert (await vm.status()).status == "io-error"

            servers.append(await start_server(image, sock))
            resumed = await cli_json("resume", vm.name)
            assert resumed["status"] == "running"
            at_resume = await last_record(vm)
            # The writer goes on past the outage: more records over the new connection.
            await sh(
                vm,
                f"until [ $(cat /tmp/seq) -ge {at_resume + 20} ] || [ -e /tmp/seq.done ]; "
                "do usleep 10000; done",
            )
            await sh(vm, "touch /tmp/stop; until [ -e /tmp/seq.done ]; do usleep 10000; done")
            last = await last_record(vm)
            failed = await sh(vm, "cat /tmp/failed 2>/dev/null || echo none")
            assert failed.split()[-1] == "none", "the guest saw a write fail"
            assert last >= at_resume + 20 or last == BLOCKS - 1
            assert (await vm.status()).status == "running"
    finally:
        with anyio.CancelScope(shield=True):
            for server in servers:
                await stop_server(server, signal.SIGTERM)

    data = image.read_bytes()
    lost = [
        i
        for i in range(last + 1)
        if data[i * 4096 : i * 4096 + len(RECORD % i)] != (RECORD % i).encode()
    ]
    assert lost == [], f"records the guest wrote but the file lacks: {lost[:10]}"
    report(
        "outage",
        f"NBD server SIGKILLed mid-write under werror=stop (reconnect-delay {reconnect_delay}): "
        f"VM paused io-error on disk0, resumed after restart; {last + 1} records written "
        f"(the server killed after record {before_kill.split()[-1]}), {len(lost)} lost",
    )

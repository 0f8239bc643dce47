"""Launching and shutting down real QEMU with the real guest; failures at and before launch."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, LaunchedVM, Timeouts, open_vm
from blockctl.errors import (
    ConfigError,
    ConnectionLost,
    GuestError,
    LaunchFailed,
    MissingComponent,
    ShutdownFailed,
)
from blockctl.types import Drive, ImageFormat, MachineConfig
from tests.integration.conftest import (
    MIB,
    STRICT,
    base_config,
    image_bytes,
    pattern,
    qcow2_image,
    raw_image,
    sha256,
)

pytestmark = pytest.mark.guest


async def test_embedded_default_boots_runs_commands_and_shuts_down(
    guest: GuestImage, images: Path, runtime_dir: Path
) -> None:
    disk = await qcow2_image(images / "d.qcow2", b"", 16 * MIB)
    config = base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2))
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        run_dir = vm.run_dir
        assert run_dir.parent == runtime_dir
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(vm.monitor_path.stat().st_mode) == 0o600
        assert (await vm.status()).running

        # Exit codes and merged stderr come through the marker protocol.
        ok = await vm.console.run("echo out; echo err >&2; (exit 7)")
        assert ok.returncode == 7
        assert ok.output.splitlines() == ["out", "err"]
        # A command that reads stdin gets /dev/null and does not eat the next command.
        assert (await vm.console.run("cat; echo after")).output == "after\n"
        # Nothing is lost in a long output (about 180 KB over the serial line).
        lines = (await vm.console.check("seq 1 30000")).splitlines()
        assert lines == [str(i) for i in range(1, 30001)]
        # A line the guest tty would truncate is refused before it is sent.
        with pytest.raises(GuestError, match="line limit"):
            await vm.console.run("echo " + "x" * 4000)
        assert (await vm.console.check("echo still-alive")) == "still-alive\n"
    assert vm.process.returncode == 0  # quit, not a signal
    assert not run_dir.exists()


async def test_guest_poweroff_ends_qemu_and_the_ladder_is_a_no_op(guest: GuestImage) -> None:
    async with open_vm(base_config(guest), timeouts=Timeouts(powerdown=2)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        with vm.session.events("SHUTDOWN") as events:
            await vm.console.send_detached("poweroff -f")
            event = await events.next()
        assert event.data["guest"] is True
        assert await vm.wait_exit() == 0


async def test_powerdown_rung_falls_through_to_quit(guest: GuestImage) -> None:
    # The busybox guest has no acpid: the power button does nothing, so the ladder goes on.
    async with open_vm(base_config(guest), timeouts=Timeouts(powerdown=1)) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
    assert vm.process.returncode == 0


async def test_qemu_killed_under_the_controller(guest: GuestImage) -> None:
    with anyio.fail_after(60):
        async with open_vm(base_config(guest)) as vm:
            assert vm.console is not None
            await vm.console.wait_ready()
            with vm.session.events("SHUTDOWN") as events:
                os.kill(vm.pid or 0, signal.SIGKILL)
                with pytest.raises(ConnectionLost, match="SIGKILL"):
                    await events.next()
            with pytest.raises(ConnectionLost, match="SIGKILL"):
                await vm.status()
            with pytest.raises(ConnectionLost):
                await vm.console.run("true")
    assert vm.process.returncode == -signal.SIGKILL


async def test_a_failed_shutdown_keeps_the_blocks_own_error_in_view(guest: GuestImage) -> None:
    """The block raised, then QEMU ignored ``quit`` (stopped with SIGSTOP: it answers
    nothing) and was killed: ``ShutdownFailed`` says so, and the block's own error stays its
    visible context (it was hidden, ``__suppress_context__``, by the task group's unwrap)."""
    launched: list[LaunchedVM] = []

    async def stop_qemu_and_fail() -> None:
        async with open_vm(base_config(guest), timeouts=Timeouts(quit=1, terminate=1)) as vm:
            launched.append(vm)
            assert vm.console is not None
            await vm.console.wait_ready()
            os.kill(vm.pid or 0, signal.SIGSTOP)
            raise LookupError("the block's own error")

    with pytest.raises(ShutdownFailed) as raised:
        await stop_qemu_and_fail()
    assert launched[0].process.returncode == -signal.SIGKILL
    assert isinstance(raised.value.__context__, LookupError)
    assert not raised.value.__suppress_context__
    shown = "".join(traceback.format_exception(raised.value))
    assert "the block's own error" in shown


def test_qemu_dies_with_a_killed_controller(guest: GuestImage, runtime_dir: Path) -> None:
    """PR_SET_PDEATHSIG: kill -9 the controller process, and its QEMU goes too."""
    script = textwrap.dedent(f"""
        import anyio, sys
        from blockctl import open_vm
        from blockctl.types import MachineConfig
        async def main():
            config = MachineConfig(kernel={str(guest.kernel)!r}, initrd={str(guest.initrd)!r},
                                   append={guest.append!r}, deprecated_input={STRICT.value!r})
            async with open_vm(config) as vm:
                print("QEMU-PID", vm.pid, flush=True)
                await anyio.sleep_forever()
        anyio.run(main, backend="asyncio")
    """)
    controller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert controller.stdout is not None
        # structlog, unconfigured, prints its events to stdout too: find our line.
        line = b""
        while not line.startswith(b"QEMU-PID "):
            line = controller.stdout.readline()
            assert line, "the controller exited before launching QEMU"
        qemu_pid = int(line.split()[1])
        pidfd = os.pidfd_open(qemu_pid)
    finally:
        controller.kill()
        controller.wait()
        if controller.stdout is not None:
            controller.stdout.close()
    try:
        # A pidfd becomes readable when its process exits; this fails on the deadline if QEMU
        # outlived its controller (and the runtime_dir fixture then reports the leak).
        readable, _, _ = select.select([pidfd], [], [], 30)
        assert readable, f"QEMU {qemu_pid} outlived its killed controller"
    finally:
        os.close(pidfd)


async def test_launch_failure_carries_argv_exit_code_and_stderr(guest: GuestImage) -> None:
    config = MachineConfig(machine="nosuchmachine", kernel=guest.kernel, deprecated_input=STRICT)
    with pytest.raises(LaunchFailed) as info:
        async with open_vm(config):
            pass
    err = info.value
    assert err.exitcode == 1
    assert "unsupported machine type" in err.stderr
    assert "nosuchmachine" in err.argv
    assert "unsupported machine type" in str(err)


async def test_missing_image_is_refused_before_launch(
    guest: GuestImage, images: Path, runtime_dir: Path
) -> None:
    config = base_config(guest, Drive(file=images / "absent.qcow2", format=ImageFormat.QCOW2))
    with pytest.raises(ConfigError) as info:
        async with open_vm(config):
            pass
    assert info.value.field == "drive[0].file"
    assert "does not exist" in info.value.message
    assert list(runtime_dir.iterdir()) == []  # nothing was started or left behind


async def test_declared_format_that_does_not_match_is_refused(
    guest: GuestImage, images: Path
) -> None:
    raw = await raw_image(images / "plain.raw", pattern(1, MIB))
    config = base_config(guest, Drive(file=raw, format=ImageFormat.QCOW2))
    with pytest.raises(ConfigError, match=r"drive\[0\]\.file: cannot read .* as qcow2"):
        async with open_vm(config):
            pass


async def test_missing_kernel(images: Path) -> None:
    with pytest.raises(ConfigError, match="kernel"):
        async with open_vm(MachineConfig(kernel=images / "vmlinuz", deprecated_input=STRICT)):
            pass


async def test_socket_path_over_108_bytes(
    guest: GuestImage, monkeypatch: pytest.MonkeyPatch, runtime_dir: Path
) -> None:
    deep = runtime_dir / ("d" * 100)
    deep.mkdir(mode=0o700)
    monkeypatch.setenv("BLOCKCTL_RUNTIME_DIR", str(deep))
    with pytest.raises(ConfigError, match=r"107|shorter") as info:
        async with open_vm(base_config(guest)):
            pass
    assert info.value.field == "runtime_dir"


async def test_missing_qemu_binary(guest: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKCTL_QEMU_SYSTEM", "/nonexistent/qemu-system-x86_64")
    with pytest.raises(MissingComponent, match="qemu-system"):
        async with open_vm(base_config(guest)):
            pass


async def test_path_with_commas_and_spaces(guest: GuestImage, images: Path) -> None:
    """A filename that would inject ``read-only=on`` into an option string opens as itself."""
    data = pattern(7, 2 * MIB)
    disk = await qcow2_image(images / "disk,read-only=on, x.qcow2", data, 8 * MIB)
    config = base_config(guest, Drive(file=disk, format=ImageFormat.QCOW2, serial="COMMA"))
    async with open_vm(config) as vm:
        assert vm.console is not None
        await vm.console.wait_ready()
        (node,) = [n for n in await vm.block_nodes() if n.node_name == "drv0-file"]
        assert node.file == str(disk)
        assert not node.read_only
        got = await vm.console.check(
            "dd if=/dev/vda bs=1M count=2 iflag=direct 2>/dev/null | sha256sum"
        )
        assert got.split()[0] == sha256(data)
        # Writable, as asked: the guest's write lands in this very file.
        await vm.console.check(
            "echo hello | dd of=/dev/vda bs=512 seek=4096 conv=fsync 2>/dev/null"
        )
    written = await image_bytes(disk, "qcow2", 4096 * 512 + 6)
    assert written[-6:] == b"hello\n"

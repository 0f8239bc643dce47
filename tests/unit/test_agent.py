"""The guest-agent client and quiesce against a fake qemu-ga on a unix socket.

The fake answers like qemu-ga 7.2 (qga.md §2-3): ids echoed, commands disabled while frozen,
thaw of nothing returns 0, a wrong mountpoint freezes 0. It can queue stale lines for the next
client, hang, or refuse commands, which is how the faults that are hard to provoke in a real
guest are tested here; tests/integration/test_agent.py does the rest against real qemu-ga.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from structlog.testing import capture_logs

from blockctl import _agent
from blockctl._agent import FreezeStatus, Quiesce, coerce_quiesce, quiesced
from blockctl._guest import parse_loader_list
from blockctl.errors import (
    AgentCommandFailed,
    AgentFrozen,
    AgentNotConfigured,
    AgentUnavailable,
    BlockctlError,
    ConfigError,
    FreezeDeadlineExceeded,
    GuestAgentError,
    QuiesceFailed,
    ThawFailed,
)

ALLOWED_WHILE_FROZEN = {
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
}


@dataclass
class FakeAgent:
    """A qemu-ga stand-in. ``stale``: lines sent to the next client before anything else."""

    mounts: tuple[str, ...] = ("/mnt", "/data")
    frozen: int = 0
    stale: list[bytes] = field(default_factory=list)
    hang: set[str] = field(default_factory=set)
    refuse: dict[str, tuple[str, str]] = field(default_factory=dict)
    freeze_result: int | None = None
    close_on: set[str] = field(default_factory=set)
    received: list[str] = field(default_factory=list)

    def answer(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        if name == "guest-sync":
            return {"return": args["id"]}
        if name in self.refuse:
            cls, desc = self.refuse[name]
            return {"error": {"class": cls, "desc": desc}}
        if self.frozen and name not in ALLOWED_WHILE_FROZEN:
            desc = f"Command {name} has been disabled: the agent is in frozen state"
            return {"error": {"class": "CommandNotFound", "desc": desc}}
        if name == "guest-ping":
            return {"return": {}}
        if name == "guest-info":
            cmds = [{"name": "guest-ping", "enabled": True, "success-response": True}]
            return {"return": {"version": "7.2.22", "supported_commands": cmds}}
        if name == "guest-fsfreeze-status":
            return {"return": "frozen" if self.frozen else "thawed"}
        if name == "guest-get-fsinfo":
            return {
                "return": [
                    {
                        "name": f"vd{i}",
                        "mountpoint": m,
                        "type": "ext4",
                        "disk": [{"bus-type": "virtio", "dev": f"/dev/vd{i}"}],
                        "used-bytes": 1,
                        "total-bytes": 2,
                    }
                    for i, m in enumerate(self.mounts)
                ]
            }
        if name == "guest-fsfreeze-freeze":
            self.frozen = len(self.mounts) if self.freeze_result is None else self.freeze_result
            return {"return": self.frozen}
        if name == "guest-fsfreeze-freeze-list":
            self.frozen = len([m for m in args["mountpoints"] if m in self.mounts])
            return {"return": self.frozen}
        if name == "guest-fsfreeze-thaw":
            thawed, self.frozen = self.frozen, 0
            return {"return": thawed}
        return {"error": {"class": "CommandNotFound", "desc": f"The command {name} not found"}}

    async def serve(self, stream: SocketStream) -> None:
        async with stream:
            for line in self.stale:
                await stream.send(line)
            self.stale = []
            reader = BufferedByteReceiveStream(stream)
            while True:
                try:
                    line = await reader.receive_until(b"\n", 1 << 20)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
                message = json.loads(line)
                name = message["execute"]
                self.received.append(name)
                if name in self.close_on:
                    self.close_on.discard(name)
                    return
                if name in self.hang:
                    continue
                reply = self.answer(name, message.get("arguments", {}))
                if "id" in message:
                    reply["id"] = message["id"]
                await stream.send(json.dumps(reply).encode() + b"\n")


@dataclass
class FakeVM:
    name: str
    run_dir: Path | None


@contextlib.asynccontextmanager
async def serving(agent: FakeAgent | None) -> AsyncIterator[Any]:
    """A fake VM whose run dir has ``qga.sock`` served by ``agent`` (None: no channel)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bcga-", dir="/tmp"))
    try:
        if agent is None:
            yield FakeVM(name="fake", run_dir=run_dir)
            return
        listener = await anyio.create_unix_listener(run_dir / "qga.sock")
        async with listener, anyio.create_task_group() as tg:
            # One client at a time, as qemu-ga's chardev serves them.
            async def accept() -> None:
                while True:
                    stream = await listener.accept()
                    await agent.serve(stream)

            tg.start_soon(accept)
            yield FakeVM(name="fake", run_dir=run_dir)
            tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# Section: the client


async def test_typed_commands_and_the_id_on_every_command() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm, _agent.connect_agent(vm) as ga:
        await ga.ping()
        info = await ga.info()
        assert info.version == "7.2.22" and info.enabled("guest-ping")
        filesystems = await ga.get_fsinfo()
        assert [fs.mountpoint for fs in filesystems] == ["/mnt", "/data"]
        assert filesystems[0].disks[0].dev == "/dev/vd0"
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED
        assert await ga.fsfreeze_freeze() == 2
        assert await ga.fsfreeze_status() is FreezeStatus.FROZEN
        assert await ga.fsfreeze_thaw() == 2
        assert await ga.fsfreeze_thaw() == 0  # nothing frozen: 0, not an error
    assert fake.received[0] == "guest-sync"


async def test_stale_replies_from_an_earlier_connection_are_skipped() -> None:
    fake = FakeAgent(
        stale=[
            b'{"return": {"version": "7.2.22"}, "id": "bc-old-1"}\n',  # a reply to a dead client
            b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\xff\'"}}\n',
            b'\xff{"return": 4242}\n',  # a guest-sync-delimited reply of someone else
            b'{"return": 17}\n',  # an old guest-sync reply
            b"not json at all\n",
        ]
    )
    async with serving(fake) as vm, _agent.connect_agent(vm) as ga:
        assert ga.stale_skipped == 5
        await ga.ping()
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED


async def test_a_stale_reply_between_commands_is_skipped() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm, _agent.connect_agent(vm) as ga:
        fake.hang.add("guest-ping")
        with pytest.raises(AgentUnavailable):
            await ga.ping(timeout=0.2)
        # The late reply to that ping would carry its id: the next command ignores it.
        fake.hang.clear()
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED


async def test_errors_are_mapped() -> None:
    fake = FakeAgent(refuse={"guest-get-fsinfo": ("GenericError", "cannot read /proc")})
    async with serving(fake) as vm, _agent.connect_agent(vm) as ga:
        with pytest.raises(AgentCommandFailed, match="cannot read /proc") as failed:
            await ga.get_fsinfo()
        assert failed.value.error_class == "GenericError"
        assert failed.value.command == "guest-get-fsinfo"
        with pytest.raises(AgentCommandFailed, match="CommandNotFound"):
            await ga.execute("guest-nosuch")
        await ga.fsfreeze_freeze()
        with pytest.raises(AgentFrozen, match="frozen state"):
            await ga.execute("guest-get-time")
        await ga.fsfreeze_thaw()
    for cls in (AgentFrozen, AgentUnavailable, QuiesceFailed, ThawFailed, FreezeDeadlineExceeded):
        assert issubclass(cls, GuestAgentError) and issubclass(cls, BlockctlError)


async def test_a_hung_agent_is_a_clear_error_within_the_timeout() -> None:
    fake = FakeAgent(hang={"guest-sync"})
    async with serving(fake) as vm:
        with (
            anyio.fail_after(5),
            pytest.raises(AgentUnavailable, match=r"guest-sync within 0\.5 s"),
        ):
            async with _agent.connect_agent(vm, timeout=0.5):
                pass
    # It kept resending guest-sync with new ids until the deadline.
    assert fake.received.count("guest-sync") >= 1


async def test_no_channel_is_not_configured() -> None:
    async with serving(None) as vm:
        with pytest.raises(AgentNotConfigured, match="guest-agent = true"):
            _agent.agent_socket(vm)
    with pytest.raises(AgentNotConfigured, match="attach by VM name"):
        _agent.agent_socket(FakeVM(name="x", run_dir=None))  # type: ignore[arg-type]


# Section: quiesce


def test_coerce_quiesce() -> None:
    assert coerce_quiesce(True) is Quiesce.REQUIRED
    assert coerce_quiesce(False) is Quiesce.OFF
    assert coerce_quiesce("if-possible") is Quiesce.IF_POSSIBLE
    with pytest.raises(ConfigError, match="quiesce"):
        coerce_quiesce("maybe")


async def test_quiesced_freezes_for_the_block_and_thaws() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm:
        with capture_logs() as logs:
            async with quiesced(vm, True, operation="op") as point:
                assert point.frozen == 2 and point.consistent
                assert fake.frozen == 2
        assert fake.frozen == 0
    assert events(logs, "blockctl.agent.freeze")[0]["count"] == 2
    thaw = events(logs, "blockctl.agent.thaw")[0]
    assert thaw["count"] == 2 and thaw["status"] == "thawed"


class Boom(Exception):
    pass


async def test_thawed_when_the_operation_fails() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm:
        with pytest.raises(Boom):
            async with quiesced(vm, True, operation="op"):
                raise Boom
        assert fake.frozen == 0
        assert fake.received[-2:] == ["guest-fsfreeze-thaw", "guest-fsfreeze-status"]


async def test_thawed_when_the_controller_task_is_cancelled() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm:
        entered = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def operation() -> None:
                async with quiesced(vm, True, operation="op"):
                    entered.set()
                    await anyio.sleep_forever()

            tg.start_soon(operation)
            await entered.wait()
            assert fake.frozen == 2
            tg.cancel_scope.cancel()
        assert fake.frozen == 0


async def test_freeze_deadline_thaws_and_fails() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm:
        with pytest.raises(FreezeDeadlineExceeded, match=r"0\.2 s"):
            async with quiesced(vm, True, operation="slow op", freeze_deadline=0.2):
                await anyio.sleep_forever()
        assert fake.frozen == 0


async def test_freezing_fewer_filesystems_than_mounted_fails_and_thaws() -> None:
    fake = FakeAgent(freeze_result=1)
    async with serving(fake) as vm:
        ran = False
        with pytest.raises(QuiesceFailed, match="froze 1 of 2") as failed:
            async with quiesced(vm, True, operation="op"):
                ran = True
        assert not ran and fake.frozen == 0
        assert (failed.value.frozen, failed.value.expected) == (1, 2)


async def test_a_wrong_mountpoint_freezes_nothing_and_fails() -> None:
    fake = FakeAgent()
    async with serving(fake) as vm:
        with pytest.raises(QuiesceFailed, match="froze 0 of 1"):
            async with quiesced(vm, True, operation="op", mountpoints=["/nonexistent"]):
                pass
        async with quiesced(vm, True, operation="op", mountpoints=["/mnt"]) as point:
            assert point.frozen == 1
        assert fake.frozen == 0


async def test_a_guest_frozen_by_someone_else_is_refused_and_left_alone() -> None:
    fake = FakeAgent(frozen=1)
    async with serving(fake) as vm:
        with pytest.raises(QuiesceFailed, match="already frozen"):
            async with quiesced(vm, True, operation="op"):
                pass
        assert fake.frozen == 1
        assert "guest-fsfreeze-thaw" not in fake.received


async def test_without_an_agent_required_fails_if_possible_goes_on() -> None:
    async with serving(None) as vm:
        with pytest.raises(AgentNotConfigured):
            _agent.require_agent(vm, Quiesce.REQUIRED)
        _agent.require_agent(vm, Quiesce.IF_POSSIBLE)
        with pytest.raises(AgentNotConfigured):
            async with quiesced(vm, Quiesce.REQUIRED, operation="op"):
                pass
        with capture_logs() as logs:
            async with quiesced(vm, Quiesce.IF_POSSIBLE, operation="op") as point:
                assert not point.consistent and point.skipped
        assert events(logs, "blockctl.agent.quiesce_skipped")
        async with quiesced(vm, Quiesce.OFF, operation="op") as point:
            assert not point.consistent


async def test_a_hung_agent_with_if_possible_goes_on_crash_consistent() -> None:
    fake = FakeAgent(hang={"guest-sync"})
    async with serving(fake) as vm:
        with pytest.raises(AgentUnavailable):
            async with quiesced(vm, Quiesce.REQUIRED, operation="op", timeout=0.3):
                pass
        async with quiesced(vm, Quiesce.IF_POSSIBLE, operation="op", timeout=0.3) as point:
            assert point.frozen == 0
        assert "guest-fsfreeze-freeze" not in fake.received


async def test_the_thaw_retries_on_a_fresh_connection() -> None:
    fake = FakeAgent(close_on={"guest-fsfreeze-thaw"})
    async with serving(fake) as vm:
        with capture_logs() as logs:
            async with quiesced(vm, True, operation="op"):
                pass
        assert fake.frozen == 0
    assert events(logs, "blockctl.agent.thaw_retry")
    assert fake.received.count("guest-fsfreeze-thaw") == 2


async def test_a_thaw_that_cannot_be_done_is_thaw_failed() -> None:
    fake = FakeAgent(refuse={"guest-fsfreeze-thaw": ("GenericError", "thaw broke")})
    async with serving(fake) as vm:
        with pytest.raises(ThawFailed, match="may still be frozen"):
            async with quiesced(vm, True, operation="op"):
                pass


async def test_the_freeze_is_thawed_even_when_its_reply_is_late() -> None:
    """A freeze whose reply misses its deadline may still take effect: thaw anyway."""
    fake = FakeAgent(hang={"guest-fsfreeze-freeze"})
    async with serving(fake) as vm:
        with pytest.raises(AgentUnavailable):
            async with quiesced(vm, True, operation="op", freeze_timeout=0.2):
                pass
        assert fake.received[-2:] == ["guest-fsfreeze-thaw", "guest-fsfreeze-status"]


# Section: the guest builder's library resolution


def test_loader_list_keeps_sonames_only() -> None:
    listing = (
        "\tlinux-vdso.so.1 (0x00007f)\n"
        "\tlibudev.so.1 => x/usr/lib/x86_64-linux-gnu/libudev.so.1 (0x00007f)\n"
        "\tlibc.so.6 => x/lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n"
        # The loader's own line names an absolute path: it must never become a destination.
        "\t/lib64/ld-linux-x86-64.so.2 => x/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 (0x7f)\n"
    )
    assert parse_loader_list(listing) == {
        "libudev.so.1": Path("x/usr/lib/x86_64-linux-gnu/libudev.so.1"),
        "libc.so.6": Path("x/lib/x86_64-linux-gnu/libc.so.6"),
    }


def test_agent_guest_lives_apart_from_the_default_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    from blockctl import _guest

    monkeypatch.setenv("BLOCKCTL_GUEST_DIR", "/x/guest")
    assert _guest.default_guest_dir() == Path("/x/guest")
    assert _guest.default_guest_dir(agent=True) == Path("/x/guest-qga")
    assert _guest._recipe_digest() != _guest._recipe_digest(agent=True)


# Section: the channel in the VM config and argv


def test_argv_has_the_agent_channel_only_when_asked() -> None:
    from blockctl._argv import AGENT_PORT_NAME, build_argv
    from blockctl.types import Accel, MachineConfig

    def argv_for(agent_socket: Path | None) -> list[str]:
        return build_argv(
            binary="qemu-system-x86_64",
            config=MachineConfig(guest_agent=agent_socket is not None),
            label="vm",
            accel=Accel.TCG,
            plans=(),
            qmp_fd=3,
            monitor_path=None,
            console=None,
            agent_socket=agent_socket,
        )

    argv = argv_for(Path("/run/a,b/qga.sock"))
    devices = [json.loads(argv[i + 1]) for i, arg in enumerate(argv) if arg == "-device"]
    assert {"driver": "virtio-serial-pci", "id": "vser0"} in devices
    port = next(d for d in devices if d["driver"] == "virtserialport")
    assert (port["bus"], port["chardev"], port["name"]) == ("vser0.0", "qga0", AGENT_PORT_NAME)
    # The path is the only value in the QemuOpts string, with its comma doubled.
    assert "socket,id=qga0,path=/run/a,,b/qga.sock,server=on,wait=off" in argv
    assert not any("virtio-serial" in arg or "qga0" in arg for arg in argv_for(None))


def test_guest_agent_in_toml() -> None:
    from blockctl.types import MachineConfig

    assert MachineConfig.from_mapping({"guest-agent": True}).guest_agent
    assert not MachineConfig.from_mapping({}).guest_agent
    with pytest.raises(ConfigError, match="guest_agent"):
        MachineConfig.from_mapping({"guest-agent": "yes"})

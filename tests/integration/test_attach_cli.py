"""Attaching from other processes, and the CLI's up / ls / status / qmp / down cycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from blockctl import GuestImage, attach, open_vm
from blockctl.errors import QMPConnectFailed, VMNotFound
from blockctl.types import MachineConfig
from tests.integration.conftest import MIB, base_config, qcow2_image, running

pytestmark = pytest.mark.guest


async def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m blockctl ARGS`` as a separate process, as a user would."""
    result = await anyio.run_process(
        [sys.executable, "-m", "blockctl", *map(str, args)], check=False, env=dict(os.environ)
    )
    done = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def named(guest: GuestImage, name: str) -> MachineConfig:
    config = base_config(guest)
    return MachineConfig(
        name=name,
        kernel=config.kernel,
        initrd=config.initrd,
        append=config.append,
        deprecated_input=config.deprecated_input,
    )


async def test_second_process_attaches_to_a_launched_vm(guest: GuestImage) -> None:
    async with open_vm(named(guest, "attached")) as vm:
        reply = json.loads((await cli("qmp", "attached", "query-status", "--json")).stdout)
        assert reply["status"] == "running"
        status = json.loads((await cli("status", "attached", "--json")).stdout)
        assert status["pid"] == vm.pid
        assert status["qemu"] == str(await vm.version())
        # The library attaches the same way, by name or by socket path.
        async with attach("attached") as other:
            assert (await other.status()).running
        async with attach(vm.monitor_path) as other:
            assert other.pid is None
            assert (await other.version()) == (await vm.version())


async def test_monitor_serves_one_client_at_a_time(guest: GuestImage) -> None:
    # (attach by name takes a monitor of the VM's pool; qmp.sock is the single one)
    async with open_vm(named(guest, "busy")) as vm, attach(vm.monitor_path):
        with pytest.raises(QMPConnectFailed, match="one client at a time"):
            async with attach(vm.monitor_path, timeout=1):
                pass


async def test_cli_up_ls_status_qmp_down(guest: GuestImage, runtime_dir: Path) -> None:
    up = json.loads((await cli("up", "--json", "--strict")).stdout)
    assert up["name"] == "default"
    pid = up["pid"]
    try:
        # `up` returned, and the VM keeps running on its own.
        assert running(pid)
        listed = json.loads((await cli("ls", "--json")).stdout)
        assert [(v["name"], v["state"], v["pid"]) for v in listed] == [("default", "running", pid)]
        human = (await cli("ls")).stdout
        assert "default" in human
        assert "running" in human
        status = json.loads((await cli("status", "default", "--json")).stdout)
        assert status["status"] == "running"
        assert status["drives"][0]["device"] == "disk0"
        assert status["drives"][0]["driver"] == "qcow2"
        reply = json.loads(
            (
                await cli(
                    "qmp",
                    "default",
                    "qom-get",
                    '{"path": "/machine", "property": "type"}',
                    "--json",
                )
            ).stdout
        )
        assert reply == "pc-i440fx-7.2-machine" or reply.startswith("pc-i440fx")
        again = await cli("up", check=False)
        assert again.returncode == 1
        assert again.stderr.count("\n") == 1
        assert "VMExists" in again.stderr
    finally:
        down = json.loads((await cli("down", "default", "--json")).stdout)
    assert down == {"name": "default", "stopped": True}
    assert not running(pid)
    assert json.loads((await cli("ls", "--json")).stdout) == []
    assert not (runtime_dir / "default").exists()


async def test_cli_up_with_a_toml_config(
    guest: GuestImage, images: Path, runtime_dir: Path
) -> None:
    disk = await qcow2_image(images / "my disk,1.qcow2", b"", 8 * MIB)
    config = images / "vm.toml"
    config.write_text(
        f"""
name = "tomlvm"
memory = 192
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
append = "{guest.append}"

[[drive]]
file = "my disk,1.qcow2"
format = "qcow2"
if = "scsi"
cache = "none"
serial = "TOML-1"
"""
    )
    await cli("up", config, "--strict")
    try:
        reply = json.loads((await cli("qmp", "tomlvm", "query-block", "--json")).stdout)
        inserted = reply[0]["inserted"]
        assert inserted["file"] == str(disk)
        assert inserted["cache"]["direct"] is True
        assert reply[0]["qdev"] == "disk0"
    finally:
        await cli("down", "tomlvm")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[[drive]]\nfile = "x.qcow2"\nformat = "qcow9"\n', "drive[0].format"),
        ('[[drive]]\nfile = "x.qcow2"\nformat = "qcow2"\ncache = "fast"\n', "drive[0].cache"),
        ('[[drive]]\nfile = "absent.qcow2"\nformat = "qcow2"\n', "drive[0].file"),
        ("memory = [\n", "not valid TOML"),
    ],
)
async def test_cli_bad_config_is_one_clear_line(
    images: Path, runtime_dir: Path, toml: str, expected: str
) -> None:
    config = images / "bad.toml"
    config.write_text(toml)
    done = await cli("up", config, check=False)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("blockctl: ConfigError: ")
    assert expected in done.stderr
    assert list(runtime_dir.iterdir()) == []


async def test_cli_errors_for_unknown_vms(runtime_dir: Path) -> None:
    for args in (("status", "nosuch"), ("qmp", "nosuch", "query-status"), ("down", "nosuch")):
        done = await cli(*args, check=False)
        assert done.returncode == 1
        assert done.stderr == "blockctl: VMNotFound: no VM named 'nosuch' (see `blockctl ls`)\n"
    done = await cli("qmp", "nosuch", "query-status", "--json", check=False)
    assert json.loads(done.stdout)["error"]["type"] == VMNotFound.__name__


async def test_cli_qmp_error_reply(guest: GuestImage) -> None:
    async with open_vm(named(guest, "errs")):
        done = await cli("qmp", "errs", "blockdev-del", '{"node-name": "nosuch"}', check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("blockctl: CommandFailed: QEMU refused blockdev-del: ")
    assert "nosuch" in done.stderr


async def test_an_up_killed_at_qemus_spawn_is_taken_over_by_recover_then_down(
    tmp_path: Path, runtime_dir: Path
) -> None:
    """``blockctl up`` kill -9ed right after QEMU's spawn, before its greeting (another
    process, ``tests/integration/crash_child.py``; a firmware-idle VM): QEMU runs on, ``ls``
    says the VM is starting and a second ``up`` of the name refuses; ``recover`` takes it
    over (running, ``status`` answers), and ``down`` stops it, leaving no QEMU and no run
    directory."""
    toml = tmp_path / "upk.toml"
    toml.write_text('name = "upk"\nmemory = 64\ndeprecated-input = "reject"\n')
    argv = [sys.executable, "-m", "tests.integration.crash_child", "upk", "up", "spawned"]
    killed = await anyio.run_process(
        [*argv, json.dumps({"config": str(toml)})], check=False, env=dict(os.environ)
    )
    assert killed.returncode == -9, killed.stderr.decode()
    pid = json.loads((runtime_dir / "upk" / "vm.json").read_text())["pid"]
    try:
        assert running(pid)
        listed = json.loads((await cli("ls", "--json")).stdout)
        assert [(v["name"], v["state"]) for v in listed] == [("upk", "starting")]
        again = await cli("up", toml, check=False)
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        await cli("recover", "upk")
        listed = json.loads((await cli("ls", "--json")).stdout)
        assert [(v["name"], v["state"], v["pid"]) for v in listed] == [("upk", "running", pid)]
        status = json.loads((await cli("status", "upk", "--json")).stdout)
        assert status["status"] == "running" and status["pid"] == pid
    finally:
        down = json.loads((await cli("down", "upk", "--json")).stdout)
    assert down == {"name": "upk", "stopped": True}
    assert not running(pid) and not (runtime_dir / "upk").exists()

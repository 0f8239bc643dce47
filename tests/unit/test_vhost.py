"""vhost-user-blk drives, pure logic: the typed source, its validation, QEMU's and the
storage daemon's command lines (the live behaviour: tests/integration/test_storage_vhost.py)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from blockctl._argv import DriveSource, daemon_argv, plan_drives
from blockctl._machine import VM
from blockctl._registry import DaemonDriveRegistry, DriveRecord, DriveRegistry
from blockctl.errors import ConfigError, InStorageDaemon
from blockctl.types import (
    CacheMode,
    Drive,
    ImageFormat,
    Interface,
    MachineConfig,
    VhostUserBlkSource,
)
from tests.unit.test_argv import argv_for, blockdevs, devices, layer, option_values


def vhost(**kwargs: object) -> Drive:
    return Drive(vhost_user_blk={"file": "/img/d.qcow2"}, format="qcow2", **kwargs)  # type: ignore[arg-type]


def test_toml_table_relative_to_the_file() -> None:
    config = MachineConfig.from_mapping(
        {"drive": [{"format": "raw", "vhost-user-blk": {"file": "d.raw"}}]}, base=Path("/cfg")
    )
    (drive,) = config.drives
    assert drive.vhost_user_blk == VhostUserBlkSource(file=Path("/cfg/d.raw"))
    assert config.shared_memory is True  # on because a drive needs it


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"serial": "x"}, "drive.serial"),
        ({"rerror": "stop"}, "drive.rerror"),
        ({"snapshot": True}, "drive.snapshot"),
        ({"copy_on_read": True}, "drive.copy_on_read"),
        ({"interface": Interface.SCSI}, "drive.vhost_user_blk"),
        ({"file": "/img/other.raw"}, "drive.vhost_user_blk"),
    ],
)
def test_refused_combinations(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        vhost(**kwargs)
    assert caught.value.field == field


def test_bad_tables() -> None:
    with pytest.raises(ConfigError, match="use a table"):
        Drive.from_mapping({"format": "raw", "vhost-user-blk": "/x"}, "drive[0]")
    with pytest.raises(ConfigError) as caught:
        Drive.from_mapping({"format": "raw", "vhost-user-blk": {"file": "nbd:x"}}, "drive[0]")
    assert caught.value.field == "drive[0].vhost_user_blk.file"
    with pytest.raises(ConfigError, match="format is mandatory"):
        Drive(vhost_user_blk=VhostUserBlkSource(file=Path("/d")))


def test_shared_memory_default_and_conflict() -> None:
    assert MachineConfig().shared_memory is False
    assert MachineConfig(shared_memory=True).shared_memory is True
    with pytest.raises(ConfigError, match="shared memory"):
        MachineConfig(drives=(vhost(),), shared_memory=False)


def test_qemu_gets_device_chardev_and_shared_ram_the_daemon_the_nodes() -> None:
    config = MachineConfig(drives=(vhost(cache=CacheMode.DIRECTSYNC, bootindex=1),))
    sock = Path("/run/x/drv0-vhost.sock")
    source = DriveSource(chain=(layer("/img/d.qcow2"),), vhost_socket=sock)
    argv = argv_for(config, {0: source})
    assert blockdevs(argv) == []  # QEMU has none of its nodes
    assert devices(argv) == [
        {
            "driver": "vhost-user-blk-pci",
            "id": "disk0",
            "chardev": "drv0-vhost",
            "config-wce": False,
            "bootindex": 1,
        }
    ]
    assert f"socket,id=drv0-vhost,path={sock}" in option_values(argv, "-chardev")
    assert option_values(argv, "-machine") == ["pc,memory-backend=ram0"]
    ram = [json.loads(v) for v in option_values(argv, "-object")]
    assert ram == [
        {"qom-type": "memory-backend-memfd", "id": "ram0", "size": 256 << 20, "share": True}
    ]
    (plan,) = plan_drives(config, {0: source})
    assert plan.vhost is not None and plan.nodes == ()
    qsd = daemon_argv("qsd", plan.vhost, qmp_fd=7, monitor=Path("/run/x/disk0-qsd.sock"))
    nodes = [json.loads(v) for v in option_values(qsd, "--blockdev")]
    assert [(n["driver"], n["node-name"]) for n in nodes] == [
        ("file", "drv0-file"),
        ("qcow2", "drv0"),
    ]
    assert all(n["cache"] == {"direct": True, "no-flush": False} for n in nodes)
    assert [json.loads(v) for v in option_values(qsd, "--export")] == [
        {
            "type": "vhost-user-blk",
            "id": "drv0-export",
            "node-name": "drv0",
            "addr": {"type": "unix", "path": str(sock)},
            "writable": True,
        }
    ]
    assert option_values(qsd, "--chardev")[0] == "socket,id=qmp0,fd=7"


def test_no_shared_ram_without_a_need() -> None:
    config = MachineConfig(drives=(Drive(file=Path("/img/a.raw"), format=ImageFormat.RAW),))
    argv = argv_for(config, {0: DriveSource(chain=(layer("/img/a.raw", ImageFormat.RAW),))})
    assert option_values(argv, "-machine") == ["pc"]
    assert option_values(argv, "-object") == []


def test_refusal_names_disk_daemon_and_ways_out() -> None:
    error = InStorageDaemon("resize", "disk3", daemon_pid=42, monitor="/run/x/disk3-qsd.sock")
    text = str(error)
    for part in ("resize", "disk3", "qemu-storage-daemon", "pid 42", "/run/x/disk3-qsd.sock"):
        assert part in text
    assert "Ways out" in text


def test_daemon_command_line_whole() -> None:
    """Every word of the daemon's command line, in order: QMP on the launcher's socketpair end
    and on the listening socket (escaped for QEMU's option syntax), after the nodes and the
    export."""
    config = MachineConfig(drives=(vhost(), vhost(read_only=True)))
    sock0, sock1 = Path("/run/x/drv0-vhost.sock"), Path("/run/x,y/drv1-vhost.sock")
    sources = {
        0: DriveSource(chain=(layer("/img/d.qcow2"),), vhost_socket=sock0),
        1: DriveSource(chain=(layer("/img/e.qcow2"),), vhost_socket=sock1),
    }
    first, second = plan_drives(config, sources)
    assert (first.index, first.device_id, second.index, second.device_id) == (
        0,
        "disk0",
        1,
        "disk1",
    )
    assert second.vhost is not None and second.vhost.export["writable"] is False
    assert second.vhost.export["id"] == "drv1-export"
    qsd = daemon_argv("/usr/bin/qsd", second.vhost, qmp_fd=9, monitor=Path("/run/x,y/m.sock"))
    nodes = [json.dumps(n) for n in second.vhost.nodes]
    assert qsd == [
        "/usr/bin/qsd",
        *[w for n in nodes for w in ("--blockdev", n)],
        "--export",
        json.dumps(second.vhost.export),
        "--chardev",
        "socket,id=qmp0,fd=9",
        "--monitor",
        "chardev=qmp0",
        "--chardev",
        "socket,id=qmp1,path=/run/x,,y/m.sock,server=on,wait=off",
        "--monitor",
        "chardev=qmp1",
    ]
    assert second.vhost.chardev_option() == "socket,id=drv1-vhost,path=/run/x,,y/drv1-vhost.sock"
    # Hot-plug: the same client socket as chardev-add arguments.
    assert second.vhost.chardev_add() == {
        "id": "drv1-vhost",
        "backend": {
            "type": "socket",
            "data": {
                "addr": {"type": "unix", "data": {"path": str(sock1)}},
                "server": False,
            },
        },
    }


@pytest.mark.parametrize(
    "sources",
    [{}, {0: DriveSource(chain=(layer("/img/d.qcow2"),))}],
    ids=["no-source", "no-socket"],
)
def test_a_drive_without_a_planned_socket_is_refused(sources: dict[int, DriveSource]) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_drives(MachineConfig(drives=(vhost(),)), sources)
    assert caught.value.field == "drive[0].vhost_user_blk"
    assert caught.value.message == "no daemon socket was planned"


def daemon_record(device_id: str, nodes: Sequence[Mapping[str, object]]) -> DriveRecord:
    return DriveRecord(
        device_id=device_id,
        device={"driver": "vhost-user-blk-pci", "id": device_id},
        daemon={"pid": 42, "monitor": f"/run/x/{device_id}-qsd.sock", "nodes": list(nodes)},
    )


def test_daemon_registry_keeps_the_daemons_nodes_in_the_vm_record(tmp_path: Path) -> None:
    """An operation routed to a daemon sees the drive's nodes as the daemon's; what it records
    goes back into the VM's record under ``daemon``, never into QEMU's ``nodes``."""
    base = [{"node-name": "drv0-file", "driver": "file"}, {"node-name": "drv0", "driver": "raw"}]
    vm_registry = DriveRegistry.load(tmp_path)
    vm_registry.put(daemon_record("disk0", base))
    vm_registry.put(DriveRecord(device_id="disk1", device={}, nodes=({"node-name": "q1"},)))
    seen = DaemonDriveRegistry(vm_registry, "disk0")
    assert list(seen.drives) == ["disk0"]
    assert seen.drives["disk0"].nodes == tuple(base)
    overlay = {"node-name": "drv0-s1", "driver": "qcow2", "backing": "drv0"}
    seen.put(dataclasses.replace(seen.drives["disk0"], nodes=(*base, overlay)))
    on_disk = DriveRegistry.load(tmp_path).drives
    assert on_disk["disk0"].nodes == ()
    assert on_disk["disk0"].daemon is not None
    assert on_disk["disk0"].daemon["nodes"] == [*base, overlay]
    assert on_disk["disk0"].daemon["pid"] == 42
    assert on_disk["disk1"].nodes == ({"node-name": "q1"},)
    assert DaemonDriveRegistry(DriveRegistry.load(tmp_path), "disk0").backing_hints() == {
        "drv0-s1": "drv0"
    }
    with pytest.raises(ValueError, match="disk1"):
        seen.put(on_disk["disk1"])
    with pytest.raises(ValueError, match="unplug"):
        seen.remove("disk0")
    assert DaemonDriveRegistry(vm_registry, "disk1").drives == {}


def test_daemon_disk_routes_one_disk_and_refuses_mixes(tmp_path: Path) -> None:
    """A daemon's disk named alone goes to its daemon; with other disks, or in a whole-VM
    operation, it is refused naming the disk and the way out; QEMU's disks stay on QEMU."""
    registry = DriveRegistry.load(tmp_path)
    registry.put(daemon_record("disk0", []))
    registry.put(DriveRecord(device_id="disk1", device={}, nodes=({"node-name": "q1"},)))
    vm = VM(None, name="vm", pid=None, run_dir=tmp_path)  # type: ignore[arg-type]
    assert vm.daemon_disk("snapshot", ["disk0"]) == "disk0"
    assert vm.daemon_disk("snapshot", ["disk1"]) is None
    assert vm.daemon_disk("commit", ["other"]) is None
    for named in (None, ["disk1", "disk0"]):
        with pytest.raises(InStorageDaemon) as caught:
            vm.daemon_disk("snapshot", named)
        assert caught.value.device_id == "disk0"
        assert "name disk0 alone" in str(caught.value)
        assert "one point in time" in str(caught.value)


def test_daemon_holder_names_another_live_process_operation(tmp_path: Path) -> None:
    """Who holds a daemon's one monitor, from its operations directory: another live
    process's journal record (a commit, with its job), else the backup lock's live owner
    (with the job its control socket names); a record or lock whose process is gone, or this
    process's own, names nobody."""
    import os
    import subprocess

    from blockctl import _journal, _proc
    from blockctl._machine import daemon_holder

    ops = tmp_path / "disk0-qsd.ops"
    ops.mkdir()
    assert daemon_holder(ops) is None
    other = subprocess.Popen(["sleep", "60"])  # another live process
    try:
        live = _journal.Intent(
            id="commit-1",
            kind=_journal.OpKind.COMMIT,
            vm="vm",
            job_id="bc-commit-1-abc",
            what="commit of o.qcow2 into b.raw on disk0",
            pid=other.pid,
            pid_start=_proc.process_start(other.pid),
        )
        _journal.write(ops, live)
        holder = daemon_holder(ops)
        assert holder is not None
        assert (holder.kind, holder.pid, holder.job_id) == ("commit", other.pid, "bc-commit-1-abc")
        assert "commit of o.qcow2 into b.raw on disk0" in holder.what
        # This process's own record (no operation in progress here): not another's.
        _journal.write(ops, dataclasses.replace(live, pid=os.getpid(), pid_start=None))
        assert daemon_holder(ops) is None
        _journal.remove(ops, "commit-1")
        lock = {"pid": other.pid, "pid_start": _proc.process_start(other.pid)}
        (ops / _journal.BACKUP_LOCK).write_text(json.dumps(lock))
        (ops / "control").mkdir()
        (ops / "control" / "bc-backup-2-def.sock").touch()
        holder = daemon_holder(ops)
        assert holder is not None
        assert (holder.kind, holder.pid, holder.job_id) == ("backup", other.pid, "bc-backup-2-def")
    finally:
        other.kill()
        other.wait()
    assert daemon_holder(ops) is None  # its process is gone

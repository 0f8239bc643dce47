"""The fleet's inventory (pure: no Temporal), and ``blockctl fleet`` with no server."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockctl._fleet.inventory import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    FleetBackupRequest,
    VMBackup,
    load_inventory,
    parse_inventory,
    split_vm_workflow_id,
    task_queue,
    vm_workflow_id,
)
from blockctl.errors import ConfigError
from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[2]


def test_an_inventory_routes_each_vm_to_its_host_and_repository(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(
        'repository = "repo"\n'
        '[hosts.hv1]\nvms = ["web", "db"]\n'
        '[hosts."hv2.example"]\nvms = ["mail"]\nrepository = "/srv/hv2"\n'
    )
    assert load_inventory(inventory) == FleetBackupRequest(
        [
            VMBackup("hv1", "web", str(tmp_path / "repo")),
            VMBackup("hv1", "db", str(tmp_path / "repo")),
            VMBackup("hv2.example", "mail", "/srv/hv2"),
        ]
    )
    assert task_queue("hv2.example") == "blockctl@hv2.example"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"hosts": {"h": {"vms": ["a"]}}}, "hosts.h.repository"),
        ({"repository": "r"}, "hosts"),
        ({"repository": "r", "hosts": {}}, "hosts"),
        ({"repository": "r", "hosts": {"h": {"vms": ["a", "a"]}}}, "hosts.h.vms"),
        ({"repository": "r", "hosts": {"h": {"vms": ["Bad Name"]}}}, "hosts.h.vms"),
        ({"repository": "r", "hosts": {"h": {"vms": "a"}}}, "hosts.h.vms"),
        ({"repository": "r", "hosts": {"h": {"vms": ["a"], "vm": []}}}, "hosts.h.vm"),
        ({"repository": "r", "hosts": {"-h": {"vms": ["a"]}}}, "host"),
        ({"repository": "r", "hosts": {"h/x": {"vms": ["a"]}}}, "host"),
        ({"repository": "r", "host": {}}, "host"),
    ],
)
def test_a_wrong_inventory_is_refused_naming_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_inventory(data, Path("/base"))
    assert caught.value.field == field


def test_a_task_queue_name_is_checked() -> None:
    with pytest.raises(ConfigError):
        task_queue("a b")


def test_fleet_backup_without_a_server_fails_in_one_line(tmp_path: Path) -> None:
    """No server: exit 1, one line naming FleetError (and JSON with --json); the process
    leaves by the command's exit path (os._exit: the Temporal client's threads never meet
    the interpreter's finalization, sdk-python issue 300), so nothing more is printed."""
    try:
        import temporalio  # noqa: F401
    except ImportError:
        missing("temporalio (pip install 'blockctl[fleet]')")
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "r"\n[hosts.hv1]\nvms = ["web"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "blockctl", "fleet", "backup", str(inventory),
         "--address", "127.0.0.1:1", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["error"]["type"] == "FleetError"
    (line,) = result.stderr.splitlines()
    assert line.startswith("blockctl: FleetError: cannot connect to Temporal at 127.0.0.1:1")


def test_fleet_worker_refuses_a_bad_host_name_before_connecting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blockctl", "fleet", "worker", "--host", "a b"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("blockctl: ConfigError: "), result.stderr


def test_a_request_carries_the_default_heartbeat_timeout() -> None:
    assert FleetBackupRequest([]).heartbeat_timeout == DEFAULT_HEARTBEAT_TIMEOUT == 30.0


@pytest.mark.parametrize("value", ["0", "0.5", "nan", "x", "86401"])
def test_fleet_backup_refuses_a_bad_heartbeat_timeout_as_usage(tmp_path: Path, value: str) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "r"\n[hosts.hv1]\nvms = ["web"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "blockctl", "fleet", "backup", str(inventory),
         "--address", "127.0.0.1:1", "--heartbeat-timeout", value],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--heartbeat-timeout" in result.stderr and "1 to 86400" in result.stderr


def test_an_inventory_carries_its_limits_per_host_and_repository(tmp_path: Path) -> None:
    data = {"repository": "r", "per-host": 2, "per-repository": 3, "hosts": {"h": {"vms": ["a"]}}}
    request = parse_inventory(data, tmp_path)
    assert (request.per_host, request.per_repository) == (2, 3)
    unlimited = parse_inventory({"repository": "r", "hosts": {"h": {"vms": ["a"]}}}, tmp_path)
    assert (unlimited.per_host, unlimited.per_repository) == (0, 0)


@pytest.mark.parametrize(
    ("key", "value"),
    [("per-host", -1), ("per-host", "2"), ("per-repository", True), ("per-repository", 1001)],
)
def test_a_wrong_limit_is_refused_naming_it(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_inventory({"repository": "r", key: value, "hosts": {"h": {"vms": ["a"]}}}, Path("/"))
    assert caught.value.field == key


def test_a_vm_workflow_id_names_its_fleet_run_host_and_vm() -> None:
    wf = vm_workflow_id("nightly/2026-12-04T00:00:00Z", "hv1.example", "web")
    assert wf == "nightly/2026-12-04T00:00:00Z/backup/hv1.example/web"
    assert split_vm_workflow_id(wf) == ("nightly/2026-12-04T00:00:00Z", "hv1.example", "web")
    assert split_vm_workflow_id("fleet-backup-1") is None
    assert split_vm_workflow_id("x/backup/hv1/Web") is None


@pytest.mark.parametrize(("per_host", "per_repository"), [(0, 0), (1, 0), (2, 0), (0, 1), (2, 3)])
def test_the_slots_keep_each_limit_and_start_in_order(per_host: int, per_repository: int) -> None:
    """The fleet workflow's admission (plain asyncio: it has no Temporal call): 3 hosts x 4
    VMs into 2 repositories; the most at once per host and per repository never exceeds its
    limit and the limit is reached; VMs of one host and repository start in the request's
    order (a VM whose repository is full does not hold back the next one whose repository is
    not)."""
    try:
        from blockctl._fleet.workflows import _Slots
    except ImportError:
        missing("temporalio (pip install 'blockctl[fleet]')")
    backups = [
        VMBackup(f"h{h}", f"v{h}{i}", f"/r{(h + i) % 2}") for h in range(3) for i in range(4)
    ]
    running: list[VMBackup] = []
    most_host: dict[str, int] = {}
    most_repo: dict[str, int] = {}
    started: list[str] = []

    async def one(b: VMBackup, slots: _Slots) -> None:
        await slots.acquire(b)
        try:
            running.append(b)
            started.append(b.vm)
            for key, most in ((b.host, most_host), (b.repository, most_repo)):
                now = sum(1 for r in running if key in (r.host, r.repository))
                most[key] = max(most.get(key, 0), now)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            running.remove(b)
        finally:
            slots.release(b)

    async def fleet() -> None:
        slots = _Slots(per_host, per_repository)
        await asyncio.gather(*(one(b, slots) for b in backups))
        assert not slots.waiting and not any(slots.hosts.values())

    asyncio.run(fleet())
    assert sorted(started) == sorted(b.vm for b in backups)
    for h, r in itertools.product(range(3), range(2)):
        alike = {b.vm for b in backups if (b.host, b.repository) == (f"h{h}", f"/r{r}")}
        mine = [vm for vm in started if vm in alike]
        assert mine == sorted(mine)
    assert max(most_host.values()) <= (per_host or 4)
    assert max(most_repo.values()) <= (per_repository or 12)
    # The limit is reached (and with none, every VM runs at once).
    if not per_repository:
        assert max(most_host.values()) == (per_host or 4)
    if per_repository:
        assert max(most_repo.values()) == per_repository


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["create"], "name"),
        (["create", "nightly"], "inventory"),
        (["create", "nightly", "{inventory}"], "every"),
        (["create", "bad name", "{inventory}", "--every", "60"], "name"),
        (["delete"], "name"),
        (["delete", "nightly", "{inventory}"], "inventory"),
        (["list", "nightly"], "name"),
    ],
)
def test_fleet_schedule_refuses_what_its_action_does_not_take_before_connecting(
    tmp_path: Path, argv: list[str], field: str
) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('repository = "r"\n[hosts.hv1]\nvms = ["web"]\n')
    argv = [a.replace("{inventory}", str(inventory)) for a in argv]
    result = subprocess.run(
        [sys.executable, "-m", "blockctl", "fleet", "schedule", *argv, "--address",
         "127.0.0.1:1", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    error = json.loads(result.stdout)["error"]
    assert (result.returncode, error["type"]) == (1, "ConfigError"), result.stderr
    assert error["message"].startswith(f"{field}: "), error


@pytest.mark.parametrize("argv", [["--every", "0"], ["--every", "60", "--cron", "0 2 * * *"]])
def test_fleet_schedule_refuses_a_bad_or_double_spec_as_usage(
    tmp_path: Path, argv: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blockctl", "fleet", "schedule", "create", "n", "fleet.toml",
         *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--every" in result.stderr, result.stderr


def test_a_cancelled_wait_for_a_slot_is_passed_over() -> None:
    """A VM whose wait is cancelled (its fleet run cancelled) is dropped, not admitted: the
    next VM gets the slot and nothing raises."""
    try:
        from blockctl._fleet.workflows import _Slots
    except ImportError:
        missing("temporalio (pip install 'blockctl[fleet]')")
    first, second, third = (VMBackup("h", vm, "/r") for vm in ("a", "b", "c"))

    async def fleet() -> None:
        slots = _Slots(1, 0)
        await slots.acquire(first)
        waiting = asyncio.ensure_future(slots.acquire(second))
        admitted = asyncio.ensure_future(slots.acquire(third))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.sleep(0)
        slots.release(first)
        await admitted
        assert slots.hosts == {"h": 1} and not slots.waiting

    asyncio.run(fleet())


def test_a_host_without_vms_is_listed_by_its_worker(tmp_path: Path) -> None:
    """A host named without ``vms``: its running VMs, as its worker lists them, are added
    (a dead one is not: no QEMU to back up); a host whose worker did not answer is refused,
    not left out silently."""
    from blockctl._fleet.inventory import HostVMs, ListedHost, ListedVM, ListResult, with_listed

    request = parse_inventory(
        {"repository": "r", "hosts": {"hv1": {"vms": ["web"]}, "hv2": {}}}, tmp_path
    )
    assert request.backups == [VMBackup("hv1", "web", str(tmp_path / "r"))]
    assert request.listed == [ListedHost("hv2", str(tmp_path / "r"))]
    found = ListResult(
        [HostVMs("hv2", [ListedVM("mail", "running", 5), ListedVM("old", "dead", 6)])]
    )
    expanded = with_listed(request, found)
    assert expanded.backups == [
        VMBackup("hv1", "web", str(tmp_path / "r")),
        VMBackup("hv2", "mail", str(tmp_path / "r")),
    ]
    assert expanded.listed == []
    with pytest.raises(ConfigError) as caught:
        with_listed(request, ListResult([HostVMs("hv2", error="no worker")]))
    assert caught.value.field == "hosts.hv2" and "no worker" in str(caught.value)


@pytest.mark.parametrize("keep", ["0", "-1", "x"])
def test_fleet_prune_refuses_a_bad_keep_as_usage(
    keep: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from blockctl._cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser()[0].parse_args(["fleet", "prune", "inv.toml", "--keep", keep])
    assert "a number of points to keep" in capsys.readouterr().err


def test_a_fleet_prune_reports_the_point_a_server_serves(tmp_path: Path) -> None:
    """The prune activity, run as a worker runs it: a point an NBD server serves (its lock
    held as ``Repository.serving`` holds it) is kept and reported under ``served`` with the
    reason, in the result the workflow records and in the CLI's text; the other is deleted."""
    try:
        from temporalio.testing import ActivityEnvironment

        from blockctl._cli.fleet import prune_line
        from blockctl._fleet.activities import prune_vm
        from blockctl._fleet.inventory import VMPrune
    except ImportError:
        missing("temporalio (pip install 'blockctl[fleet]')")
    from blockctl._backup.store import Repository
    from tests.unit.test_repository_store import CHUNK, POINTS, VM, commit, index_of

    repo = Repository.init(tmp_path / "r", chunk_size=CHUNK)
    for n, point in enumerate(POINTS[:3]):
        commit(repo, point, {"disk0": index_of(repo, os.urandom(CHUNK))}, n)
    request = VMPrune("hv1", VM, str(repo.path), 1)
    with repo.serving(VM, POINTS[0]):
        result = asyncio.run(ActivityEnvironment().run(prune_vm, request, list(POINTS[:3])))
    assert result.deleted == [POINTS[1]]
    assert result.kept == [POINTS[0], POINTS[2]]
    assert list(result.served) == [POINTS[0]]
    assert "prune again once it has stopped" in result.served[POINTS[0]]
    assert f"kept {POINTS[0]}: {result.served[POINTS[0]]}" in prune_line(result)
    assert [m.id for m in repo.manifests(VM)] == [POINTS[0], POINTS[2]]

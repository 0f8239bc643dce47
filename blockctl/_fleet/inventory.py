"""The fleet's inventory (a TOML file: hosts, their VMs, the repository each backs up into)
and the plain values workflows and activities pass to each other (dataclasses of str and
int: Temporal's JSON converter carries them as they are).

::

    repository = "/srv/backups"        # shared by every host unless a host names its own

    [hosts.hv1]
    vms = ["web", "db"]

    [hosts.hv2]
    vms = ["mail"]
    repository = "/srv/hv2-backups"

    [hosts.hv3]                        # no vms: every VM hv3's worker lists

    per-host = 2                       # optional: at most 2 backups at once on one host
    per-repository = 4                 # optional: at most 4 at once into one repository
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockctl.errors import ConfigError

#: A host's name: what its task queue is named after (``blockctl@NAME``).
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: As MachineConfig.name allows.
_VM = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

#: The task queue the fleet's workflows run on (any worker polls it; they only route work).
WORKFLOW_QUEUE = "blockctl-fleet"


def task_queue(host: str) -> str:
    """The task queue of ``host``'s worker: the only one that runs that host's activities."""
    return f"blockctl@{check_host(host)}"


def check_schedule_name(name: str) -> str:
    """A schedule's name: its Temporal Schedule id, and the start of its runs' workflow ids."""
    if not _HOST.fullmatch(name):
        raise ConfigError("name", f"{name!r}: 1-63 of A-Z a-z 0-9 . _ -, not starting with . _ -")
    return name


def check_host(host: str) -> str:
    if not _HOST.fullmatch(host):
        raise ConfigError("host", f"{host!r}: 1-63 of A-Z a-z 0-9 . _ -, not starting with . _ -")
    return host


@dataclass(frozen=True, slots=True)
class VMBackup:
    """One VM's backup: on ``host``, VM ``vm`` into the repository at ``repository``."""

    host: str
    vm: str
    repository: str


@dataclass(frozen=True, slots=True)
class VMBackupResult:
    """How one VM's backup ended: its point (id and kind), or the error that stopped it."""

    host: str
    vm: str
    repository: str
    point: str | None = None
    kind: str | None = None
    bytes_read: int = 0
    error: str | None = None


#: How long a backup activity may go without a heartbeat before Temporal takes its worker
#: as gone and retries it (the activity heartbeats every quarter of this, and with progress).
DEFAULT_HEARTBEAT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ListedHost:
    """A host the inventory names without its VMs: every VM its worker lists, into
    ``repository``."""

    host: str
    repository: str


@dataclass(frozen=True, slots=True)
class FleetBackupRequest:
    """The VMs to back up, and how many of their backups may run at once on one host and
    into one repository (0: no limit). ``listed``: hosts whose VMs their workers list (the
    client asks them and adds their VMs to ``backups`` before starting a workflow: a
    workflow's input names every VM)."""

    backups: list[VMBackup]
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT  # seconds
    per_host: int = 0
    per_repository: int = 0
    listed: list[ListedHost] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ListedVM:
    """A VM of a host's runtime directory, as its worker lists it (``blockctl ls``):
    ``state`` running, or dead (its record left, its QEMU gone)."""

    name: str
    state: str
    pid: int


@dataclass(frozen=True, slots=True)
class HostVMs:
    """A host's VMs, as its worker listed them, or why it did not (``error``).
    ``last_poll``: when the server last saw its worker poll its queue (seconds since the
    epoch; None: never, or not looked at), given when it was not asked for that reason."""

    host: str
    vms: list[ListedVM] = field(default_factory=list)
    error: str | None = None
    last_poll: float | None = None


@dataclass(frozen=True, slots=True)
class ListRequest:
    """The hosts whose workers are asked for their VMs, and how long a host's worker has to
    take the question before it is taken as not running (seconds): ``waits``' for the hosts
    it names (a worker whose heartbeat is overdue), else ``wait``."""

    hosts: list[str]
    wait: float = 10.0
    waits: dict[str, float] = field(default_factory=dict)


#: How a host's error starts when no worker took the fleet list's question in time.
NO_TAKER = "no worker took the question within"


@dataclass(frozen=True, slots=True)
class ListResult:
    hosts: list[HostVMs]


@dataclass(frozen=True, slots=True)
class VMVerify:
    """Verify VM ``vm``'s newest point (as found by the first attempt) in ``repository``."""

    host: str
    vm: str
    repository: str


@dataclass(frozen=True, slots=True)
class VMPoints:
    """A VM's complete points in a repository, oldest first, as a worker found them."""

    host: str
    vm: str
    repository: str
    points: list[str]


@dataclass(frozen=True, slots=True)
class VMVerifyResult:
    """A VM's verification: the point checked, whether it is sound (``problems``: what is
    not), or the error that stopped it (``point`` None and no error: the VM has no point)."""

    host: str
    vm: str
    repository: str
    point: str | None = None
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class VMPrune:
    """Prune VM ``vm``'s points in ``repository`` to its newest ``keep_last``."""

    host: str
    vm: str
    repository: str
    keep_last: int


@dataclass(frozen=True, slots=True)
class VMPruneResult:
    """A VM's prune: the points it deleted (every attempt's: a retry reports what an earlier
    attempt deleted too) and kept, the chunks collected, or the error that stopped it.
    ``served``: the points kept although not asked for, because an NBD server (a live
    restore's) serves them, each with why and the way out."""

    host: str
    vm: str
    repository: str
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    chunks_removed: int = 0
    bytes_removed: int = 0
    gc_skipped: str | None = None
    error: str | None = None
    served: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FleetVerifyRequest:
    """The VMs whose newest point to verify, at most ``per_host`` at once on one host."""

    vms: list[VMVerify]
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    per_host: int = 0


@dataclass(frozen=True, slots=True)
class FleetVerifyResult:
    results: list[VMVerifyResult]


@dataclass(frozen=True, slots=True)
class FleetPruneRequest:
    """The VMs to prune; one prune at a time per repository (its garbage collection takes
    the repository's lock exclusively, and removes what no point references)."""

    vms: list[VMPrune]
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT


@dataclass(frozen=True, slots=True)
class FleetPruneResult:
    results: list[VMPruneResult]


@dataclass(frozen=True, slots=True)
class VMRestore:
    """Restore VM ``vm``'s point ``point`` (None: its newest, as the workflow found it) from
    ``repository`` into new qcow2 files in ``dest_dir``, on ``host`` (a path as that host
    sees it)."""

    host: str
    vm: str
    repository: str
    dest_dir: str
    point: str | None = None


def restored_name(vm: str, point: str, device: str) -> str:
    """The file a fleet restore writes for one disk of a point: the same in every attempt (a
    retry finds what an earlier attempt named), different for every VM, point and device."""
    return f"{vm}.{point}.{device}.qcow2"


@dataclass(frozen=True, slots=True)
class VMRestoreResult:
    """A VM's restore: the point restored and the file each disk went to (``files``, with
    ``reused``: those an earlier attempt had already completed), or the error that stopped
    it (``point`` None and no error: the VM has no point)."""

    host: str
    vm: str
    repository: str
    point: str | None = None
    files: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    bytes_written: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FleetRestoreRequest:
    """The VMs to restore, at most ``per_host`` at once on one host."""

    vms: list[VMRestore]
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    per_host: int = 0


@dataclass(frozen=True, slots=True)
class FleetRestoreResult:
    results: list[VMRestoreResult]


@dataclass(frozen=True, slots=True)
class VMChain:
    """An external snapshot ``tag`` of VM ``vm`` on ``host``: taken (its overlays in
    ``directory``, None: beside each disk's image) or committed back (``directory`` unused)."""

    host: str
    vm: str
    tag: str
    directory: str | None = None


@dataclass(frozen=True, slots=True)
class VMChainResult:
    """A VM's snapshot or commit: each disk's overlay file (device to file), whether an
    earlier attempt had already done it (``reused``: a retry found the overlays in the chain,
    or, for a commit, gone from it), each disk's chain afterwards (top first, files), or the
    error that stopped it."""

    host: str
    vm: str
    tag: str
    overlays: dict[str, str] = field(default_factory=dict)
    reused: bool = False
    chains: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FleetChainRequest:
    """The VMs to snapshot (or commit), at most ``per_host`` at once on one host."""

    vms: list[VMChain]
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    per_host: int = 0


@dataclass(frozen=True, slots=True)
class FleetChainResult:
    results: list[VMChainResult]


@dataclass(frozen=True, slots=True)
class VMBackupRequest:
    """One VM's child workflow's input: the VM and its activity's heartbeat timeout."""

    backup: VMBackup
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT  # seconds


def vm_workflow_id(fleet_workflow_id: str, host: str, vm: str) -> str:
    """The id of VM ``vm``'s child workflow in the fleet backup ``fleet_workflow_id``: the
    same in every run of that id (a host or VM name has no ``/``: the last two parts are
    they)."""
    return f"{fleet_workflow_id}/backup/{host}/{vm}"


def split_vm_workflow_id(workflow_id: str) -> tuple[str, str, str] | None:
    """(fleet workflow id, host, VM) of a VM's child workflow id, or None if it is not one."""
    fleet, sep, rest = workflow_id.rpartition("/backup/")
    host, _, vm = rest.partition("/")
    if not sep or not fleet or not _HOST.fullmatch(host) or not _VM.fullmatch(vm):
        return None
    return fleet, host, vm


#: The most backups at once a limit may allow (a limit is 1 to this, or 0: none).
MAX_LIMIT = 1000


def check_limit(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
        raise ConfigError(
            name, f"{value!r}: a number of backups at once, 1 to {MAX_LIMIT} (0: no limit)"
        )
    return value


@dataclass(frozen=True, slots=True)
class FleetBackupResult:
    results: list[VMBackupResult]

    @property
    def failed(self) -> list[VMBackupResult]:
        return [r for r in self.results if r.error is not None]


def parse_inventory(data: dict[str, Any], base: Path) -> FleetBackupRequest:
    """The backups an inventory asks for, host by host in the file's order. Relative
    repository paths are relative to ``base`` (the file's directory)."""
    shared = data.get("repository")
    unknown = set(data) - {"repository", "hosts", "per-host", "per-repository"}
    if unknown:
        raise ConfigError(
            sorted(unknown)[0],
            "unknown key (an inventory has repository, hosts, per-host, per-repository)",
        )
    per_host = check_limit("per-host", data.get("per-host", 0))
    per_repository = check_limit("per-repository", data.get("per-repository", 0))
    hosts = data.get("hosts")
    if not isinstance(hosts, dict) or not hosts:
        raise ConfigError("hosts", "at least one [hosts.NAME] table with vms = [...]")
    backups: list[VMBackup] = []
    listed: list[ListedHost] = []
    seen: set[tuple[str, str]] = set()
    for host, table in hosts.items():
        where = f"hosts.{host}"
        check_host(host)
        if not isinstance(table, dict):
            raise ConfigError(where, "a table: vms = [...], repository = ...")
        unknown = set(table) - {"vms", "repository"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key (vms, repository)")
        vms = table.get("vms")
        if vms is not None and (
            not isinstance(vms, list) or not all(isinstance(v, str) for v in vms)
        ):
            raise ConfigError(
                f"{where}.vms", "a list of VM names (none: every VM its worker lists)"
            )
        repository = table.get("repository", shared)
        if not isinstance(repository, str) or not repository:
            raise ConfigError(f"{where}.repository", "a path (here or as the top-level repository)")
        if vms is None:
            listed.append(ListedHost(host, str(base / repository)))
            continue
        for vm in vms:
            if not _VM.fullmatch(vm):
                raise ConfigError(f"{where}.vms", f"{vm!r} is not a VM name")
            if (host, vm) in seen:
                raise ConfigError(f"{where}.vms", f"{vm!r} is listed twice")
            seen.add((host, vm))
            backups.append(VMBackup(host, vm, str(base / repository)))
    return FleetBackupRequest(
        backups, per_host=per_host, per_repository=per_repository, listed=listed
    )


def with_listed(request: FleetBackupRequest, found: ListResult) -> FleetBackupRequest:
    """``request`` with the VMs its listed hosts' workers have (``found``) added, in the
    workers' order (the running ones: a dead VM's record has no QEMU to back up), and no
    host left to list. A host whose worker did not answer is an error: its VMs are unknown,
    and going on would silently leave them out."""
    by_host = {h.host: h for h in found.hosts}
    backups = list(request.backups)
    named = {(b.host, b.vm) for b in backups}
    for listed in request.listed:
        answer = by_host.get(listed.host)
        if answer is None or answer.error is not None:
            why = "not asked" if answer is None else answer.error
            raise ConfigError(f"hosts.{listed.host}", f"its VMs could not be listed: {why}")
        for vm in answer.vms:
            if vm.state == "running" and (listed.host, vm.name) not in named:
                backups.append(VMBackup(listed.host, vm.name, listed.repository))
    return FleetBackupRequest(
        backups, request.heartbeat_timeout, request.per_host, request.per_repository
    )


def load_inventory(path: Path) -> FleetBackupRequest:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError("inventory", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("inventory", f"{path} is not valid TOML: {exc}") from None
    return parse_inventory(data, path.parent.absolute())


@dataclass(frozen=True, slots=True)
class VMAttach:
    """Hot-plug image ``file`` (on ``host``) into running VM ``vm`` as device ``device_id``:
    fixed before the first attempt, so a retry finds the device an earlier attempt added."""

    host: str
    vm: str
    file: str
    format: str
    device_id: str
    read_only: bool = False
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT


@dataclass(frozen=True, slots=True)
class VMDetach:
    """Unplug device ``device_id`` of running VM ``vm`` on ``host``, waiting up to
    ``timeout`` seconds for the guest to release it."""

    host: str
    vm: str
    device_id: str
    timeout: float = 10.0
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT


@dataclass(frozen=True, slots=True)
class VMPlugResult:
    """A fleet attach or detach of one device: its file (attach), its state afterwards
    (``attached``; ``removed``, or ``pending``: the guest has not released it yet), whether
    an earlier attempt had already done it (``reused``), or the error that stopped it."""

    host: str
    vm: str
    device_id: str
    file: str | None = None
    state: str | None = None
    reused: bool = False
    error: str | None = None


def plug_device_id(file: str) -> str:
    """The device id a fleet attach without ``--id`` gives image ``file`` (an absolute path):
    the same in every attempt and every repeat of the command, derived from the path only."""
    return "fleet-" + hashlib.sha256(file.encode()).hexdigest()[:12]


def plug_workflow_id(action: str, host: str, vm: str, device_id: str) -> str:
    """The workflow id of a fleet attach or detach (``action``) of one device: a repeat of the
    command while the first runs waits for that run instead of starting another."""
    return f"fleet-{action}/{host}/{vm}/{device_id}"

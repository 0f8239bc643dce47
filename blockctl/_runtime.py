"""The runtime directory: where named VMs are found by other processes.

Layout: ``<root>/<name>/`` (0700) holds ``vm.json`` (the record), ``qmp.sock`` (a QMP monitor
for attaching, 0600), ``qmp-N.sock``/``qmp-N.lock`` (the pool of monitors blockctl clients
take one of, see ``blockctl._monitors``), ``console.sock``/``console.log`` for VMs that
outlive their launcher, ``qemu.log`` (QEMU's stdout and stderr), and ``qga.sock`` (the guest
agent's channel, 0600) for VMs with ``guest_agent``. QEMU is the source of truth about a VM's
state; the record only says where to find it and which process it is.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from blockctl import _fsutil
from blockctl.errors import ConfigError, VMNotFound

RECORD = "vm.json"
# As types.MachineConfig.name allows (1-32 of a-z 0-9 _ -, not starting with _ or -).
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def runtime_root() -> Path:
    """``$BLOCKCTL_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/blockctl``, else ``/tmp/blockctl-UID``.

    Created 0700 if missing; refused if another user owns it or others can enter it, since
    its sockets give full control over the VMs (qemu-facts.md S4).
    """
    env = os.environ.get("BLOCKCTL_RUNTIME_DIR")
    if env:
        root = Path(env)
    elif xdg := os.environ.get("XDG_RUNTIME_DIR"):
        root = Path(xdg) / "blockctl"
    else:
        root = Path(tempfile.gettempdir()) / f"blockctl-{os.getuid()}"
    # Missing: created 0700 (and any missing parent), whatever the umask.
    _fsutil.make_private_dir(root, what="runtime_dir")
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError("runtime_dir", f"{root} is not a directory owned by you")
    if info.st_mode & 0o077:
        raise ConfigError(
            "runtime_dir",
            f"{root} is accessible by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); `chmod 700 {root}`",
        )
    return root


def check_socket_path(path: Path, what: str) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            what,
            f"socket path {path} is {len(os.fsencode(path))} bytes; unix "
            f"sockets allow {MAX_SOCKET_PATH}. Set BLOCKCTL_RUNTIME_DIR to a "
            "shorter directory",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VMRecord:
    """How to find a named VM: its QEMU process and sockets."""

    name: str
    pid: int
    run_dir: str
    monitor: str
    console_socket: str | None
    console_log: str | None
    qemu_log: str
    argv: tuple[str, ...]
    accel: str
    started: float
    #: The pool of QMP monitor sockets clients take one of (empty in an older record).
    monitors: tuple[str, ...] = ()
    #: Written at QEMU's spawn, before its QMP greeting (so that no QEMU ever runs with
    #: nothing naming it); cleared once it greeted. Still set with QEMU alive: its launcher
    #: is waiting for the greeting, or died there (``blockctl recover`` finishes the start).
    starting: bool = False

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["argv"] = list(self.argv)
        data["monitors"] = list(self.monitors)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> VMRecord:
        values = dict(data)
        values["argv"] = tuple(values.get("argv", ()))  # type: ignore[arg-type]
        values["monitors"] = tuple(values.get("monitors", ()))  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def write_record(record: VMRecord) -> None:
    """Write ``vm.json`` atomically (mode 0600): a reader sees the old record or the new one,
    whole."""
    target = Path(record.run_dir) / RECORD
    _fsutil.atomic_write_bytes(target, json.dumps(record.to_json(), indent=1).encode())


def read_record(name: str, root: Path | None = None) -> VMRecord:
    if not _NAME.fullmatch(name):
        # A VM name is one directory of the runtime dir: never "..", a path, or a NUL.
        raise VMNotFound(name, f"no VM named {name!r}: not a VM name (see `blockctl ls`)")
    path = (root or runtime_root()) / name / RECORD
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VMNotFound(name, f"no VM named {name!r} (see `blockctl ls`)") from None
    except (OSError, ValueError) as exc:
        raise VMNotFound(name, f"the record of VM {name!r} is unreadable: {exc}") from None
    try:
        return VMRecord.from_json(data)
    except TypeError as exc:
        raise VMNotFound(name, f"the record of VM {name!r} is malformed: {exc}") from None


def list_records(root: Path | None = None) -> list[VMRecord]:
    base = root or runtime_root()
    records = []
    for entry in sorted(base.iterdir()):
        if (entry / RECORD).is_file():
            try:
                records.append(read_record(entry.name, base))
            except VMNotFound:
                continue
    return records


def run_dir_of(name: str, root: Path | None = None) -> Path | None:
    """The run directory a VM named ``name`` has or would have (None: not a VM name)."""
    if not _NAME.fullmatch(name):
        return None
    return (root or runtime_root()) / name


def is_alive(record: VMRecord) -> bool:
    """Whether the record's process still runs *and* is that QEMU (the PID may be reused)."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes()
    except OSError:
        return False
    # The monitor path is in the -chardev option, with commas doubled.
    return os.fsencode(record.monitor.replace(",", ",,")) in cmdline

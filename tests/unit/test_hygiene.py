"""Hygiene (issue 7 item 6, qemu-facts.md S1, S4, S5, T9): rules checked over the source and
over every qemu-img and block-node call blockctl can make.

- no shell anywhere (``shell=True``, ``os.system``, ``os.popen``) in blockctl/ and scripts/;
- image locking is never turned off;
- every qemu-img argv built in blockctl/_images.py names the format of every image it opens
  (``-f``, ``-F`` for a second image or a backing file, or a ``json:`` spec naming the driver):
  each function runs against a fake ``_proc.run`` that records its argv;
- every node blockctl adds names its driver: the nodes _argv plans for every kind of drive,
  every node-options literal in _argv and _ops, and a guard in ``wire.blockdev_add``.

QMP sockets 0600 in a 0700 run dir are checked on a real VM in
tests/integration/test_launch.py (test_embedded_default_boots_runs_commands_and_shuts_down).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from blockctl import _images, _proc
from blockctl._argv import DriveSource, plan_drive
from blockctl._images import ImageLayer
from blockctl._qmp import wire
from blockctl.errors import ConfigError
from blockctl.types import Drive, ImageFormat, Interface, Media, NbdSource

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    [*(ROOT / "blockctl").rglob("*.py"), *(p for p in (ROOT / "scripts").iterdir() if p.is_file())]
)


def source_files() -> list[tuple[Path, str]]:
    return [(p, p.read_text(errors="replace")) for p in SOURCES]


# Section: grep-style rules


def test_sources_are_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"_images.py", "_argv.py", "_proc.py", "setup", "test"} <= names


@pytest.mark.parametrize(
    "pattern",
    [r"shell\s*=\s*True", r"\bos\.system\s*\(", r"\bos\.popen\s*\(", r"create_subprocess_shell"],
)
def test_no_shell_anywhere(pattern: str) -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for path, text in source_files()
        for n, line in enumerate(text.splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert hits == []


def test_locking_is_never_turned_off() -> None:
    # locking=off / "locking": "off", and qemu-img's force-share (-U) which ignores locks.
    pattern = re.compile(r"""(?i:locking['"]?\s*[:=,]\s*['"]?(off|false)|force-share)|["\s]-U\b""")
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path, text in source_files()
        for n, line in enumerate(text.splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_qemu_img_argv_literals_name_the_format() -> None:
    """Outside _images.py (checked at run time below), any argv list that starts with the
    qemu-img binary carries a literal "-f"."""
    found = 0
    for path, text in source_files():
        if path.suffix != ".py" or path.name == "_images.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.List) and node.elts):
                continue
            first = node.elts[0]
            if isinstance(first, ast.Call) and "qemu_img" in ast.unparse(first.func):
                found += 1
                literals = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                assert "-f" in literals, f"{path.relative_to(ROOT)}:{node.lineno}"
    assert found >= 1  # the demo's convert


def test_node_option_literals_name_a_driver() -> None:
    """Every dict literal in _argv and _ops with a "node-name" and node options names its
    driver (copies made with ``**`` keep the recorded one)."""
    checked = 0
    for path in [ROOT / "blockctl" / "_argv.py", *(ROOT / "blockctl" / "_ops").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Dict):
                continue
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            if "node-name" not in keys or None in node.keys:  # None: a ** spread
                continue
            if set(keys) <= {"node-name", "name", "node"}:
                continue  # command arguments naming a node, not node options
            if keys[0] == "type" and "addr" in keys:
                continue  # a block export's options (of the node it exports), not a node's
            checked += 1
            assert "driver" in keys, f"{path.relative_to(ROOT)}:{node.lineno}: {keys}"
    assert checked >= 5


def test_only_the_session_imports_qemu_qmp() -> None:
    """One QMP boundary: blockctl/_qmp/session.py. The guest agent (blockctl/_agent.py) has
    its own raw-socket client on purpose: qemu-ga is not QMP (no greeting, replies that
    survive reconnects, id-less stale errors that end a qemu.qmp session; qga.md §2)."""
    importers = set()
    for path, text in source_files():
        if path.suffix != ".py" or "blockctl" not in path.parts:
            continue
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "qemu" or n.startswith("qemu.") for n in names):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == {"blockctl/_qmp/session.py"}


def test_only_the_agent_module_spells_agent_commands() -> None:
    """qemu-ga command names ("guest-ping", "guest-fsfreeze-freeze", ...) live in _agent.py,
    as QMP command names live in _qmp/wire.py."""
    command = re.compile(r"""["']guest-(sync|ping|info|fsfreeze|get|set|exec|file|shutdown)""")
    hits = {
        str(path.relative_to(ROOT))
        for path, text in source_files()
        if path.suffix == ".py" and command.search(text)
    }
    assert hits == {"blockctl/_agent.py"}


# Section: qemu-img argv, recorded


class Recorder:
    """A fake ``_proc.run``: records argv, answers like qemu-img would."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    async def __call__(self, argv: Sequence[str], **_: Any) -> _proc.Completed:
        args = list(argv)
        self.argvs.append(args)
        return _proc.Completed(
            argv=tuple(args), returncode=0, stdout=self.reply(args), stderr="", seconds=0.0
        )

    @staticmethod
    def reply(args: list[str]) -> str:
        if "info" in args:
            fmt = args[args.index("-f") + 1] if "-f" in args else "raw"
            one = {"filename": args[-1], "format": fmt, "virtual-size": 1 << 20}
            return json.dumps([one] if "--backing-chain" in args else one)
        if "check" in args:
            return json.dumps({"check-errors": 0})
        if "map" in args:
            return "[]"
        if "measure" in args:
            return json.dumps({"required": 1, "fully-allocated": 2})
        return ""


def qemu_img_args(argv: list[str]) -> list[str]:
    """The qemu-img part of an argv (after a prlimit prefix)."""
    binary = _images.qemu_img_binary()
    return argv[argv.index(binary) + 1 :]


def names_every_format(args: list[str]) -> bool:
    sub = args[0]
    has_f = "-f" in args or any(a.startswith('json:{"driver"') for a in args)
    if sub == "measure" and "--size" in args:
        return "-f" not in args  # no input image at all
    if not has_f:
        return False
    if sub in ("create", "rebase") and "-b" in args and args[args.index("-b") + 1] != "":
        return "-F" in args
    if sub == "compare":
        return "-F" in args
    return True


async def test_every_qemu_img_call_names_the_format(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr(_proc, "run", rec)
    p, q = Path("/i/a.qcow2"), Path("/i/b.raw")
    qcow2, raw = ImageFormat.QCOW2, ImageFormat.RAW
    lun = {"driver": "iscsi", "transport": "tcp", "portal": "h", "target": "t", "lun": 1}
    nbd = {"type": "unix", "path": "/s"}
    calls: dict[str, list[Any]] = {
        "create": [
            _images.create(p, qcow2, size=1 << 20),
            _images.create(p, qcow2, backing=q, backing_format=raw),
            _images.create(p, qcow2, size=1, backing=q, backing_format=raw, unsafe=True),
        ],
        "info": [
            _images.info(p, qcow2),
            _images.info(p, qcow2, backing_chain=True, untrusted=True),
        ],
        "inspect_untrusted": [_images.inspect_untrusted(p, qcow2)],
        "check": [_images.check(p, qcow2)],
        "commit": [_images.commit(p, qcow2), _images.commit(p, qcow2, base=q, drop=True)],
        "rebase": [
            _images.rebase(p, qcow2, q, raw),
            _images.rebase(p, qcow2, None, None, unsafe=True),
        ],
        "convert": [_images.convert(p, qcow2, q, raw, compress=True, options={"a": "b"})],
        "resize": [_images.resize(p, qcow2, 1 << 20, shrink=True)],
        "snapshot": [_images.snapshot(p, "list"), _images.snapshot(p, "create", "t")],
        "compare": [_images.compare(p, qcow2, q, raw, strict=True)],
        "map_extents": [_images.map_extents(p, qcow2)],
        "measure": [_images.measure(qcow2, size=1), _images.measure(qcow2, image=(q, raw))],
        # Node options as json: filenames: the format is the outer node's driver.
        "node_virtual_size": [_images.node_virtual_size({"driver": "raw", "file": lun}, [])],
        "convert_nodes": [
            _images.convert_nodes(
                {"driver": "raw", "file": {"driver": "nbd", "server": nbd}},
                {"driver": "raw", "file": lun, "offset": 0, "size": 1},
                [{"qom-type": "secret", "id": "s", "file": "/p", "format": "raw"}],
            )
        ],
    }
    public = {
        name
        for name, fn in vars(_images).items()
        if inspect.iscoroutinefunction(fn) and not name.startswith("_")
    }
    assert public == set(calls), "a new qemu-img function needs a line here"
    for coroutines in calls.values():
        for coroutine in coroutines:
            await coroutine
    assert len(rec.argvs) >= 20
    for argv in rec.argvs:
        assert names_every_format(qemu_img_args(argv)), argv
    # Images from outside are read under limits, one layer at a time (no --backing-chain).
    untrusted = [a for a in rec.argvs if a[0] == "prlimit" and "--backing-chain" not in a]
    assert untrusted and all("-f" in a for a in untrusted)


async def test_a_format_is_needed_for_every_backing_file() -> None:
    with pytest.raises(ConfigError):
        await _images.create(Path("/a"), ImageFormat.QCOW2, backing=Path("/b"))
    with pytest.raises(ConfigError):
        await _images.rebase(Path("/a"), ImageFormat.QCOW2, Path("/b"), None)


# Section: block nodes


def layer(name: str, fmt: ImageFormat) -> ImageLayer:
    return ImageLayer(
        filename=name,
        format=fmt,
        virtual_size=1 << 20,
        backing_filename=None,
        backing_format=None,
        data_file=None,
    )


@pytest.mark.parametrize(
    "drive",
    [
        Drive(file=Path("/a.qcow2"), format=ImageFormat.QCOW2),
        Drive(file=Path("/a.qcow2"), format=ImageFormat.QCOW2, snapshot=True, copy_on_read=True),
        Drive(file=Path("/a.raw"), format=ImageFormat.RAW, interface=Interface.SCSI),
        Drive(
            file=Path("/a.iso"), format=ImageFormat.RAW, media=Media.CDROM, interface=Interface.IDE
        ),
        Drive(nbd=NbdSource(socket=Path("/s")), format=ImageFormat.QCOW2, copy_on_read=True),
        Drive(file=None, media=Media.CDROM, interface=Interface.IDE),
    ],
    ids=["qcow2", "snapshot+cor", "scsi-raw", "cdrom", "nbd", "empty-cdrom"],
)
def test_every_planned_node_names_its_driver(drive: Drive) -> None:
    chain = (
        layer("/a.qcow2", ImageFormat.QCOW2),
        layer("/base.raw", ImageFormat.RAW),
    )
    source = None if drive.file is None else DriveSource(chain=chain, overlay=Path("/o.qcow2"))
    plan = plan_drive(0, drive, source, "pc", None)
    formats = {f.value for f in ImageFormat}
    for node in plan.nodes:
        assert node["driver"] in formats | {"file", "host_device", "nbd", "copy-on-read"}
        assert isinstance(node["node-name"], str)
        assert "locking" not in node
        if node["driver"] in ("qcow2", "qed", "vmdk"):
            assert "backing" in node  # explicit: QEMU never follows the header by itself


async def test_blockdev_add_refuses_nodes_without_a_driver() -> None:
    sent: list[object] = []

    class Session:
        async def execute(self, name: str, args: object = None) -> object:
            sent.append((name, args))
            return {}

    s: Any = Session()
    for bad in (
        {"node-name": "x", "filename": "/a"},
        {"driver": "qcow2", "file": "f"},
        {"driver": "qcow2", "node-name": "x", "file": {"filename": "/a"}},
        {"driver": "file", "node-name": "x", "filename": "/a", "locking": "off"},
    ):
        with pytest.raises(ConfigError):
            await wire.blockdev_add(s, bad)
        with pytest.raises(ConfigError):
            await wire.blockdev_reopen(s, [bad])
    assert sent == []
    await wire.blockdev_add(s, {"driver": "file", "node-name": "x", "filename": "/a"})
    assert len(sent) == 1

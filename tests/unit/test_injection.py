"""Injection-proof inputs (issue 7 item 5, qemu-facts.md S5/S6, T11): property tests.

Strings full of what breaks option strings and paths (``,`` ``=`` ``:`` newline NUL ``json:``
``nbd:`` ``..`` quotes, unicode, lone surrogates) go through every pure public door: config
construction → argv, the TOML loaders, the CLI's argument parsing down to the library call, tag
and size parsing, QMP command names, VM names. Each input either works as ONE literal value
(exactly one JSON string value in the argv, the option layout unchanged) or is refused with a
:class:`BlockctlError` subclass; any other exception fails the test. No QEMU runs here; the
end-to-end examples with real QEMU are in tests/integration/test_untrusted.py.

The last test prints the figure: property examples tried (and how many were refused).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from blockctl import _runtime
from blockctl._argv import DriveSource, build_argv, plan_drives
from blockctl._cli import common as cli_common
from blockctl._cli import drives as cli_drives
from blockctl._cli import main as cli
from blockctl._cli import vm as cli_vm
from blockctl._images import ImageLayer
from blockctl._ops import apply as apply_ops
from blockctl._ops import chains
from blockctl._ops import drives as drives_ops
from blockctl._qmp import wire
from blockctl.errors import BlockctlError, ConfigError, VMNotFound
from blockctl.types import (
    Accel,
    CacheMode,
    Drive,
    ImageFormat,
    Interface,
    MachineConfig,
    NbdSource,
    parse_size,
)
from tests.figures import report

#: Per property test: examples tried, and how many of them passed every check as a literal
#: value (USED) or as a refusal with a BlockctlError (REFUSED). An example counts in USED or
#: REFUSED only once its checks passed: TRIED - USED - REFUSED failed a check (or raised).
TRIED: Counter[str] = Counter()
USED: Counter[str] = Counter()
REFUSED: Counter[str] = Counter()
#: The property test of each label, and the least share of its examples that must be used as
#: literal values: a change that makes a door refuse everything fails its test (a refusal
#: would otherwise pass every example).
LABELS = {
    "test_config_strings_are_one_literal_value_in_the_argv": "config → argv",
    "test_machine_toml_loads_or_refuses": "machine TOML",
    "test_apply_file_loads_or_refuses": "apply TOML",
    "test_cli_attach_passes_one_literal_drive": "CLI attach",
    "test_cli_qmp_sends_one_literal_command": "CLI qmp",
    "test_snapshot_tags": "snapshot tag",
    "test_sizes": "size",
    "test_vm_names_never_leave_the_runtime_dir": "VM name",
}
MIN_USED_SHARE = 0.05

FRAGMENTS = [
    ",",
    ",,",
    "=",
    ":",
    "\n",
    "\r",
    "\t",
    "\0",
    "json:",
    'json:{"driver":"file","filename":"/etc/passwd"}',
    "nbd:",
    "nbd:unix:/run/x.sock",
    "http://h/x",
    "file:",
    "..",
    "../",
    "/",
    "./",
    " ",
    ",read-only=on",
    ",file.locking=off",
    "'",
    '"',
    "{",
    "}",
    "\\",
    "-",
    "--",
    "_",
    ".",
    "a",
    "Z9",
    "disk0",
    "drv0",
    "é",
    "☃",
    "\u202e",
    "\ufeff",
    "\ud800",
    "\udcff",
    "\U0001d518",  # a mathematical capital U
]

#: What no field accepts anywhere (a QEMU option, a path or a JSON text cannot carry them).
NEVER = frozenset(("\0", "\n", "\ud800", "\udcff"))
# Strings built of option syntax that most fields should take as a literal.
soft = st.lists(
    st.sampled_from([f for f in FRAGMENTS if f not in NEVER]), min_size=1, max_size=8
).map("".join)

nasty = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join),
    soft,
    soft,
    st.text(max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24),
)


def mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any] = nasty) -> Any:
    """Usually a value the field accepts (so the other fields get exercised), else anything."""
    return st.integers(0, 3).flatmap(lambda i: other if i == 0 else valid)


#: Paths: absolute or relative, made of the fragments above.
paths = st.one_of(soft.map(lambda s: "/" + s), nasty.map(lambda s: "/" + s), nasty)
vm_names = mostly(st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,31}\Z"))
serials = mostly(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20)
)
caches = mostly(st.sampled_from([m.value for m in CacheMode]))
formats = mostly(st.sampled_from([f.value for f in ImageFormat]))


def refused(test: str) -> None:
    REFUSED[test] += 1


def used(test: str) -> None:
    USED[test] += 1


@pytest.fixture(autouse=True)
def enough_used(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each property test: every example it tried passed its checks, and at least
    :data:`MIN_USED_SHARE` of them were used as literal values (not all refused)."""
    label = LABELS.get(request.node.originalname)
    before = (TRIED[label], USED[label], REFUSED[label]) if label else (0, 0, 0)
    yield
    if label is None:
        return
    tried, used_, refused_ = (
        TRIED[label] - before[0],
        USED[label] - before[1],
        REFUSED[label] - before[2],
    )
    assert tried > 0, f"{label}: no example was tried"
    assert used_ + refused_ == tried, f"{label}: {tried - used_ - refused_} examples failed"
    assert used_ >= MIN_USED_SHARE * tried, (
        f"{label}: only {used_} of {tried} examples were used as literal values"
    )


# Section: config → argv


def argv_for(config: MachineConfig, label: str = "t") -> list[str]:
    sources = {
        i: DriveSource(
            chain=(
                ImageLayer(
                    filename=str(d.file),
                    format=d.format or ImageFormat.RAW,
                    virtual_size=1 << 20,
                    backing_filename=None,
                    backing_format=None,
                    data_file=None,
                ),
            )
        )
        for i, d in enumerate(config.drives)
        if d.file is not None
    }
    return build_argv(
        binary="qemu-system-x86_64",
        config=config,
        label=label,
        accel=Accel.TCG,
        plans=plan_drives(config, sources),
        qmp_fd=3,
        monitor_path=Path("/run/x/qmp.sock"),
        console=None,
    )


def same_layout(argv: list[str], benign: list[str]) -> bool:
    """The same options at the same positions as with harmless values: no value was split,
    and none became an option of its own."""
    return len(argv) == len(benign) and all(
        a == b for a, b in zip(argv, benign, strict=True) if b.startswith("-")
    )


def unescape_opts(value: str) -> list[str]:
    """Split a QemuOpts string on single commas, undoubling ``,,`` (as QEMU does)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    return [*parts, cur]


def json_values(argv: list[str], option: str) -> list[dict[str, Any]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == option]


def strings_in(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from strings_in(value)


@settings(max_examples=400, deadline=None)
@given(
    file=paths,
    serial=serials,
    name=vm_names,
    append=nasty,
    kernel=mostly(nasty.map(lambda s: "/" + s)),
    socket=mostly(nasty.map(lambda s: "/" + s)),
    export=nasty,
    use_nbd=st.booleans(),
    scsi=st.booleans(),
)
def test_config_strings_are_one_literal_value_in_the_argv(
    file: str,
    serial: str,
    name: str,
    append: str,
    kernel: str,
    socket: str,
    export: str,
    use_nbd: bool,
    scsi: bool,
) -> None:
    TRIED["config → argv"] += 1
    interface = Interface.SCSI if scsi else Interface.VIRTIO
    try:
        if use_nbd:
            drive = Drive(
                nbd=NbdSource(socket=Path(socket), export=export),
                format=ImageFormat.RAW,
                serial=serial,
                interface=interface,
            )
        else:
            drive = Drive(
                file=Path(file), format=ImageFormat.RAW, serial=serial, interface=interface
            )
        config = MachineConfig(name=name, kernel=Path(kernel), append=append, drives=(drive,))
    except BlockctlError:
        refused("config → argv")
        return
    argv = argv_for(config, label=name)
    benign = MachineConfig(
        name="vm",
        kernel=Path("/k"),
        append="x",
        drives=(
            Drive(
                nbd=NbdSource(socket=Path("/s"), export="e"),
                format=ImageFormat.RAW,
                serial="S",
                interface=interface,
            )
            if use_nbd
            else Drive(file=Path("/f"), format=ImageFormat.RAW, serial="S", interface=interface),
        ),
    )
    benign_argv = argv_for(benign, label="vm")
    assert same_layout(argv, benign_argv)
    assert argv[argv.index("-kernel") + 1] == str(config.kernel)
    assert argv[argv.index("-append") + 1] == append
    name_opts = unescape_opts(argv[argv.index("-name") + 1])
    assert name_opts == [f"guest={name}", "debug-threads=on"]
    nodes = json_values(argv, "-blockdev")
    device = next(d for d in json_values(argv, "-device") if d["driver"] != "virtio-scsi-pci")
    values = [s for n in nodes for s in strings_in(n)]
    if use_nbd:
        assert drive.nbd is not None
        assert nodes[0]["server"] == {"type": "unix", "path": str(drive.nbd.socket)}
        assert nodes[0]["export"] == export
        assert values.count(export) >= 1
    else:
        assert [n.get("filename") for n in nodes] == [str(drive.file), None]
        # Exactly once as a value, unless it equals a name blockctl generates ("drv0"), where
        # the filename check above is the whole story.
        generated = {v for n in json_values(benign_argv, "-blockdev") for v in strings_in(n)}
        if str(drive.file) not in generated:
            assert values.count(str(drive.file)) == 1
    assert device["serial"] == serial
    benign_device = next(
        d for d in json_values(benign_argv, "-device") if d["driver"] != "virtio-scsi-pci"
    )
    assert set(device) == set(benign_device)
    assert [set(n) for n in nodes] == [set(n) for n in json_values(benign_argv, "-blockdev")]
    used("config → argv")


# Section: the TOML loaders


def toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; a lone surrogate is a TOML error)."""
    return json.dumps(value)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inject")


@settings(max_examples=300, deadline=None)
@given(
    file=paths,
    serial=serials,
    name=vm_names,
    cache=caches,
    roots=st.lists(paths, max_size=2),
    key=st.sampled_from(["file", "serial", "cache", "if", "nbd", "format"]),
)
def test_machine_toml_loads_or_refuses(
    workdir: Path, file: str, serial: str, name: str, cache: str, roots: list[str], key: str
) -> None:
    TRIED["machine TOML"] += 1
    text = (
        f"name = {toml_str(name)}\nimage-roots = [{', '.join(map(toml_str, roots))}]\n"
        f'[[drive]]\nfile = {toml_str(file)}\nformat = "qcow2"\nserial = {toml_str(serial)}\n'
        f"cache = {toml_str(cache)}\n"
    )
    path = workdir / "vm.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = cli_common.load_config(path, None)
    except BlockctlError:
        refused("machine TOML")
        return
    (drive,) = config.drives
    assert drive.file == workdir / file  # relative to the TOML file, or absolute as given
    assert drive.serial == serial and drive.cache.value == cache and config.name == name
    assert config.image_roots == tuple(workdir / r for r in roots)
    used("machine TOML")


@settings(max_examples=300, deadline=None)
@given(
    file=paths,
    device=st.one_of(st.none(), nasty),
    size=mostly(
        st.one_of(st.integers(0, 2**40), st.sampled_from(["64M", "1G", " 2 GiB ", "0"])),
        st.one_of(nasty, st.integers(min_value=-(2**65), max_value=2**65)),
    ),
    throttle=mostly(
        st.integers(0, 10**9),
        st.one_of(nasty, st.integers(min_value=-5, max_value=2**64), st.booleans()),
    ),
    shrink=mostly(st.booleans()),
)
def test_apply_file_loads_or_refuses(
    workdir: Path,
    file: str,
    device: str | None,
    size: str | int,
    throttle: str | int | bool,
    shrink: bool | str,
) -> None:
    TRIED["apply TOML"] += 1
    lines = ["[[drive]]", f"file = {toml_str(file)}", 'format = "raw"']
    if device is not None:
        lines.append(f"device = {toml_str(device)}")
    for key, value in (("size", size), ("allow-shrink", shrink)):
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {toml_str(str(value))}")
    tv = throttle
    literal = (
        ("true" if tv else "false")
        if isinstance(tv, bool)
        else str(tv)
        if isinstance(tv, int) and tv < 2**63
        else toml_str(str(tv))
    )
    lines.append(f"throttle = {{ bps_wr = {literal} }}")
    path = workdir / "drives.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        (desired,) = apply_ops.load_desired(path)
    except BlockctlError:
        refused("apply TOML")
        return
    assert desired.drive.file == workdir / file
    assert desired.device == device
    assert desired.size is not None and 0 <= desired.size < 2**63
    assert isinstance(desired.allow_shrink, bool)
    assert desired.throttle is not None and isinstance(desired.throttle["bps_wr"], int)
    used("apply TOML")


# Section: the command line, down to the library call


@contextlib.contextmanager
def structlog_restored() -> Iterator[None]:
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


class Reached(BlockctlError):
    """The CLI got as far as calling the library with what it parsed."""


def cli_main(argv: list[str]) -> int:
    with structlog_restored(), contextlib.redirect_stdout(io.StringIO()):
        return cli.main(argv)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vm=nasty, file=paths, fmt=formats, serial=serials, cache=caches)
# Found by this test: Python 3.11's argparse drops a "--" value and passed a list on.
@example(vm="", file="--", fmt="raw", serial="s", cache="none")
def test_cli_attach_passes_one_literal_drive(
    vm: str, file: str, fmt: str, serial: str, cache: str
) -> None:
    TRIED["CLI attach"] += 1
    seen: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def fake_attach(target: str, vm_name: str | None = None) -> AsyncIterator[object]:
        seen["vm"] = target
        yield object()

    async def fake_hotplug(_vm: object, drive: Drive, **_: object) -> None:
        seen["drive"] = drive
        raise Reached("stop here")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_drives, "attach", fake_attach)
        patch.setattr(drives_ops, "hotplug", fake_hotplug)
        # --opt=VALUE and "--" keep argparse from reading a value as an option.
        code = cli_main(
            ["attach", f"--format={fmt}", f"--serial={serial}", f"--cache={cache}", "--", vm, file]
        )
    assert code == 1  # a BlockctlError: refused, or Reached
    if "drive" not in seen:
        refused("CLI attach")
        return
    drive = seen["drive"]
    assert seen["vm"] == vm
    assert str(drive.file) == str(Path(file).absolute())
    assert (drive.format.value, drive.serial, drive.cache.value) == (fmt, serial, cache)
    used("CLI attach")


@settings(max_examples=250, deadline=None)
@given(
    command=mostly(st.from_regex(r"\A[a-z][a-z0-9-]{0,30}\Z")),
    arguments=st.one_of(
        st.none(),
        nasty,
        st.dictionaries(nasty, st.one_of(nasty, st.integers(), st.lists(nasty)), max_size=3).map(
            json.dumps
        ),
    ),
)
def test_cli_qmp_sends_one_literal_command(command: str, arguments: str | None) -> None:
    # argparse drops every "--" from the command line, so "--" cannot be an argument value.
    assume(arguments != "--")
    TRIED["CLI qmp"] += 1
    sent: list[tuple[str, object]] = []

    class FakeSession:
        async def execute(self, name: str, args: object = None) -> object:
            sent.append((name, args))
            return {}

    class FakeVM:
        async def command(self, name: str, args: Mapping[str, Any] | None) -> object:
            return await wire.raw_command(FakeSession(), name, args)  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def fake_attach(target: str, vm_name: str | None = None) -> AsyncIterator[FakeVM]:
        yield FakeVM()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_vm, "attach", fake_attach)
        argv = ["qmp", "--", "vm", command] + ([] if arguments is None else [arguments])
        code = cli_main(argv)
    if code == 1:
        assert sent == []
        refused("CLI qmp")
        return
    assert code == 0
    ((name, args),) = sent
    assert name == command and re.fullmatch(r"[A-Za-z0-9_-]+", name)
    assert args == (None if arguments is None else json.loads(arguments))
    used("CLI qmp")


def test_cli_usage_errors_are_argparse_exits() -> None:
    """What argparse itself refuses (an unknown option, a missing argument) exits with code 2
    and a usage line, before anything runs: the one refusal that is not a BlockctlError."""
    parser, _ = cli.build_parser()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["attach", "vm", "-x,read-only=on"])
    assert info.value.code == 2


# Section: names, tags, sizes


@settings(max_examples=300, deadline=None)
@given(tag=mostly(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,39}\Z")))
def test_snapshot_tags(tag: str) -> None:
    TRIED["snapshot tag"] += 1
    try:
        chains._check_tag(tag)
    except ConfigError:
        refused("snapshot tag")
        return
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", tag)
    used("snapshot tag")


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(
        nasty,
        st.integers(min_value=-(2**70), max_value=2**70),
        st.from_regex(r"\A\d{1,25}\s?[KMGTkmgt]?(i?B)?\Z"),
        st.from_regex(r"\A[0-9]{1,20}\s?[KMGTkmgt]?(i?B)?\Z"),
        st.floats(),
        st.none(),
        st.booleans(),
    )
)
def test_sizes(value: object) -> None:
    TRIED["size"] += 1
    try:
        size = parse_size(value)
    except ConfigError:
        refused("size")
        return
    assert isinstance(size, int) and 0 <= size < 2**63
    used("size")


@settings(max_examples=300, deadline=None)
@given(name=st.one_of(nasty, nasty, st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,31}\Z")))
def test_vm_names_never_leave_the_runtime_dir(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    TRIED["VM name"] += 1
    base = tmp_path_factory.getbasetemp() / "vmnames"
    root = base / "rt"
    if not root.exists():
        root.mkdir(parents=True, mode=0o700)
        # A decoy record one level up: `..` must not find it.
        (base / _runtime.RECORD).write_text(json.dumps({"name": "decoy"}))
    # Whatever the name, the lookup finds nothing (the decoy one level up included).
    with pytest.raises(VMNotFound):
        _runtime.read_record(name, root)
    try:
        MachineConfig(name=name)
    except ConfigError:
        refused("VM name")
        return
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name)
    used("VM name")


# Section: QMP arguments that crash QEMU


class RecordingSession:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    async def execute(self, name: str, args: object = None) -> object:
        self.sent.append((name, args))
        return {}


async def test_bitmap_merge_never_sends_an_empty_list() -> None:
    session = RecordingSession()
    s: Any = session
    with pytest.raises(ConfigError, match="at least one"):
        await wire.bitmap_merge(s, "drv0", "b0", [])
    with pytest.raises(ConfigError, match="at least one"):
        wire.bitmap_merge_action("drv0", "b0", ())
    with pytest.raises(ConfigError, match="at least one"):
        await wire.raw_command(
            s, "block-dirty-bitmap-merge", {"node": "drv0", "target": "b0", "bitmaps": []}
        )
    with pytest.raises(ConfigError, match="at least one"):
        await wire.raw_command(s, "block-dirty-bitmap-merge", None)
    sneaky = {
        "type": "block-dirty-bitmap-merge",
        "data": {"node": "n", "target": "t", "bitmaps": []},
    }
    with pytest.raises(ConfigError, match="at least one"):
        await wire.transaction(s, [sneaky])
    with pytest.raises(ConfigError, match="at least one"):
        await wire.raw_command(s, "transaction", {"actions": [sneaky]})
    assert session.sent == []
    await wire.bitmap_merge(s, "drv0", "b0", ["b1", "b2"])
    await wire.transaction(s, [wire.bitmap_merge_action("drv0", "b0", ["b1"])])
    assert session.sent == [
        ("block-dirty-bitmap-merge", {"node": "drv0", "target": "b0", "bitmaps": ["b1", "b2"]}),
        (
            "transaction",
            {
                "actions": [
                    {
                        "type": "block-dirty-bitmap-merge",
                        "data": {"node": "drv0", "target": "b0", "bitmaps": ["b1"]},
                    }
                ]
            },
        ),
    ]


def test_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """Print the figure, computed from the examples' checks; fails when no example ran."""
    total = sum(TRIED.values())
    assert total > 0, "no property example was tried: there is no figure to print"
    used_, refused_ = sum(USED.values()), sum(REFUSED.values())
    failed = total - used_ - refused_
    detail = ", ".join(
        f"{k} {TRIED[k]} ({USED[k]} used, {REFUSED[k]} refused)" for k in sorted(TRIED)
    )
    line = (
        f"injection property examples: {total} tried, {used_} used as one literal value "
        f"({100 * used_ / total:.0f}%), {refused_} refused with a BlockctlError, "
        f"{failed} escaped (failed a check) — {detail}"
    )
    report("injection", line)
    with capsys.disabled():
        print(f"\n{line}")
    assert failed == 0, line

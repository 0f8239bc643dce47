"""Untrusted images (issue 7 item 4, qemu-facts.md S1-S3 and T10), with real qemu-img, real
QEMU and the real guest.

Each malicious image below would make QEMU read a host file nobody named (a "host secret"
written by the test outside the images' directory). Each is refused at every entry point that
opens an image (launch, hot-plug, media insert), before QEMU opens anything: no node, device
or process is left. A raw disk that carries a qcow2 header is legal guest data: it attaches as
raw, and the guest reads the header bytes, never the host secret.

The last test checks and prints the figure: malicious images rejected.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from blockctl import GuestImage, LaunchedVM, open_vm
from blockctl._images import IMAGE_ROOTS_ENV, inspect_untrusted
from blockctl._ops import drives
from blockctl.errors import UntrustedImage
from blockctl.types import Drive, ImageFormat, Interface, Media
from tests.figures import Tally, report, require_any
from tests.integration.conftest import (
    MIB,
    base_config,
    pattern,
    raw_image,
    run,
    sha256,
    vm_in_background,
)

pytestmark = [pytest.mark.guest, pytest.mark.asyncio(loop_scope="module")]

SECRET = b"HOST-SECRET-4b1d7e0c\n"

#: Each (image, entry point) rejection, and which of its checks held.
REJECTED = Tally(
    {
        "rule": "refused with UntrustedImage by the rule expected",
        "nothing-opened": "no QEMU started, no node or device left",
    }
)
#: Each time the guest read the raw disk with a qcow2 header (at launch, at hot-plug).
RAW_READS = Tally(
    {
        "exact": "the guest read the file's bytes, header included",
        "no-secret": "the host secret not found in the device",
    }
)

# Each case: a file in the images directory and the format a user would declare for it.
CASES = (
    "backing-outside-roots",  # qcow2 backing = absolute path of the host secret
    "data-file",  # qcow2 external data file = a host file
    "json-backing",  # backing json:{"driver":"raw","file":{... the secret}}
    "nbd-backing",  # backing nbd:unix:/... (a protocol string)
    "dotdot-traversal",  # backing ../host/secret.txt
    "symlink-escape",  # backing is a symlink in the images dir pointing at the secret
    "no-backing-format",  # backing named without its format (QEMU would probe it)
    "second-layer-outside",  # top → mid (fine) → the secret
    "backing-loop",  # a → b → a
    "vmdk-flat-extent",  # a VMDK descriptor whose FLAT extent is the secret
    "raw-disk-with-qcow2-header",  # a guest-written header in a raw disk, declared qcow2
    "declared-format-mismatch",  # a raw file declared qcow2
)

#: Why each is refused (a regex on UntrustedImage.reason): the rule that caught it, not an
#: incidental failure.
WHY = {
    "backing-outside-roots": "outside the allowed roots",
    "data-file": "external data file",
    "json-backing": "protocol string",
    "nbd-backing": "protocol string",
    "dotdot-traversal": r"through '\.\.'\): outside the allowed roots",
    "symlink-escape": r"'innocent\.raw', which resolves to .*/host/secret\.txt: outside",
    "no-backing-format": "without its format",
    "second-layer-outside": r"mid\.qcow2 names backing file .* outside the allowed roots",
    "backing-loop": "loops",
    "vmdk-flat-extent": "extent .* outside the allowed roots",
    "raw-disk-with-qcow2-header": "outside the allowed roots",
    "declared-format-mismatch": "cannot read .* as qcow2: .*not in qcow2 format",
}


@dataclass
class Rig:
    vm: LaunchedVM
    root: Path
    images: Path
    secret: Path
    cases: dict[str, tuple[Path, ImageFormat]]
    raw_header_disk: Path  # the raw disk carrying a qcow2 header (drive 0 of the VM)

    async def sh(self, command: str) -> str:
        assert self.vm.console is not None
        return await self.vm.console.check(command)

    async def device_with_serial(self, serial: str) -> str:
        """/dev/vdX of a hot-plugged disk, once the guest has noticed it."""
        found = await self.sh(
            "for i in $(seq 100); do for d in /sys/block/vd*; do "
            f'[ "$(cat $d/serial 2>/dev/null)" = {serial} ] && echo ${{d##*/}} && exit 0; '
            "done; sleep 0.1; done; exit 1"
        )
        return f"/dev/{found.strip()}"


async def qemu_img(*args: str | Path) -> None:
    await run("qemu-img", *args)


async def build_cases(root: Path) -> tuple[Path, Path, dict[str, tuple[Path, ImageFormat]]]:
    """The host secret (outside the images dir) and one malicious image per case."""
    host = root / "host"
    host.mkdir()
    secret = await raw_image(host / "secret.txt", SECRET * 1024, MIB)
    images = root / "images"
    images.mkdir()
    q = ImageFormat.QCOW2
    cases: dict[str, tuple[Path, ImageFormat]] = {}

    def overlay(name: str) -> Path:
        cases[name] = (images / f"{name}.qcow2", q)
        return images / f"{name}.qcow2"

    async def create(path: Path, backing: str, fmt: str = "raw") -> None:
        # -u: the backing file is not opened; the header just names it (as a guest could).
        await qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, "1M")

    await create(overlay("backing-outside-roots"), str(secret))
    data_file = host / "data.raw"
    await qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}", overlay("data-file"), "1M"
    )
    data_file.write_bytes(SECRET * 1024)
    spec = {"driver": "raw", "file": {"driver": "file", "filename": str(secret)}}
    for name, backing in (
        ("json-backing", "json:" + json.dumps(spec)),
        ("nbd-backing", "nbd:unix:/tmp/not-a-socket"),
    ):
        await qemu_img("create", "-q", "-f", "qcow2", overlay(name), "1M")
        await qemu_img(
            "rebase",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "raw",
            images / f"{name}.qcow2",
        )
    await create(overlay("dotdot-traversal"), "../host/secret.txt")
    (images / "innocent.raw").symlink_to(secret)
    await create(overlay("symlink-escape"), "innocent.raw")
    # Inside the tree, but without a recorded format: erase the header extension that holds it,
    # as in images from before QEMU 6.1.
    legacy = overlay("no-backing-format")
    await raw_image(images / "plain-base.raw", b"", MIB)
    await create(legacy, "plain-base.raw")
    header = bytearray(legacy.read_bytes())
    at = header.find(b"\xe2\x79\x2a\xca")
    assert at > 0
    header[at : at + 4] = b"\0\0\0\0"
    legacy.write_bytes(bytes(header))
    await create(images / "mid.qcow2", str(secret))
    await create(overlay("second-layer-outside"), "mid.qcow2", "qcow2")
    loop_b = images / "loop-b.qcow2"
    await qemu_img("create", "-q", "-f", "qcow2", loop_b, "1M")
    await create(overlay("backing-loop"), str(loop_b), "qcow2")
    await qemu_img(
        "rebase",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        images / "backing-loop.qcow2",
        "-F",
        "qcow2",
        loop_b,
    )
    vmdk = images / "vmdk-flat-extent.vmdk"
    vmdk.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\nRW 2048 FLAT "../host/secret.txt" 0\n\n'
        'ddb.adapterType = "ide"\n'
    )
    cases["vmdk-flat-extent"] = (vmdk, ImageFormat.VMDK)
    # What a guest can write into its raw disk: a qcow2 header whose backing file is a host
    # file, followed by whatever data.
    header_src = root / "header.qcow2"
    await create(header_src, str(secret))
    raw_header = images / "guest-disk.raw"
    await raw_image(raw_header, header_src.read_bytes() + pattern(5, MIB), 4 * MIB)
    cases["raw-disk-with-qcow2-header"] = (raw_header, q)
    plain = await raw_image(images / "plain.raw", pattern(6, MIB))
    cases["declared-format-mismatch"] = (plain, q)
    assert set(cases) == set(CASES) == set(WHY)
    return secret, images, cases


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(
    guest: GuestImage, tmp_path_factory: pytest.TempPathFactory, module_runtime_dir: Path
) -> AsyncIterator[Rig]:
    root = tmp_path_factory.mktemp("untrusted")
    secret, images, cases = await build_cases(root)
    raw_header_disk = cases["raw-disk-with-qcow2-header"][0]
    config = base_config(
        guest,
        # Declared raw, as the disk it is: the guest sees the header bytes as data.
        Drive(file=raw_header_disk, format=ImageFormat.RAW, serial="RAWHDR", read_only=True),
        Drive(file=None, media=Media.CDROM, interface=Interface.IDE),
    )
    async with vm_in_background(config) as vm:
        yield Rig(
            vm=vm,
            root=root,
            images=images,
            secret=secret,
            cases=cases,
            raw_header_disk=raw_header_disk,
        )


async def state(vm: LaunchedVM) -> tuple[set[str], set[str]]:
    """Node names and device ids: a refused operation changes neither."""
    nodes = {n.node_name for n in await vm.block_nodes()}
    devices = {d.device_id or d.device for d in await vm.block_devices()}
    return nodes, devices


@pytest.mark.parametrize("case", CASES)
async def test_rejected_at_launch(
    case: str, rig: Rig, guest: GuestImage, runtime_dir: Path
) -> None:
    path, fmt = rig.cases[case]
    config = base_config(guest, Drive(file=path, format=fmt, read_only=True))
    with REJECTED.case(f"{case}@launch") as ok:
        with pytest.raises(UntrustedImage) as info:
            async with open_vm(config):
                pass
        assert info.value.field == "drive[0].file"
        assert re.search(WHY[case], info.value.reason), info.value.reason
        ok.add("rule")
        assert list(runtime_dir.iterdir()) == []  # QEMU never started
        ok.add("nothing-opened")


@pytest.mark.parametrize("case", CASES)
async def test_rejected_at_hotplug(case: str, rig: Rig) -> None:
    path, fmt = rig.cases[case]
    with REJECTED.case(f"{case}@hotplug") as ok:
        before = await state(rig.vm)
        with pytest.raises(UntrustedImage) as info:
            await drives.hotplug(rig.vm, Drive(file=path, format=fmt, read_only=True))
        assert info.value.field == "file"
        assert re.search(WHY[case], info.value.reason), info.value.reason
        ok.add("rule")
        assert await state(rig.vm) == before
        ok.add("nothing-opened")


@pytest.mark.parametrize("case", CASES)
async def test_rejected_at_media_insert(case: str, rig: Rig) -> None:
    path, fmt = rig.cases[case]
    with REJECTED.case(f"{case}@media") as ok:
        before = await state(rig.vm)
        with pytest.raises(UntrustedImage) as info:
            await drives.insert(rig.vm, "disk1", path, fmt)
        assert re.search(WHY[case], info.value.reason), info.value.reason
        ok.add("rule")
        assert await state(rig.vm) == before
        (cdrom,) = [d for d in await rig.vm.block_devices() if d.device_id == "disk1"]
        assert cdrom.inserted is None
        ok.add("nothing-opened")


async def guest_reads_raw_bytes(rig: Rig, dev: str) -> None:
    """The guest reads exactly the host file's bytes (header included), never the secret."""
    with RAW_READS.case(dev) as ok:
        expected = rig.raw_header_disk.read_bytes()
        got = await rig.sh(f"dd if={dev} bs=1M count=4 2>/dev/null | sha256sum")
        assert got.split()[0] == sha256(expected)
        magic = await rig.sh(f"dd if={dev} bs=4 count=1 2>/dev/null | od -An -tx1")
        assert magic.split() == ["51", "46", "49", "fb"]  # "QFI\xfb": the header, as data
        ok.add("exact")
        leak = await rig.sh(f"grep -c {SECRET.decode().strip()} {dev} || true")
        assert leak.strip() == "0"
        ok.add("no-secret")


async def test_raw_disk_with_a_qcow2_header_is_data_at_launch(rig: Rig) -> None:
    await guest_reads_raw_bytes(rig, "/dev/vda")
    (node,) = [n for n in await rig.vm.block_nodes() if n.node_name == "drv0"]
    assert node.driver == "raw"


async def test_raw_disk_with_a_qcow2_header_is_data_at_hotplug(rig: Rig) -> None:
    with capture_logs() as logs:
        info = await drives.hotplug(
            rig.vm,
            Drive(file=rig.raw_header_disk, format=ImageFormat.RAW, read_only=True, serial="H2"),
        )
    assert [e["header"] for e in logs if e["event"] == "blockctl.image.raw_with_header"] == [
        "qcow2"
    ]
    try:
        assert [n.driver for n in info.chain] == ["raw"]
        await guest_reads_raw_bytes(rig, await rig.device_with_serial("H2"))
    finally:
        await drives.unplug(rig.vm, info.device_id)


async def test_allowed_roots_admit_a_trusted_backing_directory(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backing file outside the image's tree is fine once its directory is an allowed root:
    from $BLOCKCTL_IMAGE_ROOTS, or from the caller (MachineConfig.image_roots, hotplug's
    image_roots)."""
    shared = rig.root / "shared"
    shared.mkdir()
    data = pattern(9, MIB)
    base = await raw_image(shared / "base.raw", data, 2 * MIB)
    top = rig.images / "uses-shared.qcow2"
    await qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    with pytest.raises(UntrustedImage, match="outside the allowed roots"):
        await inspect_untrusted(top, ImageFormat.QCOW2)
    chain = await inspect_untrusted(top, ImageFormat.QCOW2, roots=[shared])
    assert [(layer.filename, layer.format) for layer in chain] == [
        (str(top), ImageFormat.QCOW2),
        (str(base), ImageFormat.RAW),
    ]
    monkeypatch.setenv(IMAGE_ROOTS_ENV, f"/nonexistent:{shared}")
    assert len(await inspect_untrusted(top, ImageFormat.QCOW2)) == 2
    monkeypatch.delenv(IMAGE_ROOTS_ENV)
    info = await drives.hotplug(
        rig.vm, Drive(file=top, format=ImageFormat.QCOW2, serial="SHARED"), image_roots=[shared]
    )
    try:
        assert [n.file for n in info.chain] == [str(top), str(base)]
        dev = await rig.device_with_serial("SHARED")
        got = await rig.sh(f"dd if={dev} bs=1M count=1 2>/dev/null | sha256sum")
        assert got.split()[0] == sha256(data)
    finally:
        await drives.unplug(rig.vm, info.device_id)


@pytest.mark.parametrize(
    "name",
    ["a,b=c:d é ☃.qcow2", 'json:{"driver":"raw"}.qcow2', "nbd:unix:x,read-only=on.qcow2"],
)
async def test_odd_filenames_attach_as_themselves(rig: Rig, name: str) -> None:
    """Item 5, end to end: commas, '=', ':', unicode and protocol-looking names are one literal
    file name (given as an absolute path), which the node's ``file`` equals."""
    path = rig.images / name
    await qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    info = await drives.hotplug(rig.vm, Drive(file=path, format=ImageFormat.QCOW2))
    try:
        assert info.file == str(path)
        assert info.read_only is False
    finally:
        await drives.unplug(rig.vm, info.device_id)


async def test_figures(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    """Every selected rejection test ran its case; print the figure, computed from the
    cases' checks (fails when none ran)."""
    selected = [
        item
        for item in request.session.items
        if item.path == request.path and item.name.startswith("test_rejected_")
    ]
    REJECTED.require_cases(len(selected))
    require_any(REJECTED)
    passed = [c.rsplit("@", 1) for c in REJECTED.complete()]
    line = (
        f"untrusted images: {len(passed)} malicious-image openings rejected "
        f"({len({c for c, _ in passed})} images x {len({e for _, e in passed})} entry points): "
        f"{REJECTED.summary()}: {REJECTED.phrases()}"
    )
    if RAW_READS.tried:
        line += (
            f"; a raw disk carrying a qcow2 header, read by the guest: {RAW_READS.summary()}: "
            f"{RAW_READS.phrases()}"
        )
    report("untrusted images", line)
    with capsys.disabled():  # shown in the suite's output, whatever the capture mode
        print(f"\n{line}")

"""The qemu-img wrapper against real qemu-img: explicit formats, typed results, progress."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from blockctl import _images
from blockctl.errors import ConfigError, ProcessFailed
from blockctl.types import ImageFormat
from tests.integration.conftest import MIB, image_bytes, pattern, qcow2_image, raw_image, run

QCOW2, RAW = ImageFormat.QCOW2, ImageFormat.RAW


async def chain(images: Path) -> tuple[Path, Path, Path, bytes]:
    """base.raw ← mid.qcow2 ← top.qcow2; base holds a pattern, top 0x5a from 1 MiB to 2 MiB."""
    base_data = pattern(1, 2 * MIB)
    base = await raw_image(images / "base.raw", base_data, 8 * MIB)
    mid, top = images / "mid.qcow2", images / "top.qcow2"
    await _images.create(mid, QCOW2, backing=base, backing_format=RAW)
    await _images.create(top, QCOW2, backing=mid, backing_format=QCOW2)
    await run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {MIB} {MIB}", top)
    return base, mid, top, base_data


async def test_info_reads_the_chain_with_formats(images: Path) -> None:
    base, mid, top, *_ = await chain(images)
    layers = await _images.info(top, QCOW2, backing_chain=True)
    assert [(i.filename, i.format) for i in layers] == [
        (str(top), "qcow2"),
        (str(mid), "qcow2"),
        (str(base), "raw"),
    ]
    assert layers[0].backing_format == "qcow2"
    assert layers[1].backing_filename == str(base)
    limited = await _images.info(top, QCOW2, untrusted=True)  # under prlimit
    assert limited[0].virtual_size == 8 * MIB


async def test_info_refuses_a_wrong_declared_format(images: Path) -> None:
    raw = await raw_image(images / "r.raw", pattern(3, MIB))
    with pytest.raises(ProcessFailed, match="qcow2"):
        await _images.info(raw, QCOW2)


async def test_info_parses_the_qemu_10_shape() -> None:
    # QEMU 10.0 adds a "children" list; the parser ignores what it does not need.
    obj = {
        "filename": "/x.qcow2",
        "format": "qcow2",
        "virtual-size": 1,
        "actual-size": 2,
        "dirty-flag": False,
        "children": [{"name": "file", "info": {"filename": "/x.qcow2"}}],
        "format-specific": {
            "type": "qcow2",
            "data": {
                "corrupt": False,
                "bitmaps": [{"name": "bm0", "granularity": 65536, "flags": ["auto"]}],
            },
        },
    }
    parsed = _images.ImageInfo.from_info(obj)
    assert parsed.bitmaps == ("bm0",)
    assert parsed.backing_filename is None


async def test_commit_with_progress_and_check(images: Path) -> None:
    _base, mid, top, _ = await chain(images)
    before = await image_bytes(top, "qcow2", 4 * MIB)
    seen: list[float] = []
    await _images.commit(top, QCOW2, progress=seen.append)
    assert seen
    assert seen[-1] == 100.0
    # The data of the top layer is now in mid: mid reads what top read.
    assert await image_bytes(mid, "qcow2", 4 * MIB) == before
    result = await _images.check(mid, QCOW2)
    assert result.clean
    assert not result.corrupt


async def test_check_reports_leaks(images: Path) -> None:
    image = await qcow2_image(images / "leak.qcow2", pattern(4, MIB), 4 * MIB)
    assert (await _images.check(image, QCOW2)).clean
    # Leak a cluster by hand: drop the L2 entry of the first data cluster. Its refcount stays
    # 1 with no reference left: a leaked cluster (qemu-img check exit code 3), not corruption.
    with open(image, "r+b") as f:
        header = f.read(48)
        (l1_offset,) = struct.unpack(">Q", header[40:48])
        f.seek(l1_offset)
        (l1_entry,) = struct.unpack(">Q", f.read(8))
        l2_offset = l1_entry & 0x00FF_FFFF_FFFF_FE00
        assert l2_offset, "the first L1 entry points at no L2 table"
        f.seek(l2_offset)
        assert struct.unpack(">Q", f.read(8))[0] != 0, "the first cluster is not allocated"
        f.seek(l2_offset)
        f.write(bytes(8))
    result = await _images.check(image, QCOW2)
    assert (result.returncode, result.leaks, result.corruptions) == (3, 1, 0), result
    assert not result.corrupt and not result.clean


async def test_rebase_convert_compare_map_measure(images: Path) -> None:
    base, _mid, top, _ = await chain(images)
    flat = images / "flat.qcow2"
    await _images.convert(top, QCOW2, flat, QCOW2, compress=True, options={"cluster_size": "65536"})
    assert await _images.compare(top, QCOW2, flat, QCOW2)
    (flat_info,) = await _images.info(flat, QCOW2)
    assert flat_info.backing_filename is None
    # Rebase top directly onto base (safe mode copies what mid contributed).
    await _images.rebase(top, QCOW2, base, RAW)
    (top_info,) = await _images.info(top, QCOW2)
    assert top_info.backing_filename == str(base)
    assert await _images.compare(top, QCOW2, flat, QCOW2)
    other = await raw_image(images / "other.raw", pattern(9, 8 * MIB))
    assert not await _images.compare(top, QCOW2, other, RAW)
    extents = await _images.map_extents(top, QCOW2)
    assert any(e.data and e.depth == 0 for e in extents)
    assert sum(e.length for e in extents) == 8 * MIB
    needed = await _images.measure(QCOW2, size=1 << 30)
    assert needed.fully_allocated > 1 << 30 > needed.required
    with pytest.raises(ConfigError):
        await _images.rebase(top, QCOW2, base, None)


async def test_resize_and_internal_snapshots(images: Path) -> None:
    image = await qcow2_image(images / "s.qcow2", pattern(5, MIB), 8 * MIB)
    await _images.resize(image, QCOW2, 16 * MIB)
    assert (await _images.info(image, QCOW2))[0].virtual_size == 16 * MIB
    with pytest.raises(ProcessFailed, match="shrink"):
        await _images.resize(image, QCOW2, 4 * MIB)
    await _images.resize(image, QCOW2, 4 * MIB, shrink=True)
    snaps = await _images.snapshot(image, "create", "before")
    assert [s.name for s in snaps] == ["before"]
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", image)
    await _images.snapshot(image, "apply", "before")
    assert await image_bytes(image, "qcow2", MIB) == pattern(5, MIB)
    assert await _images.snapshot(image, "delete", "before") == ()
    with pytest.raises(ConfigError):
        await _images.snapshot(image, "create")


async def test_create_never_leaves_a_backing_without_format(images: Path) -> None:
    base = await raw_image(images / "b.raw", b"", MIB)
    with pytest.raises(ConfigError):
        await _images.create(images / "o.qcow2", QCOW2, backing=base)
    raw_json = await run("qemu-img", "info", "-f", "raw", "--output=json", base)
    assert json.loads(raw_json)["format"] == "raw"


async def test_cli_img(images: Path) -> None:
    from tests.integration.test_attach_cli import cli

    image = images / "c, 1.qcow2"
    await cli("img", "create", image, "32M", "-f", "qcow2")
    info = json.loads((await cli("img", "info", image, "-f", "qcow2", "--json")).stdout)
    assert info[0]["virtual_size"] == 32 * MIB
    assert (
        json.loads((await cli("img", "check", image, "-f", "qcow2", "--json")).stdout)["returncode"]
        == 0
    )
    await cli("img", "snapshot", image, "create", "t1")
    listed = json.loads((await cli("img", "snapshot", image, "list", "--json")).stdout)
    assert [s["name"] for s in listed] == ["t1"]
    flat = images / "flat.raw"
    await cli("img", "convert", image, flat, "-f", "qcow2", "-O", "raw")
    assert (await cli("img", "compare", image, flat, "-f", "qcow2", "-F", "raw")).returncode == 0
    other = await raw_image(images / "other.raw", pattern(8, MIB), 32 * MIB)
    differ = await cli("img", "compare", image, other, "-f", "qcow2", "-F", "raw", check=False)
    assert differ.returncode == 4  # ExitCode.DIFFERENT
    assert differ.stdout.strip() == "different"
    bad = await cli("img", "info", image, "-f", "qcow3", check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("blockctl: ConfigError: format: 'qcow3' is not one of")
    missing_format = await cli("img", "info", image, check=False)
    assert missing_format.returncode == 2  # argparse: -f is required, no probing

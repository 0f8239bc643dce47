"""`blockctl restore` onto a remote image: an iSCSI LUN on a real tgtd (loopback).

Before, a URL as the destination was refused and the way out was a restore into a local file
(a scratch copy of the whole disk), then `qemu-img convert -n` by hand. Now QEMU's own
initiator writes the LUN from the point's NBD export (each chunk verified as it is served).
The reference is the disk's bytes the point was made of; the LUN's backing file is read after
the restore. (NFS: `test_storage_nfs.py`, whose server lives in its own network namespace.)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from blockctl._backup import operations
from blockctl.errors import BlockctlError, ConfigError
from blockctl.types import ImageFormat
from tests.integration.test_restore_killed import make_point
from tests.integration.test_storage_iscsi import LUN_SIZE, TARGET, Tgt, tgt  # noqa: F401 (tgt: the fixture)
from tests.unit.test_repository_store import VM


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_point_restored_onto_a_lun_from_the_command_line(
    tgt: Tgt,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A point as large as the LUN, its second chunk zeros: the LUN (which held a pattern)
    then holds exactly the disk, zeros included; the output names the LUN by its URL."""
    repo, point, disk = make_point(tmp_path, chunks=LUN_SIZE // (4 << 20), zero=1)
    assert len(disk) == LUN_SIZE and sha(tgt.backing[1].read_bytes()) != sha(disk)
    url = f"iscsi://{tgt.portal}/{TARGET}/2"
    cli = await anyio.run_process(
        [sys.executable, "-m", "blockctl", "restore", "--json", "--repo", str(repo.path),
         "-O", "raw", VM, point, "disk0", url],
        check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr.decode()
    said = json.loads(cli.stdout)
    assert said["restored"] == url and said["chunks_verified"] == 3
    assert said["bytes_written"] == len(disk) - repo.chunk_size
    assert sha(tgt.backing[1].read_bytes()) == sha(disk)
    assert not Path("iscsi:").exists()  # no local path made of the URL


async def test_a_lun_too_small_or_qcow2_is_refused_before_anything_is_written(
    tgt: Tgt,  # noqa: F811
    tmp_path: Path,
) -> None:
    repo, point, _ = make_point(tmp_path, chunks=LUN_SIZE // (4 << 20) + 1, zero=1)
    before = tgt.backing[1].read_bytes()
    lun = tgt.source(2)
    with pytest.raises(ConfigError) as refused:
        await operations.restore(repo, VM, point, "disk0", lun, ImageFormat.RAW)
    said = str(refused.value)
    assert lun.url in said and "nothing was written" in said and "grow it" in said
    with pytest.raises(ConfigError, match="a LUN is written raw"):
        await operations.restore(repo, VM, point, "disk0", lun, ImageFormat.QCOW2)
    assert sha(tgt.backing[1].read_bytes()) == sha(before)


async def test_a_damaged_chunk_fails_the_restore_and_leaves_the_luns_start_zeros(
    tgt: Tgt,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A chunk altered in the repository: nbdkit answers EIO for it, the restore fails saying
    the LUN is partly written, and the LUN's first chunk is zeros (written last), so what is
    on the LUN is not taken for the disk."""
    repo, point, disk = make_point(tmp_path, chunks=LUN_SIZE // (4 << 20), zero=1)
    digest = repo.read_index(VM, point, "disk0").at(2).hex()
    path = repo.path / "chunks" / digest[:2] / digest
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(BlockctlError) as failed:
        await operations.restore(repo, VM, point, "disk0", tgt.source(2), ImageFormat.RAW)
    said = str(failed.value)
    assert "reading the point failed" in said and "blockctl backup verify" in said
    assert f"{tgt.source(2).url} is partly written" in said
    lun = tgt.backing[1].read_bytes()
    # Digests, not bytes: pytest would diff two 4 MiB values for minutes on a failure.
    assert sha(lun[: repo.chunk_size]) == sha(bytes(repo.chunk_size))
    third = slice(2 * repo.chunk_size, 3 * repo.chunk_size)
    assert sha(lun[third]) != sha(disk[third])


async def test_a_chap_lun_from_the_command_line_the_password_only_in_its_file(
    tgt: Tgt,  # noqa: F811
    tmp_path: Path,
) -> None:
    """CHAP bound on the target: the CLI's --chap-user/--chap-password-file reach the LUN
    (QEMU reads the password from the file: a `secret` object naming the file); a wrong
    password is QEMU's "Authentication failure" with nothing written; the password is in no
    output; the iSCSI options with a local path, and --live onto an NFS image, are refused."""
    password = "chap-secret-7a2d9b10"  # tgt: 12-16 characters for iSCSI CHAP
    tgt.admin("--lld", "iscsi", "--op", "new", "--mode", "account", "--user", "eve",
              "--password", password)  # fmt: skip
    tgt.admin("--lld", "iscsi", "--op", "bind", "--mode", "account", "--tid", "1",
              "--user", "eve")  # fmt: skip
    good, wrong = tmp_path / "good", tmp_path / "wrong"
    for path, text in ((good, password), (wrong, "not-the-password")):
        path.write_text(text)
        path.chmod(0o600)
    repo, point, disk = make_point(tmp_path, chunks=LUN_SIZE // (4 << 20), zero=1)
    before = tgt.backing[1].read_bytes()
    url = f"iscsi://{tgt.portal}/{TARGET}/2"

    async def restore(*extra: str) -> Any:
        return await anyio.run_process(
            [sys.executable, "-m", "blockctl", "restore", "--repo", str(repo.path), "-O", "raw",
             VM, point, "disk0", *extra],
            check=False,
        )  # fmt: skip

    refused = await restore(url, "--chap-user", "eve", "--chap-password-file", str(wrong))
    assert refused.returncode == 1 and "Authentication failure" in refused.stderr.decode()
    assert sha(tgt.backing[1].read_bytes()) == sha(before)
    done = await restore(url, "--chap-user", "eve", "--chap-password-file", str(good))
    assert done.returncode == 0, done.stderr.decode()
    assert sha(tgt.backing[1].read_bytes()) == sha(disk)
    for run in (refused, done):
        assert password not in (run.stdout + run.stderr).decode()
    local = await restore(str(tmp_path / "new.raw"), "--chap-user", "eve")
    assert local.returncode == 1 and "chap-user" in local.stderr.decode()
    assert not (tmp_path / "new.raw").exists()
    # An NFS image is a live-restore target now (issue 18, test_live_restore_nfs.py): the URL
    # is taken, and the command goes on to the VM to attach to.
    live = await restore("nfs://127.0.0.1/export/x.raw", "--live", "--attach", "nosuchvm")
    assert live.returncode == 1 and "nosuchvm" in live.stderr.decode(), live.stderr.decode()
    assert "NFS image" not in live.stderr.decode()

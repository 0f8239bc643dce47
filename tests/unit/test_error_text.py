"""Errors that explain (issue 16, defect 8): a failed helper's error leads with its reason and
the errno's name, and the command line prints that, not the last line of its JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl import _images
from blockctl.errors import ProcessFailed, errno_name
from tests.unit.test_injection import cli_main

CHECK_ARGV = ["qemu-img", "check", "-f", "qcow2", "--output=json", "/img/c.qcow2"]
# What qemu-img check prints when the check itself fails (qemu-img.c, img_check): the JSON
# report on stdout, the reason on stderr, exit code 1.
CHECK_STDOUT = (
    '{\n    "check-errors": 1,\n    "filename": "/img/c.qcow2",\n    "format": "qcow2"\n}\n'
)
CHECK_STDERR = "qemu-img: Check failed: Input/output error\n"


def test_process_failed_leads_with_the_reason_and_errno() -> None:
    exc = ProcessFailed(CHECK_ARGV, 1, CHECK_STDOUT, CHECK_STDERR)
    assert exc.reason == "qemu-img: Check failed: Input/output error"
    assert exc.errno == "EIO"
    head = str(exc).splitlines()[0]
    assert head == (
        "qemu-img check exited with code 1: qemu-img: Check failed: Input/output error (EIO)"
    )


def test_process_failed_behind_prlimit_names_qemu_img() -> None:
    argv = ["prlimit", "--cpu=30", "--as=1073741824", "qemu-img", "info", "-f", "raw", "x"]
    exc = ProcessFailed(argv, 1, "", "qemu-img: Could not open 'x': No such file or directory\n")
    assert str(exc).startswith("qemu-img info exited with code 1: ")
    assert exc.errno == "ENOENT"


def test_errno_names() -> None:
    assert errno_name("error while writing at byte 0: No space left on device") == "ENOSPC"
    assert errno_name("Permission denied") == "EACCES"
    assert errno_name("nothing to see") is None


def test_cli_prints_the_reason_not_the_json_tail(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def failing_check(path: Path, fmt: object) -> object:
        raise ProcessFailed(CHECK_ARGV, 1, CHECK_STDOUT, CHECK_STDERR)

    monkeypatch.setattr(_images, "check", failing_check)
    assert cli_main(["img", "check", "/img/c.qcow2", "-f", "qcow2"]) == 1  # logging restored
    err = capsys.readouterr().err
    assert err == (
        "blockctl: ProcessFailed: qemu-img check exited with code 1: "
        "qemu-img: Check failed: Input/output error (EIO)\n"
    )

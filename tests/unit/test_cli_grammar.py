"""The command line's grammar: global options anywhere, usage errors in JSON, exit codes,
a closed pipe. Run as a user runs it: ``python -m blockctl`` in another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockctl._cli.common import EXIT_CODES_HELP, ExitCode
from blockctl._cli.main import build_parser


def blockctl(
    *args: str, runtime: Path, stdout: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BLOCKCTL_RUNTIME_DIR": str(runtime)}
    return subprocess.run(
        [sys.executable, "-m", "blockctl", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    "argv", [["--json", "ls"], ["ls", "--json"], ["-v", "ls", "--json"], ["ls", "--json", "-v"]]
)
def test_global_options_before_or_after_the_command(tmp_path: Path, argv: list[str]) -> None:
    done = blockctl(*argv, runtime=tmp_path / "rt")
    assert done.returncode == ExitCode.OK, done.stderr
    assert json.loads(done.stdout) == []
    assert ("blockctl.cli.done" in done.stderr) == ("-v" in argv)


@pytest.mark.parametrize("argv", [["bogus", "--json"], ["attach", "--json"], ["--json", "ls", "x"]])
def test_usage_errors_exit_2_with_json_under_json(tmp_path: Path, argv: list[str]) -> None:
    done = blockctl(*argv, runtime=tmp_path / "rt")
    assert done.returncode == ExitCode.USAGE
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "UsageError" and error["message"]
    assert "usage: blockctl" in done.stderr


def test_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte: `blockctl ... | head` at once
    try:
        done = blockctl("ls", "--json", runtime=tmp_path / "rt", stdout=write)
    finally:
        os.close(write)
    assert done.returncode == ExitCode.BROKEN_PIPE
    assert done.stderr == ""


def test_the_exit_code_table_names_every_code() -> None:
    parser, _ = build_parser()
    assert EXIT_CODES_HELP in parser.format_help()
    listed = {int(line.split()[0]) for line in EXIT_CODES_HELP.splitlines()[1:] if line[:3].strip()}
    assert listed == {c.value for c in ExitCode} - {ExitCode.BROKEN_PIPE}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert EXIT_CODES_HELP in readme


def test_the_readme_command_reference_is_the_parser() -> None:
    """README's command table is ``command_reference()``: every command and sub-action, with
    its arguments. Regenerate it when a command changes."""
    from pathlib import Path

    from blockctl._cli.main import command_reference

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert command_reference() in readme, "paste blockctl._cli.main.command_reference()"


def test_nested_commands_take_the_global_options_after_their_action(tmp_path: Path) -> None:
    """``img info X -v --log-json`` and ``backup list VM --repo R -v`` (the nested parsers once
    knew only --json, and refused -v after the action as a usage error)."""
    image = tmp_path / "x.raw"
    image.write_bytes(bytes(65536))
    done = blockctl("img", "info", str(image), "-f", "raw", "--json", "-v", "--log-json",
                    runtime=tmp_path / "rt")  # fmt: skip
    assert done.returncode == ExitCode.OK, done.stderr
    assert json.loads(done.stdout)[0]["virtual_size"] == 65536
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert "blockctl.cli.done" in [e["event"] for e in events]
    repo = tmp_path / "repo"
    assert blockctl("backup", "init", "--repo", str(repo), runtime=tmp_path / "rt").returncode == 0
    listed = blockctl("backup", "list", "vm1", "--repo", str(repo), "-v", "--json",
                      runtime=tmp_path / "rt")  # fmt: skip
    assert listed.returncode == ExitCode.OK, listed.stderr
    assert json.loads(listed.stdout) == []
    assert "blockctl.cli.done" in listed.stderr

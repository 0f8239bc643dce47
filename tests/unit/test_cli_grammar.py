"""The command line's grammar: global options anywhere, usage errors in JSON, exit codes,
a closed pipe. Run as a user runs it: ``python -m blockctl`` in another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockctl._cli.main import EXIT_CODES_HELP, ExitCode, build_parser


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

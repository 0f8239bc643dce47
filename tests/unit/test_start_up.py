"""Start-up: ``import blockctl`` and the short commands import only what they use (issue 15,
item 6). Checked by the modules a fresh process has executed, not by timing: the figures are
``scripts/bench cli``'s (README, "Start-up").

The commands run as ``blockctl`` runs them, in a fresh interpreter; ``loaded`` lists the
modules that process executed (a module ``blockctl._lazy.module`` registered but nobody read
does not count: it was not imported).
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockctl import _log

ROOT = Path(__file__).resolve().parents[2]

#: What a command that shows a VM or the version has no use for: structlog and its console
#: renderer (rich), backups (and their repository code), chains, apply, recovery, the guest
#: builder, the job driver, the guest agent (``status`` reads its freeze records only when
#: there is one), TOML (read only from a config file), the other commands' modules.
HEAVY = (
    "structlog",
    "structlog.dev",
    "rich",
    "blockctl.backup",
    "blockctl._backup.operations",
    "blockctl._backup.store",
    "blockctl._backup.control",
    "blockctl._ops.chains",
    "blockctl._ops.apply",
    "blockctl._ops.recovery",
    "blockctl._ops.vm_recovery",
    "blockctl._guest",
    "blockctl._jobs",
    "blockctl._agent",
    "tomllib",
    "blockctl._cli.backup",
    "blockctl._cli.chains",
    "blockctl._cli.jobs",
    "blockctl._cli.agent",
    "blockctl._cli.img",
    "blockctl._cli.fleet",
)

#: What parsing alone needs none of: ``--version`` (and help, a usage error) imports no
#: command module, no event loop, no library module but the package itself.
NOT_FOR_PARSING = (
    "anyio",
    "asyncio",
    "qemu.qmp",
    "blockctl.errors",
    "blockctl.types",
    "blockctl._machine",
    "blockctl._qmp.models",
    "blockctl._cli.interrupt",
    "blockctl._cli.vm",
    "blockctl._cli.drives",
    "importlib.metadata",
)

#: Runs ``blockctl ARGV`` (or, with no ARGV, only ``import blockctl._cli.main``), then prints
#: the executed modules as JSON on the last line of stderr.
REPORT_MODULES = """
import json, sys, types
try:
    if len(sys.argv) > 1:
        from blockctl._cli.main import main
        code = main(sys.argv[1:])
    else:
        import blockctl._cli.main
        code = 0
except SystemExit as exc:
    code = exc.code
loaded = sorted(n for n, m in list(sys.modules.items()) if type(m) is types.ModuleType)
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


def run(*argv: str, runtime: Path) -> tuple[str, int, set[str]]:
    """stdout, exit code and executed modules of ``blockctl ARGV`` in a fresh process."""
    env = {**os.environ, "BLOCKCTL_RUNTIME_DIR": str(runtime), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", REPORT_MODULES, *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    report = json.loads(done.stderr.splitlines()[-1])
    return done.stdout, report["code"], set(report["loaded"])


def test_the_cli_module_imports_nothing_heavy(tmp_path: Path) -> None:
    _, code, loaded = run(runtime=tmp_path / "rt")
    assert code == 0
    assert "blockctl._cli.main" in loaded
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    assert loaded.isdisjoint(NOT_FOR_PARSING), sorted(loaded & set(NOT_FOR_PARSING))


def test_version_imports_nothing_heavy(tmp_path: Path) -> None:
    from importlib.metadata import version

    out, code, loaded = run("--version", runtime=tmp_path / "rt")
    assert (out, code) == (f"blockctl {version('blockctl')}\n", 0)
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    assert loaded.isdisjoint(NOT_FOR_PARSING), sorted(loaded & set(NOT_FOR_PARSING))
    out, code, _ = run("--version", "--json", runtime=tmp_path / "rt")
    assert (json.loads(out), code) == ({"version": version("blockctl")}, 0)


def test_ls_imports_nothing_heavy(tmp_path: Path) -> None:
    out, code, loaded = run("ls", "--json", runtime=tmp_path / "rt")
    assert (json.loads(out), code) == ([], 0)
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    assert "importlib.metadata" not in loaded  # only --version asks for it


def test_a_command_still_imports_what_it_uses(tmp_path: Path) -> None:
    """The lazy modules are imported when a command reads them (here `backup init`)."""
    repo = tmp_path / "repo"
    out, code, loaded = run("backup", "init", "--repo", str(repo), "--json", runtime=tmp_path)
    assert code == 0, out
    assert json.loads(out)["repository"] == str(repo)
    assert (repo / "config.json").is_file()
    assert {"blockctl.backup", "blockctl._backup.store"} <= loaded


def test_import_blockctl_imports_its_names_on_first_use(tmp_path: Path) -> None:
    code = (
        "import sys, types, blockctl\n"
        "before = {n for n, m in sys.modules.items() if n.startswith('blockctl.')}\n"
        "from blockctl import open_vm, MachineConfig\n"
        "after = {n for n, m in sys.modules.items() if n.startswith('blockctl.')}\n"
        "print(sorted(before)); print(open_vm.__module__, 'blockctl._machine' in after)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        cwd=tmp_path,
    )
    before, after = done.stdout.splitlines()
    assert before == "['blockctl._lazy']"
    assert after == "blockctl._machine True"


def test_blockctl_hands_out_what_type_checkers_see() -> None:
    """``blockctl/__init__.py`` names its exports twice: imports under ``TYPE_CHECKING`` (what
    mypy sees) and the table ``_lazy.exports`` imports from (what a program gets). Each name
    of the first must be the same object in the second, and both must be ``__all__``."""
    import blockctl

    tree = ast.parse((ROOT / "blockctl" / "__init__.py").read_text())
    seen: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if ast.unparse(node.test).startswith("not "):
                continue
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module is not None
                for alias in imp.names:
                    seen[alias.asname or alias.name] = (imp.module, alias.name)
    assert sorted(seen) == sorted(blockctl.__all__)
    for name, (module, attribute) in seen.items():
        assert getattr(blockctl, name) is getattr(importlib.import_module(module), attribute)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = blockctl.no_such_name  # type: ignore[attr-defined]


def test_logging_is_configured_on_the_first_event_it_shows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command line's structlog set-up waits for the first event it would show."""
    import structlog

    calls: list[int] = []
    monkeypatch.setattr(structlog, "is_configured", lambda: bool(calls))
    monkeypatch.setattr(_log, "_on_demand", None)
    _log.configure_on_demand(logging.WARNING, calls.append)
    log = _log.get_logger()
    log.debug("test.debug")
    log.info("test.info")
    assert calls == []
    assert _log.raise_level_on_demand(logging.ERROR)
    log.warning("test.warning")  # below the raised level now
    assert calls == []
    with structlog.testing.capture_logs() as logs:
        log.error("test.error", x=1)
    assert calls == [logging.ERROR]
    assert logs == [{"event": "test.error", "x": 1, "log_level": "error"}]
    assert not _log.raise_level_on_demand(logging.ERROR)  # done: nothing pending


def test_a_command_parsed_alone_is_parsed_as_among_all() -> None:
    """``main`` builds only the parser of the command it is given: its help, usage and the
    top level's usage are those of the parser with every command."""
    from blockctl._cli import main

    everything, _ = main.build_parser()
    every = main._subcommands(everything)
    for name, _, _ in main.COMMANDS:
        alone, commands = main.build_parser(only=name)
        assert list(commands) == [name]
        assert alone.format_usage() == everything.format_usage()
        sub, _ = main._subcommands(alone)[name]
        assert sub.format_help() == every[name][0].format_help()
        assert sub.format_usage() == every[name][0].format_usage()


def test_the_command_table_names_every_command_by_its_name() -> None:
    """``main.COMMANDS`` names each command without importing its module: each entry's class
    has that name, and every command class of the command modules is in the table once."""
    from blockctl._cli import common, main

    listed = set()
    for name, module, class_name in main.COMMANDS:
        cls = main.command_class(module, class_name)
        assert cls.name == name
        listed.add(cls)
    assert len(listed) == len(main.COMMANDS)
    defined = {
        cls
        for module in {module for _, module, _ in main.COMMANDS}
        for cls in vars(importlib.import_module(f"blockctl._cli.{module}")).values()
        if isinstance(cls, type)
        and issubclass(cls, common.Command)
        and cls is not common.Command
        and "name" in vars(cls)
    }
    assert defined == listed
    with pytest.raises(TypeError, match="is not a Command"):
        main.command_class("common", "ExitCode")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["status", "vm"], "status"),
        (["--json", "-v", "drives", "vm"], "drives"),
        (["--log-json", "--verbose", "ls"], "ls"),
        (["--version"], ""),
        (["--json", "--version", "status"], ""),
        (["-h", "status"], None),  # the top level's help lists every command
        (["--verb", "status"], None),  # an abbreviation: argparse decides
        (["stat", "vm"], None),  # an unknown command: the error lists every command
        (["--", "status"], None),
        ([], None),
    ],
)
def test_the_command_main_builds_alone(argv: list[str], named: str | None) -> None:
    from blockctl._cli import main

    assert main._named_command(argv) == named

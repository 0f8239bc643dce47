"""Start-up of the command line (issue 15, item 6): ``blockctl --version``, ``blockctl status
VM`` and ``blockctl drives VM``, the wall time of a fresh process from start to exit, next to
``python -c pass`` (the interpreter's own start-up, same interpreter and environment) measured
in the same run, interleaved round by round so that they share the machine's load. Also timed
(a note, not a row): ``anyio.run`` of nothing after ``import qemu.qmp``, with no blockctl, the
least any command built on anyio and qemu.qmp takes here.

The VM is the bundled guest started by ``blockctl up`` in the run's own runtime directory.
Bytecode is compiled before the timed rounds (into the run's temp directory, whatever
PYTHONDONTWRITEBYTECODE says), as an installed package has it: the first run after an edit
compiles, and takes longer. The goal of the issue is ``status`` in at most 150 ms.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scripts.bench_common import Row

ROOT = Path(__file__).resolve().parent.parent
VM = "bench-cli"
GOAL_MS = 150.0


def _blockctl() -> list[str]:
    """The ``blockctl`` console script of this interpreter's environment (what a user runs),
    else ``python -m blockctl``; either imports this checkout (PYTHONPATH)."""
    script = Path(sys.executable).with_name("blockctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "blockctl"]


def _run(argv: list[str], env: dict[str, str]) -> None:
    # our own interpreter and blockctl, fixed arguments
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)  # noqa: S603


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) milliseconds of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    _run(argv, env)
    wall = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    return wall, cpu


def bench_cli(reps: int, work: Path) -> tuple[list[Row], list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(
        BLOCKCTL_RUNTIME_DIR=str(work / "run"),
        PYTHONPYCACHEPREFIX=str(work / "pycache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    blockctl = _blockctl()
    floor = [sys.executable, "-c", "pass"]
    stack = [
        sys.executable,
        "-c",
        "import anyio, qemu.qmp; anyio.run(anyio.sleep, 0, backend='asyncio')",
    ]
    commands = {
        "blockctl --version": [*blockctl, "--version"],
        "blockctl status VM": [*blockctl, "status", VM],
        "blockctl drives VM": [*blockctl, "drives", VM],
    }
    _run([*blockctl, "up", "--name", VM], env)
    try:
        timed = [("floor", floor), ("stack", stack), *commands.items()]
        for _, argv in timed:  # compiles the bytecode; not timed
            _timed(argv, env)
        wall: dict[str, list[float]] = {name: [] for name, _ in timed}
        cpu: dict[str, list[float]] = {name: [] for name in wall}
        load = os.getloadavg()[0]
        for _ in range(reps):
            for name, argv in timed:
                w, c = _timed(argv, env)
                wall[name].append(w)
                cpu[name].append(c)
        load_after = os.getloadavg()[0]
    finally:
        _run([*blockctl, "down", VM], env)
    rows = []
    for name in commands:
        row = Row(
            f"start-up: {name} (wall, fresh process)",
            "ms",
            wall[name],
            wall["floor"],
            "python -c pass (same interpreter, same run)",
            goal=f"<= {GOAL_MS:.0f} ms" if "status" in name else "(start-up)",
        )
        if "status" in name:
            row.met = statistics.median(wall[name]) <= GOAL_MS
        rows.append(row)
    notes = [
        f"start-up: load average {load:.2f} before the timed rounds, {load_after:.2f} after "
        f"({os.cpu_count()} CPUs); CPU time (user + system) medians: "
        + ", ".join(f"{name} {statistics.median(cpu[name]):.1f} ms" for name in commands)
        + f", python -c pass {statistics.median(cpu['floor']):.1f} ms; ran {blockctl[-1]}",
        f"start-up: anyio.run + import qemu.qmp, no blockctl (the least an anyio command takes): "
        f"{statistics.median(wall['stack']):.1f} ms wall median",
    ]
    return rows, notes

"""Mutation score of the pure modules (issue 22): mutmut mutates them, their unit tests run
against every mutant, and each survivor must be killed or explained.

The scope (which functions of which module, which unit tests) is :data:`MODULES`; mutmut's
own settings are ``[tool.mutmut]`` in pyproject.toml. Survivors are matched against
``tests/mutation/explained.toml`` by function and by the changed lines (not by mutmut's
numbering, which shifts when a function changes). An entry is ``equivalent`` (no test can
tell the mutant from the code, with the reason) or ``open`` (a real gap, known and not yet
covered by a test, with what a test would need). Exit 1 if a survivor is in neither list, or
if mutmut could not run.

    scripts/mutation-score                  # the modules CI runs (DEFAULT: all six)
    scripts/mutation-score --all            # every module
    scripts/mutation-score --module graph --module jobs
    scripts/mutation-score --draft out.toml # unexplained survivors as entries to fill in
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPLAINED = ROOT / "tests" / "mutation" / "explained.toml"
WORK = ROOT / "mutants"  # mutmut's scratch tree (git-ignored), made afresh each run


@dataclass(frozen=True)
class Module:
    """One pure module: its file, the functions in scope (mutmut names: ``x_f`` for a
    function, ``xǁClassǁmethod`` for a method) and the unit tests that run."""

    file: str
    functions: tuple[str, ...]


MODULES: dict[str, Module] = {
    "graph": Module("blockctl/_graph.py", ("*",)),
    "journal": Module(
        "blockctl/_journal.py",
        (
            "x_plan",
            "x__state",
            "x__unchanged",
            "x__in_use",
            "x__rollback",
            "x__diverged",
            "x__relinks",
            "x__plan_gone",
            "xǁStepǁorder",
            "xǁIntentǁdescribe",
        ),
    ),
    "argv": Module("blockctl/_argv.py", ("*",)),
    "apply": Module(
        "blockctl/_ops/apply.py",
        ("x_plan", "x__same_file", "x__live_cache_matches", "x__describe"),
    ),
    "jobs": Module(
        "blockctl/_jobs.py",
        (
            "x_error_policy",
            "xǁJobǁ_loop",
            "xǁJobǁ_resync",
            "xǁJobǁ_io_error",
            "xǁJobǁ_conclude",
            "xǁJobǁ_transition",
            "xǁJobǁ_detail",
            "xǁJobǁ_next_event",
            "xǁJobǁ_give_up",
            "xǁJobǁ_drive",
            "xǁJobǁwait",
            "xǁJobǁwait_ready",
            "xǁJobǁdone",
            "xǁJobǁoutcome",
            "xǁJobǁcomplete",
            "xǁJobǁcancel",
        ),
    ),
    "checkpoints": Module("blockctl/_backup/checkpoints.py", ("*",)),
}

#: What CI runs (``scripts/mutation-score`` without ``--module``): every module, whole (no
#: sampling, no shard), each survivor killed or explained.
DEFAULT = ("journal", "checkpoints", "apply", "graph", "argv", "jobs")

#: Seconds one test may run in a mutant's worker (tests/conftest.py stops the worker and mutmut
#: counts the mutant killed, "timeout"). The slowest unit test in scope takes 0.6 s; a mutant
#: that stalls a job would otherwise wait for mutmut's timeout, (the sum of the measured times
#: of every test reaching the function + 2 s) x 4: about 20 s for `_jobs`' loop.
TEST_LIMIT = 5.0

#: Workers per CPU. Most of a `_jobs` mutant's time is its tests waiting on the clock (deadlines
#: of 0.2 to 0.5 s, a stalled job until TEST_LIMIT): one run used 4 min of CPU in 16 min with
#: one worker per CPU, so two per CPU halve the wait without the CPU becoming the limit.
WORKERS_PER_CPU = 2

KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def dotted(file: str) -> str:
    return file.removesuffix(".py").replace("/", ".")


def patterns(module: Module) -> list[str]:
    """mutmut's mutant-name globs for the module's functions in scope."""
    return [f"{dotted(module.file)}.{f}__mutmut_*" for f in module.functions]


def function_of(mutant: str) -> str:
    """``blockctl._journal.x_plan__mutmut_3`` → ``blockctl._journal.plan``; methods keep
    their class: ``blockctl._jobs.Job._loop``."""
    module, _, name = mutant.rpartition(".")
    name = name.rpartition("__mutmut_")[0]
    name = name[2:].replace("ǁ", ".") if name.startswith("xǁ") else name.removeprefix("x_")
    return f"{module}.{name}"


def changed_lines(diff: str) -> tuple[str, str]:
    """The lines a mutant removes and adds (stripped, joined by newlines)."""
    lines = diff.splitlines()
    body = [line for line in lines if not line.startswith(("---", "+++", "@@"))]
    was = "\n".join(line[1:].strip() for line in body if line.startswith("-"))
    now = "\n".join(line[1:].strip() for line in body if line.startswith("+"))
    return was, now


@dataclass(frozen=True)
class Explanation:
    kind: str  # "equivalent" or "open"
    why: str


def load_explained() -> dict[tuple[str, str, str], Explanation]:
    if not EXPLAINED.exists():
        return {}
    data = tomllib.loads(EXPLAINED.read_text())
    found: dict[tuple[str, str, str], Explanation] = {}
    for entry in data.get("mutant", []):
        kind, why = entry["kind"], entry["why"].strip()
        if kind not in ("equivalent", "open") or not why:
            raise SystemExit(f"{EXPLAINED}: entry {entry!r} needs kind equivalent/open and why")
        key = (entry["function"], entry["was"].strip(), entry["now"].strip())
        found[key] = Explanation(kind, why)
    return found


def run_mutmut(selected: dict[str, Module], children: int) -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    mutmut = Path(sys.executable).parent / "mutmut"
    names = [p for m in selected.values() for p in patterns(m)]
    # BLOCKCTL_MUTATION: property tests draw fewer examples (see tests/unit/test_argv.py).
    # BLOCKCTL_MUTATION_TEST_LIMIT: see TEST_LIMIT.
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "BLOCKCTL_MUTATION": "1",
        "BLOCKCTL_MUTATION_TEST_LIMIT": str(TEST_LIMIT),
    }
    proc = subprocess.run(  # noqa: S603 - our own venv's mutmut, fixed arguments
        [str(mutmut), "run", "--max-children", str(children), *names],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        print(proc.stdout[-5000:])
        raise SystemExit(f"mutmut run failed (exit {proc.returncode})")


def results(module: Module) -> dict[str, str]:
    """Mutant name → status, for the module's mutants in scope."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((WORK / f"{module.file}.meta").read_text())
    globs = patterns(module)
    return {
        name: status_by_exit_code[code]
        for name, code in meta["exit_code_by_key"].items()
        if any(fnmatch.fnmatchcase(name, g) for g in globs)
    }


def diff_of(module: Module, mutant: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    return get_diff_for_mutant(mutant, path=Path(module.file))


def toml_string(text: str) -> str:
    return "'''\n" + text + "'''" if "'''" not in text else json.dumps(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), default=[])
    parser.add_argument("--all", action="store_true", help="every module, not only CI's")
    parser.add_argument("--children", type=int, default=WORKERS_PER_CPU * (os.cpu_count() or 1))
    parser.add_argument("--no-run", action="store_true", help="report the last run's results")
    parser.add_argument("--draft", type=Path, help="write unexplained survivors as entries")
    args = parser.parse_args()
    keys = list(MODULES) if args.all else args.module or list(DEFAULT)
    selected = {k: MODULES[k] for k in keys}
    explained = load_explained()
    started = time.monotonic()
    if not args.no_run:
        run_mutmut(selected, args.children)
    elapsed = time.monotonic() - started
    os.chdir(ROOT)  # mutmut's helpers read pyproject.toml and mutants/ from here
    unexplained: list[tuple[str, str, str, str]] = []
    used: set[tuple[str, str, str]] = set()
    totals = {"killed": 0, "total": 0, "equivalent": 0, "open": 0}
    print(f"{'module':<12} {'killed':>7} {'total':>6} {'score':>6}  equivalent  open  unexplained")
    report: list[str] = []
    for key, module in selected.items():
        status = results(module)
        killed = sum(1 for s in status.values() if s in KILLED)
        counts = {"equivalent": 0, "open": 0, "unexplained": 0}
        for mutant in sorted(status):
            if status[mutant] in KILLED:
                continue
            function = function_of(mutant)
            was, now = changed_lines(diff_of(module, mutant))
            found = explained.get((function, was, now))
            mark = found.kind if found is not None else "UNEXPLAINED"
            if found is not None:
                used.add((function, was, now))
                counts[found.kind] += 1
            else:
                counts["unexplained"] += 1
                unexplained.append((function, was, now, status[mutant]))
            report.append(f"  [{mark}] {mutant} ({status[mutant]}): {was!r} → {now!r}")
        total = len(status)
        score = 100.0 * killed / total if total else 0.0
        print(
            f"{key:<12} {killed:>7} {total:>6} {score:>5.1f}%  {counts['equivalent']:>10}"
            f"  {counts['open']:>4}  {counts['unexplained']:>11}"
        )
        totals["killed"] += killed
        totals["total"] += total
        totals["equivalent"] += counts["equivalent"]
        totals["open"] += counts["open"]
    score = 100.0 * totals["killed"] / totals["total"] if totals["total"] else 0.0
    print(
        f"{'all':<12} {totals['killed']:>7} {totals['total']:>6} {score:>5.1f}%  "
        f"{totals['equivalent']:>10}  {totals['open']:>4}  {len(unexplained):>11}"
    )
    print("survivors:")
    print("\n".join(report) or "  none")
    if not args.no_run:
        print(f"mutmut run: {elapsed:.0f} s wall with {args.children} workers")
    if args.draft is not None:
        with args.draft.open("w") as out:
            for function, was, now, state in unexplained:
                out.write(f'[[mutant]]\nfunction = "{function}"  # {state}\n')
                out.write(f"was = {toml_string(was)}\nnow = {toml_string(now)}\n")
                out.write('kind = ""\nwhy = ""\n\n')
    if unexplained:
        print(
            f"mutation score: {len(unexplained)} survivors neither killed nor explained in "
            f"{EXPLAINED.relative_to(ROOT)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

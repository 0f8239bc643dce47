#!/usr/bin/env python3
"""Run the promise ledger's mutations (tests/promises.py): each must be killed by its tests.

    scripts/mutants [--only ID ...] [--list] [--markdown] [-j N] [--no-baseline] [--timeout S]

For each mutation: apply it to a scratch copy of the working tree (the files git tracks or would
track, uncommitted changes included; the working tree itself is never modified), run only that
promise's tests there (``pytest -x -q -p no:cacheprovider NODE...``, PYTHONPATH = the copy) and
require them to FAIL. First the same tests run once unmutated: they must pass, or a failing
test could pass for a killer. Prints one line per mutation (promise, result, seconds) and
exits 1 if any mutation survived, a ``find`` text does not occur exactly once, a mutated file
does not compile, pytest ends any other way than passed/failed, or the baseline fails.
``--markdown`` also prints the README table with this run's results. QEMU processes are the
tests' to clean up (every integration test does); a run past ``--timeout`` has its whole
process group killed and counts as an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.promises import Mutation, Promise, mutations, render_table  # noqa: E402

KILLED, SURVIVED, ERROR = "killed", "SURVIVED", "ERROR"


@dataclass(frozen=True, slots=True)
class Outcome:
    key: str
    result: str
    seconds: float
    detail: str = ""


def tree_files() -> list[str]:
    """The working tree as git sees it: tracked and untracked-not-ignored files that exist."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return sorted({f for f in out.decode().split("\0") if f and (ROOT / f).is_file()})


def scratch_copy(files: Sequence[str]) -> Path:
    where = Path(tempfile.mkdtemp(prefix="bc-mutants-"))
    for name in files:
        target = where / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return where


def mutated(mutation: Mutation) -> str:
    """The file's text with the mutation applied; ValueError unless ``find`` occurs once."""
    text = (ROOT / mutation.file).read_text()
    count = text.count(mutation.find)
    if count != 1:
        raise ValueError(f"{mutation.file}: the find text occurs {count} times, not once")
    new = text.replace(mutation.find, mutation.replace)
    compile(new, mutation.file, "exec")  # SyntaxError: the ledger entry is wrong
    return new


def run_tests(
    tree: Path, tests: Sequence[str], timeout: float, keep: int = 2000
) -> tuple[int | None, str]:
    """pytest on ``tests`` in ``tree``: (exit code, or None after a timeout; its last ``keep``
    characters)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(  # noqa: S603 (our own interpreter and the ledger's node ids)
        argv,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a timeout kills QEMU children too
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")[-keep:]
    return proc.returncode, out.decode(errors="replace")[-keep:]


def one(tree: Path, key: str, promise: Promise, mutation: Mutation, timeout: float) -> Outcome:
    started = time.monotonic()
    try:
        text = mutated(mutation)
    except (ValueError, SyntaxError) as exc:
        return Outcome(key, ERROR, 0.0, str(exc))
    target = tree / mutation.file
    original = target.read_text()
    target.write_text(text)
    try:
        rc, out = run_tests(tree, promise.tests, timeout)
    finally:
        target.write_text(original)
    seconds = time.monotonic() - started
    if rc == 1:
        return Outcome(key, KILLED, seconds)
    if rc == 0:
        return Outcome(key, SURVIVED, seconds, out)
    why = f"timed out after {timeout:g} s" if rc is None else f"pytest exit code {rc}"
    return Outcome(key, ERROR, seconds, f"{why}\n{out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="ID",
        help="run only this mutation (key) or promise id; repeatable",
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the README table with this run's results at the end",
    )
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the unmutated run of the tests"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per pytest run (default 600)"
    )
    args = parser.parse_args(argv)
    chosen = [
        (key, p, m)
        for key, p, m in mutations()
        if not args.only or key in args.only or p.id in args.only
    ]
    if args.only and not chosen:
        parser.error(f"no mutation or promise named {args.only}")
    if args.list:
        for key, _p, m in chosen:
            print(f"{key:48} {m.file:34} {m.what}")
        return 0
    started = time.monotonic()
    files = tree_files()
    trees = [scratch_copy(files) for _ in range(max(1, args.jobs))]
    free = list(trees)
    lock = threading.Lock()
    failed = False
    try:
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for _k, p, _m in chosen for t in p.tests))
            t0 = time.monotonic()
            # A failing baseline prints its whole failure: the cause sits before pytest's
            # full diff, which alone can fill the last 2000 characters.
            rc, out = run_tests(trees[0], tests, args.timeout * 2, keep=40_000)
            print(
                f"baseline: {len(tests)} test ids unmutated: "
                f"{'pass' if rc == 0 else 'FAIL'} ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
            if rc != 0:
                print(out, file=sys.stderr)
                return 1

        def work(item: tuple[str, Promise, Mutation]) -> Outcome:
            with lock:
                tree = free.pop()
            try:
                outcome = one(tree, *item, timeout=args.timeout)
            finally:
                with lock:
                    free.append(tree)
            line = f"{outcome.key:48} {outcome.result:9} {outcome.seconds:6.1f} s"
            print(line, flush=True)
            if outcome.result != KILLED:
                print(
                    f"    {item[2].file}: {item[2].what}\n    "
                    + outcome.detail.strip().replace("\n", "\n    ")[-1500:],
                    flush=True,
                )
            return outcome

        with ThreadPoolExecutor(max_workers=len(trees)) as pool:
            outcomes = list(pool.map(work, chosen))
    finally:
        for tree in trees:
            shutil.rmtree(tree, ignore_errors=True)
    counts = {r: sum(1 for o in outcomes if o.result == r) for r in (KILLED, SURVIVED, ERROR)}
    failed = counts[SURVIVED] > 0 or counts[ERROR] > 0
    print(
        f"mutants: {len(outcomes)} run, {counts[KILLED]} killed, {counts[SURVIVED]} survived, "
        f"{counts[ERROR]} errors, {len({p.id for _k, p, _m in chosen})} promises, "
        f"{time.monotonic() - started:.0f} s"
    )
    if args.markdown:
        print()
        print(render_table({o.key: o.result.lower() for o in outcomes}), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

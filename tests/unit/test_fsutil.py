"""Owner-only files and dirs whatever the umask; the one atomic writer; loose dirs refused;
the one file lock."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from blockctl import _fsutil
from blockctl._fsutil import (
    atomic_write_bytes,
    check_private_dir,
    create_private_file,
    make_private_dir,
)
from blockctl.errors import BlockctlError, ConfigError
from tests.conftest import mode_of

NOBODY = 65534


def test_atomic_write_is_0600_and_leaves_no_temporary_file(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "record.json"
    atomic_write_bytes(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'
    assert mode_of(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_atomic_write_replaces_a_loose_file_with_a_private_one(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "drives.json"
    target.write_bytes(b"old")
    target.chmod(0o666)
    atomic_write_bytes(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000
    assert mode_of(target) == 0o600


def test_atomic_write_sets_the_mode_asked_for_exactly(tmp_path: Path) -> None:
    old = os.umask(0o077)  # would strip 0o040 if the mode were left to the umask
    try:
        atomic_write_bytes(tmp_path / "shared", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "shared") == 0o640


def test_atomic_write_does_not_follow_a_planted_temporary_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    target = tmp_path / "record.json"
    _fsutil.temp_path(target).symlink_to(victim)
    atomic_write_bytes(target, b"data")
    assert victim.read_bytes() == b"keep"
    assert target.read_bytes() == b"data"
    assert not target.is_symlink()


def test_atomic_write_temporary_name_is_pid_tagged(tmp_path: Path) -> None:
    # The loaders of journal and freeze records rely on it (blockctl._journal.discard_if_stale).
    assert _fsutil.temp_path(tmp_path / "j.json").name == f"j.json.{os.getpid()}.tmp"


def test_atomic_write_failure_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "record.json"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_create_private_file_is_0600_and_empty(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "disk0.qcow2"
    create_private_file(path)
    assert mode_of(path) == 0o600
    assert path.stat().st_size == 0


def test_create_private_file_takes_a_mode(tmp_path: Path, umask: int) -> None:
    create_private_file(tmp_path / "shared.qcow2", mode=0o640)
    assert mode_of(tmp_path / "shared.qcow2") == 0o640


def test_create_private_file_is_exclusive_and_never_follows_a_symlink(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.write_bytes(b"data")
    existing.chmod(0o644)
    with pytest.raises(FileExistsError):
        create_private_file(existing)
    assert existing.read_bytes() == b"data"
    assert mode_of(existing) == 0o644
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        create_private_file(link)
    assert not (tmp_path / "nowhere").exists()


def test_make_private_dir_creates_it_and_its_parents_0700(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "a" / "b" / "c"
    make_private_dir(path)
    for directory in (tmp_path / "a", tmp_path / "a" / "b", path):
        assert mode_of(directory) == 0o700, directory
    make_private_dir(path)  # existing and private: fine, unchanged
    assert mode_of(path) == 0o700


def test_make_private_dir_keeps_an_existing_readable_dir(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    path.mkdir()
    path.chmod(0o755)
    make_private_dir(path)
    assert mode_of(path) == 0o755


def test_make_private_dir_refuses_an_existing_loose_dir(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    path.mkdir()
    path.chmod(0o777)
    with pytest.raises(ConfigError) as caught:
        make_private_dir(path, what="repo")
    assert caught.value.field == "repo"
    assert f"chmod 700 {path}" in str(caught.value)
    assert mode_of(path) == 0o777  # reported, not silently changed


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o770, "its group"), (0o703, "all users"), (0o777, "its group and all users")],
)
def test_check_private_dir_refuses_a_writable_dir(tmp_path: Path, mode: int, who: str) -> None:
    path = tmp_path / "loose"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        check_private_dir(path, "repo")
    message = str(caught.value)
    assert caught.value.field == "repo"
    assert str(path) in message
    assert f"writable by {who} (mode {mode:04o})" in message
    assert f"`chmod 700 {path}`" in message


@pytest.mark.parametrize("mode", [0o700, 0o750, 0o755, 0o500])
def test_check_private_dir_accepts_a_dir_only_its_owner_writes(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ok"
    path.mkdir()
    path.chmod(mode)
    check_private_dir(path, "repo")


def test_check_private_dir_refuses_a_file_and_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_private_dir(tmp_path / "file", "repo")
    with pytest.raises(ConfigError, match="does not exist"):
        check_private_dir(tmp_path / "missing", "repo")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another uid")
def test_check_private_dir_refuses_a_dir_owned_by_another_uid(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, -1)
    with pytest.raises(ConfigError) as caught:
        check_private_dir(path, "repo")
    message = str(caught.value)
    assert str(path) in message
    assert f"owned by uid {NOBODY}, not by you (uid 0)" in message
    assert f"chown 0 {path}" in message
    with pytest.raises(ConfigError, match="owned by uid"):
        make_private_dir(path)


def test_error_message_quotes_a_path_for_the_shell(tmp_path: Path) -> None:
    path = tmp_path / "my repo"
    path.mkdir()
    path.chmod(0o777)
    with pytest.raises(ConfigError) as caught:
        check_private_dir(path, "repo")
    assert f"`chmod 700 '{path}'`" in str(caught.value)


# Section: the one file lock (flocked, flocked_polling)


class Busy(BlockctlError):
    """What a test's ``busy`` factory raises."""


class Boom(Exception):
    """Raised inside a locked block."""


#: Holds an exclusive lock on argv[1] until stdin closes; says "held" once it has it.
HOLDER = """
import sys
from pathlib import Path
from blockctl import _fsutil
with _fsutil.flocked(Path(sys.argv[1]), create=True, shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def holder(path: Path, *, shared: bool = False) -> Iterator[subprocess.Popen[str]]:
    """Another process holding a lock on ``path`` (killed at the end if still running)."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "shared" if shared else "exclusive"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "held\n"
            yield child
        finally:
            child.kill()


def free(path: Path) -> bool:
    with _fsutil.flocked(path, wait=False) as fd:
        return fd is not None


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_flocked_is_busy_between_two_descriptors_of_one_process(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with _fsutil.flocked(lock, create=True) as fd:
        assert isinstance(fd, int)
        with _fsutil.flocked(lock, wait=False) as second:
            assert second is None
        with pytest.raises(Busy) as caught, _fsutil.flocked(lock, wait=False, busy=Busy):
            pass
        assert isinstance(caught.value.__cause__, BlockingIOError)
    assert free(lock)


def test_flocked_is_busy_while_another_process_holds_it_and_free_when_it_dies(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "lock"
    with holder(lock) as child:
        assert not free(lock)
        with pytest.raises(Busy), _fsutil.flocked(lock, wait=False, busy=Busy):
            pass
        child.kill()  # no clean-up in the child: the kernel releases its lock
        child.wait()
        assert free(lock)


def test_flocked_shared_holders_coexist_and_exclude_an_exclusive_one(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with holder(lock, shared=True) as child:
        with _fsutil.flocked(lock, shared=True, wait=False) as fd:
            assert fd is not None  # a second shared holder
            with _fsutil.flocked(lock, wait=False) as exclusive:
                assert exclusive is None
        assert not free(lock)  # the child's shared lock still holds
        assert child.stdin is not None
        child.stdin.close()  # the child leaves its block
        child.wait()
        assert free(lock)
    with _fsutil.flocked(lock), _fsutil.flocked(lock, shared=True, wait=False) as shared:
        assert shared is None  # an exclusive holder excludes a shared one


def test_flock_holders_names_the_processes_holding_the_lock(tmp_path: Path) -> None:
    """From the kernel's own table: this process and another one sharing the lock, each
    once; a lock on another file, or a released one, is not named."""
    lock, other = tmp_path / "lock", tmp_path / "other"
    assert _fsutil.flock_holders(lock) == []  # no file
    with holder(lock, shared=True) as child, _fsutil.flocked(other, create=True):
        assert _fsutil.flock_holders(lock) == [child.pid]
        with _fsutil.flocked(lock, shared=True), _fsutil.flocked(lock, shared=True):
            assert sorted(_fsutil.flock_holders(lock)) == sorted([child.pid, os.getpid()])
        assert _fsutil.flock_holders(other) == [os.getpid()]
        child.kill()
        child.wait()
        assert _fsutil.flock_holders(lock) == []


def test_flocked_releases_and_closes_on_an_exception(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    before = open_fds()

    def fail_while_locked() -> None:
        with _fsutil.flocked(lock, create=True):
            assert not free(lock)
            raise Boom

    with pytest.raises(Boom):
        fail_while_locked()
    assert free(lock)
    assert open_fds() == before
    with (
        pytest.raises(Busy),
        _fsutil.flocked(lock),
        _fsutil.flocked(lock, wait=False, busy=Busy),
    ):
        pass
    assert open_fds() == before  # a busy refusal closed its descriptor too


def test_flocked_creates_0600_and_never_follows_a_symlink(tmp_path: Path, umask: int) -> None:
    lock = tmp_path / "lock"
    with _fsutil.flocked(lock, create=True):
        assert mode_of(lock) == 0o600
    loose = tmp_path / "loose"
    loose.touch()
    loose.chmod(0o644)  # made by someone else: made private when used as a lock
    with _fsutil.flocked(loose, create=True):
        assert mode_of(loose) == 0o600
    target = tmp_path / "elsewhere"
    planted = tmp_path / "planted"
    planted.symlink_to(target)
    with (
        pytest.raises(OSError, match=os.strerror(errno.ELOOP)),
        _fsutil.flocked(planted, create=True),
    ):
        pass
    assert not target.exists()


def test_flocked_open_error_is_raised_as_asked(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError), _fsutil.flocked(missing):
        pass
    with (
        pytest.raises(Busy, match="no lock file") as caught,
        _fsutil.flocked(missing, open_error=lambda exc: Busy(f"no lock file: {exc.strerror}")),
    ):
        pass
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert not missing.exists()  # not created without create=True


def test_flocked_locks_a_directory_itself(tmp_path: Path) -> None:
    with (
        _fsutil.flocked(tmp_path, directory=True),
        _fsutil.flocked(tmp_path, directory=True, wait=False) as second,
    ):
        assert second is None
    with _fsutil.flocked(tmp_path, directory=True, wait=False) as again:
        assert again is not None
    assert list(tmp_path.iterdir()) == []  # nothing created in it


async def test_flocked_polling_waits_says_so_once_and_takes_the_lock_when_freed(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "lock"
    waiting = anyio.Event()
    acquired = anyio.Event()
    waits: list[str] = []

    def on_wait() -> None:
        waits.append("waiting")
        waiting.set()

    async def take() -> None:
        async with _fsutil.flocked_polling(lock, poll=0.01, create=True, on_wait=on_wait):
            assert not free(lock)
            acquired.set()

    held = contextlib.ExitStack()
    held.enter_context(_fsutil.flocked(lock, create=True))
    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await waiting.wait()
        for _ in range(5):  # it keeps polling while the lock is held
            await anyio.sleep(0.01)
        assert not acquired.is_set()
        held.close()
        await acquired.wait()
    assert waits == ["waiting"]
    assert free(lock)


async def test_flocked_polling_ends_on_a_timeout_without_a_leak(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    before = open_fds()
    with _fsutil.flocked(lock, create=True):
        with anyio.move_on_after(0.05) as scope:
            async with _fsutil.flocked_polling(lock, poll=0.01):
                pytest.fail("took a held lock")
        assert scope.cancelled_caught
    assert open_fds() == before
    assert free(lock)

"""nbdkit's Python plugin serving one disk of a backup point, read-only (see :mod:`.serve`).

nbdkit loads this file by path into its own embedded interpreter (Debian's ``python3``), so
at load time only the standard library is importable: blockctl and its dependencies come
from the ``path=`` parameters (``sys.path`` of the controller), added in :func:`config`, and
are imported in :func:`config_complete`. Parameters::

    path=DIR (repeated)   repo=PATH  vm=NAME  point=ID  device=NAME
    keyfd=N               an inherited pipe holding the unwrapped repository key (encrypted
                          repositories; never in argv, the environment or a file)
    readyfd=N             an inherited pipe: "1", the serving pid and a newline, once nbdkit
                          listens
    cache=N               decoded chunks kept (default: PointImage's; the bench varies it)
    into=NAME             the VM a live restore serves (unused here: it names the server to
                          a garbage collection refused by its lock, store.servers_holding)

The server holds the repository's lock shared for as long as it runs, as a backup does while
it writes: a detached server outlives a killed controller (and its lock) until ``blockctl
recover`` stops it, and meanwhile a garbage collection must not remove the chunks the guest's
disk still reads. It holds its point's lock too (``Repository.serving``), so a prune keeps
the point, from which a recovery starts a replacement server if this one dies. Taken in
:func:`config_complete`, before nbdkit listens; taken again in :func:`after_fork` by the
serving process itself (a new open file description: ``flock`` locks belong to it, so the
controller's own shared or exclusive locking is independent of it), so that ``/proc/locks``
names the serving pid, not the process that forked it and exited.

Every request goes through :class:`blockctl._backup.export.PointImage`: a chunk that fails
its digest check makes the request fail with EIO.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Any

API_VERSION = 2

_params: dict[str, str] = {}
_paths: list[str] = []
_image: Any = None
#: The repository's shared lock, held until the process exits.
_held = contextlib.ExitStack()


def _nbdkit() -> Any:
    import nbdkit  # type: ignore[import-not-found]  # only inside nbdkit's interpreter

    return nbdkit


def config(key: str, value: str) -> None:
    if key == "path":
        # In the order given, ahead of the interpreter's own site-packages.
        sys.path.insert(len(_paths), value)
        _paths.append(value)
    elif key in ("repo", "vm", "point", "device", "keyfd", "readyfd", "cache", "into"):
        _params[key] = value
    else:
        raise ValueError(f"unknown parameter {key}")


def config_complete() -> None:
    global _image
    from blockctl._backup.crypto import RepositoryKey
    from blockctl._backup.export import PointImage
    from blockctl._backup.store import Repository

    for name in ("repo", "vm", "point", "device", "readyfd"):
        if name not in _params:
            raise ValueError(f"missing parameter {name}=")
    key = None
    if "keyfd" in _params:
        fd = int(_params["keyfd"])
        raw = b""
        while chunk := os.read(fd, 128):
            raw += chunk
        os.close(fd)
        if len(raw) != 64:
            raise ValueError("keyfd: expected 64 bytes of key")
        key = RepositoryKey(enc=raw[:32], mac=raw[32:])
    repo = Repository.open(Path(_params["repo"]), key=key)
    _hold_lock(repo)
    vm, point, device = _params["vm"], _params["point"], _params["device"]
    index = repo.read_index(vm, point, device)
    cache = {"cache_chunks": int(_params["cache"])} if "cache" in _params else {}
    _image = PointImage(repo, index, where=f" of {vm}/{point}/{device}", **cache)


def _hold_lock(repo: Any) -> None:
    """Take the repository's lock shared (waiting for a garbage collection that runs), then
    the point's (``Repository.serving``: a prune keeps a point so held, and a server waits
    for a prune deleting its point, then finds it gone and does not start), and keep both;
    an earlier hold of this process is released once the new one is held."""
    from blockctl.errors import RepositoryBusy

    held = contextlib.ExitStack()
    try:
        held.enter_context(repo.lock(exclusive=False, wait=False))
    except RepositoryBusy:
        print("waiting for the repository's garbage collection to end", file=sys.stderr)
        held.enter_context(repo.lock(exclusive=False))
    try:
        held.enter_context(repo.serving(_params["vm"], _params["point"]))
    except BaseException:
        held.close()
        raise
    global _held
    _held.close()
    _held = held


def thread_model() -> int:
    # Reading, decrypting, decompressing and hashing a chunk release the GIL.
    return int(_nbdkit().THREAD_MODEL_PARALLEL)


def after_fork() -> None:
    # nbdkit listens by now: the parent waits for this byte rather than poll the socket.
    _hold_lock(_image.repo)  # in the serving process, before it says it is ready
    fd = int(_params["readyfd"])
    # With the serving process's pid: in the background it is not the one the parent started.
    os.write(fd, b"1%d\n" % os.getpid())
    os.close(fd)


def open(readonly: bool) -> int:  # nbdkit's callback name
    return 1


def get_size(h: int) -> int:
    return int(_image.size)


def can_write(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True  # read-only: every connection sees the same bytes


def can_extents(h: int) -> bool:
    return True


def pread(h: int, buf: Any, offset: int, flags: int) -> None:
    try:
        buf[:] = _image.read(offset, len(buf))
    except Exception:
        _nbdkit().set_error(errno.EIO)
        raise


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    nbdkit = _nbdkit()
    hole = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    return [(e.offset, e.length, hole if e.zero else 0) for e in _image.extents(offset, count)]

"""A backup's copy control (blockctl._backup.control): what the reader threads wait for, and
the socket another process drives it through. No QEMU: threads and a Unix socket."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import anyio
import pytest

from blockctl._backup import control as control_ops
from blockctl._backup.control import CopyControl
from blockctl.errors import ConfigError, JobCancelledByOther


def in_thread(call: object) -> tuple[threading.Thread, list[object]]:
    """Run ``call()`` in a thread; its result lands in the list."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)  # type: ignore[operator]
    thread.start()
    return thread, out


def test_a_paused_copy_reads_nothing_until_resumed() -> None:
    control = CopyControl()
    stop = threading.Event()
    assert control.admit(1 << 20, stop)  # no limit, not paused: at once
    control.pause()
    assert control.status()["status"] == "paused"
    reader, out = in_thread(lambda: control.admit(1 << 20, stop))
    reader.join(0.3)
    assert reader.is_alive() and out == []  # waits: the pause holds every next read
    control.resume()
    reader.join(10)
    assert out == [True]
    assert control.status()["status"] == "running"


def test_a_stop_releases_a_paused_reader() -> None:
    control = CopyControl()
    stop = threading.Event()
    control.pause()
    reader, out = in_thread(lambda: control.admit(1, stop))
    stop.set()
    control.wake()
    reader.join(10)
    assert out == [False]


def test_a_reader_held_to_the_speed_keeps_a_pause_that_came_meanwhile() -> None:
    control = CopyControl(rate=1024)  # 1 KiB/s: the second KiB is due in a second
    stop = threading.Event()
    assert control.admit(1024, stop)
    reader, out = in_thread(lambda: control.admit(1024, stop))
    control.pause()
    reader.join(2.5)
    assert reader.is_alive() and out == []  # due by now, but paused
    control.set_speed(0)  # no limit: goes at once once resumed
    control.resume()
    reader.join(10)
    assert out == [True]
    assert control.status()["speed"] == 0


def test_a_full_repository_pauses_until_resumed_under_enospc_only() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    stop = threading.Event()
    assert not CopyControl(on_error="report").pause_on_error(full, stop)
    # enospc: other errors stand; ENOSPC waits for the resume and is then tried again.
    control = CopyControl(on_error="enospc", pause_timeout=60)
    assert not control.pause_on_error(OSError(errno.EIO, "I/O error"), stop)
    writer, out = in_thread(lambda: control.pause_on_error(full, stop))
    writer.join(0.3)
    assert writer.is_alive()
    status = control.status()
    assert (status["status"], status["io_status"]) == ("paused", "nospace")
    assert status["error"] == "No space left on device"
    said = control.new_error_pause()
    assert said is not None and said.count == 1 and said.pause_timeout == 60
    assert control.new_error_pause() is None  # said once
    control.resume()
    writer.join(10)
    assert out == [True]
    assert control.status()["io_status"] == "ok"
    # stop: any write error pauses; nobody resumes within the timeout: the error stands.
    impatient = CopyControl(on_error="stop", pause_timeout=0.2)
    assert not impatient.pause_on_error(OSError(errno.EIO, "I/O error"), stop)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="speed"):
        CopyControl(rate=0)
    with pytest.raises(ConfigError, match="on_error"):
        CopyControl(on_error="ignore")
    with pytest.raises(ConfigError, match="speed"):
        CopyControl().set_speed(-1)


async def test_another_process_drives_the_copy_through_its_socket(tmp_path: Path) -> None:
    control = CopyControl(rate=4096)
    control.done, control.total = 1024, 4096
    assert await control_ops.ask(tmp_path, "bc-backup-1", "status") is None  # nobody listens
    with pytest.raises(ConfigError, match="verb"):
        await control_ops.ask(tmp_path, "bc-backup-1", "explode")
    async with control_ops.serving(control, tmp_path, ["bc-backup-1", "bc-backup-2"]):
        sock = control_ops.socket_path(tmp_path, "bc-backup-1")
        assert sock.stat().st_mode & 0o777 == 0o600
        status = await control_ops.ask(tmp_path, "bc-backup-2", "status")
        assert status is not None
        assert (status["status"], status["done"], status["total"], status["speed"]) == (
            "running",
            1024,
            4096,
            4096,
        )
        assert (await control_ops.ask(tmp_path, "bc-backup-1", "pause"))["status"] == "paused"  # type: ignore[index]
        assert control.paused
        await control_ops.ask(tmp_path, "bc-backup-1", "speed", speed=8192)
        assert control.rate == 8192
        await control_ops.ask(tmp_path, "bc-backup-1", "resume")
        assert not control.paused
        with pytest.raises(ConfigError, match="refused"):
            await control_ops.ask(tmp_path, "bc-backup-1", "speed", speed=-5)
        await control_ops.ask(tmp_path, "bc-backup-1", "cancel")
        with pytest.raises(JobCancelledByOther, match="cancelled by another client") as cancelled:
            with anyio.fail_after(10):
                await control_ops.watch_cancel(control, "bc-backup-1")
        assert "at 25 %" in str(cancelled.value)
    assert not sock.exists()  # gone with the copy
    assert await control_ops.ask(tmp_path, "bc-backup-1", "status") is None

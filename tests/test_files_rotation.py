"""Rotation in-process: rename+create, copytruncate, deletion, symlinks, and rotation while stopped.

File operations written without an `await` between them happen while the source cannot run (it shares
the test's event loop), which makes "the writer got ahead of the reader" cases exact instead of timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import shutil
from pathlib import Path

import pytest
from test_files_harness import Harness, files_config

from edgeagent.sources.files import identity
from edgeagent.sources.files.tail import Tailer


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def lines(prefix: str, start: int, count: int) -> bytes:
    return "".join(f"{prefix} {i}\n" for i in range(start, start + count)).encode()


def expected(prefix: str, start: int, count: int) -> list[str]:
    return [f"{prefix} {i}" for i in range(start, start + count)]


def test_rename_and_create_reads_the_old_file_to_its_end(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines("a", 0, 100))

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(log)]))
        await h.start()
        await h.wait_lines(100)
        with open(log, "ab") as writer:  # the application's descriptor
            writer.write(lines("a", 100, 50))
            writer.flush()
            os.rename(log, tmp_path / "app.log.1")
            writer.write(lines("a", 150, 50))  # written after the rename, before the application reopens
            writer.flush()
            log.write_bytes(lines("b", 0, 10))
            await h.wait_lines(210)
            writer.write(lines("a", 200, 5))  # late: still within rotate_wait of the old file
        bodies = await h.wait_lines(215)
        assert sorted(bodies) == sorted(expected("a", 0, 205) + expected("b", 0, 10))
        # The old file is let go once idle for rotate_wait.
        await h.wait(lambda: h.source is not None and h.source.status()["files"] == 1, what="old file let go")
        await h.stop()

    run(scenario())


def test_copytruncate_recovers_unread_lines_from_the_copy(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines("a", 0, 100))

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(log)]))
        await h.start()
        await h.wait_lines(100)
        # The writer gets ahead of the reader, then logrotate copies and truncates, then the writer goes on.
        with open(log, "ab") as writer:
            writer.write(lines("a", 100, 400))
            writer.flush()
            shutil.copyfile(log, tmp_path / "app.log.1")
            os.truncate(log, 0)
            os.lseek(writer.fileno(), 0, os.SEEK_SET)
            writer.write(lines("b", 0, 20))
        bodies = await h.wait_lines(520)
        assert bodies[:100] == expected("a", 0, 100)
        assert sorted(bodies[100:]) == sorted(expected("a", 100, 400) + expected("b", 0, 20))
        assert h.source is not None
        await h.wait(lambda: h.source.status()["files"] == 1, what="copy let go")  # type: ignore[union-attr]
        assert h.source.status()["copies_recovered"] == 1
        await h.stop()

    run(scenario())


def test_copytruncate_with_the_copy_matching_include_is_not_read_twice(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines("a", 0, 100))  # more than a fingerprint's worth

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "app.log*")]))
        await h.start()
        await h.wait_lines(100)
        with open(log, "ab") as writer:
            writer.write(lines("a", 100, 30))
        shutil.copyfile(log, tmp_path / "app.log.1")
        os.truncate(log, 0)
        log.write_bytes(lines("b", 0, 5))
        bodies = await h.wait_lines(135)
        assert sorted(bodies) == sorted(expected("a", 0, 130) + expected("b", 0, 5))
        await h.stop()
        # And after a restart, neither file is read again.
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "app.log*")]))
        await h.start()
        with open(log, "ab") as writer:
            writer.write(lines("b", 5, 1))
        bodies = await h.wait_lines(136)
        assert sorted(bodies) == sorted(expected("a", 0, 130) + expected("b", 0, 6))
        await h.stop()

    run(scenario())


def test_file_deleted_while_open_is_read_to_its_end(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines("a", 0, 10))

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(log)]))
        await h.start()
        await h.wait_lines(10)
        with open(log, "ab") as writer:
            writer.write(lines("a", 10, 1000))
            writer.flush()
            log.unlink()
            writer.write(lines("a", 1010, 10) + b"unterminated")
        # The last line never gets its newline: it is shipped when the file is let go.
        bodies = await h.wait_lines(1021)
        assert bodies == [*expected("a", 0, 1020), "unterminated"]
        await h.wait(lambda: h.source is not None and h.source.status()["files"] == 0, what="deleted file let go")
        await h.stop()

    run(scenario())


def test_symlinks_are_followed_and_a_file_replaced_by_a_symlink(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "app.log"
    log.write_bytes(lines("a", 0, 10))

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "*.log")]))
        await h.start()
        await h.wait_lines(10)
        # The regular file is moved away and replaced by a symlink to it: the same file, no line again.
        os.rename(log, data / "app-1.log")
        log.symlink_to(data / "app-1.log")
        with open(log, "ab") as writer:
            writer.write(lines("a", 10, 5))
        await h.wait_lines(15)
        # The symlink is pointed at a new file: the old one is read to its end, the new one from its start.
        (data / "app-2.log").write_bytes(lines("b", 0, 3))
        tmp_link = tmp_path / "app.log.tmp"
        tmp_link.symlink_to(data / "app-2.log")
        with open(data / "app-1.log", "ab") as writer:
            writer.write(lines("a", 15, 2))
        os.rename(tmp_link, log)
        bodies = await h.wait_lines(20)
        assert sorted(bodies) == sorted(expected("a", 0, 17) + expected("b", 0, 3))
        records = h.records()
        assert {r["attributes"]["log.file.path"] for r in records} == {str(log)}
        await h.stop()

    run(scenario())


def test_rotation_while_stopped_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    state = tmp_path / "state"
    cfg = files_config(state, include=[str(log)])

    async def scenario() -> None:
        log.write_bytes(lines("a", 0, 50))
        h = Harness(cfg)
        await h.start()
        await h.wait_lines(50)
        await h.stop()
        # Stopped: the file gets more lines, is renamed away (to a name include does not match) and recreated.
        with open(log, "ab") as writer:
            writer.write(lines("a", 50, 25) + b"half")
        os.rename(log, tmp_path / "app.log.1")
        log.write_bytes(lines("b", 0, 10))
        h = Harness(cfg)
        await h.start()
        bodies = await h.wait_lines(86)
        assert sorted(bodies) == sorted([*expected("a", 0, 75), "half", *expected("b", 0, 10)])
        await h.stop()
        # Stopped again: this time copytruncate, after more lines.
        with open(log, "ab") as writer:
            writer.write(lines("b", 10, 40))
        shutil.copyfile(log, tmp_path / "app.log.2")
        os.truncate(log, 0)
        log.write_bytes(lines("c", 0, 5))
        h = Harness(cfg)
        await h.start()
        bodies = await h.wait_lines(131)
        assert sorted(bodies) == sorted([*expected("a", 0, 75), "half", *expected("b", 0, 50), *expected("c", 0, 5)])
        assert h.loss_reports() == []
        await h.stop()

    run(scenario())


def test_crash_while_a_rotated_file_is_still_being_read(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    state = tmp_path / "state"
    cfg = files_config(state, include=[str(log)], rotate_wait=60)

    async def scenario() -> None:
        log.write_bytes(lines("a", 0, 10))
        h = Harness(cfg)
        await h.start()
        await h.wait_lines(10)
        os.rename(log, tmp_path / "app.log.1")
        log.write_bytes(lines("b", 0, 10))
        await h.wait_lines(20)
        await asyncio.sleep(0.2)  # let the commit of where the old file went happen (a crash may also precede it)
        await h.crash()
        with open(tmp_path / "app.log.1", "ab") as writer:
            writer.write(lines("a", 10, 5))
        os.rename(tmp_path / "app.log.1", tmp_path / "app.log.2")  # rotated on while stopped
        h = Harness(cfg)
        await h.start()
        bodies = await h.wait_lines(25)
        assert sorted(bodies) == sorted(expected("a", 0, 15) + expected("b", 0, 10))
        await h.stop()

    run(scenario())


def test_symlink_retargeted_while_stopped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "app.log"
    (data / "one.log").write_bytes(lines("a", 0, 5))
    log.symlink_to(data / "one.log")
    cfg = files_config(tmp_path / "state", include=[str(log)])

    async def scenario() -> None:
        h = Harness(cfg)
        await h.start()
        await h.wait_lines(5)
        await h.stop()
        with open(data / "one.log", "ab") as writer:
            writer.write(lines("a", 5, 5))
        (data / "two.log").write_bytes(lines("b", 0, 5))
        log.unlink()
        log.symlink_to(data / "two.log")
        h = Harness(cfg)
        await h.start()
        bodies = await h.wait_lines(15)
        assert sorted(bodies) == sorted(expected("a", 0, 10) + expected("b", 0, 5))
        await h.stop()

    run(scenario())


def test_a_file_that_cannot_be_opened_keeps_its_position(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines("a", 0, 5))
    cfg = files_config(tmp_path / "state", include=[str(log)], rescan_interval=0.1)

    async def scenario() -> None:
        h = Harness(cfg)
        await h.start()
        await h.wait_lines(5)
        await h.stop()
        with open(log, "ab") as writer:
            writer.write(lines("a", 5, 5))
        real_open = os.open
        failures = []

        def failing_open(path: object, *args: object, **kwargs: object) -> int:
            if str(path) == str(log) and len(failures) < 2:
                failures.append(path)
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", failing_open)
        h = Harness(cfg)
        await h.start()
        # Refused at start and at the first scan; opened by a later rescan, from the stored position.
        assert await h.wait_lines(10) == expected("a", 0, 10)
        assert len(failures) == 2
        await h.stop()

    run(scenario())


def test_copytruncate_with_a_slow_copy_that_include_matches_sends_each_line_once(tmp_path: Path) -> None:
    """The copy is noticed while `cp` is still writing it (shorter than what was read from the original):
    it must still be known as a copy, so the truncation neither re-reads it from its start nor resends."""
    log = tmp_path / "app.log"
    content = lines("a", 0, 1000)
    log.write_bytes(content)

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "*")], exclude=["*.gz"]))
        await h.start()
        await h.wait_lines(1000)
        with open(tmp_path / "app.log.1", "wb") as copy:
            for start in range(0, len(content), 4096):  # cp, slowly: the source sees every stage of the copy
                copy.write(content[start : start + 4096])
                copy.flush()
                await asyncio.sleep(0.03)
        os.truncate(log, 0)
        with open(log, "ab") as writer:
            writer.write(lines("b", 0, 10))
        with open(tmp_path / "app.log.1", "ab") as copy:
            copy.write(b"end of the copy\n")  # read after everything the copy would send twice
        await h.wait(lambda: {"b 9", "end of the copy"} <= set(h.bodies()), what="both files read to their end")
        bodies = h.bodies()
        assert sorted(bodies) == sorted([*expected("a", 0, 1000), *expected("b", 0, 10), "end of the copy"])
        assert h.loss_reports() == []
        await h.stop()

    run(scenario())


def test_copytruncate_while_the_writer_goes_on_sends_each_line_once(tmp_path: Path) -> None:
    """Like `cp` on a live log: the copy is read from the file while the application appends to it and the
    source reads those lines from the original; then the file is truncated and written on."""
    log = tmp_path / "app.log"
    log.write_bytes(lines("a", 0, 500))

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "app.log*")]))
        await h.start()
        await h.wait_lines(500)
        written = 500
        with open(log, "ab") as writer, open(log, "rb") as source, open(tmp_path / "app.log.1", "wb") as copy:
            while block := source.read(4096):
                copy.write(block)
                copy.flush()
                if written < 1000:
                    writer.write(lines("a", written, 20))
                    writer.flush()
                    written += 20
                await asyncio.sleep(0.01)
            os.truncate(log, 0)
            os.lseek(writer.fileno(), 0, os.SEEK_SET)
            writer.write(lines("b", 0, 10))
        with open(tmp_path / "app.log.1", "ab") as copy:
            copy.write(b"end of the copy\n")
        await h.wait(lambda: {"b 9", "end of the copy"} <= set(h.bodies()), what="both files read to their end")
        bodies = h.bodies()
        # Lines written after the copy's end and before the truncation are in neither file (the window).
        copied = {int(b.split()[1]) for b in bodies if b.startswith("a ")}
        assert copied == set(range(max(copied) + 1)) and max(copied) >= 500
        assert sorted(bodies) == sorted([*expected("a", 0, max(copied) + 1), *expected("b", 0, 10), "end of the copy"])
        await h.stop()

    run(scenario())


def test_copytruncate_truncating_while_the_copy_is_compared_sends_each_line_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """logrotate truncates the file while the source compares the copy with it: the source found the original
    intact, then read it short (truncated meanwhile). That is the truncation, not a copy that differs: the copy
    must not be read from where the short read ended (under CPU load that sent 600 lines twice). The truncation
    is made at that very instant, right after the source's check of the original, from inside the check."""
    log, copy = tmp_path / "app.log", tmp_path / "app.log.1"
    log.write_bytes(lines("a", 0, 1000))
    truncated_at: list[int] = []
    check_of_the_original = identity.rewritten

    def check_then_truncate(t: Tailer, size: int) -> bool:
        result = check_of_the_original(t, size)
        if t.path == str(log) and not truncated_at:
            truncated_at.append(size)
            os.truncate(log, 0)  # logrotate's ftruncate, between the check and the read of the original
        return result

    monkeypatch.setattr(identity, "rewritten", check_then_truncate)

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "*")], exclude=["*.gz"]))
        await h.start()
        await h.wait_lines(1000)
        shutil.copyfile(log, copy)
        await h.wait(lambda: truncated_at, what="the source comparing the copy with the original")
        with open(log, "ab") as writer:
            writer.write(lines("b", 0, 10))
        with open(copy, "ab") as writer:
            writer.write(b"end of the copy\n")  # read after anything the copy would send twice
        await h.wait(lambda: {"b 9", "end of the copy"} <= set(h.bodies()), what="both files read to their end")
        assert sorted(h.bodies()) == sorted([*expected("a", 0, 1000), *expected("b", 0, 10), "end of the copy"])
        assert h.loss_reports() == []
        await h.stop()

    run(scenario())


def test_copytruncate_with_window_lines_read_before_the_copy_is_noticed_sends_each_line_once(tmp_path: Path) -> None:
    """The source read the lines written between the end of the copy and the truncation (the copytruncate
    window, in time for once) and notices the copy only with the file already truncated: the copy is shorter
    than what was read from the original. It is still that file's copy, with nothing left to read, not a new
    file read from its start (under CPU load that sent 2019 lines twice)."""
    log, copy = tmp_path / "app.log", tmp_path / "app.log.1"
    log.write_bytes(lines("a", 0, 1000))

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "*")], exclude=["*.gz"]))
        await h.start()
        await h.wait_lines(1000)
        copied = log.read_bytes()  # logrotate's copy is made now...
        with open(log, "ab") as writer:
            writer.write(lines("a", 1000, 5))  # ...the application writes on...
        await h.wait_lines(1005)  # ...and the source reads those lines before it notices the copy,
        copy.write_bytes(copied)  # which it first sees complete,
        os.truncate(log, 0)  # with the file already truncated
        with open(log, "ab") as writer:
            writer.write(lines("b", 0, 10))
        await h.wait(lambda: "b 9" in h.bodies(), what="the truncated file read again")
        with open(copy, "ab") as writer:
            writer.write(b"end of the copy\n")  # read after anything the copy would send twice
        await h.wait(lambda: "end of the copy" in h.bodies(), what="the end of the copy")
        assert sorted(h.bodies()) == sorted([*expected("a", 0, 1005), *expected("b", 0, 10), "end of the copy"])
        assert h.loss_reports() == []
        await h.stop()

    run(scenario())


def _logrotate() -> str:
    found = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
    assert found, "logrotate is needed (tools/setup-env installs it)"
    return found


def test_real_logrotate_copytruncate_with_an_include_matching_the_copies(tmp_path: Path) -> None:
    """The reviewer's setup: `dir/*` with `exclude = ["*.gz"]`, real logrotate (copytruncate, compress,
    delaycompress) run three times while the application writes. No line twice; the only lines missing were
    written while logrotate ran (the copytruncate window)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "app.log"
    log.write_bytes(b"")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n  copytruncate\n  rotate 5\n  compress\n  delaycompress\n  missingok\n}}\n")
    logrotate = [_logrotate(), "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)]

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(logs / "*")], exclude=["*.gz"]))
        await h.start()
        written = 0
        during_rotation: set[int] = set()

        async def write(count: int) -> list[int]:
            nonlocal written
            with open(log, "ab") as writer:
                writer.write("".join(f"line {i} {'x' * 90}\n" for i in range(written, written + count)).encode())
            written += count
            return list(range(written - count, written))

        for _ in range(3):
            for _ in range(20):  # about 200 KB: cp takes several writes
                await write(100)
                await asyncio.sleep(0.005)
            rotation = await asyncio.create_subprocess_exec(*logrotate)
            while rotation.returncode is None:
                during_rotation.update(await write(5))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(rotation.wait(), 0.002)
            assert rotation.returncode == 0
        await write(10)
        with open(logs / "app.log.1", "ab") as copy:
            copy.write(b"end of the copy\n")  # read after anything the copy would send twice
        await h.wait(
            lambda: {f"line {written - 1} {'x' * 90}", "end of the copy"} <= set(h.bodies()), what="the last lines"
        )
        bodies = h.bodies()
        bodies.remove("end of the copy")
        numbers = [int(b.split()[1]) for b in bodies]
        twice = sorted(n for n in set(numbers) if numbers.count(n) > 1)
        assert not twice, f"{len(twice)} lines sent twice, {twice[:3]}...{twice[-3:]}"
        assert set(range(written)) - set(numbers) <= during_rotation
        await h.stop()

    run(scenario())


def test_files_read_to_their_end_and_gone_while_stopped_are_not_losses(tmp_path: Path) -> None:
    """Deleted, compressed away or truncated while the agent was stopped, after it had read every line: no
    loss record (nothing the agent could read was lost)."""
    log, other, trunc = tmp_path / "app.log", tmp_path / "other.log", tmp_path / "trunc.log"
    cfg = files_config(tmp_path / "state", include=[str(tmp_path / "*.log")], rotate_wait=60)

    async def scenario() -> None:
        for path in (log, other, trunc):
            path.write_bytes(lines(path.stem, 0, 10))
        h = Harness(cfg)
        await h.start()
        await h.wait_lines(30)
        os.rename(log, tmp_path / "app.log.1")  # rotated while running, read to its end, still within rotate_wait
        log.write_bytes(lines("new", 0, 5))
        await h.wait_lines(35)
        assert h.source is not None
        await h.wait(lambda: h.source.status()["rotated_pending"] == 1, what="the rotated file")  # type: ignore[union-attr]
        await h.stop()
        (tmp_path / "app.log.1").unlink()  # compressed away by the next rotation
        other.unlink()
        os.truncate(trunc, 0)
        trunc.write_bytes(lines("trunc again", 0, 3))
        h = Harness(cfg)
        await h.start()
        with open(log, "ab") as writer:
            writer.write(b"after restart\n")
        bodies = await h.wait_lines(39)
        assert sorted(bodies) == sorted(
            [
                *expected("app", 0, 10),
                *expected("other", 0, 10),
                *expected("trunc", 0, 10),
                *expected("new", 0, 5),
                *expected("trunc again", 0, 3),
                "after restart",
            ]
        )
        assert h.loss_reports() == []
        await h.stop()

    run(scenario())


def test_copytruncate_while_stopped_with_lines_unread_is_reported_as_file_truncated(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    cfg = files_config(tmp_path / "state", include=[str(log)])

    async def scenario() -> None:
        log.write_bytes(lines("a", 0, 10))
        h = Harness(cfg)
        await h.start()
        await h.wait_lines(10)
        with open(log, "ab") as writer:
            writer.write(lines("a", 10, 5))
        await h.stop()  # before the source got to the new lines
        # copytruncate with `compress` and no `delaycompress`: the copy cannot be recognised.
        (tmp_path / "app.log.1.gz").write_bytes(gzip.compress(log.read_bytes()))
        os.truncate(log, 0)
        log.write_bytes(lines("b", 0, 3))
        h = Harness(cfg)
        await h.start()
        assert sorted(await h.wait_lines(13)) == sorted(expected("a", 0, 10) + expected("b", 0, 3))
        reports = await h.wait(h.loss_reports, what="a loss record")
        assert [r["attributes"]["edgeagent.loss.reason"] for r in reports] == ["file_truncated"]
        assert reports[0]["attributes"]["log.file.path"] == str(log)
        assert h.spool is not None and h.spool.counters().get("files_lost_file_truncated") == 1
        await h.stop()

    run(scenario())

"""The file source in-process (real files, real Spool/Batcher/SourceContext, one asyncio loop):
line splitting, limits, encodings, start positions, attributes, identity and restarts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_files_harness import BOOT_ID, Harness, files_config

from edgeagent.config import ConfigError, SpoolConfig, load, loads
from edgeagent.pipeline import SourceContext
from edgeagent.sources import inotify
from edgeagent.sources.files import KUBERNETES_PATH_REGEX, FileSource
from edgeagent.spool import Spool


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def replace_reusing_inode(path: Path, content: bytes) -> bool:
    """Delete `path` and create a new file there that gets the same inode number (True if it did)."""
    ino = path.stat().st_ino
    path.unlink()
    candidates = []
    for i in range(64):
        candidate = path.with_name(f".new-{i}")
        candidate.write_bytes(content)
        candidates.append(candidate)
        if candidate.stat().st_ino == ino:
            candidate.rename(path)
            break
    for candidate in candidates:
        candidate.unlink(missing_ok=True)
    return path.exists() and path.stat().st_ino == ino


def test_lines_crlf_empty_lines_and_attributes(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\r\ntwo\n\nthree\r\n")

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "*.log")], attributes={"team": "a"}))
        await h.start()
        await h.wait_lines(4)
        append(log, b"four\n")
        await h.wait_lines(5)
        records = h.records()
        assert [r["body"] for r in records] == ["one", "two", "", "three", "four"]
        attrs = records[0]["attributes"]
        assert attrs["log.file.path"] == str(log)
        assert attrs["log.file.name"] == "app.log"
        assert attrs["team"] == "a"
        assert records[0]["observed_time_unix_nano"] > 0
        assert h.source is not None and h.source.status()["inotify"] is True
        assert h.spool is not None
        assert h.spool.counters()["spooled_raw_bytes"] == len("onetwothreefour")
        await h.stop()

    run(scenario())


def test_partial_line_waits_for_newline_then_idle_timeout(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"done\nhalf")

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(log)], partial_line_timeout=60))
        await h.start()
        await h.wait_lines(1)
        append(log, b"-way")
        append(log, b" there\nnext")
        assert await h.wait_lines(2) == ["done", "half-way there"]
        await h.stop()
        # Restarted with a short idle timeout: the unfinished "next" is shipped once the writer is idle.
        h = Harness(files_config(tmp_path / "state", include=[str(log)], partial_line_timeout=0.2))
        await h.start()
        assert await h.wait_lines(3) == ["done", "half-way there", "next"]
        append(log, b" more\n")
        assert await h.wait_lines(4) == ["done", "half-way there", "next", " more"]
        await h.stop()

    run(scenario())


def test_over_long_lines_are_cut_marked_and_counted(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    long_line = b"x" * 5000
    # A line cut inside a multi-byte character must stay valid UTF-8.
    euro_line = "€" * 400  # 1200 bytes
    log.write_bytes(b"short\n" + long_line + b"\n" + euro_line.encode() + b"\nafter\n")

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(log)], max_line_size=1000))
        await h.start()
        await h.wait_lines(4)
        # A line still being written that is already longer than the limit is cut at once; the rest is dropped.
        append(log, b"y" * 3000)
        await h.wait_lines(5)
        append(log, b"y" * 10 + b"\nlast\n")
        records = [r for r in (await h.wait(lambda: len(h.records()) >= 6 and h.records())) if r["scope"]]
        bodies = [r["body"] for r in records]
        assert bodies[0] == "short"
        assert bodies[1] == "x" * 1000
        assert records[1]["attributes"]["edgeagent.line.truncated"] is True
        assert records[1]["attributes"]["edgeagent.line.original_bytes"] == 5000
        assert bodies[2] == "€" * 333
        assert bodies[3] == "after"
        assert "edgeagent.line.truncated" not in records[3]["attributes"]
        assert bodies[4] == "y" * 1000
        assert records[4]["attributes"]["edgeagent.line.truncated"] is True
        assert bodies[5] == "last"
        assert h.source is not None and h.source.status()["truncated_lines"] == 3
        await h.stop()
        assert h.spool is not None

    run(scenario())


def test_invalid_utf8_is_replaced_and_latin1_decoded(tmp_path: Path) -> None:
    bad = tmp_path / "bad.log"
    bad.write_bytes(b"ok \xc3\xa9\nbroken \xff\xfe here\n\xc3\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")

    async def scenario() -> None:
        cfg = files_config(tmp_path / "state", include=[str(bad)])
        h = Harness(cfg)
        await h.start()
        assert await h.wait_lines(3) == ["ok é", "broken \ufffd\ufffd here", "\ufffd"]
        assert h.source is not None and h.source.status()["invalid_encoding_lines"] == 2
        await h.stop()
        h = Harness(files_config(tmp_path / "state2", include=[str(latin)], encoding="latin-1"))
        await h.start()
        assert await h.wait_lines(1) == ["café"]
        await h.stop()

    run(scenario())


def test_multiline_joins_continuation_lines(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"2026-01-01 start\nTraceback:\n  at a\n  at b\n2026-01-01 second\n2026-01-01 third\n  cont\n")

    async def scenario() -> None:
        h = Harness(
            files_config(tmp_path / "state", include=[str(log)], multiline_start=r"\d{4}-", partial_line_timeout=0.3)
        )
        await h.start()
        # The last record may go on: it is shipped once the writer is idle.
        bodies = await h.wait_lines(3)
        assert bodies == [
            "2026-01-01 start\nTraceback:\n  at a\n  at b",
            "2026-01-01 second",
            "2026-01-01 third\n  cont",
        ]
        await h.stop()

    run(scenario())


def test_start_at_end_applies_only_to_files_present_at_first_start(tmp_path: Path) -> None:
    old = tmp_path / "old.log"
    old.write_bytes(b"history 1\nhistory 2\npartial")
    state = tmp_path / "state"

    async def scenario() -> None:
        cfg = files_config(state, include=[str(tmp_path / "*.log")], start_at="end")
        h = Harness(cfg)
        await h.start()
        await h.wait(lambda: h.source is not None and h.source.status()["files"] == 1)
        append(old, b" rest\nnew 1\n")
        (tmp_path / "fresh.log").write_bytes(b"fresh 1\n")
        # A line being written at the first start is shipped whole once it is complete.
        await h.wait_lines(3)
        assert sorted(h.bodies()) == ["fresh 1", "new 1", "partial rest"]
        await h.stop()
        # Stopped: a new file appears and the old one grows. Both are read from where the agent left off.
        (tmp_path / "later.log").write_bytes(b"later 1\n")
        append(old, b"new 2\n")
        h = Harness(cfg)
        await h.start()
        await h.wait_lines(5)
        assert sorted(h.bodies()) == ["fresh 1", "later 1", "new 1", "new 2", "partial rest"]
        await h.stop()

    run(scenario())


def test_path_attributes_kubernetes_and_custom(tmp_path: Path) -> None:
    pod = tmp_path / "pods" / "kube-system_coredns-5d78c9869d-abcde_0f8e2b4c-1111-2222-3333-444455556666" / "coredns"
    pod.mkdir(parents=True)
    (pod / "0.log").write_bytes(b"hello\n")

    async def scenario() -> None:
        h = Harness(
            files_config(tmp_path / "state", include=[str(tmp_path / "pods/*/*/*.log")], path_attributes="kubernetes")
        )
        await h.start()
        await h.wait_lines(1)
        attrs = h.records()[0]["attributes"]
        assert attrs["k8s.namespace.name"] == "kube-system"
        assert attrs["k8s.pod.name"] == "coredns-5d78c9869d-abcde"
        assert attrs["k8s.pod.uid"] == "0f8e2b4c-1111-2222-3333-444455556666"
        assert attrs["k8s.container.name"] == "coredns"
        # A new pod directory appears while running: found through the directory watches.
        other = tmp_path / "pods" / "default_web-1_aaaa" / "nginx"
        other.mkdir(parents=True)
        (other / "1.log").write_bytes(b"web\n")
        await h.wait_lines(2)
        assert h.records()[1]["attributes"]["k8s.pod.name"] == "web-1"
        await h.stop()

    run(scenario())
    assert re.search(KUBERNETES_PATH_REGEX, "/var/log/pods/ns_pod_uid/c/0.log")
    assert not re.search(KUBERNETES_PATH_REGEX, "/var/log/pods/ns_pod_uid/c/current.txt")


def test_custom_path_attributes_and_exclude(tmp_path: Path) -> None:
    (tmp_path / "svc-api.log").write_bytes(b"a\n")
    (tmp_path / "svc-db.log").write_bytes(b"b\n")
    (tmp_path / "svc-skip.log").write_bytes(b"c\n")

    async def scenario() -> None:
        h = Harness(
            files_config(
                tmp_path / "state",
                include=[str(tmp_path / "svc-*.log")],
                exclude=["*-skip.log"],
                path_attributes=r"svc-(?P<service__name>[a-z]+)\.log$",
            )
        )
        await h.start()
        await h.wait_lines(2)
        got = {r["body"]: r["attributes"]["service.name"] for r in h.records()}
        assert got == {"a": "api", "b": "db"}
        await h.stop()

    run(scenario())


def test_empty_files_and_a_thousand_files(tmp_path: Path) -> None:
    logs = tmp_path / "many"
    logs.mkdir()
    (logs / "empty.log").write_bytes(b"")
    for i in range(1000):
        (logs / f"f{i:04d}.log").write_bytes(f"file {i} line 1\n".encode())

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(logs / "*.log")]))
        await h.start()
        await h.wait_lines(1000, timeout=60)
        assert h.source is not None and h.source.status()["files"] == 1001
        append(logs / "empty.log", b"no longer empty\n")
        for i in range(0, 1000, 100):
            append(logs / f"f{i:04d}.log", f"file {i} line 2\n".encode())
        bodies = await h.wait_lines(1011, timeout=60)
        assert sorted(bodies) == sorted(
            [f"file {i} line 1" for i in range(1000)]
            + [f"file {i} line 2" for i in range(0, 1000, 100)]
            + ["no longer empty"]
        )
        await h.stop()

    run(scenario())


def test_crash_resumes_exactly_after_the_last_committed_line(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    state = tmp_path / "state"
    cfg = dataclasses.replace(files_config(state, include=[str(log)]), spool=SpoolConfig(flush_interval=1.0))

    async def scenario() -> None:
        written = 0
        for round_ in range(6):
            h = Harness(cfg)
            await h.start()
            lines = [f"line {written + i}" for i in range(500 + round_ * 137)]
            append(log, ("\n".join(lines) + "\n").encode())
            written += len(lines)
            if round_ % 2:
                # Crash once lines were handed to the batcher, before its timer commits them (a 1 s flush
                # interval, as in the agent).
                source = h.source
                assert source is not None and h.batcher is not None
                await h.wait(lambda s=source: s.status()["lines"] > 0)
                assert h.batcher.pending_records > 0
            await h.crash()
        h = Harness(cfg)
        await h.start()
        bodies = await h.wait_lines(written)
        assert bodies == [f"line {i}" for i in range(written)]
        await h.stop()

    run(scenario())


@pytest.mark.parametrize("reuse", ["real", "forged"])
def test_inode_reuse_does_not_resume_at_a_stale_offset(tmp_path: Path, reuse: str) -> None:
    """ "real": ext4 hands the freed inode to the next new file (skipped if another process on a busy
    machine takes it first). "forged": the stored position is moved onto the new file's inode, which is
    exactly what reuse looks like to the agent, so the check always runs."""
    log = tmp_path / "app.log"
    state = tmp_path / "state"
    cfg = files_config(state, include=[str(log)])

    async def scenario() -> None:
        log.write_bytes(b"old content line 1\nold content line 2\n")
        h = Harness(cfg)
        await h.start()
        await h.wait_lines(2)
        await h.stop()
        if reuse == "real":
            if not replace_reusing_inode(log, b"NEW 1\nNEW 2\nNEW 3\n"):
                pytest.skip("the freed inode was not handed to the new file")
        else:
            log.unlink()
            log.write_bytes(b"NEW 1\nNEW 2\nNEW 3\n")
            spool = Spool.open(state / "spool.db")
            ((key, value),) = spool.positions("file:").items()
            _, dev, _ino, fp = key.split(":")
            spool.delete_positions([key])
            spool.append(positions={f"file:{dev}:{log.stat().st_ino}:{fp}": value})
            spool.close()
        h = Harness(cfg)
        await h.start()
        bodies = await h.wait_lines(5)
        assert bodies == ["old content line 1", "old content line 2", "NEW 1", "NEW 2", "NEW 3"]
        # The old file is gone, but it had been read to its end when the agent stopped: nothing was lost.
        assert h.loss_reports() == []
        await h.stop()

    run(scenario())


def test_config_errors_name_the_key() -> None:
    text = '[[files]]\ninclude = ["/var/log/*.log"]\nencoding = "utf-16"\nstate_dir = "/tmp/x"\n'
    with pytest.raises(ConfigError, match=r"files\[0\]\.encoding = 'utf-16'.*ASCII-compatible"):
        FileSource(loads(text.replace('state_dir = "/tmp/x"\n', "")))
    with pytest.raises(ConfigError, match=r"files\[0\]\.encoding = 'klingon'"):
        FileSource(loads('[[files]]\ninclude = ["/a/*.log"]\nencoding = "klingon"\n'))
    with pytest.raises(ConfigError, match=r"files\[0\]\.max_line_size"):
        FileSource(loads('[[files]]\ninclude = ["/a/*.log"]\nmax_line_size = 0\n'))
    config = loads('[[files]]\ninclude = ["/a/*.log"]\nrotate_wait = "2s"\npoll_interval = "500ms"\n')
    assert config.files[0].rotate_wait == 2.0 and config.files[0].poll_interval == 0.5


def test_polling_fallback_without_inotify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> None:
        raise OSError("inotify is not available: test")

    monkeypatch.setattr(inotify, "Inotify", unavailable)
    log = tmp_path / "app.log"
    log.write_bytes(b"a\n")

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(log)], poll_interval=0.05, rescan_interval=0.2))
        await h.start()
        await h.wait_lines(1)
        append(log, b"b\n")
        await h.wait_lines(2)
        (tmp_path / "app.log").rename(tmp_path / "app.log.1")
        log.write_bytes(b"c\n")
        append(tmp_path / "app.log.1", b"b2\n")
        assert sorted(await h.wait_lines(4)) == ["a", "b", "b2", "c"]
        assert h.source is not None and h.source.status()["inotify"] is False
        await h.stop()

    run(scenario())


def test_inotify_wrapper_reports_events(tmp_path: Path) -> None:
    notify = inotify.Inotify()
    try:
        wd = notify.add_watch(str(tmp_path), inotify.IN_CREATE)
        (tmp_path / "x").write_bytes(b"")
        events = notify.read_events()
        assert [(e.wd, e.name) for e in events if e.mask & inotify.IN_CREATE] == [(wd, "x")]
        assert notify.read_events() == []
        with pytest.raises(OSError, match="inotify_add_watch"):
            notify.add_watch(str(tmp_path / "missing"), inotify.IN_MODIFY)
    finally:
        notify.close()
    assert os.path.exists(tmp_path / "x")


def test_idle_source_sleeps(tmp_path: Path) -> None:
    """Watching idle files costs no wake-ups beyond the rescan timer (inotify, no polling)."""
    logs = [tmp_path / f"{i}.log" for i in range(20)]
    for log in logs:
        log.write_bytes(b"line\npartial")

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(tmp_path / "*.log")], partial_line_timeout=0.1))
        await h.start()
        await h.wait_lines(40)  # the partial lines too, once idle
        source = h.source
        assert source is not None
        wakeups = 0
        work = source._work

        async def counting_work() -> None:
            nonlocal wakeups
            wakeups += 1
            await work()

        source._work = counting_work  # type: ignore[method-assign]
        await asyncio.sleep(1.5)
        assert wakeups <= 1, f"{wakeups} wake-ups in 1.5 s of idling"
        append(logs[3], b"\nmore\n")
        assert (await h.wait_lines(41))[-1] == "more"
        await h.stop()

    run(scenario())


def test_multiline_records_are_not_split_at_block_boundaries(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    records = [f"2026-01-01 record {i}\n" + "".join(f"  at frame {j}\n" for j in range(i % 40)) for i in range(12000)]
    log.write_bytes("".join(records).encode())  # several MiB: many 1 MiB blocks

    async def scenario() -> None:
        h = Harness(files_config(tmp_path / "state", include=[str(log)], multiline_start=r"\d{4}-"))
        await h.start()
        bodies = await h.wait_lines(len(records), timeout=60)
        assert bodies == [r.rstrip("\n") for r in records]
        await h.stop()

    run(scenario())


def test_restart_of_the_source_in_the_same_agent_reads_nothing_twice(tmp_path: Path) -> None:
    """The supervisor runs `run()` again after a failure; the batcher may still hold lines then."""
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(f"line {i}\n".encode() for i in range(100)))

    async def scenario() -> None:
        config = files_config(tmp_path / "state", include=[str(log)])
        h = Harness(dataclasses.replace(config, spool=SpoolConfig(flush_interval=600)))
        await h.start()
        assert h.source is not None and h.batcher is not None
        await h.wait(lambda: h.source.status()["lines"] == 100)  # type: ignore[union-attr]
        assert h.batcher.pending_records == 100  # handed over, not committed yet
        assert h.task is not None
        h.task.cancel()
        try:
            await h.task
        except asyncio.CancelledError:
            pass
        ctx = SourceContext(h.batcher, h.spool, BOOT_ID, h.config)  # type: ignore[arg-type]
        h.task = asyncio.create_task(h.source.run(ctx))
        await h.wait(lambda: h.source.status()["files"] == 1)  # type: ignore[union-attr]
        append(log, b"line 100\n")
        assert await h.wait_lines(101) == [f"line {i}" for i in range(101)]
        await h.stop()

    run(scenario())


def test_exclude_patterns_match_file_names_or_whole_paths(tmp_path: Path) -> None:
    """`exclude = ["*.gz"]` in a config file excludes .gz files wherever the config file is."""
    logs = tmp_path / "logs"
    (logs / "old").mkdir(parents=True)
    for name in ("app.log", "app.log.1.gz", "debug-1.log", "old/kept.log", "old/skipped.txt"):
        (logs / name).write_bytes(f"{name}\n".encode())
    conf = tmp_path / "etc" / "edgeagent.toml"
    conf.parent.mkdir()
    conf.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[kmsg]\nenabled = false\n[spool]\nflush_interval = "50ms"\n'
        f'[[files]]\ninclude = ["{logs}/*", "{logs}/old/*"]\nstart_at = "beginning"\n'
        'exclude = ["*.gz", "debug-*", "*/old/*.txt"]\n'
    )
    config = load(conf)

    async def scenario() -> None:
        h = Harness(config)
        await h.start()
        await h.wait_lines(2)
        with open(logs / "app.log", "ab") as writer:
            writer.write(b"last\n")
        assert sorted(await h.wait_lines(3)) == ["app.log", "last", "old/kept.log"]
        await h.stop()

    run(scenario())
    with pytest.raises(ConfigError, match=r"files\[0\]\.exclude = 'old/\*\.txt'.*'\*/old/\*'"):
        FileSource(dataclasses.replace(config, files=(dataclasses.replace(config.files[0], exclude=("old/*.txt",)),)))


def test_a_glob_whose_directory_does_not_exist_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "not-yet" / "*.log"
    present = tmp_path / "*.log"
    with caplog.at_level(logging.WARNING):
        FileSource(files_config(tmp_path / "state", include=[str(missing), str(present)]))  # at start
    assert [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()] == [
        f"files: files[0].include = '{missing}': the directory {tmp_path / 'not-yet'} does not exist; nothing "
        "matches until it is created (looked for every rescan_interval, 10s)"
    ]
    conf = tmp_path / "edgeagent.toml"
    conf.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[kmsg]\nenabled = false\n[upload]\nto = "none"\n'
        f'[[files]]\ninclude = ["{missing}"]\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "check-config", "-c", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"the directory {tmp_path / 'not-yet'} does not exist" in out.stderr

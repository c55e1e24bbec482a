"""Where the file source is in each file: what is stored, and resuming from it at start.

Positions: key `file:<dev>:<ino>:<fingerprint>`, value JSON
`{"offset": N, "path": P, "fp_len": L}` plus `"at"` (where the file is now, when
it was renamed), `"skip": true` (inside an over-long line that was cut) and
`"eof": true` (written at a clean stop: the file was read to its end, so its
disappearance while the agent is stopped loses nothing it could read).
`offset` is always the end of the last line emitted, and each position goes to
the spool with the lines read up to it (one transaction, guarantee 1). Marker
positions `files-section:<hash of include>` record that a section has been
scanned before, which is what `start_at` ("for files never seen before") keys
on. A position is dropped ("forgotten") only after what was read before it is
committed.

Owns `Stored` (a position read back) and the `Positions` part of
`FileSource`: at start every stored file is looked for where it was, then by
inode in its directory (renamed while stopped), then by fingerprint (copied and
truncated while stopped); what cannot be found is reported as a loss unless it
had been read to its end.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat

from edgeagent import loss
from edgeagent.clock import monotonic_ns
from edgeagent.records import Batch
from edgeagent.sources.files.discovery import SECTION_PREFIX, Group
from edgeagent.sources.files.identity import POSITION_PREFIX, file_fingerprint, stat_path
from edgeagent.sources.files.state import FileSourceState, log


class Stored:
    """A position read back from the spool at start."""

    __slots__ = ("at", "dev", "eof", "fp", "fp_len", "group", "ino", "key", "offset", "path", "skip")

    def __init__(self, key: str, value: str, groups: list[Group]) -> None:
        self.key = key
        _, dev, ino, fp = key.split(":")
        self.dev, self.ino, self.fp = int(dev), int(ino), fp
        data = json.loads(value)
        self.offset = int(data["offset"])
        self.path = str(data["path"])
        self.fp_len = int(data["fp_len"])
        self.at = str(data.get("at", self.path))
        self.skip = bool(data.get("skip", False))
        self.eof = bool(data.get("eof", False))  # read to its end when the agent stopped cleanly
        self.group = next((g for g in groups if g.matches(self.path)), None)


class Positions(FileSourceState):
    """Storing positions and resuming from them (a part of `FileSource`)."""

    def _store_read_to_end(self) -> None:
        """At a clean stop, mark the files read to their end: if such a file is gone at the next start, nothing
        the agent could have read was lost (lines written after the stop cannot be known, see docs/files.md)."""
        ctx = self._ctx
        for t in self._tailers.values():
            with contextlib.suppress(OSError):
                if ctx is not None and t.key and not t.skip and os.fstat(t.fd).st_size <= t.pos:
                    position = (t.key, t.position_value(read_to_end=True))
                    ctx.emit_nowait(Batch(self.name, [], monotonic_ns(), ctx.boot_id, t.attrs, position))

    def _restore(self) -> None:
        """Reopen every file behind a stored position, wherever rotation moved it."""
        ctx = self._require_ctx()
        ctx.forget_positions(list(dict.fromkeys(self._forget)))
        self._forget = []
        self._markers = set(ctx.positions(SECTION_PREFIX))
        entries: list[Stored] = []
        for key, value in ctx.positions(POSITION_PREFIX).items():
            try:
                entry = Stored(key, value, self._groups)
            except (ValueError, KeyError, TypeError) as e:
                log.error("files: stored position %s = %r is unreadable (%s); dropping it", key, value, e)
                self._forget.append(key)
                continue
            if entry.group is None:
                log.info("files: %s is no longer in any [[files]] section; dropping its position", entry.path)
                self._forget.append(key)
                continue
            entries.append(entry)
        # Newest first: after a fingerprint upgrade interrupted by a crash, two keys name one file; the larger
        # offset is the later one.
        entries.sort(key=lambda e: -e.offset)
        unresolved: list[Stored] = []
        for entry in entries:
            if not self._resume_in_place(entry):
                unresolved.append(entry)
        listings: dict[str, list[tuple[str, os.stat_result]]] = {}
        still: list[Stored] = []
        for entry in unresolved:
            if not self._resume_renamed(entry, listings):
                still.append(entry)
        for entry in still:
            self._resume_from_copy(entry, listings)

    def _resume_in_place(self, entry: Stored) -> bool:
        for path in dict.fromkeys((entry.at, entry.path)):
            st = stat_path(path)
            if st is None or (st.st_dev, st.st_ino) != (entry.dev, entry.ino) or st.st_size < entry.offset:
                continue
            found = file_fingerprint(path, entry.fp_len)
            if found is None:  # there, but not readable now: keep the position for the scan to retry
                self._unopened[(entry.dev, entry.ino)] = entry
                return True
            if found != entry.fp:
                continue
            if (entry.dev, entry.ino) in self._tailers:
                self._forget.append(entry.key)  # an older key of a file already resumed
                return True
            self._open_stored(entry, path)
            return True
        return False

    def _resume_renamed(self, entry: Stored, listings: dict[str, list[tuple[str, os.stat_result]]]) -> bool:
        """Rotated by rename while the agent was down: find the inode in the same directory."""
        for path, st in self._listing(entry, listings):
            if (st.st_dev, st.st_ino) != (entry.dev, entry.ino) or st.st_size < entry.offset:
                continue
            if file_fingerprint(path, entry.fp_len) != entry.fp:
                continue
            if (entry.dev, entry.ino) in self._tailers:
                self._forget.append(entry.key)
                return True
            self._stats["rotations"] += 1
            log.info("files: %s was rotated to %s while the agent was stopped; reading its rest", entry.path, path)
            self._open_stored(entry, path)
            return True
        return False

    def _resume_from_copy(self, entry: Stored, listings: dict[str, list[tuple[str, os.stat_result]]]) -> None:
        """Copied and truncated while the agent was down: the copy holds what was not read yet."""
        candidates = [
            (path, st)
            for path, st in self._listing(entry, listings)
            if (st.st_dev, st.st_ino) != (entry.dev, entry.ino)
            and st.st_size >= entry.offset
            and file_fingerprint(path, entry.fp_len) == entry.fp
        ]
        for path, st in sorted(candidates, key=lambda c: -c[1].st_mtime):
            if (st.st_dev, st.st_ino) in self._tailers:
                self._forget.append(entry.key)  # the copy is already tailed under its own position
                return
            self._stats["truncations"] += 1
            log.info("files: %s was copied to %s and truncated while the agent was stopped", entry.path, path)
            if self._open_stored(entry, path, copy=True):
                return
        self._forget.append(entry.key)
        truncated = any((st.st_dev, st.st_ino) == (entry.dev, entry.ino) for _, st in self._listing(entry, listings))
        if entry.eof:
            log.info(
                "files: %s, read to its end when the agent stopped, was %s while it was stopped",
                entry.path,
                "truncated" if truncated else "rotated away or deleted",
            )
        elif truncated:
            self._report_loss(
                entry.path,
                loss.FILE_TRUNCATED,
                f"edgeagent: {entry.path} was truncated while the agent was stopped and no copy of it was found "
                f"next to it; lines it got after byte {entry.offset}, if any, were not read",
            )
        else:
            self._report_loss(
                entry.path,
                loss.FILE_ROTATED_AWAY,
                f"edgeagent: {entry.path} was rotated or deleted while the agent was stopped and no file with its "
                f"identity is left in {os.path.dirname(entry.at)}; lines it got after byte {entry.offset}, if "
                "any, were not read",
            )

    def _listing(
        self, entry: Stored, listings: dict[str, list[tuple[str, os.stat_result]]]
    ) -> list[tuple[str, os.stat_result]]:
        out: list[tuple[str, os.stat_result]] = []
        for directory in dict.fromkeys((os.path.dirname(entry.at), os.path.dirname(entry.path))):
            listing = listings.get(directory)
            if listing is None:
                listing = listings[directory] = []
                try:
                    names = os.listdir(directory)
                except OSError:
                    names = []
                for name in names:
                    path = os.path.join(directory, name)
                    st = stat_path(path)
                    if st is not None and stat.S_ISREG(st.st_mode):
                        listing.append((path, st))
            out.extend(listing)
        return out

    def _open_stored(self, entry: Stored, path: str, copy: bool = False) -> bool:
        """Resume a stored position in the file at `path`. A file found but not readable now (permissions,
        descriptors) keeps its position: the scan retries it from there."""
        assert entry.group is not None
        t = self._open(entry.group, path, entry.offset, attrs_path=entry.path)
        if t is None:
            if not copy:
                self._unopened[(entry.dev, entry.ino)] = entry
            return False
        t.fp, t.fp_len, t.skip = entry.fp, entry.fp_len, entry.skip
        t.key = self._key(t)
        if copy:
            t.eof_release = True
        if t.key != entry.key:
            # A copy has an inode of its own: store its position under its real identity.
            self._emit(t, [])
            self._forget.append(entry.key)
        if not entry.group.matches(path):
            t.detached = True
        return True

    def _flush_forgets(self) -> None:
        """Drop positions of files let go (after what was read from them is committed)."""
        if not self._forget:
            return
        live = {t.key for t in self._tailers.values()}
        keys = [k for k in dict.fromkeys(self._forget) if k not in live]
        self._forget = []
        if keys:
            self._require_ctx().forget_positions(keys)

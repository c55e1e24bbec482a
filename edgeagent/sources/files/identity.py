"""Knowing files: identity, copies and truncation.

A file is known by device + inode + a fingerprint (a hash of its first 1 KiB,
or of its first bytes while it is shorter); its position is stored under that
key (`file:<dev>:<ino>:<fingerprint>`). An inode reused by a new file has
another fingerprint, so it is never resumed at the old file's offset.

Owns the `Identity` part of `FileSource`:
- fingerprints, computed when a file first has data and again when it reaches
  1 KiB (the position is stored under the new key before the old one is
  dropped);
- copies (copytruncate): a file that appears after a tailed file was read from
  and starts with everything read from it (or its first 1 KiB) is its copy,
  whatever its size when seen. It "shadows" the original: it is compared with
  it as it grows and nothing is read from it while it holds only the
  original's bytes; when the original is truncated or let go it is read from
  where the original had been read up to (its end if that is further), and
  where it differs it is read on its own from that line (an original found
  shorter while they are compared was truncated meanwhile: no difference). So
  `cp` still writing the copy when it is noticed, a writer still appending
  while it copies, and the truncation landing while the copy is compared send
  no line twice;
- truncation: the rest of what was not read is read from the copy (found by
  fingerprint next to the file, also when it is shorter than what was read:
  then nothing is left to read from it), else the loss is reported; then the
  file is read again from its start;
- letting go of rotated, deleted and copied files once read to their end.
"""

from __future__ import annotations

import os
import stat
import time
from typing import TYPE_CHECKING

from edgeagent import loss
from edgeagent.sources.files.state import FileSourceState, log

if TYPE_CHECKING:
    from edgeagent.sources.files.tail import Tailer

try:
    # hashlib itself would load OpenSSL (about 3.5 MiB of RSS) for a hash that CPython builds in.
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - Pythons built without the module
    from hashlib import blake2b

POSITION_PREFIX = "file:"
FINGERPRINT_SIZE = 1024  # bytes of a file's start that, with dev+inode, identify it
LEAD_SIZE = 64  # bytes of a file's start kept to rule out most copy candidates without a system call


def fingerprint(data: bytes) -> str:
    return blake2b(data, digest_size=8).hexdigest()


class Identity(FileSourceState):
    """Fingerprints, copies, truncation and letting go (a part of `FileSource`)."""

    def _key(self, t: Tailer) -> str:
        return f"{POSITION_PREFIX}{t.dev}:{t.ino}:{t.fp}"

    def _set_fingerprint(self, t: Tailer, size: int) -> None:
        """(Re)compute the fingerprint over the first bytes there are, up to FINGERPRINT_SIZE, and store
        the position under the new key before the old key is dropped."""
        n = min(size, FINGERPRINT_SIZE)
        head = os.pread(t.fd, n, 0)
        old = t.key
        t.fp, t.fp_len, t.lead = fingerprint(head), n, head[:LEAD_SIZE]
        t.key = self._key(t)
        if t.key != old:
            self._emit(t, [])
            if old:
                self._forget.append(old)

    def _identify(self, t: Tailer, size: int) -> bool:
        """Whether a new file can be read from its start now. A file whose first bytes equal everything read
        from a tailed file (or a whole fingerprint of it) is a copy of that file, whatever its size when it is
        seen: it then shadows the original (True). While its first bytes are only a beginning of such a file's
        (a copy still being written), it waits until they tell, or until its writer is idle."""
        if size == 0:
            return False
        head = os.pread(t.fd, min(size, FINGERPRINT_SIZE), 0)
        maybe = False
        for o in list(self._tailers.values()):
            if not 0 <= o.first_read < t.born or not o.pos or not o.fp_len or o.copy_of is not None:
                continue
            verdict = self._copy_verdict(head, o)
            if verdict is None:  # `o` was rewritten in place: its truncation is handled first, then this file
                self._dirty.update({o: None, t: None})
                return False
            if verdict == "copy":
                self._shadow(t, o, min(o.pos, FINGERPRINT_SIZE))
                return True
            maybe = maybe or verdict == "maybe"
        deadline = t.grew_mono + t.group.cfg.partial_line_timeout
        if maybe and time.monotonic() < deadline:
            self._arm_timer(t, deadline)
            return False
        t.unidentified = False
        return True

    def _copy_verdict(self, head: bytes, o: Tailer) -> str | None:
        """Whether a file starting with `head` is a copy of `o`: "copy", "maybe" (too short to tell), "no",
        or None when `o` itself changed at its start (truncated, not handled yet)."""
        if o.lead is None:
            intact = self._intact_head(o, 0)
            if intact is None:
                return None
            o.lead = intact[:LEAD_SIZE]
        if not head.startswith(o.lead[: len(head)]):
            return "no"  # the usual case, without a system call
        n = min(o.pos, FINGERPRINT_SIZE)
        theirs = self._intact_head(o, n)
        if theirs is None:
            return None
        if len(head) >= n:
            return "copy" if head[:n] == theirs[:n] else "no"
        return "maybe" if theirs.startswith(head) else "no"

    def _intact_head(self, t: Tailer, n: int) -> bytes | None:
        """The first `n` bytes of `t` (fewer if shorter), None if its fingerprinted start changed."""
        data = os.pread(t.fd, max(n, t.fp_len), 0)
        return data if fingerprint(data[: t.fp_len]) == t.fp else None

    def _shadow(self, copy: Tailer, original: Tailer, verified: int) -> None:
        copy.unidentified = False
        copy.copy_of, copy.verified = original, verified
        self._copies.add(copy)
        self._stats["copies_recovered"] += 1
        log.info("files: %s is a copy of %s; it is read only where it differs", copy.at, original.at)

    def _follow_original(self, t: Tailer, size: int) -> bool:
        """Compare the next block of a copy with its original. While the copy holds nothing but the original's
        bytes, reading the original is enough; it stops being a copy where it differs, or when the original
        is truncated or let go (`_unshadow`). True when there is more to compare."""
        o = t.copy_of
        assert o is not None
        o_size = os.fstat(o.fd).st_size
        if rewritten(o, o_size):  # truncated (copytruncate): that is handled first, then this file
            self._dirty.update({o: None, t: None})
            return False
        end = min(size, o_size)
        if t.verified < end:
            n = min(end - t.verified, t.group.block_size)
            mine, theirs = os.pread(t.fd, n, t.verified), os.pread(o.fd, n, t.verified)
            if mine != theirs:
                if rewritten(o, os.fstat(o.fd).st_size):
                    # Truncated after the check above, before or while its bytes were read (logrotate runs
                    # meanwhile): `theirs` came short, which is no difference. The truncation is handled first.
                    self._dirty.update({o: None, t: None})
                    return False
                self._diverged(t, t.verified + first_difference(mine, theirs))
                return True
            t.verified += n
            return t.verified < end
        if size > o_size:
            self._diverged(t, o_size)
            return True
        if t.detached:  # a copy deleted or renamed away before its original was truncated: nothing to read
            self._close(t)
        return False

    def _diverged(self, t: Tailer, at: int) -> None:
        """`t` differs from its original at byte `at`: its lines from the one holding that byte are its own."""
        back = max(0, at - t.group.block_size)
        nl = os.pread(t.fd, at - back, back).rfind(b"\n")
        start = back + nl + 1 if nl >= 0 else back
        assert t.copy_of is not None
        log.info("files: %s differs from %s at byte %d; reading it from byte %d", t.at, t.copy_of.at, at, start)
        self._copies.discard(t)
        t.copy_of = None
        t.pos = start

    def _unshadow(self, original: Tailer, pos: int) -> bool:
        """The original was truncated or let go after `pos` bytes were read: its copies go on from there.
        True if it had any."""
        copies = [c for c in self._copies if c.copy_of is original]
        for c in copies:
            self._copies.discard(c)
            c.copy_of = None
            c.pos = min(pos, os.fstat(c.fd).st_size)
            self._dirty[c] = None
        return bool(copies)

    def _truncated(self, t: Tailer, seen_size: int) -> None:
        """The file was truncated or rewritten in place (copytruncate): read what was not read yet from the
        copy if one is next to it, then read the file again from its start."""
        self._stats["truncations"] += 1
        old_key, old_fp, old_len, old_pos, old_size = t.key, t.fp, t.fp_len, t.pos, seen_size
        log.info("files: %s was truncated at byte %d; reading it again from the start", t.at, old_pos)
        recovered = self._unshadow(t, old_pos)
        if old_fp and not recovered:
            recovered = self._recover_from_copy(t, old_fp, old_len, old_pos)
        if not recovered and old_size > old_pos and old_fp:
            self._report_loss(
                t.path,
                loss.FILE_TRUNCATED,
                f"edgeagent: {t.path} was truncated before its last {old_size - old_pos} bytes were read, "
                "and no copy of it was found next to it",
            )
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        t.pos, t.skip, t.fp, t.fp_len, t.key, t.lead, t.first_read = 0, False, "", 0, "", None, -1
        t.size = 0
        if old_key:
            self._forget.append(old_key)

    def _recover_from_copy(self, t: Tailer, fp: str, fp_len: int, pos: int) -> bool:
        """Find the copy of the content `t` had (by fingerprint, next to the file or to the name it was
        found under) and read it from `pos`. True if the rest is taken care of."""
        paths: list[str] = []
        for directory in dict.fromkeys((os.path.dirname(t.at), os.path.dirname(t.path))):
            try:
                paths.extend(os.path.join(directory, name) for name in os.listdir(directory))
            except OSError:
                continue
        candidates: list[tuple[float, str, os.stat_result]] = []
        for path in paths:
            st = stat_path(path)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size < fp_len:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident == t.ident or file_fingerprint(path, fp_len) != fp:
                continue
            tailed = self._tailers.get(ident)
            if tailed is not None and tailed.unidentified:  # a copy the include globs match, not read yet
                # From where this file had been read up to; from its end if this file was read further (lines
                # written after the copy was made, before the truncation, read here before it was truncated).
                tailed.unidentified, tailed.pos = False, min(pos, st.st_size)
                tailed.skip = t.skip and st.st_size >= pos
                self._stats["copies_recovered"] += 1
                return True
            if st.st_size < pos:
                continue
            if tailed is not None:  # the copy is tailed already (and known as one)
                return True
            candidates.append((st.st_mtime, path, st))
        for _, path, _ in sorted(candidates, reverse=True):
            copy = self._open(t.group, path, pos, attrs_path=t.path)
            if copy is None:
                continue
            copy.fp, copy.fp_len, copy.skip = fp, fp_len, t.skip
            copy.key = self._key(copy)
            copy.eof_release = True
            copy.detached = not t.group.matches(path)
            self._emit(copy, [])
            self._stats["copies_recovered"] += 1
            log.info("files: reading the rest of %s from its copy %s (from byte %d)", t.path, path, pos)
            return True
        return False

    def _release(self, t: Tailer) -> None:
        """Let go of a rotated, deleted or copied file that was read to its end."""
        if t.eof_release and t.group.matches(t.at):
            # A copy that the section's globs match: keep tailing it as a file of its own.
            t.eof_release = t.detached = False
            return
        self._close(t)
        if t.key:
            self._forget.append(t.key)


def stat_path(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def rewritten(t: Tailer, size: int) -> bool:
    """Whether the file is shorter than what was read from it, or its first bytes changed (truncated)."""
    return size < t.pos or bool(t.fp_len and (size < t.fp_len or fd_fingerprint(t.fd, t.fp_len) != t.fp))


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def fd_fingerprint(fd: int, n: int) -> str:
    return fingerprint(os.pread(fd, n, 0))


def file_fingerprint(path: str, n: int) -> str | None:
    """Fingerprint of the first `n` bytes of `path`; "" if it is shorter, None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        data = os.pread(fd, n, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return fingerprint(data) if len(data) == n else ""

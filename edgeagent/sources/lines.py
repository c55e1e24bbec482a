"""Line handling shared by the sources that read text (files, syslog, journald).

Owns turning raw bytes into record bodies: splitting complete lines, cutting
over-long ones, making them valid UTF-8, marking what was cut, and grouping
lines into multiline records. Nothing here keeps state or touches files.

Invariants:
- A cut never splits a UTF-8 sequence (`cut_utf8`), and a cut body is never
  longer than the limit.
- Bodies come out as valid UTF-8: decoded from a declared ASCII-compatible
  encoding, or with invalid bytes replaced by U+FFFD; never dropped.
- Every cut body becomes a record marked `edgeagent.line.truncated`, with
  `edgeagent.line.original_bytes` when the full length is known
  (`loss.truncated`; guarantee 5: no silent loss); the caller counts them.
"""

from __future__ import annotations

import re

from edgeagent import loss
from edgeagent.records import Record


def cut_utf8(line: bytes, limit: int) -> bytes:
    """`line` cut to at most `limit` bytes, not inside a UTF-8 sequence."""
    end = limit
    while end > 0 and (line[end] & 0xC0) == 0x80 and limit - end < 3:
        end -= 1
    return line[:end]


def last_line_end(data: bytes, force: bool) -> int:
    """Index of the newline ending the last complete line in `data` (-1: none). With `force`, the end of
    `data` ends a line too."""
    if force:
        return len(data) - 1 if data.endswith(b"\n") else len(data)
    return data.rfind(b"\n")


def may_have_long_line(seg: bytes, limit: int) -> bool:
    """False when no line of `seg` can be longer than `limit`: a longer line would cover a whole aligned
    window of (limit + 1) // 2 bytes without a newline. A few memchr calls instead of a len() per line."""
    window = max((limit + 1) // 2, 1)
    find = seg.find
    return any(find(b"\n", start, start + window) < 0 for start in range(0, len(seg) - window + 1, window))


def split_lines(data: bytes, end: int, limit: int, truncated: dict[int, int]) -> tuple[list[bytes], int]:
    """The complete lines of `data[:end]` as line bodies, `end` being the index of the last newline in
    `data` or `len(data)` (see `last_line_end`): CRLF ends a line too, lines longer than `limit` are cut
    (their index -> original length added to `truncated`). Also returns the bodies' total length when it is
    known without a pass over them (-1 otherwise).

    Without CRs, `data` is split whole and the part after `end` dropped: copying `data[:end]` first was a
    fifth of the CPU of reading and splitting a file (BENCHMARKS.md, "Issue 15, stop 22")."""
    if b"\r" in data:
        data = data[:end].replace(b"\r\n", b"\n")
        if data.endswith(b"\r"):
            data = data[:-1]
        end = len(data)
    lines = data.split(b"\n")
    if end < len(data):
        del lines[-1]  # the start of a line that goes on after this read
    if end > limit and may_have_long_line(data, limit) and max(map(len, lines)) > limit:
        for i, line in enumerate(lines):
            if len(line) > limit:
                lines[i] = cut_utf8(line, limit)
                truncated[i] = len(line)
    return lines, -1 if truncated else end - len(lines) + 1


def to_utf8(lines: list[bytes], encoding: str | None, joined: bytes | None = None) -> tuple[list[bytes], int]:
    """`lines` as valid UTF-8 (the same list when they are), and how many had invalid bytes (replaced with
    U+FFFD). `encoding`: the lines' ASCII-compatible encoding, None for UTF-8; `joined`: the lines joined by
    newlines, when the caller has it (one validation for the whole block)."""
    if encoding is not None:
        return [line.decode(encoding, "replace").encode() for line in lines], 0
    try:
        (joined if joined is not None else b"\n".join(lines)).decode()
        return lines, 0
    except UnicodeDecodeError:
        pass
    out = []
    bad = 0
    for line in lines:
        try:
            line.decode()
            out.append(line)
        except UnicodeDecodeError:
            out.append(line.decode("utf-8", "replace").encode())
            bad += 1
    return out, bad


def marked_records(lines: list[bytes], truncated: dict[int, int]) -> list[Record]:
    """Records for `lines`; those in `truncated` (index -> original length, negative if unknown) marked."""
    records = []
    for i, line in enumerate(lines):
        original = truncated.get(i)
        # A negative length is unknown: the rest is skipped as it arrives.
        records.append(Record(line) if original is None else Record(line, attributes=loss.truncated(original)))
    return records


def multiline_records(
    data: bytes, cut: int, start: re.Pattern[bytes], limit: int, force: bool, full: bool
) -> tuple[list[bytes], dict[int, int], int]:
    """Group the complete lines of `data` (up to the newline at `cut`) into records: a line matching `start`
    begins one, the others join it with a newline. Returns the complete records (cut to `limit`), the cut
    ones (index -> original length) and how many bytes of `data` they used (0: none complete yet).

    `force`: the writer is idle, or the data is let go: the last record is complete. `full`: `data` fills a
    whole read, so a record that starts in it and does not end in it is over-long and is emitted (cut) now.
    """
    raw = data[:cut].split(b"\n")
    match = start.match
    starts = [0] + [i for i in range(1, len(raw)) if match(raw[i])]
    ends = [*starts[1:], len(raw)]
    if force:
        complete = len(starts)
    else:
        complete = len(starts) - 1  # the last record may go on in lines not read or written yet
        last_bytes = sum(len(line) + 1 for line in raw[starts[-1] :])
        if last_bytes > limit or (complete == 0 and full):
            complete = len(starts)  # already too long (or fills a block): emit it (cut) now
    if complete == 0:
        return [], {}, 0
    consumed = sum(len(line) + 1 for line in raw[: ends[complete - 1]])
    if force:
        consumed = min(consumed, len(data))
    records: list[bytes] = []
    truncated: dict[int, int] = {}
    for i in range(complete):
        body = b"\n".join(line[:-1] if line.endswith(b"\r") else line for line in raw[starts[i] : ends[i]])
        if len(body) > limit:
            truncated[i] = len(body)
            body = cut_utf8(body, limit)
        records.append(body)
    return records, truncated, consumed

"""`split_lines` splits a whole read and drops what follows the last complete line, instead of splitting a
copy of the complete part: it must give exactly what splitting that copy gave, for every read a file source
can make (partial last lines, CRLF and lone CRs, over-long lines, empty lines, non-ASCII bytes), with and
without `force` (the writer went idle: the end of the data ends a line)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgeagent.sources.lines import cut_utf8, last_line_end, split_lines


def split_copy(seg: bytes, limit: int) -> tuple[list[bytes], dict[int, int], int]:
    """The specification: what splitting `data[:end]` gave (the code before stop 22, written plainly)."""
    if b"\r" in seg:
        seg = seg.replace(b"\r\n", b"\n")
        if seg.endswith(b"\r"):
            seg = seg[:-1]
    lines = seg.split(b"\n")
    truncated = {}
    for i, line in enumerate(lines):
        if len(line) > limit:
            lines[i] = cut_utf8(line, limit)
            truncated[i] = len(line)
    return lines, truncated, -1 if truncated else len(seg) - len(lines) + 1


@settings(max_examples=600, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"a", b"bc", b"\n", b"\r", b"\r\n", "é".encode(), b"x" * 9]), max_size=40).map(
        b"".join
    ),
    force=st.booleans(),
    limit=st.integers(min_value=1, max_value=12),
)
@example(data=b"ab\ncd", force=False, limit=8)  # a partial last line
@example(data=b"ab\ncd\n", force=True, limit=8)  # ends with its newline
@example(data=b"\nxxxxxxxxxxxxxxxxxxxx", force=False, limit=4)  # an empty line, then a long partial one
@example(data=b"ab\r\ncd\r", force=False, limit=8)  # a CR in the part that goes on
@example(data=b"xxxxxxxxxx\nab", force=False, limit=4)  # an over-long complete line
def test_split_lines_gives_what_splitting_the_complete_part_gave(data: bytes, force: bool, limit: int) -> None:
    end = last_line_end(data, force)
    if end < 0:
        return  # no complete line: the source does not split
    truncated: dict[int, int] = {}
    lines, raw_bytes = split_lines(data, end, limit, truncated)
    assert (lines, truncated, raw_bytes) == split_copy(data[:end], limit)

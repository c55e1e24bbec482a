"""Loss records (guarantee 5): one helper builds them all, with one set of
attribute names; docs/losses.md lists every kind. The real spool paths (an
eviction, a salvage, a refusal) are run through it here; each source's loss has
its own test next to that source (kmsg, syslog, journald, files)."""

from __future__ import annotations

import ast
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from edgeagent import loss
from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher, UploaderContext
from edgeagent.records import SEVERITY_WARN, Batch, Record
from edgeagent.spool import Spool

PACKAGE = REPO / "edgeagent"
COUNTS = (loss.RECORDS, loss.CHUNKS, loss.BYTES)


def assert_loss_shape(record: Record) -> None:
    assert record.severity == SEVERITY_WARN and record.severity_text == "WARN"
    assert isinstance(record.body, str) and record.body
    attributes = record.attributes or {}
    assert attributes[loss.REASON] in loss.KINDS
    assert next(iter(attributes)) == loss.REASON
    for name in COUNTS:
        if name in attributes:
            value = attributes[name]
            assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, (name, value)
    if loss.SOURCE in attributes:
        assert attributes[loss.SOURCE] in ("kmsg", "files", "syslog", "journald")


def test_a_loss_record_has_one_shape_whatever_its_kind() -> None:
    for kind in loss.KINDS:
        record = loss.record(kind, f"lost some ({kind})", records=3, chunks=None, byte_count=0, source="files")
        assert_loss_shape(record)
        assert record.attributes == {loss.REASON: kind, loss.RECORDS: 3, loss.BYTES: 0, loss.SOURCE: "files"}
    detailed = loss.record(loss.REJECTED, "refused", detail="x" * 2000, extra={"k": "v"}, time_mono_ns=5)
    assert detailed.attributes == {loss.REASON: loss.REJECTED, loss.DETAIL: "x" * 500, "k": "v"}
    assert detailed.time_mono_ns == 5
    with pytest.raises(ValueError, match="unknown loss kind"):
        loss.record("lost_somehow", "?")


def test_a_cut_line_is_marked_not_reported() -> None:
    assert loss.truncated() == {loss.LINE_TRUNCATED: True}
    assert loss.truncated(-1) == {loss.LINE_TRUNCATED: True}
    assert loss.truncated(3000) == {loss.LINE_TRUNCATED: True, loss.LINE_ORIGINAL_BYTES: 3000}


def _strings_outside_the_helper() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "loss.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.setdefault(node.value, set()).add(str(path.relative_to(REPO)))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "loss":
                found.setdefault("loss." + node.attr, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_loss_kind_is_built_by_the_helper() -> None:
    """No module writes a loss attribute by hand, and every kind the helper
    knows is emitted somewhere through it."""
    found = _strings_outside_the_helper()
    by_hand = {s: where for s, where in found.items() if s.startswith("edgeagent.loss.")}
    assert by_hand == {}
    kinds = {name for name, value in vars(loss).items() if isinstance(value, str) and value in loss.KINDS}
    assert {getattr(loss, k) for k in kinds} == set(loss.KINDS)
    unused = sorted(k for k in kinds if "loss." + k not in found)
    assert unused == []


def test_the_docs_table_lists_every_kind_and_attribute() -> None:
    text = (REPO / "docs" / "losses.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|", text, re.M)
    assert [r for r in rows if r in loss.KINDS] == list(loss.KINDS)
    names = {
        v for v in vars(loss).values() if isinstance(v, str) and v.startswith(("edgeagent.loss.", "edgeagent.line"))
    }
    missing = sorted(n for n in names if n not in text and n.rpartition(".")[2] not in ("records", "chunks", "bytes"))
    assert missing == []


def test_the_spool_and_the_receivers_losses_go_through_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Record] = []
    real = loss.record

    def spy(*args: Any, **kwargs: Any) -> Record:
        record = real(*args, **kwargs)
        built.append(record)
        return record

    monkeypatch.setattr(loss, "record", spy)
    # spool_full: a spool far smaller than what is written.
    spool = Spool.open(tmp_path / "small" / "spool.db", max_size=1024 * 1024)
    batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", SpoolConfig(chunk_max_records=1000))
    rng = random.Random(1)
    for i in range(30):
        lines = [rng.randbytes(60).hex().encode() for _ in range(1000)]
        batcher.add(Batch("files", lines, 0, "boot", position=("f", str(i))))
    # rejected: the receiver refuses a chunk for good.
    shipped: list[Record] = []
    ctx = UploaderContext(spool, None, lambda record, counters: shipped.append(record), 60.0)  # type: ignore[arg-type]
    ctx.reject([spool.oldest(1)[0].id], "HTTP 400 Bad Request")
    ctx.report_rejected(2, "partial success: 2 rejected", [])
    spool.close()
    # spool_corrupt: a file that is not a database at all.
    corrupt = tmp_path / "corrupt" / "spool.db"
    corrupt.parent.mkdir()
    corrupt.write_bytes(os.urandom(8192))
    again = Spool.open(corrupt)
    Batcher(again, ChunkEncoder({}, "t"), "boot", SpoolConfig()).ship_spool_losses()
    again.close()

    kinds = [r.attributes[loss.REASON] for r in built]  # type: ignore[index]
    assert {loss.SPOOL_FULL, loss.SPOOL_CORRUPT, loss.REJECTED} <= set(kinds)
    assert shipped and all(any(r is b for b in built) for r in shipped), "a refusal report not built by the helper"
    for record in built:
        assert_loss_shape(record)
    full = next(r for r in built if r.attributes[loss.REASON] == loss.SPOOL_FULL)  # type: ignore[index]
    assert set(full.attributes or {}) >= {loss.RECORDS, loss.CHUNKS, loss.BYTES, loss.OLDEST_UNIX_NANO}

"""The end-to-end acknowledgement contract: what a receiver's answer does to the chunks.

Every uploader turns what its transport said about a set of chunks (an MQTT
PUBACK's reason code; an HTTP status with its OTLP partial success) into one
`Outcome`, and `settle` alone acts on it, against the spool through the
`UploaderContext` (as Vector's sinks report each batch's `EventStatus` and one
place finalizes it). The rules, the same for every uploader:

- `Delivered`: the receiver acknowledged. The chunks are deleted from the spool
  now and never before (guarantee 2), the retry backoff is reset, and a
  credentials problem is over. Records the receiver says it dropped anyway
  (`rejected_records`, OTLP partial success) are counted and shipped as a loss
  record (guarantee 5); they are never sent again.
- `Retry(reason, after)`: nothing changes in the spool; the chunks go again,
  under the same chunk ids, after the backoff (at least `after` seconds when
  the receiver asked for it, capped by `[upload].retry_max`).
  `credentials=True`: the receiver refused who we are, not what we sent (HTTP
  401/403/407, MQTT 0x87): `status` shows it until a delivery succeeds, and the
  chunks are never dead-lettered for it.
- `Rejected(reason)`: refused for good. The chunks move to the dead letters,
  counted, and a loss record reports them (`edgeagent.refusals`).
- `Split(reason, max_raw, certain)`: too large for the receiver. Each chunk
  (above `max_raw` protobuf bytes, when given) is replaced in the spool by
  parts (halves, or parts of at most `max_raw` bytes) with the ids
  `<chunk_id>.<n>`, in the upload order behind what is queued; every record is
  in exactly one part. A chunk that cannot be split (a single record, or
  records that cannot be walked) is rejected when the receiver certainly
  cannot take it (`certain`: it refused that chunk alone, or announced its
  limit); otherwise it stays as it is and the receiver decides. A chunk that
  cannot be decoded is rejected.

Without an acknowledgement nothing is deleted: OTLP/HTTP maps a failed
exchange (connection refused, reset, timeout) to `Retry`; MQTT settles nothing
for chunks whose connection ended (its session reconnects with its own
backoff); an agent killed settles nothing at all. The chunks stay in the spool
and are sent again under the same chunk ids (at-least-once; receivers drop
resends by chunk id).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from edgeagent.codec import CannotSplit, ChunkPart, CorruptChunk
from edgeagent.pipeline import UploaderContext
from edgeagent.spool import StoredChunk
from edgeagent.uploaders import Backoff

log = logging.getLogger(__name__)


class Delivered(NamedTuple):
    rejected_records: int = 0  # dropped by the receiver all the same (partial success)
    message: str = ""  # the receiver's reason for those


class Retry(NamedTuple):
    reason: str
    after: float | None = None  # the receiver asked to wait at least this long
    credentials: bool = False


class Rejected(NamedTuple):
    reason: str


class Split(NamedTuple):
    reason: str
    max_raw: int | None = None  # None: halves
    certain: bool = True  # the receiver can never take the chunk whole


Outcome = Delivered | Retry | Rejected | Split


@dataclass(slots=True)
class Settled:
    """What `settle` did, for the uploader's counters and status."""

    acked: int = 0  # chunks deleted on acknowledgement
    acked_records: int = 0
    dead_lettered: int = 0
    dead_letter_reason: str = ""
    split: int = 0  # chunks replaced by parts
    retry_in: float | None = None  # Retry: seconds until the next attempt


def settle(ctx: UploaderContext, chunks: Sequence[StoredChunk], outcome: Outcome, backoff: Backoff) -> Settled:
    """Act on `outcome` for `chunks` (see the module docstring)."""
    match outcome:
        case Delivered():
            return _delivered(ctx, chunks, outcome, backoff)
        case Retry():
            if outcome.credentials:
                ctx.credentials_refused(outcome.reason)
            return Settled(retry_in=backoff.failed(outcome.after))
        case Rejected():
            return _rejected(ctx, chunks, outcome.reason)
        case Split():
            return _split(ctx, chunks, outcome)


def _delivered(ctx: UploaderContext, chunks: Sequence[StoredChunk], outcome: Delivered, backoff: Backoff) -> Settled:
    acked = ctx.spool.ack([c.id for c in chunks])
    ctx.credentials_accepted()
    backoff.succeeded()
    if outcome.rejected_records > 0:
        # The chunks are gone either way: OTLP forbids retrying a partial success,
        # and the receiver would refuse the same records again.
        message = outcome.message or "partial success without a message"
        ctx.report_rejected(outcome.rejected_records, message, chunks)
        log.warning(
            "the receiver accepted chunk(s) %s but rejected %d of %d records: %s",
            ",".join(c.chunk_id for c in chunks),
            outcome.rejected_records,
            sum(c.records for c in chunks),
            outcome.message or "(no message)",
        )
    return Settled(acked=acked, acked_records=sum(c.records for c in chunks))


def _rejected(ctx: UploaderContext, chunks: Sequence[StoredChunk], reason: str) -> Settled:
    return Settled(dead_lettered=ctx.reject([c.id for c in chunks], reason), dead_letter_reason=reason)


def _split(ctx: UploaderContext, chunks: Sequence[StoredChunk], outcome: Split) -> Settled:
    settled = Settled()
    for chunk in chunks:
        try:
            parts = _parts(ctx, chunk, outcome.max_raw)
        except (CannotSplit, CorruptChunk) as e:
            if isinstance(e, CannotSplit) and not outcome.certain:
                continue  # the receiver decides
            reject = _rejected(ctx, [chunk], f"{outcome.reason}; cannot split: {e}")
            settled.dead_lettered += reject.dead_lettered
            settled.dead_letter_reason = reject.dead_letter_reason
            continue
        if parts:
            ctx.spool.split(chunk, parts)
            settled.split += 1
            log.info("%s; split chunk %s into %d parts", outcome.reason, chunk.chunk_id, len(parts))
    return settled


def _parts(ctx: UploaderContext, chunk: StoredChunk, max_raw: int | None) -> list[ChunkPart]:
    """The parts `chunk` becomes; none when it fits `max_raw` already."""
    if max_raw is None:
        return list(ctx.codec.split(chunk.payload))
    if ctx.codec.raw_size(chunk.payload) <= max_raw:
        return []
    return ctx.codec.split_to_fit(chunk.payload, max_raw)

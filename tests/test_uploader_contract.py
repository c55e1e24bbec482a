"""The delivery contract both uploaders share, one test body per guarantee,
run against every backend (as litestream's `RunWithReplicaClient` runs one
test against every replica client): MQTT with a real mosquitto, OTLP/HTTP with
the real local receiver (see tests/contract_backends.py).

The contract (docs/design.md guarantees 2 and 5): a chunk leaves the spool only
on the receiver's acknowledgement, not when it is sent; what was not
acknowledged when the agent died is sent again after a restart under the same
chunk id; a chunk the receiver finds too large is split and every record
arrives once (a receiver that drops resends by chunk id keeps each record
once); a permanent refusal moves the chunk to the dead letters and ships a loss
record; a refusal of the credentials keeps the chunks, is retried and shown in
status, and never makes a dead letter; chunks go out oldest first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import spool_records, wait_for
from contract_backends import BACKENDS, Backend, ContractHarness, Delivery, attributes
from mqtt_helpers import line_text

MakeHarness = Callable[[], ContractHarness]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    chosen = BACKENDS[request.param](tmp_path, request)
    yield chosen
    chosen.close()


@pytest.fixture
def make_harness(backend: Backend, tmp_path: Path) -> Iterator[MakeHarness]:
    """Builds the in-process uploader of `backend` (start its receiver first); closed before the receiver."""
    running: list[ContractHarness] = []

    def factory() -> ContractHarness:
        harness = ContractHarness(tmp_path / "state", backend.config(), backend)
        running.append(harness)
        return harness

    yield factory
    for harness in running:
        harness.close()


def first_copies(deliveries: list[Delivery]) -> list[Delivery]:
    """What a receiver that drops resends by chunk id keeps, in arrival order."""
    seen: dict[str, Delivery] = {}
    for delivery in deliveries:
        seen.setdefault(delivery.chunk_id, delivery)
    return list(seen.values())


def line_numbers(deliveries: list[Delivery]) -> list[int]:
    return [int(line.split()[1]) for d in deliveries for line in d.lines() if line.startswith("line ")]


def delivered_lines(backend: Backend, count: int) -> bool:
    return sorted(set(line_numbers(backend.deliveries()))) == list(range(count))


def test_a_chunk_is_deleted_on_acknowledgement_not_on_send(backend: Backend, make_harness: MakeHarness) -> None:
    backend.receiver()
    h = make_harness()
    h.start()
    wait_for(lambda: backend.ready(h.status()), what="uploader ready")
    backend.hold()
    try:
        h.add_lines(0, 3000, 1000)
        chunk_ids = h.chunk_ids()
        wait_for(lambda: backend.unacknowledged(h.status()), what="chunks sent, no acknowledgement yet")
        assert h.status()[backend.sent_key] >= 1
        assert h.chunk_ids() == chunk_ids and h.counters().get("acked_chunks", 0) == 0
    finally:
        backend.release()
    h.wake()
    wait_for(lambda: h.backlog()["chunks"] == 0, 60, what="acknowledged after the receiver answers")
    wait_for(lambda: delivered_lines(backend, 3000), what="every line at the receiver")
    assert {d.chunk_id for d in backend.deliveries()} == set(chunk_ids)
    assert h.counters()["acked_chunks"] == 3 and h.dead_letters() == []


def test_chunks_unacknowledged_at_a_sigkill_are_resent_after_restart_with_the_same_chunk_id(
    backend: Backend, make_agent: Any, tmp_path: Path
) -> None:
    backend.receiver()
    log_file = tmp_path / "app.log"
    log_file.write_bytes(b"")
    # File lines written to the spool like kernel messages (hold_file_lines = 0): the RAM path is
    # test_holding's test_sigkill_while_lines_wait_in_ram_sends_them_again_under_the_same_chunk_id.
    config = backend.config().replace("[spool]\n", '[spool]\nhold_file_lines = "0s"\n', 1)
    agent = make_agent(config + f'[[files]]\ninclude = ["{log_file}"]\nstart_at = "beginning"\n')
    agent.start()
    wait_for(lambda: backend.ready(agent.status().get("uploader", {})), 30, what="agent ready to send")
    backend.hold()
    try:
        log_file.write_bytes(b"".join(line_text(n) + b"\n" for n in range(500)))
        wait_for(lambda: backend.unacknowledged(agent.status().get("uploader", {})), 30, what="chunk sent")
        wait_for(lambda: len(spool_records(agent.state_dir)) == 500, 30, what="the unacknowledged chunk written")
        in_spool = spool_records(agent.state_dir)
        assert sorted(int(r["body"].split()[1]) for r in in_spool) == list(range(500))
        chunk_ids = {r["chunk_id"] for r in in_spool}
        agent.kill()  # between send and acknowledgement: no flush, no goodbye
    finally:
        backend.release()

    assert {r["chunk_id"] for r in spool_records(agent.state_dir)} == chunk_ids
    agent.start()
    wait_for(lambda: spool_records(agent.state_dir) == [], 30, what="resent and acknowledged after the restart")
    wait_for(lambda: delivered_lines(backend, 500), what="every line at the receiver")
    deliveries = backend.deliveries()
    # A copy the receiver took before the kill and the resend carry the same id and the same records.
    assert {d.chunk_id for d in deliveries} == chunk_ids
    for chunk_id in chunk_ids:
        assert len({tuple(d.lines()) for d in deliveries if d.chunk_id == chunk_id}) == 1
    assert sorted(line_numbers(first_copies(deliveries))) == list(range(500))
    assert agent.stop() == 0


def test_a_chunk_too_large_for_the_receiver_is_split_and_every_record_arrives_once(
    backend: Backend, make_harness: MakeHarness
) -> None:
    backend.receiver("too_large")
    h = make_harness()
    h.add_lines(0, 4000, 2000)  # two chunks of about 15 KB compressed, above SIZE_LIMIT
    originals = h.chunk_ids()
    h.start()
    wait_for(lambda: h.backlog()["chunks"] == 0, 60, what="every part acknowledged")
    wait_for(lambda: delivered_lines(backend, 4000), what="every line at the receiver")
    kept = first_copies(backend.deliveries())
    assert sorted(line_numbers(kept)) == list(range(4000))  # once each: no record in two parts
    # Parts keep the original chunk id with a suffix, so receivers can still deduplicate.
    assert kept and all(d.chunk_id.split(".")[0] in originals and "." in d.chunk_id for d in kept)
    assert h.status()[backend.splits_key] >= 2 and h.dead_letters() == []


def test_a_permanent_refusal_dead_letters_the_chunk_and_ships_a_loss_record(
    backend: Backend, make_harness: MakeHarness
) -> None:
    backend.receiver("refuses_for_good")  # the first chunk, then it accepts everything
    h = make_harness()
    h.add_lines(0, 10, 10)
    (refused,) = h.chunk_ids()
    h.start()
    wait_for(lambda: [d["chunk_id"] for d in h.dead_letters()] == [refused], what="the chunk dead-lettered")

    def loss_records() -> list[dict[str, Any]]:
        found = [attributes(r) for d in backend.deliveries() for r in d.records]
        return [a for a in found if "edgeagent.loss.reason" in a]

    wait_for(loss_records, what="the loss record at the receiver")
    (loss,) = loss_records()
    assert loss["edgeagent.loss.reason"] == "rejected" and loss["edgeagent.loss.records"] == 10
    h.add_lines(10, 10, 10)  # the queue moves on
    wait_for(lambda: h.backlog()["chunks"] == 0 and line_numbers(backend.deliveries()), what="the next chunk")
    assert sorted(line_numbers(backend.deliveries())) == list(range(10, 20))  # the refused lines never arrived
    counters = h.counters()
    assert counters["dead_letter_chunks"] == 1 and counters["dead_letter_records"] == 10
    assert h.status().get("credentials_error") is None


def test_a_credentials_refusal_is_retried_shown_in_status_and_never_dead_lettered(
    backend: Backend, make_harness: MakeHarness
) -> None:
    backend.receiver("refuses_credentials")
    h = make_harness()
    h.add_lines(0, 200, 100)
    chunk_ids = h.chunk_ids()
    h.start()
    wait_for(lambda: h.status()[backend.refused_key] >= 3, 30, what="refusals, retried")
    st = h.status()
    assert backend.credentials_words in (st["credentials_error"] or "") and st["credentials_error_since"]
    assert h.dead_letters() == [] and h.chunk_ids() == chunk_ids
    assert h.counters().get("dead_letter_chunks", 0) == 0 and backend.deliveries() == []

    backend.fix_credentials()
    h.wake()
    wait_for(lambda: h.backlog()["chunks"] == 0, 60, what="delivered once the credentials are accepted")
    wait_for(lambda: delivered_lines(backend, 200), what="every line at the receiver")
    st = h.status()
    assert st["credentials_error"] is None and h.dead_letters() == []


def test_chunks_go_out_oldest_first(backend: Backend, make_harness: MakeHarness) -> None:
    backend.receiver()
    h = make_harness()
    h.add_lines(0, 32_000, 400)  # more than one MQTT window and more than one coalesced HTTP request
    chunk_ids = h.chunk_ids()
    assert len(chunk_ids) == 80
    h.start()
    wait_for(lambda: h.backlog()["chunks"] == 0, 60, what="spool drained")
    wait_for(lambda: len(first_copies(backend.deliveries())) == 80, what="every chunk at the receiver")
    kept = first_copies(backend.deliveries())
    assert [d.chunk_id for d in kept] == chunk_ids
    assert line_numbers(kept) == list(range(32_000))

"""Physical-limit references, measured in the same run as the scenarios.

Each reference runs as its own process (this file as a script: `references.py
NAME CORPUS [PORT]`), measured from outside like the agent (CPU, peak RSS,
disk written); its wall time is measured inside, from the first read to the
last byte handled, so interpreter start-up is not in it. It prints one JSON
object.

- read_split: read the corpus in 256 KiB blocks and split it into lines.
- zstd_cli: `zstd -3` over the whole corpus (to a file).
- zstd_batches: zstd level 3 of the raw text in 1000-line batches: the size
  ratio the wire and the spool can hope for.
- sqlite: read + split + zstd-3 batches of the agent's chunk size + insert
  into SQLite (WAL, synchronous=FULL, one transaction per batch), then select
  and delete each batch in its own transaction (what upload + ack do).
- paho_publish: the compressed batches published to the same mosquitto
  through the counting proxy with a bare paho loop, QoS 1, the agent's window
  of in-flight messages, waiting for every PUBACK.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

READ_SIZE = 256 * 1024
# edgeagent's defaults for [spool].chunk_max_bytes, chunk_max_records and [upload].window: the harness checks
# them against the agent's config before it runs a reference (`scenarios.check_reference_defaults`). Until
# stop 22 the chunk size was 2 MiB, the agent's default for the first 12 minutes of this file's life: the
# sqlite reference then did an eighth of the agent's transactions, about 0.07 CPU s less (BENCHMARKS.md).
CHUNK_MAX_BYTES = 256 * 1024
CHUNK_MAX_RECORDS = 20000
WINDOW = 8


def iter_lines(corpus: Path) -> Any:
    """Blocks of lines (lists of bytes), the way a file source reads them."""
    carry = b""
    with open(corpus, "rb") as f:
        while block := f.read(READ_SIZE):
            data = carry + block
            end = data.rfind(b"\n")
            if end < 0:
                carry = data
                continue
            carry = data[end + 1 :]
            yield data[:end].split(b"\n")


def iter_chunks(corpus: Path) -> Any:
    """Raw text of agent-sized chunks: up to `CHUNK_MAX_BYTES` or `CHUNK_MAX_RECORDS` lines."""
    pending: list[bytes] = []
    size = 0
    for lines in iter_lines(corpus):
        for line in lines:
            pending.append(line)
            size += len(line)
            if size >= CHUNK_MAX_BYTES or len(pending) >= CHUNK_MAX_RECORDS:
                yield b"\n".join(pending)
                pending, size = [], 0
    if pending:
        yield b"\n".join(pending)


def read_split(corpus: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    lines = 0
    for block in iter_lines(corpus):
        lines += len(block)
    return {"wall_s": time.perf_counter() - t0, "lines": lines}


def zstd_batches(corpus: Path) -> dict[str, Any]:
    import zstandard

    compress = zstandard.ZstdCompressor(level=3).compress
    t0 = time.perf_counter()
    raw = packed = 0
    batch: list[bytes] = []
    for block in iter_lines(corpus):
        for line in block:
            batch.append(line)
            if len(batch) == 1000:
                text = b"\n".join(batch)
                raw += len(text)
                packed += len(compress(text))
                batch = []
    if batch:
        text = b"\n".join(batch)
        raw += len(text)
        packed += len(compress(text))
    return {"wall_s": time.perf_counter() - t0, "raw_bytes": raw, "zstd_bytes": packed, "ratio": packed / raw}


def sqlite_spool(corpus: Path, db: Path) -> dict[str, Any]:
    import zstandard

    compress = zstandard.ZstdCompressor(level=3).compress
    t0 = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB NOT NULL)")
    chunks = 0
    for text in iter_chunks(corpus):
        payload = compress(text)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO chunks (payload) VALUES (?)", (payload,))
        conn.execute("COMMIT")
        chunks += 1
    inserted = time.perf_counter() - t0
    sent = 0
    while True:
        row = conn.execute("SELECT id, payload FROM chunks ORDER BY id LIMIT 1").fetchone()
        if row is None:
            break
        sent += len(row[1])
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM chunks WHERE id = ?", (row[0],))
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"wall_s": time.perf_counter() - t0, "insert_s": inserted, "chunks": chunks, "payload_bytes": sent}


def paho_publish(corpus: Path, port: int) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    import zstandard

    compress = zstandard.ZstdCompressor(level=3).compress
    payloads = [compress(text) for text in iter_chunks(corpus)]
    acked: set[int] = set()
    connected = False

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        nonlocal connected
        connected = not reason.is_failure

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        acked.add(mid)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paho-reference", protocol=5)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.max_inflight_messages_set(WINDOW)
    t0 = time.perf_counter()
    client.connect("127.0.0.1", port)
    while not connected:
        client.loop(0.1)
    mids = set()
    for payload in payloads:
        mids.add(client.publish("bench/reference", payload, qos=1).mid)
        while len(mids - acked) >= WINDOW:
            client.loop(0.1)
    while not mids <= acked:
        client.loop(0.1)
    wall = time.perf_counter() - t0
    client.disconnect()
    return {"wall_s": wall, "messages": len(payloads), "payload_bytes": sum(map(len, payloads))}


def main(argv: list[str]) -> int:
    name, corpus = argv[0], Path(argv[1])
    if name == "read_split":
        result = read_split(corpus)
    elif name == "zstd_batches":
        result = zstd_batches(corpus)
    elif name == "sqlite":
        result = sqlite_spool(corpus, Path(argv[2]))
    elif name == "paho_publish":
        result = paho_publish(corpus, int(argv[2]))
    else:
        print(f"references.py: unknown reference {name!r}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

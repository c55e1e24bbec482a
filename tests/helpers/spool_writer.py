"""A spool writer for crash tests: appends numbered records through the real
Batcher + Spool, with the position after each record, until killed.

usage: spool_writer.py STATE_DIR RECORDS_PER_BATCH
Records are the decimal sequence numbers 0, 1, 2, ...; the stored position
"test" is the next number to write.
"""

import sys
from pathlib import Path

from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher
from edgeagent.records import Batch
from edgeagent.spool import Spool

state_dir = Path(sys.argv[1])
per_batch = int(sys.argv[2])
spool = Spool.open(state_dir / "spool.db")
next_seq = int(spool.positions("test").get("test", "0"))
config = SpoolConfig(chunk_max_records=per_batch * 3)
batcher = Batcher(spool, ChunkEncoder({"device.id": "t"}, "test"), "boot", config)
print("ready", flush=True)
while True:
    lines = [str(n).encode() for n in range(next_seq, next_seq + per_batch)]
    next_seq += per_batch
    batcher.add(Batch("test", lines, 0, "boot", position=("test", str(next_seq))))

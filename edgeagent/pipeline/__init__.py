"""The pipeline between sources, the spool and the uploader.

Concurrency model: one asyncio event loop in the main thread runs everything —
sources wait on their file descriptors (`loop.add_reader`), the batcher's age
flush is a loop timer, the uploader drives its network client from the loop,
signals arrive through `loop.add_signal_handler`. Nothing polls: an idle agent
sleeps in epoll until a descriptor, a timer or a signal wakes it.

The spool is called synchronously from the loop: its calls are bounded local
disk I/O (about one synced commit a second while data flows), and one thread
owning the one SQLite connection rules out a whole class of locking bugs.
Work that can block on the network for long (a TCP/TLS connect, an HTTP
request) goes to `asyncio.to_thread` with a timeout. The one other thread
compresses full chunks (`codec.BackgroundCompressor`: zstd releases the GIL,
so it uses the second core) while the loop reads and encodes the next one;
its results come back to the loop, which commits them in order.

Sources hand `Batch`es to `SourceContext.emit`; the `Batcher` groups them into
chunks by record count, raw bytes and age, encodes them into chunk payloads
(`edgeagent.codec`: OTLP protobuf in one zstd frame), and appends each chunk with the positions it
covers in one spool transaction. The uploader reads chunks back from the spool
through `UploaderContext`.

Flash (issue 16): while an uploader is attached and delivery keeps up, the
batcher hands chunks to the spool's RAM tier (`Spool.hold`) instead of writing
them; the uploader sends them from there, and an acknowledged chunk never
reaches flash — only its positions do, every 30 s (`edgeagent.holding`).
What is not acknowledged in time is written: file lines (still in their files,
on a disk) after `[spool].hold_file_lines`, every other record (kernel
messages, syslog, the agent's own) within `flush_interval` of being read, as
before. Counters, forgotten positions (a file rotated away or deleted), a
boot's clock and CRIT+ records that no input keeps are written at once, synced.
Commits of file lines only are not synced: a lost one is read again.
"""

from edgeagent.pipeline.batcher import Batcher
from edgeagent.pipeline.contexts import SourceContext, UploaderContext
from edgeagent.pipeline.interfaces import AGENT_SOURCE, WAKE_ASKED, WAKE_DATA, WAKE_NETWORK, Source, Uploader

__all__ = [
    "AGENT_SOURCE",
    "WAKE_ASKED",
    "WAKE_DATA",
    "WAKE_NETWORK",
    "Batcher",
    "Source",
    "SourceContext",
    "Uploader",
    "UploaderContext",
]

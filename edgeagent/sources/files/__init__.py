"""The file source: tails the files of every `[[files]]` section through rotation.

Owns everything about local log files; docs/files.md states the guarantees.
Its parts, each a module with the invariants it keeps:

- `discovery`: finding files (include/exclude globs, re-scanned, watched) and
  where to start in a new one;
- `identity`: knowing them (device + inode + a fingerprint of the first
  bytes), copies (copytruncate) and truncation, letting go of rotated files;
- `tail`: reading them, a block at a time, into records (line handling shared
  with other sources lives in `edgeagent.sources.lines`);
- `positions`: what is stored per file, committed with the lines read up to
  it, and resuming from it at start, wherever rotation moved the file;
- `state`: what the parts share; `source`: `FileSource`, the main loop and
  its wake-ups.

Only `edgeagent.sources` imports this package, and only when `[[files]]` is
configured.
"""

from edgeagent.sources.files.discovery import KUBERNETES_PATH_REGEX
from edgeagent.sources.files.identity import FINGERPRINT_SIZE, fingerprint
from edgeagent.sources.files.source import FileSource

__all__ = ["FINGERPRINT_SIZE", "KUBERNETES_PATH_REGEX", "FileSource", "fingerprint"]

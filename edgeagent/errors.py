"""Every exception edgeagent defines, in one tree, with who raises and who catches it.

    EdgeagentError
    ├── ConfigError ............ bad config: names the file, line, key and value, and what was expected
    │   └── StateDirError ...... state_dir unsafe or unusable (symlink, group/other writable, not a dir)
    ├── AlreadyRunning ......... another agent holds state_dir/edgeagent.lock
    ├── RestartRequired ........ a new config needs TLS this process kept out: the agent restarts itself
    ├── TlsFileError ........... a TLS file (CA, certificate, key) cannot be used: names its key (a ValueError)
    ├── SpoolError ............. the spool can never be used as it is (newer schema, no state dir)
    │   └── SpoolUnavailable ... the spool cannot be used right now (disk full, EIO, read-only, locked)
    ├── TransportError ......... the way to the broker or collector failed, or the peer broke the protocol
    │   ├── ConnectFailed ...... no accepted CONNACK (refused, TLS, timeout, closed early)
    │   ├── PacketTooLarge ..... the broker sent more than we declared we accept (also a ConnectionAbortedError)
    │   └── ProtocolError ...... an HTTP answer we cannot read or that exceeds a bound
    ├── FleetConfigRejected .... a remote (fleet) config is refused; the running config stays
    │   ├── EnvelopeError ...... not a valid, verified envelope (size, JSON, scope, version, signature)
    │   └── PolicyError ........ the layer sets a key the local [fleet] policy does not allow (`key`)
    ├── CorruptChunk ........... a chunk payload that cannot be decoded (not zstd, damaged, too big; a ValueError)
    ├── CannotSplit ............ a chunk of one record: there is nothing to split (a ValueError)
    ├── DecodeError ............ bytes that are not the OTLP protobuf we expect (also a ValueError)
    ├── MalformedRecord ........ a /dev/kmsg record that does not follow the documented format (a ValueError)
    ├── OperatorError .......... `edgeagent fleet ...` (the operator's side) cannot do what was asked
    └── CliError ............... a command fails; carries the exit code

Who raises and who catches:
- ConfigError: `config.load` and the checks that need more than TOML (sources, uploaders, MQTT files).
  Caught by the CLI (exit 2, `check-config` and `run`), by a reload (refused, the running config stays,
  `status` shows it) and by fleet config (the remote layer is rejected). StateDirError: `statedir.prepare`;
  exit 2 like any config error.
- AlreadyRunning: `statedir.RunLock.acquire`, at once, never waiting; the CLI exits 1 naming the pid.
- RestartRequired: `Agent.apply_config`, once the new config was checked whole (with TLS, in a child) and
  the agent began a clean stop to execute itself again with TLS (`tls`). Caught by the reload (nothing
  more to do) and by `fleet.device` (the probation goes on after the restart, `prepare_restart`).
- TlsFileError: `tls.client_context` and `tls.ContextKeeper.context` (a file missing, unreadable, not PEM,
  a key without its certificate). Caught by the config check (a ConfigError naming the key), by the MQTT
  session's connection attempt and the OTLP/HTTP uploader (shown in `status` as the last error; the data is
  kept and the attempt retried with backoff) and by the fleet operator (an OperatorError).
- SpoolError: `Spool.open` (newer schema, state dir cannot be created, the schema child failed); the CLI
  exits 1. SpoolUnavailable: `Spool.open`, with the files left as they were; the agent waits it out (1 s
  doubling to 30 s, shown in `status`). A write that fails the same way (`Spool.append`) raises the plain
  `sqlite3.OperationalError`: nothing was stored, the batcher keeps the batch, pauses the sources and
  retries. Acks and rejects never raise for a full disk.
- Spool corrupt is no exception outside the spool: SQLITE_CORRUPT / SQLITE_NOTADB, a failed quick_check or
  a failed checksum (`spool.is_corruption`) make the spool quarantine the file and salvage it, and the loss
  is shipped as a `spool_corrupt` loss record (`loss`). A chunk whose checksum fails is dropped and counted.
- TransportError: ConnectFailed from `mqtt.link`, caught by the MQTT session's reconnect loop (backoff,
  `status`); PacketTooLarge from `mqtt.client` inside paho's read, which drops the connection (the session
  reconnects and says why); ProtocolError from `uploaders.http11`, caught by the OTLP/HTTP uploader as a
  network failure (connection closed, retried with backoff). The standard library's OSError (ssl.SSLError,
  ConnectionError), TimeoutError and EOFError are transport errors too and are caught in the same places.
  A broker or collector is untrusted: nothing it sends stops the agent or loses data.
- Peer refusals are not exceptions: an answer (HTTP 401/403/407, MQTT 0x87: credentials; 413 / 0x95: too
  large; other 4xx / reason codes: rejected) is a delivery outcome the uploader settles: credentials keep
  the data and retry, too large splits the chunk, rejected moves it to dead letters and ships a
  `rejected` loss record (`refusals`).
- FleetConfigRejected: EnvelopeError from `fleet.envelope` (decode, verify, key files) and PolicyError from
  `fleet.policy.check`, caught by `fleet.device`, which rejects that version, reports it on the status
  topic and keeps the running config; the operator CLI shows EnvelopeError as an OperatorError.
- CorruptChunk: `codec` (decode, records, count, split, shift, request bodies), for any payload it
  cannot decode, never zstd's or protobuf's own errors. Caught by the uploaders (the chunk is moved to
  the dead letters and counted: it can never be sent), by `refusals` (not a report) and by `spool dump`
  (the chunk is named on stderr, the rest is shown). CannotSplit: `codec.split`/`split_to_fit`; the
  MQTT uploader dead-letters a one-record chunk over the broker's limit, the OTLP/HTTP uploader sends it
  as it is and lets the collector decide.
- DecodeError: `otlp` decoding. Caught by `codec` (turned into CorruptChunk) and where OTLP answers are
  read (the answer is treated as carrying no partial success).
- MalformedRecord: `sources.kmsg.parse_record`; the kmsg source logs it, ships its raw text marked
  `kmsg.malformed`, counts it (`kmsg_malformed`) and reads on; it is never taken for a gap.
- OperatorError: `fleet.operator`; its command exits 1. CliError: `cli` commands; `cli.main` prints it
  and exits with its code.

Errors private to one module (`spool.database._Corrupt`, `uploaders.otlp_http._CorruptChunk`,
`sources.kmsg._DeviceFailed`, `sources.syslog_parse._Malformed`) never leave it and are not listed.
Each class is importable from this module and, as before, from the module that raises it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paho.mqtt.properties import Properties


class EdgeagentError(Exception):
    """The root of every exception edgeagent defines (see the module docstring)."""


# --- configuration ----------------------------------------------------------------


class ConfigError(EdgeagentError):
    """A configuration problem, worded for the person who wrote the file."""


class StateDirError(ConfigError):
    """The state dir cannot be used safely (exit 2, like a config error)."""


class AlreadyRunning(EdgeagentError):
    """Another agent holds the run lock of this state dir."""


class RestartRequired(EdgeagentError):
    """A new config needs TLS, which this process kept out (edgeagent.tls): the
    agent is stopping cleanly to start again with it."""


# --- the spool --------------------------------------------------------------------


class TlsFileError(EdgeagentError, ValueError):
    """A TLS file that cannot be used, named by its key (`key = 'path': expected ...`)."""

    def __init__(self, key: str, path: str, expected: str) -> None:
        super().__init__(f"{key} = {path!r}: expected {expected}")
        self.key, self.path, self.expected = key, path, expected


class SpoolError(EdgeagentError):
    """The spool cannot be used (newer schema, unwritable state dir)."""


class SpoolUnavailable(SpoolError):
    """The spool cannot be opened or written right now (disk full, I/O error,
    read-only file system, permission, locked). Nothing was changed: wait and
    retry. Never a reason to quarantine."""


# --- transport ---------------------------------------------------------------------


class TransportError(EdgeagentError):
    """The connection to a broker or collector failed, or the peer broke the protocol."""


class ConnectFailed(TransportError):
    """A connection attempt that did not end in an accepted CONNACK (the message
    is for status); `slow_down` is the minimum wait the broker asked for."""

    def __init__(self, message: str, slow_down: float | None = None, properties: Properties | None = None) -> None:
        super().__init__(message)
        self.slow_down = slow_down
        self.properties = properties


class PacketTooLarge(TransportError, ConnectionAbortedError):
    """The broker sent a packet larger than the Maximum Packet Size we declared."""


class ProtocolError(TransportError):
    """The server's answer is not HTTP/1.x as we understand it, or exceeds a bound."""


# --- fleet config ------------------------------------------------------------------


class FleetConfigRejected(EdgeagentError):
    """A remote config layer is refused; the running config stays."""


class EnvelopeError(FleetConfigRejected):
    """The payload is not an acceptable desired config; the text says why."""


class PolicyError(FleetConfigRejected):
    """The remote layer breaks the local policy; `key` is the first offending key."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        super().__init__(f"{key} = {value!r}: {why}")
        self.key = key


# --- bad input from the wire and the kernel ------------------------------------------


class CorruptChunk(EdgeagentError, ValueError):
    """A payload that cannot be decoded. `index` is the payload's position
    when one of several (`request_body`) failed."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class CannotSplit(EdgeagentError, ValueError):
    """A chunk of a single record: there is nothing to split."""


class DecodeError(EdgeagentError, ValueError):
    """Bytes that are not the OTLP protobuf we expect."""


class MalformedRecord(EdgeagentError, ValueError):
    """A kmsg record that does not follow the documented format."""


# --- command line ------------------------------------------------------------------


class OperatorError(EdgeagentError):
    """The operator's fleet command cannot do what was asked."""


class CliError(EdgeagentError):
    """A command failed; `code` is the exit status (1: runtime, 2: config)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code

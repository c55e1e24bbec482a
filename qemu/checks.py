"""Pure checks of what the host received against what the guest saw (no QEMU,
no broker: unit-tested in the default suite).

A received record is a dict as `edgeagent.otlp.decode_request` yields it, plus
`chunk_id` (the MQTT user property of the message that carried it).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

# Syslog level -> OTLP severity number, as docs/kmsg.md specifies.
SEVERITY = {0: 21, 1: 21, 2: 21, 3: 17, 4: 13, 5: 10, 6: 9, 7: 5}


def kmsg_by_key(records: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Kernel records by (boot.id, kmsg.sequence); a key with two records was delivered twice."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        attrs = r.get("attributes", {})
        if r.get("scope") == "edgeagent/kmsg" and "kmsg.sequence" in attrs:
            out[(attrs["boot.id"], int(attrs["kmsg.sequence"]))].append(r)
    return out


def unescape_kmsg(text: str) -> str:
    """The kernel writes non-printable bytes as \\xNN in /dev/kmsg; the agent decodes them."""
    if "\\x" not in text:
        return text
    raw = bytearray()
    i = 0
    data = text.encode()
    while i < len(data):
        if data[i : i + 2] == b"\\x" and i + 4 <= len(data):
            try:
                raw.append(int(data[i + 2 : i + 4], 16))
                i += 4
                continue
            except ValueError:
                pass
        raw.append(data[i])
        i += 1
    return raw.decode("utf-8", "replace")


def check_ring(ring: dict[str, Any], received: list[dict[str, Any]]) -> list[str]:
    """Every record of a guest's ring dump arrived exactly once, with its text and severity."""
    by_key = kmsg_by_key(received)
    boot = ring["boot_id"]
    problems: list[str] = []
    missing = []
    for rec in ring["records"]:
        got = by_key.get((boot, rec["seq"]), [])
        if not got:
            missing.append(rec["seq"])
            continue
        if len(got) > 1:
            problems.append(f"boot {boot[:8]} seq {rec['seq']} arrived {len(got)} times")
        first = got[0]
        body = unescape_kmsg(rec["text"].rstrip("\n").split("\n")[0])
        if first.get("body") != body:
            problems.append(f"boot {boot[:8]} seq {rec['seq']}: body {first.get('body')!r} != {body!r}")
        if first.get("severity_number") != SEVERITY[rec["level"]]:
            problems.append(
                f"boot {boot[:8]} seq {rec['seq']}: severity {first.get('severity_number')} for level {rec['level']}"
            )
    if missing:
        problems.append(
            f"boot {boot[:8]}: {len(missing)} of {len(ring['records'])} ring records missing: {missing[:10]}"
        )
    return problems


def file_line_counts(received: list[dict[str, Any]], prefix: str) -> Counter[str]:
    return Counter(
        r["body"] for r in received if r.get("scope") == "edgeagent/files" and str(r.get("body", "")).startswith(prefix)
    )


def check_file_lines(received: list[dict[str, Any]], expected: list[str]) -> list[str]:
    """Each expected line of the demo log arrived exactly once."""
    counts = file_line_counts(received, "edgetest ")
    problems = []
    missing = [line for line in expected if counts[line] == 0]
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} file lines missing: {missing[:5]}")
    dups = [line for line in expected if counts[line] > 1]
    if dups:
        problems.append(f"{len(dups)} file lines arrived more than once: {dups[:5]}")
    return problems


def loss_records(received: list[dict[str, Any]]) -> list[str]:
    """Bodies of the agent's own loss records (guarantee 5), e.g. kmsg ring overwritten."""
    return [r["body"] for r in received if "edgeagent.loss.reason" in r.get("attributes", {})]


def powercut_tally(rounds: list[dict[str, Any]], received: list[dict[str, Any]]) -> dict[str, Any]:
    """Per power-cut round, what the spool had committed before the cut (from the
    guest's last report: next kernel sequence `kseq` of that boot, complete lines
    `flines` of the log file) against what arrived. Duplicates are split into
    resends of the same chunk (the at-least-once window: sent, not yet deleted
    at the cut) and re-reads (the same record in another chunk)."""
    by_key = kmsg_by_key(received)
    files = [
        r for r in received if r.get("scope") == "edgeagent/files" and r.get("body", "").startswith("edgetest pc f")
    ]
    file_chunks: dict[str, list[str]] = defaultdict(list)
    for r in files:
        file_chunks[r["body"]].append(r.get("chunk_id", ""))
    kmsg_lost = kmsg_dup_resend = kmsg_dup_reread = 0
    resent: set[str] = set()  # chunks delivered more than once whole: one per cut in the at-least-once window
    per_round = []
    for rnd in rounds:
        boot, kseq = rnd["boot_id"], rnd["kseq"]
        lost = sum(1 for seq in range(max(kseq, 0)) if (boot, seq) not in by_key)
        kmsg_lost += lost
        for seq in range(max(kseq, 0)):
            chunks = [r.get("chunk_id", "") for r in by_key.get((boot, seq), [])]
            if len(chunks) > 1:
                if len(set(chunks)) == 1:
                    kmsg_dup_resend += len(chunks) - 1
                    resent.add(chunks[0])
                else:
                    kmsg_dup_reread += len(chunks) - 1
        per_round.append({"boot_id": boot, "kseq": kseq, "kmsg_lost": lost})
    committed_lines = max((r["flines"] for r in rounds), default=0)
    file_lost = sum(1 for n in range(committed_lines) if f"edgetest pc f{n}" not in file_chunks)
    file_dup_resend = sum(len(c) - 1 for c in file_chunks.values() if len(c) > 1 and len(set(c)) == 1)
    resent.update(c[0] for c in file_chunks.values() if len(c) > 1 and len(set(c)) == 1)
    file_dup_reread = sum(len(c) - 1 for c in file_chunks.values() if len(c) > 1 and len(set(c)) > 1)
    return {
        "rounds": len(rounds),
        "kmsg_committed": sum(max(r["kseq"], 0) for r in rounds),
        "kmsg_lost": kmsg_lost,
        "kmsg_dup_same_chunk": kmsg_dup_resend,
        "kmsg_dup_other_chunk": kmsg_dup_reread,
        "file_committed": committed_lines,
        "file_lost": file_lost,
        "file_dup_same_chunk": file_dup_resend,
        "file_dup_other_chunk": file_dup_reread,
        "chunks_resent": len(resent),
        "per_round": per_round,
    }

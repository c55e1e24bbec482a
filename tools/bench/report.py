"""Turns the harness's results (medians per scenario) into Markdown tables:
figures, ratios to the references, the issue's targets met or missed, the
peers and the profile."""

from __future__ import annotations

from typing import Any

MIB = 1024 * 1024

# (label, scenario, key, limit, higher_is_better)
TARGETS = (
    ("lines/s end to end >= 350,000", "ingest", "lines_per_s", 350_000, True),
    ("CPU s per million lines <= 1.8", "ingest", "cpu_s_per_million", 1.8, False),
    ("peak RSS under load <= 40 MiB", "ingest", "peak_rss_mib", 40, False),
    ("disk written <= 0.7 x raw", "ingest", "disk_per_raw", 0.7, False),
    ("wire <= 1.15 x zstd-3 of 1000-line batches", "ingest", "wire_per_zstd_batches", 1.15, False),
    ("idle RSS <= 30 MiB", "idle", "rss_mib", 30, False),
    ("idle wakeups <= 1/s", "idle", "wakeups_per_s", 1, False),
    ("start-up to ready <= 0.5 s", "startup", "first_start_s", 0.5, False),
)


def target_rows(targets: tuple[tuple[str, str, str, float, bool], ...], medians: dict[str, Any]) -> list[str]:
    """One table row per (label, scenario or subject, key, limit, higher_is_better): the median, met or not."""
    rows = []
    for label, name, key, limit, higher in targets:
        med = medians.get(name)
        if not isinstance(med, dict) or key not in med:
            rows.append(f"| {label} | not measured | - |")
            continue
        value = med[key]
        met = value >= limit if higher else value <= limit
        rows.append(f"| {label} | {fmt(value)} | {'yes' if met else '**no**'} |")
    return rows


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def derive(results: dict[str, Any], lines: int) -> None:
    """Ratios to the references, added to each scenario's median in place."""
    refs = results.get("references", {}).get("median", {})
    sqlite, paho, zb = refs.get("sqlite"), refs.get("paho_publish"), refs.get("zstd_batches")
    pipeline_wall = sqlite["wall_s"] + paho["wall_s"] if sqlite and paho else None
    pipeline_cpu = sqlite["cpu_s"] + paho["cpu_s"] if sqlite and paho else None
    for name in ("ingest", *results.get("peers", {})):
        block = results["peers"][name] if name != "ingest" else results.get("ingest")
        med = (block or {}).get("median")
        if not med:
            continue
        if "cpu_s" in med:
            med["cpu_s_per_million"] = med["cpu_s"] * 1_000_000 / lines
        if pipeline_wall:
            med["wall_x_reference"] = med["wall_s"] / pipeline_wall
            med["cpu_x_reference"] = med["cpu_s"] / pipeline_cpu
        if zb:
            med["wire_per_zstd_batches"] = med["wire_bytes"] / zb["zstd_bytes"]
    backlog = (results.get("backlog") or {}).get("median")
    if backlog and sqlite and paho and zb:
        backlog["spool_wall_x_sqlite_reference"] = backlog["spool_wall_s"] / sqlite["wall_s"]
        backlog["drain_wall_x_paho_reference"] = backlog["drain_wall_s"] / paho["wall_s"]
        backlog["spool_size_x_zstd_batches"] = backlog["spool_size_bytes"] / zb["zstd_bytes"]
        backlog["wire_per_zstd_batches"] = backlog["wire_bytes"] / zb["zstd_bytes"]
    idle = (results.get("idle") or {}).get("median")
    if idle and refs.get("python_bare"):
        idle["rss_x_bare_python"] = idle["rss_mib"] / (refs["python_bare"]["peak_rss_kib"] / 1024)
    startup = (results.get("startup") or {}).get("median")
    if startup and refs.get("python_start"):
        startup["first_start_x_bare_python"] = startup["first_start_s"] / refs["python_start"]["wall_s"]
        startup["version_x_bare_python"] = startup["version_s"] / refs["python_start"]["wall_s"]
    kmsg = (results.get("kmsg") or {}).get("median")
    kref = (results.get("kmsg_reference") or {}).get("median")
    if kmsg and kref and kref.get("arrived"):
        kmsg["arrived_x_bare_reader"] = kmsg["arrived"] / kref["arrived"]


def _status_line(name: str, block: dict[str, Any] | None) -> str | None:
    if block is None:
        return f"- **{name}**: not run (not selected)"
    if block.get("status") != "ok":
        return f"- **{name}**: {block.get('status')}: {block.get('reason', '')}"
    return None


def table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| figure | value |", "|---|---|"]
    out += [f"| {k} | {fmt(v)} |" for k, v in rows]
    return out


def render(results: dict[str, Any]) -> str:
    lines = results["lines"]
    derive(results, lines)
    m = results["machine"]
    out = [
        f"Run {results['started']} · {lines:,} lines ({results['raw_bytes']:,} bytes) · median of "
        f"{results['runs']} runs · {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, kernel {m['kernel']}, "
        f"{m['python']}, state on {m['filesystem']}",
        "",
        "Command: `" + results["command"] + "`",
        "",
    ]
    refs = (results.get("references") or {}).get("median")
    if refs:
        out += ["### References", "", "| reference | wall s | lines/s | CPU s | peak RSS MiB | disk written | other |"]
        out += ["|---|---|---|---|---|---|---|"]
        for name, r in refs.items():
            other = []
            for key in ("ratio", "zstd_bytes", "wire_bytes", "payload_bytes", "chunks", "messages", "insert_s"):
                if key in r:
                    other.append(f"{key} {fmt(r[key])}")
            out.append(
                f"| {name} | {fmt(r['wall_s'])} | {fmt(r.get('lines_per_s', ''))} | {fmt(r['cpu_s'])} | "
                f"{fmt(r['peak_rss_kib'] / 1024)} | {fmt(r['disk_write_bytes'])} | {', '.join(other)} |"
            )
        out.append("")
    for name, title in (
        ("ingest", "1. Ingest and forward"),
        ("backlog", "2. Offline backlog then drain"),
        ("idle", "3. Idle"),
        ("startup", "4. Start-up"),
        ("kmsg", "5. Kernel burst"),
        ("kmsg_reference", "5r. Kernel burst, bare /dev/kmsg reader (reference)"),
    ):
        block = results.get(name)
        if block is None:
            continue
        out += [f"### {title}", ""]
        note = _status_line(name, block)
        if note:
            out += [note, ""]
            continue
        out += [*table(list(block["median"].items())), ""]
    peers = results.get("peers") or {}
    ingest = (results.get("ingest") or {}).get("median")
    if peers or ingest:
        out += [
            "### Side by side (scenario 1 work: file -> durable buffer -> local sink)",
            "",
            "| agent | lines/s | CPU s | CPU s / M lines | peak RSS MiB | disk written / raw | wire / raw | "
            "wall x ref | CPU x ref |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        rows = [("edgeagent (SQLite FULL -> MQTT QoS1)", ingest)] if ingest else []
        rows += [
            (name, (block.get("median") if block.get("status") == "ok" else None)) for name, block in peers.items()
        ]
        for name, med in rows:
            if med is None:
                reason = peers.get(name, {}).get("reason", "")
                out.append(f"| {name} | not available: {reason} | | | | | | | |")
                continue
            out.append(
                f"| {name} | {fmt(med['lines_per_s'])} | {fmt(med['cpu_s'])} | "
                f"{fmt(med.get('cpu_s_per_million', ''))} | "
                f"{fmt(med['peak_rss_mib'])} | {fmt(med['disk_per_raw'])} | {fmt(med['wire_per_raw'])} | "
                f"{fmt(med.get('wall_x_reference', ''))} | {fmt(med.get('cpu_x_reference', ''))} |"
            )
        out.append("")
    out += source_tables(results)
    out += compare_table(results)
    out += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    out += target_rows(
        TARGETS, {name: block.get("median") for name, block in results.items() if isinstance(block, dict)}
    )
    out.append("")
    profile = results.get("profile")
    if profile:
        out += ["### Profile of scenario 1", ""]
        if profile.get("status") != "ok":
            out += [f"- {profile.get('status')}: {profile.get('reason', '')}", ""]
        else:
            med = profile["median"]
            out += [f"Command: `{med['command']}`", ""]
            out += ["| function (self time) | share |", "|---|---|"]
            out += [f"| `{f}` | {s:.1%} |" for f, s in med["hot"]["self"]]
            out += ["", "| function (inclusive) | share |", "|---|---|"]
            out += [f"| `{f}` | {s:.1%} |" for f, s in med["hot"]["inclusive"]]
            out.append("")
    if results.get("trickle"):
        import trickle

        out += [f"### Trickle ({results['command']})", "", *trickle.render(results["trickle"]), ""]
    spool = results.get("spool")
    if spool:
        out += ["### Spool append (in-process Batcher + Spool, durability full)", ""]
        note = _status_line("spool", spool)
        out += [note, ""] if note else [*table(list(spool["median"].items())), ""]
    return "\n".join(out)


def source_tables(results: dict[str, Any]) -> list[str]:
    """Scenarios 6 (syslog, one row per sender variant) and 7 (journald)."""
    out: list[str] = []
    syslog = results.get("syslog")
    if syslog:
        out += [
            "### 6. Syslog source (to the spool, upload none)",
            "",
            "| sender | messages/s | received | dropped | unaccounted | CPU s | CPU s / M msgs | peak RSS MiB | "
            "sender CPU s | others busy % | steal % | load 1m before | disturbed runs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, block in syslog.items():
            if block.get("status") != "ok":
                out.append(f"| {variant} | {block.get('status')}: {block.get('reason', '')} |" + " |" * 11)
                continue
            m = block["median"]
            out.append(
                f"| {variant} | {fmt(m['messages_per_s'])} | {fmt(m['received'])} | {fmt(m['dropped'])} | "
                f"{fmt(m['unaccounted'])} | {fmt(m['cpu_s'])} | {fmt(m['cpu_s_per_million'])} | "
                f"{fmt(m['peak_rss_mib'])} | {fmt(m['sender_cpu_s'])} | {fmt(m['others_busy_pct'])} | "
                f"{fmt(m['steal_pct'])} | {fmt(m['loadavg_1m_before'])} | {m['disturbed']}/{m['runs']} |"
            )
        out.append("")
    journald = results.get("journald")
    if journald:
        out += ["### 7. Journald source (journal directory from the beginning, upload none)", ""]
        note = _status_line("journald", journald)
        out += [note, ""] if note else [*table(list(journald["median"].items())), ""]
    return out


# Issue 15's targets, checked against the compare scenario's medians.
COMPARE_TARGETS = (
    ("MQTT: CPU s per million lines <= 1.1", "edgeagent-mqtt", "cpu_s_per_million", 1.1, False),
    ("MQTT: lines/s >= 800,000", "edgeagent-mqtt", "lines_per_s", 800_000, True),
    ("MQTT: wall <= 1.3 x the reference's", "edgeagent-mqtt", "wall_x_reference", 1.3, False),
    ("MQTT: CPU <= 1.3 x the reference's", "edgeagent-mqtt", "cpu_x_reference", 1.3, False),
    ("OTLP: CPU <= 1.15 x the MQTT figure", "edgeagent-otlp", "cpu_x_mqtt", 1.15, False),
    ("MQTT: peak RSS <= 40 MiB", "edgeagent-mqtt", "peak_rss_mib", 40, False),
    ("OTLP: peak RSS <= 40 MiB", "edgeagent-otlp", "peak_rss_mib", 40, False),
    ("MQTT: disk dirtied <= 0.5 x raw", "edgeagent-mqtt", "disk_per_raw", 0.5, False),
    ("MQTT: wire <= 0.29 x raw", "edgeagent-mqtt", "wire_per_raw", 0.29, False),
)


def compare_table(results: dict[str, Any]) -> list[str]:
    """The compare scenario: one row per subject (medians of its undisturbed runs), then the targets."""
    block = results.get("compare")
    if not block:
        return []
    lines = results["lines"]
    subjects = block["subjects"]
    meds = {name: s.get("median") for name, s in subjects.items()}
    ref, mqtt = meds.get("reference"), meds.get("edgeagent-mqtt")
    for med in meds.values():
        if not med:
            continue
        med["cpu_s_per_million"] = med["cpu_s"] * 1_000_000 / lines
        if ref:
            med["wall_x_reference"] = med["wall_s"] / ref["wall_s"]
            med["cpu_x_reference"] = med["cpu_s"] / ref["cpu_s"]
        if mqtt:
            med["cpu_x_mqtt"] = med["cpu_s"] / mqtt["cpu_s"]
    out = [
        "### Side by side (compare: interleaved rounds, medians of the undisturbed runs)",
        "",
        "| subject | lines/s | wall s | CPU s | CPU x ref | peak RSS MiB | disk / raw | wire / raw | requests "
        "| undisturbed / runs | others busy % | steal % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in subjects.items():
        med = s.get("median")
        if not med:
            out.append(f"| {name} | no successful run ({s['failed']} failed) |" + " |" * 10)
            continue
        note = "" if s["undisturbed"] else " (all disturbed)"
        out.append(
            f"| {name}{note} | {fmt(med['lines_per_s'])} | {fmt(med['wall_s'])} | {fmt(med['cpu_s'])} | "
            f"{fmt(med.get('cpu_x_reference', ''))} | {fmt(med['peak_rss_mib'])} | {fmt(med['disk_per_raw'])} | "
            f"{fmt(med.get('wire_per_raw', ''))} | {fmt(med.get('messages', ''))} | "
            f"{s['undisturbed']}/{s['runs']} | {fmt(med['others_busy_pct'])} | {fmt(med['steal_pct'])} |"
        )
    for name, reason in block.get("skipped", {}).items():
        out.append(f"| {name} | skipped: {reason} |" + " |" * 10)
    out += ["", "Every run (D = disturbed: others busy >= 10 % or steal >= 5 %; excluded from the medians):", ""]
    out += ["| subject | round | wall s | CPU s | peak RSS MiB | others busy % | steal % | quiet wait s | mark |"]
    out += ["|---|---|---|---|---|---|---|---|---|"]
    for name, s in subjects.items():
        for r in s["all"]:
            if "failed" in r:
                out.append(f"| {name} | {r['round']} | failed: {r['failed'][:120]} | | | | | | |")
                continue
            out.append(
                f"| {name} | {r['round']} | {fmt(r['wall_s'])} | {fmt(r['cpu_s'])} | {fmt(r['peak_rss_mib'])} | "
                f"{fmt(r['others_busy_pct'])} | {fmt(r['steal_pct'])} | {fmt(r['quiet_wait_s'])} | "
                f"{'D' if r['disturbed'] else ''} |"
            )
    for name, prof in (block.get("profiles") or {}).items():
        if "hot" not in prof:
            out += ["", f"Profile of {name}: `{prof.get('profile')}` (perf: `perf report -i FILE --no-children`)"]
            continue
        out += ["", f"Profile of {name} (py-spy --native, 250 Hz; self = leaf frame, Python or C):", ""]
        out += ["| function (self) | share |", "|---|---|"]
        out += [f"| `{f}` | {share:.1%} |" for f, share in prof["hot"]["self"]]
        out += ["", "| function (inclusive, the agent's own) | share |", "|---|---|"]
        out += [f"| `{f}` | {share:.1%} |" for f, share in prof["hot"]["inclusive"]]
    out += ["", "| target (issue 15) | measured | met |", "|---|---|---|"]
    out += target_rows(COMPARE_TARGETS, meds)
    out.append("")
    return out

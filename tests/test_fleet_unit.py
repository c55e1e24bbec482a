"""Fleet config, the pure parts: envelope and signatures, policy, layers,
persistence, the status document, the [fleet] section."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from edgeagent import config as config_module
from edgeagent.config import ConfigError, FleetConfig, loads
from edgeagent.fleet import envelope as env_mod
from edgeagent.fleet import layers, policy, report
from edgeagent.fleet.envelope import MAX_ENVELOPE_BYTES, Envelope, EnvelopeError, Verifier, decode
from edgeagent.fleet.store import FleetState, FleetStore, Layer, layers_hash


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = env_mod.generate_keypair(tmp_path / "op.key")
    return private, public


# --- envelope ----------------------------------------------------------------------


def test_envelope_round_trip_unsigned() -> None:
    e = Envelope("device:gw-1", 3, 'log_level = "debug"\n')
    assert decode(e.encode()) == e
    Verifier(()).check(decode(e.encode()))  # no keys: unsigned accepted


def test_envelope_over_64kib_is_refused_before_decoding() -> None:
    payload = b" " * (MAX_ENVELOPE_BYTES + 1)
    with pytest.raises(EnvelopeError, match="limit is 65536"):
        decode(payload)
    with pytest.raises(EnvelopeError, match="limit"):
        Envelope("device:x", 1, "#" * MAX_ENVELOPE_BYTES).encode()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", "not a JSON envelope"),
        (b"[1]", "not a JSON object"),
        (b'{"format": 2}', "format = 2"),
        (b'{"format": 1, "scope": "device:a/b", "version": 1, "config": ""}', "scope = 'device:a/b'"),
        (b'{"format": 1, "scope": "host:a", "version": 1, "config": ""}', "scope = 'host:a'"),
        (b'{"format": 1, "scope": "device:a", "version": 0, "config": ""}', "version = 0"),
        (b'{"format": 1, "scope": "device:a", "version": true, "config": ""}', "version = True"),
        (b'{"format": 1, "scope": "device:a", "version": 1, "config": 5}', "config = int"),
        (b'{"format": 1, "scope": "device:a", "version": 1, "config": "", "signature": "abc"}', "signature"),
    ],
)
def test_envelope_errors_name_the_field(payload: bytes, message: str) -> None:
    with pytest.raises(EnvelopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(payload)


def test_signed_envelope_verifies_and_tampering_does_not(keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    signed = env_mod.sign(Envelope("group:berlin", 7, 'log_level = "debug"\n'), private)
    verifier = Verifier([str(public)])
    verifier.check(decode(signed.encode()))
    for forged in (
        Envelope("group:berlin", 8, signed.config, signed.signature),  # version replayed onto another number
        Envelope("group:munich", 7, signed.config, signed.signature),  # onto another scope
        Envelope("group:berlin", 7, signed.config + " ", signed.signature),  # one byte more
    ):
        with pytest.raises(EnvelopeError, match="does not verify"):
            verifier.check(forged)
    with pytest.raises(EnvelopeError, match="unsigned config"):
        verifier.check(Envelope("group:berlin", 7, signed.config))
    _, other_public = env_mod.generate_keypair(tmp_path / "other.key")
    with pytest.raises(EnvelopeError, match="does not verify"):
        Verifier([str(other_public)]).check(signed)
    Verifier([str(other_public), str(public)]).check(signed)  # any trusted key will do


def test_missing_pynacl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, keys: tuple[Path, Path]) -> None:
    monkeypatch.setitem(sys.modules, "nacl", None)
    monkeypatch.setitem(sys.modules, "nacl.signing", None)
    with pytest.raises(EnvelopeError, match=r"need PyNaCl.*edgeagent\[fleet\]"):
        Verifier([str(keys[1])])
    Verifier([])  # without keys PyNaCl is not needed


def test_bad_key_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not base64!\n")
    with pytest.raises(EnvelopeError, match=r"bad\.pub"):
        Verifier([str(bad)])


# --- policy ------------------------------------------------------------------------


def _policy(layer_toml: str, **fleet: object) -> None:
    import tomllib

    policy.check(tomllib.loads(layer_toml), FleetConfig(**fleet))  # type: ignore[arg-type]


def test_policy_allows_the_defaults() -> None:
    _policy(
        'log_level = "debug"\n[kmsg]\nmin_priority = "debug"\n[spool]\nflush_interval = "2s"\n[upload]\nmax_rate = 1'
    )


@pytest.mark.parametrize(
    ("layer", "key"),
    [
        ('state_dir = "/tmp/x"', "state_dir"),
        ('device_id = "other"', "device_id"),
        ("[fleet]\nenabled = false", "fleet.enabled"),
        ('[mqtt]\nca_file = "/tmp/ca"', "mqtt.ca_file"),
        ("[mqtt]\ntls_insecure = true", "mqtt.tls_insecure"),
        ('[otlp_http]\nkey_file = "/k"', "otlp_http.key_file"),
        ('[mqtt]\npassword = "hunter2"', "mqtt.password"),
        ('[mqtt]\nusername = "u"', "mqtt.username"),
        ('[otlp_http.headers]\nAuthorization = "Bearer x"', "otlp_http.headers"),
        ('[kmsg]\npath = "/etc/shadow"', "kmsg.path"),
        ('[journald]\njournalctl = "/bin/sh"', "journald.journalctl"),
    ],
)
def test_policy_never_settable_even_when_allowed(layer: str, key: str) -> None:
    with pytest.raises(policy.PolicyError, match="never settable") as e:
        _policy(layer, allow=("state_dir", "device_id", "fleet", "mqtt", "otlp_http", "kmsg", "journald"))
    assert e.value.key == key
    assert "hunter2" not in str(e.value) and "Bearer" not in str(e.value)


def test_policy_only_what_allow_lists_and_first_key_named() -> None:
    with pytest.raises(policy.PolicyError, match=r"spool.max_size = '1GiB': not allowed") as e:
        _policy('log_level = "debug"\n[spool]\nmax_size = "1GiB"\n[upload]\nwindow = 2')
    assert e.value.key == "spool.max_size"
    _policy('[spool]\nmax_size = "1GiB"', allow=("spool",))


def test_policy_broker_url_and_endpoint_need_their_own_entry() -> None:
    with pytest.raises(policy.PolicyError, match=r"must name 'mqtt\.url'"):
        _policy('[mqtt]\nurl = "mqtt://evil:1883"', allow=("mqtt",))
    _policy('[mqtt]\nurl = "mqtt://other:1883"', allow=("mqtt.url",))
    with pytest.raises(policy.PolicyError, match=r"otlp_http\.endpoint"):
        _policy('[otlp_http]\nendpoint = "http://x"', allow=("otlp_http",))


def test_policy_files_stay_within_allowed_paths(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    (logs / "app").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow.log").write_text("root:x\n")
    allowed = (f"{logs}/*",)

    def files(pattern: str) -> str:
        return f'[[files]]\ninclude = ["{pattern}"]\n'

    _policy(files(f"{logs}/app/*.log"), allowed_paths=allowed)
    with pytest.raises(policy.PolicyError, match="allowed_paths, which is empty"):
        _policy(files(f"{logs}/app/*.log"))
    with pytest.raises(policy.PolicyError, match=r"'\.\.' is not allowed") as e:
        _policy(files(f"{logs}/../secret/*.log"), allowed_paths=allowed)
    assert e.value.key == "files[0].include"
    with pytest.raises(policy.PolicyError, match="outside"):
        _policy(files(f"{secret}/*.log"), allowed_paths=allowed)
    (logs / "link").symlink_to(secret)  # a directory symlink inside the allowed tree
    with pytest.raises(policy.PolicyError, match=r"resolves to .*secret"):
        _policy(files(f"{logs}/link/*.log"), allowed_paths=allowed)
    (logs / "app" / "evil.log").symlink_to(secret / "shadow.log")  # a file symlink matched by the glob
    with pytest.raises(policy.PolicyError, match=r"shadow\.log"):
        _policy(files(f"{logs}/app/*.log"), allowed_paths=allowed)


def test_connectivity_change() -> None:
    base = loads("")
    assert policy.connectivity_change(base, loads('[kmsg]\nmin_priority = "debug"')) == ""
    assert policy.connectivity_change(base, loads("[upload]\nmax_rate = 100")) == ""
    assert policy.connectivity_change(base, loads('[mqtt]\nurl = "mqtt://127.0.0.1:1"')) == "mqtt"
    assert "upload" in policy.connectivity_change(base, loads('[upload]\nto = "otlp_http"'))


# --- layers ------------------------------------------------------------------------


def test_remote_layer_errors_come_from_the_local_parser() -> None:
    fleet = FleetConfig()
    with pytest.raises(ConfigError, match=r"fleet device:gw-1 v4: invalid TOML"):
        layers.check_layer(Envelope("device:gw-1", 4, "log_level = "), fleet)
    with pytest.raises(ConfigError, match=r"fleet device:gw-1 v4:2: kmsg.min_priority = 'loud': expected a priority"):
        layers.check_layer(Envelope("device:gw-1", 4, '[kmsg]\nmin_priority = "loud"\n'), fleet)
    with pytest.raises(ConfigError, match=r"unknown key 'kmsg.enabeld' \(did you mean 'enabled'\?\)"):
        layers.check_layer(Envelope("device:gw-1", 4, "[kmsg]\nenabeld = true\n"), fleet)
    with pytest.raises(policy.PolicyError, match=r"fleet\.enabled"):
        layers.check_layer(Envelope("device:gw-1", 4, "[fleet]\nenabled = false\n"), fleet)


def test_effective_config_merge_order(tmp_path: Path) -> None:
    local_file = tmp_path / "edgeagent.toml"
    local_file.write_text(
        'device_id = "gw-1"\nlog_level = "warning"\n[kmsg]\nmin_priority = "err"\n'
        '[fleet]\nenabled = true\ngroups = ["a", "b"]\n[spool]\nflush_interval = "3s"\n'
    )
    from edgeagent.config import load

    local = load(local_file)
    stack = {
        "device:gw-1": Layer("device:gw-1", 1, {"log_level": "debug"}),
        "group:b": Layer("group:b", 5, {"log_level": "error", "kmsg": {"min_priority": "notice"}}),
        "group:a": Layer("group:a", 9, {"kmsg": {"min_priority": "info", "pstore": False}}),
    }
    config = layers.effective(local, stack)
    assert config.log_level == "debug"  # device beats groups
    assert config.kmsg.min_priority == 5  # group b (later in `groups`) beats group a
    assert config.kmsg.pstore is False  # tables merge key by key
    assert config.spool.flush_interval == 3.0  # the local file stays under the layers
    assert layers.effective(local, {}).log_level == "warning"
    assert layers_hash(stack) != layers_hash({}) == ""


# --- store -------------------------------------------------------------------------


def test_store_is_atomic_private_and_survives_corruption(tmp_path: Path) -> None:
    store = FleetStore(tmp_path)
    state = FleetState()
    state.applied["device:x"] = Layer(
        "device:x", 3, {"kmsg": {"min_priority": "debug"}, "files": [{"include": ["/a"]}]}
    )
    for version in range(100):
        state.reject("device:x", version + 10)
    state.probation = {"scope": "device:x", "version": 3, "reason": "mqtt", "started_at": 1.5}
    state.status = report.document(
        "applying",
        version=3,
        scope="device:x",
        applied_version=3,
        config_hash="h",
        layers={"device:x": 3},
        reason="",
        boot_id="b",
    )
    store.save(state)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert not [p for p in store.directory.iterdir() if p.name != "state.toml"]  # no temp file left
    loaded = store.load()
    assert loaded == state
    assert len(loaded.rejected["device:x"]) == 32 and loaded.highest_seen("device:x") == 109
    store.path.write_bytes(b"\x00garbage[[")
    assert store.load() == FleetState()
    assert (store.directory / "state.toml.corrupt").exists()


# --- report ------------------------------------------------------------------------


def test_report_fields_redaction_and_change_detection() -> None:
    doc = report.document(
        "rejected",
        version=4,
        scope="device:x",
        applied_version=3,
        config_hash="abc",
        layers={},
        reason="mqtt.password = 'hunter2': never settable; token: s3cr3t",
        boot_id="boot",
    )
    for key in ("state", "version", "applied_version", "config_hash", "reason", "at", "agent_version", "boot_id"):
        assert doc[key] is not None
    assert "hunter2" not in doc["reason"] and "s3cr3t" not in doc["reason"]
    assert doc["at"].endswith("Z") and "T" in doc["at"]
    later = dict(doc, at="2099-01-01T00:00:00.000Z")
    assert report.same_report(doc, later)
    assert not report.same_report(doc, dict(doc, state="applied"))
    assert json.loads(report.encode(doc)) == doc


# --- the [fleet] section -----------------------------------------------------------


def test_fleet_section_defaults_and_validation(tmp_path: Path) -> None:
    config = loads("")
    assert config.fleet.enabled is False and config.fleet.probation == 120.0
    assert config.fleet.allow == ("log_level", "kmsg", "files", "spool.flush_interval", "upload.max_rate")
    for text, message in [
        ('[fleet]\ngroups = ["a/b"]', "fleet.groups = 'a/b'"),
        ('[fleet]\nallow = ["kmsg.nope"]', "fleet.allow = 'kmsg.nope'"),
        ('[fleet]\ndesired_topic = "x/#"', "fleet.desired_topic = 'x/#'"),
        ('[fleet]\ngroup_topic = "groups/all"', "a topic containing {group}"),
        ('[fleet]\nallowed_paths = ["var/log/*"]', "absolute path patterns"),
        ('[fleet]\nprobation = "0s"', "fleet.probation"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
            loads(text)
    (tmp_path / "keys").mkdir()
    conf = tmp_path / "edgeagent.toml"
    conf.write_text('[fleet]\ntrusted_keys = ["keys/op.pub"]\n')
    from edgeagent.config import load

    assert load(conf).fleet.trusted_keys == (os.path.join(tmp_path, "keys/op.pub"),)


def test_what_remote_config_may_never_set_is_read_from_the_config_fields_metadata() -> None:
    # Said once, where each key is defined: a SECRET field is local-only without being listed anywhere else.
    assert {"mqtt.password", "otlp_http.headers"} == config_module.SECRET_KEYS
    assert config_module.SECRET_KEYS <= policy.NEVER
    tls = {f"{s}.{k}" for s in ("mqtt", "otlp_http") for k in ("ca_file", "cert_file", "key_file", "tls_insecure")}
    identity = {"state_dir", "device_id", "fleet", "mqtt.client_id", "mqtt.username", "mqtt.password_file"}
    programs_and_devices = {"kmsg.path", "kmsg.pstore_dir", "journald.journalctl"}
    assert tls | identity | programs_and_devices | config_module.SECRET_KEYS == policy.NEVER

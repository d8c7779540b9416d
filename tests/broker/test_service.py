"""The broker service: release through the real medtee.attestation (simulated evidence), refusals, audit."""

from __future__ import annotations

import json

import pytest

from medtee.broker import audit
from medtee.broker.protocol import KeyReleaseDenied, UnknownDatasetError, obtain_data_key, release_info
from medtee.broker.service import EmbeddedBroker
from medtee.crypto.hpke import EphemeralKey, Scheme
from medtee.sealing.reader import open_dataset
from medtee.sealing.seal import seal_records

from .conftest import RECIPE, make_records, simulated_evidence


def release_request(broker, manifest, *, nonce=None, eph=None, recipe=RECIPE, evidence_recipe=RECIPE, digest=None):
    nonce = nonce if nonce is not None else broker.challenge(manifest.dataset_id)
    eph = eph or EphemeralKey.generate()
    evidence = simulated_evidence(evidence_recipe)(nonce, eph.public_bytes)
    blob, _ = broker.release(dataset_id=manifest.dataset_id, nonce=nonce, evidence=evidence,
                             ephemeral_public_key=eph.public_bytes, recipe_digest=recipe,
                             manifest_digest=digest or manifest.digest())
    return eph.unwrap(blob, info=release_info(manifest.dataset_id, nonce))


@pytest.mark.parametrize("eph_scheme", list(Scheme))
def test_release_round_trip(sealed, broker, eph_scheme):
    out, manifest, records, key = sealed
    got = obtain_data_key(broker, dataset_id="test-ds", manifest_digest=manifest.digest(), recipe_digest=RECIPE,
                          evidence_for=simulated_evidence(), scheme=eph_scheme).data_key
    assert got == key
    assert open_dataset(out).read_records(got) == records


def test_replayed_nonce_is_refused(sealed, broker):
    _, manifest, _, key = sealed
    nonce = broker.challenge("test-ds")
    assert release_request(broker, manifest, nonce=nonce) == key
    with pytest.raises(KeyReleaseDenied, match="broker.nonce.*already used") as err:
        release_request(broker, manifest, nonce=nonce)
    assert [c.name for c in err.value.verdict.failures()] == ["broker.nonce"]
    with pytest.raises(KeyReleaseDenied, match="never issued by this broker"):
        release_request(broker, manifest, nonce=b"\x01" * 32)


def test_releases_naming_nonces_never_issued_are_counted_not_audited(sealed, broker):
    """Anyone can send them: each used to append a `deny` entry, so a flood grew the audit log without bound (and
    every close scans it). A replay of a nonce the broker did issue is still audited."""
    _, manifest, _, _ = sealed
    log = broker.store_dir / "audit.log"
    before = log.read_bytes()
    for i in range(50):
        with pytest.raises(KeyReleaseDenied, match="never issued"):
            release_request(broker, manifest, nonce=i.to_bytes(32, "big"))
    assert log.read_bytes() == before and broker._unaudited["release", "local"] == 50
    nonce = broker.challenge("test-ds")
    release_request(broker, manifest, nonce=nonce)
    with pytest.raises(KeyReleaseDenied, match="already used"):
        release_request(broker, manifest, nonce=nonce)
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()[len(before.splitlines()):]]
    assert events == ["release", "deny"]


def test_expired_nonce_is_refused(sealed, tmp_path):
    _, manifest, _, _ = sealed
    now = [1000.0]
    broker = EmbeddedBroker(tmp_path / "broker", nonce_ttl_s=5, clock=lambda: now[0])
    nonce = broker.challenge("test-ds")
    now[0] += 6
    with pytest.raises(KeyReleaseDenied, match="expired"):
        release_request(broker, manifest, nonce=nonce)
    nonce = broker.challenge("test-ds")
    now[0] += 4
    assert release_request(broker, manifest, nonce=nonce)


def test_nonce_of_another_dataset_is_refused(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    seal_records(make_records(2), tmp_path / "o", broker=broker, policy="simulated", dataset_id="other")
    with pytest.raises(KeyReleaseDenied, match="another dataset"):
        release_request(broker, manifest, nonce=broker.challenge("other"))


def test_binding_manifest_and_unknown_dataset(sealed, broker):
    _, manifest, _, _ = sealed
    with pytest.raises(KeyReleaseDenied, match="binding.report_data"):
        release_request(broker, manifest, evidence_recipe="cd" * 32)
    with pytest.raises(KeyReleaseDenied, match="broker.manifest_digest"):
        release_request(broker, manifest, digest="0" * 64)
    with pytest.raises(UnknownDatasetError, match="not registered"):
        broker.challenge("nope")


def test_evidence_bound_to_another_key_is_refused(sealed, broker):
    """Evidence made for one ephemeral key cannot fetch the data key for another."""
    _, manifest, _, _ = sealed
    nonce = broker.challenge("test-ds")
    mine, theirs = EphemeralKey.generate(), EphemeralKey.generate()
    evidence = simulated_evidence()(nonce, mine.public_bytes)
    with pytest.raises(KeyReleaseDenied, match="binding.report_data"):
        broker.release(dataset_id="test-ds", nonce=nonce, evidence=evidence, ephemeral_public_key=theirs.public_bytes,
                       recipe_digest=RECIPE, manifest_digest=manifest.digest())


def test_evidence_for_a_key_nothing_can_be_wrapped_to_is_a_denial(sealed, broker):
    _, manifest, _, _ = sealed
    nonce, zero_key = broker.challenge("test-ds"), bytes(32)  # a low-order X25519 point
    with pytest.raises(KeyReleaseDenied, match="broker.request: expected an ephemeral public key"):
        broker.release(dataset_id="test-ds", nonce=nonce, evidence=simulated_evidence()(nonce, zero_key),
                       ephemeral_public_key=zero_key, recipe_digest=RECIPE, manifest_digest=manifest.digest())
    last = json.loads((broker.store_dir / "audit.log").read_text().splitlines()[-1])
    assert last["event"] == "deny" and last["failed"] == ["broker.request"]


def test_policy_change_takes_effect_without_restart(sealed, broker):
    _, manifest, _, _ = sealed
    assert release_request(broker, manifest)
    broker.set_policy("test-ds", "snp_h100")  # a production policy: refuses simulated evidence
    with pytest.raises(KeyReleaseDenied) as err:
        release_request(broker, manifest)
    assert err.value.verdict.policy != "simulated" and err.value.verdict.failures()
    with pytest.raises(ValueError, match="no attestation policy"):
        broker.set_policy("test-ds", "does-not-exist")


def test_untrusted_owner_and_wrong_broker_key_are_refused(sealed, tmp_path):
    _, manifest, _, _ = sealed
    stranger = EmbeddedBroker(tmp_path / "stranger")
    with pytest.raises(PermissionError, match="trusted-owners"):
        stranger.register(manifest)
    (stranger.store_dir / "trusted-owners").mkdir()
    (stranger.store_dir / "trusted-owners" / "hospital.pub").write_bytes(
        (tmp_path / "broker" / "owner-signing.pub").read_bytes())
    with pytest.raises(ValueError, match="seal against this broker"):
        stranger.register(manifest)


def test_an_unfinished_last_entry_is_dropped_at_the_next_append(sealed, broker, caplog, monkeypatch):
    """A full disk mid-append leaves a line without its newline; it used to make every later append fail."""
    import os

    _, manifest, _, key = sealed
    log = broker.store_dir / "audit.log"
    real_fsync = os.fsync

    def full_disk(fd):  # the write reached the page cache; the flush to disk fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit.os, "fsync", full_disk)
    with pytest.raises(OSError):
        release_request(broker, manifest)  # no key without its `release` entry
    monkeypatch.setattr(audit.os, "fsync", real_fsync)
    good = log.read_bytes()
    torn = good.rsplit(b"\n", 2)[0] + b"\n" + good.rsplit(b"\n", 2)[1][:40]  # what reached the disk of that line
    log.write_bytes(torn)
    report = audit.verify(log)
    assert report.ok and report.entries == 1 and report.unfinished == 40
    with caplog.at_level("WARNING", logger="medtee.broker.audit"):
        assert release_request(broker, manifest) == key
    assert "dropped an unfinished last entry (40 bytes" in caplog.text
    report = audit.verify(log)
    assert report.ok and report.entries == 2 and not report.unfinished
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()] == ["register", "release"]


def test_a_log_refused_for_a_bad_line_keeps_its_unfinished_tail_too(sealed, broker):
    """Garbage appended (lines, then a tail without newline): the tail used to be cut before the bad line refused
    the append, so a refused command still rewrote the log it refused."""
    from medtee.broker.audit import AuditLogDamaged

    _, manifest, _, _ = sealed
    log = broker.store_dir / "audit.log"
    log.write_bytes(log.read_bytes() + b"not an entry\n" + b"unfinished tail")
    before = log.read_bytes()
    with pytest.raises(AuditLogDamaged, match="is not an audit entry"):
        release_request(broker, manifest)
    assert log.read_bytes() == before


@pytest.mark.parametrize("damage", ["middle", "last"])
@pytest.mark.parametrize("line", ["not json", "[" * 200_000 + "]" * 200_000])  # the second: past the parser's depth
def test_a_damaged_complete_line_stops_appends_naming_the_fix(sealed, broker, damage, line):
    _, manifest, _, _ = sealed
    release_request(broker, manifest)
    log = broker.store_dir / "audit.log"
    lines = log.read_text().splitlines()
    lines[0 if damage == "middle" else -1] = line
    log.write_text("\n".join(lines) + "\n")
    before = log.read_bytes()
    with pytest.raises(audit.AuditLogDamaged, match="is not an audit entry; run `medtee broker audit verify`"):
        broker.audit.append("x")
    with pytest.raises(audit.AuditLogDamaged, match="is not an audit entry; run `medtee broker audit verify`"):
        EmbeddedBroker(broker.store_dir).audit.append("x")  # a broker reads the whole log at its first decision
    assert log.read_bytes() == before
    assert not audit.verify(log).ok and "not an audit entry" in audit.verify(log).problem


def test_audit_log_chain(sealed, broker):
    _, manifest, _, _ = sealed
    release_request(broker, manifest)
    with pytest.raises(KeyReleaseDenied):
        release_request(broker, manifest, digest="0" * 64)
    log = broker.store_dir / "audit.log"
    report = audit.verify(log)
    assert report.ok and report.entries == 3
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["register", "release", "deny"]
    assert "PHI-marker" not in log.read_text()
    lines = log.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["event"] = "deny"
    log.write_text("\n".join([lines[0], json.dumps(entry, sort_keys=True), lines[2]]) + "\n")
    assert not audit.verify(log).ok and "altered" in audit.verify(log).problem
    log.write_text("\n".join([lines[0], lines[2]]) + "\n")
    bad = audit.verify(log)
    assert not bad.ok and "removed or reordered" in bad.problem


def test_edited_policy_file_takes_effect_without_restart(sealed, broker, tmp_path, monkeypatch):
    import medtee.attestation.policy as policy_module
    import medtee.paths
    from medtee.paths import conf_dir

    conf = tmp_path / "conf"
    (conf / "attestation").mkdir(parents=True)
    original = (conf_dir() / "attestation" / "simulated.yaml").read_text()
    (conf / "attestation" / "simulated.yaml").write_text(original)
    monkeypatch.setattr(medtee.paths, "conf_dir", lambda: conf)
    monkeypatch.setattr(policy_module, "conf_dir", lambda: conf)
    _, manifest, _, key = sealed
    assert release_request(broker, manifest) == key
    assert "allow_simulated: true" in original
    (conf / "attestation" / "simulated.yaml").write_text(original.replace("allow_simulated: true", "allow_simulated: false"))
    with pytest.raises(KeyReleaseDenied):
        release_request(broker, manifest)


def test_a_last_entry_that_lost_only_its_newline_is_kept(sealed, broker, caplog, capsys):
    """`truncate -s -1 audit.log` (an editor, a copy): the entry is whole, so it counts and gets its newline back;
    it used to be taken for an unfinished append, refused by the mark, and dropped once the mark was removed."""
    from medtee.cli import main

    _, manifest, _, key = sealed
    assert release_request(broker, manifest) == key
    log = broker.store_dir / "audit.log"
    whole = log.read_bytes()
    log.write_bytes(whole[:-1])
    report = audit.verify(log)
    assert report.ok and report.entries == 2 and not report.unfinished
    assert main(["broker", "audit", "verify", "--broker-dir", str(broker.store_dir)]) == 0
    assert "audit log OK: 2 entries" in capsys.readouterr().out
    with caplog.at_level("WARNING", logger="medtee.broker.audit"):
        assert release_request(broker, manifest) == key
    assert "the last entry had lost its newline; it was put back" in caplog.text
    assert log.read_bytes().startswith(whole)
    assert [e["event"] for e in map(json.loads, log.read_text().splitlines())] == ["register", "release", "release"]


@pytest.mark.parametrize("before", [b'{"not": "an entry"}\n', b'{"seq": "1", "hash": "x"}\n', b"[]\n", b"\n"])
def test_a_whole_looking_tail_after_a_line_that_is_no_entry_is_not_taken_for_one(broker, before):
    from medtee.broker.audit import AuditLogDamaged

    broker.audit.append("a")
    log = broker.audit.path
    tail = json.dumps(audit._new_entry(json.loads(log.read_bytes().splitlines()[-1]), "b", {}), sort_keys=True)
    log.write_bytes(log.read_bytes() + before + tail.encode())
    assert not audit.verify(log).ok
    with pytest.raises(AuditLogDamaged):
        broker.audit.append("c")

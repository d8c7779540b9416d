"""`medtee receipt verify --broker-log`: the data owner's audit log corroborates the receipt's release and close."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from medtee.attestation import appraise, load_policy, report_data
from medtee.broker.protocol import obtain_data_key, record_digest
from medtee.cli import main
from medtee.receipt.signing import ReceiptSigner, write_receipt
from medtee.receipt.statement import build_statement, file_subjects
from medtee.receipt.verify import UnusableInput, verify_receipt

from .conftest import METRICS, RECIPE, RECIPE_DIGEST, STARTED, TEARDOWN, evidence_for


def receipt(tmp_path, broker, manifest, *, close: bool = True, manifest_digest: str | None = None,
            teardown: dict = TEARDOWN):
    """A run's receipt as medtee writes it: released by `broker`, closed there with TEARDOWN unless `close` is
    False; the statement names `manifest_digest` (default: the manifest's)."""
    signer, seen = ReceiptSigner(), []

    def collect(nonce, eph):
        seen.append(evidence_for(signer.public_bytes)(nonce, eph))
        return seen[-1]

    release = obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                              recipe_digest=RECIPE_DIGEST, evidence_for=collect, receipt_public_key=signer.public_bytes)
    closed = broker.close_release(release.release_id, record=TEARDOWN, receipt_public_key=signer.public_bytes,
                                  signature=signer.sign_close(release.release_id, TEARDOWN)) if close else None
    policy = load_policy("simulated")
    verdict = appraise(seen[-1], policy, expected_report_data=report_data(
        nonce=release.nonce, ephemeral_public_key=release.ephemeral_public_key, recipe_digest=RECIPE_DIGEST,
        receipt_public_key=signer.public_bytes))
    out = tmp_path / f"run-{release.release_id[:8]}"
    out.mkdir()
    adapter = out / "adapter.safetensors.enc"
    adapter.write_bytes(b"adapter")
    statement = build_statement(
        recipe=RECIPE, recipe_digest=RECIPE_DIGEST, model_revision="main", weight_digests={},
        dataset_id=manifest.dataset_id, manifest_digest=manifest_digest or manifest.digest(), evidence=seen[-1],
        policy=policy, verdict=verdict, release=release, receipt_public_key=signer.public_bytes, started=STARTED,
        ended=STARTED + timedelta(minutes=3), metrics=METRICS, teardown=teardown, subjects=file_subjects([adapter]),
        close_audit_entry_sha256=closed)
    return write_receipt(signer.sign(statement), out)


def broker_checks(path, log) -> dict:
    result = verify_receipt(path.read_bytes(), broker_log=log)
    return {c.name: c for c in result.checks if c.name.startswith("broker.")}


def test_the_owners_log_corroborates_the_release_and_the_close(tmp_path, sealed, broker):
    _, manifest, _, _ = sealed
    path = receipt(tmp_path, broker, manifest)
    log = broker.store_dir / "audit.log"
    result = verify_receipt(path.read_bytes(), broker_log=log)
    assert result.ok, result.failures()
    checks = {c.name: c for c in result.checks}
    assert "records the dataset, manifest, recipe, evidence, nonce and receipt key" in checks["broker.release"].reason
    assert "dp_spend unbounded" in checks["broker.release"].reason  # DP off in this recipe
    assert "records the digest of the receipt's teardown record" in checks["broker.close"].reason


def test_what_the_log_does_not_say_fails(tmp_path, sealed, broker):
    _, manifest, _, _ = sealed
    log = broker.store_dir / "audit.log"
    other_manifest = receipt(tmp_path, broker, manifest, manifest_digest="cd" * 32)
    assert not broker_checks(other_manifest, log)["broker.release"].ok
    assert "records other manifest_digest" in broker_checks(other_manifest, log)["broker.release"].reason
    unclosed = broker_checks(receipt(tmp_path, broker, manifest, close=False), log)["broker.close"]
    assert not unclosed.ok and "never received the teardown record (the receipt says so too)" in unclosed.reason
    other_record = broker_checks(receipt(tmp_path, broker, manifest, teardown={"data_key": "kept"}), log)
    assert not other_record["broker.close"].ok and "another teardown record" in other_record["broker.close"].reason
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_bytes(log.read_bytes().splitlines(keepends=True)[0])  # a log that ends before the release
    assert "has no release" in broker_checks(receipt(tmp_path, broker, manifest), elsewhere)["broker.release"].reason


def test_an_altered_log_fails_before_anything_is_read_from_it(tmp_path, sealed, broker):
    _, manifest, _, _ = sealed
    path = receipt(tmp_path, broker, manifest)
    log = broker.store_dir / "audit.log"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    entries[-2]["dataset_id"] = "someone-else"
    altered = tmp_path / "altered.log"
    altered.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    checks = broker_checks(path, altered)
    assert list(checks) == ["broker.log"] and "entry altered after it was written" in checks["broker.log"].reason


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is not a regular file"),
    (lambda p: __import__("os").mkfifo(p), "is not a regular file"),
])
def test_a_broker_log_that_is_no_file_is_unusable_input(tmp_path, sealed, broker, capsys, make, problem):
    _, manifest, _, _ = sealed
    path = receipt(tmp_path, broker, manifest)
    make(tmp_path / "audit.log")
    with pytest.raises(UnusableInput, match=problem):
        verify_receipt(path.read_bytes(), broker_log=tmp_path / "audit.log")
    assert main(["receipt", "verify", str(path), "--broker-log", str(tmp_path / "audit.log")]) == 2
    assert problem in capsys.readouterr().err


def test_the_command_prints_the_broker_checks(tmp_path, sealed, broker, capsys):
    _, manifest, _, _ = sealed
    path = receipt(tmp_path, broker, manifest)
    assert main(["receipt", "verify", str(path), "--broker-log", str(broker.store_dir / "audit.log")]) == 0
    out = capsys.readouterr().out
    assert "ok   broker.release: release entry seq" in out and "ok   broker.close: close entry seq" in out


def test_an_anchored_head_vouches_for_the_entries_up_to_it(tmp_path, sealed, broker, capsys):
    """The chain has no key: whoever hands the log over could drop the real close and append one of their own.
    A head the owner anchored elsewhere after the close pins every entry up to it."""
    from medtee.broker.audit import _entry_hash, verify

    _, manifest, _, _ = sealed
    path = receipt(tmp_path, broker, manifest)
    log = broker.store_dir / "audit.log"
    head = verify(log).head
    checks = {c.name: c for c in verify_receipt(path.read_bytes(), broker_log=log, broker_head=head).checks}
    assert checks["broker.head"].ok and "is the anchored head" in checks["broker.head"].reason
    assert checks["broker.release"].ok and checks["broker.close"].ok
    assert main(["receipt", "verify", str(path), "--broker-log", str(log), "--broker-head", head]) == 0
    assert "ok   broker.head: entry seq" in capsys.readouterr().out
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    early = entries[-2]["hash"]  # anchored before the close: the close is not vouched for
    checks = {c.name: c for c in verify_receipt(path.read_bytes(), broker_log=log, broker_head=early).checks}
    assert checks["broker.head"].ok and checks["broker.release"].ok
    assert not checks["broker.close"].ok and "comes after the anchored head" in checks["broker.close"].reason
    unclosed = receipt(tmp_path, broker, manifest, close=False)  # its run could not reach the broker at the end
    head = verify(log).head  # anchored by the owner after that run: the log holds no close for it
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    release = [e for e in entries if e["event"] == "release"][-1]  # the unclosed run's
    made_up = {"seq": len(entries), "time": "2030-01-01T00:00:00.000+00:00", "event": "close",
               "release_id": release["hash"], "record_sha256": record_digest(TEARDOWN), "prev": entries[-1]["hash"]}
    made_up["hash"] = _entry_hash(made_up)
    extended = tmp_path / "extended.log"
    extended.write_text(log.read_text() + json.dumps(made_up, sort_keys=True) + "\n")
    assert verify_receipt(unclosed.read_bytes(), broker_log=extended).ok  # without an anchor, a close made up passes
    checks = {c.name: c for c in verify_receipt(unclosed.read_bytes(), broker_log=extended, broker_head=head).checks}
    assert checks["broker.head"].ok and checks["broker.release"].ok
    assert not checks["broker.close"].ok and "comes after the anchored head" in checks["broker.close"].reason
    cut = tmp_path / "cut.log"
    cut.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
    checks = {c.name: c for c in verify_receipt(path.read_bytes(), broker_log=cut, broker_head=head).checks}
    assert not checks["broker.head"].ok and "holds no entry" in checks["broker.head"].reason
    assert not checks["broker.close"].ok and "cannot be checked against an anchored head" in checks["broker.close"].reason
    for bad, problem in ((head[:16], "must be the 64 lowercase hex digits"), (head.upper(), "must be the 64")):
        assert main(["receipt", "verify", str(path), "--broker-log", str(log), "--broker-head", bad]) == 2
        assert problem in capsys.readouterr().err
    assert main(["receipt", "verify", str(path), "--broker-head", head]) == 2
    assert "--broker-head needs --broker-log" in capsys.readouterr().err


def test_the_broker_log_is_read_once(tmp_path, sealed, broker, monkeypatch):
    """One pass over one open file: a log swapped between reads cannot pass the chain check and then supply other
    entries to the release check."""
    import medtee.files

    _, manifest, _, _ = sealed
    path = receipt(tmp_path, broker, manifest)
    opened, real = [], medtee.files.open_regular

    def counting(p):
        opened.append(p)
        return real(p)

    monkeypatch.setattr(medtee.files, "open_regular", counting)
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail(f"the log was opened again: {a}"))
    assert verify_receipt(path.read_bytes(), broker_log=broker.store_dir / "audit.log").ok
    assert [p for p in opened if str(p).endswith("audit.log")] == [broker.store_dir / "audit.log"]


def test_a_log_that_closes_a_release_twice_is_not_the_brokers(tmp_path, sealed, broker):
    from medtee.broker.audit import _entry_hash, verify

    _, manifest, _, _ = sealed
    path = receipt(tmp_path, broker, manifest)
    log = broker.store_dir / "audit.log"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    second = {**entries[-1], "seq": len(entries), "record_sha256": "ab" * 32, "prev": entries[-1]["hash"]}
    second.pop("hash")
    second["hash"] = _entry_hash(second)
    twice = tmp_path / "twice.log"
    twice.write_text(log.read_text() + json.dumps(second, sort_keys=True) + "\n")
    checks = {c.name: c for c in verify_receipt(path.read_bytes(), broker_log=twice,
                                                broker_head=verify(twice).head).checks}
    assert not checks["broker.close"].ok and "closes this release 2 times" in checks["broker.close"].reason

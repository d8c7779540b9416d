"""`medtee receipt verify --broker-log`: the data owner's audit log corroborates the receipt's release and close."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from medtee.attestation import appraise, load_policy, report_data
from medtee.broker.protocol import obtain_data_key
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

"""A whole receipt made in-process: a sealed dataset, an EmbeddedBroker, simulated evidence binding the receipt key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from attestation.conftest import vectors  # noqa: F401 (the shared vectors, skipped when absent)
from sealing.conftest import broker, make_records, sealed  # noqa: F401 (fixtures shared with tests/sealing)

from medtee.attestation import appraise, load_policy, report_data
from medtee.attestation.simulated import SimulatedProvider
from medtee.broker.protocol import Release, canonical_json, obtain_data_key
from medtee.receipt.signing import ReceiptSigner, write_receipt
from medtee.receipt.statement import build_statement, file_subjects

RECIPE = {"model": {"id": "tiny", "revision": None, "weights_sha256": {}}, "qlora": {"rank": 4},
          "trainer": {"max_steps": 2, "seed": 0}}
RECIPE_DIGEST = hashlib.sha256(canonical_json(RECIPE)).hexdigest()
STARTED = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
TEARDOWN = {"data_key": "wiped", "checkpoint_key": "wiped", "temp_files_removed": 2}
METRICS = {"train/loss": 2.5, "val/loss": 2.75, "val/perplexity": 15.6}


def evidence_for(receipt_key: bytes):
    """What the run's `evidence_for` closes over: simulated evidence binding the receipt key (no GPUs)."""
    return lambda nonce, eph: SimulatedProvider().collect(report_data(
        nonce=nonce, ephemeral_public_key=eph, recipe_digest=RECIPE_DIGEST, receipt_public_key=receipt_key))


@dataclass
class Run:
    """A finished run: its receipt file, adapter file, signer, release and what went into the statement."""

    dir: Path
    receipt: Path
    adapter: Path
    signer: ReceiptSigner
    release: Release
    statement: dict


def statement_for(evidence, release, signer, *, adapter: Path, policy=None, error=None) -> dict:
    policy = policy or load_policy("simulated")
    verdict = appraise(evidence, policy, expected_report_data=None if policy.authenticity_only else report_data(
        nonce=release.nonce, ephemeral_public_key=release.ephemeral_public_key, recipe_digest=RECIPE_DIGEST,
        receipt_public_key=signer.public_bytes))
    return build_statement(recipe=RECIPE, recipe_digest=RECIPE_DIGEST, model_revision="main", weight_digests={},
                           dataset_id="test-ds", manifest_digest="cd" * 32, evidence=evidence, policy=policy,
                           verdict=verdict, release=release, receipt_public_key=signer.public_bytes,
                           started=STARTED, ended=STARTED + timedelta(minutes=3), metrics=METRICS,
                           teardown=TEARDOWN, error=error, subjects=file_subjects([adapter]))


@pytest.fixture
def run(tmp_path, sealed, broker) -> Run:  # noqa: F811 (the shared fixtures)
    _, manifest, _, _ = sealed
    signer = ReceiptSigner()
    seen = []

    def collect(nonce, eph):
        seen.append(evidence_for(signer.public_bytes)(nonce, eph))
        return seen[-1]

    release = obtain_data_key(broker, dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                              recipe_digest=RECIPE_DIGEST, evidence_for=collect,
                              receipt_public_key=signer.public_bytes)
    out = tmp_path / "run"
    out.mkdir()
    adapter = out / "adapter.safetensors.enc"
    adapter.write_bytes(bytes(range(256)) * 8)
    statement = statement_for(seen[-1], release, signer, adapter=adapter)
    return Run(out, write_receipt(signer.sign(statement), out), adapter, signer, release, statement)

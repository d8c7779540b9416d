"""No patient text leaves the loader's memory: unique canary identifiers injected into patient and doctor turns are
found nowhere a run writes (files, the MLflow database, stdout, stderr), in plain, UTF-16 or URL-encoded form."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

from conftest import run_medtee

pytestmark = pytest.mark.slow

CANARIES = [
    "Zorblatt Quenfeather",  # a patient name
    "MRN-QX7741-CANARY",  # a medical record number
    "555-0142-8876",  # a phone number
    "qzv.canary@example.invalid",  # an e-mail address
    "CANARYSTREET 88 Vexholm",  # an address
    "SSN 078-05-1120-QX",  # a social security number
]


def _forms(canary: str) -> list[bytes]:
    return [canary.encode(), canary.lower().encode(), canary.encode("utf-16-le"),
            urllib.parse.quote(canary).encode(), urllib.parse.quote_plus(canary).encode()]


def scan(paths: list[Path], texts: list[str]) -> list[str]:
    """Every (place, canary) where a canary appears in any of its encoded forms."""
    hits = []
    blobs = [(f"text#{i}", t.encode()) for i, t in enumerate(texts)]
    for root in paths:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                blobs.append((str(path), path.read_bytes()))
    for where, blob in blobs:
        lowered = blob.lower()
        for canary in CANARIES:
            if any(form in blob or form.lower() in lowered for form in _forms(canary)):
                hits.append(f"{canary!r} in {where}")
    return hits


def _inject(records: list[dict]) -> list[dict]:
    for i, rec in enumerate(records):
        canary = CANARIES[i % len(CANARIES)]
        for msg in rec["messages"]:
            msg["content"] = f"{msg['content']} ({canary})"
    return records


def test_canaries_never_leave_the_tee(tmp_path):
    owner, tee = tmp_path / "owner", tmp_path / "tee"
    owner.mkdir(), tee.mkdir()
    assert run_medtee("synth", "--n", "60", "--out", "plain.jsonl", cwd=owner).returncode == 0
    records = [json.loads(line) for line in (owner / "plain.jsonl").read_text().splitlines()]
    with open(owner / "canary.jsonl", "w") as f:
        for rec in _inject(records):
            f.write(json.dumps(rec) + "\n")
    assert scan([owner / "canary.jsonl"], []), "the scanner must find canaries in the plaintext input"

    sealed = run_medtee("seal", str(owner / "canary.jsonl"), "--out", str(owner / "sealed"), "--policy",
                        "simulated", cwd=owner)
    assert sealed.returncode == 0, sealed.stderr
    (tee / "tmp").mkdir()  # the run's temp directory is scanned too
    trained = run_medtee("train", "data=sealed", f"data.path={owner / 'sealed'}",
                         f"encryption.broker_dir={owner / '.medtee/broker'}", "trainer.max_steps=6",
                         "trainer.val_check_interval=3", cwd=tee, env={"TMPDIR": str(tee / "tmp")})
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tee / "mlflow.db").exists()

    hits = scan([tee, owner / "sealed", owner / ".medtee"],
                [sealed.stdout, sealed.stderr, trained.stdout, trained.stderr])
    assert not hits, hits


def test_the_scanner_finds_each_encoded_form(tmp_path):
    for i, form in enumerate(_forms(CANARIES[0])):
        (tmp_path / f"f{i}").write_bytes(b"xx" + form + b"yy")
    assert len(scan([tmp_path], [])) == len(_forms(CANARIES[0]))

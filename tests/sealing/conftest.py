"""Fixtures for the sealing tests: a broker store in tmp_path and small synthetic dialogues (no shared data)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def make_records(n: int, tag: str = "PHI") -> list[dict]:
    """`n` dialogues whose contents carry a recognisable marker, to prove no text leaks anywhere."""
    return [
        {
            "id": f"enc-{i:04d}",
            "messages": [
                {"role": "user", "content": f"{tag}-marker patient {i} reports chest pain since Tuesday."},
                {"role": "assistant", "content": f"{tag}-marker doctor {i}: any shortness of breath?"},
            ],
        }
        for i in range(n)
    ]


@pytest.fixture
def broker(tmp_path):
    from medtee.broker.service import EmbeddedBroker

    return EmbeddedBroker(tmp_path / "broker")


@pytest.fixture
def x25519_broker(tmp_path):
    from medtee.broker.service import EmbeddedBroker

    return EmbeddedBroker(tmp_path / "broker-x", scheme="hpke-x25519")


@pytest.fixture
def sealed(tmp_path, broker):
    """A 3-shard sealed dataset of 25 records: (directory, manifest, records, data key)."""
    from medtee.sealing.seal import seal_records

    records = make_records(25)
    out = tmp_path / "sealed"
    manifest = seal_records(records, out, broker=broker, policy="simulated", dataset_id="test-ds", rows_per_shard=10,
                            row_group_rows=4)
    return out, manifest, records, broker.unwrap_data_key(manifest)


JSONL_RECORDS = 30


@pytest.fixture
def jsonl(tmp_path, monkeypatch):
    """`JSONL_RECORDS` marked records in tmp_path/in.jsonl, with tmp_path as the working directory."""
    import json

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(JSONL_RECORDS)))
    return path

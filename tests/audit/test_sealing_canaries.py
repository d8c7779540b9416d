"""Canaries sealed with the dataset: the TEE reads them (and their records) back with the data key; no canary is in
any file the sealer writes or in its output; datasets sealed without canaries still open."""

from __future__ import annotations

import json

import pytest

from conftest import run_medtee
from medtee.audit.canaries import CANARY_FILE, CANARY_ID_PREFIX, plan_canaries
from medtee.sealing.manifest import SealedDataError
from medtee.sealing.reader import open_dataset
from medtee.sealing.seal import InputError, seal_records

from .conftest import dialogues, leaks


def _seal(tmp_path, broker, records, plan, name="sealed"):
    manifest = seal_records(records, tmp_path / name, broker=broker, policy="simulated", dataset_id="audit-ds",
                            rows_per_shard=40, canaries=plan)
    return tmp_path / name, manifest, broker.unwrap_data_key(manifest)


def test_canaries_round_trip_inside_the_tee_and_nowhere_else(tmp_path, broker):
    records = dialogues(50)
    plan = plan_canaries(2, (1, 4, 16), real_records=len(records), seed=9)
    out, manifest, key = _seal(tmp_path, broker, records, plan)
    dataset = open_dataset(out)
    assert dataset.canaries(key) == list(plan.canaries)
    assert [c.repeats for c in dataset.canaries(key)] == [1, 1, 4, 4, 16, 16, 0, 0]
    info = manifest.canaries
    assert (info.name, info.inserted, info.controls, info.records) == (CANARY_FILE, 6, 2, 42)
    assert manifest.record_count == 50 + 42 and len(manifest.shards) == 3

    decrypted = dataset.read_records(key)  # the TEE's view
    doctor = [m["content"] for r in decrypted for m in r["messages"] if m["role"] == "assistant"]
    assert all(doctor.count(c.text) == c.repeats for c in plan.canaries)
    assert [r for r in decrypted if not r["id"].startswith(CANARY_ID_PREFIX)] == records  # real records untouched
    where = [i for i, r in enumerate(decrypted) if r["id"].startswith(CANARY_ID_PREFIX)]
    assert where[0] < 20 and where[-1] > 70  # spread, not appended

    assert leaks(plan.canaries, [out, tmp_path / "broker"]) == []
    assert all(c.text not in repr(dataset) for c in plan.canaries)


def test_the_cli_seals_canaries_and_prints_counts_only(tmp_path, broker):
    from medtee.broker.service import EmbeddedBroker

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dialogues(30)))
    res = run_medtee("seal", "d.jsonl", "--out", "sealed", "--broker-dir", "b", "--canaries", "3",
                     "--canary-repeats", "1,8", "--canary-seed", "4", "--dataset-id", "cli-ds", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "canaries       6 inserted in 27 added records, 3 never-inserted controls" in res.stdout
    dataset = open_dataset(tmp_path / "sealed")
    canaries = dataset.canaries(EmbeddedBroker(tmp_path / "b").unwrap_data_key(dataset.manifest))
    assert canaries == list(plan_canaries(3, (1, 8), real_records=30, seed=4).canaries)
    inspect = run_medtee("dataset", "inspect", "sealed", cwd=tmp_path)
    assert inspect.returncode == 0 and "6 inserted" in inspect.stdout
    captured = {"stdout": res.stdout + inspect.stdout, "stderr": res.stderr + inspect.stderr}
    assert leaks(canaries, [tmp_path], captured) == []

    bad = run_medtee("seal", "d.jsonl", "--out", "s2", "--broker-dir", "b", "--canaries", "2", "--canary-repeats",
                     "1,1", cwd=tmp_path)
    assert bad.returncode == 2 and "--canary-repeats must be distinct" in bad.stderr
    assert not (tmp_path / "s2").exists()


def test_a_dataset_sealed_without_canaries_still_opens(tmp_path, broker):
    out, manifest, key = _seal(tmp_path, broker, dialogues(5), None)
    assert manifest.canaries is None
    assert "canaries" not in json.loads((out / "manifest.json").read_text())  # the signed form of before
    dataset = open_dataset(out)
    assert dataset.canaries(key) == [] and len(dataset.read_records(key)) == 5


@pytest.mark.parametrize("damage", ["altered", "removed", "unlisted"])
def test_a_damaged_canary_file_or_entry_is_refused(tmp_path, broker, damage):
    records = dialogues(5)
    out, _, _ = _seal(tmp_path, broker, records, plan_canaries(1, (2,), real_records=5, seed=1))
    doc = json.loads((out / "manifest.json").read_text())
    if damage == "altered":
        blob = bytearray((out / CANARY_FILE).read_bytes())
        blob[-1] ^= 1
        (out / CANARY_FILE).write_bytes(bytes(blob))
        match = "canary file canaries.enc does not match its manifest digest"
    elif damage == "removed":
        (out / CANARY_FILE).unlink()
        match = "canary file canaries.enc listed in the manifest is missing"
    else:
        del doc["canaries"]
        (out / "manifest.json").write_text(json.dumps(doc))
        match = "signature does not verify"
    with pytest.raises(SealedDataError, match=match):
        open_dataset(out)


def test_the_wrong_key_reads_no_canary(tmp_path, broker):
    out, _, _ = _seal(tmp_path, broker, dialogues(5), plan_canaries(1, (2,), real_records=5, seed=1))
    with pytest.raises(SealedDataError, match="data key does not belong"):
        open_dataset(out).canaries(bytes(32))


def test_a_plan_for_another_record_count_is_refused_and_nothing_kept(tmp_path, broker):
    with pytest.raises(InputError, match="the input holds 5 records, the canaries were placed among 6"):
        _seal(tmp_path, broker, dialogues(5), plan_canaries(1, (2,), real_records=6, seed=1))
    assert not (tmp_path / "sealed").exists()


@pytest.mark.parametrize("entry, match", [({"name": "../x"}, "not a plain file name"),
                                          ({"name": "part-00000.parquet"}, "not a plain file name of its own"),
                                          ({"records": -1}, "non-negative ints"),
                                          ({"extra": 1}, "malformed field")])
def test_a_malformed_canary_entry_is_refused(tmp_path, broker, entry, match):
    from medtee.sealing.manifest import Manifest

    out, _, _ = _seal(tmp_path, broker, dialogues(5), plan_canaries(1, (2,), real_records=5, seed=1))
    doc = json.loads((out / "manifest.json").read_text())
    doc["canaries"] |= entry
    with pytest.raises(SealedDataError, match=match):
        Manifest.from_json(json.dumps(doc))

"""Sealing records and reading them back in memory, with the integrity checks made before any decryption."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from medtee.sealing.manifest import Manifest, SealedDataError
from medtee.sealing.reader import open_dataset
from medtee.sealing.seal import InputError, OutputError, read_input, read_jsonl, seal_located, seal_records

from .conftest import SHARED, make_records


def test_round_trip(sealed):
    out, manifest, records, key = sealed
    assert [s.rows for s in manifest.shards] == [10, 10, 5]
    assert manifest.record_count == 25 and manifest.message_count == 50
    assert manifest.char_count == sum(len(m["content"]) for r in records for m in r["messages"])
    assert manifest.cipher == "AES_GCM_V1" and manifest.release_policy == "simulated"
    ds = open_dataset(out)
    assert ds.manifest == manifest == Manifest.load(out)
    assert ds.read_records(key) == records
    batches = list(ds.iter_batches(key, batch_rows=4))
    assert sum(b.num_rows for b in batches) == 25 and max(b.num_rows for b in batches) == 4
    assert "PHI-marker" not in repr(ds)


def test_no_plaintext_on_disk(sealed, tmp_path):
    out, *_ = sealed
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"PHI-marker" not in data and b"chest pain" not in data, path
    assert not list(out.parent.glob(".sealed.sealing-*"))


def test_encrypted_footer_hides_schema(sealed):
    import pyarrow.parquet as pq

    out, manifest, _, _ = sealed
    with pytest.raises(Exception):
        pq.ParquetFile(out / manifest.shards[0].name)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda d: _flip(d / "part-00001.parquet", 300), "part-00001.parquet does not match its manifest digest"),
        (lambda d: (d / "part-00001.parquet").write_bytes((d / "part-00001.parquet").read_bytes()[:-7]),
         "part-00001.parquet has .* bytes, the manifest says .*truncated"),
        (lambda d: (d / "part-00002.parquet").unlink(), "part-00002.parquet listed in the manifest is missing"),
        (lambda d: (d / "part-00003.parquet").write_bytes(b"PAR1"), "part-00003.parquet is not listed"),
        (lambda d: (d / "part-00000.parquet").rename(d / "part-00009.parquet"), "part-00000.parquet listed in the manifest is missing"),
        (lambda d: _swap(d / "part-00000.parquet", d / "part-00001.parquet"), "shard part-00000.parquet has"),
    ],
    ids=["flipped-byte", "truncated", "missing", "extra", "renamed", "reordered"],
)
def test_tampered_shards_are_refused_up_front_naming_the_shard(sealed, tamper, message):
    out, *_ = sealed
    tamper(out)
    with pytest.raises(SealedDataError, match=message):
        open_dataset(out)


def _swap(a, b):
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_shard_changed_after_open_is_refused_at_read(sealed):
    out, _, _, key = sealed
    ds = open_dataset(out)
    _flip(out / "part-00002.parquet", 100)
    with pytest.raises(SealedDataError, match="part-00002.parquet changed after the dataset was opened"):
        ds.read_records(key)


def test_altered_manifest_is_refused(sealed):
    out, *_ = sealed
    doc = json.loads((out / "manifest.json").read_text())
    doc["release_policy"] = "anything-goes"
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SealedDataError, match="signature does not verify"):
        open_dataset(out)
    (out / "manifest.json").unlink()
    with pytest.raises(SealedDataError, match="not a sealed dataset"):
        open_dataset(out)


def test_wrong_data_key_is_refused(sealed, tmp_path, broker):
    out, _, _, key = sealed
    ds = open_dataset(out)
    with pytest.raises(SealedDataError, match="does not belong to dataset test-ds"):
        ds.read_records(os.urandom(32))
    other = seal_records(make_records(3), tmp_path / "other", broker=broker, policy="simulated", dataset_id="other")
    with pytest.raises(SealedDataError, match="does not belong"):
        ds.read_records(broker.unwrap_data_key(other))
    assert ds.read_records(key)


def test_shard_of_another_dataset_with_the_same_name_is_refused(sealed, tmp_path, broker):
    out, *_ = sealed
    other = tmp_path / "other"
    seal_records(make_records(25), other, broker=broker, policy="simulated", dataset_id="other", rows_per_shard=10)
    shutil.copy(other / "part-00001.parquet", out / "part-00001.parquet")
    with pytest.raises(SealedDataError, match="part-00001.parquet"):
        open_dataset(out)


def test_out_dir_rules(tmp_path, broker):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        seal_records(make_records(2), tmp_path / "full", broker=broker, policy="simulated")
    (tmp_path / "empty").mkdir()
    seal_records(make_records(2), tmp_path / "empty", broker=broker, policy="simulated")
    assert open_dataset(tmp_path / "empty").manifest.record_count == 2


def test_failure_midway_leaves_nothing(tmp_path, broker):
    def records():
        yield from make_records(30)
        yield {"id": "bad", "messages": [{"role": "nurse", "content": "PHI-marker secret"}]}

    with pytest.raises(InputError, match=r"record 30 \(counting from 0\): message 0: 'role' must be one of") as err:
        seal_records(records(), tmp_path / "out", broker=broker, policy="simulated", rows_per_shard=10)
    assert "PHI-marker" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker"]
    assert broker.datasets() == []


def test_duplicate_ids_and_empty_input(tmp_path, broker):
    recs = make_records(2) + make_records(1)
    with pytest.raises(InputError, match=r"record 2 \(counting from 0\): duplicate id: record 0 \(counting from 0\) has the same id"):
        seal_records(recs, tmp_path / "a", broker=broker, policy="simulated")
    with pytest.raises(InputError, match="empty"):
        seal_records([], tmp_path / "b", broker=broker, policy="simulated")


def test_jsonl_errors_name_file_line_and_field_not_content(tmp_path):
    p = tmp_path / "in.jsonl"
    good = json.dumps(make_records(1)[0])
    for line, want in [
        ('{"id": "a", "messages": [{"role": "user", "content": "PHI-marker"}', "not valid JSON"),
        ('{"id": "a", "messages": [{"role": "user", "content": 7}]}', r"message 0: 'content' must be a string or a list"),
        ('{"id": "", "messages": [{"role": "user", "content": "PHI-marker"}]}', "field 'id'"),
        ('{"id": "a", "messages": "PHI-marker"}', "field 'messages'"),
        ('["PHI-marker"]', "JSON object"),
    ]:
        p.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(InputError, match=rf"{p}:3: .*{want}") as err:
            list(read_jsonl(p))
        assert "PHI-marker" not in str(err.value)


def test_extra_fields_are_dropped(tmp_path):
    p = tmp_path / "in.jsonl"
    rec = dict(make_records(1)[0], source="x", reference={"note": "y"})
    rec["messages"][0]["name"] = "z"
    p.write_text(json.dumps(rec) + "\n")
    assert list(read_jsonl(p)) == [(f"{p}:1", make_records(1)[0])]


def test_csv_transcripts(tmp_path, broker):
    import csv

    p = tmp_path / "t.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Transcript"])
        w.writerow(["c1", "Doctor: How are you?\nPatient: Tired.\nStill tired today.\nDOCTOR:Rest then."])
        w.writerow(["c2", "Patient: Hello\nDoctor: Hi"])
    located = list(read_input(p))
    assert [where for where, _ in located] == [f"{p}:2", f"{p}:6"]  # row 1 spans lines 2-5
    recs = [rec for _, rec in located]
    assert recs[0] == {"id": "c1", "messages": [
        {"role": "assistant", "content": "How are you?"},
        {"role": "user", "content": "Tired.\nStill tired today."},
        {"role": "assistant", "content": "Rest then."}]}
    assert recs[1]["messages"][0] == {"role": "user", "content": "Hello"}
    m = seal_records(recs, tmp_path / "out", broker=broker, policy="simulated")
    assert open_dataset(tmp_path / "out").read_records(broker.unwrap_data_key(m)) == recs
    with open(p, "a", newline="") as f:
        csv.writer(f).writerow(["c3", "PHI-marker text without turns"])
    with pytest.raises(InputError, match=r"t.csv:8: transcript line 1 comes before any 'Doctor:'") as err:
        list(read_input(p))
    assert "PHI-marker" not in str(err.value)
    (tmp_path / "h.csv").write_text("name,body\nx,y\n")
    with pytest.raises(InputError, match="'id' column"):
        list(read_input(tmp_path / "h.csv"))


def test_plain_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = make_records(5)
    pq.write_table(pa.Table.from_pylist([dict(r, extra=1) for r in recs]), tmp_path / "in.parquet")
    assert list(read_input(tmp_path / "in.parquet")) == [(f"{tmp_path / 'in.parquet'}: row {n} (counting from 0)", r)
                                                         for n, r in enumerate(recs)]
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="lacks column"):
        list(read_input(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match="--format"):
        list(read_input(tmp_path / "in.txt"))


def test_shared_demo_round_trip(tmp_path, broker):
    demo = SHARED / "data" / "demo.jsonl"
    if not demo.exists():
        pytest.skip("../shared is absent: no demo dialogues to seal")
    m = seal_located(read_jsonl(demo), tmp_path / "demo", broker=broker, policy="simulated", rows_per_shard=64)
    assert m.record_count == 200 and len(m.shards) == 4
    assert open_dataset(tmp_path / "demo").read_records(broker.unwrap_data_key(m)) == [r for _, r in read_jsonl(demo)]

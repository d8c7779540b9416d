"""Token counts in the signed manifest (`medtee seal --tokenizer`), checked against the data module's tokenization."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from medtee.cli import main
from medtee.data.synthetic import generate_dialogues, write_jsonl
from medtee.sealing import tokens
from medtee.sealing.manifest import Manifest, SealedDataError
from medtee.sealing.reader import open_dataset
from medtee.sealing.seal import seal_records

REPO = Path(__file__).resolve().parents[2]
NO_DOCTOR = {"id": "no-doctor", "messages": [{"role": "user", "content": "PHI-marker patient only, no reply."}]}


def _records(n: int = 30) -> list[dict]:
    return generate_dialogues(n, seed=7) + [NO_DOCTOR]


def _expected_tokens(records: list[dict]) -> int:
    from medtee.data.module import tokenize_records
    from medtee.data.tokenizer import build_demo_tokenizer

    data = tokenize_records(records, build_demo_tokenizer(), max_length=1_000_000)
    assert not data.truncated.any()
    return int(data.lengths().sum())


def test_token_count_equals_data_module_tokenization(tmp_path, broker, monkeypatch):
    monkeypatch.setattr(tokens, "_CHUNK", 7)  # several batched calls, the last one partial
    records = _records()
    manifest = seal_records(records, tmp_path / "ds", broker=broker, policy="simulated", rows_per_shard=8,
                            tokenizer="demo")
    expected = _expected_tokens(records)
    assert expected > 0 and manifest.token_count == expected
    assert _expected_tokens([NO_DOCTOR]) == 0  # a dialogue the encoder drops counts nothing
    from medtee.data.tokenizer import build_demo_tokenizer

    assert manifest.tokenizer == f"demo sha256:{tokens.fingerprint(build_demo_tokenizer())}"
    assert open_dataset(tmp_path / "ds").manifest == manifest
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["token_count"] == expected


def test_cli_inspect_shows_count_and_local_directory_tokenizer(tmp_path, monkeypatch, capsys):
    from medtee.data.tokenizer import build_demo_tokenizer

    monkeypatch.chdir(tmp_path)
    records = _records(12)
    write_jsonl(records, tmp_path / "in.jsonl")
    build_demo_tokenizer().save_pretrained(tmp_path / "my-tok")
    assert main(["seal", "in.jsonl", "--out", "a", "--tokenizer", "demo"]) == 0
    assert main(["seal", "in.jsonl", "--out", "b", "--tokenizer", str(tmp_path / "my-tok")]) == 0
    printed = capsys.readouterr()
    a, b = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert a.token_count == b.token_count == _expected_tokens(records)
    assert b.tokenizer == "my-tok " + a.tokenizer.split(" ")[1]  # same vocabulary, same fingerprint
    assert main(["dataset", "inspect", "a"]) == 0
    out = capsys.readouterr().out
    assert f"tokens         {a.token_count}   tokenizer {a.tokenizer}" in out
    assert not any("PHI-marker" in text for text in (out, printed.out, printed.err))


def test_tampered_token_count_breaks_signature(tmp_path, broker, capsys):
    manifest = seal_records(_records(8), tmp_path / "ds", broker=broker, policy="simulated", tokenizer="demo")
    path = tmp_path / "ds" / "manifest.json"
    original = json.loads(path.read_text())
    for field, value in [("token_count", manifest.token_count + 1), ("tokenizer", "demo sha256:" + "0" * 64)]:
        path.write_text(json.dumps({**original, field: value}))
        with pytest.raises(SealedDataError, match="signature does not verify"):
            open_dataset(tmp_path / "ds")
        assert main(["dataset", "inspect", str(tmp_path / "ds")]) == 2
        assert "signature does not verify" in capsys.readouterr().err
    path.write_text(json.dumps({**original, "token_count": None, "tokenizer": None}))  # dropping the count
    with pytest.raises(SealedDataError, match="signature does not verify"):
        open_dataset(tmp_path / "ds")


def test_no_tokenizer_records_no_count(tmp_path, broker, monkeypatch, capsys):
    manifest = seal_records(_records(5), tmp_path / "ds", broker=broker, policy="simulated")
    assert manifest.token_count is None and manifest.tokenizer is None
    doc = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert doc["token_count"] is None and doc["tokenizer"] is None and doc["format_version"] == 2
    assert main(["dataset", "inspect", str(tmp_path / "ds")]) == 0
    assert "token count: not recorded (seal with --tokenizer)" in capsys.readouterr().out


def test_sealing_without_tokenizer_imports_no_transformers_or_torch(tmp_path):
    script = (
        "import sys, json\n"
        "from medtee.cli import main\n"
        f"open({str(tmp_path / 'in.jsonl')!r}, 'w').write(json.dumps({NO_DOCTOR!r}) + '\\n')\n"
        f"assert main(['seal', {str(tmp_path / 'in.jsonl')!r}, '--out', {str(tmp_path / 'ds')!r}, "
        f"'--broker-dir', {str(tmp_path / 'broker')!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_format_1_manifest_still_reads_and_verifies(sealed, broker):
    out, manifest, *_ = sealed
    old = replace(manifest, format_version=1).signed(broker.owner_signing_key())
    doc = json.loads(old.to_json())
    assert "token_count" not in doc and "tokenizer" not in doc  # the fields and canonical form of format 1
    loaded = Manifest.from_json(old.to_json())
    assert loaded == old and loaded.token_count is None
    loaded.verify_signature()
    with pytest.raises(SealedDataError, match="unknown field"):
        Manifest.from_json(json.dumps({**doc, "token_count": 5, "tokenizer": "demo sha256:00"}))
    with pytest.raises(ValueError, match="format-1"):
        replace(old, token_count=5, tokenizer="demo sha256:00").canonical_body()


def test_bad_tokenizer_and_control_tokens_are_refused(tmp_path, broker, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(_records(3), tmp_path / "in.jsonl")
    assert main(["seal", "in.jsonl", "--out", "ds", "--tokenizer", str(tmp_path / "no-such-dir")]) == 2
    assert "no tokenizer found locally" in capsys.readouterr().err and not (tmp_path / "ds").exists()
    forged = {"id": "forged", "messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "PHI-marker <end_of_turn> x"}]}
    with pytest.raises(ValueError, match=r"record 0 \(counting from 0\), message 1: the text contains the control token") as caught:
        seal_records([forged], tmp_path / "ds", broker=broker, policy="simulated", tokenizer="demo")
    assert "PHI-marker" not in str(caught.value)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.sealing-*"))


@pytest.mark.parametrize("field, value", [("shards", "x"), ("shards", ["x"]), ("signature", 5),
                                          ("canaries", [1])])
def test_a_malformed_manifest_field_is_named(sealed, field, value):
    _, manifest, *_ = sealed
    doc = {**json.loads(manifest.to_json()), field: value}
    with pytest.raises(SealedDataError, match=f"malformed field {field} "):
        Manifest.from_json(json.dumps(doc))

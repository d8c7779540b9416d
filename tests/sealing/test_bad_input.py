"""Bad input and output places are refused with exit 2 and one message naming the file, line (or row) and field and
the fix: no traceback, nothing half-written, never a record's id or text (issue 11)."""

from __future__ import annotations

import csv
import errno
import json
import os
import threading
from pathlib import Path

import pytest

from medtee.cli import main
from medtee.sealing.manifest import MAX_MANIFEST_BYTES, SealedDataError
from medtee.sealing.reader import open_dataset
from medtee.sealing.seal import MAX_RECORD_BYTES, read_input, seal_located

from conftest import run_medtee
from .conftest import make_records

SECRET_ID = "PHI-ID-Jane-Roe-1961"  # an id that carries a patient identifier: it must never be printed


def _line(rec_id: str = SECRET_ID, content: object = "PHI-marker doctor text") -> str:
    return json.dumps({"id": rec_id, "messages": [{"role": "user", "content": "PHI-marker hello"},
                                                  {"role": "assistant", "content": content}]})


def _jsonl(path: Path, *lines: str, encoding: str = "utf-8") -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding=encoding)


def _cli(cwd: Path, *args: str) -> tuple[int, str]:
    """Exit status and stderr of `medtee ARGS` run as a user runs it."""
    result = run_medtee(*args, cwd=cwd, timeout=60)
    return result.returncode, result.stderr


def _in_process(capsys, *args: str) -> tuple[int, str]:
    """Exit status and stderr of `medtee ARGS` run in this process (where a test patches a write)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _refused(outcome: tuple[int, str], *expected: str) -> str:
    """The one stderr line of a refusal (exit 2), after checking it holds `expected` and no id, text or traceback."""
    code, err = outcome
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("medtee: ") and "Traceback" not in err, err
    assert SECRET_ID not in err and "PHI-marker" not in err, err
    for text in expected:
        assert text in err, err
    return err


def _left(root: Path, *inputs: str) -> list[str]:
    """What a refused `medtee seal` left in `root`, besides the inputs and the broker stores (CLI's, fixture's)."""
    return sorted(p.name for p in root.iterdir() if p.name not in (*inputs, ".medtee", "broker"))


@pytest.mark.parametrize("raw, field", [
    (_line(content="PHI-marker cafe").encode().replace(b"cafe", b"caf\xe9"), "message 1's content"),
    (_line(content="PHI-marker \ud800 x").encode(), "message 1's content"),  # json.dumps writes the escape
    (_line(rec_id="PHI-ID-\udc80").encode(), "field 'id'"),
    (_line(content=[{"type": "text", "text": "PHI-marker"}, {"type": "text", "text": "\ud83d"}]).encode(),
     "message 1's content"),
], ids=["latin-1 byte", "lone surrogate escape", "surrogate in id", "surrogate in a text part"])
def test_text_that_is_not_utf8_names_file_line_and_field(tmp_path, raw, field):
    (tmp_path / "in.jsonl").write_bytes(_line(rec_id="ok").encode() + b"\n" + raw + b"\n")
    err = _refused(_cli(tmp_path, "seal", "in.jsonl", "--out", "a/b/c"),
                   f"in.jsonl:2: {field} is not valid UTF-8 text")
    assert "\\ud800" in err  # the fix names the escape
    assert _left(tmp_path, "in.jsonl") == []  # a bad second record: staged, then removed with the parents made


def test_json_too_deep_or_with_a_huge_number_names_file_and_line(tmp_path):
    _jsonl(tmp_path / "deep.jsonl", _line(), "[" * 100_000 + "]" * 100_000)
    _refused(_cli(tmp_path, "seal", "deep.jsonl", "--out", "ds"), "deep.jsonl:2: JSON nested too deeply")
    _jsonl(tmp_path / "num.jsonl", '{"id": 1' + "7" * 5000 + "}")
    _refused(_cli(tmp_path, "seal", "num.jsonl", "--out", "ds"), "num.jsonl:1: a JSON number has over")
    assert _left(tmp_path, "deep.jsonl", "num.jsonl") == []


@pytest.mark.parametrize("line, named", [
    ('{"id": "a", "id": "b", "messages": []}', "field 'id'"),
    ('{"id": "a", "messages": [{"role": "user", "content": "PHI-marker x", "content": "PHI-marker y"}]}',
     "field 'content'"),
    ('{"id": "a", "PHI-marker key": 1, "PHI-marker key": 2, "messages": []}', "a key"),  # never quoted: could be data
])
def test_a_key_given_twice_in_one_object_is_refused(tmp_path, line, named):
    """json.loads keeps the last value silently: which turn text, or which id, was meant is ambiguous."""
    _jsonl(tmp_path / "in.jsonl", _line(rec_id="ok"), line)
    _refused(_cli(tmp_path, "seal", "in.jsonl", "--out", "ds"), f"in.jsonl:2: a JSON object holds {named} twice")
    assert _left(tmp_path, "in.jsonl") == []


def test_duplicate_ids_name_both_lines_not_the_id(tmp_path):
    _jsonl(tmp_path / "in.jsonl", _line(), "", _line(rec_id="other"), _line())
    _refused(_cli(tmp_path, "seal", "in.jsonl", "--out", "ds"),
             "in.jsonl:4: duplicate id: in.jsonl:1 has the same id")
    assert _left(tmp_path, "in.jsonl") == []


def test_csv_and_jsonl_long_fields_bom_bytes_and_the_record_bound(tmp_path):
    long_turn = "PHI-marker " * 20_000  # 220,000 characters: over Python's default CSV field limit of 131,072
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8-sig") as f:  # with a UTF-8 BOM
        csv.writer(f).writerows([["id", "transcript"], ["c1", f"Patient: hi\nDoctor: {long_turn}"]])
    (where, rec), = read_input(tmp_path / "t.csv")
    assert where == f"{tmp_path / 't.csv'}:2" and rec["messages"][1]["content"] == long_turn.strip()
    code, err = _cli(tmp_path, "seal", "t.csv", "--out", "ds")
    assert code == 0, err
    _jsonl(tmp_path / "bom.jsonl", _line(), encoding="utf-8-sig")
    assert [where for where, _ in read_input(tmp_path / "bom.jsonl")] == [f"{tmp_path / 'bom.jsonl'}:1"]
    (tmp_path / "latin.csv").write_bytes(b"id,transcript\nc1,Doctor: ok\nc2,Doctor: PHI-marker caf\xe9\n")
    _refused(_cli(tmp_path, "seal", "latin.csv", "--out", "big"),
             "latin.csv:3: message 0's content is not valid UTF-8 text")
    huge = "x" * (MAX_RECORD_BYTES + 1)
    with open(tmp_path / "big.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "transcript"], ["c1", "Doctor: ok"], ["c2", f"Doctor: {huge}"]])
    _refused(_cli(tmp_path, "seal", "big.csv", "--out", "big"), "big.csv:3: the record is over 16 MiB")
    _jsonl(tmp_path / "big.jsonl", _line(content=huge))
    _refused(_cli(tmp_path, "seal", "big.jsonl", "--out", "big"), "big.jsonl:1: the record is over 16 MiB")
    assert _left(tmp_path, "t.csv", "bom.jsonl", "latin.csv", "big.csv", "big.jsonl") == ["ds"]


def test_corrupt_parquet_page_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, id=f"{SECRET_ID}-{i}") for i, r in enumerate(make_records(200))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", compression="none")
    data = bytearray((tmp_path / "in.parquet").read_bytes())
    data[len(data) // 2:len(data) // 2 + 8] = b"\xff" * 8  # inside a data page, far from the footer
    (tmp_path / "in.parquet").write_bytes(bytes(data))
    _refused(_cli(tmp_path, "seal", "in.parquet", "--out", "a/ds"),
             "in.parquet: the rows from row 0 (counting from 0) on cannot be read", "corrupt")
    assert _left(tmp_path, "in.parquet") == []


def test_text_parts_are_stored_flattened_and_other_parts_refused(tmp_path, broker):
    from medtee.data.chat import render, to_gemma_turns

    parts = {"id": "p1", "messages": [
        {"role": "system", "content": [{"type": "text", "text": " Be brief. "}]},
        {"role": "user", "content": [{"type": "text", "text": " My ear "}, {"type": "text", "text": "hurts. "}]},
        {"role": "assistant", "content": "Any fever?"}]}
    _jsonl(tmp_path / "in.jsonl", json.dumps(parts))
    (_, stored), = read_input(tmp_path / "in.jsonl")
    assert [m["content"] for m in stored["messages"]] == [" Be brief. ", "My earhurts.", "Any fever?"]
    assert render(to_gemma_turns(stored["messages"]), "<bos>") == render(to_gemma_turns(parts["messages"]), "<bos>")
    m = seal_located(read_input(tmp_path / "in.jsonl"), tmp_path / "ds", broker=broker, policy="simulated")
    assert open_dataset(tmp_path / "ds").read_records(broker.unwrap_data_key(m)) == [stored]
    for content, message in [
        ([{"type": "text", "text": "PHI-marker"}, {"type": "image", "url": "x"}], "content part 1 is an 'image' part"),
        ([{"type": ["PHI-marker"]}], "content part 0 is a part that is not of type 'text'"),
        ({"text": "PHI-marker"}, "'content' must be a string or a list of"),
    ]:
        _jsonl(tmp_path / "bad.jsonl", _line(rec_id="ok"), _line(content=content))
        _refused(_cli(tmp_path, "seal", "bad.jsonl", "--out", "bad"), f"bad.jsonl:2: message 1: {message}")
    assert _left(tmp_path, "in.jsonl", "bad.jsonl") == ["ds"]


def test_out_under_a_file_or_with_bad_first_record_creates_nothing(tmp_path):
    _jsonl(tmp_path / "in.jsonl", _line())
    (tmp_path / "afile").write_text("x")
    _refused(_cli(tmp_path, "seal", "in.jsonl", "--out", "afile/x/ds"),
             "--out afile/x/ds: afile is a file, not a directory")
    _jsonl(tmp_path / "bad.jsonl", _line(content=7))
    _refused(_cli(tmp_path, "seal", "bad.jsonl", "--out", "a/b/c"), "bad.jsonl:1: message 1: ")
    (tmp_path / "dir.jsonl").mkdir()
    _refused(_cli(tmp_path, "seal", "dir.jsonl", "--out", "a/b/c"), "dir.jsonl: not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "bad.jsonl", "dir.jsonl", "in.jsonl"]  # no broker


@pytest.fixture
def owner(tmp_path, monkeypatch):
    """The working directory of an in-process `medtee seal`, with an input of 12 records."""
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "in.jsonl", *(_line(rec_id=f"{SECRET_ID}-{i}") for i in range(12)))
    return tmp_path


@pytest.mark.parametrize("target", ["shard", "manifest"])
def test_full_disk_names_out_and_keeps_nothing(owner, capsys, monkeypatch, target):
    import pyarrow.parquet as pq

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if target == "shard":
        monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    else:
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda p, *a, **k: full() if p.name == "manifest.json" else real(p, *a, **k))
    _refused(_in_process(capsys, "seal", "in.jsonl", "--out", "new/ds", "--rows-per-shard", "5"),
             "--out new/ds: writing the sealed dataset failed (No space left on device); nothing was kept")
    assert _left(owner, "in.jsonl") == []
    assert not list((owner / ".medtee" / "broker").glob("datasets/*"))


def test_unwritable_parent_names_out_not_the_temporary_directory(owner, capsys, monkeypatch):
    real = Path.mkdir

    def mkdir(path, *args, **kwargs):
        if ".sealing-" in path.name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    (owner / "locked").mkdir()
    err = _refused(_in_process(capsys, "seal", "in.jsonl", "--out", "locked/x/ds"),
                   "--out locked/x/ds cannot be created (Permission denied)")
    assert ".sealing-" not in err and not (owner / "locked" / "x").exists()


def test_control_token_refusal_names_the_line_not_the_id(owner, capsys):
    _jsonl(owner / "in.jsonl", _line(), _line(rec_id=f"{SECRET_ID}-2", content="PHI-marker <end_of_turn> x"))
    _refused(_in_process(capsys, "seal", "in.jsonl", "--out", "a/ds", "--tokenizer", "demo"),
             "in.jsonl:2, message 1: the text contains the control token <end_of_turn>")
    assert _left(owner, "in.jsonl") == []


REPLACEMENTS = {  # what a dataset file is replaced with
    "directory": lambda p: p.mkdir(),
    "fifo": os.mkfifo,
    "link to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
    "oversized": lambda p: p.write_bytes(b" " * (MAX_MANIFEST_BYTES + 1)),
    "too deep": lambda p: p.write_text("[" * 200_000),
    "not utf-8": lambda p: p.write_bytes(b'{"format_version": "\xff"}'),
}


def _error_within(fn, seconds: float = 20) -> BaseException | None:
    """The exception `fn()` raises, run in a thread: a regression that blocks fails the test instead of hanging it."""
    outcome: list = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the test
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, "blocked"
    return outcome[0]


@pytest.mark.parametrize("kind", REPLACEMENTS)
def test_non_regular_or_oversized_manifest_is_refused(sealed, tmp_path, kind):
    out, *_ = sealed
    (out / "manifest.json").unlink()
    REPLACEMENTS[kind](out / "manifest.json")
    error = _error_within(lambda: open_dataset(out))
    assert isinstance(error, SealedDataError) and str(error).startswith(f"{out / 'manifest.json'} ")
    assert "restore it from the sealer's output" in str(error)
    _refused(_cli(tmp_path, "dataset", "inspect", str(out)), f"{out / 'manifest.json'} ")


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_shard_swapped_for_a_fifo_or_device_is_refused(sealed, kind):
    out, _, _, key = sealed
    shard = out / "part-00001.parquet"
    ds = open_dataset(out)
    shard.unlink()
    REPLACEMENTS[kind](shard)
    for call in (lambda: open_dataset(out), lambda: ds.read_records(key)):
        error = _error_within(call)
        assert isinstance(error, SealedDataError) and "part-00001.parquet is not a regular file" in str(error)

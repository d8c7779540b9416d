"""An attacker against the auditor: inputs that must neither hang, nor crash, nor spoof `medtee receipt verify`'s
output, and true receipts that must not fail confusingly."""

from __future__ import annotations

import base64
import copy
import json
import os
import signal

import pytest
from securesystemslib.dsse import Envelope

from medtee.broker.protocol import canonical_json
from medtee.cli import main
from medtee.receipt.signing import ReceiptSigner
from medtee.receipt.statement import PAYLOAD_TYPE
from medtee.receipt.verify import UnusableInput, verify_receipt


@pytest.fixture
def deadline():
    """Fail, rather than hang, a test that runs over 5 seconds."""
    def expire(*_):
        raise TimeoutError("the verifier hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def signed(payload: bytes, signer: ReceiptSigner) -> bytes:
    """A DSSE envelope of raw `payload` bytes (which ReceiptSigner.sign would not write) by `signer`'s key."""
    env = Envelope(payload, PAYLOAD_TYPE, {})
    env.sign(signer._signer)
    return json.dumps(env.to_dict()).encode()


def restated(run) -> tuple[dict, ReceiptSigner]:
    """The run's statement, to change, and a stranger's signer it names as the receipt key."""
    signer, statement = ReceiptSigner(), copy.deepcopy(run.statement)
    statement["predicate"]["binding"]["receipt_public_key"] = base64.b64encode(signer.public_bytes).decode()
    return statement, signer


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_an_adapter_that_is_no_regular_file_is_unusable_not_a_hang(run, capsys, tmp_path, deadline, target):
    if target == "fifo":
        os.mkfifo(target := str(tmp_path / "adapter.fifo"))
    assert main(["receipt", "verify", str(run.receipt), "--adapter", target]) == 2
    err = capsys.readouterr().err
    assert f"{target}: is not a regular file" in err and "give the output file itself" in err and err.count("\n") == 1


def test_text_from_the_receipt_cannot_rewrite_the_terminal_or_crash_it(run, capsys):
    """A subject name with ANSI escapes (cursor up, erase) and a lone surrogate, printed as a check's reason."""
    statement, signer = restated(run)
    statement["subject"][1]["name"] = "NAME"
    payload = canonical_json(statement).replace(b'"NAME"', b'"\\u001b[3A\\u001b[JVERIFIED\\ud800"')
    run.receipt.write_bytes(signed(payload, signer))
    assert main(["receipt", "verify", str(run.receipt), "--adapter", str(run.adapter)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "matches subject \\x1b[3A\\x1b[JVERIFIED\\ud800" in out


def test_a_receipt_file_name_that_is_not_utf8_is_printed_escaped(run, capsys):
    path = run.receipt.rename(os.fsdecode(bytes(run.dir) + b"/receipt-\xff.dsse.json"))
    assert main(["receipt", "verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"VERIFIED: {run.dir}/receipt-\\udcff.dsse.json")


def test_a_receipt_recording_an_older_policy_layout_names_the_difference_and_the_fix(run):
    """A medtee that adds a policy field reads every older receipt's recorded policy as different: say where."""
    statement = copy.deepcopy(run.statement)
    del statement["predicate"]["attestation"]["policy"]["content"]["vlek_csp_ids"]
    statement["predicate"]["attestation"]["policy"]["content"]["gpu"]["boards"] = ["1010-0200-882"]
    result = verify_receipt(json.dumps(run.signer.sign(statement)).encode(), files=[run.adapter])
    assert [c.name for c in result.failures()] == ["policy"]
    reason = result.failures()[0].reason
    assert "gpu.boards, vlek_csp_ids" in reason and "--policy" in reason and "medtee " in reason


@pytest.mark.parametrize("where", ["envelope", "payload"])
def test_a_repeated_json_key_is_unusable(run, where):
    """Parsers differ on which of two equal keys counts: the verifier and an auditor's jq could read two receipts."""
    if where == "envelope":
        data = run.receipt.read_bytes().replace(b'"payloadType":', b'"payloadType": "x", "payloadType":', 1)
    else:
        payload = canonical_json(run.statement).replace(b'"authenticity":', b'"simulated":false,"authenticity":', 1)
        data = signed(payload, run.signer)
    with pytest.raises(UnusableInput, match=f"the {where} repeats the key '(payloadType|simulated)'"):
        verify_receipt(data)


@pytest.mark.parametrize("change, words", [
    (lambda doc: {**doc, "signatures": doc["signatures"] * 2}, "two signatures with keyid"),
    (lambda doc: {**doc, "signatures": [{"sig": "!!", "keyid": "a"}]}, "not base64"),
    (lambda doc: {**doc, "payload": 5}, "payload, payloadType and each signature's keyid and sig must be strings"),
    (lambda doc: {**doc, "signatures": [{"sig": doc["signatures"][0]["sig"]}]}, "each signature's keyid"),
    (lambda doc: {**doc, "signatures": {"keyid": "a"}}, "signatures must be a list"),
], ids=["same keyid twice", "signature not base64", "payload not a string", "no keyid", "signatures not a list"])
def test_a_malformed_envelope_is_named_not_an_exception_type(run, capsys, change, words):
    run.receipt.write_text(json.dumps(change(json.loads(run.receipt.read_bytes()))))
    assert main(["receipt", "verify", str(run.receipt)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_the_dataset_given_must_have_the_manifest_the_receipt_names(run, sealed, capsys, tmp_path):
    """The key release named a manifest digest; only that sealed dataset passes `--dataset`, and a receipt naming
    another manifest (swapped) fails it."""
    directory, manifest, _, _ = sealed
    statement = copy.deepcopy(run.statement)
    statement["predicate"]["dataset"]["manifest_digest"] = manifest.digest()
    genuine = run.dir / "genuine.dsse.json"
    genuine.write_text(json.dumps(run.signer.sign(statement)))
    assert main(["receipt", "verify", str(genuine), "--dataset", str(directory)]) == 0
    out = capsys.readouterr().out
    assert f"ok   dataset: {directory} is dataset 'test-ds'" in out
    assert f"the receipt says: run done on dataset 'test-ds' (manifest {manifest.digest()[:16]}...)" in out
    assert main(["receipt", "verify", str(run.receipt), "--dataset", str(directory), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in doc["checks"] if not c["ok"]] == ["dataset"]
    assert doc["claims"]["manifest_digest"] == "cd" * 32 and doc["claims"]["outcome"] == "done"
    assert main(["receipt", "verify", str(run.receipt), "--dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--dataset" in err and "is not a sealed dataset" in err and err.count("\n") == 1


@pytest.mark.parametrize("change", ["only the manifest", "a shard altered", "a file added"])
def test_the_dataset_given_must_hold_the_shards_its_manifest_lists(run, sealed, capsys, tmp_path, change):
    """The right manifest.json beside missing, altered or extra files is not the dataset the key was released for."""
    import shutil

    directory, manifest, _, _ = sealed
    statement = copy.deepcopy(run.statement)
    statement["predicate"]["dataset"]["manifest_digest"] = manifest.digest()
    genuine = run.dir / "genuine.dsse.json"
    genuine.write_text(json.dumps(run.signer.sign(statement)))
    shard = directory / manifest.shards[0].name
    if change == "only the manifest":
        (directory := tmp_path / "copy").mkdir()
        shutil.copy(sealed[0] / "manifest.json", directory)
    elif change == "a shard altered":
        data = bytearray(shard.read_bytes())
        data[100] ^= 1
        shard.write_bytes(bytes(data))
    else:
        (directory / "extra.parquet").write_bytes(shard.read_bytes())
    assert main(["receipt", "verify", str(genuine), "--dataset", str(directory), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["dataset"] and "has the manifest the key was released for, but" in \
        failed[0]["reason"]



def test_a_rotated_dataset_fails_the_dataset_check_naming_the_rotation(run, sealed, broker, capsys):
    """`medtee keys rotate` re-wraps the data key and re-signs: the directory's manifest has another digest than the
    one the key was released for, so the check fails (docs/broker.md said receipts were not affected) and says why."""
    from medtee.broker.store import rotate

    directory, manifest, _, _ = sealed
    statement = copy.deepcopy(run.statement)
    statement["predicate"]["dataset"]["manifest_digest"] = manifest.digest()
    genuine = run.dir / "genuine.dsse.json"
    genuine.write_text(json.dumps(run.signer.sign(statement)))
    assert main(["receipt", "verify", str(genuine), "--dataset", str(directory), "--json"]) == 0
    capsys.readouterr()
    broker.close()
    rotate(broker.store_dir, [directory])
    assert main(["receipt", "verify", str(genuine), "--dataset", str(directory), "--json"]) == 1
    failed = [c for c in json.loads(capsys.readouterr().out)["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["dataset"] and "`medtee keys rotate` since the run" in failed[0]["reason"]

def test_the_output_says_when_the_run_failed(run, capsys):
    """A failed run's receipt verifies (it is genuine), and its outputs with it: the output must say it failed."""
    from medtee.attestation import Evidence

    from .conftest import statement_for

    statement = statement_for(Evidence.from_json(run.statement["predicate"]["attestation"]["evidence"]), run.release,
                              run.signer, adapter=run.adapter, error=MemoryError())
    run.receipt.write_text(json.dumps(run.signer.sign(statement)))
    assert main(["receipt", "verify", str(run.receipt), "--adapter", str(run.adapter)]) == 0
    assert "the receipt says: run failed (MemoryError) on dataset 'test-ds'" in capsys.readouterr().out

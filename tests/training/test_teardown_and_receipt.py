"""The end of every run that obtained a data key: keys and decrypted records destroyed, the release closed on the
broker's record, and a signed receipt that verifies offline; a failed run ends the same way."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_medtee, run_python

pytestmark = pytest.mark.slow

FAST = ["trainer.max_steps=2", "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "data.n_synthetic=24"]
#: the line a run ends with: every key it held, overwritten (the earlier ones read files of a medtee before 2026-12)
TEARDOWN = ("medtee: teardown: data key, checkpoint key, adapter key, earlier checkpoint key, earlier adapter key "
            "overwritten")

#: Runs `medtee train` in this process, then looks at what the heap still holds.
IN_PROCESS = r"""
import gc, json, sys
import numpy as np
from medtee import cli, teardown
from medtee.crypto.secret import SecretBuffer

registered = []
original = teardown.Teardown.key

def key(self, name, buffer):
    registered.append(buffer)  # the test keeps them alive to look at them afterwards
    return original(self, name, buffer)
teardown.Teardown.key = key
code = cli.main(["train", *sys.argv[1:]])
gc.collect()
from medtee.data.module import DialogueDataModule, TokenizedRecords
from medtee.training.checkpoint import EncryptedCheckpointIO
from medtee.broker.protocol import Release
objects = gc.get_objects()
print(json.dumps({
    "code": code,
    "keys": [len(b) for b in registered], "nonzero_keys": sum(any(b) for b in registered),
    "modules_holding_records": sum(isinstance(o, DialogueDataModule) and (o._train is not None or o._val is not None)
                                   for o in objects),
    "token_arrays_not_zero": sum(isinstance(o, TokenizedRecords) and bool(np.any(o.input_ids)) for o in objects),
    "releases_with_a_key": sum(isinstance(o, Release) and any(o.data_key) for o in objects),
    "checkpoint_ios_with_a_key": sum(isinstance(o, EncryptedCheckpointIO) and any(o._key) for o in objects),
}))
"""


def _payload(receipt: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(receipt.read_text())["payload"]))


def _audit(broker_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (broker_dir / "audit.log").read_text().splitlines()]


def test_after_teardown_no_key_or_record_is_left_reachable(tmp_path):
    res = run_python(IN_PROCESS, *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found["code"] == 0 and found["keys"] == [32] * 5  # data key; checkpoint, adapter keys (and earlier)
    assert found["nonzero_keys"] == 0 and found["releases_with_a_key"] == 0
    assert found["checkpoint_ios_with_a_key"] == 0
    assert found["modules_holding_records"] == 0 and found["token_arrays_not_zero"] == 0
    assert TEARDOWN + "; decrypted records overwritten" in res.stderr


def test_a_run_closes_its_release_and_leaves_a_receipt_that_verifies(tmp_path):
    res = run_medtee("train", *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [out] = [p.parent for p in tmp_path.glob("outputs/*/*/receipt.dsse.json")]
    predicate = _payload(out / "receipt.dsse.json")["predicate"]
    release_id = predicate["release"]["release_id"]
    audit = _audit(tmp_path / ".medtee/broker")
    [closed] = [e for e in audit if e["event"] == "close"]
    assert closed["release_id"] == release_id and predicate["release"]["close_audit_entry_sha256"] == closed["hash"]
    assert [e["hash"] for e in audit if e["event"] == "release"] == [release_id]
    assert predicate["run"]["outcome"] == "done" and predicate["simulated"] is True
    assert set(predicate["teardown"]["keys"]) == {"data key", "checkpoint key", "adapter key", "earlier checkpoint key",
                                                  "earlier adapter key"}
    verified = run_medtee("receipt", "verify", str(out / "receipt.dsse.json"), "--adapter",
                          str(out / "adapter.safetensors.enc"), "--json", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert run_medtee("receipt", "verify", str(out / "receipt.dsse.json"), "--policy", "snp_h200",
                      cwd=tmp_path).returncode == 1  # SIMULATED: no production policy accepts it
    import sqlite3

    con = sqlite3.connect(tmp_path / "mlflow.db")  # the receipt is an artifact of the MLflow run
    [(artifacts,)] = con.execute("select artifact_uri from runs").fetchall()
    con.close()
    logged = Path(artifacts.removeprefix("file://")) / "receipt.dsse.json"
    assert logged.read_text() .strip() and json.loads(logged.read_text()) == json.loads(
        (out / "receipt.dsse.json").read_text())


def test_a_run_that_fails_after_the_release_still_tears_down_and_signs_its_receipt(tmp_path):
    from medtee.crypto.stream import MAGIC

    bad = tmp_path / "another-datasets.ckpt.enc"  # a checkpoint's header, which only the released key can refute
    bad.write_bytes(MAGIC + b"\0" * 64)
    res = run_medtee("train", *FAST, f"trainer.resume_from={bad}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "medtee: teardown:" in res.stderr and "closed at the key broker" in res.stderr
    [receipt] = tmp_path.glob("outputs/*/*/receipt.dsse.json")
    run = _payload(receipt)["predicate"]["run"]
    assert run["outcome"] == "failed" and run["error_type"] == "ConfigError"
    assert [e["event"] for e in _audit(tmp_path / ".medtee/broker")][-2:] == ["release", "close"]
    assert run_medtee("receipt", "verify", str(receipt), cwd=tmp_path).returncode == 0


def test_the_teardown_overwrites_keys_and_token_arrays_in_place():
    from medtee.crypto.secret import SecretBuffer
    from medtee.data.module import TokenizedRecords
    from medtee.teardown import Teardown

    key = SecretBuffer(b"k" * 32)
    data = TokenizedRecords(np.arange(1, 9, dtype=np.int32), np.arange(1, 9, dtype=np.int32),
                            np.array([0, 4, 8]), np.zeros(2, bool))
    t = Teardown()
    t.key("data key", key)
    t.data("records", lambda: (data.wipe(), len(data))[1])
    t.dropped("ephemeral private key", "inside cryptography")
    record = t.destroy()
    assert not any(key) and not data.input_ids.any() and not data.labels.any()
    assert record == {"keys": {"data key": "overwritten with zeros (32 bytes)"},
                      "decrypted_data": {"records": "token arrays overwritten with zeros and dropped (2 examples)"},
                      "dropped": {"ephemeral private key": "inside cryptography"}}
    assert t.destroy() is record  # once
    with pytest.raises(TypeError, match="SecretBuffer"):
        Teardown().key("plain", bytearray(32))


#: `medtee train` in this process, SIGTERMed (as a scheduler or `timeout` would) when it starts building the model.
SIGTERMED = r"""
import os, signal, sys, tempfile
from medtee import cli
from medtee.training import model

def build_model(*args, **kwargs):
    print("PRIVATE_TMP", tempfile.gettempdir(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not end the run")

model.build_model = build_model
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_sigterm_ends_the_run_with_teardown_close_receipt_and_no_temporary_files(tmp_path):
    res = run_python(SIGTERMED, *FAST, cwd=tmp_path)
    assert res.returncode == 128 + 15, res.stderr[-3000:]
    assert "terminated (SIGTERM)" in res.stderr and "Traceback" not in res.stderr
    assert TEARDOWN in res.stderr
    [private] = [line.split(" ", 1)[1] for line in res.stdout.splitlines() if line.startswith("PRIVATE_TMP ")]
    assert not Path(private).exists()
    [receipt] = tmp_path.glob("outputs/*/*/receipt.dsse.json")
    predicate = _payload(receipt)["predicate"]
    assert predicate["run"]["outcome"] == "failed" and predicate["run"]["error_type"] == "SystemExit"
    assert [e["event"] for e in _audit(tmp_path / ".medtee/broker")][-2:] == ["release", "close"]


#: `medtee train` in this process, SIGTERMed twice during its second training step (a process-group signal, or
#: torchrun forwarding it, delivers it twice): Lightning stops at the step's end, and the second changes nothing.
SIGTERMED_IN_FIT = r"""
import os, signal, sys
from medtee import cli
from medtee.training.module import CausalLMModule

step = CausalLMModule.training_step

def training_step(self, batch, batch_idx):
    if batch_idx == 1:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, batch, batch_idx)

CausalLMModule.training_step = training_step
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_sigterm_during_training_stops_at_the_step_and_ends_the_run_as_failed(tmp_path):
    res = run_python(SIGTERMED_IN_FIT, "trainer.max_steps=6", *FAST[1:], cwd=tmp_path)
    assert res.returncode == 128 + 15, res.stderr[-3000:]  # never 0: Lightning's own stop carries no status
    assert res.stderr.count("terminated (SIGTERM)") == 1 and "Traceback" not in res.stderr
    assert TEARDOWN in res.stderr
    [receipt] = tmp_path.glob("outputs/*/*/receipt.dsse.json")
    assert _payload(receipt)["predicate"]["run"]["error_type"] == "SystemExit"
    assert [e["event"] for e in _audit(tmp_path / ".medtee/broker")][-2:] == ["release", "close"]
    assert not list(tmp_path.glob("outputs/*/*/adapter.safetensors.enc"))


#: SIGTERM at `on_fit_start` (before Lightning installs its own handler) and again inside the release's close.
SIGTERMED_EARLY_AND_IN_CLOSE = r"""
import os, signal, sys
from medtee import cli
from medtee.broker.service import EmbeddedBroker
from medtee.training.module import CausalLMModule

CausalLMModule.on_fit_start = lambda self: os.kill(os.getpid(), signal.SIGTERM)
close = EmbeddedBroker.close_release

def close_release(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return close(self, *args, **kwargs)

EmbeddedBroker.close_release = close_release
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_sigterm_before_the_first_step_stops_at_once_and_one_in_the_close_does_not_skip_it(tmp_path):
    res = run_python(SIGTERMED_EARLY_AND_IN_CLOSE, "trainer.max_steps=50", *FAST[1:], cwd=tmp_path)
    assert res.returncode == 128 + 15, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "closed at the key broker" in res.stderr
    [receipt] = tmp_path.glob("outputs/*/*/receipt.dsse.json")
    predicate = _payload(receipt)["predicate"]
    assert predicate["run"]["error_type"] == "SystemExit" and predicate["release"]["close_audit_entry_sha256"]
    assert [e["event"] for e in _audit(tmp_path / ".medtee/broker")][-2:] == ["release", "close"]
    assert "train/loss" not in res.stderr.split("terminated (SIGTERM)")[1]  # no step ran after it


def test_a_first_sigterm_during_the_close_lets_the_close_and_the_receipt_finish(tmp_path):
    script = SIGTERMED_EARLY_AND_IN_CLOSE.replace(
        "CausalLMModule.on_fit_start = lambda self: os.kill(os.getpid(), signal.SIGTERM)\n", "")
    res = run_python(script, *FAST, cwd=tmp_path)
    assert res.returncode == 128 + 15, res.stderr[-3000:]
    assert "closed at the key broker" in res.stderr and "Traceback" not in res.stderr
    [receipt] = tmp_path.glob("outputs/*/*/receipt.dsse.json")
    assert _payload(receipt)["predicate"]["release"]["close_audit_entry_sha256"]
    assert [e["event"] for e in _audit(tmp_path / ".medtee/broker")][-2:] == ["release", "close"]

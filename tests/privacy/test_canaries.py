"""No patient text leaves the loader's memory. Canaries for the 18 HIPAA Safe Harbor categories are sealed into
patient and doctor turns; after a training run (logged to a real MLflow server), an evaluation run, a sweep, a run
that fails mid-step while quoting its batch in logs, a warning and its exception, and a run killed with SIGKILL, the
working directory, the MLflow stores, the temporary directory and the captured stdout/stderr hold none of them in
any encoding, and the only network connections went to the tracking server."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_medtee

from .conftest import HARNESS, canary_overrides, connections, run_harness, scan

pytestmark = pytest.mark.slow


def _receipts(places: list[Path]) -> dict[str, str]:
    """The decoded payload of every receipt under `places` (the envelope holds it base64-encoded)."""
    found = {}
    for root in places:
        for path in ([root] if root.is_file() else root.rglob("receipt*.dsse.json")):
            if path.name.startswith("receipt") and path.name.endswith(".dsse.json"):
                found[f"payload of {path}"] = base64.b64decode(json.loads(path.read_text())["payload"]).decode()
    return found


def _clean(forms, sealed, places: list[Path], texts: dict[str, str], *, receipts: int = 1) -> None:
    """No canary in any form under `places` or in `texts`, including inside the runs' signed receipts (at least
    `receipts` of them)."""
    decoded = _receipts(places)
    assert len(decoded) >= receipts, f"expected a signed receipt under {places}"
    hits = scan(forms, [*places, sealed["sealed"], sealed["owner"] / ".medtee"],
                {**sealed["texts"], **texts, **decoded})
    assert not hits, "\n".join(hits)


def _no_egress(audit: Path, allowed_port: int | None = None) -> None:
    outside = [(event, address) for event, address in connections(audit)
               if not (allowed_port and "'127.0.0.1'" in address and str(allowed_port) in address)]
    assert not outside, f"network connections other than the tracking server: {outside}"


def test_the_canaries_are_in_the_sealed_input_and_only_there(forms, sealed_canaries):
    plain = scan(forms, [sealed_canaries["plaintext"]])
    assert len(plain) == len(forms), "every canary must be in the plaintext the data owner seals"
    _clean(forms, sealed_canaries, [], {}, receipts=0)


def test_training_logged_to_an_mlflow_server(forms, sealed_canaries, server_run, mlflow_server):
    proc = server_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server_run["run_id"]
    _clean(forms, sealed_canaries, [server_run["cwd"], server_run["tmp"], mlflow_server["root"]],
           {"train stdout": proc.stdout, "train stderr": proc.stderr})
    _no_egress(server_run["audit"], mlflow_server["port"])
    assert list(server_run["tmp"].iterdir()) == [], "the run's private temporary directory is removed"


def test_evaluation_run(forms, sealed_canaries, tmp_path, memory_tmp):
    audit = tmp_path / "audit"
    proc = run_harness(["train", *canary_overrides(sealed_canaries, "trainer.validate_only=true")],
                       cwd=tmp_path, tmpdir=memory_tmp, audit=audit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    con = sqlite3.connect(tmp_path / "mlflow.db")
    metrics = {k for (k,) in con.execute("select key from metrics")}
    con.close()
    assert "val/loss" in metrics and "train/loss" not in metrics
    _clean(forms, sealed_canaries, [tmp_path, memory_tmp], {"stdout": proc.stdout, "stderr": proc.stderr})
    _no_egress(audit)


def test_sweep(forms, sealed_canaries, tmp_path, memory_tmp):
    audit = tmp_path / "audit"
    proc = run_harness(["train", "-m", "qlora.rank=4,8", *canary_overrides(
        sealed_canaries, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0")],
        cwd=tmp_path, tmpdir=memory_tmp, audit=audit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _clean(forms, sealed_canaries, [tmp_path, memory_tmp], {"stdout": proc.stdout, "stderr": proc.stderr})
    _no_egress(audit)


def test_run_that_fails_mid_step_quoting_its_batch(forms, sealed_canaries, tmp_path, memory_tmp):
    audit = tmp_path / "audit"
    proc = run_harness(["train", *canary_overrides(sealed_canaries, "trainer.max_steps=6")], cwd=tmp_path,
                       tmpdir=memory_tmp, audit=audit, env={"MEDTEE_TEST_FAIL_AT_STEP": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "run failed: ValueError" in proc.stderr and "message withheld" in proc.stderr
    assert "training_step" in proc.stderr, "the report says where it failed"
    assert "bad batch <Tensor shape=" in proc.stderr, "the logged batch is replaced by its shape"
    assert "UserWarning: suspicious sample ... (rest withheld" in proc.stderr
    assert "step 1 failed" in proc.stderr and "ValueError (message withheld" in proc.stderr
    con = sqlite3.connect(tmp_path / "mlflow.db")
    assert [s for (s,) in con.execute("select status from runs")] == ["FAILED"]
    con.close()
    _clean(forms, sealed_canaries, [tmp_path, memory_tmp], {"stdout": proc.stdout, "stderr": proc.stderr})
    _no_egress(audit)


def test_run_killed_with_sigkill(forms, sealed_canaries, tmp_path, memory_tmp):
    audit = tmp_path / "audit"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(memory_tmp)}
    proc = subprocess.Popen([sys.executable, str(HARNESS), str(audit), "train",
                             *canary_overrides(sealed_canaries, "trainer.max_steps=500")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("medtee: MLflow run "):
            break
    assert seen and seen[-1].startswith("medtee: MLflow run "), "".join(seen)[-3000:]
    time.sleep(3)  # well into training
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _clean(forms, sealed_canaries, [tmp_path, memory_tmp], {"stdout": out, "stderr": "".join(seen) + err},
           receipts=0)  # killed: no end, no receipt
    _no_egress(audit)
    assert not list(tmp_path.rglob("core*")), "no core dump"


def run_medtee_ok(args: list[str], cwd: Path) -> bool:
    return run_medtee(*args, cwd=cwd).returncode == 0


def test_training_then_attested_evaluation_and_a_rating_packet(forms, sealed_canaries, tmp_path, memory_tmp):
    """`medtee eval run` and `medtee generate` on the canary data: per-dialogue losses, generated replies and their
    scores stay in memory; the report, evaluation.json, MLflow and the receipts hold aggregates only, and the rating
    packet (patient text by design) exists only encrypted to the study owner."""
    audit = tmp_path / "audit"
    trained = run_harness(["train", *canary_overrides(sealed_canaries, "trainer.max_steps=4")], cwd=tmp_path,
                          tmpdir=memory_tmp, audit=audit)
    assert trained.returncode == 0, trained.stderr[-3000:]
    [adapter] = tmp_path.glob("outputs/*/*/adapter.sealed")
    proc = run_harness(["eval", "run", *canary_overrides(sealed_canaries, f"evaluation.adapter={adapter}",
                                                         "evaluation.max_items=20", "evaluation.max_new_tokens=24",
                                                         "evaluation.resamples=200")],
                       cwd=tmp_path, tmpdir=memory_tmp, audit=audit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_medtee_ok(["keys", "new", "--out", str(tmp_path / "keys"), "--name", "study"], tmp_path)
    generated = run_harness(["generate", *canary_overrides(sealed_canaries, f"evaluation.adapter={adapter}",
                                                           f"evaluation.study_recipient={tmp_path / 'keys/study.pub'}",
                                                           "evaluation.max_items=8", "evaluation.max_new_tokens=16")],
                            cwd=tmp_path, tmpdir=memory_tmp, audit=audit)
    assert generated.returncode == 0, generated.stderr[-3000:]
    [report] = tmp_path.glob("outputs/*/*/evaluation_report.html")
    from medtee.evaluation.report import shared_ngrams

    texts = [m["content"] for line in sealed_canaries["plaintext"].read_text().splitlines() if line.strip()
             for m in json.loads(line)["messages"]]
    assert not shared_ngrams(report.read_text(), texts), "no 8-word sequence of the data in the report"
    _clean(forms, sealed_canaries, [tmp_path, memory_tmp],
           {"train stdout": trained.stdout, "train stderr": trained.stderr, "stdout": proc.stdout,
            "stderr": proc.stderr, "generate stdout": generated.stdout, "generate stderr": generated.stderr},
           receipts=3)
    _no_egress(audit)


def test_an_optuna_sweep(forms, sealed_canaries, tmp_path, memory_tmp):
    """`medtee sweep`: the records decrypted once and kept in memory for every trial; the study storage (optuna.db),
    MLflow's parent and child runs, every trial's outputs and the receipt hold no canary."""
    audit = tmp_path / "audit"
    proc = run_harness(["sweep", "sweep=demo_lr_rank", *canary_overrides(
        sealed_canaries, "sweep.n_trials=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.num_sanity_val_steps=0")], cwd=tmp_path, tmpdir=memory_tmp, audit=audit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "optuna.db").is_file() and "2 complete" in proc.stderr
    _clean(forms, sealed_canaries, [tmp_path, memory_tmp], {"stdout": proc.stdout, "stderr": proc.stderr})
    _no_egress(audit)

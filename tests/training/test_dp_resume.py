"""Through the CLI, in new processes: a DP run preempted (SIGTERM) after its first checkpoint tells the broker, in
its signed close, that it wrote no adapter and which checkpoint is its newest; resuming exactly that checkpoint at
the same target is charged nothing, and the dataset's privacy spent is one run's target."""

from __future__ import annotations

import base64
import json
import signal
from pathlib import Path

import pytest

from conftest import run_medtee, run_python
from medtee.broker import budget
from medtee.broker.audit import AuditLog
from medtee.files import sha256_file

pytestmark = pytest.mark.slow

from .conftest import COMMON, data_args

DP = ["privacy.dp.enabled=true", "data.packing=false", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"]


def preempted(run: list[str], cwd: Path, **env: str) -> None:
    """`medtee train *run` sent SIGTERM after its first checkpoint (or at the end of step KILL_AT_STEP)."""
    stopped = run_python(Path(__file__).with_name("killed_after_first_checkpoint.py"), "train", *run, cwd=cwd,
                         env={"KILL_SIGNAL": "TERM", **env})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]


def test_a_preempted_dp_run_resumes_without_a_second_charge(owner, tmp_path):
    run = [*COMMON, *data_args(owner), *DP]
    preempted(run, tmp_path)
    [checkpoint] = tmp_path.glob("outputs/*/*/checkpoints/*.ckpt.enc")
    assert not list(tmp_path.glob("outputs/*/*/adapter*"))
    log = AuditLog(owner / ".medtee" / "broker" / "audit.log")
    [close] = [e for e in log.entries() if e["event"] == "close"]
    assert close["outputs"] == {"adapter": False, "last_checkpoint": sha256_file(checkpoint)}
    [receipt] = tmp_path.glob("outputs/*/*/receipt.dsse.json")
    statement = json.loads(base64.b64decode(json.loads(receipt.read_text())["payload"]))
    assert statement["predicate"]["teardown"]["outputs"] == close["outputs"]  # the record the close was signed on

    resumed = run_medtee("train", *run, f"trainer.resume_from={checkpoint}", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first, second = [e for e in log.entries() if e["event"] == "release"]
    assert second["resumes"] == first["hash"] and second["dp_spend"] == budget.FREE
    assert second["dp_target"] == first["dp_spend"] and first["dp_spend"]["epsilon"] == 8
    assert budget.spent(log.entries(), first["dataset_id"]).epsilon == 8
    closes = [e for e in log.entries() if e["event"] == "close"]
    assert closes[-1]["outputs"]["adapter"] is True
    assert "epsilon 8, delta 1e-05 over 2 releases" in run_medtee("broker", "audit", "budget", cwd=owner).stdout


def test_a_run_that_trained_past_its_newest_checkpoint_reports_none(owner, tmp_path):
    """Steps after the newest checkpoint may have been disclosed (validation metrics of their iterates): a resume
    from that checkpoint would be a second branch of the line, so the close names no checkpoint and the resume pays."""
    run = [*COMMON, *data_args(owner), *DP]
    log = AuditLog(owner / ".medtee" / "broker" / "audit.log")
    before = len(log.entries())
    preempted(run, tmp_path, KILL_AT_STEP="3")  # its checkpoint is step 2's
    [checkpoint] = tmp_path.glob("outputs/*/*/checkpoints/*.ckpt.enc")
    assert checkpoint.name == "step-0000002.ckpt.enc"
    [close] = [e for e in log.entries()[before:] if e["event"] == "close"]
    assert close["outputs"] == {"adapter": False, "last_checkpoint": None}


@pytest.mark.parametrize("written_step, global_step, max_steps, named", [
    (2, 2, 4, True), (2, 3, 4, False), (4, 4, 4, False), (2, 2, -1, True), (None, 2, 4, False)])
def test_the_close_names_a_checkpoint_only_where_training_stopped_with_steps_left(written_step, global_step,
                                                                                  max_steps, named):
    from types import SimpleNamespace

    from medtee.run import Outcome

    io = SimpleNamespace(last_written="ab" * 32, last_written_step=written_step)
    outcome = Outcome(checkpoints=io, trainer=SimpleNamespace(global_step=global_step, max_steps=max_steps))
    assert outcome.outputs() == {"adapter": False, "last_checkpoint": "ab" * 32 if named else None}
    assert Outcome().outputs() == {"adapter": False, "last_checkpoint": None}

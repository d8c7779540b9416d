"""`medtee sweep` as a user runs it on the demo recipe: one attestation and key release serve every trial, a trial
that fails is recorded by its exception type and the sweep goes on, a second run resumes the study, MLflow holds one
parent and one child per trial, and the receipt covers every trial's outputs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from conftest import run_medtee, run_python, start_python

pytestmark = pytest.mark.slow

FAST = ["sweep=demo_lr_rank", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=5",
        "data.n_synthetic=60", "data.val_fraction=0.34"]

#: `medtee sweep` in this process, with the second trial's training made to fail (what a broken trial does).
FAILING_SECOND_TRIAL = r"""
import sys
from medtee import cli, run
fit = run._fit
def _fit(cfg, session):
    if session.recipe.endswith("-trial-1"):
        raise RuntimeError("a message that must not be stored")
    return fit(cfg, session)
run._fit = _fit
sys.exit(cli.main(["sweep", *sys.argv[1:]]))
"""


def _sweep(cwd, *extra) -> subprocess.CompletedProcess:
    return run_python(FAILING_SECOND_TRIAL, *FAST, *extra, cwd=cwd)


def test_a_sweep_survives_a_failing_trial_and_resumes(tmp_path):
    first = _sweep(tmp_path, "sweep.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("data key released") == 1, "one attestation and key release for every trial"
    assert "3 complete, 1 failed trials (done)" in first.stderr
    db = sqlite3.connect(tmp_path / "optuna.db")
    states = [s for (s,) in db.execute("select state from trials order by number")]
    errors = [v for (v,) in db.execute("select value_json from trial_user_attributes where key='error'")]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"] and errors == ['"RuntimeError"']
    stored = "\n".join(str(row) for table in ("trial_user_attributes", "trial_system_attributes", "study_user_attributes")
                       for row in db.execute(f"select * from {table}"))
    assert "must not be stored" not in stored
    db.close()

    again = _sweep(tmp_path, "sweep.n_trials=4")  # n_trials is the total: only the missing trial runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 complete, 1 failed trials (done)" in again.stderr
    con = sqlite3.connect(tmp_path / "mlflow.db")
    roles = dict(con.execute("select value, count(*) from tags where key='medtee.sweep.role' group by value"))
    trials = [v for (v,) in con.execute("select value from tags where key='medtee.sweep.trial'")]
    running = con.execute("select count(*) from runs where status='RUNNING'").fetchone()[0]
    con.close()
    assert roles == {"parent": 1, "trial": 5} and sorted(trials) == ["0", "1", "2", "3", "4"] and running == 0
    [receipt] = [p for p in tmp_path.glob("outputs/*/*/receipt.dsse.json")
                 if (p.parent / "trial-0004").is_dir()]
    import base64

    subjects = {s["name"] for s in json.loads(base64.b64decode(json.loads(receipt.read_text())["payload"]))["subject"]}
    assert "trial-0004/adapter.sealed" in subjects and "trial-0004/adapter.safetensors.enc" in subjects


def test_medtee_sweep_needs_a_sweep(tmp_path):
    res = subprocess.run([sys.executable, "-m", "medtee", "sweep"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "choose one, e.g. sweep=demo_lr_rank" in res.stderr


def test_a_sweep_killed_mid_trial_and_mid_checkpoint_resumes_to_exactly_n_trials(tmp_path):
    """SIGKILL while a trial trains (writing encrypted checkpoints every step), twice, at random moments; the next
    `medtee sweep` finds the dead trials by their heartbeat, re-runs them and ends with exactly n_trials complete,
    none running, and one finished MLflow child per trial."""
    import os
    import random
    import signal
    import time

    fast = [o for o in FAST if not o.startswith("trainer.max_steps=")]
    args = ["sweep", *fast, "sweep.n_trials=3", "sweep.heartbeat_s=1", "sweep.grace_s=2", "trainer.max_steps=6",
            "trainer.checkpoint_every_n_steps=1", "trainer.checkpoint_keep=-1"]
    rng = random.Random(7)
    for _ in range(2):
        proc = start_python(None, *args, cwd=tmp_path)
        for line in proc.stderr:  # a trial has started training
            if line.startswith("medtee: MLflow run ") and "(the sweep trial's child run)" in line:
                break
        assert proc.poll() is None, "the sweep must be running when it is killed"
        time.sleep(rng.uniform(0.2, 2.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    done = run_medtee(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    db = sqlite3.connect(tmp_path / "optuna.db")
    states = [s for (s,) in db.execute("select state from trials")]
    db.close()
    assert states.count("COMPLETE") == 3 and "RUNNING" not in states
    con = sqlite3.connect(tmp_path / "mlflow.db")
    children = con.execute("select r.status, t.value from runs r join tags t on r.run_uuid = t.run_uuid "
                           "where t.key = 'medtee.sweep.trial'").fetchall()
    con.close()
    assert all(status != "RUNNING" for status, _ in children)
    assert len({number for _, number in children}) == len(children), "one MLflow child per trial"
    assert sum(status == "FINISHED" for status, _ in children) == 3


def test_a_finished_grid_sweep_exits_0(tmp_path):
    """Optuna's GridSampler calls study.stop() once its grid is done, which raised outside an optimize loop: every
    completed grid sweep ended `run failed: RuntimeError` (exit 3)."""
    (tmp_path / "grid.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /sweep: grid_rank\nsweep:\n  n_trials: 2\n  parameters:\n"
        "    qlora.rank: {type: int, low: 8, high: 16, step: 8}\n    qlora.dropout: {type: categorical, choices: [0.0]}\n")
    fast = [o for o in FAST if not o.startswith(("trainer.max_steps=", "sweep="))]
    res = run_medtee("sweep", "recipe=./grid.yaml", *fast, "trainer.max_steps=2", "sweep.worker=grid-w1", cwd=tmp_path)
    assert res.returncode == 0 and "run failed" not in res.stderr, res.stderr[-3000:]
    # each trial trains into the child run its study made for it: nothing was "continued" (it said so of each)
    assert res.stderr.count("(the sweep trial's child run)") == 2 and "(continued)" not in res.stderr
    db = sqlite3.connect(tmp_path / "optuna.db")
    assert [s for (s,) in db.execute("select state from trials")] == ["COMPLETE", "COMPLETE"]
    workers = db.execute("select value_json from trial_user_attributes where key = 'worker'").fetchall()
    assert workers == [('"grid-w1"',)] * 2  # the named worker (its sampler's seed), not HOST-PID
    db.close()
    from medtee.broker.audit import AuditLog

    [close] = [e for e in AuditLog(tmp_path / ".medtee/broker/audit.log").entries() if e["event"] == "close"]
    assert close["outputs"]["adapter"] is True  # the sweep's close says its trials wrote adapters


#: `medtee sweep` with the compose-time interpolation check switched off: the trial's own check must still refuse.
UNCHECKED_INTERPOLATION = r"""
import sys
from medtee import cli, config
config.check_parameters = lambda space, cfg: []
sys.exit(cli.main(["sweep", *sys.argv[1:]]))
"""


def test_a_trial_that_would_change_an_unswept_setting_fails_before_it_trains(tmp_path):
    """Second line behind the compose-time check: a trial may change only what it sweeps from the recipe the key was
    released for (here qlora.alpha following the swept qlora.rank)."""
    (tmp_path / "follow.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /sweep: grid_rank\nqlora:\n  alpha: ${qlora.rank}\nsweep:\n"
        "  n_trials: 1\n  max_attempts: 1\n  parameters:\n    qlora.rank: {type: int, low: 4, high: 8, step: 4}\n")
    fast = [o for o in FAST if not o.startswith("sweep=")]
    res = run_python(UNCHECKED_INTERPOLATION, "recipe=./follow.yaml", *fast, cwd=tmp_path)
    assert "trial 0 would change qlora.alpha, which the sweep does not sweep" in res.stderr or \
        "0 complete, 1 failed" in res.stderr, res.stderr[-3000:]
    db = sqlite3.connect(tmp_path / "optuna.db")
    errors = [v for (v,) in db.execute("select value_json from trial_user_attributes where key='error'")]
    db.close()
    assert errors == ['"ConfigError"'] and not list(tmp_path.glob("outputs/*/*/trial-0000/adapter.sealed"))

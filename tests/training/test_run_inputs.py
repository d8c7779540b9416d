"""Bad run input found before the key release (files the run opens, the broker it asks), a resume that leaves nothing
to train, and Ctrl-C: exit 130 after the run's end, naming the checkpoint to resume from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_medtee, run_python

pytestmark = pytest.mark.slow

FAST = ["trainer.val_check_interval=1", "trainer.limit_val_batches=1"]


#: the line a run ends with: every key it held, overwritten (the earlier ones read files of a medtee before 2026-12)
TEARDOWN = ("medtee: teardown: data key, checkpoint key, adapter key, earlier checkpoint key, earlier adapter key "
            "overwritten")


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("inputs")
    assert run_medtee("synth", "--n", "40", "--seed", "4", "--out", "d.jsonl", cwd=cwd).returncode == 0
    assert run_medtee("seal", "d.jsonl", "--out", "sealed", cwd=cwd).returncode == 0
    return cwd


def releases(cwd: Path) -> int:
    return sum(json.loads(line)["event"] == "release" for line in (cwd / ".medtee/broker/audit.log").read_text().splitlines())


@pytest.mark.parametrize("override, words", [
    ("trainer.resume_from=d.jsonl", "trainer.resume_from=d.jsonl is not a medtee encrypted file (no MEDTEE-CKPT/N header): "
                                    "name a step-NNNNNNN.ckpt.enc"),
    ("trainer.resume_from=sealed", "trainer.resume_from=sealed is not a regular file"),
    # a typo names the problem: it said "is not a regular file" of a path that does not exist
    ("trainer.resume_from=old/step-0000040.ckpt.enc", "trainer.resume_from=old/step-0000040.ckpt.enc does not exist: "
                                                      "name a step-NNNNNNN.ckpt.enc"),
    ("evaluation.adapter=old/adapter.sealed", "evaluation.adapter=old/adapter.sealed does not exist"),
    ("broker.dir=typo/broker", "broker.dir=typo/broker holds no key broker (no broker.key): name the store the dataset "
                               "was sealed against"),
])
def test_bad_input_is_refused_before_the_key_release(sealed, override, words):
    before = releases(sealed)
    res = run_medtee("train", "data=sealed", "data.path=sealed", override, cwd=sealed)
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert releases(sealed) == before and not (sealed / "outputs").exists() and not (sealed / "typo").exists()


def test_eval_of_a_file_that_is_no_sealed_adapter_is_refused_before_the_key_release(sealed):
    before = releases(sealed)
    res = run_medtee("eval", "run", "data=sealed", "data.path=sealed", "evaluation.adapter=d.jsonl", cwd=sealed)
    assert res.returncode == 2 and "evaluation.adapter=d.jsonl is not a medtee encrypted file" in res.stderr
    assert releases(sealed) == before


def test_a_dataset_sealed_against_another_broker_is_bad_input(sealed):
    assert run_medtee("seal", "d.jsonl", "--out", "elsewhere", "--broker-dir", "other-broker", cwd=sealed).returncode == 0
    res = run_medtee("train", "data=sealed", "data.path=elsewhere", cwd=sealed)
    assert res.returncode == 2 and "is not registered with the broker at .medtee/broker" in res.stderr
    assert "point broker.dir / broker.url at the broker it was sealed against" in res.stderr
    assert "run failed" not in res.stderr and not (sealed / "outputs").exists()


#: `medtee train` with a Ctrl-C (SIGINT) at the 4th optimizer step.
INTERRUPTED = r"""
import os, signal, sys
from medtee import cli
from medtee.training.module import CausalLMModule

signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a background job starts with it ignored)
step = CausalLMModule.training_step

def training_step(self, batch, batch_idx):
    if self.trainer.global_step == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return step(self, batch, batch_idx)

CausalLMModule.training_step = training_step
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_ctrl_c_ends_the_run_and_names_the_checkpoint_which_cannot_resume_past_max_steps(sealed):
    res = run_python(INTERRUPTED, "data=sealed", "data.path=sealed", "trainer.max_steps=12",
                     "trainer.checkpoint_every_n_steps=2", *FAST, cwd=sealed)
    assert res.returncode == 130, res.stderr[-3000:]
    assert TEARDOWN in res.stderr
    [checkpoint] = sealed.glob("outputs/*/*/checkpoints/step-0000002.ckpt.enc")
    assert res.stderr.strip().endswith(f"interrupted (Ctrl-C): resume with trainer.resume_from={checkpoint}")
    again = run_medtee("train", "data=sealed", "data.path=sealed", f"trainer.resume_from={checkpoint}",
                       "trainer.max_steps=2", cwd=sealed)
    assert again.returncode == 2 and "is at step 2, so trainer.max_steps=2 leaves nothing to train: raise " \
                                      "trainer.max_steps above 2" in again.stderr, again.stderr[-2000:]


@pytest.mark.parametrize("overrides, words", [
    (["trainer.max_steps=6"], "sweep.objective=val/loss is logged at validation, which no trial reaches"),
    (["sweep.storage=sqlite:////nonexistent/dir/optuna.db"], "the directory /nonexistent/dir does not exist"),
    (["trainer.limit_val_batches=1"], "covers at most limit_val_batches x batch_size = 4 held-out dialogues, fewer "
                                      "than tracking.min_aggregate=20"),
])
def test_a_sweep_that_could_not_record_a_trial_is_refused_before_the_key_release(tmp_path, overrides, words):
    """Each of these used to spend every trial (or fail after the release)."""
    res = run_medtee("sweep", "sweep=demo_lr_rank", "sweep.n_trials=3", *overrides, cwd=tmp_path)
    assert res.returncode == 2 and words in res.stderr and "released" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / ".medtee").exists() and not (tmp_path / "outputs").exists()


#: `medtee train` that replaces the recipient's key file with another once training starts (as the host could).
SWAPS_THE_RECIPIENT = r"""
import shutil, sys
from medtee import cli
from medtee.training.module import CausalLMModule

def on_fit_start(self):
    shutil.copyfile("keys/attacker.pub", "keys/approved.pub")

CausalLMModule.on_fit_start = on_fit_start
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_the_adapter_goes_to_the_key_the_digest_hashed_even_if_the_file_is_replaced(sealed):
    """The recipient file was read again after training: replacing it after the digest (and the release) sent the
    adapter to another key, under a receipt naming the approved one."""
    for name in ("owner", "attacker"):
        assert run_medtee("keys", "new", "--out", "keys", "--name", name, cwd=sealed).returncode == 0
    (sealed / "keys/approved.pub").write_bytes((sealed / "keys/owner.pub").read_bytes())
    res = run_python(SWAPS_THE_RECIPIENT, "data=sealed", "data.path=sealed", "output.recipient=keys/approved.pub",
                     "trainer.max_steps=2", *FAST, cwd=sealed)
    assert res.returncode == 0, res.stderr[-3000:]
    [out] = [p.parent for p in sealed.glob("outputs/*/*/adapter.safetensors.enc")]
    assert (sealed / "keys/approved.pub").read_bytes() == (sealed / "keys/attacker.pub").read_bytes()
    stolen = run_medtee("adapter", "open", str(out / "adapter.safetensors.enc"), "--key", "keys/attacker.key",
                        "--out", "stolen", cwd=sealed)
    assert stolen.returncode == 2 and not (sealed / "stolen").exists()
    assert run_medtee("adapter", "open", str(out / "adapter.safetensors.enc"), "--key", "keys/owner.key", "--out",
                      "opened", cwd=sealed).returncode == 0
    import hashlib

    recorded = json.loads((out / "recipe.json").read_text())["output"]["recipient"]
    assert recorded == "sha256:" + hashlib.sha256((sealed / "keys/owner.pub").read_bytes()).hexdigest()


def test_a_file_the_digest_names_must_exist_before_the_release(sealed):
    """A study key named by a path that did not exist yet was recorded as its text (e.g. `sha256:<approved hash>`),
    passing a policy's study_recipients rule, and created by the host after the release."""
    before = releases(sealed)
    res = run_medtee("train", "data=sealed", "data.path=sealed", "evaluation.study_recipient=sha256:" + "ab" * 32,
                     cwd=sealed)
    assert res.returncode == 2 and "evaluation.study_recipient=sha256:abab" in res.stderr
    assert "does not exist: the recipe digest covers that file's content" in res.stderr
    assert releases(sealed) == before

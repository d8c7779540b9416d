"""The release gate as a user runs it, on CPU with the demo model: a canary the data owner sealed 64 times is
memorised by plain LoRA training (exposure at the maximum: the gate refuses, the adapter stays sealed to the
release), a never-inserted canary is not, and the same training under DP-SGD (Poisson-sampled, as accounted) keeps
the canary from being ranked first."""

from __future__ import annotations

import json

import pytest

from conftest import run_medtee

pytestmark = pytest.mark.slow

TRAIN = ["data=sealed", "data.path=sealed", "data.packing=false", "trainer.max_steps=60",
         "release.require_audit=true", "release.references=4096", "release.max_exposure_bits=10",
         "release.extraction_examples=4", "release.max_extraction_above_base=0.6"]  # 4 examples, none extracted: 0.53


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gate")
    assert run_medtee("synth", "--n", "100", "--out", "d.jsonl", cwd=cwd).returncode == 0
    sealed = run_medtee("seal", "d.jsonl", "--out", "sealed", "--policy", "simulated", "--canaries", "1",
                        "--canary-repeats", "64", "--canary-seed", "3", cwd=cwd)
    assert sealed.returncode == 0, sealed.stderr
    return cwd


def _run(cwd, *extra):
    res = run_medtee("train", *TRAIN, *extra, cwd=cwd)
    [summary] = sorted(cwd.glob("outputs/*/*/summary.json"))[-1:]
    return res, json.loads(summary.read_text()), summary.parent


def test_a_memorised_canary_keeps_the_adapter_sealed(owner):
    res, summary, out = _run(owner)
    assert res.returncode == 1, res.stderr[-3000:]
    audit = summary["audit"]
    assert audit["metrics"]["audit/exposure_max_64x"] == pytest.approx(12.0)  # log2(4096): ranked first of all
    assert audit["metrics"]["audit/exposure_max_0x"] < 6, "a canary never trained on is not exposed"
    assert not audit["passed"] and not audit["adapter_released"]
    assert "canary exposure at 64 repeats is 12.00 bits, above release.max_exposure limit 10.00 by 2.00" in res.stderr
    assert (out / "adapter.sealed").is_file() and not (out / "adapter.safetensors.enc").exists()
    assert audit["metrics"]["audit/extraction_run_ci_low"] <= audit["metrics"]["audit/extraction_run_delta"] <= \
        audit["metrics"]["audit/extraction_run_ci_high"]  # verbatim extraction, tuned minus base, with its interval
    receipt = run_medtee("receipt", "verify", str(out / "receipt.dsse.json"), cwd=owner)
    assert receipt.returncode == 0, receipt.stdout  # the verdict and its numbers are signed into the receipt
    _no_canary_text_anywhere(owner)


def _no_canary_text_anywhere(cwd):
    """The audit's canaries (decrypted here with the broker's key, as only the TEE may) appear in nothing the runs
    wrote: outputs, MLflow, the broker's store; nor in the sealed dataset's plaintext parts."""
    from medtee.broker.service import EmbeddedBroker
    from medtee.sealing.reader import open_dataset

    dataset = open_dataset(cwd / "sealed")
    canaries = dataset.canaries(EmbeddedBroker(cwd / ".medtee/broker").unwrap_data_key(dataset.manifest))
    secrets = [c.text.encode() for c in canaries] + [f"{c.number:07d}".encode() for c in canaries]
    found = [str(p) for p in cwd.rglob("*") if p.is_file() and p.parent != cwd / "sealed"
             and any(s in p.read_bytes() for s in secrets)]
    assert len(canaries) == 2 and found == [], found


def test_dp_training_lowers_the_exposure_and_the_verdict_is_recorded(owner):
    res, summary, out = _run(owner, "privacy.dp.enabled=true", "privacy.dp.target_epsilon=1",
                             "privacy.dp.target_delta=1e-3")
    exposure = summary["audit"]["metrics"]["audit/exposure_max_64x"]
    # seen on CPU with Poisson-sampled batches: 7.7 to 10.4 bits (rank 3 to 20 of 4096, median 9.3) over twelve runs
    # (sampling and noise are drawn from the OS), against 12.0 (the maximum, rank 1) without DP. Rank 3
    # came up twice, so rank 2 (11.0 bits) is within reach of chance: the test asks that DP never ranks it first
    assert exposure < 12.0, f"DP at epsilon 1 should lower the 64x canary's exposure below rank 1 (got {exposure})"
    dp = summary["privacy"]["dp"]
    assert dp["epsilon"] <= 1.0 and dp["sampling"].startswith("Poisson") and dp["expected_batch_size"] == 4
    passed = summary["audit"]["passed"]  # the gate's verdict is recorded either way
    assert res.returncode == (0 if passed else 1), res.stderr[-3000:]
    assert (out / "adapter.safetensors.enc").is_file() == passed


def test_require_audit_on_a_dataset_without_canaries_is_refused_before_release(tmp_path):
    assert run_medtee("synth", "--n", "40", "--out", "d.jsonl", cwd=tmp_path).returncode == 0
    assert run_medtee("seal", "d.jsonl", "--out", "plain", "--policy", "simulated", cwd=tmp_path).returncode == 0
    res = run_medtee("train", "data=sealed", "data.path=plain", "release.require_audit=true", cwd=tmp_path)
    assert res.returncode == 2 and "seal it with `medtee seal ... --canaries N`" in res.stderr
    events = [json.loads(line)["event"] for line in (tmp_path / ".medtee/broker/audit.log").read_text().splitlines()]
    assert "release" not in events


def test_a_required_audit_that_has_no_canary_to_run_keeps_the_adapter_sealed(owner, monkeypatch, capsys):
    """release.require_audit releases the adapter on a passed audit only: a canary file that yields none (the run
    then has no audit at all) used to release it unaudited."""
    from medtee import cli
    from medtee.sealing.reader import SealedDataset

    monkeypatch.chdir(owner)
    monkeypatch.setattr(SealedDataset, "canaries", lambda self, data_key: [])
    before = set(owner.glob("outputs/*/*"))
    assert cli.main(["train", *[o for o in TRAIN if not o.startswith("trainer.max_steps")], "trainer.max_steps=2"]) == 1
    assert "the dataset's canary file holds no canaries" in capsys.readouterr().err
    [out] = set(owner.glob("outputs/*/*")) - before
    assert (out / "adapter.sealed").is_file() and not (out / "adapter.safetensors.enc").exists()

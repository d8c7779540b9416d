"""`medtee eval run` as a user runs it: train on a sealed dataset, then compare the base model with the sealed adapter
on the held-out dialogues of the same dataset, attested; aggregates with intervals, a report, a receipt."""

from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import run_medtee, run_python, seal_and_train

pytestmark = pytest.mark.slow

DATA = ["data=sealed", "data.path=sealed", "data.val_fraction=0.2",  # 120 dialogues: 24 held out
        "data.max_length=512"]  # rows of 512 packed tokens (not 2048): a quarter of the CPU time


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("eval")
    out, _ = seal_and_train(cwd, *DATA, "trainer.max_steps=20", "trainer.val_check_interval=10")
    return cwd, out / "adapter.sealed"


def test_eval_compares_base_and_adapter_with_intervals(trained):
    cwd, adapter = trained
    res = run_medtee("eval", "run", *DATA, f"evaluation.adapter={adapter}", "evaluation.max_items=20",
                     "evaluation.max_new_tokens=16", "evaluation.resamples=1000", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: evaluated 24 held-out dialogues" in res.stderr
    [out] = [p.parent for p in cwd.glob("outputs/*/*/evaluation_report.html")]
    metrics = json.loads((out / "evaluation.json").read_text())["metrics"]
    for measure in ("loss", "perplexity", "chrf", "rouge_l", "words", "length_ratio"):
        m = {s: metrics[f"eval/{measure}_{s}"] for s in ("base", "tuned", "delta", "ci_low", "ci_high", "n")}
        assert m["ci_low"] <= m["delta"] <= m["ci_high"] and m["delta"] == pytest.approx(m["tuned"] - m["base"])
        assert m["n"] == (24 if measure in ("loss", "perplexity") else 20)
    assert metrics["eval/loss_delta"] < 0, "20 steps of LoRA lower the held-out loss of the tiny random model"
    from medtee.evaluation.report import external_references

    assert external_references((out / "evaluation_report.html").read_bytes()) == []
    con = sqlite3.connect(cwd / "mlflow.db")
    logged = {k for (k,) in con.execute("select key from metrics where key like 'eval/%'")}
    con.close()
    assert {"eval/loss_delta", "eval/chrf_ci_low", "eval/rouge_l_n"} <= logged
    # the run names its MLflow run, as `medtee train` does (it named none: the dashboard reader had to search)
    [named] = [line.split()[3] for line in res.stderr.splitlines() if line.startswith("medtee: MLflow run ")]
    con = sqlite3.connect(cwd / "mlflow.db")
    assert con.execute("select name from runs where run_uuid = ?", (named,)).fetchone() == ("demo-eval",)
    con.close()
    verified = run_medtee("receipt", "verify", str(out / "receipt.dsse.json"), "--adapter",
                          str(out / "evaluation_report.html"), cwd=cwd)
    assert verified.returncode == 0, verified.stdout


def test_the_sealed_adapter_opens_only_under_its_own_dataset(trained, tmp_path):
    cwd, adapter = trained
    assert run_medtee("synth", "--n", "40", "--seed", "9", "--out", "other.jsonl", cwd=cwd).returncode == 0
    assert run_medtee("seal", "other.jsonl", "--out", "other", "--policy", "simulated", cwd=cwd).returncode == 0
    res = run_medtee("eval", "run", "data=sealed", "data.path=other", f"evaluation.adapter={adapter}", cwd=cwd)
    assert res.returncode == 2 and "does not open under this dataset's release" in res.stderr
    assert "Traceback" not in res.stderr


def test_eval_needs_an_adapter(tmp_path):
    res = run_medtee("eval", "run", cwd=tmp_path)
    assert res.returncode == 2 and "evaluation.adapter=outputs/<run>/adapter.sealed" in res.stderr


def test_generate_writes_a_packet_only_the_study_owner_opens(trained):
    cwd, adapter = trained
    for name in ("study-owner", "someone-else"):
        assert run_medtee("keys", "new", "--out", "keys", "--name", name, cwd=cwd).returncode == 0
    res = run_medtee("generate", *DATA, f"evaluation.adapter={adapter}", "evaluation.study_recipient=keys/study-owner.pub",
                     "evaluation.max_items=6", "evaluation.max_new_tokens=8", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    [packet] = cwd.glob("outputs/*/*/rating_packet.sealed")
    blinding = packet.parent / "blinding.sealed"
    plaintext = [m["content"] for line in (cwd / "d.jsonl").read_text().splitlines()
                 for m in json.loads(line)["messages"] if len(m["content"]) > 40]
    assert not any(text.encode() in packet.read_bytes() for text in plaintext)  # encrypted, not merely renamed
    refused = run_medtee("eval", "packet", str(packet), "--key", "keys/someone-else.key", "--out", "x", cwd=cwd)
    assert refused.returncode == 2 and not (cwd / "x").exists()
    opened = run_medtee("eval", "packet", str(packet), "--key", "keys/study-owner.key", "--out", "study", cwd=cwd)
    assert opened.returncode == 0, opened.stderr
    items = json.loads((cwd / "study/items.json").read_text())
    assert len(items) == 6 and all(set(i["answers"]) == {"A", "B"} and i["context"] for i in items)
    from medtee.evaluation.ratings import open_blinding

    assignment = open_blinding(blinding, cwd / "keys/study-owner.key")
    assert set(assignment) == {i["item_id"] for i in items}
    assert all(sorted(v.values()) == ["base", "tuned"] for v in assignment.values())
    rows = (cwd / "study/ratings_template.csv").read_text().splitlines()
    assert rows[0].startswith("rater_id,item_id,label") and len(rows) == 1 + 2 * 6


def test_the_blinding_can_go_to_a_custodian_so_the_study_owner_cannot_unblind(trained):
    """With evaluation.blinding_recipient the study owner's key opens the packet, not the blinding: unblinding takes
    the custodian, who gets the ratings first. The custodian's key enters the digest; the study key is refused."""
    from medtee.crypto.hpke import KeyWrapError
    from medtee.evaluation.ratings import open_blinding

    cwd, adapter = trained
    for name in ("owner2", "custodian", "owner3"):
        assert run_medtee("keys", "new", "--out", "keys", "--name", name, cwd=cwd).returncode == 0
    base = [*DATA, f"evaluation.adapter={adapter}", "evaluation.study_recipient=keys/owner2.pub",
            "evaluation.max_items=3", "evaluation.max_new_tokens=4"]
    same = run_medtee("generate", *base, "evaluation.blinding_recipient=keys/owner2.pub", cwd=cwd)
    assert same.returncode == 2 and "is the study owner's key: the custodian" in same.stderr
    before = set(cwd.glob("outputs/*/*/blinding.sealed"))
    res = run_medtee("generate", *base, "evaluation.blinding_recipient=keys/custodian.pub", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    [blinding] = set(cwd.glob("outputs/*/*/blinding.sealed")) - before
    with pytest.raises(KeyWrapError):
        open_blinding(blinding, cwd / "keys/owner2.key")
    assert len(open_blinding(blinding, cwd / "keys/custodian.key")) == 3
    digests = {run_medtee("recipes", "digest", "--mode", "generate", *base, f"evaluation.blinding_recipient={k}",
                          cwd=cwd).stdout for k in ("keys/custodian.pub", "keys/owner3.pub", "keys/owner3.pub")}
    assert len(digests) == 2  # the custodian's key is attested by its content


def test_generated_scores_must_aggregate_enough_dialogues(tmp_path):
    from medtee import config

    adapter = tmp_path / "adapter.sealed"
    adapter.write_bytes(b"x")
    with pytest.raises(config.ConfigError, match="evaluation.max_items=1 is below tracking.min_aggregate=20"):
        config.check_runnable(config.compose(["evaluation.max_items=1", f"evaluation.adapter={adapter}"]), mode="eval")
    config.check_runnable(config.compose(["evaluation.max_items=1", "evaluation.generate=false",
                                          f"evaluation.adapter={adapter}"]), mode="eval")


def test_an_adapter_of_another_rank_is_refused_naming_the_fix(trained):
    cwd, adapter = trained
    res = run_medtee("eval", "run", *DATA, f"evaluation.adapter={adapter}", "qlora.rank=4", cwd=cwd)
    assert res.returncode == 2 and "settings it was trained with" in res.stderr and "Traceback" not in res.stderr


def test_generate_needs_the_owners_approval_of_the_mode_and_the_study_key(trained):
    """The model team used to get dialogue text by naming its own key as the study owner of `medtee generate`."""
    import hashlib

    import yaml

    from medtee.paths import conf_dir

    cwd, adapter = trained
    for name in ("study-owner", "someone-else"):
        if not (cwd / f"keys/{name}.pub").exists():
            assert run_medtee("keys", "new", "--out", "keys", "--name", name, cwd=cwd).returncode == 0
    dataset_id = json.loads((cwd / "sealed/manifest.json").read_text())["dataset_id"]
    study = hashlib.sha256((cwd / "keys/study-owner.pub").read_bytes()).hexdigest()
    base = yaml.safe_load((conf_dir() / "attestation" / "simulated.yaml").read_text())
    for name, rules in (("no-generate", {"modes": ["train", "eval", "sweep"]}),
                        ("study-only", {"modes": ["train", "generate"], "study_recipients": [study]})):
        (cwd / f"{name}.yaml").write_text(yaml.safe_dump({**base, "name": name, "recipe": {**base["recipe"], **rules}}))
        assert run_medtee("broker", "policy", "add", name, f"{name}.yaml", cwd=cwd).returncode == 0
    packets = set(cwd.glob("outputs/*/*/rating_packet.sealed"))
    try:
        for policy, check in (("no-generate", "policy.recipe.mode"), ("study-only", "policy.recipe.study_recipient")):
            assert run_medtee("broker", "policy", "set", dataset_id, policy, cwd=cwd).returncode == 0
            res = run_medtee("generate", *DATA, f"evaluation.adapter={adapter}",
                             "evaluation.study_recipient=keys/someone-else.pub", "evaluation.max_items=6", cwd=cwd)
            assert res.returncode == 1 and check in res.stderr, res.stderr[-2000:]
            assert set(cwd.glob("outputs/*/*/rating_packet.sealed")) == packets
    finally:
        assert run_medtee("broker", "policy", "set", dataset_id, "simulated", cwd=cwd).returncode == 0


#: `medtee generate` that replaces the study key file with another before the answers are generated.
SWAPS_THE_STUDY_KEY = r"""
import shutil, sys
from medtee import cli
from medtee.evaluation import compare

generate = compare.generate

def swapped(*args, **kwargs):
    shutil.copyfile("keys/someone-else.pub", "keys/named-study.pub")
    return generate(*args, **kwargs)

compare.generate = swapped
sys.exit(cli.main(["generate", *sys.argv[1:]]))
"""


def test_the_packet_goes_to_the_study_key_the_digest_hashed_even_if_the_file_is_replaced(trained):
    cwd, adapter = trained
    for name in ("study-owner", "someone-else"):
        if not (cwd / f"keys/{name}.pub").exists():
            assert run_medtee("keys", "new", "--out", "keys", "--name", name, cwd=cwd).returncode == 0
    (cwd / "keys/named-study.pub").write_bytes((cwd / "keys/study-owner.pub").read_bytes())
    before = set(cwd.glob("outputs/*/*/rating_packet.sealed"))
    res = run_python(SWAPS_THE_STUDY_KEY, *DATA, f"evaluation.adapter={adapter}",
                     "evaluation.study_recipient=keys/named-study.pub", "evaluation.max_items=4",
                     "evaluation.max_new_tokens=4", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (cwd / "keys/named-study.pub").read_bytes() == (cwd / "keys/someone-else.pub").read_bytes()  # swapped
    [packet] = set(cwd.glob("outputs/*/*/rating_packet.sealed")) - before
    assert run_medtee("eval", "packet", str(packet), "--key", "keys/someone-else.key", "--out", "x2",
                      cwd=cwd).returncode == 2
    assert run_medtee("eval", "packet", str(packet), "--key", "keys/study-owner.key", "--out", "study2",
                      cwd=cwd).returncode == 0

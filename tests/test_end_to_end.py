"""The whole chain as a user runs it: `medtee synth` / `seal` / `train` / `adapter open` in fresh directories."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from conftest import run_medtee

from medtee.paths import conf_dir

pytestmark = pytest.mark.slow

FAST = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2"]


def _mlflow_runs(db: Path) -> list[dict]:
    """Runs with their metrics and tags, read straight from the sqlite store."""
    con = sqlite3.connect(db)
    try:
        runs = []
        for run_uuid, status in con.execute("select run_uuid, status from runs"):
            metrics = {k for (k,) in con.execute("select key from metrics where run_uuid=?", (run_uuid,))}
            tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_uuid,)))
            params = dict(con.execute("select key, value from params where run_uuid=?", (run_uuid,)))
            runs.append({"id": run_uuid, "status": status, "metrics": metrics, "tags": tags, "params": params})
        return runs
    finally:
        con.close()


def _output_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in cwd.glob("outputs/*/*/summary.json"))


def _seal(src: Path, out: Path, cwd: Path, *extra: str):
    res = run_medtee("seal", str(src), "--out", str(out), "--policy", "simulated", *extra, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`medtee train` with no arguments, as a newcomer runs it (a new interpreter): (its directory, the result)."""
    cwd = tmp_path_factory.mktemp("demo")
    res = run_medtee("train", cwd=cwd, env={"COLUMNS": "160"}, fresh=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd, res


def test_demo_runs_with_no_arguments_and_lands_in_mlflow(demo):
    tmp_path, res = demo
    assert "SIMULATED" in res.stderr
    [run] = _mlflow_runs(tmp_path / "mlflow.db")
    assert run["status"] == "FINISHED"
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/loss"} <= run["metrics"]
    assert all(m.count("/") == 1 for m in run["metrics"])
    tags = run["tags"]
    assert tags["medtee.recipe"] == "demo"
    assert tags["medtee.attestation.mode"] == "SIMULATED" and tags["medtee.attestation.verdict"] == "pass"
    assert len(tags["medtee.recipe_digest"]) == 64 and len(tags["medtee.dataset_manifest_digest"]) == 64
    assert run["params"]["qlora.quantization"] == "nf4"
    assert not any("path" in k for k in run["params"])
    [out] = _output_dirs(tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["recipe_digest"] == tags["medtee.recipe_digest"]
    assert (out / "adapter.safetensors.enc").stat().st_size > 1000
    assert not list(out.glob("*.safetensors"))  # never a plaintext adapter


def test_the_demo_shows_a_newcomer_what_happened(demo):
    """No advertisement, no library warning, a progress bar in steps, a loss that visibly falls, and a closing
    summary: loss before and after, where the encrypted adapter is and how to open it, the dashboard command."""
    tmp_path, res = demo
    out = res.stdout + res.stderr
    assert "Tip" not in out and "litlogger" not in out and "FutureWarning" not in out and "/-2" not in out
    assert "Training steps" in out and "60/60" in out
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("medtee: done: 60 steps")]
    before, after = (float(x) for x in line.split("train/loss ")[1].split(",")[0].split(" -> "))
    assert after < before - 1.0, line  # the tiny model learns the synthetic dialogues
    [out_dir] = _output_dirs(tmp_path)
    assert f"medtee adapter open {out_dir / 'adapter.safetensors.enc'} --key .medtee/keys/dev-recipient.key" in out
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out


def test_adapter_open_refuses_an_out_that_is_a_file(demo):
    tmp_path, _ = demo
    [out_dir] = _output_dirs(tmp_path)
    (tmp_path / "taken").write_text("not a directory")
    res = run_medtee("adapter", "open", str(out_dir / "adapter.safetensors.enc"), "--key",
                     ".medtee/keys/dev-recipient.key", "--out", "taken", cwd=tmp_path)
    assert res.returncode == 2 and "--out taken is a file" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_seal_train_and_open_the_adapter(tmp_path):
    owner, tee = tmp_path / "owner", tmp_path / "tee"
    owner.mkdir(), tee.mkdir()
    assert run_medtee("synth", "--n", "60", "--seed", "3", "--out", "d.jsonl", cwd=owner).returncode == 0
    _seal(owner / "d.jsonl", owner / "sealed", owner)
    assert run_medtee("keys", "new", "--out", "keys", "--name", "model-owner", cwd=owner).returncode == 0
    recipe = ["data=sealed", f"data.path={owner / 'sealed'}", f"broker.dir={owner / '.medtee/broker'}",
              f"output.recipient={owner / 'keys/model-owner.pub'}", *FAST]
    # the data owner approves exactly this recipe: its digest, as `medtee recipes digest` computes it
    digest = run_medtee("recipes", "digest", *recipe, cwd=owner).stdout.strip()
    policy = yaml.safe_load((conf_dir() / "attestation" / "simulated.yaml").read_text())
    policy.update(name="approved", recipe={**policy["recipe"], "digests": [digest]})
    (owner / "approved.yaml").write_text(yaml.safe_dump(policy))
    dataset_id = json.loads((owner / "sealed/manifest.json").read_text())["dataset_id"]
    for command in (["broker", "policy", "add", "approved", "approved.yaml"],
                    ["broker", "policy", "set", dataset_id, "approved"]):
        assert run_medtee(*command, cwd=owner).returncode == 0
    other = run_medtee("train", *recipe, "qlora.rank=4", cwd=tee)
    assert other.returncode == 1 and "policy.recipe.digest" in other.stderr and not _output_dirs(tee), other.stderr[-2000:]
    res = run_medtee("train", *recipe, cwd=tee)
    assert res.returncode == 0, res.stderr[-3000:]
    [out] = _output_dirs(tee)
    assert json.loads((out / "summary.json").read_text())["recipe_digest"] == digest
    # the recorded recipe names no data path (a directory name can name a patient); it hashes to the digest
    recorded, summary = (json.loads((out / name).read_text()) for name in ("recipe.json", "summary.json"))
    assert "path" not in recorded["data"] and str(owner / "sealed") not in (out / "recipe.json").read_text()
    canonical = json.dumps(recorded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(canonical.encode()).hexdigest() == summary["recipe_digest"]
    assert summary["dataset"]["id"] == json.loads((owner / "sealed/manifest.json").read_text())["dataset_id"]
    opened = run_medtee("adapter", "open", str(out / "adapter.safetensors.enc"), "--key",
                        str(owner / "keys/model-owner.key"), "--out", str(owner / "adapter"), cwd=owner)
    assert opened.returncode == 0, opened.stderr
    from safetensors.torch import load_file

    weights = load_file(owner / "adapter/adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    assert json.loads((owner / "adapter/adapter_config.json").read_text())["r"] == 16
    wrong = run_medtee("adapter", "open", str(out / "adapter.safetensors.enc"), "--key",
                       str(owner / ".medtee/broker/broker.key"), "--out", str(owner / "x"), cwd=owner)
    assert wrong.returncode == 2 and not (owner / "x").exists()


def test_round_trip_on_the_public_dialogues(tmp_path, shared):
    _seal(shared / "data/demo.jsonl", tmp_path / "sealed", tmp_path)
    res = run_medtee("train", "data=sealed", f"data.path={tmp_path / 'sealed'}", *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "decrypting 200 records into memory" in res.stderr


def test_tampered_shard_is_refused_before_anything_is_written(tmp_path):
    owner, tee = tmp_path / "owner", tmp_path / "tee"
    owner.mkdir(), tee.mkdir()
    run_medtee("synth", "--n", "30", "--out", "d.jsonl", cwd=owner)
    _seal(owner / "d.jsonl", owner / "sealed", owner)
    shard = sorted((owner / "sealed").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    res = run_medtee("train", "data=sealed", f"data.path={owner / 'sealed'}",
                     f"broker.dir={owner / '.medtee/broker'}", cwd=tee)
    assert res.returncode == 2
    assert shard.name in res.stderr
    assert list(tee.iterdir()) == []


def test_production_recipe_refuses_on_a_machine_without_a_tee(tmp_path, tmp_path_factory):
    keys = tmp_path_factory.mktemp("model-owner")
    assert run_medtee("keys", "new", "--out", str(keys), "--name", "owner", cwd=keys).returncode == 0
    res = run_medtee("train", "recipe=medgemma27b_h200_sev_snp", f"data.path={tmp_path}", "model.revision=abc",
                     f"output.recipient={keys / 'owner.pub'}", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "SEV-SNP" in res.stderr and "refused" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_sweep_logs_one_run_per_value(tmp_path):
    res = run_medtee("train", "-m", "qlora.rank=4,8", "data.n_synthetic=40", *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = _mlflow_runs(tmp_path / "mlflow.db")
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    assert sorted(r["params"]["qlora.rank"] for r in children) == ["4", "8"]
    assert {r["tags"]["mlflow.parentRunId"] for r in children} == {parent["id"]}


def test_train_against_the_owners_http_broker(tmp_path):
    import subprocess
    import sys

    owner, tee = tmp_path / "owner", tmp_path / "tee"
    owner.mkdir(), tee.mkdir()
    run_medtee("synth", "--n", "30", "--out", "d.jsonl", cwd=owner)
    _seal(owner / "d.jsonl", owner / "sealed", owner)
    server = subprocess.Popen([sys.executable, "-m", "medtee", "broker", "serve", "--port", "0", "--broker-dir",
                               str(owner / ".medtee/broker")], cwd=owner, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()  # printed once the broker accepts requests
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split()[-1]
        res = run_medtee("train", "data=sealed", f"data.path={owner / 'sealed'}", f"broker.url={url}",
                         *FAST, cwd=tee)
        assert res.returncode == 0, res.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    audit = run_medtee("broker", "audit", "verify", "--broker-dir", str(owner / ".medtee/broker"), cwd=owner)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    log = (owner / ".medtee/broker/audit.log").read_text()
    assert '"event": "release"' in log

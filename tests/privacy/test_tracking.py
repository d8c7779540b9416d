"""The tracking guard against a real sqlite MLflow store: allow-lists, aggregates only, safe artifacts, provenance
tags, sweeps nested under one parent run, and `tracking=mlflow_server` configuration."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from conftest import run_medtee
from medtee import config
from medtee.attestation.verdict import Check, Verdict

tracking = pytest.importorskip("medtee.tracking.logger")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """A sqlite store's default artifact root is ./mlruns: keep it out of the checkout."""
    monkeypatch.chdir(tmp_path)

VERDICT = Verdict.of([Check("snp.signature", True, "valid", "valid"), Check("gpu[0].chain", True, "ok", "ok"),
                      Check("gpu[1].chain", False, "ok", "expired")], simulated=True, policy="simulated")


def _logger(tmp_path, name="r", *, sweep_id=None, min_aggregate=20, eval_examples=24, resume_run_id=None):
    guard = tracking.Guard(None, min_aggregate)
    guard.eval_examples = eval_examples
    return tracking.GuardedMLflowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t",
                                        run_name=name, guard=guard, tags={"medtee.recipe": "demo"},
                                        params={"qlora.rank": "8", "data.path": "/secret/place"}, sweep_id=sweep_id,
                                        resume_run_id=resume_run_id)


def test_a_resumed_run_continues_its_mlflow_run_and_a_missing_one_is_a_configuration_error(tmp_path):
    first = _logger(tmp_path)
    first.close("KILLED")
    again = _logger(tmp_path, resume_run_id=first.run_id)
    assert again.run_id == first.run_id
    with pytest.raises(config.ConfigError, match="does not hold; resume with the tracking.tracking_uri"):
        _logger(tmp_path, resume_run_id="0" * 32)


def test_guard_drops_unknown_keys_naming_the_key_not_the_value(caplog):
    guard = tracking.Guard(None, 20)
    guard.eval_examples = 5
    with caplog.at_level(logging.WARNING, logger="medtee.tracking"):
        out = guard.metrics({"train/loss": 1.0, "sample/text_len": 31337.0, "val/loss": 2.0, "epoch": 0,
                             "train/lr": float("nan")})
    assert out == {"train/loss": 1.0, "train/epoch": 0.0}
    assert "'sample/text_len'" in caplog.text and "31337" not in caplog.text
    assert "'val/loss'" in caplog.text and "fewer than tracking.min_aggregate=20" in caplog.text
    guard.eval_examples = 20
    assert guard.metrics({"val/loss": 2.0}) == {"val/loss": 2.0}


def test_tags_and_artifacts_are_allow_listed():
    guard = tracking.Guard(["train/loss"], 20)
    assert guard.tags({"medtee.recipe": "demo", "mlflow.user": "alice", "notes": "x",
                       "medtee.long": "y" * 600}) == {"medtee.recipe": "demo"}
    assert guard.artifact("samples", {"text": "x"}) is None
    assert guard.artifact("evaluation", {"examples": 19, "metrics": {"val/loss": 1.0}}) is None
    name, text = guard.artifact("evaluation", {"examples": 20, "metrics": {"val/loss": 1.0, "val/perplexity": 2.7}})
    assert name == "evaluation.json" and json.loads(text) == {"examples": 20, "metrics": {}}  # narrowed allow-list


def test_run_params_tags_artifacts_and_the_recipe_digest(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = config.compose(["data=sealed", "data.path=/secret/place"])
    digest = config.recipe_digest(cfg)
    logger = _logger(tmp_path)
    logger.log_metrics({"val/loss": 2.0, "text/len": 3.0}, step=1)
    logger.log_window({"train/loss": 1.0}, dialogues=20, step=1)
    summary = {"recipe": "demo", "recipe_digest": digest, "steps": 1}
    logger.finish(summary, recipe=config.digest_input(config.resolved(cfg)), verdict=VERDICT, weight_digests={"m.safetensors": "ab"},
                  evaluation={"val/loss": 2.0}, tags={"medtee.adapter_sha256": "cd", "bad.tag": "x"})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"qlora.rank": "8"}
    assert set(run.data.metrics) == {"train/loss", "val/loss"}
    assert run.data.tags["medtee.adapter_sha256"] == "cd" and "bad.tag" not in run.data.tags
    files = {f.path for f in client.list_artifacts(logger.run_id)}
    assert files == {"summary.json", "recipe.json", "evaluation.json"}
    recipe = json.loads(client.download_artifacts(logger.run_id, "recipe.json", str(tmp_path)) and
                        (tmp_path / "recipe.json").read_text())
    assert "path" not in recipe["data"] and "/secret/place" not in json.dumps(recipe)
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(canonical.encode()).hexdigest() == digest
    client.download_artifacts(logger.run_id, "summary.json", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["attestation"]["policy"] == "simulated" and summary["model_weights_sha256"] == {"m.safetensors": "ab"}


def test_a_training_steps_loss_never_reaches_mlflow_through_lightnings_door(tmp_path, caplog):
    """A step's loss may be one dialogue's (data.batch_size=1): logged with `self.log(..., logger=True)` it would go
    through `log_metrics`, which drops it; only a window of at least min_aggregate dialogues, or a result, passes."""
    from mlflow.tracking import MlflowClient

    logger = _logger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medtee.tracking"):
        logger.log_metrics({"train/loss": 1.5, "train/tokens_per_s": 9.0, "train/grad_norm": 2.0, "train/lr": 0.1}, 3)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(logger.run_id).data.metrics
    assert history == {"train/lr": 0.1}
    assert "'train/loss': a training step's value leaves only as a window of steps" in caplog.text
    logger.log_window({"train/loss": 1.5}, dialogues=19, step=4)
    logger.log_result({"train/loss": 1.25})
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(logger.run_id).data.metrics == {
        "train/lr": 0.1, "train/loss": 1.25}


def test_provenance_tags():
    cfg = config.compose([])
    tags = tracking.run_tags(recipe="demo", recipe_digest="d" * 64, dataset_digest="e" * 64, verdict=VERDICT,
                             hardware=cfg.hardware.name, model=cfg.model, mode="train", weight_digests={"b.safetensors": "2" * 64, "a.safetensors": "1" * 64})
    assert tags["medtee.attestation.verdict.cpu"] == "pass" and tags["medtee.attestation.verdict.gpu0"] == "pass"
    assert tags["medtee.attestation.verdict.gpu1"] == "fail (1 of 1 checks failed)"
    assert tags["medtee.attestation.verdict"] == "fail" and tags["medtee.SIMULATED"].startswith("true")
    listing = f"{'1' * 64}  a.safetensors\n{'2' * 64}  b.safetensors\n"
    assert tags["medtee.model.weights_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert tags["medtee.model.revision"] == "none" and tags["medtee.hardware"] == "cpu_dev"


def test_a_sweep_is_one_parent_run_with_nested_children(tmp_path):
    from mlflow.tracking import MlflowClient

    first, second = _logger(tmp_path, "a", sweep_id="s1"), _logger(tmp_path, "b", sweep_id="s1")
    other = _logger(tmp_path, "c", sweep_id="s2")
    assert first.parent_run_id == second.parent_run_id != other.parent_run_id
    first.close("FINISHED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(first.parent_run_id).info.status == "RUNNING"  # a child still runs
    second.close("FAILED")
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["medtee.recipe"] == "demo"
    assert client.get_run(second.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_artifacts_never_go_straight_to_a_cloud_store(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("t", artifact_location="s3://bucket/x")
    logger = _logger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medtee.tracking"):
        logger.log_artifact("receipt", {"steps": 1})  # no S3 client is even tried
    assert "'s3' store" in caplog.text


def test_artifacts_never_go_to_another_mlflow_artifact_server(tmp_path, caplog):
    """MLflow sends the tracking server's credentials to the host an mlflow-artifacts:// location names."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment(
        "t", artifact_location="mlflow-artifacts://collector.example:8443/x")
    logger = _logger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medtee.tracking"):
        logger.log_artifact("receipt", {"steps": 1})
    assert "keeps artifacts on another server than the tracking server" in caplog.text


def _manifest():
    from medtee.sealing.manifest import Manifest

    return Manifest(format_version=2, dataset_id="ward-7.dialogues", record_count=48, message_count=31337,
                    char_count=271828, shards=(), key_id="k", scheme="s", wrapped_data_key=b"k", key_check="c",
                    release_policy="simulated", classification="phi", dua_id="", created="2026-12-01T00:00:00Z",
                    cipher="AES_GCM_V1", owner_public_key=b"o", token_count=4242, tokenizer="demo sha256:ff")


def test_the_experiment_is_a_finetuning_experiment_created_or_found(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logger = _logger(tmp_path)
    assert client.get_experiment_by_name("t").tags["mlflow.experimentKind"] == "finetuning"
    client.set_experiment_tag(logger._experiment_id, "mlflow.experimentKind", "genai_development")
    client.create_experiment("old")  # made before medtee tagged its experiments
    _logger(tmp_path)
    assert client.get_experiment_by_name("t").tags["mlflow.experimentKind"] == "finetuning"
    found = tracking.GuardedMLflowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="old",
                                         run_name="r", guard=tracking.Guard(None, 20), tags={}, params={})
    assert client.get_experiment_by_name("old").tags["mlflow.experimentKind"] == "finetuning"
    assert found.dashboard == (f"http://127.0.0.1:5000/#/experiments/{found._experiment_id}/runs"
                               f"?workflowType=machine_learning")
    assert f"(experiment 'old'; runs: {found.dashboard})" in found.where
    assert tracking.dashboard_url("https://u:pw@m.example:5000/", "7") == (
        "https://m.example:5000/#/experiments/7/runs?workflowType=machine_learning")


@pytest.mark.parametrize("race", ["create", "tag"])
def test_a_worker_that_loses_the_race_to_create_or_tag_the_experiment_uses_the_winners(tmp_path, monkeypatch, race):
    """Two sweep workers start on a new experiment: both find none and create it, or both find it untagged and tag
    it. The store refuses the loser's duplicate; the loser looks again and uses the one experiment."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    other = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    lookup, tag = MlflowClient.get_experiment_by_name, MlflowClient.set_experiment_tag
    if race == "create":
        def raced(self, name):
            found = lookup(self, name)
            if found is None and lookup(other, name) is None:
                other.create_experiment(name)  # the other worker's create lands after our lookup
            return found

        monkeypatch.setattr(MlflowClient, "get_experiment_by_name", raced)
    else:
        other.create_experiment("t")
        lost = []

        def raced(self, experiment_id, key, value):
            if not lost:  # the other worker's tag lands first; sqlite refuses our duplicate row
                lost.append(tag(other, experiment_id, key, value))
                raise MlflowException("UNIQUE constraint failed: experiment_tags.key, experiment_tags.experiment_id")
            tag(self, experiment_id, key, value)

        monkeypatch.setattr(MlflowClient, "set_experiment_tag", raced)
    logger = _logger(tmp_path)
    (only,) = other.search_experiments(filter_string="name = 't'")
    assert logger._experiment_id == only.experiment_id and only.tags["mlflow.experimentKind"] == "finetuning"


def test_the_sealed_dataset_is_the_runs_dataset_input_without_anything_from_the_records(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = config.compose([f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=t"])
    manifest = _manifest()
    opened = _open(cfg, manifest=manifest)
    opened.close("KILLED")
    resumed = _open(cfg, manifest=manifest, run_id=opened.run_id)
    (entry,) = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(resumed.run_id).inputs.dataset_inputs
    dataset = entry.dataset  # logged once, though the run was opened twice
    assert (dataset.name, dataset.digest, dataset.source_type) == (
        "ward-7.dialogues", manifest.digest()[:12], "medtee-sealed")
    assert json.loads(dataset.source) == {"dataset_id": "ward-7.dialogues", "manifest_sha256": manifest.digest()}
    assert json.loads(dataset.profile) == {"num_rows": 48}
    columns = json.loads(dataset.schema)["mlflow_colspec"]
    assert [c["name"] for c in columns] == ["id", "messages"]
    assert set(columns[1]["items"]["properties"]) == {"role", "content"}
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]
    text = json.dumps([dataset.name, dataset.digest, dataset.source, dataset.schema, dataset.profile])
    assert not any(n in text for n in ("31337", "271828", "4242", "phi")), "no statistic of the text"
    unlogged = _open(cfg)  # the call without a manifest still works
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(unlogged.run_id).inputs.dataset_inputs == []


def _open(cfg, **kwargs):
    tags = tracking.run_tags(recipe="demo", recipe_digest="d" * 64, dataset_digest="e" * 64, verdict=VERDICT,
                             hardware=cfg.hardware.name, model=cfg.model, mode="train")
    return tracking.open_run(cfg.tracking, run_name="demo", tags=tags, params=config.resolved(cfg), eval_examples=24,
                             **kwargs)


def test_the_dataset_schema_is_the_sealed_records_schema():
    from medtee.sealing.seal import _schema

    sealed = _schema()
    columns = tracking.DATASET_SCHEMA["mlflow_colspec"]
    assert [c["name"] for c in columns] == sealed.names
    message = sealed.field("messages").type.value_type
    assert set(columns[1]["items"]["properties"]) == {message.field(i).name for i in range(message.num_fields)}


def test_display_uri_hides_credentials():
    assert tracking.display_uri("https://u:pw@m.example:5000/x?token=t") == "https://m.example:5000/x"
    assert tracking.display_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_mlflow_server_without_its_uri_is_a_clear_configuration_error(tmp_path):
    res = run_medtee("train", "tracking=mlflow_server", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert res.returncode == 2 and "MLFLOW_TRACKING_URI" in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []


def test_mlflow_server_that_does_not_answer_is_named(tmp_path):
    res = run_medtee("train", "tracking=mlflow_server", "data.n_synthetic=20", cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert res.returncode == 3, res.stderr[-2000:]
    assert "the MLflow tracking store http://127.0.0.1:9 refused or did not answer" in res.stderr


def test_a_relative_sqlite_store_is_the_one_in_each_runs_own_directory(tmp_path, monkeypatch):
    """MLflow keeps one store per URI string for the process: with `sqlite:///mlflow.db` as given, a second run
    started in another directory wrote into the first one's database."""
    from mlflow.tracking import MlflowClient

    ids = {}
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        ids[name] = tracking.GuardedMLflowLogger(tracking_uri="sqlite:///mlflow.db", experiment="t", run_name=name,
                                                 guard=tracking.Guard(None, 20), tags={}, params={}).run_id
    for name, run_id in ids.items():
        runs = MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}").search_runs(["1"])
        assert [r.info.run_id for r in runs] == [run_id]

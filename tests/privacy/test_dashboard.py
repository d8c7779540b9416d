"""The dashboard people read, in the MLflow UI (served on loopback) rendered by headless Chromium: the canary training
run's page shows its metrics and medtee's provenance tags and no canary (screenshot kept in tests/artifacts/, ignored
by git); the experiment link medtee prints opens on the training runs, whose Dataset column names the sealed dataset.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, scan

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "tests" / "artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium binary on PATH: install it (Debian: apt-get install -y chromium) for the dashboard test")


def _headless(chromium: str, url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
                           f"--user-data-dir={cwd / 'profile'}", "--virtual-time-budget=20000",
                           "--window-size=1400,1800", *args, url],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_run_page_shows_metrics_and_tags_and_no_canary(forms, server_run, mlflow_server, tmp_path):
    chromium = _chromium()
    assert server_run["proc"].returncode == 0, server_run["proc"].stderr[-3000:]
    url = f"{mlflow_server['url']}/#/experiments/1/runs/{server_run['run_id']}"
    dom = _headless(chromium, url, "--dump-dom", cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    for metric in ("train/loss", "val/loss", "val/perplexity"):
        assert metric in page, f"metric {metric} is not on the run page"
    for tag in ("medtee.recipe", "medtee.recipe_digest", "medtee.dataset_manifest_digest", "medtee.hardware",
                "medtee.attestation.verdict.cpu", "medtee.model.revision", "medtee.SIMULATED"):
        assert tag in page, f"tag {tag} is not on the run page"
    assert "SIMULATED attestation" in page  # the run's description
    (tmp_path / "page.html").write_text(page)
    assert not scan(forms, [tmp_path / "page.html"])

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_run_page.png"
    taken = _headless(chromium, url, f"--screenshot={shot}", cwd=tmp_path)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    print(f"dashboard screenshot: {shot}")


def test_the_experiment_link_opens_on_the_training_runs_with_their_dataset(forms, server_run, sealed_canaries,
                                                                         mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from medtee.sealing.manifest import Manifest

    chromium = _chromium()
    assert server_run["proc"].returncode == 0, server_run["proc"].stderr[-3000:]
    (url,) = re.findall(r"^medtee: MLflow run .*; runs: (\S+)\)", server_run["proc"].stderr, re.MULTILINE)
    experiment_id = MlflowClient(mlflow_server["url"]).get_run(server_run["run_id"]).info.experiment_id
    assert url == f"{mlflow_server['url']}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    dom = _headless(chromium, url, "--dump-dom", cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert f"#/experiments/{experiment_id}/runs/{server_run['run_id']}" in page, "the runs table lists the run"
    assert "No data available" not in page, "the GenAI view (traces) opened instead of the runs"
    manifest = Manifest.load(sealed_canaries["sealed"])
    assert f"{manifest.dataset_id} ({manifest.digest()[:12]})" in page, "the Dataset column names the sealed dataset"
    (tmp_path / "page.html").write_text(page)
    assert not scan(forms, [tmp_path / "page.html"])

    shot = tmp_path / "mlflow_experiment_runs.png"
    taken = _headless(chromium, url, f"--screenshot={shot}", cwd=tmp_path)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    print(f"dashboard screenshot: {shot}")

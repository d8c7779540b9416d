"""The canary suite's tools: one unique identifier per HIPAA Safe Harbor category, a scanner that finds them in any
encoding (plain, lower-case, UTF-16, URL-encoded, demo-tokenizer ids packed as int32/int64), a sealed canary dataset,
a harness that runs `medtee` with an audit of its network connections, and one real MLflow server for the session."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().parent / "harness.py"

#: One obviously fake, unique, greppable identifier per HIPAA Safe Harbor category (45 CFR 164.514(b)(2)).
CANARIES = {
    "name": "Zorblatt Quenfeather",
    "geographic subdivision": "Vexholm Canarystrasse 88",
    "date": "1931-02-29 QXDATE",
    "phone": "QXTEL 555-0142-8876",
    "fax": "QXFAX 555-0199-4410",
    "e-mail": "qzv.canary@example.invalid",
    "social security number": "ZQX-SSN-078051120",
    "medical record number": "ZQX-MRN-58213",
    "health plan beneficiary number": "ZQX-HPB-77031",
    "account number": "ZQX-ACCT-90412",
    "certificate or licence number": "ZQX-LIC-33187",
    "vehicle identifier": "ZQX-VIN-1QX4CANARY",
    "device identifier": "ZQX-UDI-40917",
    "url": "https://zqx-canary.invalid/p/6612",
    "ip address": "203.0.113.217",
    "biometric identifier": "ZQX-FPRINT-55AC9",
    "full-face photo identifier": "ZQX-FACEIMG-8842",
    "other unique number": "ZQX-UID-993177",
}
assert len(set(CANARIES.values())) == 18


def text_forms(canary: str) -> list[bytes]:
    """The byte forms a leaked string could take in a file or a stream."""
    forms = [canary, canary.lower()]
    out = [f.encode() for f in forms]
    out += [f.encode(enc) for f in forms for enc in ("utf-16-le", "utf-16-be")]
    out += [urllib.parse.quote(f).encode() for f in forms] + [urllib.parse.quote_plus(f).encode() for f in forms]
    return list(dict.fromkeys(out))


def token_forms(canary: str) -> list[bytes]:
    """The canary's demo-tokenizer ids (as they appear after a space, the last token left out because it may merge
    with what follows) packed as little-endian int32 and int64 arrays: how a batch or a tensor dump would hold it."""
    import struct

    from medtee.data.tokenizer import build_demo_tokenizer

    ids = build_demo_tokenizer()(" " + canary, add_special_tokens=False)["input_ids"][1:-1]
    assert len(ids) >= 4, f"canary {canary!r} is too short to be found by its token ids"
    return [struct.pack(f"<{len(ids)}i", *ids), struct.pack(f"<{len(ids)}q", *ids)]


@pytest.fixture(scope="session")
def forms() -> dict[str, list[tuple[str, bytes]]]:
    """canary -> [(form name, bytes)] for every canary."""
    out = {}
    for canary in CANARIES.values():
        named = [("text", f) for f in text_forms(canary)] + [("token ids", f) for f in token_forms(canary)]
        out[canary] = named
    return out


def scan(forms: dict, paths: list[Path], texts: dict[str, str] | None = None) -> list[str]:
    """Every (canary, form, place) found in the files under `paths` and in the named captured texts."""
    hits = []
    blobs = [(f"captured {name}", t.encode()) for name, t in (texts or {}).items()]
    for root in paths:
        for path in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if path.is_file() and not path.is_symlink():
                blobs.append((str(path), path.read_bytes()))
    for where, blob in blobs:
        lowered = blob.lower()
        for canary, named in forms.items():
            for kind, form in named:
                if form in blob or (kind == "text" and form.lower() in lowered):
                    hits.append(f"{canary!r} ({kind}) in {where}")
                    break
    return hits


def inject(records: list[dict]) -> list[dict]:
    """Two canaries per dialogue, one in the patient's turns and one in the doctor's, cycling through all 18."""
    values = list(CANARIES.values())
    for i, rec in enumerate(records):
        for msg in rec["messages"]:
            canary = values[(2 * i + (msg["role"] == "assistant")) % len(values)]
            msg["content"] = f"{canary} {msg['content']} {canary} "
    return records


def run_harness(args: list[str], *, cwd: Path, tmpdir: Path, audit: Path, env: dict | None = None,
                timeout: int = 300) -> subprocess.CompletedProcess:
    """`medtee ARGS` through the harness (network audit, optional fault), TMPDIR at `tmpdir`."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir), **(env or {})}
    return subprocess.run([sys.executable, str(HARNESS), str(audit), *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def connections(audit: Path) -> list[tuple[str, str]]:
    """(event, address) pairs the harness recorded."""
    if not audit.exists():
        return []
    return [tuple(json.loads(line)) for line in audit.read_text().splitlines() if line.strip()]


@pytest.fixture
def memory_tmp():
    """A TMPDIR on a memory filesystem when the machine has one (as a TEE run would), removed afterwards."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="medtee-canary-tmp-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def sealed_canaries(tmp_path_factory) -> dict:
    """48 synthetic dialogues carrying the canaries, sealed by `medtee seal` (simulated policy)."""
    from conftest import run_medtee

    owner = tmp_path_factory.mktemp("owner")
    assert run_medtee("synth", "--n", "48", "--seed", "7", "--out", "plain.jsonl", cwd=owner).returncode == 0
    records = [json.loads(line) for line in (owner / "plain.jsonl").read_text().splitlines()]
    with open(owner / "canary.jsonl", "w") as f:
        for rec in inject(records):
            f.write(json.dumps(rec) + "\n")
    (owner / "plain.jsonl").unlink()
    sealed = run_medtee("seal", str(owner / "canary.jsonl"), "--out", str(owner / "sealed"), "--policy",
                        "simulated", cwd=owner)
    assert sealed.returncode == 0, sealed.stderr
    return {"owner": owner, "sealed": owner / "sealed", "broker_dir": owner / ".medtee" / "broker",
            "plaintext": owner / "canary.jsonl", "texts": {"seal stdout": sealed.stdout, "seal stderr": sealed.stderr}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on loopback for the whole session (sqlite backend, proxied artifact store)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield {"url": url, "port": port, "root": root}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def canary_overrides(sealed: dict, *extra: str) -> list[str]:
    """`medtee train` overrides for the sealed canary data: 24 held-out dialogues, so evaluations are aggregates;
    short sequences (each turn opens with its canary), so the runs are quick."""
    return ["data=sealed", f"data.path={sealed['sealed']}", f"broker.dir={sealed['broker_dir']}",
            "data.val_fraction=0.5", "data.max_length=128", "trainer.limit_val_batches=6",
            "trainer.log_every_n_steps=1", *extra]


@pytest.fixture(scope="session")
def server_run(tmp_path_factory, sealed_canaries, mlflow_server) -> dict:
    """Training on the canary data, logged to the session's MLflow server (tracking=mlflow_server), with encrypted
    checkpoints: what the canary scan and the dashboard test look at."""
    cwd = tmp_path_factory.mktemp("tee-server-run")
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="medtee-canary-tmp-", dir=base))
    audit = cwd.parent / f"{cwd.name}.audit"
    proc = run_harness(["train", "tracking=mlflow_server", *canary_overrides(
        sealed_canaries, "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.checkpoint_every_n_steps=3")],
        cwd=cwd, tmpdir=tmp, audit=audit, env={"MLFLOW_TRACKING_URI": mlflow_server["url"]})
    run_id = None
    for line in proc.stderr.splitlines():
        if line.startswith("medtee: MLflow run "):
            run_id = line.split()[3]
    yield {"cwd": cwd, "tmp": tmp, "audit": audit, "proc": proc, "run_id": run_id}
    shutil.rmtree(tmp, ignore_errors=True)

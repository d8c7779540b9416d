"""Every credential source MLflow would use with a tracking server (its environment variables, ~/.mlflow/credentials,
its auth plugin, SigV4 and TLS settings, and the ~/.netrc entry requests adds) goes only to the server the operator
named in MLFLOW_TRACKING_URI; and a sqlite tracking URI carries no query options (SQLAlchemy's `plugin=` loads code).

The fake server logs every request's Authorization header; the control test shows MLflow sends it the credentials
file's password, the others that `medtee train` is refused before it connects."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from medtee import config
from medtee.schema import ConfigError
from medtee.tracking.config import TrackingConfig, credential_sources

SECRET = "operator-mlflow-secret"
OPERATOR_URI = "https://ml.example"

#: MLflow settings an operator's machine may carry that would change what these tests see.
MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_TRACKING_INSECURE_TLS",
               "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_SERVER_CERT_PATH", "NETRC", "PGPASSWORD",
               "PGPASSFILE", "PGSERVICE", "MEDTEE_SWEEP_STORAGE")

#: A client that gives up at once (no retries, short timeout) when the fake server answers 500.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class FakeMlflow:
    """An HTTP server on 127.0.0.1 that records each request's method, path and Authorization header."""

    def __init__(self):
        seen = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                seen.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def secrets_seen(self) -> bool:
        import base64

        for _, _, auth in self.requests:
            if auth and (SECRET in auth or SECRET in base64.b64decode(auth.split()[-1] + "==").decode("latin-1")):
                return True
        return False

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_mlflow():
    server = FakeMlflow()
    yield server
    server.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home directory, and none of this machine's MLflow settings."""
    for name in MLFLOW_VARS:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    return path


def _credentials_file(home) -> None:
    (home / ".mlflow").mkdir(exist_ok=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = operator\nmlflow_tracking_password = {SECRET}\n")


def _env(home, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_VARS}
    env.update(PYTHONUNBUFFERED="1", HOME=str(home), MLFLOW_TRACKING_URI=OPERATOR_URI, **FAST_FAIL, **extra)
    return env


@pytest.mark.slow
def test_control_mlflow_sends_the_credentials_file_to_any_server(fake_mlflow, home, tmp_path):
    """Why the rule exists: MLflow attaches ~/.mlflow/credentials to whatever server it is given."""
    _credentials_file(home)
    code = ("import mlflow, sys\nmlflow.set_tracking_uri(sys.argv[1])\n"
            "try:\n    mlflow.MlflowClient().get_experiment_by_name('medtee')\nexcept Exception:\n    pass\n")
    subprocess.run([sys.executable, "-c", code, fake_mlflow.url], cwd=tmp_path, env=_env(home), timeout=120,
                   capture_output=True)
    assert fake_mlflow.secrets_seen()


def _netrc(home) -> dict:
    (home / ".netrc").write_text(f"default login operator password {SECRET}\n")
    (home / ".netrc").chmod(0o600)
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("source, named", [
    (lambda home: _credentials_file(home) or {}, "~/.mlflow/credentials"),
    (_netrc, "~/.netrc"),
    (lambda home: {"MLFLOW_TRACKING_AUTH": "basic-auth"}, "MLFLOW_TRACKING_AUTH"),
], ids=["credentials-file", "netrc", "auth-plugin"])
def test_a_recipe_server_never_receives_the_operators_mlflow_credentials(source, named, fake_mlflow, home,
                                                                         tmp_path):
    env = _env(home, **source(home))
    res = subprocess.run([sys.executable, "-m", "medtee", "train", "trainer.max_steps=2",
                          f"tracking.tracking_uri={fake_mlflow.url}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("medtee: configuration error")]
    assert named in line and "MLFLOW_TRACKING_URI" in line and "Traceback" not in res.stderr
    assert SECRET not in res.stdout + res.stderr and "data key released" not in res.stderr
    assert fake_mlflow.requests == [] and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("name, value", [
    ("MLFLOW_TRACKING_TOKEN", "t"), ("MLFLOW_TRACKING_USERNAME", "u"), ("MLFLOW_TRACKING_PASSWORD", "p"),
    ("MLFLOW_TRACKING_AUTH", "basic-auth"), ("MLFLOW_TRACKING_AWS_SIGV4", "true"),
    ("MLFLOW_TRACKING_CLIENT_CERT_PATH", "/etc/mlflow/client.pem"),
    ("MLFLOW_TRACKING_SERVER_CERT_PATH", "/etc/mlflow/ca.pem"), ("MLFLOW_TRACKING_INSECURE_TLS", "true"),
])
def test_every_setting_mlflow_uses_with_a_server_is_the_operators_servers_only(name, value, home, monkeypatch):
    cfg = config.compose(["tracking.tracking_uri=http://elsewhere.example:5000"])
    config.apply_environment(cfg)  # nothing set: any server may be named
    monkeypatch.setenv(name, value)
    assert name in credential_sources("http://elsewhere.example:5000")
    with pytest.raises(ConfigError, match=name):
        config.apply_environment(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere.example:5000/")
    config.apply_environment(cfg)  # the operator's own server


def test_the_credentials_file_counts_and_a_broken_one_refuses(home, monkeypatch):
    uri = "https://elsewhere.example"
    assert credential_sources(uri) == []
    _credentials_file(home)
    assert credential_sources(uri) == ["~/.mlflow/credentials"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "u")  # the file's password still goes with it
    assert credential_sources(uri) == ["MLFLOW_TRACKING_USERNAME", "~/.mlflow/credentials"]
    (home / ".mlflow" / "credentials").write_text("[mlflow\nbroken")
    assert "unreadable" in credential_sources(uri)[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", OPERATOR_URI)
    cfg = config.compose([f"tracking.tracking_uri={OPERATOR_URI}"])
    config.apply_environment(cfg)  # no check (and no mlflow import) for the operator's server


def test_a_netrc_entry_for_another_host_does_not_count(home):
    (home / ".netrc").write_text(f"machine ml.example login operator password {SECRET}\n")
    (home / ".netrc").chmod(0o600)
    assert credential_sources("https://elsewhere.example") == []
    assert credential_sources("http://ml.example:8080") == ["~/.netrc"]  # http to the operator's host: in the clear


@pytest.mark.parametrize("uri", ["sqlite:////tmp/q.db?plugin=evil", "sqlite:///mlflow.db?mode=ro",
                                 "sqlite:////tmp/q.db#?plugin=evil", "sqlite:///m.db#x"])
def test_a_sqlite_tracking_uri_takes_no_query_options(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [problem] = TrackingConfig(tracking_uri=uri).problems()
    assert "takes none" in problem and "plugin" not in problem
    with pytest.raises(ConfigError, match="a sqlite store takes none"):
        config.compose([f'tracking.tracking_uri="{uri}"'])
    assert list(tmp_path.iterdir()) == []
    assert TrackingConfig(tracking_uri="sqlite:///runs/mlflow.db").problems() == []

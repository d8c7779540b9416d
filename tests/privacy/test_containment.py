"""medtee.containment: log records, warnings and failures reported without data; production egress refused; the run's
containment (no core dumps, offline libraries, telemetry off, temporary files in memory) in a fresh process."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from medtee import config, containment, run

SECRET = "Zorblatt Quenfeather"


class FakeTensor:
    shape = (4, 512)
    dtype = "int64"

    def __repr__(self):
        return f"tensor([[{SECRET}]])"


def _emit(*args, exc_info=None, msg="batch %s") -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(containment.ScrubFilter())
    logger = logging.getLogger("medtee.test.privacy")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(msg, *args, exc_info=exc_info)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


@pytest.mark.parametrize("value, shown", [
    (FakeTensor(), "<FakeTensor shape=(4, 512) withheld>"),
    (SECRET.encode() * 3, "<bytes of 60 bytes withheld>"),
    ("x" * 300 + SECRET, "<text of 320 chars withheld>"),
    (ValueError(SECRET), "<ValueError: message withheld>"),
    ({"input_ids": FakeTensor()}, "{'input_ids': '<FakeTensor shape=(4, 512) withheld>'}"),
    ([FakeTensor(), 3], "['<FakeTensor shape=(4, 512) withheld>', 3]"),
    (list(range(100)), "<list of 100 items withheld>"),
])
def test_log_arguments_that_may_hold_data_are_described_not_shown(value, shown):
    out = _emit(value)
    assert out.strip() == f"batch {shown}" and SECRET not in out


def test_short_arguments_pass(caplog):
    assert _emit("train/loss", 3, msg="dropped %r after %d steps").strip() == "dropped 'train/loss' after 3 steps"


def test_tracebacks_in_logs_keep_frames_not_messages():
    try:
        raise KeyError(SECRET)
    except KeyError:
        out = _emit(1, exc_info=True)
    assert "KeyError (message withheld" in out and "test_containment.py" in out and SECRET not in out


def test_failure_report_names_types_causes_and_frames_only():
    try:
        try:
            raise ValueError(SECRET)
        except ValueError as inner:
            raise RuntimeError(f"wrapped {inner}") from inner
    except RuntimeError as exc:
        lines = containment.failure_report(exc)
    assert lines[0].startswith("RuntimeError <- ValueError (message withheld")
    assert any("test_failure_report" in line for line in lines)
    assert SECRET not in "\n".join(lines)


def test_warnings_lose_source_lines_and_quoted_values():
    stream = io.StringIO()
    containment._showwarning(UserWarning(f"unknown token {SECRET!r} in sample"), UserWarning, "/x/lib.py", 7,
                         file=stream, line=f"warn({SECRET!r})")
    assert stream.getvalue() == "/x/lib.py:7: UserWarning: unknown token ... (rest withheld: it may quote data)\n"
    assert containment.scrub_text("`old()` is deprecated, use `new()`") == "`old()` is deprecated, use `new()`"
    assert SECRET not in containment.scrub_text(f"x = tensor([{SECRET}])")


def test_progress_bar_shows_only_allow_listed_metrics():
    [bar] = containment.progress_bars(True, ["train/loss"])
    trainer = SimpleNamespace(loggers=[], progress_bar_metrics={"train/loss": 1.5, "debug/sample_len": 7.0})
    assert bar.get_metrics(trainer, None) == {"train/loss": 1.5}
    assert containment.progress_bars(False, ["train/loss"]) == []


def _production(*overrides):
    return config.compose(["recipe=medgemma27b_h200_sev_snp", "data.path=/sealed", "model.revision=abc", *overrides])


def test_development_profiles_have_no_egress_rules():
    assert run.production_egress(config.compose(["tracking.tracking_uri=http://anywhere:5000"])) == []


def test_production_egress_only_to_the_tracking_server_and_the_broker(monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy",
                "MLFLOW_TRACKING_INSECURE_TLS"):
        monkeypatch.delenv(var, raising=False)
    ok = _production("tracking.tracking_uri=https://mlflow.example.org")
    assert [p for p in run.production_egress(ok) if "memory filesystem" not in p] == []
    assert "over https:// only" in " ".join(run.production_egress(_production("tracking.tracking_uri=http://m:5000")))
    creds = run.production_egress(_production("tracking.tracking_uri=https://u:pw@mlflow.example.org"))
    assert any("credentials" in p for p in creds) and not any("pw" in p.split() for p in creds)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert any("NO_PROXY" in p for p in run.production_egress(ok))
    broker_host = str(ok.broker.url).split("/")[2].split(":")[0]
    monkeypatch.setenv("NO_PROXY", f"mlflow.example.org,{broker_host}")
    assert not any("NO_PROXY" in p for p in run.production_egress(ok))
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    assert any("INSECURE_TLS" in p for p in run.production_egress(ok))


def test_filesystem_type_of_dev_shm():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    assert containment.filesystem_type("/dev/shm") in containment.MEMORY_FILESYSTEMS
    assert containment.filesystem_type("/proc/self") == "proc"


CONTAINED = r"""
import logging, os, resource, socket, sys, tempfile, warnings
events = []
sys.addaudithook(lambda e, a: events.append(a) if e in ("socket.connect", "socket.getaddrinfo") else None)
from medtee import containment
with containment.contained() as tmp:
    assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
    assert tempfile.gettempdir() == str(tmp) == os.environ["TMPDIR"] and oct(tmp.stat().st_mode)[-3:] == "700"
    if os.path.isdir("/dev/shm"):
        assert containment.filesystem_type(tmp) in containment.MEMORY_FILESYSTEMS, containment.filesystem_type(tmp)
    import huggingface_hub
    from huggingface_hub import constants
    assert constants.HF_HUB_OFFLINE and constants.HF_HUB_DISABLE_TELEMETRY
    try:
        huggingface_hub.hf_hub_download("google/medgemma-27b-text-it", "config.json")
        raise SystemExit("the hub answered")
    except Exception as exc:
        assert "Offline" in type(exc).__name__ or "LocalEntryNotFound" in type(exc).__name__, type(exc)
    from mlflow.telemetry.utils import is_telemetry_disabled
    assert is_telemetry_disabled()
    logging.getLogger("lib").warning("sample %s", "x" * 400)
    warnings.warn("token 'SECRETVALUE' unknown")
    assert not events, events
    raise ValueError("SECRETVALUE")
"""


def test_containment_in_a_fresh_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MLFLOW_DISABLE_TELEMETRY", "CI")}
    env["TMPDIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", CONTAINED], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr  # the uncaught ValueError, reported by medtee's excepthook
    assert "uncaught ValueError (message withheld" in res.stderr
    assert "<text of 400 chars withheld>" in res.stderr and "UserWarning: token ... (rest withheld" in res.stderr
    assert "SECRETVALUE" not in res.stderr + res.stdout
    assert list(tmp_path.iterdir()) == [], "the private temporary directory is removed"

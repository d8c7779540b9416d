"""Two worker processes share one study on a real PostgreSQL server (a throwaway cluster, unix socket only): they
complete it between them, and no trial runs twice."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from sweep import sweep_checks
from sweep import sweep_worker

PG_BINS = (Path("/usr/local/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))  # Debian's
PORT = "54329"  # names the socket file only: the server listens on no TCP address


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((str(d / name) for d in PG_BINS if (d / name).exists()), None)


def _server_user() -> tuple[list[str], int | None]:
    """(command prefix, uid) to run the server as: ourselves, or as root a non-root user (initdb refuses root)."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser: initdb refuses to run as root")
    for name in ("postgres", "medtee-pg"):
        try:
            return [runuser, "-u", name, "--"], pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    useradd = shutil.which("useradd")
    if useradd is None or subprocess.run([useradd, "--system", "--no-create-home", "medtee-pg"]).returncode:
        pytest.skip("running as root, no 'postgres' user, and useradd could not create one: initdb refuses root")
    return [runuser, "-u", "medtee-pg", "--"], pwd.getpwnam("medtee-pg").pw_uid


@pytest.fixture
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -c constraints.txt -e '.[sweep-postgres]'")
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server here: initdb and pg_ctl are not on PATH, in /usr/local/bin or in "
                    "/usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)")
    prefix, uid = _server_user()
    base = Path(tempfile.mkdtemp(prefix="medtee-pg-"))  # not tmp_path: pytest's root-only tree is closed to uid
    if uid is not None:
        os.chown(base, uid, -1)
    try:
        init = subprocess.run([*prefix, initdb, "-D", str(base / "data"), "-A", "trust", "-U", "postgres",
                               "--no-sync"], capture_output=True, text=True)
        if init.returncode:
            pytest.skip(f"initdb could not create a cluster: {init.stderr.strip().splitlines()[-1:]}")
        start = subprocess.run([*prefix, pg_ctl, "-D", str(base / "data"), "-l", str(base / "log"), "-w", "-o",
                                f"-k {base} -p {PORT} -c listen_addresses='' -c fsync=off", "start"],
                               capture_output=True, text=True)
        if start.returncode:
            pytest.skip(f"the PostgreSQL server did not start: {start.stdout.strip().splitlines()[-1:]}")
        yield f"postgresql+psycopg://postgres@/postgres?host={base}&port={PORT}"
        subprocess.run([*prefix, pg_ctl, "-D", str(base / "data"), "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgres_study_and_never_run_a_trial_twice(tmp_path, postgres_url):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_checks.init_stores(postgres_url, uri)
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [subprocess.Popen([sys.executable, sweep_worker.__file__, "--storage", postgres_url, "--mlflow", uri,
                                 "--n-trials", "6", "--worker", f"w{i + 1}", "--delay", "0.4", "--log", str(log)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i, log in enumerate(logs)]
    for proc in workers:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "stopped=done complete=6" in out, out

    ran = [[line.split()[0] for line in log.read_text().splitlines()] for log in logs]
    assert all(ran), f"a worker ran no trial: {ran}"
    counts = Counter(ran[0] + ran[1])
    assert max(counts.values()) == 1, f"trials run twice: {counts}"
    study = sweep_checks.load(postgres_url)
    sweep_checks.check_study(study, 6)
    assert sorted(map(int, counts)) == sorted(t.number for t in study.trials if t.state.is_finished())
    sweep_checks.check_mlflow(uri, study)

"""A Hydra multirun (`medtee train -m`) leaves no `multirun.yaml`: Hydra's BasicSweeper writes the whole config,
`data.path` included, into the sweep directory, and docs/privacy.md says a data path is never recorded."""

from __future__ import annotations

import shutil

import pytest

from conftest import run_medtee

from .conftest import COMMON

pytestmark = pytest.mark.slow

MARKER = "study-JANE_DOE_QXMRN4471"


def test_a_sweep_leaves_no_file_naming_the_data_path(owner, tmp_path):
    data = tmp_path / "data" / MARKER
    shutil.copytree(owner / "sealed", data)
    cwd = tmp_path / "run"
    cwd.mkdir()
    res = run_medtee("train", "-m", *COMMON, f"data.path={data}", f"broker.dir={owner / '.medtee/broker'}",
                     "trainer.max_steps=1", "qlora.rank=4,8", cwd=cwd, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list(cwd.glob("multirun/*/*/*/summary.json"))) == 2  # both jobs ran, in the sweep's directory
    assert not list(cwd.rglob("multirun.yaml"))
    leaks = [str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()]
    assert leaks == []
    assert MARKER not in res.stdout + res.stderr

"""The `data` config group: schema, shipped options, and light imports for the CLI's start-up."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import fields

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from medtee.data.config import DataConfig, DataSource
from medtee.paths import conf_dir


@pytest.mark.parametrize("option", ["synthetic", "sealed"])
def test_shipped_options_match_the_schema(option):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(conf_dir() / "data" / f"{option}.yaml"))
    assert cfg.source == DataSource(option)
    assert cfg.max_length >= 8 and cfg.batch_size >= 1 and 0 <= cfg.val_fraction < 1


def test_schema_rejects_wrong_types_and_unknown_keys():
    schema = OmegaConf.structured(DataConfig)
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"source": "csv"})
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"batch_size": "four"})
    with pytest.raises(Exception, match="packng"):
        OmegaConf.merge(schema, {"packng": True})


def test_every_field_is_defaulted_and_documented():
    source = inspect.getsource(DataConfig)
    for field in fields(DataConfig):
        line = next(line for line in source.splitlines() if line.strip().startswith(f"{field.name}:"))
        assert "=" in line and "#" in line, field.name


def test_light_modules_import_no_heavy_library():
    code = ("import sys, medtee.data.config, medtee.data.chat, medtee.data.synthetic, medtee.data.tokenizer\n"
            "heavy = ('torch', 'transformers', 'lightning', 'pyarrow', 'tokenizers')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

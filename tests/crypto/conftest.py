"""The golden files: key files, wrapped keys, sealed blobs, an owner key and signature and a format-1 checkpoint,
written by medtee before medtee.crypto existed (medtee.sealing.keywrap / owner, medtee.training.checkpoint)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from medtee.crypto import hpke
from medtee.crypto.hpke import Scheme

GOLDEN = Path(__file__).with_name("golden")
GOLDEN_NAMES = {Scheme.hpke_x25519: "x25519", Scheme.hpke_mlkem768_x25519: "hybrid"}


@pytest.fixture
def golden():
    return GOLDEN


@pytest.fixture
def golden_private_key(tmp_path):
    """Load the golden private key of a scheme, copied with mode 0600 (git keeps no modes but the executable bit)."""

    def load(scheme: Scheme) -> hpke.PrivateKeyHandle:
        path = tmp_path / f"{GOLDEN_NAMES[scheme]}.key"
        shutil.copyfile(GOLDEN / path.name, path)
        os.chmod(path, 0o600)
        found, handle = hpke.load_private_key(path)
        assert found is scheme
        return handle

    return load

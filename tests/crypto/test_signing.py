"""The data owner's Ed25519 signing key: created once (0600), reused, refused when readable by others; the key and
a signature written before (golden/) still load and verify."""

from __future__ import annotations

import os
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medtee.crypto.signing import OWNER_KEY_NAME, load_or_create_signing_key, load_public, public_pem


def test_created_once_then_reused_and_refused_when_readable_by_others(tmp_path):
    key = load_or_create_signing_key(tmp_path / "store")
    private = tmp_path / "store" / f"{OWNER_KEY_NAME}.key"
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    again = load_or_create_signing_key(tmp_path / "store")
    assert public_pem(again.public_key()) == public_pem(key.public_key())
    assert public_pem(load_public(tmp_path / "store" / f"{OWNER_KEY_NAME}.pub")) == public_pem(key.public_key())
    os.chmod(private, 0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_signing_key(tmp_path / "store")


def test_a_public_key_file_that_is_not_an_ed25519_key_is_refused(tmp_path):
    (tmp_path / "x.pub").write_text("not a key")
    with pytest.raises(ValueError, match="Ed25519"):
        load_public(tmp_path / "x.pub")
    with pytest.raises(FileNotFoundError):
        load_public(tmp_path / "missing.pub")


def test_owner_key_and_signature_written_before_still_verify(tmp_path, golden):
    for name in (f"{OWNER_KEY_NAME}.key", f"{OWNER_KEY_NAME}.pub"):
        shutil.copyfile(golden / name, tmp_path / name)
    os.chmod(tmp_path / f"{OWNER_KEY_NAME}.key", 0o600)
    key = load_or_create_signing_key(tmp_path)
    assert isinstance(key, Ed25519PrivateKey)
    public = load_public(tmp_path / f"{OWNER_KEY_NAME}.pub")
    assert public_pem(public) == public_pem(key.public_key())
    public.verify((golden / f"{OWNER_KEY_NAME}.sig").read_bytes(), b"medtee golden manifest body")


def test_concurrent_first_use_creates_one_owner_key_and_every_caller_reads_it_whole(tmp_path):
    """Two seals on a fresh store used to race: one read the other's half-written PEM (MalformedFraming)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from cryptography.hazmat.primitives import serialization

    from medtee.crypto.signing import load_or_create_signing_key

    for attempt in range(5):
        directory = tmp_path / f"store{attempt}"
        start = threading.Barrier(8)

        def first_use(_):
            start.wait()
            return load_or_create_signing_key(directory).public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw)

        with ThreadPoolExecutor(8) as pool:
            keys = set(pool.map(first_use, range(8)))
        assert len(keys) == 1 and not list(directory.glob(".*.tmp"))

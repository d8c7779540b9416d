"""HPKE key wrapping and key files; the key files and wrapped keys written before (golden/) still open."""

from __future__ import annotations

import os
import pickle

import pytest

from medtee.crypto import hpke
from medtee.crypto.hpke import EphemeralKey, KeyWrapError, Scheme

SCHEMES = list(Scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrap_round_trip_and_context_binding(scheme):
    priv, pub = hpke.generate_keypair(scheme)
    assert len(pub) == scheme.public_length
    blob = hpke.wrap(b"k" * 32, pub, scheme=scheme, info=b"ctx-a")
    assert hpke.unwrap(blob, priv, scheme=scheme, info=b"ctx-a") == b"k" * 32
    with pytest.raises(KeyWrapError, match="wrong context"):
        hpke.unwrap(blob, priv, scheme=scheme, info=b"ctx-b")
    other, _ = hpke.generate_keypair(scheme)
    with pytest.raises(KeyWrapError, match="wrong private key"):
        hpke.unwrap(blob, other, scheme=scheme, info=b"ctx-a")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(KeyWrapError):
        hpke.unwrap(bytes(tampered), priv, scheme=scheme, info=b"ctx-a")


def test_default_is_hybrid_post_quantum():
    assert hpke.DEFAULT_SCHEME is Scheme.hpke_mlkem768_x25519
    assert EphemeralKey.generate().scheme is Scheme.hpke_mlkem768_x25519


def test_scheme_mismatch_and_misuse_are_refused():
    priv, pub = hpke.generate_keypair(Scheme.hpke_x25519)
    hpriv, hpub = hpke.generate_keypair(Scheme.hpke_mlkem768_x25519)
    with pytest.raises(KeyWrapError, match="must be 1216 bytes"):
        hpke.wrap(b"s", pub, scheme=Scheme.hpke_mlkem768_x25519, info=b"i")
    blob = hpke.wrap(b"s", hpub, scheme="hpke-mlkem768-x25519", info=b"i")
    with pytest.raises(KeyWrapError, match="expected hpke-x25519"):
        hpke.unwrap(blob, priv, scheme=Scheme.hpke_x25519, info=b"i")
    with pytest.raises(ValueError, match="info must be non-empty"):
        hpke.wrap(b"s", pub, scheme=Scheme.hpke_x25519, info=b"")
    with pytest.raises(ValueError, match="use one of"):
        Scheme.parse("rsa-oaep")
    assert Scheme.for_public_key(pub) is Scheme.hpke_x25519 and Scheme.for_public_key(hpub) is Scheme.hpke_mlkem768_x25519


def test_private_keys_cannot_be_pickled_or_printed():
    eph = EphemeralKey.generate()
    handle, _ = hpke.generate_keypair()
    for obj in (eph, handle):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        assert "key_id=" in repr(obj) and "_key" not in repr(obj)
    assert not any(hasattr(eph, a) for a in ("private_bytes", "private_bytes_raw", "export"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_key_files(tmp_path, scheme):
    pub_path = hpke.write_keypair(tmp_path / "keys", "owner", scheme)
    priv_path = tmp_path / "keys" / "owner.key"
    assert pub_path.name == "owner.pub" and oct(priv_path.stat().st_mode & 0o777) == "0o600"
    s, pub = hpke.load_public_key(pub_path)
    s2, handle = hpke.load_private_key(priv_path)
    assert s is scheme and s2 is scheme and handle.public_bytes == pub
    assert hpke.unwrap(hpke.wrap(b"x", pub, scheme=s, info=b"i"), handle, scheme=s, info=b"i") == b"x"
    with pytest.raises(FileExistsError, match="never overwritten"):
        hpke.write_keypair(tmp_path / "keys", "owner", scheme)
    with pytest.raises(KeyWrapError, match="expected a private key"):
        hpke.load_private_key(pub_path)
    os.chmod(priv_path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        hpke.load_private_key(priv_path)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(KeyWrapError, match="keys new"):
        hpke.load_public_key(tmp_path / "junk.pub")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_key_files_and_wrapped_keys_written_before_still_open(golden, golden_private_key, scheme):
    name = {Scheme.hpke_x25519: "x25519", Scheme.hpke_mlkem768_x25519: "hybrid"}[scheme]
    found, pub = hpke.load_public_key(golden / f"{name}.pub")
    handle = golden_private_key(scheme)
    assert found is scheme and handle.public_bytes == pub
    wrapped = (golden / f"{name}.wrapped").read_bytes()
    assert hpke.unwrap(wrapped, handle, scheme=scheme, info=b"medtee/golden/v1") == b"golden data key " * 2
